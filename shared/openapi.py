"""What ``/openapi.json`` and ``/docs`` say about the two POST endpoints: every request field and
the shape of every answer.

The handlers parse their JSON bodies themselves (so that a malformed body or a wrong type is
OpenAI's 400 naming the field, not FastAPI's 422), which hides the bodies from FastAPI's schema.
:func:`document` puts them back: the request models of :mod:`shared.protocol` as the request
bodies, and the models below as the responses (JSON, or ``text/event-stream`` chunks when
``stream`` is true) and the error object of every 4xx and 5xx. The response models document what
:mod:`shared.responses` builds; a test validates real responses against them, field for field.
"""
from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema

from shared.protocol import ChatCompletionRequest, CompletionRequest


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field the server sends but this does not document fails the test


class PromptTokensDetails(_Out):
    cached_tokens: int


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None  # engines with a prefix cache (step 07 on)


class CompletionLogprobs(_Out):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: a prompt's first token (echo)
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length", "abort"] | None  # None: a stream chunk before the last


class CompletionResponse(_Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None  # in a stream: only the last chunk's, with stream_options.include_usage


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: list[TokenLogprob]


class AssistantMessage(_Out):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length", "abort"] | None


class ChatCompletionResponse(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Out):
    role: Literal["assistant"] | None = None  # the first chunk of each choice
    content: str | None = None


class ChatChunkChoice(_Out):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length", "abort"] | None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ErrorDetail(_Out):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(_Out):
    error: ErrorDetail


ERRORS = {"400": "a client mistake, naming the field (`param`)", "404": "an unknown `model`",
          "429": "overloaded (step 06 on): retry after `Retry-After` seconds",
          "503": "loading, shutting down, or the engine failed (`/health` says which)",
          "504": "the request's `timeout` passed before its first token (step 06 on)"}
ENDPOINTS = {  # path: (request body, JSON answer, stream chunk)
    "/v1/completions": (CompletionRequest, CompletionResponse, CompletionResponse),
    "/v1/chat/completions": (ChatCompletionRequest, ChatCompletionResponse, ChatCompletionChunk),
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema of ``app``, with the POST endpoints' bodies, answers and errors filled in."""
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    models = [(m, "validation") for m, _, _ in ENDPOINTS.values()]
    answers = {m for _, a, c in ENDPOINTS.values() for m in (a, c)} | {ErrorResponse}
    models += [(m, "serialization") for m in sorted(answers, key=lambda m: m.__name__)]
    _, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
    schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
    for path, (body, answer, chunk) in ENDPOINTS.items():
        op = schema["paths"][path]["post"]
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
        op["responses"] = {
            "200": {"description": "the answer; with `stream: true`, server-sent events: one JSON chunk per "
                                   "`data:` line, then `data: [DONE]`",
                    "content": {"application/json": {"schema": _ref(answer)},
                                "text/event-stream": {"schema": _ref(chunk)}}},
            **{code: {"description": text, "content": {"application/json": {"schema": _ref(ErrorResponse)}}}
               for code, text in ERRORS.items()}}
    return schema


def document(app: FastAPI) -> None:
    """Serve :func:`openapi_schema` at ``/openapi.json`` (and so in ``/docs``), built once."""
    cache: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not cache:
            cache.update(openapi_schema(app))
        return cache

    app.openapi = openapi  # type: ignore[method-assign]
