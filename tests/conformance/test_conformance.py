"""Every step honours the shared conformance suite (every endpoint, parameter and bad input).

Set ``CONFORMANCE_URL`` to run the same checks against any running server instead.
"""
from __future__ import annotations

import os

import pytest

from engines_compare.conformance import CHECKS, connect
from engines_compare.conformance.runner import run_check
from tests.conftest import STEPS

# Every step with its default flags, and step 08 with each scheme (auto is one of them on this CPU).
SCHEMES = [f"step08_quant --quantization {s}" for s in ("bf16", "int8", "int4")]
TARGETS = [os.environ["CONFORMANCE_URL"]] if os.environ.get("CONFORMANCE_URL") else [*STEPS, *SCHEMES]


@pytest.fixture(scope="module", params=TARGETS)
def ctx(request: pytest.FixtureRequest, servers):
    step, *flags = request.param.split()
    url = request.param if request.param.startswith("http") else servers(step, "tiny-llama", *flags).url
    c = connect(url)
    yield c
    c.http.close()


@pytest.mark.parametrize("name", list(CHECKS))
def test_conformance(ctx, name: str) -> None:
    result = run_check(ctx, name)
    assert result.status == "pass", f"{name}: {result.status}: {result.detail}"
