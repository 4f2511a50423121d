"""CloudTalk SMS sent/received → Kustomer conversation + note.

For every integration, in this order:

1. the integration is Active;
2. "Create Kustomer conversations for SMS" (the master switch) is on;
3. the CloudTalk number is one of the connected numbers for SMS (empty list = all);
4. the SMS type (incoming / outgoing) is exported;
5. unknown numbers are logged only when creating customers for them is on ([ASSUMPTION] rule 8
   applies to SMS; the SMS section may override the calls setting).

One conversation per message ([ASSUMPTION], not threaded), externalId ``cloudtalk-sms-{id}``.
"""

from __future__ import annotations

from typing import Any

from pipeline.core import templates
from pipeline.core.config import Integration, PipelineConfig
from pipeline.core.decisions import (
    RULE_INACTIVE,
    RULE_NOT_CONNECTED,
    RULE_SMS_DISABLED,
    RULE_SMS_TYPE_DISABLED,
    RULE_UNKNOWN_NUMBER,
    Decision,
    Dropped,
    Reject,
)
from pipeline.core.envelope import Envelope
from pipeline.core.phones import normalize_e164
from pipeline.process import notes


def note_values(payload: dict[str, Any], external: str, internal: str, sms_type: str) -> dict[str, Any]:
    incoming = sms_type == "incoming"
    agent_id = payload.get("agent_id")
    return {
        "sms_id": payload["sms_id"],
        "direction": "Incoming" if incoming else "Outgoing",
        "sender": external if incoming else internal,
        "recipient": internal if incoming else external,
        "cloudtalk_number": internal,
        "customer_number": external,
        "agent": f"agent {agent_id}" if agent_id and not incoming else None,
        "sent": notes.human_time(payload.get("created_at")),
        "text": payload.get("text") or None,
        "contact_id": payload.get("contact_id"),
    }


def decide(env: Envelope, integration: Integration, external: str, internal: str) -> Decision:
    payload = env.payload
    if not integration.active:
        return Dropped(integration.name, RULE_INACTIVE)
    settings = integration.sms
    if not settings.enabled:
        return Dropped(integration.name, RULE_SMS_DISABLED)
    if not settings.number_connected(internal):
        return Dropped(integration.name, RULE_NOT_CONNECTED, f"CloudTalk number {internal} is not connected for SMS")
    sms_type = "incoming" if payload["direction"] == "incoming" else "outgoing"
    type_setting = settings.types[sms_type]
    if not type_setting.export:
        return Dropped(integration.name, RULE_SMS_TYPE_DISABLED, sms_type)
    if payload.get("contact_id") is None and not settings.create_customers_for_unknown_numbers:
        return Dropped(integration.name, RULE_UNKNOWN_NUMBER, "no CloudTalk contact has this number")
    sms_id = payload["sms_id"]
    values = note_values(payload, external, internal, sms_type)
    body = notes.render(settings.note_template or templates.DEFAULT_SMS_TEMPLATE, values, templates.SMS_MARKER)
    conversation = {
        "name": f"SMS from {external}" if sms_type == "incoming" else f"SMS to {external}",
        "status": type_setting.status,
        "direction": "in" if sms_type == "incoming" else "out",
        "externalId": f"cloudtalk-sms-{sms_id}",
    }
    return notes.log_conversation(
        integration.name, env, "sms", external, None, conversation, body, templates.SMS_MARKER.format(sms_id=sms_id)
    )


def process_sms(env: Envelope, config: PipelineConfig) -> list[Decision]:
    payload = env.payload
    external = normalize_e164(payload.get("external_number"))
    internal = normalize_e164(payload.get("internal_number"))
    if external is None:
        raise Reject(
            "InvalidPhoneNumber",
            f"payload.external_number: {payload.get('external_number')!r} is not a possible phone number",
        )
    if internal is None:
        raise Reject(
            "InvalidPhoneNumber",
            f"payload.internal_number: {payload.get('internal_number')!r} is not a possible phone number",
        )
    return [decide(env, integration, external, internal) for integration in config.integrations]
