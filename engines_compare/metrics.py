"""Benchmark metrics from raw per-request timestamps, exactly as the team guide defines them.

Central rule: every number here is derived from :class:`RequestRecord` alone (start, the times of
the chunks that carried content, end, token counts, error), so any other tool's variant of a
metric can be recomputed later from the stored records.

* TTFT: first content chunk minus request start.
* E2EL: last content chunk minus request start.
* TPOT (per request): (E2EL - TTFT) / (output_tokens - 1); undefined for one output token.
* ITL: gaps between successive content chunks, pooled over all requests.
* Request throughput: completed requests / wall time; output throughput: total output tokens /
  wall time; wall time runs from the first send to the last finish (failed requests included).
* Goodput: completed requests meeting every latency target, per second of wall time.

Failed requests are counted and excluded from every latency statistic and token total.
Refused requests (HTTP 429 or 503: the server turned the work away, as step 06 does under
overload) are counted apart from failures, with their own latency (end minus start): a refusal is
the server's answer, a failure is a request lost.
Statistics are mean, p50, p90, p95, p99 in milliseconds; percentiles interpolate linearly between
order statistics (numpy's default), and an empty sample gives ``None``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

GOODPUT_KEYS = ("ttft", "tpot", "e2el")
REFUSAL_STATUSES = (429, 503)
PERCENTILES = (50, 90, 95, 99)


@dataclasses.dataclass(slots=True)
class RequestRecord:
    """What the client saw of one request. Times are seconds since the run's origin."""

    index: int
    start: float
    chunk_times: list[float] = dataclasses.field(default_factory=list)
    end: float = 0.0
    prompt_tokens: int | None = None  # from the server's usage, when it reports it
    output_tokens: int = 0  # usage's completion_tokens, else the number of content chunks
    usage_reported: bool = False
    expected_output_tokens: int | None = None
    error: str | None = None
    status: int | None = None  # the HTTP status, None without a response
    retry_after: float | None = None  # the Retry-After header (seconds) of a refusal

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunk_times)

    @property
    def refused(self) -> bool:
        return self.status in REFUSAL_STATUSES


@dataclasses.dataclass(frozen=True, slots=True)
class Stats:
    """Mean and percentiles of one latency, in milliseconds (None when there is no sample)."""

    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p95: float | None
    p99: float | None


@dataclasses.dataclass(frozen=True, slots=True)
class Summary:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    short_outputs: int  # completed requests with fewer output tokens than asked for
    request_throughput: float
    output_throughput: float
    goodput: float | None
    goodput_targets_ms: dict[str, float]
    ttft: Stats
    tpot: Stats
    itl: Stats
    e2el: Stats
    refused: int = 0  # 429/503 answers; not in ``failed``
    refusal_latency: Stats = Stats(0, None, None, None, None, None)  # end - start of the refused


def ttft(r: RequestRecord) -> float:
    return r.chunk_times[0] - r.start


def e2el(r: RequestRecord) -> float:
    return r.chunk_times[-1] - r.start


def tpot(r: RequestRecord) -> float | None:
    if r.output_tokens <= 1:
        return None
    return (e2el(r) - ttft(r)) / (r.output_tokens - 1)


def itls(r: RequestRecord) -> list[float]:
    t = r.chunk_times
    return [b - a for a, b in zip(t, t[1:])]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default ``method="linear"``)."""
    if not values:
        raise ValueError("percentile: values must not be empty")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def stats_ms(values_s: Sequence[float]) -> Stats:
    if not values_s:
        return Stats(0, None, None, None, None, None)
    ms = [v * 1000.0 for v in values_s]
    p50, p90, p95, p99 = (percentile(ms, q) for q in PERCENTILES)
    return Stats(len(ms), sum(ms) / len(ms), p50, p90, p95, p99)


def parse_goodput(spec: Sequence[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    out: dict[str, float] = {}
    for item in spec:
        key, sep, value = item.partition(":")
        if not sep or key not in GOODPUT_KEYS:
            raise ValueError(f"--goodput: expected KEY:MS with KEY in {', '.join(GOODPUT_KEYS)}, got {item!r}")
        try:
            out[key] = float(value)
        except ValueError:
            raise ValueError(f"--goodput: {key} needs a number of milliseconds, got {value!r}") from None
        if out[key] <= 0:
            raise ValueError(f"--goodput: {key} must be > 0 ms, got {value}")
    return out


def meets(r: RequestRecord, targets_ms: dict[str, float]) -> bool:
    """Whether a completed request meets every target; an undefined TPOT meets any target."""
    values = {"ttft": ttft(r), "tpot": tpot(r), "e2el": e2el(r)}
    return all(values[k] is None or values[k] * 1000.0 <= limit for k, limit in targets_ms.items())


def wall_time(records: Sequence[RequestRecord]) -> float:
    """First send to last finish, over every request (failed ones too)."""
    if not records:
        return 0.0
    return max(r.end for r in records) - min(r.start for r in records)


def summarize(records: Sequence[RequestRecord], goodput_ms: dict[str, float] | None = None) -> Summary:
    ok = [r for r in records if r.ok]
    duration = wall_time(records)
    out_tokens = sum(r.output_tokens for r in ok)
    per_s = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
    good = per_s(sum(meets(r, goodput_ms) for r in ok)) if goodput_ms else None
    tpots = [v for v in (tpot(r) for r in ok) if v is not None]
    refused = [r for r in records if not r.ok and r.refused]
    return Summary(
        completed=len(ok), failed=len(records) - len(ok) - len(refused), duration_s=duration,
        total_input_tokens=sum(r.prompt_tokens or 0 for r in ok), total_output_tokens=out_tokens,
        short_outputs=sum(1 for r in ok if r.expected_output_tokens and r.output_tokens < r.expected_output_tokens),
        request_throughput=per_s(len(ok)), output_throughput=per_s(out_tokens),
        goodput=good, goodput_targets_ms=dict(goodput_ms or {}),
        ttft=stats_ms([ttft(r) for r in ok]), tpot=stats_ms(tpots),
        itl=stats_ms([g for r in ok for g in itls(r)]), e2el=stats_ms([e2el(r) for r in ok]),
        refused=len(refused), refusal_latency=stats_ms([r.end - r.start for r in refused]))


def record_from_dict(d: dict) -> RequestRecord:
    names = {f.name for f in dataclasses.fields(RequestRecord)}
    return RequestRecord(**{k: v for k, v in d.items() if k in names})
