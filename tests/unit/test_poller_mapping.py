"""The call-history record maps to the same canonical body (and event id) as the webhook."""

from __future__ import annotations

from pipeline.ingest.cloudtalk import cloudtalk_envelope
from pipeline.ingest.pollers import cdr_to_call_ended
from pipeline.process import calls
from tests.unit.test_call_sms_rules import config
from tests.unit.test_envelope_schemas import CALL

# reference 4.1, second block (GET /calls/index.json?call_id=1002409191)
RECORD = {
    "Cdr": {
        "id": "1002409191",
        "billsec": "275",
        "type": "incoming",
        "public_external": "447700900123",
        "public_internal": "442012345678",
        "recorded": True,
        "is_voicemail": False,
        "is_redirected": "0",
        "redirected_from": "",
        "is_local": True,
        "user_id": "493933",
        "talking_time": "263",
        "started_at": "2026-03-02T09:14:05.000Z",
        "answered_at": "2026-03-02T09:14:17.000Z",
        "ended_at": "2026-03-02T09:18:40.000Z",
        "waiting_time": 12,
        "wrapup_time": 30,
        "recording_link": "https://my.cloudtalk.io/r/play/1002409191",
    },
    "Contact": {
        "id": "1451646073",
        "name": "Jana Nováková",
        "type": "contact",
        "contact_numbers": ["447700900123"],
        "contact_emails": ["jana@example.org"],
        "tags": [],
        "external_urls": [],
        "custom_fields": [],
    },
    "CallNumber": {
        "id": "12345",
        "internal_name": "UK Support",
        "caller_id_e164": "442012345678",
        "country_code": "44",
        "area_code": "20",
    },
    "Agent": {
        "id": "493933",
        "firstname": "Max",
        "lastname": "Yellow",
        "fullname": "Max Yellow",
        "email": "max.yellow@example.com",
        "language": "en",
        "role": "Agent",
        "status": "online",
    },
    "BillingData": {"price": "0.000000"},
    "Notes": [{"id": "23", "name": "Customer asked for refund status"}],
    "Tags": [{"id": "124", "name": "Billing"}],
    "Ratings": [{"id": "9", "type": "agent", "rating": 4}],
}


def test_history_record_and_webhook_give_the_same_event_and_the_same_note_items():
    body = cdr_to_call_ended(RECORD)
    polled = cloudtalk_envelope(body, "*", "poller")
    hooked = cloudtalk_envelope(dict(CALL), "support", "webhook")
    assert polled.id == hooked.id == "cloudtalk:call:1002409191"
    for field in (
        "call_id",
        "direction",
        "status",
        "internal_number",
        "external_number",
        "contact_id",
        "agent_id",
        "agent_first_name",
        "agent_last_name",
        "agent_email",
        "started_at",
        "answered_at",
        "ended_at",
        "waiting_time",
        "talking_time",
        "wrapup_time",
        "is_voicemail",
        "call_tags",
        "call_notes",
        "rating",
        "internal_number_name",
    ):
        assert body[field] == CALL[field], field
    assert body["contact_name"] == "Jana Nováková"
    assert body["recording_url"] == "https://my.cloudtalk.io/r/play/1002409191"
    note_polled = calls.process_call(polled, config())[0].body["note"]["body"]
    note_hooked = calls.process_call(hooked, config())[0].body["note"]["body"]
    strip = lambda text: [ln for ln in text.splitlines() if not ln.startswith("Recording:")]  # noqa: E731
    assert strip(note_polled) == strip(note_hooked)


def test_active_calls_are_left_for_later_and_unknown_numbers_have_no_contact():
    active = {**RECORD, "Cdr": {**RECORD["Cdr"], "ended_at": None}}
    assert cdr_to_call_ended(active) is None
    unknown = {**RECORD, "Contact": None}
    body = cdr_to_call_ended(unknown)
    assert body["contact_id"] is None and body["contact_name"] is None


def test_missed_call_without_recording():
    missed = {**RECORD, "Cdr": {**RECORD["Cdr"], "answered_at": None, "talking_time": "0", "recorded": False}}
    body = cdr_to_call_ended(missed)
    assert body["status"] == "missed" and body["recording_url"] is None
