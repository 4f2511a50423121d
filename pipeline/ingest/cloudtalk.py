"""CloudTalk workflow-automation endpoints.

``POST /ingest/cloudtalk/{integration}/call-ended``  body: canonical call-ended body
``POST /ingest/cloudtalk/{integration}/sms``         body: canonical SMS body (sent or received)
``POST /ingest/cloudtalk/{integration}/contact``     body: canonical contact body (created/updated/deleted)

CloudTalk signs nothing, so each integration's workflow sends a shared secret in the static
header ``X-Pipeline-Secret``; it is compared in constant time. The same builder makes the
envelope for webhooks, pollers and backfills, so every path gives one event the same id.
"""

from __future__ import annotations

import hmac
from typing import Any

from aiohttp import web

from pipeline.core.envelope import (
    Envelope,
    call_event_id,
    contact_event_id,
    sms_event_id,
    utc_now_iso,
)
from pipeline.core.schemas import SchemaError, validate
from pipeline.ingest.base import IngestApp, problem
from pipeline.kafka.topics import Topics

SECRET_HEADER = "X-Pipeline-Secret"

# endpoint kind -> (topics attribute, events it accepts)
KINDS: dict[str, tuple[str, frozenset[str]]] = {
    "call-ended": ("raw_calls", frozenset({"call.ended"})),
    "sms": ("raw_sms", frozenset({"sms.received", "sms.sent"})),
    "contact": ("raw_contacts", frozenset({"contact.created", "contact.updated", "contact.deleted"})),
}
PAYLOAD_SCHEMA = {
    "call.ended": "cloudtalk.call.ended",
    "sms.received": "cloudtalk.sms",
    "sms.sent": "cloudtalk.sms",
    "contact.created": "cloudtalk.contact",
    "contact.updated": "cloudtalk.contact",
    "contact.deleted": "cloudtalk.contact",
}


def cloudtalk_envelope(payload: dict[str, Any], integration: str, via: str) -> Envelope:
    """The envelope of a canonical CloudTalk body; the payload is schema-checked first."""
    event = payload.get("event")
    schema = PAYLOAD_SCHEMA.get(event) if isinstance(event, str) else None
    if event is None or schema is None:
        raise SchemaError(
            f"payload.event: {event!r} is not one of {sorted(PAYLOAD_SCHEMA)} (rule: enum)", "payload.event", "enum"
        )
    validate(schema, payload, prefix="payload")
    if event == "call.ended":
        eid, occurred = call_event_id(payload["call_id"]), payload["ended_at"]
    elif event.startswith("sms."):
        eid, occurred = sms_event_id(payload["sms_id"]), payload["created_at"]
    else:
        eid = contact_event_id(payload["contact_id"], payload.get("modified_at"), deleted=event == "contact.deleted")
        occurred = payload["modified_at"]
    return Envelope(
        id=eid,
        integration=integration,
        source="cloudtalk",
        type=event,
        occurred_at=occurred,
        received_at=utc_now_iso(),
        payload=payload,
        via=via,
    )


def add_routes(app: web.Application, ingest: IngestApp, topics: Topics) -> None:
    async def handle(request: web.Request) -> web.Response:
        name, kind = request.match_info["integration"], request.match_info["kind"]
        endpoint = f"cloudtalk/{kind}"
        if kind not in KINDS:
            ingest.count("cloudtalk/unknown", 404)
            return problem(404, f"unknown endpoint {kind!r}; use one of {sorted(KINDS)}")
        if ingest.config.get(name) is None:
            ingest.count(endpoint, 404)
            return problem(404, f"unknown integration {name!r}")
        given = request.headers.get(SECRET_HEADER, "")
        if not hmac.compare_digest(given.encode(), ingest.secrets[name].encode()):
            ingest.count(endpoint, 401)
            return problem(401, f"missing or wrong {SECRET_HEADER}")
        _raw, body = await ingest.read_json(request, endpoint)
        if not isinstance(body, dict):
            ingest.count(endpoint, 400)
            return problem(400, "payload: must be a JSON object (rule: type)", field="payload", rule="type")
        topic_attr, events = KINDS[kind]
        if body.get("event") not in events:
            ingest.count(endpoint, 400)
            return problem(
                400,
                f"payload.event: {body.get('event')!r} is not accepted here; expected one of "
                f"{sorted(events)} (rule: enum)",
                field="payload.event",
                rule="enum",
            )
        return await ingest.accept(
            endpoint, getattr(topics, topic_attr), lambda: cloudtalk_envelope(body, name, "webhook")
        )

    app.router.add_post("/ingest/cloudtalk/{integration}/{kind}", handle)
