"""The deploy files (docker-compose.yml, deploy/Dockerfile, deploy/kafka/, deploy/prometheus.yml and
README "Deploy") are valid and say what the deploy promises. `make test-containers`
(tests/containers/scenario.py) runs them in real containers; these checks need none."""

from __future__ import annotations

import json
import re
import shlex

import jsonschema
import pytest
import yaml

from devkit.cli import COMMANDS as DEVKIT_COMMANDS
from devkit.localkafka import KAFKA_VERSION, POM
from pipeline.cli import COMMANDS
from pipeline.core.config import load_config
from tests.conftest import REPO

VENDORED = REPO / "tests" / "fixtures" / "compose-spec.schema.json"  # compose-spec (Apache-2.0)
SHARED = REPO.parent / "shared" / "reference" / "compose-spec.schema.json"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
KAFKA = REPO / "deploy" / "kafka"
README_BLOCKS = ("secrets", "up", "register", "operate", "down")
ONE_SHOTS = {"topics", "webhooks-register", "pipeline"}
SECRET_NAME = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD)", re.I)


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def services() -> dict[str, dict]:
    return compose()["services"]


def pipeline_services() -> dict[str, dict]:
    """The long-running services of the product image (not one-shots, not the simulators)."""
    return {
        name: svc
        for name, svc in services().items()
        if name not in ("kafka", "prometheus") and name not in ONE_SHOTS and not svc.get("profiles")
    }


def stages(text: str) -> dict[str, str]:
    """Dockerfile stage name -> its instructions."""
    out, name = {}, None
    for line in text.splitlines():
        m = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            name = m.group(1) or f"stage{len(out)}"
            out[name] = ""
        elif name is not None:
            out[name] += line + "\n"
    return out


def readme_block(name: str) -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(rf"<!-- deploy-{name} -->\n```sh\n(.*?)```\n<!-- /deploy-{name} -->", text, re.S)
    assert m, f"README.md: no <!-- deploy-{name} --> block"
    return m.group(1)


def test_compose_file_is_valid_against_the_compose_spec_schema():
    schema = json.loads(VENDORED.read_text())
    if SHARED.exists():
        assert json.loads(SHARED.read_text()) == schema, "the vendored schema is out of date"
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]


def test_compose_runs_only_existing_commands_and_the_integrations_file_loads():
    for name, svc in services().items():
        command = svc.get("command")
        if name in ("kafka", "prometheus") or command is None:
            continue
        if svc.get("build", {}).get("target") == "devkit":  # sh -c "exec python -m devkit <command> …"
            m = re.search(r"python -m devkit (\S+)", command[0])
            assert m and m.group(1) in DEVKIT_COMMANDS, f"{name}: {command}"
        else:
            assert command[0] in COMMANDS or command == ["--help"], f"{name}: unknown command {command[0]}"
    load_config(REPO / "deploy" / "integrations.compose.yaml")


def test_kafka_is_the_same_version_as_the_local_broker_and_keeps_its_data_on_the_volume():
    kafka = services()["kafka"]
    assert kafka["image"] == f"${{KAFKA_IMAGE:-ctk-kafka:{KAFKA_VERSION}}}"
    assert kafka["build"]["dockerfile"] == "deploy/kafka/Dockerfile"
    assert f"<kafka.version>{KAFKA_VERSION}</kafka.version>" in POM.read_text()
    assert "deploy/local-kafka/pom.xml" in (KAFKA / "Dockerfile").read_text(), "the jars of the local broker"
    data = kafka["environment"]["KAFKA_LOG_DIRS"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in kafka["volumes"]}
    assert mounts.get(data) == "kafka-data" and "kafka-data" in compose()["volumes"]
    defaults = dict(
        line.split("=", 1) for line in (KAFKA / "server.defaults.properties").read_text().splitlines() if "=" in line
    )
    assert defaults["log.dirs"] == data, "the image's own data directory is the volume's too"
    assert kafka["healthcheck"]["test"] == ["CMD", "kafka-health"]
    image_env = dict(re.findall(r'(KAFKA_\w+_OPTS)="([^"]*)"', (KAFKA / "Dockerfile").read_text()))
    for var, default in image_env.items():  # compose passes the image's own defaults through
        assert kafka["environment"][var] == f"${{{var}:-{default}}}", var


def test_start_order_healthchecks_and_restart_policies():
    svcs = services()
    assert svcs["topics"]["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    assert svcs["topics"]["restart"] == "no"
    for name, svc in pipeline_services().items():
        assert svc["depends_on"] == {"topics": {"condition": "service_completed_successfully"}}, name
        assert svc["restart"] == "unless-stopped", name
        assert not svc.get("healthcheck", {}).get("disable"), f"{name}: the image's HEALTHCHECK (/readyz) applies"
    for name in ("sim-cloudtalk", "sim-kustomer", "kafka"):
        assert svcs[name]["healthcheck"]["test"], name
    assert "HEALTHCHECK" in stages(DOCKERFILE.read_text())["product"]
    assert "/readyz" in stages(DOCKERFILE.read_text())["product"]


def test_secrets_are_compose_secrets_never_environment():
    data = compose()
    declared = data["secrets"]
    for name, spec in declared.items():
        assert spec == {"file": f"${{SECRETS_DIR:-./secrets}}/{name}"}, name
    config = yaml.safe_load((REPO / "deploy" / "integrations.compose.yaml").read_text())
    refs = []

    def walk(node):
        if isinstance(node, dict):
            if set(node) == {"file"}:
                refs.append(node["file"])
            elif set(node) == {"env"}:
                raise AssertionError(f"{node}: the compose file's secrets are files")
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(config)
    names = {r.removeprefix("/run/secrets/") for r in refs}
    assert all(r.startswith("/run/secrets/") for r in refs) and names == set(declared), (refs, set(declared))
    readers = {
        "ingest": {"cloudtalk_support_webhook_secret", "kustomer_support_webhook_token"},
        "sink-kustomer": {"kustomer_support_api_key"},
        "sink-cloudtalk": {"cloudtalk_key_id", "cloudtalk_key_secret"},
        "poll-calls": {"cloudtalk_key_id", "cloudtalk_key_secret"},
        "poll-contacts": {"cloudtalk_key_id", "cloudtalk_key_secret"},
        "poll-customers": {"kustomer_support_api_key"},
        "webhooks-register": {"kustomer_support_api_key"},
    }
    for name, svc in data["services"].items():
        assert readers.get(name, set()) <= set(svc.get("secrets", [])), name
        for var, value in (svc.get("environment") or {}).items():
            assert not SECRET_NAME.search(var), f"{name}: {var} in the environment"
            assert "secret" not in str(value).lower(), f"{name}: {var}={value}"
    for path in ("deploy/Dockerfile", "deploy/kafka/Dockerfile"):
        assert "secrets" not in (REPO / path).read_text().replace("/run/secrets", ""), path


def test_the_integrations_file_is_mounted_not_baked():
    product = stages(DOCKERFILE.read_text())["product"]
    config_path = re.search(r"PIPELINE_CONFIG=(\S+)", product).group(1)
    for name, svc in pipeline_services().items():
        assert f"./deploy/integrations.compose.yaml}}:{config_path}:ro" in " ".join(svc["volumes"]), name
    copies = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("COPY")]
    assert not [line for line in copies if "integrations" in line], copies


def test_the_product_image_installs_the_lock_then_the_package_runs_as_a_numeric_user_without_devkit():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE=python:3\.11-slim$", text, re.M)
    assert all(line.split()[1] in ("${BASE}", "product") for line in text.splitlines() if line.startswith("FROM "))
    st = stages(text)
    assert set(st) == {"build", "product", "devkit"}
    assert "--require-hashes" in st["build"] and "-r /src/requirements.lock" in st["build"]
    assert "--no-deps" in st["build"]
    user = re.search(r"^USER (\S+)$", st["product"], re.M).group(1)
    assert re.fullmatch(r"[1-9][0-9]+:[1-9][0-9]+", user), user
    copies = " ".join(line for line in st["product"].splitlines() if line.startswith("COPY"))
    assert "devkit" not in copies and "tests" not in copies and "--from=build /opt/pipeline" in copies
    assert "devkit" in st["devkit"] and "python" in st["devkit"]
    kafka = (KAFKA / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=", kafka, re.M) and re.search(r"^USER 1[0-9]+:1[0-9]+$", kafka, re.M)


def test_host_ports_are_published_on_loopback_by_default():
    for name, svc in services().items():
        for port in svc.get("ports", []):
            assert re.fullmatch(r"\$\{[A-Z_]+_PUBLISH:-127\.0\.0\.1:\d+\}:\d+", port), f"{name}: {port}"


def test_prometheus_scrapes_every_pipeline_service():
    prom = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    names = {n for job in prom["scrape_configs"] for sd in job.get("dns_sd_configs", []) for n in sd["names"]}
    targets = {
        t.split(":")[0] for job in prom["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]
    }
    assert set(pipeline_services()) <= names | targets, set(pipeline_services()) - (names | targets)


def compose_commands(text: str) -> list[tuple[set[str], str, str | None]]:
    """(profiles, subcommand, service) of each `docker compose` command of a shell block."""
    out = []
    for line in text.splitlines():
        words = shlex.split(line.replace("$(", "").replace("until ", ""), comments=True)
        while "docker" in words and words[words.index("docker") + 1 : words.index("docker") + 2] == ["compose"]:
            words = words[words.index("docker") + 2 :]
            profiles = set()
            while words and words[0] == "--profile":
                profiles.add(words[1])
                words = words[2:]
            sub, args = words[0], words[1:]
            service = None
            while args:
                arg = args.pop(0)
                if arg == "--tail":
                    args.pop(0)
                elif not arg.startswith("-"):
                    service = arg if sub in ("run", "exec", "restart", "logs") else None
                    break
            out.append((profiles, sub, service))
    return out


@pytest.mark.parametrize("block", README_BLOCKS)
def test_readme_deploy_blocks_use_existing_services_and_the_container_test_runs_them(block):
    text = readme_block(block)
    svcs = services()
    commands = compose_commands(text)
    assert commands or block == "secrets", block
    for profiles, sub, service in commands:
        assert profiles <= {p for svc in svcs.values() for p in svc.get("profiles", [])}, (block, profiles)
        if service is not None:
            assert service in svcs, f"{block}: docker compose {sub} {service}: no such service"
            assert set(svcs[service].get("profiles", [])) <= profiles, f"{block}: {service} needs its profile"
    assert "podman" not in text, "the README's blocks are Docker's; the test swaps in podman-compose"
    scenario = (REPO / "tests" / "containers" / "scenario.py").read_text()
    assert f'readme_block("{block}"' in scenario


def test_the_walk_through_creates_every_secret_the_compose_file_declares():
    text = readme_block("secrets")
    created = set(re.search(r"for name in ([\w ]+); do", text).group(1).split())
    created |= set(re.findall(r"touch secrets/(\w+)", text))
    assert created == set(compose()["secrets"])
