"""Conformance checks for bad input: every client mistake is a 4xx with OpenAI's error object.

A mistake must never produce a 5xx, a hang or a dead server; each check ends by asking
``/health`` so that a crash shows up in the check that caused it.
"""
from __future__ import annotations

from typing import Any

from engines_compare.conformance.checks import Ctx, check


def _refused(ctx: Ctx, path: str, body: dict[str, Any] | str, status: int = 400,
             param: str | None = None) -> dict[str, Any]:
    r = ctx.post(path, body)
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text[:300]}"
    err = r.json().get("error")
    assert isinstance(err, dict) and err.get("message"), f"no OpenAI error object: {r.text[:300]}"
    if param is not None:
        assert param in (err.get("param") or "") or param in err["message"], \
            f"error does not name {param!r}: {err}"
    assert ctx.http.get(ctx.base_url + "/health").status_code == 200, "server unhealthy after bad input"
    return err


def _complete(**body: Any) -> dict[str, Any]:
    return {"prompt": "Hi", "max_tokens": 4, **body}


@check("errors")
def check_rejects_negative_max_tokens(ctx: Ctx) -> None:
    _refused(ctx, "/v1/completions", _complete(max_tokens=-5), param="max_tokens")


@check("errors")
def check_rejects_max_tokens_beyond_context(ctx: Ctx) -> None:
    _refused(ctx, "/v1/completions", _complete(max_tokens=10_000_000))


@check("errors")
def check_rejects_negative_temperature(ctx: Ctx) -> None:
    _refused(ctx, "/v1/completions", _complete(temperature=-1), param="temperature")


@check("errors")
def check_rejects_top_p_out_of_range(ctx: Ctx) -> None:
    _refused(ctx, "/v1/completions", _complete(top_p=1.5), param="top_p")
    _refused(ctx, "/v1/completions", _complete(top_p=0), param="top_p")


@check("errors")
def check_rejects_wrong_types(ctx: Ctx) -> None:
    _refused(ctx, "/v1/completions", _complete(max_tokens="ten"), param="max_tokens")
    _refused(ctx, "/v1/completions", _complete(temperature="hot"), param="temperature")
    _refused(ctx, "/v1/chat/completions", {"messages": "hello"}, param="messages")


@check("errors")
def check_rejects_missing_fields(ctx: Ctx) -> None:
    _refused(ctx, "/v1/completions", {"max_tokens": 3}, param="prompt")
    _refused(ctx, "/v1/chat/completions", {"max_tokens": 3}, param="messages")


@check("errors")
def check_rejects_malformed_json(ctx: Ctx) -> None:
    _refused(ctx, "/v1/completions", '{"prompt": "Hi", "max_tokens": ')
    _refused(ctx, "/v1/chat/completions", "[1, 2, 3]")


@check("errors")
def check_rejects_unknown_chat_role(ctx: Ctx) -> None:
    _refused(ctx, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "Hi"}]}, param="role")


@check("errors")
def check_rejects_prompt_longer_than_context(ctx: Ctx) -> None:
    length = (ctx.max_model_len or 131_072) + 16
    err = _refused(ctx, "/v1/completions", {"prompt": [5] * length, "max_tokens": 4})
    if ctx.max_model_len:
        assert str(ctx.max_model_len) in err["message"], f"the error should name the limit: {err}"


@check("errors")
def check_rejects_unknown_model(ctx: Ctx) -> None:
    r = ctx.http.post(ctx.base_url + "/v1/completions",
                      json={"model": "no-such-model", "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 404, f"expected 404, got {r.status_code}: {r.text[:200]}"
    assert r.json()["error"]["message"]


@check("errors")
def check_rejects_bad_n(ctx: Ctx) -> None:
    _refused(ctx, "/v1/completions", _complete(n=0), param="n")
