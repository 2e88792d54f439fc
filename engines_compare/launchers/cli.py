"""``python -m engines_compare launch NAME``: run a reference engine in the foreground (until
Ctrl-C), print its recipe, or do its one-time setup.

    launch llamacpp --build        build llama-server once (about 10 minutes)
    launch vllm --install          install vLLM into its own venv once (about 7 minutes)
    launch vllm [--port P]         serve the default model until Ctrl-C
    launch tgi --print-only        print the recipe (tgi/trtllm/sglang only ever print)

Exit codes: 0 served until Ctrl-C / printed / set up; 1 could not launch (not set up, needs a
GPU or Docker, died while starting); 2 bad arguments.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from engines_compare import launchers
from engines_compare.launchers.common import (EngineUnavailable, LauncherError, LaunchSpec,
                                              models_ready, stop_process_group)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engines_compare launch",
                                description="Start a reference engine serving the default model, "
                                            "or print its launch recipe.")
    p.add_argument("name", choices=launchers.ENGINES)
    p.add_argument("--model", default=launchers.DEFAULT_MODEL,
                   help="gemma-3-270m (default), a .gguf file (llamacpp) or a local HF directory")
    p.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--print-only", action="store_true", help="print the command, start nothing")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 2)")
    p.add_argument("--ctx", type=int, default=None,
                   help="context tokens (llamacpp: shared by all slots, default 8192; others 4096)")
    p.add_argument("--parallel", type=int, default=None,
                   help="concurrent sequences (llamacpp -np, default 16; vllm --max-num-seqs)")
    p.add_argument("--dtype", default=None, help="weights dtype (vllm, sglang, tgi)")
    setup = p.add_mutually_exclusive_group()
    setup.add_argument("--build", action="store_true", help="one-time setup (llamacpp: build llama-server)")
    setup.add_argument("--install", action="store_true", help="one-time setup (vllm: install into its venv)")
    return p


def main(argv: list[str]) -> int:
    argv = argv[1:] if argv[:1] == ["launch"] else argv
    args = build_parser().parse_args(argv)
    opts = {k: getattr(args, k) for k in ("threads", "ctx", "parallel", "dtype")}
    try:
        if args.build or args.install:
            print(launchers.setup(args.name))
            return 0
        if args.name in launchers.RECIPE_ONLY:
            return print_recipe(args.name, args.model, args.port, args.print_only, opts)
        s = launchers.spec(args.name, args.model, args.port, prepare=not args.print_only, **opts)
        if args.print_only:
            try:
                launchers.require_setup(args.name, s)
            except LauncherError as e:
                print(f"# not set up yet: {e}")
            print(s.shell())
            return 0
        return run_foreground(args.name, s)
    except LauncherError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def print_recipe(name: str, model: str, port: int | None, print_only: bool, opts: dict) -> int:
    r = launchers.recipe(name, model, port, **opts)
    stream = sys.stdout if print_only else sys.stderr
    print(f"# {r.message()}", file=stream)
    if r.notes:
        print(f"# note: {r.notes}", file=stream)
    print(LaunchSpec(name, r.argv, {}, r.port).shell())
    if print_only:
        return 0
    raise EngineUnavailable(f"{name} was not started (recipe printed above)")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_foreground(name: str, s: LaunchSpec) -> int:
    """Run with the terminal as its output; say when it is ready; Ctrl-C (or SIGTERM/SIGHUP)
    stops its process group. Returns the engine's exit code, or 0 when stopped by a signal."""
    version = launchers.require_setup(name, s)
    print(f"starting {name} ({version}) at {s.url}\n$ {s.shell()}", flush=True)
    t0 = time.monotonic()
    # The engine runs in its own session (so stop() can end all its workers), so no terminal
    # signal reaches it: catch them here and pass the stop on.
    previous = {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS}
    proc = subprocess.Popen(list(s.argv), env={**os.environ, **s.env}, start_new_session=True)
    try:
        while proc.poll() is None and not models_ready(s.url):
            time.sleep(0.5)
        if proc.poll() is None:
            print(f"\n{name} ready at {s.url} after {time.monotonic() - t0:.1f} s "
                  f"({s.notes}); Ctrl-C stops it", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        stop_process_group(proc, 30.0)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
