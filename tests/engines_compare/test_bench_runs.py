"""``bench`` end to end: against the built-in null server and against a real step (tiny model)."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
from pytest import CaptureFixture

from engines_compare import bench

@dataclasses.dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def _bench(tmp_path: Path, capsys: CaptureFixture, *args: str) -> tuple[Ran, dict]:
    """``bench.main`` in this process (the CLI's own dispatch is tested in test_cli_dispatch)."""
    out = tmp_path / "out"
    try:
        code = bench.main(["--out", str(out), "--no-progress", "--no-bandwidth", *args])
    except SystemExit as e:
        code = int(e.code)
    r = Ran(code, *capsys.readouterr())
    assert (out / "results.json").exists(), r.stdout + r.stderr
    return r, json.loads((out / "results.json").read_text())


def test_bench_against_a_step_and_the_null_server_writes_json_csv_and_plots(tmp_path: Path,
                                                                           capsys: CaptureFixture) -> None:
    r, doc = _bench(tmp_path, capsys, "--target", "step01_loader", "--target", "null", "--model", "tiny-llama",
                    "--num-requests", "4", "--concurrency", "1,2", "--input-len", "32", "--output-len", "8",
                    "--warmup", "1", "--goodput", "ttft:60000", "tpot:60000")
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "out"
    for name in ("results.json", "summary.json", "summary.csv", "requests.csv", "throughput_vs_load.png",
                 "latency_percentiles.png", "ttft_distribution.png"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "results.partial.json").exists()  # a finished run leaves only the whole file
    assert [(x["target"], x["point"]) for x in doc["runs"]] == [
        ("step01_loader", "c=1"), ("step01_loader", "c=2"), ("null", "c=1"), ("null", "c=2")]
    step = [x for x in doc["runs"] if x["target"] == "step01_loader"]
    for run in step:
        assert run["model_id"] == "tiny-llama" and run["engine_version"] == "step01_loader"
        assert run["dtype"] == "float32" and run["summary"]["completed"] == 4 and run["summary"]["failed"] == 0
        for q in run["requests"]:  # the server's own counts: prompts cut exactly, output forced
            assert (q["prompt_tokens"], q["output_tokens"], q["error"]) == (32, 8, None)
            assert 1 <= len(q["chunk_times"]) <= 8 and q["start"] < q["chunk_times"][0] <= q["end"]
        assert run["summary"]["goodput"] == pytest.approx(run["summary"]["request_throughput"])
    # the same prompts went to both targets: the null server counts prompt bytes
    prompts = {x["target"]: [q["prompt_tokens"] for q in x["requests"]] for x in doc["runs"] if x["point"] == "c=1"}
    assert len(set(prompts["null"])) == 1
    assert [(x["target"], x["baseline"], x["point"]) for x in doc["ratios"]] == [
        ("null", "step01_loader", "c=1"), ("null", "step01_loader", "c=2")]
    assert doc["machine"]["cpu_cores"] >= 1 and doc["machine"]["cpu_model"]
    assert len(doc["git"]["commit"] or "") == 40 and doc["model"] == "tiny-llama"
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [row["target"] for row in rows] == ["step01_loader", "step01_loader", "null", "null"]
    assert len(list(csv.DictReader((out / "requests.csv").open()))) == 16
    assert "step01_loader" in r.stdout and "null vs step01_loader at c=1" in r.stdout


def test_open_loop_and_no_ignore_eos_against_the_null_server(tmp_path: Path, capsys: CaptureFixture) -> None:
    r, doc = _bench(tmp_path, capsys, "--target", "null", "--model", "tiny-llama", "--num-requests", "30",
                    "--request-rate", "200", "--workload", "uniform", "--input-len", "24:64", "--output-len", "2:20",
                    "--no-ignore-eos", "--warmup", "0")
    assert r.returncode == 0, r.stderr
    (run,) = doc["runs"]
    assert run["point"] == "rate=200/s" and run["summary"]["completed"] == 30
    assert [q["output_tokens"] for q in run["requests"]] == [q["expected_output_tokens"] for q in run["requests"]]
    assert len({q["expected_output_tokens"] for q in run["requests"]}) > 3
    assert doc["config"]["ignore_eos"] is False


def test_a_target_that_cannot_start_is_reported_and_the_others_still_run(tmp_path: Path,
                                                                        capsys: CaptureFixture) -> None:
    r, doc = _bench(tmp_path, capsys, "--target", "http://127.0.0.1:9/,null", "--model", "tiny-llama",
                    "--num-requests", "3", "--output-len", "4", "--input-len", "16", "--start-timeout", "10")
    # 10 s, not 1: the same limit is the null server's, and it can take seconds to start on a busy machine
    assert r.returncode == 1
    assert [e["target"] for e in doc["errors"]] == ["http://127.0.0.1:9"]
    assert [x["target"] for x in doc["runs"]] == ["null"]
    assert "FAILED" in r.stdout


def test_bad_arguments_exit_with_a_message_naming_the_flag(tmp_path: Path, capsys: CaptureFixture) -> None:
    cases = [(["--target", "null", "--input-len", "10:20"], "--input-len"),
             (["--target", "step99_nothing"], "no step named 'step99_nothing'"),
             (["--target", "null", "--priority", "-40"], "--priority must be a nice value"),
             (["--target", "null", "--model", "tiny-llama", "--input-len", "3", "--out", str(tmp_path)],
              "--input-len 3 is shorter")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_run_stopped_midway_keeps_the_finished_targets_in_a_partial_file(tmp_path: Path, capsys: CaptureFixture,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real = bench._run_target
    calls = []

    def stop_at_second(cfg, spec, *args):  # the second target: as if the operator pressed Ctrl-C
        calls.append(spec.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(cfg, spec, *args)

    monkeypatch.setattr(bench, "_run_target", stop_at_second)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--out", str(out), "--no-progress", "--no-bandwidth", "--target", "null,null",
                    "--model", "tiny-llama", "--num-requests", "2", "--output-len", "4", "--warmup", "0"])
    assert not (out / "results.json").exists()
    doc = json.loads((out / "results.partial.json").read_text())
    assert [(x["target"], x["summary"]["completed"]) for x in doc["runs"]] == [("null", 2)]
