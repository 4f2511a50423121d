"""The envelope every raw event travels in, and the deterministic ids.

The same real-world event always gets the same id, whichever path brought it (webhook, poller,
backfill, initial import), so a duplicate delivery, a replay or a backfill produces the same
commands and the sinks' ledgers recognise them:

* ``cloudtalk:call:{call_id}``
* ``cloudtalk:sms:{sms_id}``
* ``cloudtalk:contact:{contact_id}:{modified_at}`` (``…:deleted`` for deletions)
* ``kustomer:customer:{id}:{rev}`` (``updatedAt`` when no ``rev`` is known)

A command id is derived from the event id and the integration (and the operation when one event
yields several commands for one integration): ``{integration}|{event_id}[|{op}]``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from pipeline.core.schemas import SchemaError, validate

SCHEMA_VERSION = 1
SOURCES = ("cloudtalk", "kustomer")
VIAS = ("webhook", "poller", "backfill", "import", "replay")


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: str) -> datetime:
    """ISO-8601 (``Z`` or offset) or CloudTalk's ``YYYY-MM-DD HH:MM:SS`` (UTC)."""
    text = value.strip().replace("Z", "+00:00")
    dt = datetime.fromisoformat(text)
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


INT64_MAX = 2**63 - 1


def exact_id(value: object, field: str) -> int:
    """A numeric id exactly as given: a JSON integer or a string of ASCII digits, 0 to 2^63-1.
    Anything else raises :class:`SchemaError` naming ``field`` — a float in particular, because
    two different large ids can be the same float and would then share one event id."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        number = int(value)
    else:
        raise SchemaError(f"{field}: must be an integer id, got {type(value).__name__} (rule: type)", field, "type")
    if not 0 <= number <= INT64_MAX:
        raise SchemaError(f"{field}: must be between 0 and 2^63-1 (rule: int64)", field, "int64")
    return number


def call_event_id(call_id: int | str) -> str:
    return f"cloudtalk:call:{exact_id(call_id, 'call_id')}"


def call_details_event_id(call_id: int | str, details: dict[str, Any]) -> str:
    """A call's details at one version: the same details give the same id (a redelivery, the
    poller seeing them again, a replay), changed details a new one. ``#`` separates the version
    from the call's own event id, which is the record key (:func:`record_key`)."""
    digest = hashlib.sha256(orjson.dumps(details, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
    return f"{call_event_id(call_id)}#details:{digest}"


def record_key(event_id: str) -> bytes:
    """The raw record key of an event: its id up to any ``#`` — so the versions of one call's
    details share a partition with the call itself and are processed after it."""
    return event_id.split("#", 1)[0].encode()


def sms_event_id(sms_id: int | str) -> str:
    return f"cloudtalk:sms:{exact_id(sms_id, 'sms_id')}"


def contact_event_id(contact_id: int | str, modified_at: str | None, deleted: bool = False) -> str:
    version = "deleted" if deleted else (modified_at or "unknown")
    return f"cloudtalk:contact:{exact_id(contact_id, 'contact_id')}:{version}"


def customer_event_id(customer_id: str, rev: int | None, updated_at: str | None) -> str:
    version = str(exact_id(rev, "rev")) if rev is not None else (updated_at or "unknown")
    return f"kustomer:customer:{customer_id}:{version}"


def command_id(integration: str, event_id: str, op: str | None = None) -> str:
    return f"{integration}|{event_id}" + (f"|{op}" if op else "")


@dataclass(frozen=True, slots=True)
class Envelope:
    id: str
    integration: str
    source: str
    type: str
    occurred_at: str
    received_at: str
    payload: dict[str, Any]
    schema: int = SCHEMA_VERSION
    via: str = "webhook"
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "id": self.id,
            "integration": self.integration,
            "source": self.source,
            "type": self.type,
            "occurred_at": self.occurred_at,
            "received_at": self.received_at,
            "schema": self.schema,
            "via": self.via,
            "payload": self.payload,
        }
        if self.meta:
            out["meta"] = self.meta
        return out

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, check: bool = True, payload: bool = True) -> Envelope:
        """Build from a decoded dict; with ``check`` the envelope is validated, and with
        ``payload`` its payload too (the edges do; see :func:`validate_envelope`)."""
        if check:
            validate_envelope(data, payload=payload)
        return cls(
            id=data["id"],
            integration=data["integration"],
            source=data["source"],
            type=data["type"],
            occurred_at=data["occurred_at"],
            received_at=data["received_at"],
            payload=data["payload"],
            schema=data.get("schema", SCHEMA_VERSION),
            via=data.get("via", "webhook"),
            meta=data.get("meta") or {},
        )

    @classmethod
    def from_json(cls, raw: bytes | None, *, check: bool = True, payload: bool = True) -> Envelope:
        if raw is None:
            raise SchemaError("record has no value (a tombstone?)", "value", "required")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise SchemaError(f"not valid JSON: {exc}", "value", "json") from None
        if not isinstance(data, dict):
            raise SchemaError("envelope must be a JSON object", "value", "type")
        return cls.from_dict(data, check=check, payload=payload)


# payload schema per (source, type)
PAYLOAD_SCHEMAS: dict[tuple[str, str], str] = {
    ("cloudtalk", "call.ended"): "cloudtalk.call.ended",
    ("cloudtalk", "call.modified"): "cloudtalk.call.modified",
    ("cloudtalk", "recording.uploaded"): "cloudtalk.recording.uploaded",
    ("cloudtalk", "sms.received"): "cloudtalk.sms",
    ("cloudtalk", "sms.sent"): "cloudtalk.sms",
    ("cloudtalk", "contact.created"): "cloudtalk.contact",
    ("cloudtalk", "contact.updated"): "cloudtalk.contact",
    ("cloudtalk", "contact.deleted"): "cloudtalk.contact",
    ("kustomer", "customer.created"): "kustomer.customer.event",
    ("kustomer", "customer.updated"): "kustomer.customer.event",
}


def validate_envelope(data: dict[str, Any], payload: bool = True) -> None:
    """The envelope schema, then (with ``payload``) the payload schema of its (source, type)."""
    validate("envelope", data)
    name = PAYLOAD_SCHEMAS.get((data["source"], data["type"]))
    if name is None:
        raise SchemaError(f"no event type {data['type']!r} for source {data['source']!r}", "type", "enum")
    if payload:
        validate(name, data["payload"], prefix="payload")
