"""The comparison notebook executes on the committed sample results and draws its plots."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "engines_compare" / "notebooks" / "compare.ipynb"
SAMPLE = ROOT / "engines_compare" / "results" / "sample"


def test_notebook_executes_on_the_sample_results(monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("ENGINES_COMPARE_RESULTS", str(SAMPLE))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "1 result document(s)" in text
    assert "step02_queue vs step01_loader at c=4" in text  # the ratio table of the sample
    assert "mean ITL/request" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # throughput, ratio bars, latency percentiles, TTFT distribution


def test_sample_results_are_small_and_complete() -> None:
    docs = list(SAMPLE.rglob("results.json"))
    assert docs and sum(p.stat().st_size for p in SAMPLE.rglob("*")) < 1_000_000
    assert os.path.exists(docs[0].with_name("summary.csv"))
