"""Every step honours the shared conformance suite (every endpoint, parameter and bad input).

Set ``CONFORMANCE_URL`` to run the same checks against any running server instead.
"""
from __future__ import annotations

import os

import pytest

from engines_compare.conformance import CHECKS, connect
from engines_compare.conformance.runner import run_check
from tests.conftest import SMALL_POOL, STEPS

# Every step with its default flags (paged steps with a small pool: conftest; step 11 with two ranks), step 08 with each scheme (auto is one of them on this CPU), and
# step 09 with its draft proposer.
# One known exception: int4 turns tiny-llama's random weights into a model whose 24-token greedy
# output penalties of 2.0 do not change (penalties_change_output's premise, not the shared
# sampler, fails: every other scheme and step passes it); it is an expected failure there, strict,
# so that it is noticed if it ever passes.
KNOWN = {("int4", "penalties_change_output")}
SCHEMES = [f"step08_quant --quantization {s} {' '.join(SMALL_POOL)}" for s in ("bf16", "int8", "int4")]
STEP_TARGETS = [f"{s} {' '.join(SMALL_POOL)}" if s in ("step07_paged_kv", "step08_quant", "step09_speculative",
                                                         "step10_kernels") else s
                for s in STEPS if s != "step11_multigpu"]
# Step 11 with two ranks (with one it is step 10).
STEP_TARGETS.append(f"step11_multigpu --tensor-parallel-size 2 {' '.join(SMALL_POOL)}")
# Step 09's draft proposer too (n-gram is its default), speculating at every batch size.
SPEC = [f"step09_speculative --speculative-method draft --speculative-max-verify-tokens 0 {' '.join(SMALL_POOL)}"]
TARGETS = [os.environ["CONFORMANCE_URL"]] if os.environ.get("CONFORMANCE_URL") else [*STEP_TARGETS, *SCHEMES, *SPEC]


@pytest.fixture(scope="module", params=TARGETS)
def ctx(request: pytest.FixtureRequest, servers):
    step, *flags = request.param.split()
    url = request.param if request.param.startswith("http") else servers(step, "tiny-llama", *flags).url
    c = connect(url)
    yield c
    c.http.close()


@pytest.mark.parametrize("name", list(CHECKS))
def test_conformance(ctx, name: str, request: pytest.FixtureRequest) -> None:
    target = request.node.callspec.params["ctx"]
    if any(scheme in target.split() and name == check for scheme, check in KNOWN):
        request.applymarker(pytest.mark.xfail(strict=True, reason="int4 on tiny-llama: see KNOWN"))
    result = run_check(ctx, name)
    assert result.status == "pass", f"{name}: {result.status}: {result.detail}"
