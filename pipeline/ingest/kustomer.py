"""Kustomer outbound-webhook endpoint.

``POST /ingest/kustomer/{integration}`` — events ``kustomer.customer.create|update``.
``X-Kustomer-Webhook-Signature`` must be the hex HMAC-SHA256 of the raw body keyed with the
integration's webhook token; it is checked (constant time, on the raw bytes) before the body is
parsed. A mismatch, an unknown integration and an integration without a webhook token all get
the same 401, and nothing is published. Kustomer delivers at least once: a recently accepted
event id is answered 200 without publishing again (best effort per replica; the sink's ledger is
the real guard). Events the pipeline does not use are acknowledged (200) so Kustomer does not
retry them.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from typing import Any

from aiohttp import web

from pipeline.core.envelope import Envelope, customer_event_id, exact_id, utc_now_iso
from pipeline.core.schemas import validate
from pipeline.ingest.base import BadRequest, IngestApp, header_bytes, json_object, parse_json, shown
from pipeline.kafka.topics import Topics

SIGNATURE_HEADER = "X-Kustomer-Webhook-Signature"
EVENT_HEADER = "X-Kustomer-Webhook-Event"
UNKNOWN_TOKEN = secrets.token_hex(32).encode()  # what an unknown integration's signature is checked with
EVENT_TYPES = {"kustomer.customer.create": "customer.created", "kustomer.customer.update": "customer.updated"}


def sign(token: str, raw: bytes) -> str:
    return hmac.new(token.encode(), raw, hashlib.sha256).hexdigest()


def kustomer_envelope(event: dict[str, Any], integration: str, via: str) -> Envelope:
    """Envelope of a webhook event (or a poller's synthesized one): id per customer version."""
    validate("kustomer.customer.event", event, prefix="payload")
    attrs = event["data"]["attributes"]
    updated = attrs.get("updatedAt") or attrs.get("createdAt") or event["createdAt"]
    rev = attrs.get("rev")
    return Envelope(
        id=customer_event_id(
            event["data"]["id"], None if rev is None else exact_id(rev, "payload.data.attributes.rev"), updated
        ),
        integration=integration,
        source="kustomer",
        type=EVENT_TYPES[event["name"]],
        occurred_at=updated,
        received_at=utc_now_iso(),
        payload=event,
        via=via,
    )


class RecentIds:
    def __init__(self, size: int = 100_000) -> None:
        self.size, self._ids = size, OrderedDict[str, None]()

    def seen(self, key: str) -> bool:
        if key in self._ids:
            self._ids.move_to_end(key)
            return True
        return False

    def add(self, key: str) -> None:
        self._ids[key] = None
        if len(self._ids) > self.size:
            self._ids.popitem(last=False)


def add_routes(app: web.Application, ingest: IngestApp, topics: Topics, tokens: dict[str, str]) -> None:
    recent = RecentIds()

    async def handle(request: web.Request) -> web.Response:
        name = request.match_info["integration"]
        endpoint = "kustomer/customer"
        # 1. authenticate: the signature over the raw body, before anything is parsed; an unknown
        # integration (or one without a webhook token) is checked against a random token and gets
        # the very same 401 as a wrong signature
        token = tokens.get(name) if ingest.config.get(name) is not None else None
        raw = await ingest.read_body(request)
        given = (header_bytes(request, SIGNATURE_HEADER) or b"").lower()
        expected = hmac.new(token.encode() if token else UNKNOWN_TOKEN, raw, hashlib.sha256).hexdigest().encode()
        if not (hmac.compare_digest(given, expected) and token):
            raise BadRequest(401, f"missing or wrong {SIGNATURE_HEADER}")
        # 2. limits, 3. parse
        ingest.check_rate(name)
        body = json_object(parse_json(raw, ingest.limits.max_depth))
        event_name = body.get("name") or event_header(request)
        if not isinstance(event_name, str):
            raise BadRequest(400, "payload.name: must be string (rule: type)", "payload.name", "type")
        if event_name not in EVENT_TYPES:
            ingest.count(endpoint, 200)
            return web.json_response({"ignored": f"event {shown(event_name)} is not used by the pipeline"})
        webhook_id = body.get("id")
        if webhook_id is not None and not isinstance(webhook_id, str):
            raise BadRequest(400, "payload.id: must be string (rule: type)", "payload.id", "type")
        event_id = f"{name}:{webhook_id}"
        if webhook_id and recent.seen(event_id):
            ingest.count(endpoint, 200)
            return web.json_response({"duplicate": webhook_id})
        # 4. envelope and schema, 5. publish
        response = await ingest.accept(endpoint, topics.raw_customers, lambda: kustomer_envelope(body, name, "webhook"))
        if response.status == 202 and webhook_id:
            recent.add(event_id)
        return response

    app.router.add_post("/ingest/kustomer/{integration}", handle)


def event_header(request: web.Request) -> str | None:
    """``X-Kustomer-Webhook-Event`` as text; 400 when it is not ASCII."""
    raw = header_bytes(request, EVENT_HEADER)
    if raw is None:
        return None
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest(400, f"{EVENT_HEADER}: must be ASCII (rule: encoding)", EVENT_HEADER, "encoding") from None
