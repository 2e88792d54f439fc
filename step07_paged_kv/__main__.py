from shared.config import from_args
from shared.server import run_step
from step04_kvcache.model_runner import RunnerConfig
from step04_kvcache.scheduler import SchedulerConfig
from step07_paged_kv import __doc__
from step07_paged_kv.engine import PagedEngine
from step07_paged_kv.model_runner import PagedCacheConfig

if __name__ == "__main__":
    run_step("step07_paged_kv", __doc__,
             lambda cfg, ns: PagedEngine(cfg, from_args(SchedulerConfig, ns), from_args(RunnerConfig, ns),
                                         cache=from_args(PagedCacheConfig, ns)),
             SchedulerConfig, RunnerConfig, PagedCacheConfig)
