"""The local profile's parts that need no broker: its integrations file, secrets, ports, and the
one-line answers of ``python -m devkit`` and ``pipeline config check`` where a traceback used to be."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from devkit.errors import DevkitError
from devkit.local import CONFIG, FILE_SECRET, FILE_URLS, GENERATED_SECRETS, PORTS, WEBHOOK_TOKEN, Local
from devkit.localkafka import LocalKafka
from devkit.net import choose_port, free_port, port_free
from pipeline.core.config import load_config
from tests.conftest import REPO


@contextmanager
def taken_port() -> Iterator[int]:
    """A port another process (here: a socket of this one) listens on."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def clean_env(tmp_path, **extra: str) -> dict[str, str]:
    """This environment without a broker to use: no KAFKA_BOOTSTRAP, a local broker directory of
    its own (so a developer's running broker is not found), the state directory in tmp_path."""
    env = {k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP", "TOPIC_PREFIX")}
    return {**env, "LOCAL_KAFKA_DIR": str(tmp_path / "kafka"), "DEVKIT_LOCAL_DIR": str(tmp_path / "local"), **extra}


def test_the_local_file_is_valid_and_names_what_up_provides():
    text = CONFIG.read_text()
    config = load_config(CONFIG)
    assert config.cloudtalk.base_url == f"{FILE_URLS['sim-cloudtalk']}/api"
    assert [i.kustomer.base_url for i in config.integrations] == [FILE_URLS["sim-kustomer"]]
    assert {f"http://127.0.0.1:{PORTS[n][1]}" for n in FILE_URLS} == set(FILE_URLS.values())
    # every secret is a file under .run/local/secrets: the ones up generates, and the webhook token
    assert sorted(FILE_SECRET.findall(text)) == sorted((*GENERATED_SECRETS, WEBHOOK_TOKEN))
    assert len(FILE_SECRET.findall(text)) == len(config.secrets())
    assert ".run/" in (REPO / ".gitignore").read_text().splitlines()


def test_other_ports_or_directory_run_a_copy_with_their_values(tmp_path):
    local = Local(tmp_path / "state")
    local.dir.mkdir()
    values = local.ensure_secrets()
    (local.secrets_dir / WEBHOOK_TOKEN).write_text("token\n")
    urls = {"ingest": "http://127.0.0.1:1", "sim-cloudtalk": "http://127.0.0.1:2", "sim-kustomer": "http://127.0.0.1:3"}
    path = local.config_for(urls)
    assert path == local.dir / "integrations.yaml"
    config = load_config(path)
    assert config.cloudtalk.base_url == "http://127.0.0.1:2/api"
    assert config.integrations[0].kustomer.base_url == "http://127.0.0.1:3"
    assert config.check_secrets() == []
    assert config.cloudtalk.key_secret.value() == values["cloudtalk-key-secret"]
    assert Local(CONFIG.parent.parent / ".run" / "local").config_for({**urls, **FILE_URLS}) == CONFIG


def test_secrets_are_random_private_and_kept(tmp_path):
    local = Local(tmp_path)
    first = local.ensure_secrets()
    assert set(first) == set(GENERATED_SECRETS) and len(set(first.values())) == len(first)
    assert all(len(v) >= 32 for v in first.values())
    assert local.secrets_dir.stat().st_mode & 0o777 == 0o700
    for name in GENERATED_SECRETS:
        assert (local.secrets_dir / name).stat().st_mode & 0o777 == 0o600
    assert local.ensure_secrets() == first


def test_a_taken_default_port_is_replaced_and_said_a_chosen_one_stops_with_one_line():
    said: list[str] = []
    with taken_port() as port:
        assert not port_free(port)
        other = choose_port("X_PORT", port, "the thing", said.append, environ={})
        assert other != port and port_free(other)
        assert said == [
            f"port {port} (the thing) is taken by another process; using {other} instead (set X_PORT to choose)"
        ]
        with pytest.raises(DevkitError, match=f"port {port} \\(X_PORT, the thing\\) is taken by another process"):
            choose_port("X_PORT", 1, "the thing", said.append, environ={"X_PORT": str(port)})
    free = free_port()
    assert choose_port("X_PORT", 1, "the thing", said.append, environ={"X_PORT": str(free)}) == free
    with pytest.raises(DevkitError, match="X_PORT='eighty': expected a port number"):
        choose_port("X_PORT", 1, "the thing", said.append, environ={"X_PORT": "eighty"})


def test_the_broker_moves_off_a_taken_default_port_but_not_off_a_chosen_one(tmp_path):
    said: list[str] = []
    with taken_port() as port:
        broker = LocalKafka(state_dir=tmp_path, port=port, controller_port=free_port())
        broker._choose_ports(said.append)
        assert broker.port != port and "LOCAL_KAFKA_PORT" in said[0]
        chosen = LocalKafka(state_dir=tmp_path, port=port, controller_port=free_port(), port_given=True)
        with pytest.raises(DevkitError, match=f"port {port} \\(LOCAL_KAFKA_PORT"):
            chosen._choose_ports(said.append)


@pytest.mark.parametrize(
    ("command", "variable"),
    [(["up"], "INGEST_PORT"), (["up"], "LOCAL_KUSTOMER_PORT"), (["demo", "--calls", "1"], "LOCAL_KAFKA_PORT")],
)
def test_a_taken_port_stops_the_command_with_one_line_naming_port_and_variable(tmp_path, command, variable):
    with taken_port() as port:
        result = subprocess.run(
            [sys.executable, "-m", "devkit", *command],
            cwd=REPO,
            env=clean_env(tmp_path, **{variable: str(port)}),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"python -m devkit {command[0]}: port {port} ({variable}, "
        + {"INGEST_PORT": "the ingest endpoints", "LOCAL_KUSTOMER_PORT": "the Kustomer simulator"}.get(
            variable, "the local Kafka broker"
        )
        + f") is taken by another process; set {variable} to a free port"
    ]
    assert "Traceback" not in result.stdout + result.stderr


def test_down_and_status_without_up_say_so(tmp_path):
    for action, rc in (("down", 0), ("status", 1)):
        result = subprocess.run(
            [sys.executable, "-m", "devkit", action, "--state-dir", str(tmp_path)],
            cwd=REPO,
            env=clean_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == rc and "state.json" in result.stdout and not result.stderr


def test_config_check_says_how_to_check_a_file_whose_secrets_are_elsewhere():
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "config", "check", "deploy/integrations.example.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    assert result.returncode == 1
    first = result.stderr.splitlines()[0]
    assert first.startswith("deploy/integrations.example.yaml: the file is valid, but 7 secret(s) it references")
    assert "pipeline config check deploy/integrations.example.yaml --skip-secrets" in first
