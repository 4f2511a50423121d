"""Envelope ids and schema validation (pure)."""

from __future__ import annotations

import copy
import glob
import json

import jsonschema
import orjson
import pytest

from pipeline.core.envelope import (
    Envelope,
    call_event_id,
    command_id,
    contact_event_id,
    customer_event_id,
    sms_event_id,
)
from pipeline.core.schemas import SCHEMA_DIR, SchemaError, validate

CALL = {
    "event": "call.ended",
    "call_id": 1002409191,
    "call_uuid": "9b2f6c1e-3d7a-4c55-9a61-2f0e8d4b7c10",
    "direction": "incoming",
    "status": "answered",
    "internal_number": 442012345678,
    "internal_number_name": "UK Support",
    "external_number": 447700900123,
    "contact_id": 1451646073,
    "agent_id": 493933,
    "agent_first_name": "Max",
    "agent_last_name": "Yellow",
    "agent_email": "max.yellow@example.com",
    "started_at": "2026-03-02T09:14:05.000Z",
    "answered_at": "2026-03-02T09:14:17.000Z",
    "ended_at": "2026-03-02T09:18:40.000Z",
    "waiting_time": 12,
    "talking_time": 263,
    "wrapup_time": 30,
    "is_voicemail": False,
    "recording_url": "https://my.cloudtalk.io/pub/r/MTAwMjQwOTE5MQ%3D%3D/Zm9vYmFy.wav",
    "call_tags": ["Billing"],
    "call_notes": ["Customer asked for refund status"],
    "rating": 4,
}


def envelope(payload=None, **over):
    data = {
        "id": "cloudtalk:call:1002409191",
        "integration": "support",
        "source": "cloudtalk",
        "type": "call.ended",
        "occurred_at": "2026-03-02T09:18:40.000Z",
        "received_at": "2026-03-02T09:18:41.000Z",
        "schema": 1,
        "via": "webhook",
        "payload": copy.deepcopy(CALL) if payload is None else payload,
    }
    data.update(over)
    return data


def test_every_schema_file_is_a_valid_draft7_schema():
    files = glob.glob(str(SCHEMA_DIR / "*.schema.json"))
    assert len(files) >= 10
    for f in files:
        jsonschema.Draft7Validator.check_schema(json.load(open(f)))


def test_deterministic_ids_are_the_same_for_every_path():
    assert call_event_id(1002409191) == call_event_id("1002409191") == "cloudtalk:call:1002409191"
    assert sms_event_id("88231977") == "cloudtalk:sms:88231977"
    assert contact_event_id("17", "2026-03-01T17:02:44.000Z") == "cloudtalk:contact:17:2026-03-01T17:02:44.000Z"
    assert contact_event_id(17, None, deleted=True) == "cloudtalk:contact:17:deleted"
    assert customer_event_id("65f1c0a2e4b0a1b2c3d4e5f6", 8, "x") == "kustomer:customer:65f1c0a2e4b0a1b2c3d4e5f6:8"
    assert customer_event_id("65f1c0a2e4b0a1b2c3d4e5f6", None, "2026-03-02T11:00:03.207Z").endswith(
        ":2026-03-02T11:00:03.207Z"
    )
    assert command_id("support", "cloudtalk:call:1") == "support|cloudtalk:call:1"
    assert command_id("sales", "cloudtalk:call:1") != command_id("support", "cloudtalk:call:1")


def test_reference_call_body_is_valid_and_round_trips():
    env = Envelope.from_dict(envelope())
    again = Envelope.from_json(env.to_json())
    assert again == env
    assert again.payload["external_number"] == 447700900123


@pytest.mark.parametrize(
    ("mutate", "field", "rule"),
    [
        (lambda d: d["payload"].update(call_id="abc"), "payload.call_id", "type"),
        (lambda d: d["payload"].pop("direction"), "payload", "required"),
        (lambda d: d["payload"].update(direction="sideways"), "payload.direction", "enum"),
        (lambda d: d["payload"].update(rating=9), "payload.rating", "maximum"),
        (lambda d: d.update(source="zendesk"), "source", "enum"),
        (lambda d: d.update(integration="Bad Name!"), "integration", "pattern"),
        (lambda d: d.pop("occurred_at"), "(root)", "required"),
    ],
)
def test_validation_errors_name_the_field_and_the_rule(mutate, field, rule):
    data = envelope()
    mutate(data)
    with pytest.raises(SchemaError) as err:
        Envelope.from_dict(data)
    assert err.value.field == field
    assert err.value.rule == rule
    assert str(err.value).startswith(f"{field}:") and f"(rule: {rule})" in str(err.value)


def test_missing_required_field_message_names_it():
    data = envelope()
    del data["payload"]["call_id"]
    with pytest.raises(SchemaError, match="call_id"):
        Envelope.from_dict(data)


def test_unknown_event_type_and_bad_json_are_rejected_clearly():
    with pytest.raises(SchemaError, match="no event type 'call.started'"):
        Envelope.from_dict(envelope(type="call.started"))
    with pytest.raises(SchemaError, match="not valid JSON"):
        Envelope.from_json(b"{nope")
    with pytest.raises(SchemaError, match="no value"):
        Envelope.from_json(None)


def test_sms_contact_and_customer_payloads():
    sms = {
        "event": "sms.received",
        "sms_id": 88231977,
        "direction": "incoming",
        "sender": 447700900123,
        "recipient": 442012345678,
        "internal_number": 442012345678,
        "external_number": 447700900123,
        "contact_id": None,
        "agent_id": None,
        "text": "Hi",
        "created_at": "2026-03-02T10:01:22.000Z",
    }
    validate("cloudtalk.sms", sms)
    with pytest.raises(SchemaError, match="sms_id"):
        validate("cloudtalk.sms", {**sms, "sms_id": -1})
    contact = {
        "event": "contact.updated",
        "contact_id": 1451646073,
        "name": "Jana",
        "contact_numbers": [421905123456],
        "contact_emails": ["jana@example.org"],
        "modified_at": "2026-03-01T17:02:44.000Z",
    }
    validate("cloudtalk.contact", contact)
    with pytest.raises(SchemaError, match="name"):
        validate("cloudtalk.contact", {k: v for k, v in contact.items() if k != "name"})
    validate(
        "cloudtalk.contact", {"event": "contact.deleted", "contact_id": 5, "modified_at": "2026-03-01T17:02:44.000Z"}
    )
    event = orjson.loads(
        orjson.dumps(
            {
                "id": "65f1d0c4e4b0a1b2c3d4e9aa",
                "name": "kustomer.customer.update",
                "createdAt": "2026-03-02T11:00:03.230Z",
                "data": {
                    "type": "customer",
                    "id": "65f1c0a2e4b0a1b2c3d4e5f6",
                    "attributes": {
                        "name": "Jana",
                        "phones": [{"type": "mobile", "phone": "+421905123456"}],
                        "rev": 8,
                        "updatedAt": "2026-03-02T11:00:03.207Z",
                    },
                },
            }
        )
    )
    validate("kustomer.customer.event", event)
    event["data"]["id"] = "not-an-object-id"
    with pytest.raises(SchemaError, match=r"data\.id"):
        validate("kustomer.customer.event", event)
