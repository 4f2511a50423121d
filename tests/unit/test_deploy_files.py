"""docker-compose.yml is valid against the Compose Specification schema and runs what exists."""

from __future__ import annotations

import json

import jsonschema
import yaml

from devkit.cli import COMMANDS as DEVKIT_COMMANDS
from devkit.localkafka import KAFKA_VERSION
from pipeline.cli import COMMANDS
from pipeline.core.config import load_config
from tests.conftest import REPO

VENDORED = REPO / "tests" / "fixtures" / "compose-spec.schema.json"  # compose-spec (Apache-2.0)
SHARED = REPO.parent / "shared" / "reference" / "compose-spec.schema.json"


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_file_is_valid_against_the_compose_spec_schema():
    schema = json.loads(VENDORED.read_text())
    if SHARED.exists():
        assert json.loads(SHARED.read_text()) == schema, "the vendored schema is out of date"
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]


def test_compose_runs_the_same_broker_version_and_only_existing_commands():
    data = compose()
    assert data["services"]["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"
    for name, svc in data["services"].items():
        command = svc.get("command")
        if name in ("kafka", "prometheus") or command is None:
            continue
        known = DEVKIT_COMMANDS if svc.get("build", {}).get("target") == "devkit" else COMMANDS
        assert command[0] in known, f"{name}: unknown command {command[0]}"
    load_config(REPO / "deploy" / "integrations.compose.yaml")


def test_prometheus_scrapes_every_pipeline_service():
    prom = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    names = {n for job in prom["scrape_configs"] for sd in job.get("dns_sd_configs", []) for n in sd["names"]}
    targets = {
        t.split(":")[0] for job in prom["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]
    }
    services = {
        n
        for n, s in compose()["services"].items()
        if n not in ("kafka", "prometheus", "topics") and not n.startswith("sim-")
    }
    assert services <= names | targets, services - (names | targets)
