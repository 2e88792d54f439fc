from shared.config import from_args
from shared.server import run_step
from step04_kvcache import __doc__
from step04_kvcache.engine import ContinuousEngine
from step04_kvcache.model_runner import RunnerConfig
from step04_kvcache.scheduler import SchedulerConfig

if __name__ == "__main__":
    run_step("step04_kvcache", __doc__,
             lambda cfg, ns: ContinuousEngine(cfg, from_args(SchedulerConfig, ns), from_args(RunnerConfig, ns)),
             SchedulerConfig, RunnerConfig)
