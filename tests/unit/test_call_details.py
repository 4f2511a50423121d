"""A call's details after it was logged: what a body states, what changed, the event id of a
version, the decision per integration, and the poller's snapshot of a history record."""

from __future__ import annotations

import pytest

from pipeline.core.call_details import changed, details_of
from pipeline.core.decisions import Command, Dropped, Reject
from pipeline.core.envelope import record_key
from pipeline.core.schemas import SchemaError
from pipeline.ingest.cloudtalk import cloudtalk_envelope
from pipeline.ingest.pollers import cdr_to_call_ended, details_snapshot
from pipeline.process import calls
from tests.unit.test_call_sms_rules import config, integration
from tests.unit.test_envelope_schemas import CALL

MODIFIED = {
    "event": "call.modified",
    "call_id": 1002409191,
    "call_uuid": "9b2f6c1e-3d7a-4c55-9a61-2f0e8d4b7c10",
    "direction": "incoming",
    "internal_number": 442012345678,
    "external_number": 447700900123,
    "call_tags": ["Billing", "VIP"],
    "call_notes": ["Refund sent"],
    "rating": 5,
    "modified_at": "2026-03-02T10:00:00.000Z",
}
RECORDING = {
    "event": "recording.uploaded",
    "call_id": 1002409191,
    "internal_number": 442012345678,
    "external_number": 447700900123,
    "recording_url": "https://my.cloudtalk.io/pub/r/MTAwMjQwOTE5MQ/abc.wav",
    "uploaded_at": "2026-03-02T09:20:00.000Z",
}


def test_a_body_states_only_the_fields_it_carries():
    assert details_of(RECORDING) == {"recording": RECORDING["recording_url"]}
    assert details_of({"call_tags": [], "rating": None}) == {"tags": [], "rating": None}
    assert details_of(CALL) == {
        "tags": ["Billing"],
        "notes": ["Customer asked for refund status"],
        "rating": 4,
        "recording": CALL["recording_url"],
    }


def test_changed_is_what_differs_from_what_the_note_states():
    stated = details_of(CALL)
    assert changed(stated, details_of(CALL)) == {}
    assert changed(stated, {"tags": ["Billing", "VIP"]}) == {"tags": ["Billing", "VIP"]}
    assert changed(stated, {"tags": []}) == {"tags": []}  # all tags removed is a change
    assert changed({}, {"tags": [], "rating": None}) == {}  # stating nothing new is no change
    assert changed({"recording": None}, {"recording": "u"}) == {"recording": "u"}
    # one recording, two links (workflow download, history player): its arrival is the only news
    assert changed({"recording": "https://x/pub/r/1.wav"}, {"recording": "https://x/r/play/1"}) == {}
    assert changed({"recording": "https://x/pub/r/1.wav"}, {"recording": None}) == {}


def test_one_event_id_per_version_of_the_details_and_the_calls_record_key():
    first = cloudtalk_envelope(dict(MODIFIED), "support", "webhook")
    again = cloudtalk_envelope(dict(MODIFIED, modified_at="2026-03-02T11:00:00.000Z"), "support", "webhook")
    other = cloudtalk_envelope(dict(MODIFIED, call_tags=["Billing"]), "support", "webhook")
    call = cloudtalk_envelope(dict(CALL), "support", "webhook")
    assert first.id == again.id != other.id
    assert first.id.startswith("cloudtalk:call:1002409191#details:")
    # the versions of a call's details share the call's record key: same partition, after it
    assert record_key(first.id) == record_key(other.id) == record_key(call.id) == call.id.encode()
    with pytest.raises(SchemaError, match="recording_url"):
        cloudtalk_envelope({k: v for k, v in RECORDING.items() if k != "recording_url"}, "support", "webhook")


def test_details_become_a_command_in_the_calls_lane_with_the_note_of_what_they_state():
    env = cloudtalk_envelope(dict(MODIFIED), "support", "webhook")
    [d] = calls.process_call(env, config())
    assert isinstance(d, Command)
    [logged] = calls.process_call(cloudtalk_envelope(dict(CALL), "support", "webhook"), config())
    assert isinstance(logged, Command)
    assert d.key == logged.key == "support|+447700900123"
    assert logged.body["details"] == details_of(CALL)
    body = d.body
    assert body["type"] == "kustomer.update_call_details"
    assert body["conversation"] == {"externalId": "cloudtalk-call-1002409191"}
    assert body["details"] == {"tags": ["Billing", "VIP"], "notes": ["Refund sent"], "rating": 5}
    version = env.id.rpartition(":")[2]
    assert body["note"]["marker"] == f"CloudTalk call 1002409191 · details updated ({version})"
    assert body["note"]["body"].splitlines() == [
        body["note"]["marker"],
        "Tags: Billing, VIP",
        "Notes: Refund sent",
        "Rating: 5/5",
    ]
    cleared = calls.process_call(cloudtalk_envelope(dict(MODIFIED, call_tags=[]), "support", "webhook"), config())[0]
    assert isinstance(cleared, Command) and "Tags: (none)" in cleared.body["note"]["body"]


def test_details_rules_inactive_not_connected_and_switched_off():
    env = cloudtalk_envelope(dict(RECORDING), "support", "webhook")
    decisions = calls.process_call(
        env,
        config(
            integration("on"),
            integration("off", calls={"details_updates": False}),
            integration("asleep", active=False),
            integration("elsewhere", calls={"connected_numbers": ["+442071234567"]}),
        ),
    )
    assert [type(d).__name__ for d in decisions] == ["Command", "Dropped", "Dropped", "Dropped"]
    assert [d.rule for d in decisions if isinstance(d, Dropped)] == [
        "call_details_off",
        "integration_inactive",
        "number_not_connected",
    ]
    bad = cloudtalk_envelope(dict(RECORDING, external_number="1234"), "support", "webhook")
    with pytest.raises(Reject, match="external_number"):
        calls.process_call(bad, config())


def test_the_pollers_snapshot_states_what_the_history_shows():
    item = {
        "Cdr": {
            "id": "1002409191",
            "type": "incoming",
            "public_external": "447700900123",
            "public_internal": "442012345678",
            "recorded": True,
            "recording_link": "https://my.cloudtalk.io/r/play/1002409191",
            "started_at": "2026-03-02T09:14:05.000Z",
            "answered_at": "2026-03-02T09:14:17.000Z",
            "ended_at": "2026-03-02T09:18:40.000Z",
            "talking_time": "263",
        },
        "Tags": [{"id": "1", "name": "Billing"}],
        "Notes": [],
        "Ratings": [{"id": "9", "type": "agent", "rating": 4}],
    }
    snapshot = details_snapshot(cdr_to_call_ended(item) or {})
    assert snapshot is not None
    env = cloudtalk_envelope(snapshot, "*", "poller")
    assert env.type == "call.modified"
    assert details_of(env.payload) == {
        "tags": ["Billing"],
        "notes": [],
        "rating": 4,
        "recording": "https://my.cloudtalk.io/r/play/1002409191",
    }
    # a record without any details has no snapshot
    bare = {**item, "Cdr": {**item["Cdr"], "recorded": False}, "Tags": [], "Ratings": []}
    assert details_snapshot(cdr_to_call_ended(bare) or {}) is None


def test_conversation_intelligence_only_for_integrations_that_enable_it():
    body = dict(MODIFIED, summary="Refund confirmed", smart_notes=["Refund sent"], transcription_url="https://x/t")
    body.pop("call_tags"), body.pop("call_notes"), body.pop("rating")
    env = cloudtalk_envelope(body, "*", "poller")
    on, off = calls.process_call(
        env, config(integration("on", calls={"conversation_intelligence": True}), integration("off"))
    )
    assert isinstance(on, Command) and isinstance(off, Dropped)
    assert off.rule == "conversation_intelligence_off"
    assert on.body["note"]["body"].splitlines()[1:] == [
        "Summary: Refund confirmed",
        "Smart notes: Refund sent",
        "Transcription: https://x/t",
    ]
    # details and intelligence in one event: the details still reach an integration without it
    mixed = cloudtalk_envelope(dict(body, call_tags=["VIP"]), "*", "poller")
    [plain] = calls.process_call(mixed, config(integration("off")))
    assert isinstance(plain, Command) and plain.body["details"] == {"tags": ["VIP"]}
    assert "Summary" not in plain.body["note"]["body"]


def test_a_long_summary_is_cut_and_the_other_lines_stay():
    body = dict(RECORDING, event="call.modified", summary="word " * 5000)
    env = cloudtalk_envelope(body, "*", "poller")
    [d] = calls.process_call(env, config(integration(calls={"conversation_intelligence": True})))
    assert isinstance(d, Command)
    note = d.body["note"]["body"]
    assert len(note) <= 10_240 and "[cut: " in note
    assert f"Recording: {RECORDING['recording_url']}" in note
