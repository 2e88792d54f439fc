"""``ObservedEngine``: step 04's engine, watched by the metrics and the request log.

Nothing of step 04 is overridden: the engine is built with an observer that fans each callback
out to ``EngineMetrics`` and ``RequestLog``. A later step (06) subclasses this engine and passes
its own observers in ``extra_observers``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

from prometheus_client import CollectorRegistry, ProcessCollector

from shared.config import ModelConfig, flag_field
from step04_kvcache.engine import ContinuousEngine
from step04_kvcache.model_runner import RunnerConfig
from step04_kvcache.observer import EngineObserver, RequestStats, StepStats
from step04_kvcache.scheduler import SchedulerConfig
from step05_observability.metrics import EngineMetrics
from step05_observability.request_log import RequestLog, json_logger


@dataclasses.dataclass(frozen=True, slots=True)
class ObservabilityConfig:
    request_log: bool = flag_field(True, "log one JSON line per finished request on stderr "
                                   "(logger step05_observability.requests)")


class FanOut:
    """One observer that calls several, in order."""

    def __init__(self, observers: Sequence[EngineObserver]) -> None:
        self.observers = tuple(observers)

    def on_step(self, stats: StepStats) -> None:
        for o in self.observers:
            o.on_step(stats)

    def on_request_finished(self, stats: RequestStats) -> None:
        for o in self.observers:
            o.on_request_finished(stats)


class ObservedEngine(ContinuousEngine):
    """``self.registry`` holds this engine's metrics (one registry per engine, never the global one,
    so that many engines can live in one process); ``make_app`` serves it at ``/metrics``."""

    def __init__(self, cfg: ModelConfig, sched: SchedulerConfig = SchedulerConfig(),
                 runner: RunnerConfig = RunnerConfig(), obs: ObservabilityConfig = ObservabilityConfig(),
                 extra_observers: Sequence[EngineObserver] = (), logger: logging.Logger | None = None) -> None:
        self.obs_cfg = obs
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, resident memory, open fds
        self.metrics = EngineMetrics(self.registry)
        observers: list[EngineObserver] = [self.metrics]
        if obs.request_log:
            observers.append(RequestLog(logger or json_logger()))
        super().__init__(cfg, sched, runner, observer=FanOut([*observers, *extra_observers]))
        self.metrics.bind_gauges(self.stats)
