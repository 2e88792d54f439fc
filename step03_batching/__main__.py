from shared.config import from_args
from shared.server import run_step
from step03_batching import __doc__
from step03_batching.engine import BatchConfig, BatchingEngine

if __name__ == "__main__":
    run_step("step03_batching", __doc__, lambda cfg, ns: BatchingEngine(cfg, from_args(BatchConfig, ns)), BatchConfig)
