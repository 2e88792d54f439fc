"""Repeated overload bursts against a step 06 server it starts: is memory flat, is anything lost?

``python -m engines_compare soak --model tiny-llama --rounds 4 --requests 400 --rate 100``
starts the server (``--max-waiting-requests 0``; extra flags after ``--``), prints its RSS, then per
round sends ``--requests`` streamed requests open loop at ``--rate`` per second and prints the
completed, refused and lost counts and the RSS 2 s after the round. Growth that stops after the
first round is the allocator keeping what it grew; growth every round would be a leak.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

import httpx

from engines_compare import bench, loadgen
from engines_compare.targets import free_port, wait_healthy


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m engines_compare soak", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("flags", nargs="*", help="extra server flags (after --)")
    a = ap.parse_args(argv)
    port = free_port()
    cmd = [sys.executable, "-m", "step06_backpressure", "--model", a.model, "--port", str(port), "--threads", "1",
           "--log-level", "warning", "--no-request-log", "--max-waiting-requests", "0", *a.flags]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 600, server)
        print(f"baseline RSS {bench.rss_mib(server.pid):.0f} MiB", flush=True)
        for rnd in range(a.rounds):
            bodies = [json.dumps({"prompt": f"{rnd}-{i} " + "word " * 60, "max_tokens": a.max_tokens,
                                  "ignore_eos": True, "stream": True}).encode() for i in range(a.requests)]
            records = asyncio.run(loadgen.run_load(loadgen.Endpoint.parse(url), bodies, [a.max_tokens] * a.requests,
                                                   loadgen.LoadSpec(request_rate=a.rate, seed=rnd)))
            time.sleep(2)
            ok, refused = sum(r.ok for r in records), sum(r.refused for r in records)
            print(f"round {rnd}: completed {ok}, refused {refused}, lost {a.requests - ok - refused}; "
                  f"RSS {bench.rss_mib(server.pid):.0f} MiB; /ready {httpx.get(url + '/ready').json()['status']}",
                  flush=True)
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
