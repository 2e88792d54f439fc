"""The JSON shapes of OpenAI's responses and stream chunks (completions and chat)."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

from shared.outputs import TextDelta


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def error_body(message: str, type: str, param: str | None, code: str | int | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI's usage; ``prompt_tokens_details.cached_tokens`` only from engines with a prefix cache."""
    body: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        body["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return body


class LogprobFormatter:
    """Token strings are each token decoded alone, as vLLM reports them, or with vLLM's
    ``return_tokens_as_token_ids`` the exact id as ``"token_id:123"``."""

    def __init__(self, tokenizer: object, as_ids: bool = False) -> None:
        self._tok = tokenizer
        self._as_ids = as_ids

    def token(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self._as_ids else self._tok.decode([token_id])

    def completion(self, deltas: list[TextDelta], text_offset: int) -> dict[str, Any]:
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for d in deltas:
            within = 0  # a delta of several tokens (an echoed prompt): each token's own offset
            for tid, lp, top in zip(d.token_ids, d.logprobs, d.top_logprobs):
                token = self.token(tid)
                out["tokens"].append(token)
                out["token_logprobs"].append(lp)
                tops: dict[str, float] = {}
                for t, v in top or ():  # most likely first; where two tokens read the same, keep it
                    tops.setdefault(self.token(t), v)
                out["top_logprobs"].append(None if top is None else tops)  # None: a prompt's first token
                out["text_offset"].append(text_offset + min(within, len(d.text)))
                within += len(token)
            text_offset += len(d.text)
        return out

    def chat(self, deltas: list[TextDelta]) -> dict[str, Any]:
        content = []
        for d in deltas:
            for tid, lp, top in zip(d.token_ids, d.logprobs, d.top_logprobs):
                s = self.token(tid)
                content.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                                "top_logprobs": [{"token": self.token(t), "logprob": v,
                                                  "bytes": list(self.token(t).encode())} for t, v in (top or ())]})
        return {"content": content}


class ChunkBuilder:
    """Builds the body of one response, or the chunks of one stream, for either endpoint."""

    def __init__(self, chat: bool, model: str, logprobs: LogprobFormatter | None) -> None:
        self.chat = chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = now()
        self.model = model
        self._lp = logprobs
        self._offsets: dict[int, int] = {}

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def _logprobs(self, index: int, deltas: list[TextDelta]) -> dict[str, Any] | None:
        if self._lp is None:
            return None
        if self.chat:
            return self._lp.chat(deltas)
        start = self._offsets.get(index, 0)
        self._offsets[index] = start + sum(len(d.text) for d in deltas)
        return self._lp.completion(deltas, start)

    def role_chunk(self, index: int) -> dict[str, Any]:
        return self._envelope([{"index": index, "delta": {"role": "assistant", "content": ""},
                                "logprobs": None, "finish_reason": None}], chunk=True)

    def chunk(self, index: int, delta: TextDelta) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "logprobs": self._logprobs(index, [delta]),
                                  "finish_reason": delta.finish_reason}
        if self.chat:
            choice["delta"] = {"content": delta.text} if delta.text else {}
        else:
            choice["text"] = delta.text
        return self._envelope([choice], chunk=True)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int,
                    cached_tokens: int | None = None) -> dict[str, Any]:
        body = self._envelope([], chunk=True)
        body["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens)
        return body

    def final(self, results: dict[int, tuple[str, str | None, list[TextDelta]]], prompt_tokens: int,
              completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
        choices = []
        for index in sorted(results):
            text, finish, deltas = results[index]
            choice: dict[str, Any] = {"index": index, "logprobs": self._logprobs(index, deltas),
                                      "finish_reason": finish}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        body = self._envelope(choices, chunk=False)
        body["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens)
        return body
