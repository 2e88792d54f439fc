"""``python -m step09_speculative.acceptance`` runs end to end (on a tiny model) and prints both tables."""
from __future__ import annotations

import re

import pytest

from step09_speculative.acceptance import main


@pytest.mark.usefixtures("one_torch_thread")
def test_prints_verification_costs_and_one_row_per_draft(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--model", "tiny-gemma3", "--layers", "1,3", "--windows", "2", "--window-len", "64", "--repeats", "2"])
    out = capsys.readouterr().out
    assert [int(b) for b in re.findall(r"verification, batch (\d+):", out)] == [1, 4, 16]
    rows = re.findall(r"^\| (early exit \d|int4 copy) \| ([\d.]+) % \| ([\d.]+) \| (\d) \| x([\d.]+) \|$", out, re.M)
    assert [r[0] for r in rows] == ["early exit 1", "early exit 3", "int4 copy"]
    assert all(0 <= float(r[1]) <= 100 and float(r[2]) > 0 and 1 <= int(r[3]) <= 7 for r in rows)
