"""One structured JSON line per finished request, on the ``step05_observability.requests`` logger.

The line is built on the engine thread when the request finishes (a dict, ``json.dumps`` and one
write: tens of microseconds, once per request, never per token). Times are seconds, rounded to
the microsecond; ``null`` where the request never reached that point (aborted while waiting).

    {"ts": "2026-11-23T02:41:07.183Z", "event": "request_finished", "request_id": "my-id-0",
     "finish_reason": "length", "prompt_tokens": 128, "output_tokens": 128, "queue_time_s": 0.0012,
     "ttft_s": 0.8412, "prefill_time_s": 0.8391, "decode_time_s": 9.1046, "e2e_s": 9.9458,
     "tpot_s": 0.071690}
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging

from shared.config import flag_field
from step04_kvcache.observer import EngineObserver, RequestStats, StepStats

LOGGER = "step05_observability.requests"


@dataclasses.dataclass(frozen=True, slots=True)
class ObservabilityConfig:
    request_log: bool = flag_field(True, "log one JSON line per finished request on stderr "
                                   "(logger step05_observability.requests)")
    metrics_namespace: str = flag_field("stepserve", "names of /metrics: stepserve (stepserve:...), or vllm: the "
                                        "series vLLM also has under vLLM's names and labels (vllm:..., model_name, "
                                        "engine), for vLLM's dashboards and tools", choices=("stepserve", "vllm"))


def _span(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(b - a, 6)


def request_record(r: RequestStats) -> dict[str, object]:
    tpot = None
    if r.first_token_time is not None and r.num_output_tokens > 1:
        tpot = round((r.finish_time - r.first_token_time) / (r.num_output_tokens - 1), 6)
    return {"event": "request_finished", "request_id": r.request_id, "finish_reason": r.finish_reason,
            "prompt_tokens": r.num_prompt_tokens, "output_tokens": r.num_output_tokens,
            "queue_time_s": _span(r.arrival_time, r.first_scheduled_time),
            "ttft_s": _span(r.arrival_time, r.first_token_time),
            "prefill_time_s": _span(r.first_scheduled_time, r.first_token_time),
            "decode_time_s": _span(r.first_token_time, r.finish_time),
            "e2e_s": _span(r.arrival_time, r.finish_time), "tpot_s": tpot}


class JsonFormatter(logging.Formatter):
    """A record whose ``msg`` is a dict becomes that dict as one JSON line, with a UTC timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        body = record.msg if isinstance(record.msg, dict) else {"message": record.getMessage()}
        return json.dumps({"ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"), **body},
                          separators=(",", ":"))


def json_logger(name: str = LOGGER) -> logging.Logger:
    """The request logger: JSON lines on stderr, whatever the root logger's format. Idempotent."""
    logger = logging.getLogger(name)
    if not any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # not again through the root logger's plain-text format
    return logger


class RequestLog:
    """An :class:`~step04_kvcache.observer.EngineObserver` that logs each finished request."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def on_step(self, stats: StepStats) -> None:
        pass

    def on_request_finished(self, stats: RequestStats) -> None:
        if self.logger.isEnabledFor(logging.INFO):
            self.logger.info(request_record(stats))


def request_log(cfg: ObservabilityConfig, logger: logging.Logger | None = None) -> list[EngineObserver]:
    """The request-log observer if ``--request-log`` is on (the default), else none."""
    return [RequestLog(logger or json_logger())] if cfg.request_log else []
