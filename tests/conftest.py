"""Shared fixtures: real servers of any step on free ports, started once per session.

``servers(step, model, *flags)`` starts ``python -m <step> --model <model>`` on a free port the
first time it is asked for, waits for ``/health``, and keeps it for the rest of the session, so
each (step, model) pair costs one start-up however many tests use it; ``servers.release(...)``
stops one early (the real-model servers, which are too big to keep together). GPU tests skip without one.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest

from engines_compare.targets import free_port, stop_process  # free_port: the tests import it from here

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("step00_baseline", "step01_loader", "step02_queue", "step03_batching", "step04_kvcache",
         "step05_observability", "step06_backpressure", "step07_paged_kv", "step08_quant", "step09_speculative",
         "step10_kernels", "step11_multigpu")  # built so far, in order
# Flags under which a step's greedy output must equal transformers' token for token (guide §3):
# quantization changes outputs by design, so step 08 is held to it with --quantization none, and
# its schemes' change is measured instead (tests/step08_quant, step08_quant.quality).
# Paged steps' servers in tests get a small KV pool: step 07's default (4 GiB, touched at
# start-up: 4.6 GB resident) and step 08's (0.75 GiB) are sized for the real model, and the suite
# keeps a dozen servers alive at once (two default step 07s and step 11's ranks were one too
# many: the OOM killer took a server).
SMALL_POOL = ("--kv-cache-gib", "0.0625")
# Step 09 is held to it with speculation in every step, whatever the batch (its n-gram default).
EXACT_FLAGS: dict[str, tuple[str, ...]] = {
    "step07_paged_kv": SMALL_POOL,
    "step08_quant": ("--quantization", "none", *SMALL_POOL),
    "step09_speculative": ("--quantization", "none", "--speculative-max-verify-tokens", "0", *SMALL_POOL),
    # compiled (auto)
    "step10_kernels": ("--quantization", "none", "--speculative-max-verify-tokens", "0", *SMALL_POOL),
    # two ranks (one core each), compiled: token for token the one-rank engine's, hence transformers'
    "step11_multigpu": ("--tensor-parallel-size", "2", "--quantization", "none", "--speculative-max-verify-tokens",
                        "0", *SMALL_POOL)}


class Server:
    def __init__(self, step: str, model: str, flags: tuple[str, ...], log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"{step}-{model}-{self.port}.log"
        cmd = [sys.executable, "-m", step, "--model", model, "--port", str(self.port), "--log-level", "warning", *flags]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        stop_process(self.proc, 15.0)  # the server and anything it started (step 11's workers)


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    started: dict[tuple[str, ...], Server] = {}
    log_dir = tmp_path_factory.mktemp("server-logs")

    def get(step: str, model: str = "tiny-llama", *flags: str) -> Server:
        key = (step, model, *flags)
        if key not in started:
            started[key] = Server(step, model, flags, log_dir)
            started[key].wait_ready()
        return started[key]

    def release(step: str, model: str = "tiny-llama", *flags: str) -> None:
        """Stop a server now rather than at the end of the session. Real-model servers take 1.7 to
        7 GB each (weights, packed copies, a 4 GiB KV cache from step 04 on): eight of them kept
        alive together are more than a 24 GiB machine holds (the OOM killer took them)."""
        server = started.pop((step, model, *flags), None)
        if server is not None:
            server.stop()

    def release_all() -> None:
        """Stop every server: before the real-model tests, whose servers need 1.7 to 7 GB each, the
        tiny ones still alive from earlier modules (a step 07 with its default 4 GiB pool holds
        4.6 GB) left too little memory and the OOM killer took the new server."""
        for key in list(started):
            started.pop(key).stop()

    get.release = release  # type: ignore[attr-defined]
    get.release_all = release_all  # type: ignore[attr-defined]
    yield get
    for server in started.values():
        server.stop()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """For modules that run tiny models in-process: a second torch thread only adds sync cost,
    10x and more when another process shares the 2 cores. Restores the setting afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
