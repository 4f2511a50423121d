"""deploy/k8s/base agrees with the code: one Deployment per service with runnable arguments, probes,
resources and the security settings; KEDA bounded by the input topics' partitions; each service
mounts exactly the secrets the integrations file makes it read. Read from the files themselves
(no tools); tests/deploy/test_check_deploy.py checks what kustomize renders from them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.cli import build_parser
from pipeline.core.config import PipelineConfig, Secret, load_config
from pipeline.kafka.topics import CATALOGUE, Topics
from pipeline.process.runner import FLOWS
from pipeline.sink.runner import SINKS
from tests.conftest import REPO

BASE = REPO / "deploy" / "k8s" / "base"
OVERLAYS = sorted(p for p in (REPO / "deploy" / "k8s" / "overlays").iterdir() if p.is_dir())
CONTAINER = "ctk-kustomer-pipeline"  # every pipeline container's name: pod-defaults.yaml merges by it
SECRETS_ROOT = "/run/secrets/"


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def base_objects() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return [obj for name in kustomization["resources"] for obj in load(BASE / name)]


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in base_objects() if o["kind"] == kind}


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def pollers() -> list[str]:
    parser = build_parser("poll")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    source = next(a for a in sub.choices["poll"]._actions if a.dest == "source")
    return list(source.choices or [])


def services() -> dict[str, list[str]]:
    """Every long-running service of the product and its command line."""
    out = {"ingest": ["ingest"]}
    out |= {f"process-{flow}": ["process", flow] for flow in FLOWS}
    out |= {f"sink-{target}": ["sink", target] for target in SINKS}
    out |= {f"poll-{source}": ["poll", source] for source in pollers()}
    return out


# consumer group and input topic of each scaled service, as the runners build them
# (pipeline/process/runner.py: "{prefix}process-{flow}"; pipeline/sink/runner.py: "{prefix}sink-{target}")
def scaled_inputs() -> dict[str, str]:
    topics = Topics("")
    out = {f"process-{name}": getattr(topics, flow.input_base) for name, flow in FLOWS.items()}
    out |= {f"sink-{target}": getattr(topics, attr) for target, (attr, _build) in SINKS.items()}
    return out


def test_one_deployment_per_service_running_that_service():
    deployments = of_kind("Deployment")
    want = services()
    assert set(deployments) == set(want)
    for name, args in want.items():
        c = container(deployments[name])
        assert c["name"] == CONTAINER, name
        assert c["args"] == args, name
        build_parser(args[0]).parse_args(c["args"])  # the CLI accepts them
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == name
        assert deployments[name]["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_probes_resources_and_ports():
    env = env_literals(BASE)
    for name, d in of_kind("Deployment").items():
        c = container(d)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        want_port = "http" if name == "ingest" else "metrics"
        assert ports[want_port] == int(env["INGEST_PORT" if name == "ingest" else "METRICS_PORT"]), name
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": want_port}, name
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": want_port}, name
        assert c["startupProbe"]["httpGet"]["path"] == "/healthz", name
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), (name, kind)
    job = of_kind("Job")["topics-ensure"]
    assert container(job)["args"][:2] == ["topics", "ensure"]
    build_parser("topics").parse_args(container(job)["args"])
    assert {"cpu", "memory"} <= set(container(job)["resources"]["limits"])


def test_every_pod_gets_the_restricted_security_settings():
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    targets = {p["target"]["kind"] for p in kustomization["patches"] if p["path"] == "pod-defaults.yaml"}
    assert targets == {"Deployment", "Job"}  # every workload of the base
    assert {o["kind"] for o in base_objects() if "template" in o.get("spec", {})} <= targets
    (defaults,) = load(BASE / "pod-defaults.yaml")
    pod = defaults["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    c = container(defaults)
    assert c["name"] == CONTAINER
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # the image's user (deploy/Dockerfile) is the UID the pods run as
    assert "--uid 10001" in (REPO / "deploy" / "Dockerfile").read_text()


def test_scaled_objects_are_bounded_by_the_input_topics_partitions():
    partitions = {spec.name: spec.partitions for spec in CATALOGUE}
    scaled = of_kind("ScaledObject")
    inputs = scaled_inputs()
    assert set(scaled) == set(inputs), "every processor and sink, nothing else"
    deployments = of_kind("Deployment")
    for name, topic in inputs.items():
        spec = scaled[name]["spec"]
        assert spec["scaleTargetRef"]["name"] == name and spec["scaleTargetRef"]["kind"] == "Deployment"
        assert spec["maxReplicaCount"] == partitions[topic], f"{name}: {topic} has {partitions[topic]} partitions"
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "kafka"
        meta = trigger["metadata"]
        assert meta["topic"] == topic
        assert meta["consumerGroup"] == name
        assert meta["bootstrapServers"] == env_literals(BASE)["KAFKA_BOOTSTRAP"]
        assert int(meta["lagThreshold"]) > 0
        assert all(isinstance(v, str) for v in meta.values()), "KEDA's metadata values are strings"
        # the autoscaler owns the replica count: a re-apply must not reset it
        assert "replicas" not in deployments[name]["spec"], name
    for name in set(deployments) - set(inputs):
        assert "replicas" in deployments[name]["spec"], f"{name} is not autoscaled: say how many"
    assert of_kind("Deployment")["ingest"]["spec"]["replicas"] >= 2


def test_disruption_budgets_cover_every_deployment():
    budgets = of_kind("PodDisruptionBudget")
    for name, d in of_kind("Deployment").items():
        pdb = budgets[name]["spec"]
        assert pdb["selector"]["matchLabels"] == d["spec"]["selector"]["matchLabels"], name
        assert ("minAvailable" in pdb) != ("maxUnavailable" in pdb), name
    assert budgets["ingest"]["spec"]["minAvailable"] >= 1


def test_ingest_service_and_pod_monitor_select_the_pods():
    deployments = of_kind("Deployment")
    service = of_kind("Service")["ingest"]["spec"]
    ingest_labels = deployments["ingest"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= ingest_labels.items()
    assert [p["targetPort"] for p in service["ports"]] == ["http"]
    (monitor,) = of_kind("PodMonitor").values()
    selector = monitor["spec"]["selector"]
    ports = {p["port"] for p in monitor["spec"]["podMetricsEndpoints"]}
    for name, d in deployments.items():
        labels = d["spec"]["template"]["metadata"].get("labels", {}) | common_labels()
        assert selector["matchLabels"].items() <= labels.items(), name
        assert {p["name"] for p in container(d)["ports"]} & ports, f"{name}: no port the PodMonitor scrapes"
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert endpoint["path"] == "/metrics"
        (relabel,) = endpoint["relabelings"]
        assert relabel["targetLabel"] == "service"  # what the alert rules and the dashboard group by
        assert relabel["sourceLabels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_component"]


def common_labels() -> dict[str, str]:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    out: dict[str, str] = {}
    for entry in kustomization["labels"]:
        if entry.get("includeTemplates"):
            out |= entry["pairs"]
    return out


def env_literals(directory: Path) -> dict[str, str]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    (gen,) = [g for g in kustomization["configMapGenerator"] if g["name"] == "pipeline-env"]
    return dict(literal.split("=", 1) for literal in gen["literals"])


# --- secrets ---------------------------------------------------------------------------------


def secrets_read_by(service: str, config: PipelineConfig) -> list[Secret]:
    """The secret references of the integrations file that ``service`` reads (see the secrets'
    ``.value()`` calls: ingest/app.py, sink/runner.py and sink/cloudtalk.py, ingest/pollers.py)."""
    ct = [config.cloudtalk.key_id, config.cloudtalk.key_secret]
    kustomer = [i.kustomer.api_key for i in config.integrations]
    webhooks = [i.cloudtalk_webhook_secret for i in config.integrations]
    webhooks += [i.kustomer.webhook_token for i in config.integrations if i.kustomer.webhook_token]
    return {
        "ingest": webhooks,
        "sink-kustomer": kustomer,
        "sink-cloudtalk": ct + kustomer,
        "poll-calls": ct,
        "poll-contacts": ct,
        "poll-customers": kustomer,
    }.get(service, [])


def mounted_secrets(workload: dict[str, Any]) -> dict[str, str]:
    """mount path → Secret name of every secret volume of the workload's container."""
    volumes = {
        v["name"]: v["secret"]["secretName"]
        for v in workload["spec"]["template"]["spec"].get("volumes", [])
        if "secret" in v
    }
    return {
        m["mountPath"]: volumes[m["name"]] for m in container(workload).get("volumeMounts", []) if m["name"] in volumes
    }


@pytest.mark.parametrize("directory", [BASE, *OVERLAYS], ids=lambda p: p.name)
def test_each_service_mounts_the_secrets_it_reads_and_no_others(directory: Path):
    config = load_config(directory / "integrations.yaml")
    for secret in config.secrets():
        assert secret.file and secret.file.startswith(SECRETS_ROOT), f"{secret.field}: not a mounted secret file"
        secret_name, key = secret.file[len(SECRETS_ROOT) :].split("/")
        assert secret_name and key
    for name, d in of_kind("Deployment").items():
        mounted = mounted_secrets(d)
        for path, secret_name in mounted.items():
            assert path == SECRETS_ROOT + secret_name, f"{name}: mount {secret_name} at {SECRETS_ROOT}{secret_name}"
        needed = {s.file.rsplit("/", 1)[0] for s in secrets_read_by(name, config) if s.file}
        assert needed == set(mounted), f"{name} reads {sorted(needed)} but mounts {sorted(mounted)}"


def test_the_integrations_files_are_generated_into_the_config_map():
    env = env_literals(BASE)
    (defaults,) = load(BASE / "pod-defaults.yaml")
    mounts = {m["name"]: m["mountPath"] for m in container(defaults)["volumeMounts"]}
    volumes = {v["name"]: v for v in defaults["spec"]["template"]["spec"]["volumes"]}
    config_map = volumes["integrations"]["configMap"]["name"]
    assert env["PIPELINE_CONFIG"] == f"{mounts['integrations']}/integrations.yaml"
    for directory in (BASE, *OVERLAYS):
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        (gen,) = [g for g in kustomization["configMapGenerator"] if g["name"] == config_map]
        assert gen["files"] == ["integrations.yaml"]
        load_config(directory / "integrations.yaml")
    assert not [o for o in base_objects() if o["kind"] == "Secret"], "Secrets are created by the operator, not here"
