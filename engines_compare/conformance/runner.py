"""Run the conformance checks against a URL and collect one result per check."""
from __future__ import annotations

import dataclasses
import time
import traceback

import httpx

from engines_compare.conformance.checks import CHECKS, Ctx, Unsupported


@dataclasses.dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    feature: str
    status: str  # "pass", "fail" or "unsupported"
    detail: str
    seconds: float


def connect(base_url: str, model: str | None = None, timeout: float = 120.0) -> Ctx:
    """A context for ``base_url``: the model and context length come from ``GET /v1/models``."""
    base_url = base_url.rstrip("/").removesuffix("/v1")
    http = httpx.Client(timeout=timeout)
    data = http.get(base_url + "/v1/models").json()["data"]
    entry = next((m for m in data if model is None or m["id"] == model), data[0])
    return Ctx(base_url=base_url, model=entry["id"], max_model_len=entry.get("max_model_len"), http=http)


def run_check(ctx: Ctx, name: str) -> CheckResult:
    feature, fn = CHECKS[name]
    t0 = time.monotonic()
    try:
        fn(ctx)
        status, detail = "pass", ""
    except Unsupported as e:
        status, detail = "unsupported", str(e)
    except Exception as e:  # AssertionError, or the client's own error on a broken response
        status = "fail"
        detail = f"{type(e).__name__}: {e}" if isinstance(e, AssertionError) else traceback.format_exc(limit=2)
    return CheckResult(name, feature, status, detail[:500], time.monotonic() - t0)


def run_conformance(base_url: str, model: str | None = None, only: list[str] | None = None) -> list[CheckResult]:
    ctx = connect(base_url, model)
    try:
        return [run_check(ctx, name) for name in (only or list(CHECKS))]
    finally:
        ctx.http.close()
