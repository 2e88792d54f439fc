"""OpenAI request schemas and their translation into :class:`SamplingParams`.

Types are checked strictly (``"5"`` is not a number, ``"true"`` is not a boolean); ranges are
checked by ``SamplingParams`` itself, so an engine built without the API refuses the same values.
Unknown fields are ignored, as OpenAI-compatible servers do. Defaults follow vLLM: completions
default to 16 tokens, chat completions to whatever context is left after the prompt.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from shared.errors import RequestError
from shared.sampling import MAX_LOGPROBS, SamplingParams

MAX_N = 64
COMPLETION_DEFAULT_MAX_TOKENS = 16
CHAT_ROLES = ("system", "developer", "user", "assistant")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


def doc(default: Any, description: str, **schema: Any) -> Any:
    """A field's default and what ``/docs`` says of it. ``schema``: its range for the OpenAPI schema
    only (``minimum``, ``maximum``, ``enum`` ...): the checks themselves stay in ``SamplingParams`` and
    below, so a request without the API is refused the same way and every error names its field."""
    return Field(default, description=description, json_schema_extra=schema or None)


class StreamOptions(_Strict):
    include_usage: bool = doc(False, "send a last chunk with the request's usage")


class _Common(_Strict):
    model: str | None = doc(None, "the served model's name (GET /v1/models); omitted: that one")
    temperature: float | None = doc(None, "0: greedy; default 1", minimum=0)
    top_p: float | None = doc(None, "nucleus sampling: keep the most likely tokens up to this mass",
                              exclusiveMinimum=0, maximum=1)
    top_k: int | None = doc(None, "keep the k most likely tokens; 0 or -1: no limit", minimum=-1)
    min_p: float | None = doc(None, "drop tokens less likely than min_p x the most likely's", minimum=0, maximum=1)
    seed: int | None = doc(None, "makes sampling reproducible (choice i of n uses seed + i)",
                           minimum=-2 ** 63, maximum=2 ** 64 - 1)
    stop: str | list[str] | None = doc(None, "stop before any of these strings (not included in the text)")
    stop_token_ids: list[int] | None = doc(None, "stop after any of these token ids")
    n: int = doc(1, "choices to generate for each prompt", minimum=1, maximum=MAX_N)
    presence_penalty: float | None = doc(None, "subtract this from tokens already generated", minimum=-2, maximum=2)
    frequency_penalty: float | None = doc(None, "subtract this times each token's count so far", minimum=-2, maximum=2)
    stream: bool = doc(False, "answer as server-sent events, one chunk per new text")
    stream_options: StreamOptions | None = doc(None, "options of a streamed answer")
    ignore_eos: bool = doc(False, "keep generating past end-of-sequence tokens (vLLM's)")
    min_tokens: int = doc(0, "generate at least this many tokens before any stop (vLLM's)", minimum=0)
    return_tokens_as_token_ids: bool = doc(False, "logprob tokens as \"token_id:123\" (vLLM's)")
    user: str | None = doc(None, "the end user, for logs (OpenAI's)")
    # Seconds this request may take, from its arrival (the OpenAI SDK's name and unit for its own
    # per-request timeout; send it with extra_body). Honoured by step 06 on; earlier steps ignore it.
    timeout: float | None = doc(None, "seconds from arrival the request may take (step 06 on): "
                                "a 504 before its first token, else finish_reason length", exclusiveMinimum=0)


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        description="one prompt or several (text, or token ids)")
    max_tokens: int | None = doc(COMPLETION_DEFAULT_MAX_TOKENS, "most tokens to generate", minimum=1)
    logprobs: int | None = doc(None, "the log-probabilities of this many most likely tokens at each step",
                               minimum=0, maximum=MAX_LOGPROBS)
    echo: bool = doc(False, "the prompt first, with its log-probabilities when logprobs is set (step 04 on)")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str = Field(description="who speaks", json_schema_extra={"enum": list(CHAT_ROLES)})
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far, rendered by the "
                                        "model's chat template")
    max_tokens: int | None = doc(None, "most tokens to generate (default: what the context leaves)", minimum=1)
    max_completion_tokens: int | None = doc(None, "OpenAI's newer name for max_tokens", minimum=1)
    logprobs: bool = doc(False, "return each generated token's log-probability")
    top_logprobs: int | None = doc(None, "and this many most likely alternatives (needs logprobs)",
                                   minimum=0, maximum=MAX_LOGPROBS)


def prompt_list(req: CompletionRequest) -> list[str | list[int]]:
    """Normalize ``prompt`` to a list of prompts (strings or token-id lists)."""
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise RequestError("prompt must not be empty", param="prompt")
    if isinstance(p[0], int):
        return [list(p)]
    return list(p)


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(req.messages):
        if m.role not in CHAT_ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {m.role!r}",
                               param=f"messages[{i}].role")
        out.append({"role": "system" if m.role == "developer" else m.role, "content": m.text()})
    return out


def check_common(req: _Common) -> None:
    if not 1 <= req.n <= MAX_N:
        raise RequestError(f"n must be in [1, {MAX_N}], got {req.n}", param="n")


def sampling_params(req: _Common, max_tokens: int, logprobs: int | None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """Build (and so validate) the sampling parameters of one request."""
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k is None else req.top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        seed=req.seed, stop=stop, stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        logprobs=logprobs, prompt_logprobs=prompt_logprobs)


def completion_logprobs(req: CompletionRequest, prompt_logprobs: bool) -> tuple[int | None, int | None]:
    """``(logprobs, prompt_logprobs)`` of a completion request. ``echo`` returns the prompt before
    the completion, and with ``logprobs`` the prompt tokens' log-probabilities (vLLM's meaning):
    only engines that compute them (``prompt_logprobs``: step 04 on) take it."""
    if req.echo and not prompt_logprobs:
        raise RequestError("echo is not supported by this server: prompt log-probabilities need an engine "
                           "that runs its own model (step 04 on)", param="echo")
    return req.logprobs, (req.logprobs if req.echo and req.logprobs is not None else None)


def chat_logprobs(req: ChatCompletionRequest) -> int | None:
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise RequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise RequestError(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {req.top_logprobs}",
                               param="top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


def chat_max_tokens(req: ChatCompletionRequest) -> int | None:
    return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens


def check_fits(prompt_len: int, max_tokens: int | None, max_model_len: int, prompt_param: str) -> int:
    """Refuse, up front, a prompt that with ``max_tokens`` does not fit the context."""
    if prompt_len >= max_model_len:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
            f"has {prompt_len} tokens, which leaves no room for a completion.", param=prompt_param)
    if max_tokens is None:
        return max_model_len - prompt_len
    if max_tokens < 1:
        raise RequestError(f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
    if prompt_len + max_tokens > max_model_len:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the "
            f"completion). Please reduce the length of the prompt or max_tokens.", param="max_tokens")
    return max_tokens
