"""Step 02's engine: step 01's, behind a FIFO queue and one worker."""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
from typing import AsyncIterator

from shared.config import ModelConfig
from shared.engine import GenerationRequest, TokenEvent
from shared.hf_runner import generate_tokens, iterate_in_thread
from step01_loader.engine import LoaderEngine

DONE = object()  # end of a request's output queue


@dataclasses.dataclass(slots=True)
class Entry:
    request: GenerationRequest
    out: asyncio.Queue  # TokenEvent, an exception, or DONE
    cancelled: threading.Event


@dataclasses.dataclass(frozen=True, slots=True)
class QueueStats:
    """What ``/health`` reports for steps 02-03."""

    num_running: int
    num_waiting: int
    num_generated_tokens: int  # counted by the worker: includes tokens nobody read


class QueueEngine(LoaderEngine):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.waiting: collections.deque[Entry] = collections.deque()
        self.running: list[Entry] = []  # step 02 runs one at a time; step 03 runs a batch
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self.generated_tokens = 0  # counted by the worker: includes tokens nobody read

    async def start(self) -> None:
        await super().start()
        self._worker = asyncio.create_task(self._work(), name="step02-worker")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        entry = Entry(request, asyncio.Queue(), threading.Event())
        self.waiting.append(entry)
        self._wakeup.set()
        try:
            while (item := await entry.out.get()) is not DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._drop(entry)

    def _drop(self, entry: Entry) -> None:
        entry.cancelled.set()  # stops it within one token if it is running
        if entry in self.waiting:
            self.waiting.remove(entry)  # never runs
            entry.out.put_nowait(DONE)

    def abort(self, request_id: str) -> None:
        for entry in [*self.waiting, *self.running]:
            if entry.request.request_id == request_id:
                self._drop(entry)

    async def _next_waiting(self) -> None:
        while not self.waiting:
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _work(self) -> None:
        while True:
            await self._next_waiting()
            entry = self.waiting.popleft()
            self.running = [entry]
            try:
                async for event in iterate_in_thread(
                        lambda c: generate_tokens(self.load_for_request(), entry.request, c), entry.cancelled):
                    self.generated_tokens += 1
                    entry.out.put_nowait(event)
            except Exception as e:  # the request fails, the worker goes on
                entry.out.put_nowait(e)
            finally:
                self.running = []
                entry.out.put_nowait(DONE)

    def stats(self) -> QueueStats:
        return QueueStats(len(self.running), len(self.waiting), self.generated_tokens)

    async def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        for entry in [*self.waiting, *self.running]:
            self._drop(entry)
