"""One entry point: ``python -m engines_compare {bench,machine,conform,launch,inprocess,soak,bench-kv,overload} ...``.

Each subcommand's own module parses the rest of the command line and is imported only when
chosen, so ``bench`` never pays for the conformance suite and ``launch`` never for the client.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "bench": "load generator: latency and throughput of one or more targets",
    "machine": "CPU, cores, GPU and measured memory copy bandwidth of this machine",
    "conform": "the shared conformance suite against one or more server URLs",
    "launch": "start a reference engine (llama.cpp, vLLM) or print its recipe",
    "inprocess": "drive step 04's engine in-process: throughput, step overhead, observer cost, hand-off",
    "soak": "repeated overload bursts against a step 06+ server it starts: memory and lost requests",
    "bench-kv": "bench servers it starts, then record each one's /health (step 07's KV figures)",
    "overload": "an overload run's admission figures: lost, refused, TTFT against unloaded, Retry-After error",
}
MODULES = {"bench": "engines_compare.bench", "machine": "engines_compare.machine",
           "conform": "engines_compare.conformance.cli", "launch": "engines_compare.launchers",
           "inprocess": "engines_compare.inprocess", "soak": "engines_compare.soak", "bench-kv": "engines_compare.bench_kv",
           "overload": "engines_compare.overload"}


def _dispatch(command: str, rest: list[str]) -> int:
    try:
        main = importlib.import_module(MODULES[command]).main
    except ImportError as e:
        print(f"python -m engines_compare {command}: not available here ({e})", file=sys.stderr)
        return 1
    return int(main(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m engines_compare", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help in COMMANDS.items():
        sub.add_parser(name, help=help, add_help=False)
    # Only the command word is parsed here; everything after it belongs to the subcommand.
    if not argv or argv[0] not in COMMANDS:
        ap.parse_args(argv[:1])  # prints usage (or help) and exits
        return 2
    return _dispatch(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
