"""cluster/k8s validated offline: no Kubernetes here, so the manifests are checked against the
Kubernetes OpenAPI schemas (kubernetes-validate, strict: an unknown or misspelt field fails), against
each other (kustomization, Services and Deployments, HPAs, the adapter rule) and against the code
(the modules the commands run, the flags they pass, the metric the replicas expose).

Nothing here starts a server or imports torch: the flags and the metric names are read from the
steps' sources with ``ast``.
"""
from __future__ import annotations

import ast
import copy
import shutil
import subprocess
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from tests.cluster.k8s_manifests import (ALL, DOCS, K8S, KUBERNETES_VERSION, KUSTOMIZATION, MANIFESTS, NAMESPACE,
                                         ROOT, TIERS, containers, load, module_and_flags, of_kind,
                                         replica_deployments, router)




def test_the_schema_version_is_one_kubernetes_validate_ships() -> None:
    assert KUBERNETES_VERSION in all_versions()


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_document_validates_strictly_against_the_kubernetes_schema(name: str) -> None:
    assert DOCS[name], f"{name} holds no document"
    errors = []
    for doc in DOCS[name]:
        try:
            used = kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {e.message} at {'.'.join(map(str, e.path))}")
            continue
        assert used == "1.37"
    assert errors == []


def test_strict_validation_rejects_an_unknown_field_and_a_wrong_type() -> None:
    """The check above can fail: a misspelt field and a string where an integer belongs are caught."""
    deployment = copy.deepcopy(next(iter(replica_deployments().values())))
    containers(deployment)[0]["readinesProbe"] = containers(deployment)[0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    hpa = copy.deepcopy(next(iter(of_kind("HorizontalPodAutoscaler").values())))
    hpa["spec"]["maxReplicas"] = "eight"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, KUBERNETES_VERSION, strict=True)


def test_every_object_lives_in_the_stepserve_namespace() -> None:
    assert set(of_kind("Namespace")) == {NAMESPACE}
    outside = [f"{d['kind']}/{d['metadata']['name']}" for d in ALL
               if d["kind"] != "Namespace" and d["metadata"].get("namespace") != NAMESPACE]
    assert outside == []


# ---- kustomization --------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_and_only_existing_files() -> None:
    (kustomization,) = load(KUSTOMIZATION)
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources)), "a resource is listed twice"
    missing = [r for r in resources if not (K8S / r).is_file()]
    assert missing == []
    assert sorted(resources) == MANIFESTS  # every manifest file is applied by `kubectl apply -k`
    assert kustomization.get("namespace", NAMESPACE) == NAMESPACE


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl (its kustomize renders offline)")
def test_kustomize_renders_exactly_the_manifests_objects() -> None:
    """What `kubectl apply -k cluster/k8s` would send: rendered offline, no cluster needed."""
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d is not None]
    key = lambda d: (d["kind"], d["metadata"]["name"], d["metadata"].get("namespace"))  # noqa: E731
    assert sorted(map(key, rendered)) == sorted(map(key, ALL))
    assert sorted(rendered, key=key) == sorted(ALL, key=key)  # kustomize changed nothing (no prefixes, labels)


# ---- probes and resources -------------------------------------------------------------------------


def test_replica_deployments_are_ready_on_ready_and_alive_on_health() -> None:
    replicas = replica_deployments()
    assert {d["spec"]["template"]["metadata"]["labels"]["stepserve/tier"] for d in replicas.values()} == set(TIERS)
    for name, deployment in replicas.items():
        (container,) = containers(deployment)
        ports = {p["containerPort"] for p in container["ports"]}
        for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
            get = container[probe]["httpGet"]
            assert get["path"] == path, f"{name}: {probe}"
            assert get["port"] in ports | {p.get("name") for p in container["ports"]}, f"{name}: {probe}"
        # liveness may not kill a pod that is still loading its model (~60 s at worst)
        live = container["livenessProbe"]
        startup = container.get("startupProbe", {})
        patience = max(
            live.get("initialDelaySeconds", 0) + live.get("periodSeconds", 10) * live.get("failureThreshold", 3),
            startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3))
        assert patience >= 60, f"{name}: {patience} s before a loading pod is restarted"
        assert container["readinessProbe"].get("periodSeconds") == 2, name


def test_every_container_requests_cpu_and_memory() -> None:
    deployments = of_kind("Deployment")
    assert len(deployments) == 1 + len(TIERS)
    for name, deployment in deployments.items():
        for container in containers(deployment):
            requests = container.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= set(requests), f"{name}/{container['name']}: requests {requests}"
            assert "memory" in container["resources"].get("limits", {}), f"{name}/{container['name']}"


def test_replicas_use_as_many_threads_as_cpus_requested() -> None:
    for name, deployment in replica_deployments().items():
        (container,) = containers(deployment)
        flags = dict(module_and_flags(container["command"])[1])
        assert flags["--threads"] == str(container["resources"]["requests"]["cpu"]), name


def test_replica_pods_are_annotated_for_prometheus_scraping() -> None:
    for name, deployment in replica_deployments().items():
        annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
        (container,) = containers(deployment)
        assert annotations.get("prometheus.io/scrape") == "true", name
        assert annotations.get("prometheus.io/path") == "/metrics", name
        assert int(annotations["prometheus.io/port"]) in {p["containerPort"] for p in container["ports"]}, name


# ---- autoscaling ----------------------------------------------------------------------------------


def waiting_metric(hpa: dict[str, Any]) -> str:
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert len(names) == 1, hpa["metadata"]["name"]
    return names[0]


def test_each_hpa_scales_a_deployment_here_on_waiting_requests_per_pod() -> None:
    hpas, deployments = of_kind("HorizontalPodAutoscaler"), of_kind("Deployment")
    targets = []
    for name, hpa in hpas.items():
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment"), name
        assert ref["name"] in deployments, f"{name} scales {ref['name']}, which no manifest defines"
        targets.append(ref["name"])
        assert "num_requests_waiting" in waiting_metric(hpa), name
        (metric,) = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "2"}, name
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 8), name
        assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300, name
    assert sorted(targets) == sorted(replica_deployments())  # each tier once, the router never
    for name in targets:  # the HPA owns the count: a `replicas:` would be reset by each apply
        assert "replicas" not in deployments[name]["spec"], name


def vllm_series() -> frozenset[str]:
    """step05_observability.metrics.VLLM_SERIES, read from the source (importing it imports torch)."""
    tree = ast.parse((ROOT / "step05_observability" / "metrics.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "VLLM_SERIES" for t in node.targets):
            return frozenset(ast.literal_eval(node.value.args[0]))
    raise AssertionError("VLLM_SERIES not found in step05_observability/metrics.py")


def test_adapter_rule_serves_the_replicas_waiting_gauge_as_the_hpa_metric() -> None:
    (configmap,) = DOCS["prometheus-adapter-rule.yaml"]
    values = yaml.safe_load(configmap["data"]["values.yaml"])
    rules = values["rules"]["custom"]
    hpa_metrics = {waiting_metric(h) for h in of_kind("HorizontalPodAutoscaler").values()}
    assert len(hpa_metrics) == 1
    (rule,) = [r for r in rules if r["name"]["as"] in hpa_metrics]
    assert rule["seriesQuery"].startswith("vllm:num_requests_waiting{")
    assert rule["name"]["matches"] == "^vllm:num_requests_waiting$"
    assert ":" not in rule["name"]["as"]  # a Kubernetes metric name holds no colon
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
    # the replicas expose that series: vLLM's name for one of step 05's gauges, under --metrics-namespace vllm
    assert "num_requests_waiting" in vllm_series()
    for name, deployment in replica_deployments().items():
        flags = dict(module_and_flags(containers(deployment)[0]["command"])[1])
        assert flags.get("--metrics-namespace") == "vllm", name


# ---- router, services, pods -----------------------------------------------------------------------


def test_router_pools_are_the_headless_services_of_their_tiers() -> None:
    (container,) = containers(router())
    _, flags = module_and_flags(container["command"])
    pools = dict(value.split("=", 1) for flag, value in flags if flag == "--pool")
    assert sorted(pools) == sorted(TIERS)
    services, replicas = of_kind("Service"), replica_deployments()
    for tier, address in pools.items():
        host, port = address.rsplit(":", 1)
        service = services.get(host)
        assert service is not None, f"pool {tier}: no Service named {host}"
        assert service["spec"].get("clusterIP") == "None", f"{host} is not headless"
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}, f"{host}: no port {port}"
        # headless DNS gives pod IPs, so the router connects to the container's own port
        selected = [name for name, d in replicas.items()
                    if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, f"{host} selects {selected}"
        deployment = replicas[selected[0]]
        assert deployment["spec"]["template"]["metadata"]["labels"]["stepserve/tier"] == tier
        assert int(port) in {p["containerPort"] for p in containers(deployment)[0]["ports"]}
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert flags.count(("--policy", "tiered")) == 1


def test_router_service_fronts_the_router_pods() -> None:
    service = of_kind("Service")["stepserve-router"]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert [p["port"] for p in service["spec"]["ports"]] == [8000]
    labels = router()["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert router()["spec"]["replicas"] == 2


# ---- the commands name real modules and flags -----------------------------------------------------
