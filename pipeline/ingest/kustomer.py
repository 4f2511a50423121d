"""Kustomer outbound-webhook endpoint.

``POST /ingest/kustomer/{integration}`` — events ``kustomer.customer.create|update``.
``X-Kustomer-Webhook-Signature`` must be the lowercase hex HMAC-SHA256 of the raw body keyed
with the integration's webhook token (constant-time compare; on mismatch 401 and nothing is
published). Kustomer delivers at least once: a recently accepted event id is answered 200
without publishing again (best effort per replica; the sink's ledger is the real guard).
Events the pipeline does not use are acknowledged (200) so Kustomer does not retry them.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from typing import Any

from aiohttp import web

from pipeline.core.envelope import Envelope, customer_event_id, utc_now_iso
from pipeline.core.schemas import validate
from pipeline.ingest.base import IngestApp, problem
from pipeline.kafka.topics import Topics

SIGNATURE_HEADER = "X-Kustomer-Webhook-Signature"
EVENT_HEADER = "X-Kustomer-Webhook-Event"
EVENT_TYPES = {"kustomer.customer.create": "customer.created", "kustomer.customer.update": "customer.updated"}


def sign(token: str, raw: bytes) -> str:
    return hmac.new(token.encode(), raw, hashlib.sha256).hexdigest()


def kustomer_envelope(event: dict[str, Any], integration: str, via: str) -> Envelope:
    """Envelope of a webhook event (or a poller's synthesized one): id per customer version."""
    validate("kustomer.customer.event", event, prefix="payload")
    attrs = event["data"]["attributes"]
    updated = attrs.get("updatedAt") or attrs.get("createdAt") or event["createdAt"]
    return Envelope(
        id=customer_event_id(event["data"]["id"], attrs.get("rev"), updated),
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
        if ingest.config.get(name) is None:
            ingest.count(endpoint, 404)
            return problem(404, f"unknown integration {name!r}")
        token = tokens.get(name)
        if token is None:
            ingest.count(endpoint, 404)
            return problem(404, f"integration {name!r} has no Kustomer webhook token configured")
        raw, body = await ingest.read_json(request, endpoint)
        given = request.headers.get(SIGNATURE_HEADER, "")
        if not hmac.compare_digest(given.lower().encode(), sign(token, raw).encode()):
            ingest.count(endpoint, 401)
            return problem(401, f"missing or wrong {SIGNATURE_HEADER}")
        if not isinstance(body, dict):
            ingest.count(endpoint, 400)
            return problem(400, "payload: must be a JSON object (rule: type)", field="payload", rule="type")
        event_name = body.get("name") or request.headers.get(EVENT_HEADER)
        if event_name not in EVENT_TYPES:
            ingest.count(endpoint, 200)
            return web.json_response({"ignored": f"event {event_name!r} is not used by the pipeline"})
        event_id = f"{name}:{body.get('id')}"
        if body.get("id") and recent.seen(event_id):
            ingest.count(endpoint, 200)
            return web.json_response({"duplicate": body.get("id")})
        response = await ingest.accept(endpoint, topics.raw_customers, lambda: kustomer_envelope(body, name, "webhook"))
        if response.status == 202 and body.get("id"):
            recent.add(event_id)
        return response

    app.router.add_post("/ingest/kustomer/{integration}", handle)
