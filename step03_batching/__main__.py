from shared.api import build_app
from shared.config import ModelConfig, from_args
from shared.server import run_step
from step03_batching import __doc__
from step03_batching.engine import BatchConfig, BatchingEngine

if __name__ == "__main__":
    run_step("step03_batching", __doc__,
             lambda ns: build_app(BatchingEngine(from_args(ModelConfig, ns), from_args(BatchConfig, ns))), BatchConfig)
