from shared.api import build_app
from shared.config import ModelConfig, from_args
from shared.server import run_step
from step01_loader import __doc__
from step01_loader.engine import LoaderEngine

if __name__ == "__main__":
    run_step("step01_loader", __doc__, lambda ns: build_app(LoaderEngine(from_args(ModelConfig, ns))))
