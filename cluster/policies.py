"""The router's policies: which replica serves a request. Plain code, no Ray, no HTTP.

Central rule: a policy sees the request (its prompt's token ids, ``max_tokens``, headers) and
each replica's load, and names one replica; it never blocks and never fails a request (admission
at the router is a separate, global bound: :class:`Admission`).

* ``round-robin``: replicas in turn; blind to load and to caches.
* ``least-loaded``: the fewest outstanding requests (the router's own count), then the fewest
  waiting in the replica's scheduler, then the lowest KV-cache usage (both from its ``/metrics``).
* ``prefix-affinity``: the router remembers, per replica, the hashes of the prompt blocks it sent
  there (chained block hashes at step 07's block size, as vLLM's prefix cache keys them; bounded,
  least recently routed forgotten first) and sends a request to the replica that has seen the
  longest run of its leading blocks: where that prefix is most likely cached (ties: the least
  loaded of them). A prompt of which no replica has seen at least ``match_threshold`` of the
  blocks (SGLang's cache threshold) goes to the least loaded, which then owns it: a common
  preamble alone does not pull every new prompt to the first replica that saw it. A load guard (SGLang's cache-aware
  router's rule) sends a request to the least loaded replica instead while the load is imbalanced:
  the busiest replica has more than ``abs_threshold`` requests beyond the idlest AND more than
  ``rel_threshold`` times as many.
* ``tiered``: a rule on prompt length and ``max_tokens`` (or the ``X-Stepserve-Tier`` header) picks
  a pool, ``fast`` or ``quality``; a policy inside each pool picks the replica.

Why not hash a fixed number of leading blocks to a home (consistent hashing)? Prompts often
open with the same preamble (a product's instructions) before the part that differs; every
prompt would then share one home. Matching the longest run tells them apart at any depth.

Left out: what each replica really holds (its cache evicts on its own; this router's memory is an
approximation, as SGLang's approximate radix tree is), and prefixes shared across models.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections import OrderedDict
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


def block_hashes(token_ids: Sequence[int], block_size: int, max_blocks: int) -> list[bytes]:
    """One hash per full leading block, each chained to the one before (vLLM's block hashes): equal
    hashes at position k mean equal first k+1 blocks. Stable across processes (not ``hash()``)."""
    hashes: list[bytes] = []
    parent = b""
    for k in range(min(len(token_ids) // block_size, max_blocks)):
        block = ",".join(map(str, token_ids[k * block_size:(k + 1) * block_size])).encode()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        hashes.append(parent)
    return hashes


class PrefixAffinity:
    def __init__(self, block_size: int = 16, max_blocks: int = 128, capacity_blocks: int = 16384,
                 match_threshold: float = 0.5, abs_threshold: int = 4, rel_threshold: float = 2.0) -> None:
        """``max_blocks``: how deep a prompt is looked at; ``capacity_blocks``: how many block hashes
        are remembered per replica (least recently routed forgotten first), about its KV pool;
        ``match_threshold``: the share of the prompt's blocks a replica must have seen to win it."""
        self.block_size, self.max_blocks, self.capacity = block_size, max_blocks, capacity_blocks
        self.match_threshold = match_threshold
        self.abs_threshold, self.rel_threshold = abs_threshold, rel_threshold
        self.seen: dict[str, OrderedDict[bytes, None]] = {}  # replica -> block hashes routed there
        self.num_affine = self.num_balanced = self.num_new = 0  # how each request was routed

    def imbalanced(self, replicas: Sequence[ReplicaLoad]) -> bool:
        lo, hi = min(r.outstanding for r in replicas), max(r.outstanding for r in replicas)
        return hi - lo > self.abs_threshold and hi > self.rel_threshold * lo

    def matched(self, name: str, hashes: Sequence[bytes]) -> int:
        """Leading blocks of the prompt this replica has been sent before."""
        seen = self.seen.get(name, {})
        n = 0
        while n < len(hashes) and hashes[n] in seen:
            n += 1
        return n

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaLoad]) -> str:
        hashes = block_hashes(request.prompt_token_ids, self.block_size, self.max_blocks)
        if not hashes or self.imbalanced(replicas):
            self.num_balanced += 1
            name = LeastLoaded().choose(request, replicas)
        else:
            match = {r.name: self.matched(r.name, hashes) for r in replicas}
            best = max(match.values())
            if best < self.match_threshold * len(hashes):  # nobody has much of it: the least loaded
                self.num_new += 1  # gets it (and keeps it)
                name = LeastLoaded().choose(request, replicas)
            else:
                self.num_affine += 1
                name = LeastLoaded().choose(request, [r for r in replicas if match[r.name] == best])
        self._remember(name, hashes)
        return name

    def _remember(self, name: str, hashes: Sequence[bytes]) -> None:
        seen = self.seen.setdefault(name, OrderedDict())
        for h in hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.capacity:
            seen.popitem(last=False)

    def forget(self, name: str) -> None:
        """The replica restarted (or left): its cache is empty."""
        self.seen.pop(name, None)


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
