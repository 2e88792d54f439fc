"""Step 11's server with two ranks: usage errors name the flag; a killed worker turns /health into a
clear failure and requests into fast 503s (also one caught mid-generation); SIGTERM leaves no
process behind; /health says how the model is split."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import EXACT_FLAGS, ROOT, SMALL_POOL, Server
from tests.helpers import usage_error

TP2 = ("--tensor-parallel-size", "2", "--kernels", "torch", "--quantization", "none", *SMALL_POOL)


@pytest.mark.parametrize("flags,named", [
    (["--tensor-parallel-size", "3"], "--tensor-parallel-size 3 does not divide the model's 4 attention heads"),
    (["--tensor-parallel-size", "0"], "--tensor-parallel-size must be >= 1"),
    (["--tensor-parallel-size", "2", "--threads", "2"], "--threads 2 x --tensor-parallel-size 2"),
    (["--tensor-parallel-size", "2", "--speculative-method", "draft"], "--speculative-method draft"),
    (["--tensor-parallel-size", "2", "--kv-cache-memory-fraction", "0.1"], "--kv-cache-memory-fraction"),
    (["--distributed-timeout", "0"], "--distributed-timeout"),
])
def test_bad_sizes_are_usage_errors_naming_the_flag(flags: list[str], named: str) -> None:
    if "--threads" in flags and len(os.sched_getaffinity(0)) >= 4:
        pytest.skip("needs fewer than 4 cores")
    assert named in usage_error("step11_multigpu", *flags)


def test_more_ranks_than_cores_is_a_usage_error() -> None:
    cmd = [sys.executable, "-m", "step11_multigpu", "--model", "tiny-llama", "--tensor-parallel-size", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT,
                       preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))  # one core
    assert r.returncode == 2, r.stderr[-500:]
    assert "--tensor-parallel-size 2: more ranks than the 1 CPU cores" in r.stderr.splitlines()[-1]


def test_health_says_how_the_model_is_split(servers) -> None:
    url = servers("step11_multigpu", "tiny-gemma3", *EXACT_FLAGS["step11_multigpu"]).url
    model = httpx.get(url + "/health", timeout=10).json()["model"]
    assert model["tensor_parallel_size"] == "2" and model["distributed_backend"] == "gloo"
    assert len(model["tensor_parallel_workers"].split()) == 1
    assert model["kernel_backend"] == "compile"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def worker_pids(url: str) -> list[int]:
    return [int(p) for p in httpx.get(url + "/health", timeout=10).json()["model"]["tensor_parallel_workers"].split()]


def wait_for(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def own_server(tmp_path: Path):
    """A TP=2 server of this test's own (it gets killed), stopped afterwards whatever happened."""
    server = Server("step11_multigpu", "tiny-llama", TP2, tmp_path)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_sigterm_leaves_no_process_behind(own_server: Server) -> None:
    pids = worker_pids(own_server.url)
    assert all(alive(p) for p in pids)
    own_server.proc.send_signal(signal.SIGTERM)
    assert own_server.proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    assert "draining" in own_server.log.read_text()  # step 06's graceful drain ran: not the signal's default death
    assert wait_for(lambda: not any(alive(p) for p in pids), 10), "a worker outlived the server"


def test_a_killed_worker_is_reported_and_requests_are_refused_fast(own_server: Server) -> None:
    url = own_server.url
    body = {"prompt": "hello", "max_tokens": 4, "temperature": 0}
    assert httpx.post(url + "/v1/completions", json=body, timeout=30).status_code == 200
    (pid,) = worker_pids(url)
    os.kill(pid, signal.SIGKILL)

    def failed() -> bool:
        return httpx.get(url + "/health", timeout=5).status_code == 503
    assert wait_for(failed, 10), "/health still ok after a worker died"
    health = httpx.get(url + "/health", timeout=5).json()
    assert health["status"] == "failed" and "rank 1" in health["error"] and "SIGKILL" in health["error"], health
    t0 = time.monotonic()
    r = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 503 and "rank 1" in r.json()["error"]["message"], r.text
    assert time.monotonic() - t0 < 2.0  # refused at once, not after a collective's timeout


def test_a_worker_killed_mid_generation_ends_the_stream_with_an_error(own_server: Server) -> None:
    url = own_server.url
    (pid,) = worker_pids(url)
    body = {"prompt": "hello", "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
    events: list[str] = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                if len(events) == 3:
                    os.kill(pid, signal.SIGKILL)
    assert events[-1] == "[DONE]" or "error" in json.loads(events[-1]), events[-3:]
    errors = [json.loads(e)["error"] for e in events if e != "[DONE]" and "error" in json.loads(e)]
    assert errors and "rank 1" in errors[0]["message"], events[-3:]
    assert len(events) < 400  # it ended, it did not run on
    assert httpx.get(url + "/health", timeout=5).json()["status"] == "failed"


def test_prompts_prefilled_in_chunks_match_transformers(servers) -> None:
    """A 16-token step budget: a long prompt's first chunks sample nothing, so the logits gather
    carries zero rows; the ranks must stay in step through it."""
    from tests.helpers import PROMPTS, prompt_ids, reference_greedy, server_greedy

    flags = (*EXACT_FLAGS["step11_multigpu"], "--max-num-batched-tokens", "16")
    url = servers("step11_multigpu", "tiny-llama", *flags).url
    for prompt in PROMPTS[3:]:
        ids = prompt_ids("tiny-llama", prompt)
        assert len(ids) > 32  # three chunks at least
        ref, _ = reference_greedy("tiny-llama", ids, 20, stop_at_eos=False)
        got, _, _ = server_greedy(url, ids, 20, stop_at_eos=False)
        assert got == ref, prompt
