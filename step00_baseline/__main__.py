from shared.server import run_step
from step00_baseline import __doc__
from step00_baseline.engine import BaselineEngine

if __name__ == "__main__":
    run_step("step00_baseline", __doc__, lambda cfg, _: BaselineEngine(cfg))
