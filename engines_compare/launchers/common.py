"""Process plumbing shared by the launchers: the launch spec, the running-engine handle, start and
wait, and directories that appear complete or not at all.

Leaves out: restarts, health monitoring after start-up, remote hosts (a launcher only ever binds
127.0.0.1; engines elsewhere are reached by URL).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

HOST = "127.0.0.1"


class LauncherError(RuntimeError):
    """Base class: every launcher failure says what to do next."""


class EngineNotInstalled(LauncherError):
    """The one-time setup (build or install) has not been done; the message names its command."""


class EngineUnavailable(LauncherError):
    """The engine cannot run on this kind of machine (it needs a GPU or Docker)."""


class EngineStartError(LauncherError):
    """The engine process died or never answered; the message carries its log tail."""


@dataclasses.dataclass(frozen=True, slots=True)
class LaunchSpec:
    """Everything needed to start one engine process: no side effects until :func:`launch`."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]  # added on top of os.environ
    port: int
    version: str = ""
    notes: str = ""
    dtype: str = ""  # what the weights run in, for reports ("float32", "Q4_K_M")
    ready_timeout_s: float = 120.0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def shell(self) -> str:
        """The command as one line a person can paste into a shell."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"{env} {shlex.join(self.argv)}" if env else shlex.join(self.argv)


@dataclasses.dataclass(slots=True)
class EngineHandle:
    """A running engine. ``stop()`` ends its whole process group (vLLM forks workers)."""

    name: str
    url: str
    version: str
    notes: str
    log_path: Path
    startup_s: float
    process: subprocess.Popen[bytes]
    dtype: str = ""

    def stop(self, timeout_s: float = 30.0) -> None:
        stop_process_group(self.process, timeout_s)

    def __enter__(self) -> EngineHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def launch(spec: LaunchSpec, log_path: Path) -> EngineHandle:
    """Start ``spec`` in its own session, logging to ``log_path``, and wait until it serves."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(list(spec.argv), env={**os.environ, **spec.env}, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_ready(proc, spec, log_path)
    except BaseException:
        stop_process_group(proc, 10.0)
        raise
    return EngineHandle(name=spec.name, url=spec.url, version=spec.version, notes=spec.notes,
                        log_path=log_path, startup_s=time.monotonic() - t0, process=proc, dtype=spec.dtype)


def wait_ready(proc: subprocess.Popen[bytes], spec: LaunchSpec, log_path: Path) -> None:
    """Poll ``GET /v1/models`` until it answers 200 with a model list (the model is loaded)."""
    deadline = time.monotonic() + spec.ready_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EngineStartError(f"{spec.name} exited with code {proc.returncode} before it "
                                   f"answered; last lines of {log_path}:\n{log_tail(log_path)}")
        if models_ready(spec.url):
            return
        time.sleep(0.5)
    raise EngineStartError(f"{spec.name} did not answer GET {spec.url}/v1/models within "
                           f"{spec.ready_timeout_s:.0f} s; last lines of {log_path}:\n{log_tail(log_path)}")


def models_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=2.0) as resp:
            body = json.loads(resp.read())
    except (OSError, ValueError):  # refused, 503 while loading, reset, half-written JSON
        return False
    return bool(body.get("data"))


def stop_process_group(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM the group ``proc`` leads (started with a new session), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(text.splitlines()[-lines:])


def run_logged(argv: list[str], log_path: Path, cwd: Path | None = None,
               env: Mapping[str, str] | None = None) -> None:
    """Run a setup command, appending its output to ``log_path``; raise with the tail on failure."""
    with open(log_path, "ab") as log:
        log.write(f"\n$ {shlex.join(argv)}\n".encode())
        log.flush()
        rc = subprocess.call(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, **(env or {})})
    if rc != 0:
        raise LauncherError(f"command failed (exit {rc}): {shlex.join(argv)}\n"
                            f"last lines of {log_path}:\n{log_tail(log_path)}")


_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


def temp_dir_for(final: Path, pid: int | None = None) -> Path:
    """The staging name for ``final``: hidden, and tagged with the pid of the process filling it."""
    return final.with_name(f".{final.name}.{os.getpid() if pid is None else pid}.tmp")


def remove_stale_temp_dirs(final: Path) -> list[Path]:
    """Delete staging dirs for ``final`` left by processes that no longer run (a killed build)."""
    removed = []
    if not final.parent.is_dir():
        return removed
    for entry in final.parent.iterdir():
        m = _TMP_RE.match(entry.name)
        if m and m["name"] == final.name and not pid_alive(int(m["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty staging dir; when the block succeeds it becomes ``final`` in one rename.

    A failure (or a kill) leaves no ``final``: only a hidden staging dir, removed on failure here
    and, after a kill, by the next :func:`remove_stale_temp_dirs`.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(final)
    tmp = temp_dir_for(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # a previous build being replaced (os.replace refuses a non-empty dir)
        shutil.rmtree(final)
    os.replace(tmp, final)
