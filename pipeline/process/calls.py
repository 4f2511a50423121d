"""CloudTalk call ended → Kustomer conversation + note.

For every integration, in this order (the first rule that drops names the audit record):

1. the integration is Active;
2. internal calls are never exported;
3. the CloudTalk number is one of the integration's connected numbers (empty list = all);
4. the call type is exported (incoming answered / incoming missed / voicemail / outgoing answered /
   outgoing unanswered);
5. a number that belongs to no CloudTalk contact is logged only when "create customers for
   unknown numbers" is on.

Otherwise a ``kustomer.log_conversation`` command: find or create the customer by the external
number, create a conversation (name, open/done status of the call type, direction, externalId
``cloudtalk-call-{id}``) and add the call note. The command carries the details the note states
(:mod:`pipeline.core.call_details`), which the sink remembers for the call.

Details that change later (``call.modified``: Call Modified or the poller's snapshot of the call
history; ``recording.uploaded``) are decided by rules 1 and 3, then:

6. the integration follows details (``calls.details_updates``, on by default);
7. conversation intelligence (summary, smart notes, transcription link) only for integrations
   with ``calls.conversation_intelligence`` (off by default): left out for the others, and an
   event that states nothing else is dropped for them.

Otherwise a ``kustomer.update_call_details`` command for the call's conversation: the sink adds one
"details updated" note with what differs from what the call's notes already state, or nothing.
Its key is the call's own (integration and number), so it is performed after the call.
"""

from __future__ import annotations

from typing import Any

from pipeline.core import templates
from pipeline.core.call_details import INTELLIGENCE, details_of
from pipeline.core.config import Integration, PipelineConfig
from pipeline.core.decisions import (
    RULE_CALL_TYPE_DISABLED,
    RULE_DETAILS_OFF,
    RULE_INACTIVE,
    RULE_INTELLIGENCE_OFF,
    RULE_INTERNAL_CALL,
    RULE_NOT_CONNECTED,
    RULE_UNKNOWN_NUMBER,
    Command,
    Decision,
    Dropped,
    Reject,
)
from pipeline.core.envelope import Envelope, command_id
from pipeline.core.phones import normalize_e164
from pipeline.process import notes

CONVERSATION_NAMES = {
    "incoming_answered": "Incoming call from {number}",
    "incoming_missed": "Missed call from {number}",
    "voicemail": "Voicemail from {number}",
    "outgoing_answered": "Outgoing call to {number}",
    "outgoing_unanswered": "Unanswered call to {number}",
}
STATUS_LABELS = {
    "incoming_answered": "Answered",
    "incoming_missed": "Missed",
    "voicemail": "Missed (voicemail)",
    "outgoing_answered": "Answered",
    "outgoing_unanswered": "Not answered",
}


def is_answered(payload: dict[str, Any]) -> bool:
    status = payload.get("status")
    if status in ("answered", "missed"):
        return status == "answered"
    # no explicit status: answered when it was picked up and someone talked (an assumption: docs/platforms.md)
    return bool(payload.get("answered_at")) and (payload.get("talking_time") or 0) > 0


def call_type(payload: dict[str, Any]) -> str | None:
    """The workflow-settings call type; None for internal calls."""
    direction = payload["direction"]
    if direction == "internal":
        return None
    answered = is_answered(payload)
    if direction == "incoming":
        if answered:
            return "incoming_answered"
        return "voicemail" if payload.get("is_voicemail") else "incoming_missed"
    return "outgoing_answered" if answered else "outgoing_unanswered"


def note_values(payload: dict[str, Any], external: str, internal: str | None, ctype: str) -> dict[str, Any]:
    first, last = payload.get("agent_first_name") or "", payload.get("agent_last_name") or ""
    agent_name = f"{first} {last}".strip() or None
    email = payload.get("agent_email") or None
    agent = f"{agent_name} <{email}>" if agent_name and email else (agent_name or email)
    number_name = payload.get("internal_number_name") or None
    cloudtalk_number = f"{number_name} ({internal})" if number_name and internal else (internal or number_name)
    duration = notes.seconds_between(payload.get("started_at"), payload.get("ended_at"))
    tags = payload.get("call_tags") or []
    call_notes = payload.get("call_notes") or []
    return {
        "call_id": payload["call_id"],
        "call_uuid": payload.get("call_uuid"),
        "call_type": ctype,
        "direction": "Incoming" if payload["direction"] == "incoming" else "Outgoing",
        "status": STATUS_LABELS[ctype],
        "started": notes.human_time(payload.get("started_at")),
        "answered": notes.human_time(payload.get("answered_at")),
        "ended": notes.human_time(payload.get("ended_at")),
        "duration": duration,
        "talking_time": payload.get("talking_time"),
        "waiting_time": payload.get("waiting_time"),
        "wrapup_time": payload.get("wrapup_time"),
        "agent": agent,
        "agent_name": agent_name,
        "agent_email": email,
        "cloudtalk_number": cloudtalk_number,
        "cloudtalk_number_name": number_name,
        "customer_number": external,
        "tags": ", ".join(tags) or None,
        "notes": "; ".join(call_notes) or None,
        "rating": payload.get("rating"),
        "recording": payload.get("recording_url") or None,
        "contact_id": payload.get("contact_id"),
    }


def decide(env: Envelope, integration: Integration, external: str | None, internal: str | None) -> Decision:
    payload = env.payload
    if not integration.active:
        return Dropped(integration.name, RULE_INACTIVE)
    ctype = call_type(payload)
    if ctype is None or external is None:
        return Dropped(integration.name, RULE_INTERNAL_CALL)
    settings = integration.calls
    if internal is None or not settings.number_connected(internal):
        return Dropped(integration.name, RULE_NOT_CONNECTED, f"CloudTalk number {internal} is not connected")
    type_setting = settings.types[ctype]
    if not type_setting.export:
        return Dropped(integration.name, RULE_CALL_TYPE_DISABLED, ctype)
    known = payload.get("contact_id") is not None
    if not known and not settings.create_customers_for_unknown_numbers:
        return Dropped(integration.name, RULE_UNKNOWN_NUMBER, "no CloudTalk contact has this number")
    call_id = payload["call_id"]
    values = note_values(payload, external, internal, ctype)
    body = notes.render(settings.note_template or templates.DEFAULT_CALL_TEMPLATE, values, templates.CALL_MARKER)
    conversation = {
        "name": CONVERSATION_NAMES[ctype].format(number=external),
        "status": type_setting.status,
        "direction": "in" if payload["direction"] == "incoming" else "out",
        "externalId": f"cloudtalk-call-{call_id}",
    }
    command = notes.log_conversation(
        integration.name,
        env,
        "call",
        external,
        payload.get("contact_name"),
        conversation,
        body,
        templates.CALL_MARKER.format(call_id=call_id),
    )
    command.body["details"] = details_of(payload)
    return command


def decide_details(env: Envelope, integration: Integration, external: str, internal: str | None) -> Decision:
    """Rules 1, 3 and 6 for a change of a call's details."""
    if not integration.active:
        return Dropped(integration.name, RULE_INACTIVE)
    settings = integration.calls
    if internal is not None and not settings.number_connected(internal):
        return Dropped(integration.name, RULE_NOT_CONNECTED, f"CloudTalk number {internal} is not connected")
    if not settings.details_updates:
        return Dropped(integration.name, RULE_DETAILS_OFF)
    payload = env.payload
    cid = command_id(integration.name, env.id)
    details = details_of(payload)
    if not settings.conversation_intelligence:
        details = {k: v for k, v in details.items() if k not in INTELLIGENCE}
        if not details:
            return Dropped(integration.name, RULE_INTELLIGENCE_OFF)
    marker = templates.DETAILS_MARKER.format(call_id=payload["call_id"], version=env.id.rpartition(":")[2])
    values = {
        "call_id": payload["call_id"],
        "version": env.id.rpartition(":")[2],
        **{k: ", ".join(v) or "(none)" for k, v in details.items() if k == "tags"},
        **{k: "; ".join(v) or "(none)" for k, v in details.items() if k in ("notes", "smart_notes")},
        **{k: v for k, v in details.items() if k in ("rating", "recording", "summary", "transcription")},
    }
    body = notes.render(templates.DETAILS_TEMPLATE, values, templates.DETAILS_MARKER)
    return Command(
        integration.name,
        cid,
        f"{integration.name}|{external}",  # the call's lane: after the call's own command
        {
            "command_id": cid,
            "type": "kustomer.update_call_details",
            "integration": integration.name,
            "event_id": env.id,
            "occurred_at": env.occurred_at,
            "call_id": payload["call_id"],
            "customer": {"phone": external},
            "conversation": {"externalId": f"cloudtalk-call-{payload['call_id']}"},
            "details": details,
            "note": {"body": body, "marker": marker},
        },
    )


def process_call(env: Envelope, config: PipelineConfig) -> list[Decision]:
    """Evaluate one call event (ended, or its details changed) for every integration."""
    payload = env.payload
    if env.type in ("call.modified", "recording.uploaded"):
        number = normalize_e164(payload.get("external_number"))
        if number is None:
            raise Reject(
                "InvalidPhoneNumber",
                f"payload.external_number: {payload.get('external_number')!r} is not a possible phone number",
            )
        internal_number = normalize_e164(payload.get("internal_number"))
        return [decide_details(env, integration, number, internal_number) for integration in config.integrations]
    external = normalize_e164(payload.get("external_number"))
    internal = normalize_e164(payload.get("internal_number"))
    if payload["direction"] != "internal" and external is None:
        raise Reject(
            "InvalidPhoneNumber",
            f"payload.external_number: {payload.get('external_number')!r} is not a possible phone number",
        )
    return [decide(env, integration, external, internal) for integration in config.integrations]
