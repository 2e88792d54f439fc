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
import importlib.util
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

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


def commands() -> list[list[str]]:
    return [c["command"] for d in of_kind("Deployment").values() for c in containers(d)]


@pytest.mark.parametrize("command", commands(), ids=lambda c: c[2])
def test_each_command_runs_a_real_module(command: list[str]) -> None:
    module, _ = module_and_flags(command)
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"python -m {module}: no such module"
    if spec.submodule_search_locations is not None:  # a package runs its __main__
        assert any((Path(p) / "__main__.py").is_file() for p in spec.submodule_search_locations), module


def _module_file(dotted: str) -> Path:
    path = ROOT / Path(*dotted.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _literal(node: ast.expr, constants: dict[str, ast.expr]) -> Any:
    """A tuple of strings, with ``*NAME`` of a module-level tuple spliced in (``("auto", *SCHEMES)``)."""
    if isinstance(node, (ast.Tuple, ast.List)):
        out: list[Any] = []
        for e in node.elts:
            out.extend(_literal(e.value, constants) if isinstance(e, ast.Starred) else [_literal(e, constants)])
        return tuple(out)
    if isinstance(node, ast.Name):
        return _literal(constants[node.id], constants)
    return ast.literal_eval(node)


def _config_fields(module: str, cls: str) -> dict[str, tuple[str, tuple[str, ...] | None]]:
    """``cls``'s flag fields in ``module``: name -> (annotation, choices or None)."""
    tree = ast.parse(_module_file(module).read_text())
    constants = {t.id: n.value for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                 if isinstance(t, ast.Name)}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            fields = {}
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.value, ast.Call) \
                        and getattr(item.value.func, "id", None) == "flag_field":
                    choices = next((_literal(k.value, constants) for k in item.value.keywords
                                    if k.arg == "choices"), None)
                    fields[item.target.id] = (ast.unparse(item.annotation), choices)
            return fields
    # re-exported: follow the module's own import of the name
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any(a.name == cls for a in node.names):
            return _config_fields(node.module, cls)
    raise AssertionError(f"{cls} not found in {module}")


def step_flags(step: str) -> dict[str, tuple[str, tuple[str, ...] | None]]:
    """Every ``--flag`` of ``python -m <step>``: ModelConfig's and ServerConfig's (shared/config.py,
    always added by build_parser) and those of the config classes its __main__ passes to run_step."""
    main = ROOT / step / "__main__.py"
    assert main.is_file(), f"python -m {step}: no {step}/__main__.py"
    tree = ast.parse(main.read_text())
    imports = {a.asname or a.name: n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "run_step"]
    assert len(calls) == 1, f"{step}/__main__.py: run_step called {len(calls)} times"
    classes = [("shared.config", "ModelConfig"), ("shared.config", "ServerConfig")]
    classes += [(imports[a.id], a.id) for a in calls[0].args[3:] if isinstance(a, ast.Name)]
    assert len(classes) > 2, f"{step}: no config classes passed to run_step"
    flags = {}
    for module, cls in classes:
        flags.update({"--" + name.replace("_", "-"): info for name, info in _config_fields(module, cls).items()})
    return flags


def test_step_commands_pass_only_flags_the_step_defines_with_valid_values() -> None:
    checked = 0
    for name, deployment in replica_deployments().items():
        module, flags = module_and_flags(containers(deployment)[0]["command"])
        known = step_flags(module)
        for flag, value in flags:
            assert flag in known, f"{name}: python -m {module} has no {flag}"
            kind, choices = known[flag]
            assert value is not None or kind == "bool", f"{name}: {flag} needs a value"
            if choices is not None:
                assert value in choices, f"{name}: {flag} {value} not in {choices}"
            if kind in ("int", "float"):
                {"int": int, "float": float}[kind](value)  # raises if it would not parse
            checked += 1
    assert checked >= 10


def test_flag_reader_rejects_a_flag_the_step_lacks() -> None:
    """The check above can fail: step 07 has no --quantization (step 08 adds it), int4 is a step 08 scheme."""
    assert "--quantization" not in step_flags("step07_paged_kv")
    assert "int4" in step_flags("step08_quant")["--quantization"][1]
    assert "bogus" not in step_flags("step08_quant")["--quantization"][1]
    assert step_flags("step07_paged_kv")["--threads"][0] == "int"
