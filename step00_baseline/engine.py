"""The engine of step 00; later steps subclass it and change one thing at a time."""
from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import AsyncIterator

from shared.config import ModelConfig
from shared.engine import GenerationRequest, ModelInfo, TokenEvent
from shared.hf_runner import generate_tokens, iterate_in_thread
from shared.models import LoadedModel, load_info, load_model, prepare


@dataclasses.dataclass(frozen=True, slots=True)
class RequestCounts:
    """What ``/health`` reports for steps 00-01: requests generating now."""

    num_running: int


class BaselineEngine:
    """Loads the model for every request (``load_for_request``) on the request's own thread."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self._info: ModelInfo | None = None
        self._cancel: dict[str, threading.Event] = {}  # running requests

    async def start(self) -> None:
        await asyncio.to_thread(prepare, self.cfg)  # one-time conversion, not per request
        self._info = await asyncio.to_thread(load_info, self.cfg)

    def info(self) -> ModelInfo | None:
        return self._info

    def load_for_request(self) -> LoadedModel:
        """Called on the request's thread. Step 00: read the weights from disk, every time."""
        return load_model(self.cfg)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        cancelled = self._cancel.setdefault(request.request_id, threading.Event())
        try:
            async for event in iterate_in_thread(
                    lambda c: generate_tokens(self.load_for_request(), request, c), cancelled):
                yield event
        finally:
            self._cancel.pop(request.request_id, None)

    def abort(self, request_id: str) -> None:
        if (event := self._cancel.get(request_id)) is not None:
            event.set()

    def error(self) -> str | None:
        return None  # each request runs on its own thread: nothing shared can die

    def stats(self) -> RequestCounts:
        return RequestCounts(num_running=len(self._cancel))

    async def shutdown(self) -> None:
        for event in self._cancel.values():
            event.set()
