"""CloudTalk workflow-automation endpoints.

``POST /ingest/cloudtalk/{integration}/call-ended``  body: canonical call-ended body
``POST /ingest/cloudtalk/{integration}/call-modified``  body: canonical call-modified body
``POST /ingest/cloudtalk/{integration}/recording-uploaded``  body: canonical recording-uploaded body
``POST /ingest/cloudtalk/{integration}/sms``         body: canonical SMS body (sent or received)
``POST /ingest/cloudtalk/{integration}/contact``     body: canonical contact body (created/updated/deleted)

CloudTalk signs nothing, so each integration's workflow sends a shared secret in the static
header ``X-Pipeline-Secret``; its raw bytes are compared in constant time before the body is
read. An unknown integration gets the same 401 as a wrong secret. The same builder makes the
envelope for webhooks, pollers and backfills, so every path gives one event the same id.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any

from aiohttp import web

from pipeline.core.call_details import details_of
from pipeline.core.envelope import (
    Envelope,
    call_details_event_id,
    call_event_id,
    contact_event_id,
    exact_id,
    sms_event_id,
    utc_now_iso,
)
from pipeline.core.schemas import SchemaError, validate
from pipeline.ingest.base import BadRequest, IngestApp, header_bytes, json_object, parse_json, shown
from pipeline.kafka.topics import Topics

SECRET_HEADER = "X-Pipeline-Secret"
UNKNOWN_SECRET = secrets.token_hex(32).encode()  # what an unknown integration's secret is compared with

# endpoint kind -> (topics attribute, events it accepts)
KINDS: dict[str, tuple[str, frozenset[str]]] = {
    "call-ended": ("raw_calls", frozenset({"call.ended"})),
    "call-modified": ("raw_calls", frozenset({"call.modified"})),
    "recording-uploaded": ("raw_calls", frozenset({"recording.uploaded"})),
    "sms": ("raw_sms", frozenset({"sms.received", "sms.sent"})),
    "contact": ("raw_contacts", frozenset({"contact.created", "contact.updated", "contact.deleted"})),
}
PAYLOAD_SCHEMA = {
    "call.ended": "cloudtalk.call.ended",
    "call.modified": "cloudtalk.call.modified",
    "recording.uploaded": "cloudtalk.recording.uploaded",
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
    # ids exactly as sent (a float id is refused: two large ids can be the same float)
    if event == "call.ended":
        eid, occurred = call_event_id(exact_id(payload["call_id"], "payload.call_id")), payload["ended_at"]
    elif event in ("call.modified", "recording.uploaded"):
        # one id per version of the details: a redelivery or the poller seeing them again is the same event
        call_id = exact_id(payload["call_id"], "payload.call_id")
        eid = call_details_event_id(call_id, details_of(payload))
        occurred = payload.get("modified_at") or payload.get("uploaded_at") or utc_now_iso()
    elif event.startswith("sms."):
        eid, occurred = sms_event_id(exact_id(payload["sms_id"], "payload.sms_id")), payload["created_at"]
    else:
        contact_id = exact_id(payload["contact_id"], "payload.contact_id")
        eid = contact_event_id(contact_id, payload.get("modified_at"), deleted=event == "contact.deleted")
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
        if kind not in KINDS:
            raise BadRequest(404, f"unknown endpoint; use one of {sorted(KINDS)}")
        endpoint = f"cloudtalk/{kind}"
        # 1. authenticate on the header's raw bytes; an unknown integration is compared against a
        # random secret and gets the very same 401 as a wrong secret
        secret = ingest.secrets.get(name) if ingest.config.get(name) is not None else None
        given = header_bytes(request, SECRET_HEADER) or b""
        if not (hmac.compare_digest(given, secret.encode() if secret else UNKNOWN_SECRET) and secret):
            raise BadRequest(401, f"missing or wrong {SECRET_HEADER}")
        # 2. limits, 3. parse
        ingest.check_rate(name)
        body = json_object(parse_json(await ingest.read_body(request), ingest.limits.max_depth))
        topic_attr, events = KINDS[kind]
        event = body.get("event")
        if not isinstance(event, str) or event not in events:
            raise BadRequest(
                400,
                f"payload.event: {shown(event)} is not accepted here; expected one of {sorted(events)} (rule: enum)",
                "payload.event",
                "enum",
            )
        # 4. envelope and schema, 5. publish
        return await ingest.accept(
            endpoint, getattr(topics, topic_attr), lambda: cloudtalk_envelope(body, name, "webhook")
        )

    app.router.add_post("/ingest/cloudtalk/{integration}/{kind}", handle)
