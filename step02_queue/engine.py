"""Step 02's engine: step 01's, behind a FIFO queue and one worker."""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
from typing import AsyncIterator

from shared.engine import GenerationRequest, TokenEvent
from shared.hf_runner import generate_tokens, iterate_in_thread
from step01_loader.engine import LoaderEngine

_DONE = object()


@dataclasses.dataclass(slots=True)
class _Entry:
    request: GenerationRequest
    out: asyncio.Queue  # TokenEvent, an exception, or _DONE
    cancelled: threading.Event


class QueueEngine(LoaderEngine):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.waiting: collections.deque[_Entry] = collections.deque()
        self.running: _Entry | None = None
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self.generated_tokens = 0  # counted by the worker: includes tokens nobody read

    async def start(self) -> None:
        await super().start()
        self._worker = asyncio.create_task(self._work(), name="step02-worker")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        entry = _Entry(request, asyncio.Queue(), threading.Event())
        self.waiting.append(entry)
        self._wakeup.set()
        try:
            while (item := await entry.out.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._drop(entry)

    def _drop(self, entry: _Entry) -> None:
        entry.cancelled.set()  # stops it within one token if it is running
        if entry in self.waiting:
            self.waiting.remove(entry)  # never runs
            entry.out.put_nowait(_DONE)

    def abort(self, request_id: str) -> None:
        for entry in [*self.waiting, *([self.running] if self.running else [])]:
            if entry.request.request_id == request_id:
                self._drop(entry)

    async def _work(self) -> None:
        while True:
            while not self.waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
            entry = self.running = self.waiting.popleft()
            try:
                async for event in iterate_in_thread(
                        lambda c: generate_tokens(self.load_for_request(), entry.request, c), entry.cancelled):
                    self.generated_tokens += 1
                    entry.out.put_nowait(event)
            except Exception as e:  # the request fails, the worker goes on
                entry.out.put_nowait(e)
            finally:
                self.running = None
                entry.out.put_nowait(_DONE)

    def stats(self) -> dict[str, float]:
        return {"running": int(self.running is not None), "waiting": len(self.waiting),
                "generated_tokens": self.generated_tokens}

    async def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        for entry in [*self.waiting, *([self.running] if self.running else [])]:
            self._drop(entry)
