"""Where the replicas are: the router asks its discovery on every poll, so replicas may come, go and
move (a replica Ray restarted listens on a new port; a pod Kubernetes rescheduled has a new IP).

Central rule: discovery only names endpoints (name, URL, tier); whether one is ready, and which
model it serves, the router learns from the endpoint itself (``/health``, ``/v1/models``).

* :class:`StaticEndpoints`: a fixed list (``--replica NAME=URL``): a test, or the null server.
* :class:`DnsPools`: one DNS name per tier (``--pool quality=stepserve-quality:8000``), resolved on
  every poll to all its addresses: a Kubernetes headless Service lists the IPs of its ready pods.
* Ray Serve's replicas: :class:`cluster.serve_app.RayEndpoints`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import socket
from typing import Protocol, Sequence

from cluster.policies import TIERS


@dataclasses.dataclass(frozen=True, slots=True)
class Endpoint:
    name: str
    url: str
    tier: str = "quality"
    identity: str = ""  # how it was deployed (step, model, flags): part of the response cache's key


class Discovery(Protocol):
    async def endpoints(self, unreachable: frozenset[str]) -> Sequence[Endpoint]:
        """Every replica now. ``unreachable``: names whose ``/health`` failed at the last poll, which
        a discovery that caches may look up afresh (a restarted replica has a new URL)."""
        ...

    def model_ids(self) -> set[str]:
        """Models deployed but perhaps not ready yet (the router answers 503 for those, not 404);
        empty where discovery cannot know (the router learns a model from the replica's ``/v1/models``)."""
        return set()


class StaticEndpoints(Discovery):
    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self._endpoints = tuple(endpoints)

    async def endpoints(self, unreachable: frozenset[str] = frozenset()) -> Sequence[Endpoint]:
        return self._endpoints


def parse_pair(value: str, flag: str) -> tuple[str, str]:
    """``NAME=VALUE`` (a tier name may prefix the name: ``fast/r0=http://...``)."""
    name, sep, rest = value.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"{flag}: expected NAME=VALUE, got {value!r}")
    return name, rest


def static_from_flags(values: Sequence[str]) -> StaticEndpoints:
    """``--replica [TIER/]NAME=URL``, e.g. ``r0=http://127.0.0.1:8001`` or ``fast/r1=http://...``."""
    found = []
    for value in values:
        name, url = parse_pair(value, "--replica")
        tier, _, _ = name.rpartition("/")
        if tier and tier not in TIERS:
            raise ValueError(f"--replica {value}: the tier must be one of {TIERS}")
        found.append(Endpoint(name, url.rstrip("/"), tier or "quality"))
    return StaticEndpoints(found)


class DnsPools(Discovery):
    def __init__(self, pools: Sequence[str]) -> None:
        """``pools``: ``TIER=HOST:PORT`` each."""
        self.pools: list[tuple[str, str, int]] = []
        for value in pools:
            tier, hostport = parse_pair(value, "--pool")
            host, _, port = hostport.rpartition(":")
            if tier not in TIERS or not host or not port.isdigit():
                raise ValueError(f"--pool {value}: expected TIER=HOST:PORT with TIER in {TIERS}")
            self.pools.append((tier, host, int(port)))

    async def endpoints(self, unreachable: frozenset[str] = frozenset()) -> Sequence[Endpoint]:
        found: list[Endpoint] = []
        for tier, host, port in self.pools:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror as e:
                if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                    continue  # the name has no address (no ready pod yet): an empty pool
                raise  # a resolver hiccup: the router keeps the replicas it knew
            for ip in sorted({info[4][0] for info in infos}):
                netloc = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
                found.append(Endpoint(f"{tier}/{netloc}", f"http://{netloc}", tier))
        return found
