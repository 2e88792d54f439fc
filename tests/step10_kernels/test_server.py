"""Step 10's server: bad kernel flags are usage errors naming the flag; Triton without a GPU is
refused with the reason; /health says which kernels run and what compiling cost."""
from __future__ import annotations

import os

import httpx
import pytest
import torch

from tests.conftest import SMALL_POOL
from tests.helpers import usage_error


@pytest.mark.parametrize("flags,named", [
    (["--kernels", "cuda"], "--kernels"),
    (["--attention-splits", "3"], "--attention-splits"),
    (["--attention-splits", "-2"], "--attention-splits"),
])
def test_bad_flags_are_usage_errors_naming_the_flag(flags: list[str], named: str) -> None:
    assert named in usage_error("step10_kernels", *flags)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device runs Triton")
def test_triton_without_a_gpu_is_refused_with_the_reason() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    last = usage_error("step10_kernels", "--kernels", "triton", env=env)
    assert "--kernels" in last and "CUDA" in last and "compile" in last, last


def test_health_reports_the_compiled_kernels_and_their_cost(servers) -> None:
    url = servers("step10_kernels", "tiny-gemma3", "--quantization", "none", *SMALL_POOL).url
    model = httpx.get(url + "/health", timeout=10).json()["model"]
    assert model["kernel_backend"] == "compile"  # auto on a CPU
    assert float(model["compile_s"]) > 0 and int(model["compile_graphs"]) >= 3
    listed = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]
    assert listed["kernel_backend"] == "compile"
