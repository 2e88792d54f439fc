"""Replicas as Ray Serve applications: Ray places them, health-checks them and restarts the dead.

Central rule: a replica is any step's own server, unchanged: a Serve deployment (one replica per
application, so the router can address each one) whose constructor starts ``python -m STEP`` as a
child process on a free port and waits for its ``/health``; its ``check_health`` fails as soon as
that process is gone or unhealthy, and Ray Serve then replaces the replica: a new child, on a new
port, which the router learns through :class:`RayEndpoints` on its next poll.

Requests do not flow through Ray: the router streams straight to each replica's own HTTP server
(Ray Serve's proxy and handles would add a hop and re-chunk the stream). Ray does what it is good
at: placement on a cluster's nodes (``num_cpus`` per replica), health checks, restarts, and
deploying or deleting applications at runtime (the model manager, :mod:`cluster.manager`).

Left out: autoscaling replicas on load (Serve can, from ``max_ongoing_requests``; these replicas see
no requests through Serve, so the signal would be their ``/metrics``: on Kubernetes the HPA in
``k8s/`` does it), and GPUs per replica (``ray_actor_options={"num_gpus": 1}`` is the change).
"""
from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import httpx
from ray import serve

from cluster.discovery import Discovery, Endpoint

REPO = Path(__file__).resolve().parent.parent  # on a remote node: Ray's copy of the working dir
START_TIMEOUT_S = 900.0


@dataclasses.dataclass(frozen=True, slots=True)
class ReplicaSpec:
    """One replica's command line: ``python -m {step} --model {model} --served-model-name {id} ...``."""

    id: str  # the model id clients send (``model`` in a request)
    step: str
    model: str
    threads: int = 1
    tier: str = "quality"
    args: tuple[str, ...] = ()  # the step's own flags (``--quantization int4``, ``--max-seqs 8``)
    local: bool = True  # listen on loopback (one machine); else on the node's address, for a Ray cluster

    def command(self, host: str, port: int) -> list[str]:
        return [sys.executable, "-m", self.step, "--model", self.model, "--served-model-name", self.id,
                "--host", host, "--port", str(port), "--threads", str(self.threads), *self.args]

    def identity(self) -> str:
        return " ".join((self.step, self.model, *self.args))


def _die_with_parent() -> None:  # Linux: the step server goes when the replica's process goes
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))  # (a race with another process taking it is possible; a failed start is retried by Serve)
        return s.getsockname()[1]


@serve.deployment(health_check_period_s=2, health_check_timeout_s=10, graceful_shutdown_timeout_s=5,
                  max_ongoing_requests=1000, logging_config={"log_level": "WARNING"})
class StepReplica:
    def __init__(self, spec: ReplicaSpec) -> None:
        self.spec = spec
        host = "127.0.0.1" if spec.local else _node_ip()
        self.port = _free_port()
        self._url = f"http://{host}:{self.port}"
        fd, log = tempfile.mkstemp(prefix=f"stepserve-{spec.id}-", suffix=".log")
        os.close(fd)
        self.log = Path(log)
        started, failed = threading.Event(), []
        # The child is started, and waited for, by a thread that lives as long as the child: Linux's
        # parent-death signal fires when the *thread* that forked it ends.
        threading.Thread(target=self._own_child, args=(spec.command(host, self.port), started, failed),
                         daemon=True).start()
        started.wait()
        if failed:
            raise RuntimeError(f"could not start {spec.step}: {failed[0]}")
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{spec.step} did not start (exit {self.proc.poll()}):\n{self.log_tail()}")
            time.sleep(0.2)

    def _own_child(self, cmd: list[str], started: threading.Event, failed: list[BaseException]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
        try:
            with self.log.open("w") as out:
                self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
                                             preexec_fn=_die_with_parent)
        except BaseException as e:
            failed.append(e)
            return
        finally:
            started.set()
        self.proc.wait()

    def _ready(self) -> bool:
        try:
            return httpx.get(self._url + "/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def url(self) -> str:
        return self._url

    def pid(self) -> int:
        """The step server's process id (a test kills it to play a dead worker)."""
        return self.proc.pid

    def check_health(self) -> None:
        """Ray Serve calls this every 2 s; raising makes it replace this replica."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"the step server exited with {self.proc.returncode}:\n{self.log_tail(1000)}")
        if not self._ready():
            raise RuntimeError("the step server does not answer /health")

    def __del__(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _node_ip() -> str:
    import ray
    return ray.util.get_node_ip_address()


def app_name(spec: ReplicaSpec, index: int) -> str:
    return f"{spec.id}.{spec.tier}.{index}"


class RayEndpoints(Discovery):
    """The router's discovery over Serve applications: each application's replica tells its URL."""

    def __init__(self) -> None:
        self.apps: dict[str, ReplicaSpec] = {}  # application name -> what it runs (the manager keeps it)
        self._handles: dict[str, Any] = {}
        self._urls: dict[str, str] = {}

    def expected(self) -> int:
        return len(self.apps)

    def model_ids(self) -> set[str]:
        """Every model the manager deployed, ready or not."""
        return {s.id for s in self.apps.values()}

    async def endpoints(self, unreachable: frozenset[str] = frozenset()) -> Sequence[Endpoint]:
        """A replica's URL is asked of it once, and again only when the router could not reach it."""
        for app in [a for a in self._urls if a not in self.apps or a in unreachable]:
            del self._urls[app]
        missing = [a for a in self.apps if a not in self._urls]
        for app, url in zip(missing, await asyncio.gather(*(self._url(a) for a in missing))):
            if url:
                self._urls[app] = url
        return [Endpoint(a, self._urls[a], s.tier, s.identity()) for a, s in self.apps.items() if a in self._urls]

    async def _url(self, app: str) -> str | None:
        try:
            if app not in self._handles:  # a blocking call to Serve's controller: off the event loop
                self._handles[app] = await asyncio.to_thread(serve.get_app_handle, app)
            return await asyncio.wait_for(self._handles[app].url.remote(), timeout=1.0)
        except asyncio.TimeoutError:  # still starting, or restarting: ask again next time
            return None
        except Exception:  # not deployed yet, or deleted: a fresh handle next time
            self._handles.pop(app, None)
            return None
