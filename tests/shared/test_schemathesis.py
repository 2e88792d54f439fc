"""schemathesis (property-based API testing from the OpenAPI schema) against a live step: valid
and invalid requests for every operation, a bounded number of each; none may get a 5xx, an
invalid body must get a 4xx, and the server must still be healthy afterwards."""
from __future__ import annotations

import httpx
import pytest

from tests.conftest import SMALL_POOL

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402  (schemathesis brings it)

STEP = ("step07_paged_kv", "tiny-llama", *SMALL_POOL)
EXAMPLES = 25  # per operation and mode: about 150 requests in all, a minute on a tiny model


@pytest.fixture(scope="module")
def schema(servers):
    url = servers(*STEP).url
    return url, schemathesis.openapi.from_url(url + "/openapi.json")


def operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_generated_requests_never_get_a_server_error(schema, mode: str) -> None:
    url, spec = schema
    from schemathesis import GenerationMode

    generation = GenerationMode(mode)
    tried: dict[str, list[int]] = {}
    for op in operations(spec):
        if op.method.upper() != "POST" and generation is GenerationMode.NEGATIVE:
            continue  # GETs take no input to get wrong

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def run(data: st.DataObject) -> None:
            case = data.draw(op.as_strategy(generation_mode=generation))
            body = case.body if isinstance(case.body, dict) else None
            if body is not None and generation is GenerationMode.POSITIVE:
                body.pop("model", None)  # any other name is a 404 by design
                for name, most in (("max_tokens", 4), ("max_completion_tokens", 4), ("n", 4)):
                    if isinstance(body.get(name), int):  # keep generations short: a tiny model, 2 cores
                        body[name] = min(body[name], most)
            response = case.call(base_url=url, timeout=60)
            tried.setdefault(op.label, []).append(response.status_code)
            timed_out = response.status_code == 504 and body is not None and body.get("timeout") is not None
            assert response.status_code < 500 or timed_out, f"{op.label}: {response.status_code} {response.text[:300]}"
            if generation is GenerationMode.NEGATIVE and op.method.upper() == "POST":
                assert 400 <= response.status_code < 500, f"{op.label}: invalid input got {response.status_code}"

        run()
    assert sum(map(len, tried.values())) >= EXAMPLES  # it really sent requests
    if generation is GenerationMode.POSITIVE:  # and valid ones were served, not all refused
        assert all(200 in tried[f"POST {p}"] for p in ("/v1/completions", "/v1/chat/completions")), tried
    assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"
