"""Step 07's Prometheus series, vLLM's names under step 05's ``stepserve:`` prefix.

Read from ``engine.stats()`` at scrape time (a custom collector: counters that the engine thread
keeps as plain ints, so no metric call sits in the scheduler): preemptions, prefix-cache queries
and hits (in prompt tokens, counted at a request's first admission), and the pool in blocks.
Step 05's ``kv_cache_usage_perc`` gauge already reads ``kv_usage``, which is now blocks in use.
"""
from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from step05_observability.metrics import PREFIX


class PagedKVCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, float]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s, p = self.stats(), PREFIX
        yield CounterMetricFamily(p + "num_preemptions", "Sequences preempted (blocks ran out; recomputed later)",
                                  value=s.get("num_preemptions", 0))
        yield CounterMetricFamily(p + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                  value=s.get("prefix_cache_queries", 0))
        yield CounterMetricFamily(p + "prefix_cache_hits", "Prompt tokens found in the prefix cache "
                                  "(skipped in prefill)", value=s.get("prefix_cache_hits", 0))
        yield GaugeMetricFamily(p + "kv_cache_blocks_used", "KV blocks in use", value=s.get("kv_slots_used", 0))
        yield GaugeMetricFamily(p + "kv_cache_blocks_total", "KV blocks in the pool", value=s.get("kv_slots_total", 0))
