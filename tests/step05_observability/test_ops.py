"""Step 05's ops files: the Grafana dashboard reads only metrics step 05 exposes; the configs parse."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from step04_kvcache.engine import EngineStats
from step05_observability.metrics import EngineMetrics, new_registry
from tests.step05_observability.promql import metric_names

OPS = Path(__file__).resolve().parents[2] / "step05_observability" / "ops"
DASHBOARD = OPS / "grafana" / "dashboards" / "stepserve.json"


def exposed_names() -> set[str]:
    """Every sample name step 05's registry exposes (histograms' _bucket/_sum/_count, counters' _total)."""
    metrics = EngineMetrics(new_registry())  # as step 05's __main__ assembles it
    metrics.bind_gauges(lambda: EngineStats(0, 0, None, {}))  # a loading engine: every series exists at 0
    text = generate_latest(metrics.registry).decode()
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def test_promql_names_are_found_and_functions_labels_ranges_are_not() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, phase) (rate(a:b_bucket{phase="x"}[$__rate_interval]))) '
            "/ on (job) c_total offset 5m + process_resident_memory_bytes / 2^30")
    assert metric_names(expr) == {"a:b_bucket", "c_total", "process_resident_memory_bytes"}


def test_every_dashboard_query_names_only_exposed_metrics() -> None:
    exposed = exposed_names()
    assert "stepserve:time_to_first_token_seconds_bucket" in exposed and "stepserve:prompt_tokens_total" in exposed
    exprs = dashboard_exprs()
    assert len(exprs) >= 12
    used: set[str] = set()
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr}"
        assert names <= exposed, f"{title}: {sorted(names - exposed)} not exposed by step 05"
        used |= names
    for required in ("generation_tokens_total", "request_success_total", "num_requests_running",
                     "num_requests_waiting", "kv_cache_usage_perc", "time_to_first_token_seconds_bucket",
                     "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_bucket",
                     "request_queue_time_seconds_bucket", "engine_step_time_seconds_bucket", "step_batch_size_sum"):
        assert "stepserve:" + required in used, f"the dashboard shows no {required}"


def test_dashboard_panels_are_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] and dash["templating"]["list"][0]["type"] == "datasource"
    for p in dash["panels"]:
        assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]


def test_compose_and_provisioning_point_at_shipped_files() -> None:
    compose = yaml.safe_load((OPS / "docker-compose.yml").read_text())
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            assert (OPS / volume.split(":")[0]).exists(), volume
    scrape = yaml.safe_load((OPS / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["metrics_path"] == "/metrics" and scrape["static_configs"][0]["targets"]
    source = yaml.safe_load((OPS / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert source["type"] == "prometheus"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_accepts_the_scrape_config() -> None:
    r = subprocess.run(["promtool", "check", "config", str(OPS / "prometheus.yml")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
