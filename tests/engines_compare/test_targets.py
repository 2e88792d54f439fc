"""How bench starts step targets: extra step flags, and the autogroup priority."""
from __future__ import annotations

import os
import subprocess
import sys

from engines_compare import bench, targets


def test_step_flags_reach_the_step_command_line() -> None:
    opts = targets.TargetOptions(step_flags=("--max-seqs", "64"))
    cmd = targets._command(targets.TargetSpec("step04_kvcache", "step"), opts, 1234)
    assert cmd[cmd.index("-m") + 1] == "step04_kvcache"
    assert cmd[-2:] == ["--max-seqs", "64"]


def test_bench_parses_step_flags_and_priority() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    bench.add_arguments(ap)
    cfg = bench.config_from_args(ap.parse_args(["--target", "null", "--step-flags", "--max-seqs 8 --x 'a b'",
                                                "--priority", "-5"]))
    assert cfg.step_flags == ("--max-seqs", "8", "--x", "a b")
    assert cfg.priority == -5


def test_set_priority_changes_the_session_nice_value_or_reports_refusal() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        path = f"/proc/{child.pid}/autogroup"
        if not os.path.exists(path):  # kernel without autogroups: nothing to set
            assert not targets.set_priority(child.pid, 5)
            return
        ok = targets.set_priority(child.pid, 5)
        text = open(path).read()
        assert ("nice 5" in text) == ok, text
        if os.geteuid() == 0:  # raising a nice value is always allowed to root: it must have happened
            assert ok
    finally:
        child.kill()
        child.wait()
    assert not targets.set_priority(child.pid, 5)  # gone: refused, not raised


def test_a_labelled_engine_is_one_engine_started_under_its_label() -> None:
    specs = targets.parse_targets(["llamacpp,llamacpp:ngram,step08_quant:int4"])
    assert [(s.name, s.kind) for s in specs] == [("llamacpp", "engine"), ("llamacpp:ngram", "engine"),
                                                  ("step08_quant:int4", "step")]
    assert targets.step_module("llamacpp:ngram") == "llamacpp"
    ap = __import__("argparse").ArgumentParser()
    bench.add_arguments(ap)
    cfg = bench.config_from_args(ap.parse_args(["--target", "llamacpp:ngram", "--target-flags",
                                                "llamacpp:ngram=--extra-args '--spec-type ngram-simple'"]))
    assert targets.engine_options(dict(cfg.target_flags)["llamacpp:ngram"]) == {"extra_args": "--spec-type ngram-simple"}
