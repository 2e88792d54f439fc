"""Step 07's Prometheus series, vLLM's names under step 05's ``stepserve:`` prefix.

Read from the paged scheduler's typed stats at scrape time (a custom collector: counters that the
engine thread keeps as plain ints, so no metric call sits in the scheduler): preemptions,
prefix-cache queries and hits (in prompt tokens, counted at a request's first admission), and the
pool in blocks. Step 05's ``kv_cache_usage_perc`` gauge already reads ``kv_usage``, the fraction
of the pool's slots reserved.
"""
from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from step05_observability.metrics import PREFIX
from step07_paged_kv.scheduler import PagedSchedulerStats


class PagedKVCollector(Collector):
    def __init__(self, stats: Callable[[], PagedSchedulerStats | None]) -> None:
        """``stats``: the paged scheduler's stats, or None while the engine loads."""
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s, p = self.stats(), PREFIX
        preemptions, queries, hits, used, total = (0, 0, 0, 0, 0) if s is None else (  # 0 while loading
            s.num_preemptions, s.prefix_cache_queries, s.prefix_cache_hits, s.kv_blocks_used, s.kv_blocks_total)
        yield CounterMetricFamily(p + "num_preemptions", "Sequences preempted (blocks ran out; recomputed later)",
                                  value=preemptions)
        yield CounterMetricFamily(p + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                  value=queries)
        yield CounterMetricFamily(p + "prefix_cache_hits", "Prompt tokens found in the prefix cache "
                                  "(skipped in prefill)", value=hits)
        yield GaugeMetricFamily(p + "kv_cache_blocks_used", "KV blocks in use", value=used)
        yield GaugeMetricFamily(p + "kv_cache_blocks_total", "KV blocks in the pool", value=total)
