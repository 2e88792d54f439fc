"""Run the project benchmark against servers started here, then record each one's ``/health``.

Why not ``bench --target step07_paged_kv``: the KV figures (waste, most sequences running at once,
preemptions, prefix-cache hits) are the engine's own accounting, read from ``/health`` after the
load, and the bench stops the servers it starts. So this starts one server per ``--server``
(each its own step and flags: the same step twice with prefix caching on and off, say) at the
bench's CPU priority, runs ``python -m engines_compare bench`` against their URLs in one
invocation, and writes ``health.json`` (label -> the server's /health after its run) beside the
bench's results.

    python -m engines_compare bench-kv --out DIR \\
        --server 'on=step07_paged_kv --max-seqs 16' --server 'off=step07_paged_kv --no-enable-prefix-caching' \\
        -- --model gemma-3-270m --workload shared-prefix --prefix-len 1024 --concurrency 4 --priority -15
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import httpx

from engines_compare.targets import _spawn, free_port, set_priority, stop_process, wait_healthy


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m engines_compare bench-kv", description=__doc__.splitlines()[0])
    p.add_argument("--server", action="append", required=True, help="LABEL=STEP FLAGS... (repeat)")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--priority", type=int, default=-15, help="autogroup nice of the servers")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("bench", nargs=argparse.REMAINDER, help="after --: arguments for engines_compare bench")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    servers: dict[str, tuple[str, subprocess.Popen]] = {}
    try:
        for spec in a.server:
            label, _, cmd = spec.partition("=")
            step, *flags = shlex.split(cmd)
            port = free_port()
            proc = _spawn([sys.executable, "-m", step, "--model", a.model, "--port", str(port),
                           "--log-level", "warning", *flags], a.out / f"{label}.log")
            set_priority(proc.pid, a.priority)
            servers[label] = (f"http://127.0.0.1:{port}", proc)
        for url, proc in servers.values():
            wait_healthy(url, 600, proc)
        bench = [x for x in a.bench if x != "--"]
        urls = ",".join(url for url, _ in servers.values())
        subprocess.run([sys.executable, "-m", "engines_compare", "bench", "--target", urls, "--model", a.model,
                        "--out", str(a.out), *bench], check=True)
        health = {label: {"url": url, "command": cmd, **httpx.get(url + "/health", timeout=30).json()}
                  for (label, (url, _)), cmd in zip(servers.items(), a.server)}
        (a.out / "health.json").write_text(json.dumps(health, indent=1) + "\n")
        print(json.dumps(health, indent=1))
    finally:
        for _, proc in servers.values():
            stop_process(proc)


if __name__ == "__main__":
    main()
