"""Refusals (429/503) are recorded per request with their HTTP status and reported apart from
failures; server memory is read from /proc; --duration sizes open-loop points."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import time

import pytest

from engines_compare import bench, report
from engines_compare.loadgen import Endpoint, LoadSpec, run_load
from engines_compare.metrics import RequestRecord, summarize

REFUSAL = json.dumps({"error": {"message": "overloaded", "type": "rate_limit_error", "param": None,
                                "code": "server_overloaded"}}).encode()


async def _refusing_server(status: int) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):  # the client closed: done
            await serve(reader, writer)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.readuntil(b"\r\n\r\n"):  # keep-alive, as uvicorn's 429s are
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 %d Refused\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (status, len(REFUSAL), REFUSAL))
            await writer.drain()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


@pytest.mark.parametrize("status", [429, 503])
def test_refusals_carry_their_status_and_are_not_failures(status: int) -> None:
    async def go() -> list[RequestRecord]:
        srv, port = await _refusing_server(status)
        async with srv:
            return await run_load(Endpoint.parse(f"http://127.0.0.1:{port}"), [b"{}"] * 3, [4] * 3,
                                  LoadSpec(concurrency=1))

    records = asyncio.run(go())
    assert all(r.status == status and r.refused and not r.ok and "server_overloaded" in r.error for r in records)
    assert all(r.retry_after == 1.0 for r in records)  # the header, for Retry-After against reality
    s = summarize(records)
    assert (s.completed, s.failed, s.refused, s.refusal_latency.count) == (0, 0, 3, 3)


def test_summary_splits_completed_refused_and_failed() -> None:
    recs = [RequestRecord(0, 0.0, [0.1, 0.2], 0.2, output_tokens=2, status=200),
            RequestRecord(1, 1.0, [], 1.010, error="HTTP 429: ...", status=429),
            RequestRecord(2, 2.0, [], 2.030, error="HTTP 503: ...", status=503),
            RequestRecord(3, 3.0, [], 3.5, error="HTTP 500: boom", status=500),
            RequestRecord(4, 4.0, [], 4.5, error="TimeoutError: ", status=None)]
    s = summarize(recs)
    assert (s.completed, s.refused, s.failed) == (1, 2, 2)
    assert s.refusal_latency.count == 2 and s.refusal_latency.p50 == pytest.approx(20.0)
    doc = {"runs": [{"target": "t", "point": "rate=9/s", "summary": report_summary(s),
                     "memory": {"rss_before_mib": 100.0, "rss_peak_mib": 150.0, "rss_after_mib": 101.0}}]}
    line = report.refusal_lines(doc)[0]
    assert "refused 2/5 (40.0 %)" in line and "100/150/101 MiB" in line


def report_summary(s: object) -> dict:
    return dataclasses.asdict(s)


def test_server_memory_is_read_from_proc() -> None:
    assert bench.rss_mib(os.getpid()) > 1.0 and bench.rss_mib(None) is None and bench.rss_mib(2 ** 30) is None
    with bench.ServerMemory(os.getpid(), interval_s=0.01, settle_s=0.0) as m:
        ballast = bytearray(64 << 20)  # noqa: F841  (64 MiB resident while sampled)
        for i in range(0, len(ballast), 4096):
            ballast[i] = 1
        time.sleep(0.1)
    r = m.result()
    assert r["rss_peak_mib"] >= r["rss_before_mib"] + 32 and r["rss_after_mib"] is not None


def test_duration_sizes_open_loop_points_only() -> None:
    ap = argparse.ArgumentParser()
    bench.add_arguments(ap)
    cfg = bench.config_from_args(ap.parse_args(["--target", "null", "--concurrency", "1", "--request-rate", "2.5",
                                                "--duration", "10", "--num-requests", "7"]))
    closed, opened = cfg.points()
    assert (cfg.requests_at(closed), cfg.requests_at(opened)) == (7, 25)
    with pytest.raises(ValueError, match="--duration"):
        bench.config_from_args(ap.parse_args(["--target", "null", "--duration", "0"]))


def test_target_flags_go_to_their_step_only() -> None:
    ap = argparse.ArgumentParser()
    bench.add_arguments(ap)
    cfg = bench.config_from_args(ap.parse_args(
        ["--target", "step04_kvcache,step06_backpressure", "--step-flags", "--max-seqs 8",
         "--target-flags", "step06_backpressure=--max-waiting-requests 0 --retry-after 2"]))
    assert cfg.target_flags == (("step06_backpressure", ("--max-waiting-requests", "0", "--retry-after", "2")),)
    with pytest.raises(ValueError, match="--target-flags"):
        bench.config_from_args(ap.parse_args(["--target", "null", "--target-flags", "no-equals-sign"]))


def test_overload_figures_count_lost_requests_and_retry_after_against_the_next_admission() -> None:
    from engines_compare.overload import figures

    def rec(i: int, start: float, status: int | None, ttft: float = 0.1, retry: float | None = None) -> dict:
        ok = status == 200
        return dataclasses.asdict(RequestRecord(i, start, [start + ttft] if ok else [], start + ttft, output_tokens=1,
                                                error=None if ok else f"HTTP {status}", status=status,
                                                retry_after=retry))

    calm = [rec(i, float(i), 200, ttft=0.1) for i in range(5)]
    load = [rec(0, 0.0, 200, ttft=0.3), rec(1, 0.5, 429, retry=2.0), rec(2, 1.0, 429, retry=1.0),
            rec(3, 2.0, 200, ttft=0.2), rec(4, 3.0, None)]  # the last: no answer at all (lost)
    doc = {"runs": [{"target": "s", "load": {"concurrency": 1}, "requests": calm},
                    {"target": "s", "load": {"concurrency": 16}, "requests": []},  # ignored: not the unloaded point
                    {"target": "s", "load": {"request_rate": 10.0}, "requests": load}]}
    f = figures(doc)["s"]
    assert (f["requests"], f["answered"], f["refused"], f["lost"]) == (5, 2, 2, 1)
    assert f["ttft_p99_over_unloaded"] == pytest.approx(f["ttft_p99_ms"] / 100.0)
    # next admission after 0.5 s came at 2.0 s (1.5 s later, told 2.0: +0.5); after 1.0 s: 1.0 later, told 1.0: 0
    assert f["retry_after_error_median_s"] == pytest.approx(0.25) and f["retry_after_n"] == 2
