"""The async front end of the engine: the ``shared.engine.Engine`` protocol around an ``EngineCore``.

Central rule: the event loop never runs the model and the engine thread never touches a socket.
``generate`` puts the request on the engine thread's inbox and reads its items from a queue; the
engine thread (one per engine, its own rather than ``asyncio.to_thread`` per step, so that the
next step starts as soon as this one ends, not when the event loop gets round to it) adds what
came in, runs ``EngineCore.step()`` and hands all of the step's items to the event loop in ONE
``loop.call_soon_threadsafe``.

Parts that are not the core's come in here: **request policies**, asked on the event loop when a
request arrives (they may refuse it), at each of its tokens and when it ends (step 06's admission).

Loading takes seconds to minutes, so the parts that need the weights are built in ``start()``:
``build_core(lm)`` is the step's assembly of its scheduler, model runner, observers and step
policies; ``/health`` answers 503 until it has returned and the engine thread runs.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from typing import Any, AsyncIterator, Callable, Protocol, Sequence as Seq

import torch

from shared.config import ModelConfig
from shared.engine import GenerationRequest, ModelInfo, RequestFacts, TokenEvent
from shared.errors import RequestError, engine_failed
from shared.models import LoadedModel, load_model, model_info, prepare
from step04_kvcache.engine_core import DONE, EngineCore, Entry, Outputs
from step04_kvcache.scheduler import SchedulerStats

log = logging.getLogger("step04_kvcache")


class RequestPolicy(Protocol):
    """A rule about requests, on the event loop (step 06's admission)."""

    name: str

    def on_arrival(self, request: GenerationRequest) -> None:
        """Before the engine sees ``request``: raise a ``RequestError`` to refuse it."""

    def on_token(self, request: GenerationRequest) -> None:
        """Each token ``request`` streams (the first ends its wait)."""

    def on_finish(self, request: GenerationRequest) -> None:
        """``request`` ended: finished, aborted or failed. Idempotent."""

    def stats(self) -> Any:
        """A frozen dataclass of its counters."""


@dataclasses.dataclass(frozen=True, slots=True)
class EngineStats:
    """``/health``'s body (with ``status``): the loop's counters and each part's own stats."""

    num_generated_tokens: int
    num_pending: int  # requests not yet handed to the scheduler (on the inbox)
    scheduler: SchedulerStats | None  # None while loading
    policies: dict[str, Any]  # name -> that policy's stats dataclass


class RunnerFailed(RuntimeError):
    """The model runner reported it cannot serve any more (its ``failure()``)."""


class AsyncEngine:
    def __init__(self, model: ModelConfig, build_core: Callable[[LoadedModel], EngineCore],
                 request_policies: Seq[RequestPolicy] = ()) -> None:
        self.model_cfg = model
        self.build_core = build_core
        self.request_policies = tuple(request_policies)
        self.core: EngineCore | None = None  # the engine thread's, once built
        self._info: ModelInfo | None = None
        self._inbox: queue.SimpleQueue[Entry | None] = queue.SimpleQueue()  # None: stop
        self._live: dict[str, list[Entry]] = {}  # request id -> its entries in flight (event loop)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: str | None = None  # set once if the engine thread dies
        self._stopping = False  # shutdown() began: new requests are refused, none is left waiting

    async def start(self) -> None:
        """Start the engine thread; it loads the model and builds the core itself, then serves.

        Every torch op of the server runs on that one thread, on purpose. Each thread that runs
        OpenMP-parallel ops gets its own team of worker threads, and once a process holds more
        such threads than CPUs, libgomp stops spinning between parallel regions and puts its
        workers to sleep: every parallel op then pays a wake-up. Measured on 2 cores (step 08,
        int4, batch 1): loading in an executor thread and stepping in the engine thread made a
        step 45 -> 69 ms, SDPA 0.02 -> 0.22 ms a call."""
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[ModelInfo] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="engine", daemon=True)
        self._thread.start()
        # Ready (/health 200) only now, and with the context the cache really serves; what
        # loading raised, if it failed.
        self._info = await ready

    def info(self) -> ModelInfo | None:
        return self._info

    def error(self) -> str | None:
        """Why the engine cannot serve: its thread died, or its runner failed (a dead worker)."""
        if self._error is None and (core := self.core) is not None:
            return core.runner.failure()
        return self._error

    def _refusal(self) -> RequestError:
        """The 503 for a request that cannot enter: the engine thread died, or it is stopping."""
        if (error := self.error()) is not None:
            return engine_failed(error)
        return RequestError("the engine is shutting down", status=503, type="service_unavailable",
                            code="shutting_down")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestFacts | TokenEvent]:
        if self.error() is not None or self._stopping:
            raise self._refusal()
        self._arrive(request)  # a policy's refusal is raised here, before any work
        entry = Entry(request, asyncio.Queue())
        self._live.setdefault(request.request_id, []).append(entry)
        self._inbox.put(entry)
        try:
            if self.error() is not None or self._stopping:  # just now: the inbox may have been drained
                raise self._refusal()
            while (item := await entry.out.get()) is not DONE:
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, TokenEvent):
                    for policy in self.request_policies:
                        policy.on_token(request)
                yield item
        finally:
            entry.cancelled.set()  # the core drops it at its next step, if it is still there
            self._forget(entry)
            for policy in self.request_policies:
                policy.on_finish(request)

    def _arrive(self, request: GenerationRequest) -> None:
        """Every request policy admits ``request``, or none keeps it."""
        admitted: list[RequestPolicy] = []
        try:
            for policy in self.request_policies:
                policy.on_arrival(request)
                admitted.append(policy)
        except BaseException:
            for policy in admitted:
                policy.on_finish(request)
            raise

    def _forget(self, entry: Entry) -> None:
        entries = self._live.get(entry.request.request_id, [])
        if entry in entries:
            entries.remove(entry)
        if not entries:
            self._live.pop(entry.request.request_id, None)

    def abort(self, request_id: str) -> None:
        for entry in self._live.get(request_id, ()):
            entry.cancelled.set()

    def stats(self) -> EngineStats:
        """Read on the event loop while the engine thread runs: ints and lengths, no locks needed."""
        core, pending = self.core, self._inbox.qsize()
        policies = {p.name: p.stats() for p in self.request_policies}
        if core is None:
            return EngineStats(0, pending, None, policies)
        policies.update({p.name: p.stats() for p in core.policies})
        return EngineStats(core.num_generated_tokens, pending, core.scheduler.stats(), policies)

    async def shutdown(self) -> None:
        self._stopping = True
        for entries in self._live.values():
            for entry in entries:
                entry.cancelled.set()
        self._inbox.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    # ---- the engine thread ------------------------------------------------------------------

    def _load(self, ready: asyncio.Future) -> EngineCore | None:
        """Prepare, load and build on this thread; settle ``ready`` on the event loop either way.

        ``ready`` gets the ModelInfo, never the LoadedModel: the thread holds ``ready`` while it
        runs, and the loaded transformers model must not outlive the build (a quantized model
        drops its float weights)."""
        try:
            prepare(self.model_cfg)  # the one-time conversion, if needed
            lm = load_model(self.model_cfg)
            core = self.build_core(lm)
            info = dataclasses.replace(model_info(lm), max_model_len=core.runner.max_len, prompt_logprobs=True,
                                       runtime=tuple(core.runner.details.items()))
            del lm
        except BaseException as e:
            self._loop.call_soon_threadsafe(_settle, ready, None, e)
            return None
        self.core = core
        self._loop.call_soon_threadsafe(_settle, ready, info, None)
        return core

    def _run(self, ready: asyncio.Future) -> None:
        core = self._load(ready)
        if core is None:
            return
        try:
            self._serve(core)
        finally:
            core.runner.close()

    def _serve(self, core: EngineCore) -> None:
        try:
            with torch.inference_mode():
                while self._admit(core, block=not core.has_work()):
                    if core.has_work():
                        self._flush(core.step())
                    if (failure := core.runner.failure()) is not None:  # e.g. a worker process died
                        raise RunnerFailed(failure)
        except BaseException as e:  # the thread dies: /health says so, and nothing may wait forever
            log.exception("engine thread failed")
            self._error = str(e) if isinstance(e, RunnerFailed) else f"engine thread died: {type(e).__name__}: {e}"
            self._flush(self._fail_all(core))
            self._flush(self._refuse_inbox())
            return  # logged above; the thread ends here
        self._flush(core.abort_all())  # told to stop
        self._flush(self._refuse_inbox())

    def _fail_all(self, core: EngineCore) -> Outputs:
        """Every request in the core gets the error, even if the parts that died fail again."""
        try:
            return core.abort_all(self._refusal())
        except Exception:
            log.exception("failing the requests through the scheduler failed too; ending them directly")
            return [(entry, item) for entry in core.entries() for item in (self._refusal(), DONE)]

    def _refuse_inbox(self) -> Outputs:
        outputs: Outputs = []
        while True:
            try:
                entry = self._inbox.get_nowait()
            except queue.Empty:
                return outputs
            if entry is not None:
                outputs += [(entry, self._refusal()), (entry, DONE)]

    def _admit(self, core: EngineCore, block: bool) -> bool:
        """Move new requests from the inbox into the core; False once told to stop."""
        try:
            entry = self._inbox.get(block=block)
            while entry is not None:
                self._flush(core.add(entry))
                entry = self._inbox.get_nowait()
            return False
        except queue.Empty:
            return True

    def _flush(self, outputs: Outputs) -> None:
        """Hand items to the event loop: one call per step, however many requests."""
        if not outputs:
            return
        try:
            self._loop.call_soon_threadsafe(_deliver, outputs)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # start() was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _deliver(outputs: Outputs) -> None:
    for entry, item in outputs:
        entry.out.put_nowait(item)
