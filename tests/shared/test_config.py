"""The command line is built from the config dataclasses: every field is a flag with its default."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from shared.config import ModelConfig, ServerConfig, build_parser, from_args


def test_flags_round_trip_into_frozen_configs() -> None:
    ns = build_parser("x", "d").parse_args(["--model", "tiny-llama", "--threads", "1", "--port", "1234"])
    m, s = from_args(ModelConfig, ns), from_args(ServerConfig, ns)
    assert (m.model, m.threads, s.port, s.host) == ("tiny-llama", 1, 1234, "127.0.0.1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.model = "other"  # type: ignore[misc]


def test_rejects_unknown_choice() -> None:
    with pytest.raises(SystemExit):
        build_parser("x", "d").parse_args(["--dtype", "float8"])


@pytest.mark.parametrize("step", ["step00_baseline", "step01_loader", "step02_queue"])
def test_help_lists_every_flag_with_its_default(step: str) -> None:
    out = subprocess.run([sys.executable, "-m", step, "--help"], capture_output=True, text=True, check=True).stdout
    out = " ".join(out.split())  # argparse wraps lines
    for cls in (ModelConfig, ServerConfig):
        for f in dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in out
    assert "(default: gemma-3-270m)" in out and "(default: 8000)" in out
