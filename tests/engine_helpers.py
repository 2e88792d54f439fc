"""In-process engine helpers: drive an engine directly, and count the tokens its thread makes."""
from __future__ import annotations

import threading
import time
from typing import Any, Iterator

from shared.engine import GenerationRequest
from shared.sampling import SamplingParams


def request(rid: str, ids: tuple[int, ...] = (2, 40, 41, 42), max_tokens: int = 400) -> GenerationRequest:
    return GenerationRequest(rid, ids, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                             time.monotonic())


class TokenCounter:
    """Wraps ``generate_tokens``: counts, per request, the tokens the worker thread produced."""

    def __init__(self, real: Any, delay: float = 0.0) -> None:
        self.real, self.delay = real, delay
        self.counts: dict[str, int] = {}
        self.started: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, lm: Any, req: GenerationRequest, cancelled: threading.Event) -> Iterator[Any]:
        self.started.append(req.request_id)
        for event in self.real(lm, req, cancelled):
            with self.lock:
                self.counts[req.request_id] = self.counts.get(req.request_id, 0) + 1
            time.sleep(self.delay)  # slow the tiny model down to a visible pace
            yield event
