"""The manifests of cluster/k8s, loaded once, and the lookups the k8s tests share."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "cluster" / "k8s"
KUBERNETES_VERSION = "1.37.0"  # the newest schemas kubernetes-validate 1.37.0 ships
NAMESPACE = "stepserve"
KUSTOMIZATION = "kustomization.yaml"  # kustomize's own file, not a Kubernetes object: no schema
MANIFESTS = sorted(p.name for p in K8S.glob("*.yaml") if p.name != KUSTOMIZATION)
TIERS = ("quality", "fast")


def load(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]


DOCS = {name: load(name) for name in MANIFESTS}
ALL = [d for docs in DOCS.values() for d in docs]


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in ALL if d["kind"] == kind}


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    return deployment["spec"]["template"]["spec"]["containers"]


def module_and_flags(command: list[str]) -> tuple[str, list[tuple[str, str | None]]]:
    """``python -m X --a 1 --b 2`` -> ("X", [("--a", "1"), ("--b", "2")]); repeated flags kept."""
    assert command[:2] == ["python", "-m"], command
    module, rest, flags = command[2], command[3:], []
    i = 0
    while i < len(rest):
        assert rest[i].startswith("--"), f"{module}: {rest[i]!r} is not a flag"
        value = rest[i + 1] if i + 1 < len(rest) and not rest[i + 1].startswith("--") else None
        flags.append((rest[i], value))
        i += 1 if value is None else 2
    return module, flags


def replica_deployments() -> dict[str, dict[str, Any]]:
    return {name: d for name, d in of_kind("Deployment").items()
            if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "replica"}


def router() -> dict[str, Any]:
    routers = [d for d in of_kind("Deployment").values()
               if module_and_flags(containers(d)[0]["command"])[0] == "cluster.router"]
    assert len(routers) == 1
    return routers[0]


# ---- schema ---------------------------------------------------------------------------------------
