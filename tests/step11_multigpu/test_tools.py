"""The cost model's arithmetic, and the comm tool run end to end on a tiny model (two ranks)."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest

from step11_multigpu.cost_model import GEMMA_270M, LLAMA_7B, Machine, break_even, step_cost
from tests.conftest import ROOT


def test_one_rank_communicates_nothing_and_reads_every_weight() -> None:
    c = step_cost(LLAMA_7B, 1, 1, 0, Machine())
    assert c.comm_ms == 0
    assert LLAMA_7B.layer_params + LLAMA_7B.head_params == pytest.approx(6.74e9 - 32_000 * 4096, rel=0.01)
    assert c.mem_ms == pytest.approx(13.0e9 / (4800e9 * 0.8) * 1e3, rel=0.02)


def test_two_ranks_pay_one_latency_per_all_reduce_and_the_gather() -> None:
    m = dataclasses.replace(Machine(), link_gbs=1e12)  # bandwidth free: latency only
    c = step_cost(GEMMA_270M, 2, 1, 0, m)
    assert c.comm_ms == pytest.approx((2 * 18 + 1 + 1) * m.allreduce_us / 1e3)


def test_replicated_kv_heads_are_read_by_every_rank() -> None:
    no_kv = step_cost(GEMMA_270M, 2, 16, 0, Machine()).mem_ms
    with_kv = step_cost(GEMMA_270M, 2, 16, 1024, Machine()).mem_ms
    kv_bytes = 16 * 1024 * 18 * 2 * 1 * 256 * 2  # one KV head: not split
    assert (with_kv - no_kv) == pytest.approx(kv_bytes / (4800e9 * 0.8) * 1e3)


def test_tp_stops_paying_where_all_reduces_outweigh_the_weights_they_split() -> None:
    m = Machine()
    assert break_even(GEMMA_270M, 1, 1024, m) == 1  # 0.14 ms of weights: nothing worth splitting
    assert break_even(LLAMA_7B, 1, 1024, m) == 4
    assert break_even(LLAMA_7B, 1, 1024, dataclasses.replace(m, allreduce_us=1.0)) > 4  # cheaper links pay further


def test_comm_tool_measures_both_splits_on_a_tiny_model() -> None:
    r = subprocess.run([sys.executable, "-m", "step11_multigpu.comm", "--model", "tiny-llama", "--kernels", "torch",
                        "--batches", "1,2", "--iters", "3", "--context", "8"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert re.search(r"all-reduce \[2, 64\]\s+\d+\.\d", out) and re.search(r"gather \[1, 131\]\s+\d+\.\d", out)
    assert re.search(r"batch\s+2:\s+\d+\.\d ms a step,\s+\d+\.\d ms in collectives", out), out
    assert re.search(r"batch\s+2:\s+\d+\.\d ms a step; 2 ranks / 1 rank: x\d\.\d\d speed", out), out
