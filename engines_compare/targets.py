"""What ``bench --target`` accepts, and how each kind is started, probed and stopped.

* a URL (``http://host:port``): a server someone else runs; nothing is started or stopped.
* a step (``step02_queue``): ``python -m step02_queue --model M --port FREE`` in a subprocess.
* ``null``: the built-in null server (:mod:`engines_compare.null_server`), the client's ceiling.
* any other name (``llamacpp``, ``vllm``): :func:`engines_compare.launchers.start`, which returns
  a handle with ``.url`` and ``.stop()``.

Central rule: whatever we start, we stop (SIGTERM, then kill), even when the benchmark fails;
and every target is asked the same questions afterwards: its model id (``GET /v1/models``, first
id) and its version (``GET /version``, else the step name or the launcher's answer).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

REPO = Path(__file__).resolve().parent.parent
_STEP = re.compile(r"^step\d\d_\w+$")
_LABELLED_STEP = re.compile(r"^(step\d\d_\w+):[\w.-]+$")  # step08_quant:int4: one step, started twice
_ENGINE = re.compile(r"[A-Za-z][\w.-]*(:[\w.-]+)?")  # llamacpp, or llamacpp:ngram (labelled, like a step)


@dataclasses.dataclass(frozen=True, slots=True)
class TargetSpec:
    name: str
    kind: str  # "url", "step", "null" or "engine"


@dataclasses.dataclass(frozen=True, slots=True)
class TargetOptions:
    model: str = "gemma-3-270m"
    dtype: str = "auto"
    start_timeout_s: float = 900.0
    null_tokens: int = 128
    log_dir: Path | None = None  # where started servers' output goes (default: discarded)
    step_flags: tuple[str, ...] = ()  # appended to a step's command line (e.g. --max-seqs 64)
    priority: int | None = None  # autogroup nice of started servers (see set_priority)
    engine_flags: tuple[str, ...] = ()  # an engine target's own launcher options (--dtype bfloat16)


@dataclasses.dataclass(frozen=True, slots=True)
class RunningTarget:
    spec: TargetSpec
    url: str
    model_id: str
    version: str
    dtype: str | None
    pid: int | None = None  # the server process, where we started it (its memory is read from /proc)


def available_steps() -> list[str]:
    return sorted(p.name for p in REPO.iterdir() if p.is_dir() and _STEP.match(p.name))


def step_module(name: str) -> str:
    """``step08_quant:int4`` -> ``step08_quant``: a label after ``:`` names one configuration of a
    step or an engine (its flags: ``--target-flags step08_quant:int4=--quantization int4``,
    ``--target-flags "llamacpp:ngram=--extra-args '--spec-type ngram-simple'"``)."""
    return name.partition(":")[0]


def parse_targets(values: list[str]) -> list[TargetSpec]:
    """``--target`` values, repeated or comma-separated, in order."""
    out = []
    for value in values:
        for name in filter(None, (v.strip() for v in value.split(","))):
            if name.startswith(("http://", "https://")):
                out.append(TargetSpec(name.rstrip("/"), "url"))
            elif name == "null":
                out.append(TargetSpec(name, "null"))
            elif _STEP.match(name) or _LABELLED_STEP.match(name):
                if step_module(name) not in available_steps():
                    raise ValueError(f"--target: no step named {name!r}; steps: {', '.join(available_steps())}")
                out.append(TargetSpec(name, "step"))
            elif _ENGINE.fullmatch(name):
                out.append(TargetSpec(name, "engine"))
            else:
                raise ValueError(f"--target: expected a URL, a step name, 'null' or an engine name, got {name!r}")
    if not out:
        raise ValueError("--target: give at least one target")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ``GET /health`` until 200; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{url}: the server exited with code {proc.returncode} before it was healthy")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url + "/health").status_code == 200:
                    return
            time.sleep(0.25)
    raise TimeoutError(f"{url}: /health did not answer 200 within {timeout_s:.0f} s")


def probe(url: str) -> tuple[str, str | None]:
    """The first model id of ``GET /v1/models`` and the version of ``GET /version`` (if any)."""
    with httpx.Client(timeout=30.0) as client:
        models = client.get(url + "/v1/models")
        models.raise_for_status()
        data = models.json().get("data") or []
        if not data:
            raise RuntimeError(f"{url}: /v1/models lists no model")
        version = None
        with contextlib.suppress(httpx.HTTPError, ValueError):
            r = client.get(url + "/version")
            if r.status_code == 200:
                version = str(r.json().get("version")) or None
        return data[0]["id"], version or data[0].get("owned_by")


def _spawn(args: list[str], log_path: Path | None) -> subprocess.Popen:
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    try:
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        if log_path:
            out.close()


def set_priority(pid: int, nice: int) -> bool:
    """Give ``pid``'s autogroup (its session) the nice value ``nice`` (-20 .. 19); False if refused.

    Why: with ``/proc/sys/kernel/sched_autogroup_enabled`` (Linux's default) the scheduler first
    shares the CPU between sessions and only then applies ``nice`` within one, so ``nice`` alone
    does not protect a benchmark from other sessions' work on a 2-core machine. A lower value
    needs root (or CAP_SYS_NICE); where it is refused the run goes on at normal priority.
    """
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
        return True
    except OSError:
        return False


def stop_process(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``: the process and anything it started."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _command(spec: TargetSpec, opts: TargetOptions, port: int) -> list[str]:
    if spec.kind == "null":
        return [sys.executable, "-m", "engines_compare.null_server", "--port", str(port),
                "--tokens", str(opts.null_tokens)]
    return [sys.executable, "-m", step_module(spec.name), "--model", opts.model, "--dtype", opts.dtype,
            "--port", str(port), "--host", "127.0.0.1", "--log-level", "warning", *opts.step_flags]


def engine_options(flags: tuple[str, ...]) -> dict[str, Any]:
    """``("--dtype", "bfloat16", "--threads", "2")`` -> ``{"dtype": "bfloat16", "threads": 2}``: the
    options ``engines_compare.launchers.start`` takes, from ``--target-flags vllm=...``."""
    if len(flags) % 2 or not all(f.startswith("--") for f in flags[::2]):
        raise ValueError(f"--target-flags: an engine takes '--option value' pairs, got {' '.join(flags)!r}")
    return {k[2:].replace("-", "_"): int(v) if v.isdigit() else v for k, v in zip(flags[::2], flags[1::2])}


def _launch_engine(spec: TargetSpec, opts: TargetOptions) -> tuple[str, Callable[[], None], Any]:
    try:
        from engines_compare import launchers

        handle = launchers.start(step_module(spec.name), model=opts.model, port=free_port(),
                                 **engine_options(opts.engine_flags))
    except ImportError as e:
        raise RuntimeError(f"--target {spec.name}: engine launchers are unavailable ({e}); "
                           "run the engine yourself and pass its URL") from None
    except AttributeError as e:
        raise RuntimeError(f"--target {spec.name}: engines_compare.launchers has no usable start() ({e})") from None
    return handle.url.rstrip("/"), handle.stop, handle


def _step_dtype(dtype: str) -> str:
    """What a step makes of ``--dtype`` here (``auto``: float32 on CPU, bfloat16 on CUDA)."""
    from shared.models import resolve_device, resolve_dtype

    return str(resolve_dtype(dtype, resolve_device("auto"))).removeprefix("torch.")


def _served_scheme(url: str) -> str | None:
    """A step-08 server's weight scheme as its ``/v1/models`` reports it (``int8, bfloat16
    activations``), or None where it reports none."""
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
        entry = httpx.get(url + "/v1/models", timeout=30.0).json()["data"][0]
        if entry.get("quantization") not in (None, "none"):
            group = f" g{entry['quantization_group_size']}" if entry.get("quantization_group_size") else ""
            return f"{entry['quantization']}{group}, {entry.get('dtype', '?')} activations"
    return None


@contextlib.contextmanager
def running(spec: TargetSpec, opts: TargetOptions) -> Iterator[RunningTarget]:
    """Start ``spec`` (unless it is a URL), wait until healthy, yield it, and always stop it."""
    stop: Callable[[], None] = lambda: None  # noqa: E731
    handle: Any = None
    proc = None
    try:
        if spec.kind == "url":
            url = spec.name
        elif spec.kind == "engine":
            url, stop, handle = _launch_engine(spec, opts)
        else:
            port = free_port()
            log = opts.log_dir / f"{spec.name}.log" if opts.log_dir else None
            proc = _spawn(_command(spec, opts, port), log)
            stop = lambda: stop_process(proc)  # noqa: E731
            url = f"http://127.0.0.1:{port}"
        started = proc or getattr(handle, "process", None)
        if opts.priority is not None and started is not None:
            set_priority(started.pid, opts.priority)
        wait_healthy(url, opts.start_timeout_s, proc)
        model_id, version = probe(url)
        if spec.kind == "step":
            version = spec.name
        version = getattr(handle, "version", None) or version or spec.name
        dtype = getattr(handle, "dtype", None) or (_step_dtype(opts.dtype) if spec.kind == "step" else None)
        dtype = _served_scheme(url) or dtype
        yield RunningTarget(spec, url, model_id, str(version), dtype, started.pid if started is not None else None)
    finally:
        stop()
