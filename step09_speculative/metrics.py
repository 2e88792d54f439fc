"""Step 09's Prometheus series: vLLM's ``spec_decode`` counters under step 05's ``stepserve:`` prefix.

Read from the scheduler's typed stats at scrape time. Acceptance rate and mean acceptance length
are derived as vLLM's dashboards derive them: ``accepted / draft tokens`` and
``1 + accepted / drafts``.
"""
from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from step05_observability.metrics import PREFIX
from step09_speculative.scheduler import SpecSchedulerStats


class SpecDecodingCollector(Collector):
    def __init__(self, stats: Callable[[], SpecSchedulerStats | None]) -> None:
        """``stats``: the speculative scheduler's stats, or None while the engine loads."""
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s, p = self.stats(), PREFIX + "spec_decode_"
        yield CounterMetricFamily(p + "num_drafts", "Sequence steps that verified draft tokens",
                                  value=s.spec_decode_num_drafts if s else 0)
        yield CounterMetricFamily(p + "num_draft_tokens", "Draft tokens proposed and verified",
                                  value=s.spec_decode_num_draft_tokens if s else 0)
        yield CounterMetricFamily(p + "num_accepted_tokens", "Draft tokens accepted",
                                  value=s.spec_decode_num_accepted_tokens if s else 0)
        per_pos = CounterMetricFamily(p + "num_accepted_tokens_per_pos", "Draft tokens accepted at each "
                                      "position of a proposal", labels=["position"])
        for j, n in enumerate(s.spec_decode_num_accepted_tokens_per_pos if s else ()):
            per_pos.add_metric([str(j)], n)
        yield per_pos
        yield GaugeMetricFamily(p + "acceptance_rate", "Accepted / draft tokens since start-up",
                                value=s.spec_decode_acceptance_rate if s else 0.0)
        yield GaugeMetricFamily(p + "mean_acceptance_length", "Tokens per verified sequence step (1 + accepted "
                                "/ drafts) since start-up", value=s.spec_decode_mean_acceptance_length if s else 0.0)
