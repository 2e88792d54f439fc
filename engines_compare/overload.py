"""``python -m engines_compare overload RESULTS_DIR``: an overload run's admission figures, per target.

Reads a ``bench`` run made of an unloaded point (``--concurrency 1``) and an open-loop point
(``--request-rate R``) per target, and prints what step 06's README reports: requests answered,
refused (429/503 with the error object) and **lost** (neither: no answer in time, or broken);
answered TTFT p50/p99 against the unloaded p99 of the same target in the same run; refusal
latency; and **Retry-After against reality**: for each refusal, the advertised wait minus the time
until the server next admitted a request (the next arrival answered with 200), whose median says
whether clients are told to come back too early (negative) or too late (positive).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from engines_compare.metrics import percentile, record_from_dict, ttft


def target_figures(unloaded: dict[str, Any], overload: dict[str, Any]) -> dict[str, Any]:
    recs = sorted((record_from_dict(q) for q in overload["requests"]), key=lambda r: r.start)
    ok = [r for r in recs if r.ok and r.status == 200]
    refused = [r for r in recs if r.refused]
    calm = [ttft(record_from_dict(q)) * 1e3 for q in unloaded["requests"] if q["error"] is None and q["chunk_times"]]
    ttfts = [ttft(r) * 1e3 for r in ok]
    errors = []
    for r in refused:
        if r.retry_after is None:
            continue
        nxt = next((a.start for a in ok if a.start > r.start), None)
        if nxt is not None:
            errors.append(r.retry_after - (nxt - r.start))
    unloaded_p99 = percentile(calm, 99) if calm else None
    p99 = percentile(ttfts, 99) if ttfts else None
    return {
        "requests": len(recs), "answered": len(ok), "refused": len(refused), "lost": len(recs) - len(ok) - len(refused),
        "ttft_p50_ms": percentile(ttfts, 50) if ttfts else None, "ttft_p99_ms": p99,
        "unloaded_ttft_p99_ms": unloaded_p99,
        "ttft_p99_over_unloaded": p99 / unloaded_p99 if p99 and unloaded_p99 else None,
        "refusal_p99_ms": percentile([(r.end - r.start) * 1e3 for r in refused], 99) if refused else None,
        "retry_after_error_median_s": statistics.median(errors) if errors else None,
        "retry_after_error_abs_median_s": statistics.median(map(abs, errors)) if errors else None,
        "retry_after_n": len(errors),
    }


def figures(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    by_target: dict[str, dict[str, dict[str, Any]]] = {}
    for run in doc["runs"]:
        load = run["load"]
        kind = "overload" if load.get("request_rate") else "unloaded" if load.get("concurrency") == 1 else None
        if kind is not None:
            by_target.setdefault(run["target"], {})[kind] = run
    return {t: target_figures(p["unloaded"], p["overload"]) for t, p in by_target.items()
            if "unloaded" in p and "overload" in p}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engines_compare overload", description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="a bench output directory (its results.json) or the file")
    ns = ap.parse_args(argv)
    path = ns.results / "results.json" if ns.results.is_dir() else ns.results
    print(json.dumps(figures(json.loads(path.read_text(encoding="utf-8"))), indent=2))
    return 0
