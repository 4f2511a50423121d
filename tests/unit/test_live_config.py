"""The integrations file changed while a service runs: validated first, a bad one refused with the
running configuration kept, a good one taken at a batch boundary, rotated secrets noticed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from structlog.testing import capture_logs

from pipeline.core.config import PipelineConfig
from pipeline.core.envelope import Envelope
from pipeline.core.live_config import LiveConfig
from pipeline.core.observability import metrics
from pipeline.kafka.topics import Topics
from pipeline.process.runner import FLOWS, decisions_transform
from tests.unit.test_call_sms_rules import call_env


def integration_yaml(name: str, line: str = "+442012345678", key: str = "{file: KEYFILE}") -> str:
    return f"""
  - name: {name}
    active: true
    contact_tag: kustomer-{name}
    kustomer: {{base_url: "http://127.0.0.1:1", org_name: acme, api_key: {key}}}
    cloudtalk_webhook_secret: {{file: KEYFILE}}
    calls:
      create_customers_for_unknown_numbers: true
      connected_numbers: ["{line}"]
"""


def write(path: Path, key_file: Path, *integrations: str) -> None:
    text = """
cloudtalk:
  base_url: http://127.0.0.1:2/api
  key_id: {file: KEYFILE}
  key_secret: {file: KEYFILE}
integrations:""" + "".join(integrations)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text.replace("KEYFILE", str(key_file)))
    tmp.replace(path)  # as a config map or an editor's save does: a new file at once


@pytest.fixture
def files(tmp_path):
    key = tmp_path / "key"
    key.write_text("secret-1")
    path = tmp_path / "integrations.yaml"
    write(path, key, integration_yaml("support"))
    return path, key


def config_info() -> dict[str, float]:
    return {
        s.labels["version"]: s.value
        for m in metrics().registry.collect()
        if m.name == "pipeline_config_info"
        for s in m.samples
    }


def test_an_unchanged_file_is_no_change_and_a_valid_change_takes_effect(files):
    path, key = files
    live = LiveConfig(path)
    seen = []
    live.on_change(
        lambda old, new: seen.append(([i.name for i in old.integrations], [i.name for i in new.integrations]))
    )
    first = live.version
    assert live.reload() is False and seen == []
    write(path, key, integration_yaml("support"), integration_yaml("sales", "+14155550123"))
    assert live.reload() is True
    assert seen == [(["support"], ["support", "sales"])]
    assert live.version != first and live.current.get("sales") is not None
    assert config_info().get(live.version) == 1 and first not in config_info()


def test_a_bad_file_is_refused_once_and_the_running_configuration_stays(files):
    path, key = files
    live = LiveConfig(path, reads=PipelineConfig.kustomer_keys)  # a service that reads the Kustomer keys
    before, version = live.current, live.version
    refused = metrics().config_reloads.labels("refused")
    count = refused._value.get()
    path.write_text(path.read_text().replace('connected_numbers: ["+442012345678"]', "connected_numbers: [12]"))
    with capture_logs() as logs:
        assert live.reload() is False
        assert live.reload() is False  # the same bad file: said once
    assert live.current is before and live.version == version
    assert refused._value.get() == count + 1
    lines = [e for e in logs if e["event"] == "config_reload_refused"]
    assert len(lines) == 1 and "connected_numbers" in lines[0]["problem"], lines
    # not YAML at all, then a missing secret file: refused as well
    path.write_text("integrations: [")
    assert live.reload() is False and live.current is before
    write(path, key, integration_yaml("support", key="{file: /nonexistent/key}"))
    assert live.reload() is False and live.current is before
    # a processor reads no secret: the same file is fine for it
    processor = LiveConfig(path)
    write(path, key, integration_yaml("support", key="{file: /nonexistent/key}"), integration_yaml("sales"))
    assert processor.reload() is True and processor.current.get("sales") is not None


def test_a_rotated_secret_file_is_a_change_with_the_same_file(files):
    path, key = files
    live = LiveConfig(path, reads=PipelineConfig.kustomer_keys)
    version, changes = live.version, []
    live.on_change(lambda old, new: changes.append(new.integrations[0].kustomer.api_key.value()))
    key.write_text("secret-2")
    assert live.reload() is True
    assert changes == ["secret-2"] and live.version == version
    assert live.reload() is False


def call_record(env: Envelope, offset: int = 0) -> ConsumerRecord:
    return ConsumerRecord("raw", 0, offset, 0, 0, env.id.encode(), env.to_json(), None, 0, 0, ())


def envelope(call_id: int, meta: dict | None = None) -> Envelope:
    return replace(call_env(call_id=call_id), integration="*", meta=meta or {})


def test_a_batch_is_decided_by_one_version_and_its_audit_records_name_it(files):
    path, key = files
    live = LiveConfig(path)
    transform = decisions_transform(FLOWS["calls"], live, Topics("t-"))
    first = transform([call_record(envelope(1))])
    audit = [orjson.loads(o.value) for o in first.outputs if o.topic == "t-audit"]
    assert [a["config"] for a in audit] == [live.version]
    assert [d["integration"] for d in audit[0]["decisions"]] == ["support"]
    write(path, key, integration_yaml("support"), integration_yaml("sales"))
    assert live.reload()
    second = transform([call_record(envelope(2))])
    audit = [orjson.loads(o.value) for o in second.outputs if o.topic == "t-audit"]
    assert [a["config"] for a in audit] == [live.version]
    assert [d["integration"] for d in audit[0]["decisions"]] == ["support", "sales"]


def test_an_event_for_one_integration_is_decided_for_it_alone(files):
    path, key = files
    write(path, key, integration_yaml("support"), integration_yaml("sales"))
    live = LiveConfig(path)
    transform = decisions_transform(FLOWS["calls"], live, Topics("t-"))
    result = transform(
        [
            call_record(envelope(3, {"for_integration": "sales"})),
            call_record(envelope(4, {"for_integration": "gone"}), 1),
        ]
    )
    commands = [orjson.loads(o.value) for o in result.outputs if o.topic == "t-kustomer.commands"]
    assert [c["integration"] for c in commands] == ["sales"]
    [rejected] = result.rejections
    assert rejected.error_class == "UnknownIntegration" and "'gone'" in rejected.message


def test_a_watched_secret_that_appears_is_a_change_and_one_that_is_missing_is_no_refusal(tmp_path):
    key = tmp_path / "key"
    key.write_text("secret-1")
    token = tmp_path / "token"  # not there yet: `pipeline webhooks register` writes it later
    path = tmp_path / "integrations.yaml"
    write(
        path,
        key,
        integration_yaml("support").replace("org_name: acme,", f"org_name: acme, webhook_token: {{file: {token}}},"),
    )
    live = LiveConfig(path, reads=PipelineConfig.webhook_secrets, watches=PipelineConfig.webhook_tokens)
    seen = []
    live.on_change(lambda old, new: seen.append(new.integrations[0].kustomer.webhook_token.value()))
    assert live.reload() is False
    token.write_text("signing-token")
    assert live.reload() is True and seen == ["signing-token"]
