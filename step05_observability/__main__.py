from shared.config import from_args
from shared.server import run_step
from step04_kvcache.model_runner import RunnerConfig
from step04_kvcache.scheduler import SchedulerConfig
from step05_observability import __doc__
from step05_observability.app import make_app
from step05_observability.engine import ObservabilityConfig, ObservedEngine

if __name__ == "__main__":
    run_step("step05_observability", __doc__,
             lambda cfg, ns: ObservedEngine(cfg, from_args(SchedulerConfig, ns), from_args(RunnerConfig, ns),
                                            from_args(ObservabilityConfig, ns)),
             SchedulerConfig, RunnerConfig, ObservabilityConfig, make_app=make_app)
