"""Frozen settings dataclasses; every step's command line is built from their fields.

A field's ``metadata["help"]`` becomes its ``--flag`` help text, and its default is the flag's
default, so ``--help`` always tells the truth. Steps add their own dataclass (for example a
batching config) and pass it to :func:`build_parser` beside these two.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def flag_field(default: Any, help: str, **kw: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
    model: str = flag_field("gemma-3-270m", "model alias (gemma-3-270m, tiny-llama, tiny-gemma3), "
                        "a local Hugging Face directory, or a hub id")
    dtype: str = flag_field("auto", "weights dtype: auto (float32 on CPU, bfloat16 on CUDA), "
                        "float32, bfloat16 or float16", choices=("auto", "float32", "bfloat16", "float16"))
    device: str = flag_field("auto", "auto (cuda if available), cpu or cuda", choices=("auto", "cpu", "cuda"))
    threads: int = flag_field(0, "torch CPU threads (0: torch's default). Under a competing load, 1 can beat 2")
    max_model_len: int = flag_field(0, "context length limit in tokens (0: the model's own)")
    served_model_name: str = flag_field("", "name reported by /v1/models (default: the --model value)")


@dataclasses.dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = flag_field("127.0.0.1", "address to listen on")
    port: int = flag_field(8000, "port to listen on")
    log_level: str = flag_field("info", "uvicorn log level", choices=("debug", "info", "warning", "error"))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--flag`` per field of the dataclass ``cls``."""
    group = parser.add_argument_group(cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        kw: dict[str, Any] = {"default": f.default, "help": f.metadata.get("help", "") + " (default: %(default)s)"}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = kind
        if kind is not bool:
            kw["metavar"] = f.name.upper()
        group.add_argument(_flag(f.name), dest=f"{cls.__name__}.{f.name}", **kw)


def from_args(cls: type[T], ns: argparse.Namespace) -> T:
    """Build the dataclass ``cls`` from the flags :func:`add_dataclass_args` added."""
    values = {f.name: getattr(ns, f"{cls.__name__}.{f.name}") for f in dataclasses.fields(cls)}
    return cls(**values)


def build_parser(prog: str, description: str, *configs: type) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for cls in (ModelConfig, ServerConfig, *configs):
        add_dataclass_args(parser, cls)
    return parser
