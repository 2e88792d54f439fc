"""The cluster's figures, with the project's benchmark (``engines_compare bench``) through the router.

    python -m cluster.bench policies   # prefix-affinity vs round-robin: prefix-cache hit rate, TTFT
    python -m cluster.bench overhead   # the router's added latency, in front of the null server
    python -m cluster.bench cache      # TTFT of a response-cache hit (Redis) vs the replica
    python -m cluster.bench scale      # 2 replicas x 1 thread vs 1 replica x 2 threads, 16 clients

Each subcommand starts what it measures (clusters on a local Ray, the null server, redis-server),
runs ``engines_compare bench`` against the router's URL, stops it all, and writes ``cluster.json``
(the figures) beside the bench's own results. Hit rates are the replicas' own counters
(``prefix_cache_hits`` / ``prefix_cache_queries``, prompt tokens) read before and after the run.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import httpx

from engines_compare import bench, corpus

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "engines_compare" / "results" / "local"


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ok(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout_s} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def process(cmd: Sequence[str], url: str, log: Path, timeout_s: float = 600) -> Iterator[str]:
    """A server on ``url`` (its ``/health`` 200), stopped with SIGINT at the end, its group killed."""
    proc = subprocess.Popen(list(cmd), cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ok(url, proc, timeout_s, log)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            import os
            os.killpg(proc.pid, signal.SIGKILL)


def cluster(a: argparse.Namespace, log: Path, *flags: str) -> contextlib.AbstractContextManager[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "cluster", "--model", a.model, "--port", str(port), "--log-level", "warning", *flags]
    return process(cmd, f"http://127.0.0.1:{port}", log)


def prefix_counters(url: str) -> tuple[int, int]:
    """(hits, queries) summed over the router's replicas, in prompt tokens."""
    hits = queries = 0
    for r in httpx.get(url + "/health", timeout=10).json()["replicas"].values():
        s = httpx.get(r["url"] + "/health", timeout=10).json()["scheduler"]
        hits, queries = hits + s["prefix_cache_hits"], queries + s["prefix_cache_queries"]
    return hits, queries


def run_bench(a: argparse.Namespace, out: Path, urls: Sequence[str], **over: Any) -> dict[str, Any]:
    w = corpus.Workload(over.pop("workload", "fixed"), corpus.parse_range("--input-len", over.pop("input_len", "64")),
                        corpus.parse_range("--output-len", over.pop("output_len", "16")),
                        over.pop("prefix_len", 1024), 0, over.pop("num_prefixes", 1))
    cfg = bench.BenchConfig(targets=tuple(urls), model=a.model, workload=w, out=out, priority=a.priority,
                            progress=False, **over)
    doc, _ = bench.run(cfg)
    if doc["errors"]:
        raise RuntimeError(f"bench failed: {doc['errors']}")
    return doc


def summary(doc: dict[str, Any], i: int = 0) -> dict[str, Any]:
    s = doc["runs"][i]["summary"]
    return {k: s.get(k) for k in ("ttft", "tpot", "e2el", "output_throughput", "completed", "failed", "refused")}


def policies(a: argparse.Namespace, out: Path) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for policy in ("round-robin", "prefix-affinity"):
        with cluster(a, out / f"{policy}.log", "--step", "step07_paged_kv", "--replicas", "2", "--threads", "1",
                     "--policy", policy, "--step-args", f"--kv-cache-gib {a.kv_cache_gib} --max-queue-delay 0") as url:
            h0, q0 = prefix_counters(url)
            doc = run_bench(a, out / policy, [url], workload="shared-prefix", input_len=str(a.input_len),
                            output_len=str(a.output_len), prefix_len=a.prefix_len, num_prefixes=a.num_prefixes,
                            num_requests=a.num_requests, concurrency=(a.concurrency,))
            h1, q1 = prefix_counters(url)
            routed = {n: r["num_routed"] for n, r in httpx.get(url + "/health").json()["replicas"].items()}
        figures[policy] = {"hit_rate": (h1 - h0) / max(1, q1 - q0), "routed": routed, **summary(doc)}
    rr, pa = figures["round-robin"], figures["prefix-affinity"]
    figures["hit_rate_ratio"] = pa["hit_rate"] / max(rr["hit_rate"], 1e-9)
    figures["ttft_p50_ratio"] = rr["ttft"]["p50"] / pa["ttft"]["p50"]
    return figures


def overhead(a: argparse.Namespace, out: Path) -> dict[str, Any]:
    port, rport = free_port(), free_port()
    null = [sys.executable, "-m", "engines_compare.null_server", "--port", str(port)]
    with process(null, f"http://127.0.0.1:{port}", out / "null.log") as direct:
        router = [sys.executable, "-m", "cluster.router", "--replica", f"null={direct}", "--model", a.model,
                  "--port", str(rport), "--log-level", "warning", "--policy", "prefix-affinity"]
        with process(router, f"http://127.0.0.1:{rport}", out / "router.log") as routed:
            doc = run_bench(a, out / "bench", [direct, routed], num_requests=a.num_requests, concurrency=(1,),
                            input_len="128", output_len="16", warmup=10)
    d, r = summary(doc, 0), summary(doc, 1)
    return {"direct": d, "router": r, "added_ttft_ms": {q: r["ttft"][q] - d["ttft"][q] for q in ("p50", "p99")},
            "added_e2el_ms": {q: r["e2el"][q] - d["e2el"][q] for q in ("p50", "p99")}}


def cache(a: argparse.Namespace, out: Path) -> dict[str, Any]:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("needs redis-server (Debian: apt-get install redis-server)")
    rport = free_port()
    redis = subprocess.Popen([server, "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with cluster(a, out / "cluster.log", "--step", "step07_paged_kv", "--replicas", "1", "--threads", "2",
                     "--redis-url", f"redis://127.0.0.1:{rport}/0", "--step-args", "--max-queue-delay 0") as url:
            salt = "cachebench"  # both runs send the very same requests
            miss = run_bench(a, out / "miss", [url], num_requests=a.num_requests, concurrency=(1,), salt=salt, warmup=0)
            hit = run_bench(a, out / "hit", [url], num_requests=a.num_requests, concurrency=(1,), salt=salt, warmup=0)
            stats = httpx.get(url + "/health").json()["cache"]
    finally:
        redis.kill()
    return {"miss": summary(miss), "hit": summary(hit), "cache": stats}


def scale(a: argparse.Namespace, out: Path) -> dict[str, Any]:
    figures = {}
    for name, replicas, threads in (("2x1", "2", "1"), ("1x2", "1", "2")):
        with cluster(a, out / f"{name}.log", "--step", "step07_paged_kv", "--replicas", replicas, "--threads", threads,
                     "--policy", "least-loaded", "--step-args", "--max-queue-delay 0") as url:
            figures[name] = summary(run_bench(a, out / name, [url], num_requests=a.num_requests, concurrency=(16,),
                                              input_len="64", output_len="32"))
    figures["throughput_ratio_2x1_over_1x2"] = figures["2x1"]["output_throughput"] / figures["1x2"]["output_throughput"]
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.bench", description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("policies", "overhead", "cache", "scale"))
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--num-requests", type=int, default=None, help="per run (default: 128 for policies, 300 for overhead, else 64)")
    ap.add_argument("--concurrency", type=int, default=4, help="policies: clients (default: 4)")
    ap.add_argument("--num-prefixes", type=int, default=8, help="policies: distinct shared prefixes (default: 8)")
    ap.add_argument("--prefix-len", type=int, default=512, help="policies: tokens per prefix (default: 512)")
    ap.add_argument("--input-len", type=int, default=64, help="policies: tokens after the prefix (default: 64)")
    ap.add_argument("--output-len", type=int, default=16, help="policies: output tokens (default: 16)")
    ap.add_argument("--kv-cache-gib", type=float, default=0.075,
                    help="policies: each replica's KV pool, so that it holds about half the prefixes (default: 0.075)")
    ap.add_argument("--priority", type=int, default=None, help="bench --priority (e.g. -15; needs root)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    a.num_requests = a.num_requests or {"policies": 128, "overhead": 300}.get(a.what, 64)
    out = a.out or RESULTS / f"cluster-{a.what}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    figures = {"policies": policies, "overhead": overhead, "cache": cache, "scale": scale}[a.what](a, out)
    (out / "cluster.json").write_text(json.dumps({"what": a.what, "args": {k: str(v) for k, v in vars(a).items()},
                                                  "figures": figures}, indent=2))
    print(json.dumps(figures, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
