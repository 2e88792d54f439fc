"""The GPU measurement script runs end to end (``--smoke``: tiny shapes; on a CPU under the Triton
interpreter), so that the one run a lent GPU gets is not spent finding a typo."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_gpu_bench_smoke_run_reports_every_figure() -> None:
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    r = subprocess.run([sys.executable, "-m", "step10_kernels.gpu_bench", "--smoke"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["copy_gb_s"] > 0
    assert [(p["seqs"], p["ctx"]) for p in out["attention"]] == [(2, 40)] and out["attention"][0]["gb_s"] > 0
    assert set(out["engine_tok_s"]) == {f"{k}@{c}" for k in ("torch", "triton", "triton+graphs") for c in (1, 2)}
    assert all(v > 0 for v in out["engine_tok_s"].values())
