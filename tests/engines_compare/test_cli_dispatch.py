"""``python -m engines_compare``: subcommands dispatch to their modules with the rest of argv."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from engines_compare import __main__ as cli
from engines_compare import machine

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command,module", [("conform", "engines_compare.conformance.cli"),
                                            ("launch", "engines_compare.launchers"),
                                            ("inprocess", "engines_compare.inprocess"),
                                            ("soak", "engines_compare.soak"), ("bench-kv", "engines_compare.bench_kv")])
def test_conform_and_launch_hand_their_arguments_to_the_owning_module(monkeypatch, command, module) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType(module)
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, module, fake)
    assert cli.main([command, "--url", "http://x", "--only", "a"]) == 3
    assert seen == [["--url", "http://x", "--only", "a"]]


def test_a_missing_subcommand_module_is_a_clear_error(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "engines_compare.launchers", None)  # import raises ImportError
    assert cli.main(["launch", "vllm"]) == 1
    assert "launch: not available here" in capsys.readouterr().err


def test_unknown_or_missing_command_exits_2() -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        cli.main([])


def test_inprocess_drives_step04s_engine_and_times_step05s_observers() -> None:
    r = subprocess.run([sys.executable, "-m", "engines_compare", "inprocess", "--model", "tiny-llama", "--threads", "1",
                        "--concurrency", "2", "--input-len", "8", "--output-len", "6", "--observe"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "concurrency 2: 12 tokens in" in r.stdout, r.stdout  # 2 requests x 6 tokens, all read
    assert "full decode steps (batch 2)" in r.stdout and "% of the engine thread's step time" in r.stdout, r.stdout


def test_machine_command_prints_json_through_python_dash_m() -> None:
    r = subprocess.run([sys.executable, "-m", "engines_compare", "machine", "--json", "--size-mb", "8"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["cpu_cores"] >= 1 and info["cpu_model"] and info["copy_bandwidth_gbs"] > 0
    flags = set(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split())
    assert info["cpu_flags"] == [f for f in machine.KERNEL_FLAGS if f in flags]  # what the kernels can use
    assert len(info["git"]["commit"]) == 40


def test_targets_parse_urls_steps_null_and_engines() -> None:
    from engines_compare.targets import parse_targets

    specs = parse_targets(["http://h:1/,step01_loader", "null", "vllm"])
    assert [(s.name, s.kind) for s in specs] == [("http://h:1", "url"), ("step01_loader", "step"),
                                                 ("null", "null"), ("vllm", "engine")]
    with pytest.raises(ValueError, match="--target"):
        parse_targets(["not a name!"])
    labelled = parse_targets(["step01_loader:a,step01_loader:b"])  # one step, two configurations
    assert [(s.name, s.kind) for s in labelled] == [("step01_loader:a", "step"), ("step01_loader:b", "step")]
    from engines_compare.targets import TargetOptions, _command
    assert _command(labelled[0], TargetOptions(), 1)[2] == "step01_loader"  # python -m <the step>
    with pytest.raises(ValueError, match="no step named"):
        parse_targets(["step99_nothing:a"])
    from engines_compare.targets import engine_options
    assert engine_options(("--dtype", "bfloat16", "--threads", "2")) == {"dtype": "bfloat16", "threads": 2}
    with pytest.raises(ValueError, match="--target-flags"):
        engine_options(("--dtype",))
    with pytest.raises(ValueError, match="--target"):
        parse_targets([","])
