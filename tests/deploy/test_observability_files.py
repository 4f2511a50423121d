"""The Grafana dashboard and the Prometheus rules read only metrics that exist: every metric name in
their PromQL is one the services export (the catalogue of pipeline/core/observability.py and
prometheus_client's process collector), a recording rule of deploy/prometheus/rules.yml, or a
series Prometheus (or kube-state-metrics, for one Kubernetes-only alert) makes itself. Every alert
is documented and unit-tested; the Grafana provisioning files load the dashboards."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, ProcessCollector

from pipeline.core.observability import Metrics
from tests.conftest import REPO
from tests.deploy.promql import label_values_metric, metric_names

RULES = REPO / "deploy" / "prometheus" / "rules.yml"
RULES_TEST = REPO / "deploy" / "prometheus" / "rules_test.yml"
PROMETHEUS_RULE = REPO / "deploy" / "k8s" / "base" / "prometheusrule.yaml"
DASHBOARDS = sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))
PROVISIONING = REPO / "deploy" / "grafana" / "provisioning"
OPERATIONS = REPO / "docs" / "operations.md"

# series no service exports: Prometheus writes `up` (per scrape) and `ALERTS` (per alert); the
# not-ready alert reads kube-state-metrics (Kubernetes only)
PROMETHEUS_SERIES = {"up", "ALERTS"}
KUBE_STATE_METRICS = {"kube_pod_container_status_ready"}

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


def sample_names(registry: CollectorRegistry) -> set[str]:
    """The names of the series a registry's families expose (``x`` counter → ``x_total``, …)."""
    return {family.name + suffix for family in registry.collect() for suffix in _SUFFIXES.get(family.type, ("",))}


def exported_by_services() -> set[str]:
    return sample_names(Metrics(CollectorRegistry()).registry)


def process_collector_names() -> set[str]:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return sample_names(registry)


def rules() -> dict[str, Any]:
    return yaml.safe_load(RULES.read_text())


def all_rules() -> list[dict[str, Any]]:
    return [rule for group in rules()["groups"] for rule in group["rules"]]


def recorded() -> dict[str, set[str]]:
    """recording rule name → the metric names its expressions read."""
    out: dict[str, set[str]] = {}
    for rule in all_rules():
        if "record" in rule:
            out.setdefault(rule["record"], set()).update(metric_names(rule["expr"]))
    return out


def known_names() -> set[str]:
    return exported_by_services() | process_collector_names() | set(recorded()) | PROMETHEUS_SERIES


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, set[str]]]:
    """(where, metric names) of every query: panel targets (rows' panels too), template variables,
    annotations."""
    out: list[tuple[str, set[str]]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                out.append((f"panel {panel['title']!r} {target['refId']}", metric_names(target["expr"])))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((f"variable {var['name']}", label_values_metric(query)))
    for annotation in dashboard["annotations"]["list"]:
        if annotation.get("expr"):
            out.append((f"annotation {annotation['name']!r}", metric_names(annotation["expr"])))
    return out


def resolve(names: set[str]) -> set[str]:
    """Recording rules replaced by the metrics they read, down to exported series."""
    rec = recorded()
    out: set[str] = set()
    for name in names:
        out |= resolve(rec[name]) if name in rec else {name}
    return out


def test_the_promql_reader_finds_metric_names_only():
    assert metric_names(
        'sum by (a, b) (rate(x_total{b="c", d=~"$integration"}[$__rate_interval])) / on (a) group_left (q) y:z:r5m'
    ) == {"x_total", "y:z:r5m"}
    assert metric_names('histogram_quantile(0.99, sum by (le) (rate(h_bucket[5m]))) > 0.5 and absent(up{s="x"})') == {
        "h_bucket",
        "up",
    }
    assert metric_names('count without (instance) ({__name__="foo"} offset 5m) > bool 1 or time()') == {"foo"}
    assert label_values_metric('label_values(up{service=~"x.+"}, namespace)') == {"up"}
    assert label_values_metric("label_values(namespace)") == set()


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_metric_a_dashboard_reads_is_exported(path):
    known = known_names()
    queries = dashboard_queries(json.loads(path.read_text()))
    assert queries
    unknown = {where: sorted(names - known) for where, names in queries if names - known}
    assert not unknown, f"metrics no service exports and no rule records: {unknown}"
    assert all(names for where, names in queries if where.startswith("panel")), "a panel reads no metric"


def test_the_dashboard_shows_what_an_operator_needs():
    (path,) = [p for p in DASHBOARDS if p.name == "pipeline.json"]
    dashboard = json.loads(path.read_text())
    used = resolve(set().union(*(names for _where, names in dashboard_queries(dashboard))))
    wanted = {
        "pipeline_events_in_total",  # events in
        "pipeline_events_filtered_total",  # filtered by rule
        "pipeline_commands_total",  # commands by outcome
        "pipeline_end_to_end_seconds_bucket",  # end-to-end latency percentiles
        "pipeline_consumer_lag",
        "pipeline_ratelimit_remaining",
        "pipeline_http_request_seconds_count",  # 429s, errors
        "pipeline_http_retries_total",
        "pipeline_deadletters_total",
        "pipeline_http_request_seconds_bucket",  # HTTP latency
        "pipeline_ledger_entries",
        "pipeline_ingest_requests_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    }
    assert wanted <= used, sorted(wanted - used)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "integration"} <= set(variables)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert any('integration=~"$integration"' in e for e in exprs)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def test_the_services_export_the_process_metrics_the_dashboard_shows():
    """The process collector's names are allowed above; the services' registry must carry them."""
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"} <= exported_by_services()


def test_every_metric_a_rule_reads_exists():
    known = known_names() | KUBE_STATE_METRICS
    for rule in all_rules():
        names = metric_names(rule["expr"])
        assert names, rule
        assert names <= known, f"{rule.get('record') or rule.get('alert')}: {sorted(names - known)}"


def test_recording_rules_are_named_level_metric_operations():
    for name in recorded():
        level, metric, operations = name.split(":")
        assert level and metric.startswith("pipeline_") and operations, name


def test_every_alert_is_documented_labelled_and_tested():
    alerts = [r for r in all_rules() if "alert" in r]
    assert len(alerts) >= 8
    docs = OPERATIONS.read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", docs, re.M)}
    tests = yaml.safe_load(RULES_TEST.read_text())
    fired = {
        case["alertname"] for test in tests["tests"] for case in test.get("alert_rule_test", []) if case["exp_alerts"]
    }
    for alert in alerts:
        name = alert["alert"]
        assert alert["labels"]["severity"] in ("warning", "critical"), name
        assert {"summary", "description", "runbook"} <= set(alert["annotations"]), name
        runbook = alert["annotations"]["runbook"]
        assert runbook == f"docs/operations.md#{name.lower()}", name
        assert name.lower() in anchors, f"docs/operations.md has no section {name}"
        assert name in fired, f"rules_test.yml never shows {name} firing"


def test_the_kubernetes_prometheus_rule_carries_the_same_rules():
    (rule,) = [d for d in yaml.safe_load_all(PROMETHEUS_RULE.read_text()) if d]
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == rules()["groups"], "run .ci/check-deploy --write"


def test_grafana_provisioning_loads_the_dashboards():
    (datasources,) = [yaml.safe_load(p.read_text()) for p in (PROVISIONING / "datasources").glob("*.yml")]
    (providers,) = [yaml.safe_load(p.read_text()) for p in (PROVISIONING / "dashboards").glob("*.yml")]
    assert datasources["apiVersion"] == 1 and providers["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http")
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] and dashboard["title"]
        datasource = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
        assert datasource["query"] == source["type"]
