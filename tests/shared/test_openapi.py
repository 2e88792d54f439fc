"""/openapi.json (and /docs) document both POST endpoints' bodies, answers and errors; real
answers of a live step validate against the documented models, field for field; bad input stays
OpenAI's 400, not FastAPI's 422; schemathesis's generated requests, valid and invalid, never get
a 5xx and leave the server alive."""
from __future__ import annotations

import json

import httpx
import pytest

from shared.openapi import (ChatCompletionChunk, ChatCompletionResponse, CompletionResponse, ErrorResponse,
                            openapi_schema)
from shared.protocol import ChatCompletionRequest, CompletionRequest
from tests.conftest import SMALL_POOL

STEP = ("step07_paged_kv", "tiny-llama", *SMALL_POOL)  # the conformance suite's server


@pytest.fixture(scope="module")
def url(servers) -> str:
    return servers(*STEP).url


def test_both_post_endpoints_document_every_request_field_and_their_answers(url: str) -> None:
    schema = httpx.get(url + "/openapi.json", timeout=10).json()
    parts = schema["components"]["schemas"]
    for path, model, required in (("/v1/completions", CompletionRequest, "prompt"),
                                  ("/v1/chat/completions", ChatCompletionRequest, "messages")):
        op = schema["paths"][path]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        body = parts[ref.rsplit("/", 1)[1]]
        assert set(body["properties"]) == set(model.model_fields) and required in body["required"], path
        assert set(op["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
        for code in ("400", "404", "429", "503"):
            assert op["responses"][code]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    docs = httpx.get(url + "/docs", timeout=10)
    assert docs.status_code == 200 and "/openapi.json" in docs.text  # Swagger UI renders this schema


def test_the_schema_is_built_once_per_app() -> None:
    from shared.api import build_app

    app = build_app(engine=None)  # type: ignore[arg-type]  # documenting needs no engine
    assert app.openapi() is app.openapi() and app.openapi() == openapi_schema(app)


def sse_chunks(url: str, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_real_answers_validate_against_the_documented_models(url: str) -> None:
    completion = {"prompt": ["Hello", "World"], "max_tokens": 5, "temperature": 0, "logprobs": 2, "echo": True, "n": 2}
    r = httpx.post(url + "/v1/completions", json=completion, timeout=60)
    assert r.status_code == 200
    CompletionResponse.model_validate(r.json())
    for chunk in sse_chunks(url, "/v1/completions", {**completion, "stream_options": {"include_usage": True}}):
        CompletionResponse.model_validate(chunk)
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "logprobs": True, "top_logprobs": 2,
            "ignore_eos": True}
    r = httpx.post(url + "/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200
    ChatCompletionResponse.model_validate(r.json())
    chunks = sse_chunks(url, "/v1/chat/completions", {**chat, "stream_options": {"include_usage": True}})
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    for bad in ({"prompt": "x", "max_tokens": "5"}, {"prompt": "x", "model": "nope"}):
        r = httpx.post(url + "/v1/completions", json=bad, timeout=10)
        assert r.status_code in (400, 404)
        ErrorResponse.model_validate(r.json())


def test_a_model_that_drifts_from_the_answers_is_caught() -> None:
    """The check above can fail: a field the server sends but the models do not document."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        CompletionResponse.model_validate({"id": "x", "object": "text_completion", "created": 1, "model": "m",
                                           "choices": [], "undocumented": 1})


@pytest.mark.parametrize("body", [b"{not json", b'{"prompt": 5}', b'{"prompt": "x", "max_tokens": "5"}'])
def test_bad_input_is_still_openais_400_not_fastapis_422(url: str, body: bytes) -> None:
    r = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
