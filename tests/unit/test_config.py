"""Integrations file validation: every bad field named, secrets only by reference."""

from __future__ import annotations

import ast
import copy
import json
import subprocess
import sys
from collections.abc import Mapping

import jsonschema
import pytest
import yaml

from devkit.demo import integrations_yaml
from pipeline.core.config import (
    CALL_TYPES,
    SCHEMA_COMMAND,
    SMS_TYPES,
    ConfigError,
    TypeSetting,
    integrations_json_schema_text,
    load_config,
    parse_config,
)
from pipeline.core.templates import CALL_FIELDS
from tests.conftest import REPO

SCHEMA_FILE = REPO / "schemas" / "integrations.schema.json"
EXAMPLES = [REPO / "deploy" / "integrations.example.yaml", REPO / "deploy" / "integrations.compose.yaml"]
MINIMAL = {
    "cloudtalk": {
        "base_url": "https://my.cloudtalk.io/api/",
        "key_id": {"env": "CT_KEY_ID"},
        "key_secret": {"file": "/run/secrets/ct_key_secret"},
    },
    "integrations": [
        {
            "name": "support",
            "active": True,
            "kustomer": {"base_url": "https://acme.api.kustomerapp.com/", "api_key": {"env": "K_KEY"}},
            "cloudtalk_webhook_secret": {"env": "HOOK_SECRET"},
        }
    ],
}


def example() -> dict:
    return yaml.safe_load(EXAMPLES[0].read_text())


def problems_of(data) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(data, "x.yaml")
    return err.value.problems


def test_example_file_is_valid_and_reads_every_setting():
    cfg = load_config(REPO / "deploy" / "integrations.example.yaml")
    assert [i.name for i in cfg.integrations] == ["support", "sales"]
    support = cfg.get("support")
    assert support.calls.types["outgoing_unanswered"].export is False
    assert support.calls.connected_numbers == frozenset({"+442012345678"})
    assert support.sms.create_customers_for_unknown_numbers is True, "SMS inherits the calls setting"
    assert (
        support.kustomer.customer_link("65f1c0a2e4b0a1b2c3d4e5f6")
        == "https://acme.kustomerapp.com/app/customers/65f1c0a2e4b0a1b2c3d4e5f6"
    )
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
    assert (
        "integrations[0].calls.types.incoming_missed.status: 'closed' is not one of ['open', 'done'] (rule: enum)"
        in problems
    )
    assert "integrations[0].active: 'yes' is not of type 'boolean' (rule: type)" in problems
    assert any(p.startswith("integrations[1].name: 'Sales Team' does not match") for p in problems)
    assert any(p.startswith("integrations[1].calls.connected_numbers[0]:") for p in problems)
    assert (
        "integrations[0].kustomer.api_key: secrets may not be written in the file; use {env: NAME} or {file: PATH}"
        in problems
    )
    assert "integrations[0]: unknown field(s) colour (rule: additionalProperties)" in problems
    assert "sk-live-abc" not in text


def test_duplicate_names_and_yaml_errors(tmp_path):
    data = example()
    data["integrations"][1]["name"] = "support"
    assert problems_of(data) == ["integrations[1].name: 'support' is already used by integrations[0] (rule: unique)"]
    data["integrations"][0]["active"] = "yes"  # names are checked even when another field of the list is bad
    assert problems_of(data) == [
        "integrations[0].active: 'yes' is not of type 'boolean' (rule: type)",
        "integrations[1].name: 'support' is already used by integrations[0] (rule: unique)",
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text("cloudtalk: [\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)


def test_config_check_command_reports_missing_secrets_by_field(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "config", "check", str(REPO / "deploy" / "integrations.example.yaml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1
    assert "cloudtalk.key_id: environment variable CLOUDTALK_KEY_ID is not set" in result.stderr
    assert (
        "integrations[1].kustomer.api_key: cannot read secret file /run/secrets/kustomer_sales_api_key" in result.stderr
    )
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "config",
            "check",
            "--skip-secrets",
            str(REPO / "deploy" / "integrations.example.yaml"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "2 integration(s), active: support, sales" in ok.stdout


def test_one_pass_reports_every_problem_of_a_file(tmp_path):
    path = tmp_path / "integrations.yaml"
    path.write_text("""
cloudtalk:
  base_url: https://my.cloudtalk.io/api
  key_id: {env: CT_KEY_ID}
  key_secret: {env: CT_KEY_SECRET}
  rate_limit_per_minute: lots                       # a bad type
integrations:
  - name: support
    active: true
    kustomer:
      base_url: https://acme.api.kustomerapp.com
      api_key: sk-live-0123456789                   # a secret written in the file
    cloudtalk_webhook_secret: {env: HOOK_SECRET}
    calls:
      connected_numbers: ["+442012345678", "+1234"] # not a phone number
      note_template: ["CloudTalk call {call_id}", "Agent: {agnt}"]   # an unknown placeholder
""")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.problems == [
        "cloudtalk.rate_limit_per_minute: 'lots' is not of type 'integer' (rule: type)",
        "integrations[0].kustomer.api_key: secrets may not be written in the file; use {env: NAME} or {file: PATH}",
        "integrations[0].calls.connected_numbers[1]: '+1234' is not a possible phone number (rule: e164)",
        "integrations[0].calls.note_template[1]: unknown placeholder {agnt}; "
        f"known: {', '.join(sorted(CALL_FIELDS))} (rule: template)",
    ]
    assert str(err.value).startswith(f"{path}: 4 problem(s):")
    assert "sk-live-0123456789" not in str(err.value)


def test_structural_and_semantic_problems_of_every_part_at_once():
    data = copy.deepcopy(MINIMAL)
    data["cloudtalk"]["key_secret"] = {"env": "A", "file": "/b"}
    data["integrations"].append(copy.deepcopy(data["integrations"][0]))
    second = data["integrations"][1]
    second["kustomer"]["org_name"] = None  # may be left out, not null
    second["sms"] = {"connected_numbers": ["+442012345678", "+442012345678"], "note_template": []}
    second["contacts"] = {"merge_key": "phone_only", "reconcile_interval_seconds": 30, "password": "hunter2"}
    assert problems_of(data) == [
        "cloudtalk.key_secret: give either env or file, not both (rule: maxProperties)",
        "integrations[1].kustomer.org_name: None is not of type 'string' (rule: type)",
        "integrations[1].sms.connected_numbers: ['+442012345678', '+442012345678'] has non-unique elements "
        "(rule: uniqueItems)",
        "integrations[1].sms.note_template: [] should be non-empty (rule: minItems)",
        "integrations[1].contacts.merge_key: 'phone_only' is not one of "
        "['phone', 'email', 'phone_and_email', 'phone_or_name', 'none'] (rule: enum)",
        "integrations[1].contacts.reconcile_interval_seconds: 30 is less than the minimum of 60 (rule: minimum)",
        "integrations[1].contacts: unknown field(s) password (rule: additionalProperties)",
        "integrations[1].contacts.password: secrets may not be written in the file; use {env: NAME} or {file: PATH}",
        "integrations[1].name: 'support' is already used by integrations[0] (rule: unique)",
    ]
    assert problems_of({"integrations": []}) == [
        "(top level): 'cloudtalk' is a required property (rule: required)",
        "integrations: [] should be non-empty (rule: minItems)",
    ]
    assert problems_of({**MINIMAL, "integrations": ["support"]}) == [
        "integrations[0]: 'support' is not of type 'object' (rule: type)"
    ]


def test_a_secret_written_in_the_file_is_never_shown():
    data = copy.deepcopy(MINIMAL)
    data["cloudtalk"]["key_id"] = 4711081512  # not a string, not a reference either
    data["cloudtalk"]["key_secret"] = [{"token": "tok-0123456789"}]
    data["integrations"][0]["kustomer"]["api_key"] = "sk-live-0123456789"
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert err.value.problems == [
        "cloudtalk.key_id: <secret> is not of type 'object' (rule: type)",
        "cloudtalk.key_secret: [{'token': <secret>}] is not of type 'object' (rule: type)",
        "integrations[0].kustomer.api_key: secrets may not be written in the file; use {env: NAME} or {file: PATH}",
    ]
    assert not any(s in str(err.value) for s in ("4711081512", "tok-0123456789", "sk-live-0123456789"))


def test_defaults_where_the_file_is_silent():
    config = parse_config(MINIMAL)
    ct = config.cloudtalk
    assert (
        ct.base_url,
        ct.rate_limit_per_minute,
        ct.poller_reserve,
        ct.calls_poll_interval_seconds,
        ct.calls_poll_lag_seconds,
        ct.contacts_poll_interval_seconds,
    ) == ("https://my.cloudtalk.io/api", 60, 30, 300, 120, 900)
    integration = config.get("support")
    assert config.active == config.integrations == (integration,) and config.source == "<memory>"
    assert (integration.custom_name, integration.contact_tag) == ("support", None)
    k = integration.kustomer
    assert (k.base_url, k.org_name, k.app_url, k.webhook_token, k.rate_limit_reserve) == (
        "https://acme.api.kustomerapp.com",
        None,
        None,
        None,
        0,
    )
    assert k.customer_link("c1") == "https://acme.api.kustomerapp.com/app/customers/c1"
    calls, sms = integration.calls, integration.sms
    assert isinstance(calls.types, Mapping) and tuple(calls.types) == CALL_TYPES and tuple(sms.types) == SMS_TYPES
    assert {name: (t.export, t.status) for name, t in calls.types.items()} == {
        "incoming_answered": (True, "done"),
        "incoming_missed": (True, "open"),
        "voicemail": (True, "open"),
        "outgoing_answered": (True, "done"),
        "outgoing_unanswered": (False, "done"),
    }
    assert {name: (t.export, t.status) for name, t in sms.types.items()} == {
        "incoming": (True, "open"),
        "outgoing": (True, "done"),
    }
    assert calls.enabled is True and sms.enabled is True
    for flow in (calls, sms):
        assert flow.create_customers_for_unknown_numbers is False
        assert flow.connected_numbers == frozenset() and isinstance(flow.connected_numbers, frozenset)
        assert flow.empty_means_all is True and flow.number_connected("+442012345678") is True
        assert flow.note_template is None
    c = integration.contacts
    assert (
        c.import_enabled,
        c.export_enabled,
        c.merge_key,
        c.skip_customer_if_shared_or_whatsapp,
        c.reconcile_interval_seconds,
        c.external_url_name,
    ) == (True, True, "phone_or_name", False, 900, "Kustomer")
    assert [(s.field, s.reference) for s in config.secrets()] == [
        ("cloudtalk.key_id", "env:CT_KEY_ID"),
        ("cloudtalk.key_secret", "file:/run/secrets/ct_key_secret"),
        ("integrations[0].kustomer.api_key", "env:K_KEY"),
        ("integrations[0].cloudtalk_webhook_secret", "env:HOOK_SECRET"),
    ]
    with pytest.raises(ValueError, match="frozen"):
        ct.base_url = "https://elsewhere"


def test_settings_given_in_part_keep_the_other_defaults():
    data = copy.deepcopy(MINIMAL)
    integration = data["integrations"][0]
    integration["calls"] = {
        "types": {"voicemail": {"export": False, "status": "done"}},
        "empty_means": "none",
        "create_customers_for_unknown_numbers": True,
        "note_template": ["Call {call_id}"],
    }
    integration["sms"] = {"enabled": False}
    parsed = parse_config(data).get("support")
    assert parsed.calls.types["voicemail"] == TypeSetting(export=False, status="done")
    assert parsed.calls.types["incoming_missed"] == TypeSetting(export=True, status="open")
    assert parsed.calls.note_template == ("Call {call_id}",)
    assert parsed.calls.number_connected("+442012345678") is False, "empty_means: none"
    assert parsed.sms.enabled is False
    assert parsed.sms.create_customers_for_unknown_numbers is True, "SMS inherit the calls setting"
    integration["sms"] = {"create_customers_for_unknown_numbers": False}
    assert parse_config(data).get("support").sms.create_customers_for_unknown_numbers is False


def test_schema_file_is_generated_from_the_models():
    if SCHEMA_FILE.read_text() != integrations_json_schema_text():
        pytest.fail(
            f"{SCHEMA_FILE.relative_to(REPO)} differs from what pipeline/core/config.py's models generate; "
            f"regenerate it with: {SCHEMA_COMMAND}"
        )
    printed = subprocess.run(
        [sys.executable, "-m", "pipeline.core.config"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert printed == integrations_json_schema_text()


def test_example_files_are_valid_against_the_schema_file():
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    for path in EXAMPLES:
        errors = list(jsonschema.Draft7Validator(schema).iter_errors(yaml.safe_load(path.read_text())))
        assert not errors, (path.name, [e.message for e in errors])
        load_config(path)
    demo = yaml.safe_load(integrations_yaml("http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"))
    assert not list(jsonschema.Draft7Validator(schema).iter_errors(demo))
    assert [i.name for i in parse_config(demo).integrations] == ["support", "sales"]


@pytest.mark.parametrize(
    "mistake",
    [
        lambda d: d["cloudtalk"].pop("key_id"),
        lambda d: d["cloudtalk"].update(poller_reserve=-1),
        lambda d: d["cloudtalk"].update(key_id={}),
        lambda d: d["cloudtalk"].update(key_id={"env": "lower_case"}),
        lambda d: d["integrations"][0].update(custom_name=None),
        lambda d: d["integrations"][0].update(contact_tag="x" * 101),
        lambda d: d["integrations"][0]["kustomer"].update(webhook_token=None),
        lambda d: d["integrations"][0]["calls"].update(enabled=True),
        lambda d: d["integrations"][0]["calls"].update(connected_numbers=["442012345678"]),
        lambda d: d["integrations"][0]["calls"].update(note_template=["x" * 501]),
        lambda d: d["integrations"][0]["sms"]["types"].update(voicemail={"export": True, "status": "open"}),
        lambda d: d["integrations"][0]["contacts"].update(external_url_name=7),
    ],
)
def test_the_schema_file_and_the_models_refuse_the_same_mistakes(mistake):
    data = example()
    mistake(data)
    assert list(jsonschema.Draft7Validator(json.loads(SCHEMA_FILE.read_text())).iter_errors(data))
    assert problems_of(data)


def test_the_product_does_not_import_jsonschema():
    for path in (REPO / "pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            assert not any(n.split(".")[0] == "jsonschema" for n in names), path
