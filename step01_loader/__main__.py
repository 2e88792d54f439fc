from shared.server import run_step
from step01_loader import __doc__
from step01_loader.engine import LoaderEngine

if __name__ == "__main__":
    run_step("step01_loader", __doc__, lambda cfg, _: LoaderEngine(cfg))
