"""Metric arithmetic on synthetic timestamps, checked against hand-computed values."""
from __future__ import annotations

import random

import numpy as np
import pytest

from engines_compare.metrics import RequestRecord, itls, parse_goodput, percentile, summarize, tpot

approx = lambda v: pytest.approx(v, rel=1e-9, abs=1e-9)  # noqa: E731


def _records() -> list[RequestRecord]:
    return [
        # TTFT 100 ms, E2EL 250 ms, TPOT (250-100)/2 = 75 ms, ITLs 50 and 100 ms
        RequestRecord(0, start=0.0, chunk_times=[0.1, 0.15, 0.25], end=0.3, prompt_tokens=10, output_tokens=3),
        # TTFT 200 ms, E2EL 300 ms, TPOT 100 ms, ITL 100 ms
        RequestRecord(1, start=0.05, chunk_times=[0.25, 0.35], end=0.4, prompt_tokens=10, output_tokens=2),
        # failed after one chunk: excluded from latency and tokens, but its end counts for wall time
        RequestRecord(2, start=0.1, chunk_times=[0.2], end=0.5, prompt_tokens=10, output_tokens=1, error="boom"),
        # one token: TTFT = E2EL = 50 ms, TPOT undefined
        RequestRecord(3, start=0.0, chunk_times=[0.05], end=0.06, prompt_tokens=10, output_tokens=1),
    ]


def test_summary_matches_hand_computed_values() -> None:
    s = summarize(_records(), {"ttft": 150, "tpot": 80})
    assert (s.completed, s.failed) == (3, 1)
    assert s.duration_s == approx(0.5)  # first send (0.0) to last finish (0.5, the failed one)
    assert s.total_output_tokens == 6 and s.total_input_tokens == 30
    assert s.request_throughput == approx(3 / 0.5)
    assert s.output_throughput == approx(6 / 0.5)
    # TTFT sample [100, 200, 50] ms: sorted [50, 100, 200]
    assert (s.ttft.count, s.ttft.mean, s.ttft.p50) == (3, approx(350 / 3), approx(100))
    assert s.ttft.p90 == approx(100 + 0.8 * 100) and s.ttft.p99 == approx(100 + 0.98 * 100)
    assert s.ttft.p95 == approx(100 + 0.9 * 100)
    # TPOT sample [75, 100] (the one-token request has none)
    assert (s.tpot.count, s.tpot.mean, s.tpot.p50, s.tpot.p90) == (2, approx(87.5), approx(87.5), approx(97.5))
    # ITL pooled over requests: [50, 100, 100]
    assert (s.itl.count, s.itl.mean, s.itl.p50) == (3, approx(250 / 3), approx(100))
    assert (s.e2el.mean, s.e2el.p50) == (approx(200), approx(250))
    # goodput: request 0 (100 <= 150, 75 <= 80) and 3 (50, no TPOT) meet both targets; 1 misses TTFT
    assert s.goodput == approx(2 / 0.5)


def test_tpot_divides_by_output_tokens_not_chunks() -> None:
    # a server that packed 9 tokens into 3 chunks: TPOT uses the usage count, ITL the chunks
    r = RequestRecord(0, start=0.0, chunk_times=[0.1, 0.2, 0.5], end=0.5, output_tokens=9, usage_reported=True)
    assert tpot(r) == approx(0.4 / 8)
    assert itls(r) == [approx(0.1), approx(0.3)]


def test_failures_only_gives_empty_stats_and_zero_throughput() -> None:
    s = summarize([RequestRecord(0, start=0.0, end=1.0, error="HTTP 500")])
    assert (s.completed, s.failed, s.request_throughput, s.goodput) == (0, 1, 0.0, None)
    assert s.ttft.mean is None and s.ttft.p99 is None and s.ttft.count == 0


def test_short_outputs_are_counted() -> None:
    r = RequestRecord(0, start=0.0, chunk_times=[0.1, 0.2], end=0.2, output_tokens=2, expected_output_tokens=5)
    assert summarize([r]).short_outputs == 1


def test_percentile_matches_numpy_linear() -> None:
    rng = random.Random(3)
    for n in (1, 2, 7, 100):
        values = [rng.random() for _ in range(n)]
        for q in (0, 50, 90, 99, 100):
            assert percentile(values, q) == approx(float(np.percentile(values, q)))


@pytest.mark.parametrize("spec", [["ttft"], ["latency:5"], ["ttft:abc"], ["tpot:0"]])
def test_goodput_spec_errors_name_the_flag(spec: list[str]) -> None:
    with pytest.raises(ValueError, match="--goodput"):
        parse_goodput(spec)


def test_goodput_spec_parses() -> None:
    assert parse_goodput(["ttft:500", "tpot:50", "e2el:2000"]) == {"ttft": 500.0, "tpot": 50.0, "e2el": 2000.0}


def test_latency_by_output_length_splits_short_and_long_requests() -> None:
    from engines_compare.report import latency_by_output_length

    def req(start: float, chunks: list[float], n: int) -> dict:
        return {"index": 0, "start": start, "chunk_times": chunks, "end": chunks[-1], "prompt_tokens": 4,
                "output_tokens": n, "usage_reported": True, "expected_output_tokens": n, "error": None}

    run = {"requests": [req(0.0, [3.0, 3.5], 2),  # short, stuck 3 s before its first token
                        req(0.0, [0.5, 1.0, 1.5, 2.0], 4), req(1.0, [1.5, 2.0, 2.5, 3.0], 4)]}
    got = latency_by_output_length(run, short_max=2)
    assert got["short"]["count"] == 1 and got["long"]["count"] == 2
    assert got["short"]["ttft_p50_ms"] == 3000.0
    assert got["short"]["slowdown_p50"] == 3.5 / 0.5
    assert got["long"]["e2el_p50_ms"] == 2000.0
    assert got["long"]["slowdown_p50"] == 2.0 / 1.5
