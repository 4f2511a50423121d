"""A service or command that cannot start says why in one line naming the thing, exits non-zero,
and prints no traceback. Each case is the real command as a process (no broker is needed: every
one of them fails before Kafka is asked)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

CONFIG = """
cloudtalk: {base_url: "http://127.0.0.1:2/api", key_id: {env: T_CT_ID}, key_secret: {env: T_CT_SECRET}}
integrations:
  - name: support
    active: true
    kustomer: {base_url: "http://127.0.0.1:1", api_key: {env: T_K_KEY}, webhook_token: {env: T_K_TOKEN}}
    cloudtalk_webhook_secret: {file: SECRET_FILE}
"""


def run(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "PIPELINE_", "METRICS_", "INGEST_"))}
    full.update({"KAFKA_BOOTSTRAP": "127.0.0.1:9", "PYTHONUNBUFFERED": "1"}, **env)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=REPO, env=full, capture_output=True, text=True, timeout=60
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    secret = tmp_path / "webhook-secret"
    secret.write_text("s3cret\n")
    good = tmp_path / "integrations.yaml"
    good.write_text(CONFIG.replace("SECRET_FILE", str(secret)))
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("cloudtalk: [1\n")
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("cloudtalk: {}\nintegrations: [{name: 'A B'}]\n")
    missing_file = tmp_path / "gone.yaml"
    missing_file.write_text(CONFIG.replace("SECRET_FILE", str(tmp_path / "no-such-secret")))
    secrets = {"T_CT_ID": "id", "T_CT_SECRET": "secret", "T_K_KEY": "key", "T_K_TOKEN": "token"}
    return {
        "good": str(good),
        "bad_yaml": str(bad_yaml),
        "invalid": str(invalid),
        "missing_file": str(missing_file),
    } | {f"env:{k}": v for k, v in secrets.items()}


def secrets(files: dict[str, str]) -> dict[str, str]:
    return {k[4:]: v for k, v in files.items() if k.startswith("env:")}


def one_line(rc: int, err: str, expected_rc: int, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert rc == expected_rc, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_integrations_file(files):
    rc, _, err = run("process", "calls", env={"PIPELINE_CONFIG": "/nonexistent/integrations.yaml"})
    one_line(rc, err, 2, "pipeline process: integrations file /nonexistent/integrations.yaml:", "No such file")


def test_integrations_file_that_is_not_yaml(files):
    rc, _, err = run("sink", "kustomer", "--config", files["bad_yaml"], env={})
    one_line(rc, err, 2, f"integrations file {files['bad_yaml']}: not valid YAML at line 2")


def test_invalid_integrations_file_names_the_first_problem_and_the_command_for_all(files):
    rc, _, err = run("ingest", env={"PIPELINE_CONFIG": files["invalid"]})
    one_line(rc, err, 2, "cloudtalk: 'base_url' is a required property", f"`pipeline config check {files['invalid']}`")


def test_missing_secret_in_the_environment(files):
    env = {"PIPELINE_CONFIG": files["good"], **secrets(files)}
    del env["T_K_KEY"]
    rc, _, err = run("sink", "kustomer", env=env)
    one_line(rc, err, 2, "pipeline sink: secret: integrations[0].kustomer.api_key: environment variable T_K_KEY")


def test_unreadable_secret_file(files):
    rc, _, err = run("ingest", env={"PIPELINE_CONFIG": files["missing_file"], **secrets(files)})
    one_line(rc, err, 2, "secret: integrations[0].cloudtalk_webhook_secret: cannot read secret file", "no-such-secret")


@pytest.mark.parametrize("value", ["abc", "70000", "-1"])
def test_bad_port_setting(files, value):
    rc, _, err = run(
        "process", "calls", env={"PIPELINE_CONFIG": files["good"], "METRICS_PORT": value, **secrets(files)}
    )
    one_line(rc, err, 2, "pipeline process: configuration error: METRICS_PORT:", value)


def test_port_held_by_another_process(files):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {"PIPELINE_CONFIG": files["good"], "INGEST_PORT": str(port), **secrets(files)}
        rc, _, err = run("ingest", env=env)
    one_line(rc, err, 1, "pipeline ingest: cannot listen:", f"('127.0.0.1', {port})", "address already in use")


def test_unknown_integration(files):
    env = {"PIPELINE_CONFIG": files["good"], **secrets(files)}
    rc, _, err = run("webhooks", "list", "--integration", "nope", env=env)
    one_line(rc, err, 2, "pipeline webhooks: configuration error: --integration: 'nope' is not in")


def test_broker_that_cannot_be_reached_by_a_one_shot_command():
    rc, _, err = run("deadletters", "list", env={"KAFKA_BOOTSTRAP": "127.0.0.1:9"})
    one_line(rc, err, 1, "pipeline deadletters: cannot reach the Kafka broker:", "127.0.0.1")
