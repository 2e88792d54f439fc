"""``python -m stepNN_name``: parse the flags, build the step's engine, serve it with uvicorn."""
from __future__ import annotations

import argparse
import logging
from typing import Callable

from shared.api import build_app
from shared.config import ModelConfig, ServerConfig, build_parser, from_args
from shared.engine import Engine


def run_step(prog: str, doc: str | None, make_engine: Callable[[ModelConfig, argparse.Namespace], Engine],
             *configs: type, argv: list[str] | None = None) -> None:
    """The whole ``__main__`` of a step: its own config dataclasses come in ``configs``."""
    import uvicorn

    summary = (doc or prog).strip().splitlines()[0]
    ns = build_parser(f"python -m {prog}", summary, *configs).parse_args(argv)
    server = from_args(ServerConfig, ns)
    logging.basicConfig(level=server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = make_engine(from_args(ModelConfig, ns), ns)
    uvicorn.run(build_app(engine), host=server.host, port=server.port, log_level=server.log_level,
                timeout_graceful_shutdown=5)
