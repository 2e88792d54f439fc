"""Rank 0's side of the executor, in this process: a worker that fails while loading reports its
own error; a clean close stops every worker through its pipe (exit code 0, not a signal) and
removes the rendezvous; rank 0 failing inside a forward is a failure of the runner for good."""
from __future__ import annotations

import dataclasses
import os
import tempfile
import types

import pytest
import torch
import torch.distributed as dist

from shared.config import ModelConfig
from shared.errors import RequestError
from step04_kvcache.model_runner import RunnerConfig
from step07_paged_kv.model_runner import PagedCacheConfig
from step08_quant.quantize import QuantConfig
from step10_kernels.model_runner import KernelsConfig
from step11_multigpu.executor import TPRunner, Workers, join_group
from step11_multigpu.model_runner import RankSpec


def spec(model: str) -> RankSpec:
    rendezvous = os.path.join(tempfile.mkdtemp(prefix="stepserve-tp-"), "rendezvous")
    return RankSpec(model=ModelConfig(model=model, device="cpu", threads=1), runner=RunnerConfig(),
                    cache=PagedCacheConfig(num_kv_blocks=8), quant=QuantConfig(quantization="none"),
                    kernels=KernelsConfig(kernels="torch"), explicit_len=False, world_size=2, cores=(),
                    init_method=f"file://{rendezvous}", timeout_s=60)


@pytest.fixture
def group():
    """Leaves no process group behind in this (pytest's) process."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_worker_that_fails_to_load_reports_its_own_error(group, tmp_path) -> None:
    empty = tmp_path / "no-model-here"  # a local directory without a model: fails at once, offline
    empty.mkdir()
    workers = Workers(spec(str(empty)))
    try:
        workers.expect("hello")
        join_group(workers.spec, 0)
        with pytest.raises(RuntimeError, match=r"rank 1 failed while starting:[\s\S]*load_model"):
            workers.expect("ready")
    finally:
        workers.close()
    assert workers.procs[0].exitcode not in (0, None)


def test_a_clean_close_stops_every_worker_through_its_pipe(group) -> None:
    s = spec("tiny-llama")
    workers = Workers(s)
    workers.expect("hello")
    join_group(s, 0)
    workers.expect("ready")  # rank 1 built its runner (kernels torch: no collective before a forward)
    workers.watch()
    workers.close()
    assert workers.procs[0].exitcode == 0  # it left its loop on the stop message, not by a signal
    assert workers.failure() is None  # a closing worker's exit is not a failure
    assert not os.path.exists(os.path.dirname(s.init_method.removeprefix("file://")))


@dataclasses.dataclass
class StubWorkers:
    """The part of ``Workers`` that ``TPRunner`` uses, with live workers."""

    pids: tuple[int, ...] = (1,)
    sent: int = 0

    def send(self, batch: object) -> None:
        self.sent += 1

    def failure(self, wait_s: float = 0.0) -> str | None:
        return None

    def close(self) -> None:
        pass


class FailingRunner:
    model = None
    cache = types.SimpleNamespace(k=[torch.zeros(1)])
    device, max_len = torch.device("cpu"), 16
    details: dict[str, str] = {"kv_cache_dtype": "float32"}

    def forward(self, inputs: object) -> torch.Tensor:
        raise RuntimeError("out of memory")


def test_rank_zero_failing_inside_a_forward_fails_the_runner_for_good() -> None:
    stub = StubWorkers()
    runner = TPRunner(FailingRunner(), stub)  # type: ignore[arg-type]
    assert runner.failure() is None
    with pytest.raises(RequestError) as e:
        runner.forward(object())  # type: ignore[arg-type]
    assert e.value.status == 503 and stub.sent == 1
    assert "out of step" in runner.failure() and "out of memory" in runner.failure()
