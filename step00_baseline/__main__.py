from shared.api import build_app
from shared.config import ModelConfig, from_args
from shared.server import run_step
from step00_baseline import __doc__
from step00_baseline.engine import BaselineEngine

if __name__ == "__main__":
    run_step("step00_baseline", __doc__, lambda ns: build_app(BaselineEngine(from_args(ModelConfig, ns))))
