"""Call and SMS rules (reference 1.2, 1.4 rules 6–12, 1.7, 1.8) as pure functions."""

from __future__ import annotations

import copy

import pytest

from pipeline.core.config import ConfigError, parse_config
from pipeline.core.decisions import Command, Dropped, Reject
from pipeline.core.envelope import Envelope
from pipeline.core.phones import is_valid_e164, normalize_e164
from pipeline.core.schemas import validate
from pipeline.process import calls, sms
from tests.unit.test_envelope_schemas import CALL

SECRET = {"env": "X_SECRET"}


def integration(name="support", **over):
    base = {
        "name": name,
        "active": True,
        "contact_tag": f"kustomer-{name}",
        "kustomer": {"base_url": "http://127.0.0.1:1", "org_name": "acme", "api_key": SECRET},
        "cloudtalk_webhook_secret": SECRET,
        "calls": {
            "types": {
                "incoming_answered": {"export": True, "status": "done"},
                "incoming_missed": {"export": True, "status": "open"},
                "voicemail": {"export": True, "status": "open"},
                "outgoing_answered": {"export": True, "status": "done"},
                "outgoing_unanswered": {"export": False, "status": "done"},
            },
            "create_customers_for_unknown_numbers": True,
            "connected_numbers": ["+442012345678"],
        },
        "sms": {
            "enabled": True,
            "types": {"incoming": {"export": True, "status": "open"}, "outgoing": {"export": True, "status": "done"}},
            "connected_numbers": [],
        },
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return base


def config(*integrations):
    return parse_config(
        {
            "cloudtalk": {"base_url": "http://127.0.0.1:2/api", "key_id": SECRET, "key_secret": SECRET},
            "integrations": list(integrations) or [integration()],
        }
    )


def call_env(**payload_over) -> Envelope:
    payload = copy.deepcopy(CALL)
    payload.update(payload_over)
    return Envelope(
        id=f"cloudtalk:call:{payload['call_id']}",
        integration="support",
        source="cloudtalk",
        type="call.ended",
        occurred_at=payload["ended_at"],
        received_at=payload["ended_at"],
        payload=payload,
    )


SMS = {
    "event": "sms.received",
    "sms_id": 88231977,
    "direction": "incoming",
    "sender": 447700900123,
    "recipient": 442012345678,
    "internal_number": 442012345678,
    "external_number": 447700900123,
    "contact_id": 1451646073,
    "agent_id": None,
    "text": "Hi, is my refund processed yet?",
    "created_at": "2026-03-02T10:01:22.000Z",
}


def sms_env(**over) -> Envelope:
    payload = {**SMS, **over}
    return Envelope(
        id=f"cloudtalk:sms:{payload['sms_id']}",
        integration="support",
        source="cloudtalk",
        type=payload["event"],
        occurred_at=payload["created_at"],
        received_at=payload["created_at"],
        payload=payload,
    )


def only(decisions):
    assert len(decisions) == 1
    return decisions[0]


# -- phones ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "e164"),
    [
        (447700900123, "+447700900123"),
        ("447700900123", "+447700900123"),
        ("+44 7700 900123", "+447700900123"),
        ("00421905123456", "+421905123456"),
        ("whatsapp:+421905123456", "+421905123456"),
        ("(415) 555-0123", None),
        ("abc", None),
        (None, None),
        (12, None),
        (True, None),
    ],
)
def test_numbers_arrive_as_integers_without_plus_and_become_e164(raw, e164):
    assert normalize_e164(raw) == e164


def test_strict_validity_is_separate_from_possibility():
    assert is_valid_e164("+442012345678") and is_valid_e164("+421905123456")
    assert normalize_e164(447700900123) == "+447700900123" and not is_valid_e164("+447700900123")


# -- calls -------------------------------------------------------------------------------------


def test_reference_call_becomes_conversation_and_note():
    cmd = only(calls.process_call(call_env(), config()))
    assert isinstance(cmd, Command)
    validate("command.kustomer.log_conversation", cmd.body)
    assert cmd.key == "support|+447700900123"
    assert cmd.command_id == "support|cloudtalk:call:1002409191"
    assert cmd.body["conversation"] == {
        "name": "Incoming call from +447700900123",
        "status": "done",
        "direction": "in",
        "externalId": "cloudtalk-call-1002409191",
    }
    assert cmd.body["customer"] == {"phone": "+447700900123", "name": None, "create": True}
    note = cmd.body["note"]["body"].splitlines()
    assert note[0] == "CloudTalk call 1002409191" == cmd.body["note"]["marker"]
    assert note == [
        "CloudTalk call 1002409191",
        "Direction: Incoming",
        "Status: Answered",
        "Started: 2026-03-02 09:14:05 UTC",
        "Answered: 2026-03-02 09:14:17 UTC",
        "Ended: 2026-03-02 09:18:40 UTC",
        "Duration: 275 s",
        "Talking time: 263 s",
        "Waiting time: 12 s",
        "Wrap-up time: 30 s",
        "Agent: Max Yellow <max.yellow@example.com>",
        "CloudTalk number: UK Support (+442012345678)",
        "Customer number: +447700900123",
        "Tags: Billing",
        "Notes: Customer asked for refund status",
        "Rating: 4/5",
        "Recording: https://my.cloudtalk.io/pub/r/MTAwMjQwOTE5MQ%3D%3D/Zm9vYmFy.wav",
    ]


def test_empty_note_items_are_omitted():
    cmd = only(
        calls.process_call(
            call_env(
                status="missed",
                answered_at=None,
                talking_time=0,
                agent_first_name=None,
                agent_last_name=None,
                agent_email=None,
                recording_url=None,
                call_tags=[],
                call_notes=[],
                rating=None,
            ),
            config(),
        )
    )
    body = cmd.body["note"]["body"]
    for absent in ("Answered:", "Agent:", "Recording:", "Tags:", "Notes:", "Rating:"):
        assert absent not in body
    assert "Status: Missed" in body and cmd.body["conversation"]["name"] == "Missed call from +447700900123"
    assert cmd.body["conversation"]["status"] == "open"


@pytest.mark.parametrize(
    ("over", "ctype", "name", "direction", "status"),
    [
        ({}, "incoming_answered", "Incoming call from", "in", "done"),
        (
            {"status": "missed", "answered_at": None, "talking_time": 0},
            "incoming_missed",
            "Missed call from",
            "in",
            "open",
        ),
        (
            {"status": "missed", "answered_at": None, "talking_time": 0, "is_voicemail": True},
            "voicemail",
            "Voicemail from",
            "in",
            "open",
        ),
        ({"direction": "outgoing"}, "outgoing_answered", "Outgoing call to", "out", "done"),
    ],
)
def test_each_call_type_has_its_name_direction_and_status(over, ctype, name, direction, status):
    env = call_env(**over)
    assert calls.call_type(env.payload) == ctype
    cmd = only(calls.process_call(env, config()))
    assert cmd.body["conversation"]["name"].startswith(name)
    assert cmd.body["conversation"]["direction"] == direction
    assert cmd.body["conversation"]["status"] == status


def test_status_is_derived_when_the_body_has_none():
    assert calls.call_type({"direction": "incoming", "answered_at": "x", "talking_time": 5}) == "incoming_answered"
    assert calls.call_type({"direction": "incoming", "answered_at": None, "talking_time": 0}) == "incoming_missed"
    assert calls.call_type({"direction": "outgoing", "answered_at": "x", "talking_time": 0}) == "outgoing_unanswered"


def test_disabled_call_type_is_dropped_with_its_rule():
    d = only(
        calls.process_call(call_env(direction="outgoing", status="missed", answered_at=None, talking_time=0), config())
    )
    assert d == Dropped("support", "call_type_disabled", "outgoing_unanswered")


def test_internal_calls_are_never_exported():
    d = only(calls.process_call(call_env(direction="internal", external_number=None), config()))
    assert isinstance(d, Dropped) and d.rule == "internal_call"


def test_only_connected_numbers_are_logged_and_empty_means_all():
    d = only(calls.process_call(call_env(internal_number=442079460000), config()))
    assert isinstance(d, Dropped) and d.rule == "number_not_connected"
    all_numbers = config(integration(calls={"connected_numbers": []}))
    assert isinstance(only(calls.process_call(call_env(internal_number=442079460000), all_numbers)), Command)
    none_numbers = config(integration(calls={"connected_numbers": [], "empty_means": "none"}))
    assert only(calls.process_call(call_env(), none_numbers)).rule == "number_not_connected"


def test_unknown_numbers_need_the_create_customers_setting():
    d = only(
        calls.process_call(
            call_env(contact_id=None), config(integration(calls={"create_customers_for_unknown_numbers": False}))
        )
    )
    assert d == Dropped("support", "unknown_number", "no CloudTalk contact has this number")
    cmd = only(calls.process_call(call_env(contact_id=None), config()))
    assert isinstance(cmd, Command) and cmd.body["customer"]["create"] is True


def test_inactive_integration_drops_everything():
    d = only(calls.process_call(call_env(), config(integration(active=False))))
    assert d.rule == "integration_inactive"
    d = only(sms.process_sms(sms_env(), config(integration(active=False))))
    assert d.rule == "integration_inactive"


def test_every_integration_is_evaluated_and_each_gets_its_own_command():
    cfg = config(
        integration("support"),
        integration("sales", calls={"connected_numbers": ["+14155550123"]}),
        integration("billing"),
    )
    ds = calls.process_call(call_env(), cfg)
    assert [type(d).__name__ for d in ds] == ["Command", "Dropped", "Command"]
    assert ds[1] == Dropped("sales", "number_not_connected", "CloudTalk number +442012345678 is not connected")
    assert {d.command_id for d in ds if isinstance(d, Command)} == {
        "support|cloudtalk:call:1002409191",
        "billing|cloudtalk:call:1002409191",
    }


def test_an_impossible_external_number_is_rejected_for_the_dead_letter_topic():
    with pytest.raises(Reject) as err:
        calls.process_call(call_env(external_number="12"), config())
    assert err.value.error_class == "InvalidPhoneNumber" and "external_number" in err.value.message


def test_a_custom_template_keeps_the_marker_line():
    cfg = config(integration(calls={"note_template": ["Call by {agent}", "Took {duration} s"]}))
    body = only(calls.process_call(call_env(), cfg)).body["note"]["body"]
    assert body.splitlines() == [
        "CloudTalk call 1002409191",
        "Call by Max Yellow <max.yellow@example.com>",
        "Took 275 s",
    ]


def test_a_template_with_an_unknown_placeholder_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        config(integration(calls={"note_template": ["{agent} {durration}"]}))
    assert "integrations[0].calls.note_template[0]: unknown placeholder {durration}" in str(err.value)


# -- sms ---------------------------------------------------------------------------------------


def test_reference_sms_becomes_conversation_and_note():
    cmd = only(sms.process_sms(sms_env(), config()))
    validate("command.kustomer.log_conversation", cmd.body)
    assert cmd.body["conversation"] == {
        "name": "SMS from +447700900123",
        "status": "open",
        "direction": "in",
        "externalId": "cloudtalk-sms-88231977",
    }
    assert cmd.body["note"]["body"].splitlines() == [
        "CloudTalk SMS 88231977",
        "Direction: Incoming",
        "From: +447700900123",
        "To: +442012345678",
        "CloudTalk number: +442012345678",
        "Date: 2026-03-02 10:01:22 UTC",
        "Message:",
        "Hi, is my refund processed yet?",
    ]


def test_outgoing_sms_has_its_own_type_setting_and_status():
    out = sms_env(event="sms.sent", direction="outgoing", sender=442012345678, recipient=447700900123, agent_id=493933)
    cmd = only(sms.process_sms(out, config()))
    assert cmd.body["conversation"]["status"] == "done" and cmd.body["conversation"]["direction"] == "out"
    assert "From: +442012345678" in cmd.body["note"]["body"] and "Agent: agent 493933" in cmd.body["note"]["body"]
    off = config(
        integration(
            sms={
                "types": {
                    "incoming": {"export": True, "status": "open"},
                    "outgoing": {"export": False, "status": "done"},
                }
            }
        )
    )
    assert only(sms.process_sms(out, off)) == Dropped("support", "sms_type_disabled", "outgoing")


def test_sms_master_switch_and_connected_numbers_for_sms():
    assert only(sms.process_sms(sms_env(), config(integration(sms={"enabled": False})))).rule == "sms_disabled"
    cfg = config(integration(sms={"connected_numbers": ["+14155550123"]}))
    assert only(sms.process_sms(sms_env(), cfg)).rule == "number_not_connected"


def test_sms_from_unknown_number_follows_the_unknown_number_rule():
    cfg = config(integration(calls={"create_customers_for_unknown_numbers": False}))
    assert only(sms.process_sms(sms_env(contact_id=None), cfg)).rule == "unknown_number"
    override = config(
        integration(
            calls={"create_customers_for_unknown_numbers": False}, sms={"create_customers_for_unknown_numbers": True}
        )
    )
    assert isinstance(only(sms.process_sms(sms_env(contact_id=None), override)), Command)
