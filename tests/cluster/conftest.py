"""A real Redis for the cluster's tests (Debian's ``redis-server``, installed where missing and
possible), on a free loopback port, in a temporary folder, always stopped."""
from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
import redis

from tests.conftest import free_port
from engines_compare.targets import stop_process
from tests.helpers import apt_binary


@contextlib.contextmanager
def running_redis(tmp: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """(URL, process) of a fresh ``redis-server``: no persistence, loopback only."""
    binary = apt_binary("redis-server", "redis-server")
    port = free_port()
    log = (tmp / "redis.log").open("w")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (tmp / "redis.log").read_text()[-2000:]
            try:
                redis.Redis(port=port, socket_timeout=1).ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not answer PING"
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        stop_process(proc, 10.0)
        log.close()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_redis(tmp_path_factory.mktemp("redis")) as (url, _):
        yield url
