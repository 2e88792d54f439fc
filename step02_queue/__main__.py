from shared.api import build_app
from shared.config import ModelConfig, from_args
from shared.server import run_step
from step02_queue import __doc__
from step02_queue.engine import QueueEngine

if __name__ == "__main__":
    run_step("step02_queue", __doc__, lambda ns: build_app(QueueEngine(from_args(ModelConfig, ns))))
