"""The router's policies on their own: which replica each request goes to, and why."""
from __future__ import annotations

import pytest

from cluster.policies import (Admission, LeastLoaded, PrefixAffinity, ReplicaLoad, RoundRobin, RouteRequest,
                              Tiered, TierRule, block_hashes)

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


def test_block_hashes_chain_whole_leading_blocks_and_are_stable() -> None:
    assert block_hashes(list(range(15)), 16, 4) == []  # no full block: nothing to share
    h = block_hashes(list(range(40)), 16, 4)
    assert len(h) == 2 and h == block_hashes(list(range(32)) + [99] * 8, 16, 4)  # same two blocks, other tail
    other = block_hashes([7] + list(range(1, 40)), 16, 4)
    assert other[0] != h[0] and other[1] != h[1]  # chained: a different first block changes every hash after it
    assert len(block_hashes(list(range(100)), 16, 2)) == 2  # at most max_blocks


def test_a_prefix_stays_with_the_replica_that_saw_it_and_new_prefixes_go_to_the_least_loaded() -> None:
    p = PrefixAffinity(block_size=16)
    preamble = list(range(1000, 1048))  # three blocks every prompt opens with
    docs = [preamble + [d * 100 + i for i in range(64)] for d in range(6)]
    loads = {"a": 0, "b": 0}
    homes = {}
    for d, doc in enumerate(docs):  # each new document goes to the least loaded, which then has one more
        home = p.choose(req(doc + [1]), [ReplicaLoad(n, o) for n, o in loads.items()])
        loads[home] += 1
        homes[d] = home
    assert sorted(homes.values()) == ["a"] * 3 + ["b"] * 3  # the shared preamble did not pull them together
    assert p.num_new == 6 and p.num_affine == 0  # 3 of 7 blocks seen (the preamble) is under half: new
    for d, doc in enumerate(docs):  # later requests find their document's replica, whatever the load
        for tail in ([4], [5, 6], list(range(30))):
            assert p.choose(req(doc + tail), [ReplicaLoad("a", 2), ReplicaLoad("b", 0)]) == homes[d]
    assert p.matched(homes[0], block_hashes(docs[0], 16, 128)) == 7  # 3 preamble + 4 document blocks


def test_a_replica_forgets_the_least_recently_routed_blocks_and_everything_when_restarted() -> None:
    p = PrefixAffinity(block_size=4, capacity_blocks=4)
    p.choose(req(list(range(8))), TWO)  # two blocks on the least loaded (a, by order)
    assert p.matched("a", block_hashes(list(range(8)), 4, 128)) == 2
    p.choose(req(list(range(100, 112))), [ReplicaLoad("a"), ReplicaLoad("b", 1)])  # three more on a: 5 > 4
    assert p.matched("a", block_hashes(list(range(8)), 4, 128)) == 0  # the oldest went first
    assert p.matched("a", block_hashes(list(range(100, 112)), 4, 128)) == 3
    p.forget("a")
    assert p.matched("a", block_hashes(list(range(100, 112)), 4, 128)) == 0


def test_the_load_guard_overrides_affinity_only_while_load_is_imbalanced() -> None:
    p = PrefixAffinity(block_size=4, abs_threshold=4, rel_threshold=2.0)
    ids, more = list(range(8)), list(range(50, 58))
    home = p.choose(req(ids), TWO)
    other = "b" if home == "a" else "a"
    # home has 6 outstanding, the other 1: 5 more (> 4) and 6x (> 2x): imbalanced, go to the other
    busy = [ReplicaLoad(home, 6), ReplicaLoad(other, 1)]
    assert p.imbalanced(busy) and p.choose(req(ids), busy) == other
    # 5 more but only 1.5x (10 vs 15): not imbalanced, stay home
    home2 = p.choose(req(more), TWO)
    mild = [ReplicaLoad(home2, 15), ReplicaLoad("b" if home2 == "a" else "a", 10)]
    assert not p.imbalanced(mild) and p.choose(req(more), mild) == home2
    assert (p.num_new, p.num_balanced, p.num_affine) == (2, 1, 1)
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
