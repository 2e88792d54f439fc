"""Rank 0 and its worker processes (vLLM's multiprocess executor, in small).

Central rule: rank 0 owns the scheduler and the sampler; every step it sends the prepared batch
(token ids, positions, slot mapping, block tables: :class:`shared.attention.BatchInputs`) to each
worker over a pipe, then all ranks run the same forward, meeting in its collectives. The workers
never decide anything: they wait for a batch, run it, and wait again.

::

    rank 0 (this process)                        rank r (worker process)
    API ─ scheduler ─ prepare ─┬─ pipe ─────────► forward(batch) ──┐
                               └─ forward(batch) ◄── all-reduce ───┘ (twice a layer)
                     sampler ◄── logits gathered on rank 0

Failure rules: a worker that dies is seen at once (its process sentinel, watched by a thread; on
gloo a collective with it fails at once too, "connection closed by peer"; on NCCL a collective in
flight waits out ``--distributed-timeout``), and :meth:`TPRunner.failure` says which rank and how,
so ``/health`` turns to ``failed`` and requests get a fast 503. Rank 0 failing inside a forward is
a failure too (the ranks would be out of step). The workers are started from the engine thread
and die with it (``PR_SET_PDEATHSIG`` is per thread: whether the thread ends cleanly, fails or its
process is killed) and on the pipe's end of file; on a clean shutdown rank 0 sends each worker
``None`` and joins it. A worker that fails while loading sends its error over the pipe before it
exits, and rank 0's start-up fails with that message.

Left out: the workers preparing their own inputs from the scheduler's output (vLLM broadcasts
that instead, to keep rank 0's CPU time off the critical path), a shared-memory ring buffer in
place of the pipe (nano-vllm, vLLM), CUDA graphs across ranks (step 10's graphs are off when
there is more than one rank), and a draft model across ranks.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import multiprocessing.connection as mpc
import os
import pickle
import shutil
import signal
import threading
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shared.attention import BatchInputs
from shared.errors import engine_failed
from step04_kvcache.model_runner import ModelRunner
from step07_paged_kv.paged_cache import PagedKVCache
from step11_multigpu.model_runner import RankSpec, pin

log = logging.getLogger("step11_multigpu")
PR_SET_PDEATHSIG = 1


def to_device(inputs: Any, device: torch.device | str) -> Any:
    """``inputs`` (a dataclass of tensors and dataclasses, e.g. ``BatchInputs``) with every tensor on ``device``."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if dataclasses.is_dataclass(inputs):
        return dataclasses.replace(inputs, **{f.name: to_device(getattr(inputs, f.name), device)
                                              for f in dataclasses.fields(inputs) if f.init})
    return inputs


def join_group(spec: RankSpec, rank: int) -> None:
    dist.init_process_group(spec.backend, init_method=spec.init_method, rank=rank, world_size=spec.world_size,
                            timeout=datetime.timedelta(seconds=spec.timeout_s))


def _die_with_parent() -> None:
    """Linux: the kernel sends this process SIGKILL when the thread that started it (rank 0's
    engine thread) ends, however it ends."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not glibc: the pipe's end of file still ends the worker
        pass


def worker_main(spec: RankSpec, rank: int, conn: mpc.Connection) -> None:
    """A worker process: join the group, build this rank's runner, then run every batch rank 0 sends."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: rank 0 decides
    from shared.models import load_model
    from step11_multigpu.model_runner import build_rank_runner

    pin(spec, rank)
    conn.send(("hello", os.getpid()))
    try:
        join_group(spec, rank)
        lm = load_model(spec.model)
        runner, device = build_rank_runner(lm, spec, rank), lm.device
        del lm
        conn.send(("ready", os.getpid()))
    except BaseException:
        conn.send(("error", traceback.format_exc(limit=4)))
        raise
    with torch.inference_mode():
        while True:
            try:
                batch = pickle.loads(conn.recv_bytes())
            except EOFError:  # rank 0 is gone
                return
            if batch is None:
                break
            runner.forward(to_device(batch, device))
    dist.destroy_process_group()


class Workers:
    """Ranks 1 .. N-1: started, watched, sent batches, stopped."""

    def __init__(self, spec: RankSpec) -> None:
        self.spec = spec
        ctx = mp.get_context("spawn")  # never fork a process that runs OpenMP and an event loop
        self.conns: list[mpc.Connection] = []
        self.procs: list[Any] = []
        for rank in range(1, spec.world_size):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(spec, rank, theirs), name=f"tp-rank-{rank}", daemon=True)
            proc.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(proc)
        self._failure: str | None = None
        self._closing = False
        self._died = threading.Event()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def expect(self, what: str) -> None:
        """Wait until every worker said ``what`` ("hello": started; "ready": built), or raise with the
        error a worker sent, or its exit code."""
        for rank, (conn, proc) in enumerate(zip(self.conns, self.procs), start=1):
            mpc.wait([conn, proc.sentinel])
            if conn.poll():
                kind, detail = conn.recv()
                if kind == what:
                    continue
                raise RuntimeError(f"tensor-parallel rank {rank} failed while starting:\n{detail}")
            raise RuntimeError(f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {proc.exitcode} "
                               f"while starting")

    def errors(self) -> str:
        """What the workers reported before they failed (their tracebacks), if anything."""
        sent = []
        for rank, conn in enumerate(self.conns, start=1):
            while conn.poll():
                try:
                    kind, detail = conn.recv()
                except (EOFError, OSError):
                    break
                if kind == "error":
                    sent.append(f"tensor-parallel rank {rank} failed while starting:\n{detail}")
        return "\n".join(sent)

    def watch(self) -> None:
        """From now on a worker's death is a failure (a thread waits on the processes' sentinels)."""
        threading.Thread(target=self._watch, name="tp-watch", daemon=True).start()

    def _watch(self) -> None:
        ready = mpc.wait([p.sentinel for p in self.procs])
        if self._closing:
            return
        dead = [(r, p) for r, p in enumerate(self.procs, start=1) if p.sentinel in ready]
        rank, proc = dead[0]
        proc.join(1)
        self._failure = (f"tensor-parallel worker rank {rank} (pid {proc.pid}) died "
                         f"({_describe(proc.exitcode)}); restart the server")
        log.error("%s", self._failure)
        self._died.set()

    def failure(self, wait_s: float = 0.0) -> str | None:
        if wait_s and self._failure is None:
            self._died.wait(wait_s)
        return self._failure

    def send(self, batch: BatchInputs | None) -> None:
        """The same batch to every worker (pickled once; tensors on the CPU)."""
        data = pickle.dumps(None if batch is None else to_device(batch, "cpu"), protocol=pickle.HIGHEST_PROTOCOL)
        for conn in self.conns:
            conn.send_bytes(data)

    def close(self, timeout_s: float = 5.0) -> None:
        """Tell every worker to stop, and make sure each one did within ``timeout_s`` in all
        (then terminate, then kill); remove the rendezvous file's directory."""
        self._closing = True
        for conn in self.conns:
            try:
                conn.send_bytes(pickle.dumps(None))
            except OSError:  # already gone
                pass
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(2)
            if proc.is_alive():
                proc.kill()
                proc.join()
        rendezvous = self.spec.init_method.removeprefix("file://")
        if rendezvous != self.spec.init_method:
            shutil.rmtree(os.path.dirname(rendezvous), ignore_errors=True)


def _describe(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class TPRunner(ModelRunner[PagedKVCache]):
    """Rank 0's runner: the engine's runner (its ``prepare`` and model), whose every forward is
    first sent to the workers. It is the outermost wrapper (step 09's verifier and step 10's graphs
    sit inside), so its ``failure`` and ``close`` are the ones the engine calls."""

    def __init__(self, inner: ModelRunner[PagedKVCache], workers: Workers) -> None:
        super().__init__(inner.model, inner.cache, inner.device, inner.max_len, inner.details)
        self.inner, self.workers = inner, workers
        self._broken: str | None = None
        self.details["tensor_parallel_workers"] = " ".join(map(str, workers.pids))

    def prepare(self, out: Any) -> BatchInputs:
        return self.inner.prepare(out)

    def forward(self, inputs: BatchInputs) -> torch.Tensor:
        try:
            self.workers.send(inputs)
            return self.inner.forward(inputs)
        except Exception as e:
            # A broken pipe or gloo's "connection closed by peer": a worker died. Anything else on
            # rank 0 after the send (out of memory, a collective's timeout) leaves the workers
            # inside this forward's collectives, and the next step's would pair with them: the
            # ranks are out of step for good, so it is a failure of the runner, not of one step.
            if self.workers.failure(wait_s=2.0) is None:
                self._broken = f"tensor-parallel rank 0 failed inside a forward, the ranks are out of step " \
                               f"({type(e).__name__}: {e}); restart the server"
            raise engine_failed(self.failure() or "") from e

    def failure(self) -> str | None:
        return self.workers.failure() or self._broken

    def close(self) -> None:
        clean = self.failure() is None
        self.workers.close()
        if clean and dist.is_initialized():  # after a failure a collective may never return: skip
            dist.destroy_process_group()


class RankZero:
    """Rank 0's side of the group, in the engine's assembly: :meth:`build_runner` starts the workers
    and builds this rank's runner beside them; :meth:`wrap` puts :class:`TPRunner` around the
    engine's runner (outermost, so every forward, verification included, reaches every rank)."""

    def __init__(self, spec: RankSpec) -> None:
        self.spec = spec
        self.workers: Workers | None = None

    def build_runner(self, lm: Any, explicit_len: bool) -> ModelRunner[PagedKVCache]:
        from step11_multigpu.model_runner import build_rank_runner

        spec = self.spec
        pin(spec, 0)
        workers = self.workers = Workers(spec)
        try:
            workers.expect("hello")
            join_group(spec, 0)
            runner = build_rank_runner(lm, spec, 0)
            workers.expect("ready")
        except BaseException as e:
            sent = workers.errors()
            workers.close()
            if dist.is_initialized():
                dist.destroy_process_group()
            if sent:  # the worker's own error says more than gloo's "connection closed"
                raise RuntimeError(sent) from e
            raise
        workers.watch()
        log.info("tensor parallel: %d ranks (%s), workers %s, cores %s", spec.world_size, spec.backend,
                 workers.pids, spec.cores or "-")
        return runner

    def wrap(self, runner: ModelRunner[PagedKVCache]) -> ModelRunner[PagedKVCache]:
        assert self.workers is not None, "build_runner comes first"
        return TPRunner(runner, self.workers)
