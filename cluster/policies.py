"""The router's policies: which replica serves a request. Plain code, no Ray, no HTTP.

Central rule: a policy sees the request (its prompt's token ids, ``max_tokens``, headers) and
each replica's load, and names one replica; it never blocks and never fails a request (admission
at the router is a separate, global bound: :class:`Admission`).

* ``round-robin``: replicas in turn; blind to load and to caches.
* ``least-loaded``: the fewest outstanding requests (the router's own count), then the fewest
  waiting in the replica's scheduler, then the lowest KV-cache usage (both from its ``/metrics``).
* ``prefix-affinity``: the prompt's leading full blocks (step 07's block size) are hashed to a home
  replica by rendezvous hashing, so requests sharing a prefix land where that prefix is cached, and
  adding a replica moves only its share of prefixes. A load guard (SGLang's cache-aware router's
  rule) sends a request to the least loaded replica instead while the load is imbalanced: the
  busiest replica has more than ``abs_threshold`` requests beyond the idlest AND more than
  ``rel_threshold`` times as many.
* ``tiered``: a rule on prompt length and ``max_tokens`` (or the ``X-Stepserve-Tier`` header) picks
  a pool, ``fast`` or ``quality``; a policy inside each pool picks the replica.

Left out: a radix tree of what each replica has really cached (SGLang's approximate tree); this
router remembers nothing per prefix, it recomputes the home from the hash.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
from typing import Mapping, Protocol, Sequence

TIER_HEADER = "x-stepserve-tier"
TIERS = ("fast", "quality")


@dataclasses.dataclass(frozen=True, slots=True)
class ReplicaLoad:
    name: str
    outstanding: int = 0  # requests the router has sent it and not yet seen end
    num_waiting: int = 0  # its scheduler's waiting requests (its /metrics)
    kv_usage: float = 0.0  # its KV cache usage, 0..1 (its /metrics)
    tier: str = "quality"  # its pool, for ``tiered``

    @property
    def key(self) -> tuple[int, int, float]:
        return self.outstanding, self.num_waiting, self.kv_usage


@dataclasses.dataclass(frozen=True, slots=True)
class RouteRequest:
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)  # lower-case names


class Policy(Protocol):
    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaLoad]) -> str: ...


class RoundRobin:
    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaLoad]) -> str:
        return replicas[next(self._turn) % len(replicas)].name


class LeastLoaded:
    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaLoad]) -> str:
        return min(replicas, key=lambda r: r.key).name


def prefix_key(token_ids: Sequence[int], block_size: int, max_blocks: int) -> bytes | None:
    """A digest of the prompt's first ``max_blocks`` full blocks; None when it has no full block
    (nothing a replica could cache for it). Stable across processes (not Python's salted hash)."""
    n = min(len(token_ids) // block_size, max_blocks) * block_size
    if n == 0:
        return None
    return hashlib.blake2b(",".join(map(str, token_ids[:n])).encode(), digest_size=16).digest()


def rendezvous(key: bytes, names: Sequence[str]) -> str:
    """Highest random weight: each (key, replica) pair gets a score; the highest wins."""
    return max(names, key=lambda name: hashlib.blake2b(key + name.encode(), digest_size=8).digest())


class PrefixAffinity:
    def __init__(self, block_size: int = 16, max_blocks: int = 4, abs_threshold: int = 4,
                 rel_threshold: float = 2.0) -> None:
        """``max_blocks``: how many leading blocks decide the home (requests that share them share
        a home; the rest of the prompt may differ)."""
        self.block_size, self.max_blocks = block_size, max_blocks
        self.abs_threshold, self.rel_threshold = abs_threshold, rel_threshold
        self.num_affine = self.num_balanced = 0  # how each request was routed

    def imbalanced(self, replicas: Sequence[ReplicaLoad]) -> bool:
        lo, hi = min(r.outstanding for r in replicas), max(r.outstanding for r in replicas)
        return hi - lo > self.abs_threshold and hi > self.rel_threshold * lo

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaLoad]) -> str:
        key = prefix_key(request.prompt_token_ids, self.block_size, self.max_blocks)
        if key is None or self.imbalanced(replicas):
            self.num_balanced += 1
            return LeastLoaded().choose(request, replicas)
        self.num_affine += 1
        return rendezvous(key, [r.name for r in replicas])


@dataclasses.dataclass(frozen=True, slots=True)
class TierRule:
    """A request goes to the ``fast`` pool if its prompt and its ``max_tokens`` are both short,
    else to ``quality``; the header ``X-Stepserve-Tier: fast|quality`` overrides the rule."""

    max_fast_prompt_tokens: int = 256
    max_fast_output_tokens: int = 64

    def tier(self, request: RouteRequest) -> str:
        asked = request.headers.get(TIER_HEADER, "").strip().lower()
        if asked in TIERS:
            return asked
        short = (len(request.prompt_token_ids) <= self.max_fast_prompt_tokens
                 and request.max_tokens <= self.max_fast_output_tokens)
        return "fast" if short else "quality"


class Tiered:
    def __init__(self, rule: TierRule = TierRule(), inner: Mapping[str, Policy] | None = None) -> None:
        """Each replica's pool is its ``tier`` (a replica is deployed into one). ``inner``: each
        pool's policy (default least-loaded). A tier with no live replica falls back to the other."""
        self.rule = rule
        self.inner = dict(inner or {t: LeastLoaded() for t in TIERS})
        self.num_routed = {t: 0 for t in TIERS}

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaLoad]) -> str:
        tier = self.rule.tier(request)
        for t in (tier, *(t for t in TIERS if t != tier)):
            members = [r for r in replicas if r.tier == t]
            if members:
                self.num_routed[t] += 1
                return self.inner[t].choose(request, members)
        raise LookupError("no replica in any tier")


class Admission:
    """The router's global bound: at most ``max_in_flight`` requests across all replicas; beyond
    it the router answers 429 with ``Retry-After`` itself, so the cluster sheds load before any
    replica queues. Event loop only."""

    def __init__(self, max_in_flight: int, retry_after_s: int = 1) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.max_in_flight, self.retry_after_s = max_in_flight, retry_after_s
        self.in_flight = self.num_refused = 0

    def try_enter(self) -> bool:
        if self.in_flight >= self.max_in_flight:
            self.num_refused += 1
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)


POLICIES = ("round-robin", "least-loaded", "prefix-affinity", "tiered")
