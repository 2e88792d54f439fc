"""Turning a benchmark's results document into a table, ratios, JSON, CSV and PNG plots.

Central rule: everything here reads the results *document* (the dict written as results.json),
never live objects, so the notebook and any later analysis draw exactly what ``bench`` printed.
One document holds one run of ``bench``: its config, the machine, the commit, and per target and
load point a summary plus the raw per-request records.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable

LATENCIES = ("ttft", "tpot", "itl", "e2el")
STATS = ("mean", "p50", "p90", "p95", "p99")
RATIO_KEYS = ("output_throughput", "request_throughput", "ttft_p50", "tpot_p50", "e2el_p50")


def flat_summary(run: dict[str, Any]) -> dict[str, Any]:
    """One row: the run's identity, its load point and every summary figure."""
    s = run["summary"]
    row: dict[str, Any] = {"target": run["target"], "engine_version": run["engine_version"], "point": run["point"],
                           "concurrency": run["load"]["concurrency"], "request_rate": run["load"]["request_rate"]}
    for key in ("completed", "failed", "short_outputs", "duration_s", "total_input_tokens", "total_output_tokens",
                "request_throughput", "output_throughput", "goodput"):
        row[key] = s[key]
    for lat in LATENCIES:
        for st in STATS:
            row[f"{lat}_{st}_ms"] = s[lat][st]
    row["refused"] = s.get("refused", 0)
    for st in STATS:
        row[f"refusal_{st}_ms"] = (s.get("refusal_latency") or {}).get(st)
    for key, value in (run.get("memory") or {}).items():
        row[key] = value
    return row


def refusal_lines(doc: dict[str, Any]) -> list[str]:
    """One line per load point that had refusals (429/503), a measured server memory or speculation."""
    lines = []
    for r in doc["runs"]:
        s, mem = r["summary"], r.get("memory") or {}
        total = s["completed"] + s["failed"] + s.get("refused", 0)
        parts = []
        if s.get("refused"):
            lat = s["refusal_latency"]
            parts.append(f"refused {s['refused']}/{total} ({100 * s['refused'] / total:.1f} %), refusal latency "
                         f"p50/p99 {_fmt(lat['p50'])}/{_fmt(lat['p99'])} ms")
        if mem.get("rss_before_mib") is not None:
            parts.append(f"server RSS before/peak/after {_fmt(mem['rss_before_mib'], 0)}/{_fmt(mem['rss_peak_mib'], 0)}/"
                         f"{_fmt(mem['rss_after_mib'], 0)} MiB")
        if (spec := r.get("speculation")) and spec.get("num_draft_tokens"):
            length = spec.get("mean_acceptance_length")
            parts.append(f"speculation: {spec['num_draft_tokens']} draft tokens, acceptance "
                         f"{100 * spec['acceptance_rate']:.1f} %" + (f", mean length {length:.2f}" if length else ""))
        if parts:
            lines.append(f"{r['target']} {r['point']}: " + "; ".join(parts))
    return lines


def _value(run: dict[str, Any], key: str) -> float | None:
    if key.endswith("_p50"):
        return run["summary"][key[:-4]]["p50"]
    return run["summary"][key]


def ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each later target against the first, per load point (x > 1: more throughput / more latency)."""
    if not runs:
        return []
    first = runs[0]["target"]
    base = {r["point"]: r for r in runs if r["target"] == first}
    out = []
    for r in runs:
        ref = base.get(r["point"])
        if r["target"] == first or ref is None:
            continue
        row: dict[str, Any] = {"target": r["target"], "baseline": first, "point": r["point"]}
        for key in RATIO_KEYS:
            a, b = _value(r, key), _value(ref, key)
            row[key] = (a / b) if a is not None and b else None
        out.append(row)
    return out


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def format_table(doc: dict[str, Any]) -> str:
    head = ("target", "load", "ok", "fail", "req/s", "out tok/s", "TTFT p50/p99 ms", "TPOT p50/p99 ms",
            "ITL p50/p99 ms", "E2EL p50 ms", "goodput/s")
    rows = [head]
    for r in doc["runs"]:
        s = r["summary"]
        rows.append((r["target"], r["point"], str(s["completed"]), str(s["failed"]), _fmt(s["request_throughput"], 2),
                     _fmt(s["output_throughput"]), f"{_fmt(s['ttft']['p50'])}/{_fmt(s['ttft']['p99'])}",
                     f"{_fmt(s['tpot']['p50'])}/{_fmt(s['tpot']['p99'])}",
                     f"{_fmt(s['itl']['p50'])}/{_fmt(s['itl']['p99'])}", _fmt(s["e2el"]["p50"]),
                     _fmt(s["goodput"], 2)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.extend(refusal_lines(doc))
    for ratio in doc.get("ratios", []):
        parts = ", ".join(f"{k} x{ratio[k]:.2f}" for k in RATIO_KEYS if ratio[k] is not None)
        lines.append(f"{ratio['target']} vs {ratio['baseline']} at {ratio['point']}: {parts}")
    for e in doc.get("errors", []):
        lines.append(f"{e['target']}: FAILED: {e['error']}")
    return "\n".join(lines)


def write_json(doc: dict[str, Any], path: Path) -> None:
    """The whole document, compact (raw records make it large); plus ``summary.json`` beside it
    without the records, indented for people."""
    path.write_text(json.dumps(doc, separators=(",", ":")) + "\n", encoding="utf-8")
    light = {**doc, "runs": [{k: v for k, v in r.items() if k != "requests"} for r in doc["runs"]]}
    path.with_name("summary.json").write_text(json.dumps(light, indent=2) + "\n", encoding="utf-8")


def write_csv(doc: dict[str, Any], summary_path: Path, requests_path: Path) -> None:
    rows = [flat_summary(r) for r in doc["runs"]]
    with summary_path.open("w", newline="") as f:
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    with requests_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["target", "point", "index", "start_s", "end_s", "prompt_tokens", "output_tokens",
                    "expected_output_tokens", "error", "chunk_times_s", "status", "retry_after_s"])
        for r in doc["runs"]:
            for q in r["requests"]:
                w.writerow([r["target"], r["point"], q["index"], q["start"], q["end"], q["prompt_tokens"],
                            q["output_tokens"], q["expected_output_tokens"], q["error"] or "",
                            " ".join(map(str, q["chunk_times"])), q.get("status"), q.get("retry_after")])


def load_results(paths: Iterable[Path | str]) -> list[dict[str, Any]]:
    """Results documents from files, or from every ``results.json`` under directories; sorted by path."""
    found: list[Path] = []
    for p in map(Path, paths):
        found.extend(sorted(p.rglob("results.json")) if p.is_dir() else [p])
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(found)]


def _series(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Runs grouped into lines: one per target and loop kind, sorted by load."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        mode = "closed" if r["load"]["concurrency"] else "open"
        out.setdefault(f"{r['target']} ({mode})", []).append(r)
    return {k: sorted(v, key=_x) for k, v in out.items()}


def _x(run: dict[str, Any]) -> float:
    load = run["load"]
    return load["concurrency"] if load["concurrency"] else load["request_rate"]


def _log_x(ax: Any, runs: list[dict[str, Any]]) -> None:
    xs = [_x(r) for r in runs]
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax.set_xscale("log", base=2)


def plot_throughput(docs: list[dict[str, Any]], ax: Any = None) -> Any:
    """Output tokens/s against concurrency (or request rate), one line per target and document."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(6, 4))[1]
    for doc in docs:
        for name, runs in _series(doc["runs"]).items():
            label = name if len(docs) == 1 else f"{name} {doc['started']}"
            ax.plot([_x(r) for r in runs], [r["summary"]["output_throughput"] for r in runs], marker="o", label=label)
        _log_x(ax, doc["runs"])
    ax.set_xlabel("concurrency (closed loop) / request rate (open loop)")
    ax.set_ylabel("output tokens / s")
    ax.set_title("Throughput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return ax.figure


def plot_latency_percentiles(doc: dict[str, Any]) -> Any:
    """p50 (solid) and p99 (dashed) of TTFT, TPOT, ITL and E2EL per load point and target."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(LATENCIES), figsize=(4 * len(LATENCIES), 3.5))
    for ax, lat in zip(axes, LATENCIES):
        for i, (name, runs) in enumerate(_series(doc["runs"]).items()):
            xs = [_x(r) for r in runs]
            for q, style in (("p50", "-"), ("p99", "--")):
                ys = [r["summary"][lat][q] for r in runs]
                ax.plot(xs, [float("nan") if y is None else y for y in ys], style, marker="o", color=f"C{i}",
                        label=f"{name} {q}")
        _log_x(ax, doc["runs"])
        ax.set_title(f"{lat.upper()} (ms)")
        ax.set_xlabel("load")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_ttft_distribution(doc: dict[str, Any]) -> Any:
    """Empirical CDF of TTFT of completed requests, per target and load point."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in doc["runs"]:
        ttfts = sorted((q["chunk_times"][0] - q["start"]) * 1000 for q in r["requests"]
                       if q["error"] is None and q["chunk_times"])
        if ttfts:
            ax.step(ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))], where="post",
                    label=f"{r['target']} {r['point']}")
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT distribution")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def write_plots(doc: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {"throughput_vs_load.png": plot_throughput([doc]),
               "latency_percentiles.png": plot_latency_percentiles(doc),
               "ttft_distribution.png": plot_ttft_distribution(doc)}
    paths = []
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        paths.append(out / name)
    return paths


def latency_by_output_length(run: dict[str, Any], short_max: int) -> dict[str, dict[str, Any]]:
    """TTFT and end-to-end latency of a run's short (<= ``short_max`` output tokens) and long
    requests apart: the lens for head-of-line blocking, where short requests pay for long ones.

    ``slowdown`` is each request's E2EL divided by its own share of it, ``E2EL - TTFT`` (the time it
    spent producing tokens after the first), as a median: how much longer than its own work it took.
    """
    from engines_compare import metrics

    out: dict[str, dict[str, Any]] = {}
    records = [metrics.record_from_dict(r) for r in run["requests"]]
    ok = [r for r in records if r.error is None and r.chunk_times]
    for name, group in (("short", [r for r in ok if r.output_tokens <= short_max]),
                        ("long", [r for r in ok if r.output_tokens > short_max])):
        ttft, e2el = metrics.stats_ms([metrics.ttft(r) for r in group]), metrics.stats_ms([metrics.e2el(r) for r in group])
        own = [metrics.e2el(r) / max(metrics.e2el(r) - metrics.ttft(r), 1e-9) for r in group if r.output_tokens > 1]
        out[name] = {"count": len(group), "ttft_p50_ms": ttft.p50, "ttft_p99_ms": ttft.p99, "e2el_p50_ms": e2el.p50,
                     "e2el_p99_ms": e2el.p99, "slowdown_p50": metrics.percentile(own, 50) if own else None}
    return out
