"""Step 03's engine: step 02's queue and worker, with the worker running a batch at a time."""
from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

from shared.config import ModelConfig, flag_field
from shared.hf_runner import iterate_in_thread
from step02_queue.engine import DONE, Entry, QueueEngine
from step03_batching.batch_runner import generate_batch


@dataclasses.dataclass(frozen=True, slots=True)
class BatchConfig:
    batching: str = flag_field("dynamic", "static: wait for --max-batch requests (or --max-wait-ms), fixed "
                           "shape; dynamic: take what is waiting within --max-wait-ms, drop finished rows",
                           choices=("static", "dynamic"))
    max_batch: int = flag_field(8, "most requests in one batch")
    max_wait_ms: float = flag_field(20.0, "longest a request waits for its batch to fill")

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")


class BatchingEngine(QueueEngine):
    def __init__(self, cfg: ModelConfig, batch: BatchConfig) -> None:
        super().__init__(cfg)
        self.batch_cfg = batch

    async def _collect(self) -> list[Entry]:
        """Wait for the first request, then up to ``max_wait_ms`` for the batch to fill."""
        await self._next_waiting()
        deadline = time.monotonic() + self.batch_cfg.max_wait_ms / 1000
        while len(self.waiting) < self.batch_cfg.max_batch and (left := deadline - time.monotonic()) > 0:
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except TimeoutError:
                break
        n = min(self.batch_cfg.max_batch, len(self.waiting))
        return [self.waiting.popleft() for _ in range(n)]

    async def _work(self) -> None:
        while True:
            batch = await self._collect()
            if not batch:  # everyone left while we waited
                continue
            self.running = batch
            requests = [e.request for e in batch]
            cancelled = [e.cancelled for e in batch]
            shrink = self.batch_cfg.batching == "dynamic"
            try:
                async for i, event in iterate_in_thread(
                        lambda stop: generate_batch(self.load_for_request(), requests, cancelled, stop, shrink),
                        threading.Event()):
                    self.generated_tokens += 1
                    batch[i].out.put_nowait(event)
            except Exception as e:  # the batch fails, the worker goes on
                for entry in batch:
                    entry.out.put_nowait(e)
            finally:
                self.running = []
                for entry in batch:
                    entry.out.put_nowait(DONE)
