"""``python -m stepNN_name``: parse the flags, build the step's engine, serve it with uvicorn."""
from __future__ import annotations

import argparse
import logging
from typing import Any, Callable

from fastapi import FastAPI

from shared.api import build_app
from shared.config import ModelConfig, ServerConfig, build_parser, from_args
from shared.engine import Engine


def run_step(prog: str, doc: str | None, make_engine: Callable[[ModelConfig, argparse.Namespace], Engine],
             *configs: type, argv: list[str] | None = None,
             make_app: Callable[[Engine, argparse.Namespace], FastAPI] | None = None,
             uvicorn_options: Callable[[argparse.Namespace], dict[str, Any]] | None = None) -> None:
    """The whole ``__main__`` of a step: its own config dataclasses come in ``configs``.

    A later step that adds routes or middleware (metrics, admission control) passes ``make_app``
    (default: ``shared.api.build_app``); ``uvicorn_options`` overrides uvicorn's settings (e.g. the
    graceful-shutdown timeout) from the parsed flags.
    """
    import uvicorn

    summary = (doc or prog).strip().splitlines()[0]
    ns = build_parser(f"python -m {prog}", summary, *configs).parse_args(argv)
    server = from_args(ServerConfig, ns)
    logging.basicConfig(level=server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = make_engine(from_args(ModelConfig, ns), ns)
    app = make_app(engine, ns) if make_app is not None else build_app(engine)
    options: dict[str, Any] = {"timeout_graceful_shutdown": 5, **(uvicorn_options(ns) if uvicorn_options else {})}
    uvicorn.run(app, host=server.host, port=server.port, log_level=server.log_level, **options)
