"""The router's settings and its assembly, shared by ``python -m cluster`` (replicas on Ray Serve)
and ``python -m cluster.router`` (replicas given by URL or DNS: Kubernetes, the null server)."""
from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Sequence

import uvicorn
from fastapi import FastAPI

from cluster.cache import ResponseCache
from cluster.discovery import Discovery, DnsPools, static_from_flags
from cluster.policies import (POLICIES, Admission, LeastLoaded, Policy, PrefixAffinity, RoundRobin, Tiered,
                              TierRule)
from cluster.router import Router
from shared.config import ModelConfig, ServerConfig, add_dataclass_args, flag_field, from_args
from shared.models import load_tokenizer


@dataclasses.dataclass(frozen=True, slots=True)
class RouterConfig:
    policy: str = flag_field("prefix-affinity", "where each request goes", choices=POLICIES)
    block_size: int = flag_field(16, "prefix-affinity: tokens per block, as the replicas' --block-size")
    affinity_capacity: int = flag_field(16384, "prefix-affinity: block hashes remembered per replica (about its KV pool)")
    affinity_match: float = flag_field(0.5, "prefix-affinity: share of a prompt's blocks a replica must have seen to win it")
    max_in_flight: int = flag_field(256, "the cluster's bound on requests in flight; beyond it 429 + Retry-After")
    max_fast_prompt_tokens: int = flag_field(256, "tiered: longest prompt the fast pool takes")
    max_fast_output_tokens: int = flag_field(64, "tiered: largest max_tokens the fast pool takes")
    redis_url: str = flag_field("", "response cache on this Redis (redis://host:port/db); empty: no cache")
    cache_ttl: int = flag_field(3600, "seconds a cached response lives")
    poll_interval: float = flag_field(0.5, "seconds between polls of the replicas' /health")


def make_policy(cfg: RouterConfig) -> Policy:
    if cfg.policy == "round-robin":
        return RoundRobin()
    if cfg.policy == "least-loaded":
        return LeastLoaded()
    if cfg.policy == "prefix-affinity":
        return PrefixAffinity(cfg.block_size, capacity_blocks=cfg.affinity_capacity, match_threshold=cfg.affinity_match)
    return Tiered(TierRule(cfg.max_fast_prompt_tokens, cfg.max_fast_output_tokens))


def build_router(cfg: RouterConfig, model: ModelConfig, discovery: Discovery) -> Router:
    """The tokenizer (for the prompt's leading token ids) is the served model's own."""
    if cfg.max_in_flight < 1 or cfg.block_size < 1 or cfg.affinity_capacity < 1:
        raise ValueError("--max-in-flight, --block-size and --affinity-capacity must be >= 1")
    if not 0 <= cfg.affinity_match <= 1:
        raise ValueError("--affinity-match must be in 0..1")
    cache = ResponseCache(cfg.redis_url, cfg.cache_ttl) if cfg.redis_url else None
    return Router(discovery, make_policy(cfg), load_tokenizer(model), Admission(cfg.max_in_flight), cache,
                  poll_s=cfg.poll_interval)


def add_router_args(ap: argparse.ArgumentParser) -> None:
    for cls in (ModelConfig, ServerConfig, RouterConfig):
        add_dataclass_args(ap, cls)


def serve_app(app: FastAPI, server: ServerConfig) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(app, host=server.host, port=server.port, log_level=server.log_level)


def static_main(argv: Sequence[str] | None = None) -> int:
    """``python -m cluster.router``: the router alone, in front of replicas it is told about."""
    from cluster.app import make_router_app

    ap = argparse.ArgumentParser(prog="python -m cluster.router", description=static_main.__doc__)
    ap.add_argument("--replica", action="append", default=[], metavar="[TIER/]NAME=URL",
                    help="a replica by URL, e.g. r0=http://127.0.0.1:8001 or fast/r1=http://...; repeatable")
    ap.add_argument("--pool", action="append", default=[], metavar="TIER=HOST:PORT",
                    help="a DNS name resolved on every poll to the pool's replicas (a Kubernetes headless "
                         "Service), e.g. quality=stepserve-quality:8000; repeatable")
    add_router_args(ap)
    ns = ap.parse_args(argv)
    if bool(ns.replica) == bool(ns.pool):
        ap.error("give --replica URLs or --pool DNS names (one kind)")
    try:
        discovery = static_from_flags(ns.replica) if ns.replica else DnsPools(ns.pool)
        router = build_router(from_args(RouterConfig, ns), from_args(ModelConfig, ns), discovery)
    except ValueError as e:
        ap.error(str(e))
    serve_app(make_router_app(router), from_args(ServerConfig, ns))
    return 0
