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
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Any

import orjson
from fastjsonschema.draft07 import CodeGeneratorDraft07

from pipeline.core.schemas import SchemaError, load_schema, validate

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
        return cls(  # the fields in their order (positional: cheaper than by name)
            data["id"],
            data["integration"],
            data["source"],
            data["type"],
            data["occurred_at"],
            data["received_at"],
            data["payload"],
            data.get("schema", SCHEMA_VERSION),
            data.get("via", "webhook"),
            data.get("meta") or {},
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


# The envelope schema as :func:`usual_envelope_check` knows it (``description`` aside): when the schema
# file says anything else, that quick check is off and every envelope goes to the schema validator.
ENVELOPE_PROPERTIES: dict[str, dict[str, Any]] = {
    "id": {"type": "string", "minLength": 3, "maxLength": 300},
    "integration": {"type": "string", "pattern": "^(\\*|[a-z0-9][a-z0-9_-]{0,62})$"},
    "source": {"enum": list(SOURCES)},
    "type": {"type": "string", "pattern": "^[a-z]+\\.[a-z_]+$"},
    "occurred_at": {"type": "string", "format": "date-time"},
    "received_at": {"type": "string", "format": "date-time"},
    "schema": {"type": "integer", "minimum": 1},
    "via": {"enum": list(VIAS)},
    "payload": {"type": "object"},
    "meta": {"type": "object"},
}
ENVELOPE_REQUIRED = ("id", "integration", "source", "type", "occurred_at", "received_at", "schema", "payload")


def _schema_pattern(pattern: str) -> re.Pattern[str]:
    """A schema ``pattern`` as the schema validator compiles it (``$`` only at the very end)."""
    return re.compile(re.sub(r"(?<!\\)\$", r"\\Z", pattern))


@cache
def usual_envelope_check() -> Callable[[Any], bool]:
    """A quick check that says True only for an envelope the envelope schema certainly accepts —
    the usual one: known keys, each of its type, patterns and date-times by the same regular
    expressions as the schema validator. False leaves the answer (and its error message) to the
    schema validator. Built once from the schema file; when the file is not the schema it was
    written for (:data:`ENVELOPE_PROPERTIES`), it always says False."""
    schema = load_schema("envelope")
    properties = {
        name: {k: v for k, v in spec.items() if k != "description"} for name, spec in schema["properties"].items()
    }
    if (
        properties != ENVELOPE_PROPERTIES
        or schema.get("required") != list(ENVELOPE_REQUIRED)
        or schema.get("additionalProperties") is not False
        or schema.get("type") != "object"
        or set(schema)
        - {"$schema", "$id", "title", "description", "type", "required", "properties", "additionalProperties"}
    ):
        return lambda data: False
    required, allowed = frozenset(ENVELOPE_REQUIRED), frozenset(ENVELOPE_PROPERTIES)
    integration_ok = _schema_pattern(properties["integration"]["pattern"]).search
    type_ok = _schema_pattern(properties["type"]["pattern"]).search
    date_time_ok = re.compile(CodeGeneratorDraft07.FORMAT_REGEXS["date-time"]).match
    sources, vias = frozenset(SOURCES), frozenset(VIAS)
    str_, int_, dict_ = str, int, dict

    def check(data: Any) -> bool:
        if type(data) is not dict_:
            return False
        keys = data.keys()
        if not (required <= keys <= allowed):
            return False
        id_, integration, source, type_ = data["id"], data["integration"], data["source"], data["type"]
        occurred, received, schema_, via = data["occurred_at"], data["received_at"], data["schema"], data.get("via")
        return (
            type(id_) is str_
            and 3 <= len(id_) <= 300
            and type(integration) is str_
            and integration_ok(integration) is not None
            and type(source) is str_
            and source in sources
            and type(type_) is str_
            and type_ok(type_) is not None
            and type(occurred) is str_
            and date_time_ok(occurred) is not None
            and type(received) is str_
            and date_time_ok(received) is not None
            and type(schema_) is int_
            and schema_ >= 1
            and (via is None and "via" not in keys or type(via) is str_ and via in vias)
            and type(data["payload"]) is dict_
            and ("meta" not in keys or type(data["meta"]) is dict_)
        )

    return check


def validate_envelope(data: dict[str, Any], payload: bool = True) -> None:
    """The envelope schema, then (with ``payload``) the payload schema of its (source, type)."""
    if not usual_envelope_check()(data):  # the usual envelope passes without the general validator
        validate("envelope", data)
    name = PAYLOAD_SCHEMAS.get((data["source"], data["type"]))
    if name is None:
        raise SchemaError(f"no event type {data['type']!r} for source {data['source']!r}", "type", "enum")
    if payload:
        validate(name, data["payload"], prefix="payload")
