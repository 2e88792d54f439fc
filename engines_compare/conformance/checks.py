"""The conformance checks: one function per behaviour of the OpenAI-compatible API.

Each check takes a :class:`Ctx` and raises ``AssertionError`` when the server misbehaves, or
:class:`Unsupported` when it answers a parameter with a clean refusal (so the matrix can say
"not supported" instead of "broken"). Checks use only HTTP, so they run against our steps and
against any other engine; they need no tokenizer and make no assumption about the model beyond
what ``GET /v1/models`` says. Requests are short (a few tokens) so the suite is quick on a CPU.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import httpx


class Unsupported(Exception):
    """The server refused a feature cleanly (4xx): reported as unsupported, not as broken."""


@dataclasses.dataclass(slots=True)
class Ctx:
    base_url: str
    model: str
    max_model_len: int | None
    http: httpx.Client

    def openai(self) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=self.base_url + "/v1", api_key="conformance", max_retries=0, timeout=120)

    def post(self, path: str, body: dict[str, Any] | str | bytes) -> httpx.Response:
        if isinstance(body, dict):
            return self.http.post(self.base_url + path, json={"model": self.model, **body})
        return self.http.post(self.base_url + path, content=body, headers={"content-type": "application/json"})

    def complete(self, **body: Any) -> dict[str, Any]:
        r = self.post("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 6, **body})
        if 400 <= r.status_code < 500:
            raise Unsupported(f"{r.status_code}: {r.text[:200]}")
        assert r.status_code == 200, f"status {r.status_code}: {r.text[:300]}"
        return r.json()

    def stream_raw(self, path: str, body: dict[str, Any]) -> list[dict[str, Any] | str]:
        """POST with stream=true; return each SSE data payload (parsed JSON, or '[DONE]')."""
        out: list[dict[str, Any] | str] = []
        with self.http.stream("POST", self.base_url + path, json={"model": self.model, "stream": True, **body}) as r:
            assert r.status_code == 200, f"status {r.status_code}"
            assert r.headers["content-type"].startswith("text/event-stream"), r.headers["content-type"]
            for line in r.iter_lines():
                if line.startswith("data: "):
                    payload = line[len("data: "):]
                    out.append(payload if payload == "[DONE]" else json.loads(payload))
        return out


Check = Callable[[Ctx], None]
CHECKS: dict[str, tuple[str, Check]] = {}  # name -> (feature, check): filled by @check at import


def check(feature: str) -> Callable[[Check], Check]:
    def register(fn: Check) -> Check:
        CHECKS[fn.__name__.removeprefix("check_")] = (feature, fn)
        return fn
    return register


FIXED = {"ignore_eos": True, "temperature": 0}  # greedy, fixed length: raw request fields
FIXED_SDK = {"temperature": 0, "extra_body": {"ignore_eos": True}}  # the same through the openai SDK


def _text(resp: dict[str, Any], i: int = 0) -> str:
    return resp["choices"][i]["text"]


@check("endpoints")
def check_health(ctx: Ctx) -> None:
    assert ctx.http.get(ctx.base_url + "/health").status_code == 200


@check("endpoints")
def check_models(ctx: Ctx) -> None:
    models = ctx.openai().models.list()
    assert [m.id for m in models.data] and models.data[0].id == ctx.model


@check("completions")
def check_completion_basic(ctx: Ctx) -> None:
    r = ctx.openai().completions.create(model=ctx.model, prompt="Hello, my name is", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.id and r.created > 0
    c = r.choices[0]
    assert isinstance(c.text, str) and c.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 0 and 1 <= u.completion_tokens <= 5
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


@check("completions")
def check_completion_stream(ctx: Ctx) -> None:
    client = ctx.openai()
    full = client.completions.create(model=ctx.model, prompt="Once upon a time", max_tokens=8, **FIXED_SDK)
    chunks = list(client.completions.create(model=ctx.model, prompt="Once upon a time", max_tokens=8,
                                            stream=True, **FIXED_SDK))
    assert len(chunks) >= 2, "a stream of one chunk is not streaming"
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


@check("streaming")
def check_stream_ends_with_done(ctx: Ctx) -> None:
    events = ctx.stream_raw("/v1/completions", {"prompt": "Hi", "max_tokens": 4, **FIXED})
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1


@check("streaming")
def check_stream_usage(ctx: Ctx) -> None:
    events = ctx.stream_raw("/v1/completions", {"prompt": "Hi", "max_tokens": 5, **FIXED,
                                                "stream_options": {"include_usage": True}})
    last = events[-2]
    assert isinstance(last, dict) and last["choices"] == [], "usage chunk must have no choices"
    assert last["usage"]["completion_tokens"] == 5
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 5


@check("chat")
def check_chat_basic(ctx: Ctx) -> None:
    r = ctx.openai().chat.completions.create(model=ctx.model, max_tokens=5, temperature=0,
                                             messages=[{"role": "user", "content": "Say hello."}])
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens >= 1


@check("chat")
def check_chat_stream(ctx: Ctx) -> None:
    stream = ctx.openai().chat.completions.create(
        model=ctx.model, max_tokens=6, temperature=0, stream=True, extra_body={"ignore_eos": True},
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


@check("chat")
def check_chat_max_completion_tokens(ctx: Ctx) -> None:
    r = ctx.openai().chat.completions.create(model=ctx.model, max_completion_tokens=3, temperature=0,
                                             extra_body={"ignore_eos": True},
                                             messages=[{"role": "user", "content": "Count to ten."}])
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


@check("max_tokens / ignore_eos")
def check_ignore_eos_fixes_length(ctx: Ctx) -> None:
    r = ctx.complete(max_tokens=9, **FIXED)
    assert r["usage"]["completion_tokens"] == 9 and r["choices"][0]["finish_reason"] == "length"


@check("determinism")
def check_greedy_is_deterministic(ctx: Ctx) -> None:
    assert _text(ctx.complete(max_tokens=8, **FIXED)) == _text(ctx.complete(max_tokens=8, **FIXED))


@check("seed")
def check_seed_reproducible(ctx: Ctx) -> None:
    body = {"max_tokens": 12, "temperature": 1.0, "ignore_eos": True}
    a, b = ctx.complete(seed=7, **body), ctx.complete(seed=7, **body)
    assert _text(a) == _text(b), "same seed, different output"
    others = {_text(ctx.complete(seed=s, **body)) for s in (1, 2, 3)}
    assert len(others | {_text(a)}) > 1, "seed has no effect"


@check("top_k")
def check_top_k_1_is_greedy(ctx: Ctx) -> None:
    assert _text(ctx.complete(max_tokens=8, temperature=1.0, top_k=1, seed=3, ignore_eos=True)) == \
        _text(ctx.complete(max_tokens=8, **FIXED))


@check("top_p")
def check_tiny_top_p_is_greedy(ctx: Ctx) -> None:
    assert _text(ctx.complete(max_tokens=8, temperature=1.0, top_p=1e-6, seed=3, ignore_eos=True)) == \
        _text(ctx.complete(max_tokens=8, **FIXED))


@check("min_p")
def check_min_p_1_is_greedy(ctx: Ctx) -> None:
    assert _text(ctx.complete(max_tokens=8, temperature=1.0, min_p=1.0, seed=3, ignore_eos=True)) == \
        _text(ctx.complete(max_tokens=8, **FIXED))


@check("penalties")
def check_penalties_change_output(ctx: Ctx) -> None:
    plain = ctx.complete(max_tokens=24, **FIXED)
    pen = ctx.complete(max_tokens=24, frequency_penalty=2.0, presence_penalty=2.0, **FIXED)
    assert pen["usage"]["completion_tokens"] == 24
    assert _text(pen) != _text(plain), "penalties had no effect on a 24-token greedy output"


@check("n")
def check_n_choices(ctx: Ctx) -> None:
    r = ctx.complete(n=3, max_tokens=4, temperature=1.0, seed=1)
    assert sorted(c["index"] for c in r["choices"]) == [0, 1, 2]


@check("prompt forms")
def check_prompt_list(ctx: Ctx) -> None:
    r = ctx.post("/v1/completions", {"prompt": ["One", "Two"], "max_tokens": 3, **FIXED}).json()
    assert sorted(c["index"] for c in r["choices"]) == [0, 1]
    assert r["usage"]["completion_tokens"] == 6


@check("prompt forms")
def check_prompt_token_ids(ctx: Ctx) -> None:
    r = ctx.post("/v1/completions", {"prompt": [2, 10, 20, 30], "max_tokens": 3, **FIXED})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 4


@check("stop")
def check_stop_string(ctx: Ctx) -> None:
    text = _text(ctx.complete(max_tokens=16, **FIXED))
    stop = next((text[i:i + 2] for i in range(2, len(text) - 1) if text[i:i + 2].strip()), None)
    if stop is None:
        raise Unsupported("the model's greedy output has no usable stop string")
    r = ctx.complete(max_tokens=16, stop=[stop, "\x00never"], **FIXED)
    assert _text(r) == text[: text.index(stop)], (text, stop, _text(r))
    assert r["choices"][0]["finish_reason"] == "stop"


@check("logprobs")
def check_completion_logprobs(ctx: Ctx) -> None:
    r = ctx.complete(max_tokens=4, logprobs=2, **FIXED)
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == r["usage"]["completion_tokens"] == 4
    assert all(v <= 0 for v in lp["token_logprobs"])
    # 2 entries, or 3 where an engine adds the chosen token; fewer where two tokens decode to the
    # same text (the format keys them by text), e.g. partial UTF-8 bytes that both read "\ufffd"
    assert all(1 <= len(t) <= 3 for t in lp["top_logprobs"])
    # greedy: the chosen token is the most likely one
    assert all(abs(max(t.values()) - v) < 1e-3 for t, v in zip(lp["top_logprobs"], lp["token_logprobs"]))


@check("logprobs")
def check_chat_logprobs(ctx: Ctx) -> None:
    r = ctx.openai().chat.completions.create(model=ctx.model, max_tokens=3, temperature=0, logprobs=True,
                                             top_logprobs=2, extra_body={"ignore_eos": True},
                                             messages=[{"role": "user", "content": "Hi"}])
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
