"""``python -m cluster --step STEP --model M --replicas N``: N replicas of any step on Ray Serve,
behind the router (``/health`` is 200 once every replica is ready).

Local Ray by default (started here, stopped on exit); ``--address`` joins an existing Ray cluster
(``ray start --head`` on one machine, ``ray start --address HEAD:6379`` on the others, or KubeRay),
shipping this repository to its nodes as the job's working directory.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from cluster.cli import RouterConfig, add_router_args, build_router, serve_app
from shared.config import ModelConfig, ServerConfig, from_args
from shared.models import prepare, served_name


def parse(argv: list[str] | None) -> argparse.Namespace:
    from cluster.manager import STEPS

    ap = argparse.ArgumentParser(prog="python -m cluster", description=__doc__.splitlines()[0])
    ap.add_argument("--step", default="step07_paged_kv", choices=STEPS, help="the step every replica runs")
    ap.add_argument("--replicas", type=int, default=2, help="replicas of --step (default: 2)")
    ap.add_argument("--step-args", default="", help="the step's own flags, one string (e.g. '--quantization int4')")
    ap.add_argument("--cpus", type=float, default=None, help="Ray CPUs reserved per replica (default: --threads, "
                    "at least 1; 0 places replicas without counting CPUs)")
    ap.add_argument("--fast-step", default="", help="tiered: a fast pool of this step beside --step's quality pool")
    ap.add_argument("--fast-args", default="", help="tiered: the fast pool's flags (e.g. '--quantization int4')")
    ap.add_argument("--fast-replicas", type=int, default=1, help="tiered: replicas in the fast pool (default: 1)")
    ap.add_argument("--address", default="", help="an existing Ray cluster (ray://host:10001 or host:6379); "
                    "default: start Ray here")
    ap.add_argument("--ray-cpus", type=int, default=0, help="local Ray: logical CPUs (default: this machine's)")
    ap.add_argument("--admin-token", default=os.environ.get("STEPSERVE_ADMIN_TOKEN", ""),
                    help="bearer token for /admin/models (default: $STEPSERVE_ADMIN_TOKEN; empty: admin off)")
    add_router_args(ap)
    ns = ap.parse_args(argv)
    if ns.replicas < 1 or ns.fast_replicas < 1:
        ap.error("--replicas and --fast-replicas must be >= 1")
    if ns.fast_step and ns.fast_step not in STEPS:
        ap.error(f"--fast-step: one of {', '.join(STEPS)}")
    return ns


def start_ray(ns: argparse.Namespace) -> None:
    import ray
    from ray import serve

    from cluster.serve_app import REPO

    if ns.address:  # the nodes get this repository (minus the virtual env and results) as working dir
        ray.init(address=ns.address, logging_level="warning", runtime_env={
            "working_dir": str(REPO), "excludes": [".venv/", ".git/", "engines_compare/results/", "*.log"]})
    else:
        ray.init(num_cpus=ns.ray_cpus or os.cpu_count(), include_dashboard=False, logging_level="warning",
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    model, cfg, server = from_args(ModelConfig, ns), from_args(RouterConfig, ns), from_args(ServerConfig, ns)
    prepare(model)  # convert the bundled GGUF once, here, before replicas race to do it
    start_ray(ns)
    from cluster.app import make_router_app
    from cluster.manager import ModelManager, ModelSpec
    from cluster.serve_app import RayEndpoints

    endpoints = RayEndpoints()
    manager = ModelManager(endpoints, local=not ns.address)
    threads = max(1, model.threads)
    cpus = ns.cpus if ns.cpus is not None else threads
    try:
        name = served_name(model)
        manager.load(ModelSpec(name, model.model, ns.step, ns.replicas, threads, cpus, "quality",
                               tuple(shlex.split(ns.step_args))))
        if ns.fast_step:
            manager.load(ModelSpec(name, model.model, ns.fast_step, ns.fast_replicas, threads, cpus, "fast",
                                   tuple(shlex.split(ns.fast_args))))
        router = build_router(cfg, model, endpoints)
        serve_app(make_router_app(router, manager, ns.admin_token or None), server)
    finally:  # a local Ray goes with its replicas (their step servers die with them); a shared one keeps
        import ray  # running, so this cluster's applications are deleted from it first
        if ns.address:
            for model_id in list(manager.models):
                manager.unload(model_id)
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
