"""Integrations file validation: every bad field named, secrets only by reference."""

from __future__ import annotations

import subprocess
import sys

import yaml

from pipeline.core.config import ConfigError, load_config, parse_config
from tests.conftest import REPO


def test_example_file_is_valid_and_reads_every_setting():
    cfg = load_config(REPO / "deploy" / "integrations.example.yaml")
    assert [i.name for i in cfg.integrations] == ["support", "sales"]
    support = cfg.get("support")
    assert support.calls.types["outgoing_unanswered"].export is False
    assert support.calls.connected_numbers == frozenset({"+442012345678"})
    assert support.sms.create_customers_for_unknown_numbers is True, "SMS inherits the calls setting"
    assert support.kustomer.customer_link("65f1c0a2e4b0a1b2c3d4e5f6") == \
        "https://acme.kustomerapp.com/app/customers/65f1c0a2e4b0a1b2c3d4e5f6"
    sales = cfg.get("sales")
    assert sales.sms.enabled is False and sales.calls.types["voicemail"].status == "open"
    assert "kustomer_sales_api_key" in repr(sales.kustomer.api_key)


def test_every_bad_field_is_named_at_once(tmp_path):
    data = yaml.safe_load((REPO / "deploy" / "integrations.example.yaml").read_text())
    data["integrations"][0]["calls"]["types"]["incoming_missed"]["status"] = "closed"
    data["integrations"][0]["active"] = "yes"
    data["integrations"][1]["name"] = "Sales Team"
    data["integrations"][1]["calls"]["connected_numbers"] = ["0044 20"]
    data["integrations"][0]["kustomer"]["api_key"] = "sk-live-abc"
    data["integrations"][0]["colour"] = "blue"
    try:
        parse_config(data, "x.yaml")
    except ConfigError as exc:
        text = str(exc)
        problems = exc.problems
    else:
        raise AssertionError("expected a ConfigError")
    assert "integrations[0].calls.types.incoming_missed.status: 'closed' is not one of ['open', 'done'] (rule: enum)" in problems
    assert "integrations[0].active: 'yes' is not of type 'boolean' (rule: type)" in problems
    assert any(p.startswith("integrations[1].name: 'Sales Team' does not match") for p in problems)
    assert any(p.startswith("integrations[1].calls.connected_numbers[0]:") for p in problems)
    assert "integrations[0].kustomer.api_key: secrets may not be written in the file; use {env: NAME} or {file: PATH}" in problems
    assert "integrations[0]: unknown field(s) colour (rule: additionalProperties)" in problems
    assert "sk-live-abc" not in text


def test_duplicate_names_and_yaml_errors(tmp_path):
    data = yaml.safe_load((REPO / "deploy" / "integrations.example.yaml").read_text())
    data["integrations"][1]["name"] = "support"
    try:
        parse_config(data)
    except ConfigError as exc:
        assert "integrations[1].name: 'support' is already used by integrations[0] (rule: unique)" in exc.problems
    bad = tmp_path / "bad.yaml"
    bad.write_text("cloudtalk: [\n")
    try:
        load_config(bad)
    except ConfigError as exc:
        assert "not valid YAML at line" in str(exc)


def test_config_check_command_reports_missing_secrets_by_field(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline", "config", "check",
                             str(REPO / "deploy" / "integrations.example.yaml")],
                            cwd=REPO, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert "cloudtalk.key_id: environment variable CLOUDTALK_KEY_ID is not set" in result.stderr
    assert "integrations[1].kustomer.api_key: cannot read secret file /run/secrets/kustomer_sales_api_key" in result.stderr
    ok = subprocess.run([sys.executable, "-m", "pipeline", "config", "check", "--skip-secrets",
                         str(REPO / "deploy" / "integrations.example.yaml")], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0 and "2 integration(s), active: support, sales" in ok.stdout
