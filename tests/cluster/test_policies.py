"""The router's policies on their own: which replica each request goes to, and why."""
from __future__ import annotations

import collections

import pytest

from cluster.policies import (Admission, LeastLoaded, PrefixAffinity, ReplicaLoad, RoundRobin, RouteRequest,
                              Tiered, TierRule, prefix_key, rendezvous)

TWO = [ReplicaLoad("a"), ReplicaLoad("b")]


def req(ids: list[int], max_tokens: int = 16, **headers: str) -> RouteRequest:
    return RouteRequest(tuple(ids), max_tokens, {k.replace("_", "-"): v for k, v in headers.items()})


def test_round_robin_takes_replicas_in_turn_whatever_their_load() -> None:
    p, loads = RoundRobin(), [ReplicaLoad("a", outstanding=9), ReplicaLoad("b")]
    assert [p.choose(req([1]), loads) for _ in range(4)] == ["a", "b", "a", "b"]


def test_least_loaded_orders_by_outstanding_then_waiting_then_kv_usage() -> None:
    p = LeastLoaded()
    assert p.choose(req([1]), [ReplicaLoad("a", 2), ReplicaLoad("b", 1, num_waiting=5)]) == "b"
    assert p.choose(req([1]), [ReplicaLoad("a", 1, 3), ReplicaLoad("b", 1, 2)]) == "b"
    assert p.choose(req([1]), [ReplicaLoad("a", 1, 2, 0.3), ReplicaLoad("b", 1, 2, 0.9)]) == "a"


def test_prefix_key_covers_only_whole_leading_blocks_and_is_stable() -> None:
    assert prefix_key(list(range(15)), 16, 4) is None  # no full block: nothing to share
    k = prefix_key(list(range(40)), 16, 4)
    assert k == prefix_key(list(range(32)) + [99] * 8, 16, 4)  # same two full blocks, different tail
    assert k != prefix_key([7] + list(range(1, 40)), 16, 4)
    assert prefix_key(list(range(100)), 16, 2) == prefix_key(list(range(32)) + [5] * 68, 16, 2)  # at most 2 blocks


def test_same_prefix_goes_to_the_same_replica_and_prefixes_spread_over_replicas() -> None:
    p = PrefixAffinity(block_size=16, max_blocks=4)
    homes = collections.Counter()
    for doc in range(200):
        prefix = [doc * 1000 + i for i in range(64)]
        first = p.choose(req(prefix + [1, 2, 3]), TWO)
        assert all(p.choose(req(prefix + tail), TWO) == first for tail in ([4], [5, 6], list(range(30))))
        homes[first] += 1
    assert min(homes.values()) > 60, homes  # rendezvous hashing spreads prefixes (~100 each)
    assert p.num_affine == 800 and p.num_balanced == 0


def test_rendezvous_moves_only_the_new_replicas_share_when_one_is_added() -> None:
    keys = [prefix_key([k] * 16, 16, 1) for k in range(300)]
    before = {k: rendezvous(k, ["a", "b"]) for k in keys}
    after = {k: rendezvous(k, ["a", "b", "c"]) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == "c" for k in moved) and 50 < len(moved) < 150


def test_the_load_guard_overrides_affinity_only_while_load_is_imbalanced() -> None:
    p = PrefixAffinity(block_size=4, abs_threshold=4, rel_threshold=2.0)
    ids = list(range(8))
    home = p.choose(req(ids), TWO)
    other = "b" if home == "a" else "a"
    # home has 6 outstanding, the other 1: 5 more (> 4) and 6x (> 2x): imbalanced, go to the other
    busy = [ReplicaLoad(home, 6), ReplicaLoad(other, 1)]
    assert p.imbalanced(busy) and p.choose(req(ids), busy) == other
    # 5 more but only 1.5x (10 vs 15): not imbalanced, stay home
    mild = [ReplicaLoad(home, 15), ReplicaLoad(other, 10)]
    assert not p.imbalanced(mild) and p.choose(req(ids), mild) == home
    assert p.num_balanced == 1 and p.num_affine == 2
    assert p.choose(req([1, 2]), TWO) in ("a", "b") and p.num_balanced == 2  # no full block: least loaded


def test_tiered_routes_short_requests_to_the_fast_pool_and_obeys_the_header() -> None:
    p = Tiered(TierRule(max_fast_prompt_tokens=8, max_fast_output_tokens=32))
    loads = [ReplicaLoad("f1", 3, tier="fast"), ReplicaLoad("f2", 1, tier="fast"), ReplicaLoad("q1", 5)]
    assert p.choose(req([1] * 8, 32), loads) == "f2"  # short: fast pool, its least loaded
    assert p.choose(req([1] * 9, 32), loads) == "q1"  # prompt too long
    assert p.choose(req([1] * 8, 33), loads) == "q1"  # asks for too many tokens
    assert p.choose(req([1] * 100, 500, x_stepserve_tier="fast"), loads) == "f2"
    assert p.choose(req([1], 1, x_stepserve_tier="quality"), loads) == "q1"
    assert p.choose(req([1], 1), [ReplicaLoad("q1")]) == "q1"  # no fast replica alive: the other tier
    assert p.num_routed == {"fast": 2, "quality": 4}
    with pytest.raises(LookupError):
        p.choose(req([1], 1), [ReplicaLoad("zz", tier="other")])


def test_router_admission_is_a_global_bound_that_frees_on_leave() -> None:
    a = Admission(max_in_flight=2)
    assert a.try_enter() and a.try_enter() and not a.try_enter()
    a.leave()
    assert a.try_enter() and (a.in_flight, a.num_refused) == (2, 1)
    with pytest.raises(ValueError):
        Admission(0)
