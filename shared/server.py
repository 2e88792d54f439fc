"""``python -m stepNN_name``: parse the flags, let the step assemble its engine and app, serve them."""
from __future__ import annotations

import argparse
import logging
from typing import Any, Callable, Mapping

from fastapi import FastAPI

from shared.config import ServerConfig, build_parser, from_args


def run_step(prog: str, doc: str | None, assemble: Callable[[argparse.Namespace], FastAPI], *configs: type,
             argv: list[str] | None = None,
             uvicorn_options: Callable[[argparse.Namespace], dict[str, Any]] | None = None,
             defaults: Mapping[str, Any] | None = None,
             validate: Callable[[argparse.Namespace], None] | None = None) -> None:
    """The whole ``__main__`` of a step: its own config dataclasses come in ``configs``.

    ``assemble`` builds the step's engine from its parts and the app around it (the shared API,
    plus whatever routes and middleware the step adds) from the parsed flags; ``uvicorn_options``
    overrides uvicorn's settings (e.g. the graceful-shutdown timeout); ``defaults`` changes an
    earlier step's flag default for this step (``{"RunnerConfig.kv_cache_gib": 0.75}``);
    ``validate`` checks flags against each other or the model's shape (a ValueError is a usage error).
    """
    import uvicorn

    summary = (doc or prog).strip().splitlines()[0]
    parser = build_parser(f"python -m {prog}", summary, *configs)
    parser.set_defaults(**(defaults or {}))
    ns = parser.parse_args(argv)
    for cls in configs:  # a value out of range is a usage error naming the flag (exit 2), not a traceback
        try:
            from_args(cls, ns)
        except ValueError as e:
            parser.error(str(e))
    try:
        if validate is not None:
            validate(ns)
    except ValueError as e:
        parser.error(str(e))
    server = from_args(ServerConfig, ns)
    logging.basicConfig(level=server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = assemble(ns)
    options: dict[str, Any] = {"timeout_graceful_shutdown": 5, **(uvicorn_options(ns) if uvicorn_options else {})}
    uvicorn.run(app, host=server.host, port=server.port, log_level=server.log_level, **options)
