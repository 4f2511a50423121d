"""Kustomer REST API simulator (reference §2), with signed outbound webhooks.

One simulator is one Kustomer org; its base URL plays ``https://{org}.api.kustomerapp.com``.

API routes (``Authorization: Bearer <key>``; JSON:API envelopes of §2.1)::

    GET    /v1/auth/tokens/current · /v1/users/current · /v1/users · /v1/users/{id}
    GET    /v1/companies · /v1/companies/{id}          POST /v1/companies
    POST   /v1/customers                               201 (setting create_status)
    GET    /v1/customers                               filter[updatedAt|createdAt][gte|gt|lte|lt], sort, page,
                                                       pageSize ≤ 100
    GET    /v1/customers/{id}                          also email={e}, phone={p}, externalId={x} (404 when none)
    PUT    /v1/customers/{id}[?replace=false]          without replace=false the sent body replaces the customer
    PATCH  /v1/customers/{id}                          [ASSUMPTION] partial update (setting patch_customers)
    GET    /v1/customers/{id}/conversations            page, pageSize
    POST   /v1/customers/search                        queryContext customer|conversation, and/or/not, sort,
                                                       page, pageSize ≤ 500, idsOnly; 100/min per key
    POST   /v1/conversations · GET /v1/conversations · GET|PUT|PATCH /v1/conversations/{id}
    GET    /v1/conversations/{id}/notes · POST /v1/conversations/{id}/notes ([ASSUMPTION] legacy form)
    POST   /v1/notes · GET|PUT|PATCH /v1/notes/{id}    body 1–10,240 chars, userMentions ≤ 20
    POST   /v1/notes/bulk                              array of note bodies (+ ``_clientRef``); 202, async
    POST|GET /v1/outbound-webhooks · GET|DELETE /v1/outbound-webhooks/{id} · GET /v1/outbound-webhooks/events

Behaviour:

* 401 ``unauthorized`` for a missing or unknown key, 403 ``forbidden`` when the key has none of the
  roles the route accepts (both role families of §2.1). Each key is backed by a machine user that
  becomes ``createdBy``/``modifiedBy`` of what it writes.
* Values of ``emails``, ``phones``, ``whatsapps``, ``socials`` and ``externalId(s)`` are unique in
  the org: a write that would give a second customer one of them is a 409 ``duplicate`` with an
  ``errors`` array naming the field (``source.pointer``); nothing is written. ``shared*`` lists are
  not unique. 400 ``bad_request`` names the field for wrong types, enum values, custom suffixes.
* Rate limits (§2.8): an org-wide fixed window (default 1000/min) with ``x-ratelimit-limit``,
  ``x-ratelimit-remaining``, ``x-ratelimit-reset`` (epoch seconds) on every response
  ([ASSUMPTION], setting), 429 ``too_many_requests`` when spent; 120 conversation creates and 120
  note creates per minute per customer (``importedAt`` exempts conversations); search 100/min per
  key. A rejected request changes nothing.
* Bulk notes (§2.2 says only: ``POST /v1/notes/bulk``, items may carry ``_clientRef``, async).
  [ASSUMPTION] the body is a JSON array of 1 to ``bulk_max_items`` (100) ``POST /v1/notes`` bodies
  (``conversation`` required), each with an optional string ``_clientRef``; an invalid item refuses
  the whole request with 400 pointing at ``/data/<index>/…``. Accepted: 202
  ``{"data": {"type": "bulk", "id", "attributes": {"status": "queued", "count", "createdAt"}}}``;
  there is no route to poll the job (none is documented): a client finds the notes with
  ``GET /v1/conversations/{id}/notes``, where each carries ``attributes._clientRef``. The notes are
  created ``bulk_delay_s`` (0.5 s) after the 202, in array order. The request counts once in the
  org window; each item counts once against its customer's note window (120/min), charged at
  acceptance: when a customer's window cannot take all of its items the request is a 429 and
  nothing is queued. The request log has one entry (effect ``notes.bulk <job id> items=<n>``) whose
  ``items`` fill in as the job runs: ``{"index", "_clientRef", "conversation", "status"
  (``queued``, then 201 / 404 / a fault's status), "id", "effect" (``note.create <id>
  conversation=<id>``, as for single creates), "fault"}``. Request faults hit the route like any
  other; an ``item`` fault rule matched against ``POST /v1/notes/bulk`` fails single items (not
  created) while the rest are. ``/_sim/state`` lists ``bulk_jobs``; ``KustomerSim.wait_bulk()``
  waits for them. No bulk conversations route: §2.2 lists none.
* Outbound webhooks (§2.10, §2.11): ``kustomer.customer.create|update`` for API writes
  (``client: api-gw``) and agent edits (``client: web``), with ``changes`` on updates, header
  ``X-Kustomer-Webhook-Event`` and ``X-Kustomer-Webhook-Signature`` = lowercase hex HMAC-SHA256 of
  the raw body keyed by the webhook token. Delivered from a background task, retried with
  backoff (at-least-once), optionally shuffled (out of order); a webhook is disabled after
  ``webhook_disable_after`` events that failed in a row. ``url`` must be https unless
  ``webhook_allow_http``.

Inspection routes (no auth)::

    GET  /_sim/state                 customers, companies, users, conversations, notes, bulk_jobs, webhooks,
                                     deliveries
    POST /_sim/seed                  {"customers": [...], "companies": [...], "users": [...]} (no webhooks fire)
    POST /_sim/keys                  {"key", "roles": [...], "name"?}
    POST /_sim/customers             an agent creates a customer: {"attributes": {...}, "user"?, "company"?} → webhook
    POST /_sim/customers/{id}/edit   an agent edits a customer: {"attributes": {...}, "user"?} → webhook
    GET  /_sim/deliveries            ?status=pending|delivered|failed
    POST /_sim/deliveries/{event_id}/redeliver
    GET  /_sim/settings  POST /_sim/settings   runtime settings
    plus /_sim/requests, /_sim/faults, /_sim/reset (devkit.sim.base)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import itertools
import random
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from devkit.sim.base import (
    FAULT_RESPONDER,
    SIM_PREFIX,
    FaultPlan,
    FixedWindow,
    RequestLog,
    SimServer,
    WindowState,
    get_logger,
    inspection_routes,
    json_response,
    make_middleware,
    now_iso_ms,
    phone_key,
    set_effect,
    set_items,
)

log = get_logger(__name__)

HELP = "Kustomer REST API simulator (customers, conversations, notes, search) with signed outbound webhooks"
DEFAULT_PORT = 8091

ALL_ROLES = ("org.admin", "org.permission", "org.user")
SIM_KEY = web.RequestKey("kustomer_sim_key", object)
CUSTOM_SUFFIXES = ("Num", "At", "Str", "Txt", "Bool", "Url")
UNIQUE_LISTS = {"emails": "email", "phones": "phone", "whatsapps": "phone", "socials": "username"}
UNIQUE_KINDS = {"emails": "email", "phones": "phone", "whatsapps": "whatsapp", "socials": "username"}
SHARED_LISTS = ("sharedEmails", "sharedPhones", "sharedWhatsapps", "sharedSocials", "sharedExternalIds")
CUSTOMER_EVENTS = ("kustomer.customer.create", "kustomer.customer.update")
SUBSCRIBABLE = CUSTOMER_EVENTS + (
    "kustomer.conversation.create",
    "kustomer.conversation.update",
    "kustomer.message.create",
)

# accepted roles per operation (any one); org.admin and the base families grant everything
R_CUSTOMER_READ = ("org.permission.customer.read", "org.user.customer.read")
R_CUSTOMER_WRITE = ("org.permission.customer.create", "org.permission.customer.update", "org.user.customer.write")
R_CONV_READ = ("org.permission.conversation.read", "org.user.conversation.read")
R_CONV_WRITE = (
    "org.permission.conversation.create",
    "org.permission.conversation.update",
    "org.user.conversation.write",
)
R_NOTE_READ = ("org.permission.note.read", "org.user.note.read")
R_NOTE_WRITE = ("org.permission.note.create", "org.permission.note.update", "org.user.note.write")
R_SEARCH = ("org.permission.search.create", "org.user.search.read", "org.admin.search.read")
R_HOOKS = (
    "org.permission.outbound_webhook",
    "org.permission.outbound_webhook.read",
    "org.admin.outbound_webhooks",
    "org.outbound_webhooks",
)
R_ANY = ("*",)


@dataclass
class KustomerSimSettings:
    """Everything configurable; [ASSUMPTION] marks defaults the reference could not confirm."""

    org_name: str = "acme"  # [--org-name]
    rate_limit: int = 1000  # [--rate-limit] org-wide per window (Enterprise plan)
    window_seconds: float = 60.0  # [--window-seconds]
    per_customer_limit: int = 120  # [--per-customer-limit] conversation / note creates per customer
    search_limit: int = 100  # [--search-limit] searches per window per key
    rate_headers_always: bool = True  # [--rate-headers always|429] [ASSUMPTION §2.8]
    create_status: int = 201  # [--create-status] [ASSUMPTION §6.11] 200 or 201
    unique_phones: str = "exact"  # [--unique-phones exact|e164] [ASSUMPTION §2.3.3] how phone
    # uniqueness compares values; lookups match on E.164 either way
    patch_customers: bool = True  # [--no-patch-customers] [ASSUMPTION §2.2]
    legacy_notes_route: bool = True  # [--no-legacy-notes] [ASSUMPTION §2.2]
    max_page_size: int = 100
    search_max_page_size: int = 500
    note_max_length: int = 10_240
    bulk_max_items: int = 100  # [--bulk-max-items] [ASSUMPTION §2.2] notes per bulk request
    bulk_delay_s: float = 0.5  # [--bulk-delay] [ASSUMPTION §2.2] a bulk's notes exist this long after the 202
    webhook_allow_http: bool = False  # [--webhook-allow-http] the API demands https
    webhook_attempts: int = 6  # [--webhook-attempts] tries per event
    webhook_base_delay_s: float = 0.5  # [--webhook-base-delay] backoff base * 2**(n-1)
    webhook_max_delay_s: float = 30.0
    webhook_timeout_s: float = 5.0  # [--webhook-timeout] per attempt
    webhook_shuffle_ms: int = 0  # [--webhook-shuffle-ms] random delay before a delivery: out of order
    webhook_disable_after: int = 50  # events failed in a row before a webhook is disabled

    def check(self) -> None:
        problems = []
        if self.rate_limit < 1 or self.per_customer_limit < 1 or self.search_limit < 1:
            problems.append("limits must be >= 1")
        if self.window_seconds <= 0:
            problems.append("window_seconds must be > 0")
        if self.create_status not in (200, 201):
            problems.append("create_status must be 200 or 201")
        if self.unique_phones not in ("exact", "e164"):
            problems.append("unique_phones must be exact or e164")
        if self.webhook_attempts < 1:
            problems.append("webhook_attempts must be >= 1")
        if self.bulk_max_items < 1:
            problems.append("bulk_max_items must be >= 1")
        if self.bulk_delay_s < 0:
            problems.append("bulk_delay_s must be >= 0")
        if problems:
            raise ValueError("; ".join(problems))


class ApiError(Exception):
    """An error answer in Kustomer's shape (both §2.9 forms at once)."""

    CODES = {
        400: "bad_request",
        401: "unauthorized",
        403: "forbidden",
        404: "not_found",
        409: "duplicate",
        413: "payload_too_large",
        429: "too_many_requests",
        500: "internal_error",
        503: "unavailable",
    }

    def __init__(self, status: int, detail: str, pointer: str | None = None, parameter: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.pointer, self.parameter = status, detail, pointer, parameter

    def body(self) -> dict[str, Any]:
        code = self.CODES.get(self.status, "error")
        err: dict[str, Any] = {
            "status": str(self.status),
            "code": code,
            "title": code.replace("_", " "),
            "detail": self.detail,
            "message": self.detail,
            "meta": {},
        }
        if self.pointer:
            err["source"] = {"pointer": self.pointer}
        elif self.parameter:
            err["source"] = {"parameter": self.parameter}
        return {"errors": [err]}


def object_id(counter: Callable[[], int]) -> str:
    """24 hex characters, Mongo ObjectId style: time, then a process-unique counter."""
    return f"{int(time.time()):08x}{counter():016x}"


def _iso(ts: float) -> str:
    return now_iso_ms(ts)


def _parse_time(value: str) -> float | None:
    text = value.strip()
    try:
        if len(text) == 10:
            return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
    except ValueError:
        return None


def _norm_phone(value: str) -> str:
    return phone_key(value)


def _unique_value(kind: str, value: str) -> str:
    return value.strip().lower() if kind in ("email", "username", "externalId") else _norm_phone(value)


@dataclass
class Key:
    token: str
    roles: tuple[str, ...]
    user_id: str
    name: str

    def allows(self, accepted: tuple[str, ...]) -> bool:
        if "*" in accepted or any(r in ("org.admin", "org.permission", "org.user") for r in self.roles):
            return True
        return any(r in self.roles for r in accepted)


@dataclass
class Webhook:
    id: str
    name: str
    url: str
    events: list[str]
    headers: list[dict[str, str]]
    token: str
    enabled: bool = True
    failed_in_a_row: int = 0
    created_at: float = field(default_factory=time.time)


@dataclass
class BulkJob:
    """An accepted ``POST /v1/notes/bulk``: its notes are created ``bulk_delay_s`` later."""

    id: str
    created_at: float
    items: list[dict[str, Any]]  # the request log's items: index, _clientRef, conversation, status, id, effect
    status: str = "queued"  # queued | done

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "createdAt": _iso(self.created_at), "items": self.items}


@dataclass
class Delivery:
    event_id: str
    webhook_id: str
    event: str
    body: bytes
    status: str = "pending"  # pending | delivered | failed
    attempts: list[dict[str, Any]] = field(default_factory=list)


class KustomerSim:
    def __init__(
        self,
        settings: KustomerSimSettings | None = None,
        *,
        keys: dict[str, tuple[str, ...]] | None = None,
        seed: dict[str, Any] | None = None,
        fault_seed: int | None = None,
    ) -> None:
        self.settings = settings or KustomerSimSettings()
        self.settings.check()
        self.log = RequestLog()
        self.faults = FaultPlan(fault_seed)
        self.initial_keys = dict(keys or {"sim-api-key": ALL_ROLES})
        self.initial_seed = seed or {}
        self._counter = itertools.count(1)
        self._http: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.root_url = ""
        self.reset()

    # -- state -----------------------------------------------------------------------------------
    def reset(self) -> None:
        self.org_id = self.new_id()
        self.users: dict[str, dict[str, Any]] = {}
        self.keys: dict[str, Key] = {}
        self.companies: dict[str, dict[str, Any]] = {}
        self.customers: dict[str, dict[str, Any]] = {}
        self.unique: dict[tuple[str, str], str] = {}  # (kind, compared value) -> customer id
        self.lookup: dict[tuple[str, str], str] = {}  # (kind, normalized value) -> customer id (first holder)
        self.conversations: dict[str, dict[str, Any]] = {}
        self.notes: dict[str, dict[str, Any]] = {}
        self.bulk_jobs: dict[str, BulkJob] = {}
        self.webhooks: dict[str, Webhook] = {}
        self.deliveries: list[Delivery] = []
        self.org_window = FixedWindow(self.settings.rate_limit, self.settings.window_seconds)
        self.search_windows = FixedWindow(self.settings.search_limit, self.settings.window_seconds)
        self.conversation_windows = FixedWindow(self.settings.per_customer_limit, self.settings.window_seconds)
        self.note_windows = FixedWindow(self.settings.per_customer_limit, self.settings.window_seconds)
        self.agent_id = self.add_user("Agent Smith", "agent.smith@example.com")["id"]
        for token, roles in self.initial_keys.items():
            self.add_key(token, roles)
        if self.initial_seed:
            self.seed(self.initial_seed)

    def new_id(self) -> str:
        return object_id(lambda: next(self._counter))

    def add_user(
        self, name: str, email: str | None, machine: bool = False, user_id: str | None = None
    ) -> dict[str, Any]:
        uid = user_id or self.new_id()
        now = time.time()
        self.users[uid] = {"id": uid, "name": name, "email": email, "machine": machine, "createdAt": now}
        return self.users[uid]

    def add_key(self, token: str, roles: tuple[str, ...] | list[str], name: str | None = None) -> Key:
        name = name or f"API key {len(self.keys) + 1}"
        user = self.add_user(name, None, machine=True)
        key = self.keys[token] = Key(token, tuple(roles), user["id"], name)
        return key

    def seed(self, data: dict[str, Any]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {"users": [], "companies": [], "customers": []}
        for u in data.get("users") or []:
            out["users"].append(self.add_user(u.get("name", "User"), u.get("email"), user_id=u.get("id"))["id"])
        for c in data.get("companies") or []:
            cid = c.get("id") or self.new_id()
            now = time.time()
            self.companies[cid] = {
                "id": cid,
                "attributes": {"name": c.get("name"), **(c.get("attributes") or {})},
                "createdAt": now,
                "updatedAt": now,
            }
            out["companies"].append(cid)
        for c in data.get("customers") or []:
            attrs = {k: v for k, v in c.items() if k not in ("id", "createdBy", "modifiedBy", "company")}
            author = c.get("createdBy") or self.agent_id
            if author not in self.users:
                self.add_user("Seeded user", None, user_id=author)
            ts = _parse_time(c["updatedAt"]) if c.get("updatedAt") else None
            customer = self._create_customer(
                attrs, author, cid=c.get("id"), company=c.get("company"), at=ts, check=True
            )
            out["customers"].append(customer["id"])
        return out

    # -- customers -------------------------------------------------------------------------------
    def _validate_customer(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not body:
            raise ApiError(400, "Invalid request body or parameters: expected a JSON object.", "/data")
        for key in (
            "name",
            "externalId",
            "username",
            "avatarUrl",
            "birthdayAt",
            "defaultLang",
            "importedAt",
            "company",
        ):
            if key in body and body[key] is not None and not isinstance(body[key], str):
                raise ApiError(400, f"{key} must be a string.", f"/data/attributes/{key}")
        if "gender" in body and body["gender"] not in (None, "m", "f"):
            raise ApiError(400, "gender must be one of m, f.", "/data/attributes/gender")
        for list_name, value_key in (
            *UNIQUE_LISTS.items(),
            ("sharedEmails", "email"),
            ("sharedPhones", "phone"),
            ("sharedWhatsapps", "phone"),
            ("sharedSocials", "username"),
            ("urls", "url"),
        ):
            items = body.get(list_name)
            if items is None:
                continue
            if not isinstance(items, list):
                raise ApiError(400, f"{list_name} must be an array.", f"/data/attributes/{list_name}")
            for i, item in enumerate(items):
                if not isinstance(item, dict) or not isinstance(item.get(value_key), str) or not item[value_key]:
                    raise ApiError(
                        400,
                        f"{list_name}[{i}].{value_key} is required and must be a string.",
                        f"/data/attributes/{list_name}/{i}/{value_key}",
                    )
                if list_name in ("emails", "sharedEmails") and "@" not in item["email"]:
                    raise ApiError(
                        400,
                        f"{list_name}[{i}].email is not a valid e-mail address.",
                        f"/data/attributes/{list_name}/{i}/email",
                    )
        for list_name in ("externalIds", "sharedExternalIds"):
            items = body.get(list_name)
            if items is not None and (
                not isinstance(items, list)
                or not all(isinstance(x, dict) and isinstance(x.get("externalId"), str) for x in items)
            ):
                raise ApiError(400, f"{list_name} must be an array of {{externalId}}.", f"/data/attributes/{list_name}")
        if "locations" in body and body["locations"] is not None and not isinstance(body["locations"], list):
            raise ApiError(400, "locations must be an array.", "/data/attributes/locations")
        if "tags" in body and body["tags"] is not None and not isinstance(body["tags"], list):
            raise ApiError(400, "tags must be an array of tag ids.", "/data/attributes/tags")
        custom = body.get("custom")
        if custom is not None:
            if not isinstance(custom, dict):
                raise ApiError(400, "custom must be an object.", "/data/attributes/custom")
            for k in custom:
                if not k.endswith(CUSTOM_SUFFIXES):
                    raise ApiError(
                        400,
                        f"custom attribute {k!r} must end with one of {', '.join(CUSTOM_SUFFIXES)}.",
                        f"/data/attributes/custom/{k}",
                    )
        return body

    def _unique_values(self, attrs: dict[str, Any]) -> list[tuple[str, str, str]]:
        """(kind, compared value, pointer) of every org-unique value."""
        out = []
        for list_name, value_key in UNIQUE_LISTS.items():
            kind = UNIQUE_KINDS[list_name]
            for i, item in enumerate(attrs.get(list_name) or []):
                value = item[value_key]
                compared = (
                    value.strip()
                    if kind == "phone" and self.settings.unique_phones == "exact"
                    else _unique_value(kind, value)
                )
                out.append((kind, compared, f"/data/attributes/{list_name}/{i}/{value_key}"))
        ext = [attrs["externalId"]] if attrs.get("externalId") else []
        ext += [x["externalId"] for x in attrs.get("externalIds") or []]
        for v in dict.fromkeys(ext):
            out.append(("externalId", _unique_value("externalId", v), "/data/attributes/externalId"))
        return out

    def _check_unique(self, attrs: dict[str, Any], own: str | None) -> None:
        seen: dict[tuple[str, str], str] = {}
        for kind, value, pointer in self._unique_values(attrs):
            owner = self.unique.get((kind, value))
            if owner is not None and owner != own:
                raise ApiError(409, f"A customer with this {kind} already exists: {value}", pointer)
            if (kind, value) in seen and kind != "externalId":
                continue
            seen[(kind, value)] = pointer

    def _index(self, customer: dict[str, Any], add: bool) -> None:
        for kind, value, _ in self._unique_values(customer["attributes"]):
            normalized = (kind, _unique_value(kind, value))
            if add:
                self.unique[(kind, value)] = customer["id"]
                self.lookup.setdefault(normalized, customer["id"])
            else:
                if self.unique.get((kind, value)) == customer["id"]:
                    del self.unique[(kind, value)]
                if self.lookup.get(normalized) == customer["id"]:
                    del self.lookup[normalized]
                    other = next(
                        (
                            cid
                            for (k, v), cid in self.unique.items()
                            if k == kind and cid != customer["id"] and _unique_value(k, v) == normalized[1]
                        ),
                        None,
                    )
                    if other:
                        self.lookup[normalized] = other

    def _normalize_lists(self, attrs: dict[str, Any]) -> None:
        for name in ("emails", "sharedEmails"):
            if attrs.get(name) is not None:
                attrs[name] = [
                    {
                        "type": x.get("type") or "other",
                        "email": x["email"],
                        "verified": False,
                        "externalVerified": False,
                    }
                    for x in attrs[name]
                ]
        for name in ("phones", "sharedPhones", "whatsapps", "sharedWhatsapps"):
            if attrs.get(name) is not None:
                attrs[name] = [
                    {"type": x.get("type") or "other", "phone": x["phone"], "verified": False} for x in attrs[name]
                ]
        if attrs.get("externalId") and not attrs.get("externalIds"):
            attrs["externalIds"] = [{"externalId": attrs["externalId"]}]
        if attrs.get("externalIds") is not None:
            attrs["externalIds"] = [
                {"externalId": x["externalId"], "verified": False, "externalVerified": False}
                for x in attrs["externalIds"]
            ]
            if not attrs.get("externalId") and attrs["externalIds"]:
                attrs["externalId"] = attrs["externalIds"][0]["externalId"]

    def _create_customer(
        self,
        body: dict[str, Any],
        author: str,
        *,
        cid: str | None = None,
        company: str | None = None,
        at: float | None = None,
        check: bool = True,
    ) -> dict[str, Any]:
        attrs = dict(self._validate_customer(body)) if check else dict(body)
        self._normalize_lists(attrs)
        if company is None and isinstance(attrs.get("company"), str) and attrs["company"] in self.companies:
            company = attrs.pop("company")
        self._check_unique(attrs, None)
        now = at or time.time()
        cid = cid or self.new_id()
        customer = {
            "id": cid,
            "attributes": attrs,
            "rev": 1,
            "createdAt": now,
            "updatedAt": now,
            "createdBy": author,
            "modifiedBy": author,
            "company": company if company in self.companies else None,
        }
        self.customers[cid] = customer
        self._index(customer, True)
        return customer

    def _update_customer(
        self, customer: dict[str, Any], body: dict[str, Any], author: str, replace: bool
    ) -> dict[str, Any]:
        body = self._validate_customer(body)
        new_attrs = dict(body) if replace else {**customer["attributes"], **body}
        if not replace and "externalId" in body and "externalIds" not in body:
            new_attrs.pop("externalIds", None)
        self._normalize_lists(new_attrs)
        self._check_unique(new_attrs, customer["id"])
        self._index(customer, False)
        customer["attributes"] = new_attrs
        customer["rev"] += 1
        customer["updatedAt"] = max(time.time(), customer["updatedAt"] + 0.001)
        customer["modifiedBy"] = author
        if isinstance(body.get("company"), str) and body["company"] in self.companies:
            customer["company"] = new_attrs.pop("company")
        self._index(customer, True)
        return customer

    def customer_resource(self, c: dict[str, Any]) -> dict[str, Any]:
        a = c["attributes"]
        name = a.get("name")
        first, _, last = (name or "").partition(" ")
        convs = [x for x in self.conversations.values() if x["customer"] == c["id"]]
        counts = {s: sum(1 for x in convs if x["attributes"]["status"] == s) for s in ("open", "snoozed", "done")}
        last_conv = max(convs, key=lambda x: x["createdAt"], default=None)
        company = self.companies.get(c.get("company") or "")
        attributes = {
            "name": name,
            "displayName": name or self._display_fallback(a),
            "displayColor": "teal",
            "displayIcon": "flower",
            "firstName": first or None,
            "lastName": last or None,
            "companyName": (company or {}).get("attributes", {}).get("name") if company else a.get("companyName"),
            "externalId": a.get("externalId"),
            "externalIds": a.get("externalIds") or [],
            "sharedExternalIds": a.get("sharedExternalIds") or [],
            "emails": a.get("emails") or [],
            "sharedEmails": a.get("sharedEmails") or [],
            "phones": a.get("phones") or [],
            "sharedPhones": a.get("sharedPhones") or [],
            "whatsapps": a.get("whatsapps") or [],
            "sharedWhatsapps": a.get("sharedWhatsapps") or [],
            "socials": a.get("socials") or [],
            "sharedSocials": a.get("sharedSocials") or [],
            "facebookIds": [],
            "instagramIds": [],
            "urls": a.get("urls") or [],
            "locations": a.get("locations") or [],
            "tags": a.get("tags") or [],
            "custom": a.get("custom") or {},
            "conversationCounts": {"all": len(convs), **counts},
            "lastConversation": ({"id": last_conv["id"], "channels": [], "tags": []} if last_conv else None),
            "birthdayAt": a.get("birthdayAt"),
            "gender": a.get("gender"),
            "defaultLang": a.get("defaultLang"),
            "verified": False,
            "deleted": False,
            "rev": c["rev"],
            "createdAt": _iso(c["createdAt"]),
            "updatedAt": _iso(c["updatedAt"]),
            "modifiedAt": _iso(c["updatedAt"]),
            "lastActivityAt": _iso(c["updatedAt"]),
        }
        rel = {
            "org": self._rel("org", self.org_id, "orgs"),
            "createdBy": self._rel("user", c["createdBy"], "users"),
            "modifiedBy": self._rel("user", c["modifiedBy"], "users"),
            "messages": {"links": {"self": f"/v1/customers/{c['id']}/messages"}},
        }
        if company:
            rel["company"] = self._rel("company", company["id"], "companies")
        return {
            "type": "customer",
            "id": c["id"],
            "attributes": attributes,
            "relationships": rel,
            "links": {"self": f"/v1/customers/{c['id']}"},
        }

    @staticmethod
    def _display_fallback(a: dict[str, Any]) -> str | None:
        for name, key in (("emails", "email"), ("phones", "phone")):
            if a.get(name):
                return a[name][0][key]
        return None

    @staticmethod
    def _rel(kind: str, rid: str, plural: str) -> dict[str, Any]:
        return {"data": {"type": kind, "id": rid}, "links": {"self": f"/v1/{plural}/{rid}"}}

    def find_customer(self, kind: str, value: str) -> dict[str, Any] | None:
        cid = self.lookup.get((kind, _unique_value(kind, value)))
        return self.customers.get(cid) if cid else None

    # -- webhooks --------------------------------------------------------------------------------
    def customer_event(
        self, customer: dict[str, Any], name: str, client: str, before: dict[str, Any] | None = None
    ) -> None:
        """Queue ``name`` for every enabled webhook subscribed to it."""
        resource = self.customer_resource(customer)
        event: dict[str, Any] = {
            "id": self.new_id(),
            "name": name,
            "org": self.org_id,
            "orgName": self.settings.org_name,
            "partition": self.org_id,
            "data": resource,
            "createdAt": now_iso_ms(),
            "persist": True,
            "client": client,
            "dataId": customer["id"],
            "meta": {"customChanged": False},
            "snsFilters": [],
        }
        if name.endswith(".update") and before is not None:
            after = resource["attributes"]
            changed = {
                k: {"op": "replace", "before": before.get(k), "after": after.get(k)}
                for k in after
                if k not in ("updatedAt", "modifiedAt", "lastActivityAt") and before.get(k) != after.get(k)
            }
            event["changes"] = {"attributes": changed, "relationships": {}}
            event["meta"]["customChanged"] = "custom" in changed
        for hook in self.webhooks.values():
            if hook.enabled and name in hook.events:
                body = orjson.dumps(event)
                delivery = Delivery(event["id"], hook.id, name, body)
                self.deliveries.append(delivery)
                self._spawn(self._deliver(hook, delivery))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, hook: Webhook, delivery: Delivery) -> None:
        s = self.settings
        if s.webhook_shuffle_ms:
            await asyncio.sleep(random.uniform(0, s.webhook_shuffle_ms / 1000))
        signature = hmac.new(hook.token.encode(), delivery.body, hashlib.sha256).hexdigest()
        headers = {
            "Content-Type": "application/json",
            "X-Kustomer-Webhook-Event": delivery.event,
            "X-Kustomer-Webhook-Signature": signature,
            "User-Agent": "Kustomer-Webhooks/1.0",
        }
        headers.update({h["name"]: h["value"] for h in hook.headers})
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession()
        for attempt in range(1, s.webhook_attempts + 1):
            started = time.time()
            try:
                async with self._http.post(
                    hook.url,
                    data=delivery.body,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=s.webhook_timeout_s),
                ) as r:
                    ok = 200 <= r.status < 300
                    delivery.attempts.append({"at": _iso(started), "status": r.status})
            except (aiohttp.ClientError, TimeoutError) as exc:
                ok = False
                delivery.attempts.append({"at": _iso(started), "error": type(exc).__name__})
            if ok:
                delivery.status = "delivered"
                hook.failed_in_a_row = 0
                return
            if attempt < s.webhook_attempts:
                await asyncio.sleep(min(s.webhook_max_delay_s, s.webhook_base_delay_s * 2 ** (attempt - 1)))
        delivery.status = "failed"
        hook.failed_in_a_row += 1
        if hook.failed_in_a_row >= s.webhook_disable_after:
            hook.enabled = False
            log.warning("webhook_disabled", webhook=hook.id, failed_in_a_row=hook.failed_in_a_row)

    async def wait_deliveries(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while any(d.status == "pending" for d in self.deliveries):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    # -- conversations and notes -----------------------------------------------------------------
    def conversation_resource(self, c: dict[str, Any]) -> dict[str, Any]:
        a = c["attributes"]
        note_count = sum(1 for n in self.notes.values() if n["conversation"] == c["id"])
        attrs = {
            **a,
            "channels": [],
            "messageCount": 0,
            "noteCount": note_count,
            "inboundMessageCount": 0,
            "outboundMessageCount": 0,
            "createdAt": _iso(c["createdAt"]),
            "updatedAt": _iso(c["updatedAt"]),
            "modifiedAt": _iso(c["updatedAt"]),
            "ended": a["status"] == "done",
            "endedAt": _iso(c["updatedAt"]) if a["status"] == "done" else None,
            "rev": c["rev"],
        }
        return {
            "type": "conversation",
            "id": c["id"],
            "attributes": attrs,
            "relationships": {
                "customer": self._rel("customer", c["customer"], "customers"),
                "createdBy": self._rel("user", c["createdBy"], "users"),
                "modifiedBy": self._rel("user", c["modifiedBy"], "users"),
                "org": self._rel("org", self.org_id, "orgs"),
            },
            "links": {"self": f"/v1/conversations/{c['id']}"},
        }

    def note_resource(self, n: dict[str, Any]) -> dict[str, Any]:
        attrs = {
            "body": n["body"],
            "userMentions": n["userMentions"],
            "createdAt": _iso(n["createdAt"]),
            "updatedAt": _iso(n["updatedAt"]),
            "modifiedAt": _iso(n["updatedAt"]),
            "createdByTeams": [],
        }
        if "clientRef" in n:
            attrs["_clientRef"] = n["clientRef"]
        return {
            "type": "note",
            "id": n["id"],
            "attributes": attrs,
            "relationships": {
                "conversation": self._rel("conversation", n["conversation"], "conversations"),
                "customer": self._rel("customer", n["customer"], "customers"),
                "createdBy": self._rel("user", n["createdBy"], "users"),
                "modifiedBy": self._rel("user", n["createdBy"], "users"),
                "org": self._rel("org", self.org_id, "orgs"),
            },
            "links": {"self": f"/v1/notes/{n['id']}"},
        }

    def _validate_conversation(self, body: Any, create: bool) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ApiError(400, "Invalid request body or parameters: expected a JSON object.", "/data")
        if create:
            cust = body.get("customer")
            if not isinstance(cust, str) or not cust:
                raise ApiError(400, "customer is required and cannot be blank.", "/data/attributes/customer")
            if cust not in self.customers:
                raise ApiError(400, f"customer {cust} does not exist.", "/data/attributes/customer")
        if "status" in body and body["status"] not in ("open", "snoozed", "done"):
            raise ApiError(400, "status must be one of open, snoozed, done.", "/data/attributes/status")
        if "direction" in body and body["direction"] not in ("in", "out"):
            raise ApiError(400, "direction must be one of in, out.", "/data/attributes/direction")
        if "priority" in body and (not isinstance(body["priority"], int) or not 1 <= body["priority"] <= 5):
            raise ApiError(400, "priority must be an integer 1–5.", "/data/attributes/priority")
        for key in ("name", "externalId", "importedAt", "defaultLang"):
            if key in body and body[key] is not None and not isinstance(body[key], str):
                raise ApiError(400, f"{key} must be a string.", f"/data/attributes/{key}")
        for key in ("assignedUsers", "assignedTeams"):
            if key in body and (not isinstance(body[key], list) or len(body[key]) > 10):
                raise ApiError(400, f"{key} must be an array of at most 10 ids.", f"/data/attributes/{key}")
        if "tags" in body and not isinstance(body["tags"], list):
            raise ApiError(400, "tags must be an array of tag ids.", "/data/attributes/tags")
        for k in body.get("custom") or {}:
            if not k.endswith(CUSTOM_SUFFIXES):
                raise ApiError(
                    400,
                    f"custom attribute {k!r} must end with one of {', '.join(CUSTOM_SUFFIXES)}.",
                    f"/data/attributes/custom/{k}",
                )
        return body

    def _validate_note(self, body: Any, need_conversation: bool) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ApiError(400, "Invalid request body or parameters: expected a JSON object.", "/data")
        text = body.get("body")
        if not isinstance(text, str) or not text:
            raise ApiError(400, "body is required.", "/data/attributes/body")
        if len(text) > self.settings.note_max_length:
            raise ApiError(
                400, f"body must be at most {self.settings.note_max_length} characters.", "/data/attributes/body"
            )
        if need_conversation:
            conv = body.get("conversation")
            if not isinstance(conv, str) or not conv:
                raise ApiError(400, "conversation is required.", "/data/attributes/conversation")
            if conv not in self.conversations:
                raise ApiError(400, f"conversation {conv} does not exist.", "/data/attributes/conversation")
        mentions = body.get("userMentions", [])
        if not isinstance(mentions, list) or len(mentions) > 20:
            raise ApiError(400, "userMentions must be an array of at most 20 entries.", "/data/attributes/userMentions")
        return body

    def create_note(
        self, conversation_id: str, body: dict[str, Any], author: str, *, charge_window: bool = True
    ) -> dict[str, Any]:
        """``charge_window=False``: the per-customer note window was charged already (bulk)."""
        conv = self.conversations[conversation_id]
        if charge_window:
            allowed, _ = self.note_windows.take(conv["customer"])
            if not allowed:
                raise ApiError(429, "Too many notes for this customer; try again later.")
        now = time.time()
        created = _parse_time(body["createdAt"]) if isinstance(body.get("createdAt"), str) else None
        nid = self.new_id()
        note = {
            "id": nid,
            "body": body["body"],
            "conversation": conversation_id,
            "customer": conv["customer"],
            "userMentions": body.get("userMentions") or [],
            "createdAt": created or now,
            "updatedAt": now,
            "createdBy": author,
        }
        if isinstance(body.get("_clientRef"), str):
            note["clientRef"] = body["_clientRef"]
        self.notes[nid] = note
        conv["updatedAt"] = now
        return note

    # -- bulk notes ------------------------------------------------------------------------------
    def _validate_bulk_notes(self, body: Any) -> list[dict[str, Any]]:
        """An array of 1..bulk_max_items ``POST /v1/notes`` bodies, each with an optional string
        ``_clientRef``; any invalid item refuses the whole request (400 pointing at the item)."""
        limit = self.settings.bulk_max_items
        if not isinstance(body, list) or not body:
            raise ApiError(400, "Invalid request body or parameters: expected a non-empty array of notes.", "/data")
        if len(body) > limit:
            raise ApiError(400, f"At most {limit} notes per bulk request.", "/data")
        for index, item in enumerate(body):
            try:
                self._validate_note(item, need_conversation=True)
            except ApiError as exc:
                pointer = f"/data/{index}" + (exc.pointer or "/data")[len("/data") :]
                raise ApiError(exc.status, f"item {index}: {exc.detail}", pointer) from None
            ref = item.get("_clientRef")
            if ref is not None and (not isinstance(ref, str) or not ref):
                detail = f"item {index}: _clientRef must be a non-empty string."
                raise ApiError(400, detail, f"/data/{index}/_clientRef")
        return body

    def accept_bulk_notes(self, items: list[dict[str, Any]], author: str, fault_key: tuple[str, str]) -> BulkJob:
        """Charge every item to its customer's note window (all or nothing: 429 and nothing queued),
        then queue the job; its notes are created ``bulk_delay_s`` later, in order."""
        per_customer: dict[str, int] = {}
        for item in items:
            customer = self.conversations[item["conversation"]]["customer"]
            per_customer[customer] = per_customer.get(customer, 0) + 1
        for customer, count in per_customer.items():
            if self.note_windows.peek(customer).remaining < count:
                raise ApiError(429, "Too many notes for this customer; try again later.")
        for customer, count in per_customer.items():
            self.note_windows.take(customer, count)
        job = BulkJob(
            self.new_id(),
            time.time(),
            [
                {
                    "index": index,
                    "_clientRef": item.get("_clientRef"),
                    "conversation": item["conversation"],
                    "status": "queued",
                    "id": None,
                    "effect": None,
                    "fault": None,
                }
                for index, item in enumerate(items)
            ],
        )
        self.bulk_jobs[job.id] = job
        self._spawn(self._run_bulk_notes(job, items, author, fault_key))
        return job

    async def _run_bulk_notes(
        self, job: BulkJob, items: list[dict[str, Any]], author: str, fault_key: tuple[str, str]
    ) -> None:
        await asyncio.sleep(self.settings.bulk_delay_s)
        for result, item in zip(job.items, items, strict=True):
            rule = self.faults.pick_item(*fault_key)
            if rule is not None:
                result.update(status=rule.status, fault=rule.kind)
            elif item["conversation"] not in self.conversations:  # gone since (a reset)
                result.update(status=404)
            else:
                note = self.create_note(item["conversation"], item, author, charge_window=False)
                effect = f"note.create {note['id']} conversation={note['conversation']}"
                result.update(status=201, id=note["id"], effect=effect)
        job.status = "done"

    async def wait_bulk(self, timeout: float = 10.0) -> bool:
        """Until every accepted bulk job has run (tests)."""
        deadline = time.monotonic() + timeout
        while any(j.status != "done" for j in self.bulk_jobs.values()):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    # -- app -------------------------------------------------------------------------------------
    def build_app(self) -> web.Application:
        app = web.Application(
            middlewares=[make_middleware(self.log, self.faults), self._api_middleware], client_max_size=4 * 1024 * 1024
        )
        app[FAULT_RESPONDER] = self._fault_response
        inspection_routes(app, self.log, self.faults, self.reset)
        _Routes(self).add(app)
        app.on_cleanup.append(lambda _app: self.close())
        return app

    def rate_headers(self, state: WindowState) -> dict[str, str]:
        return {
            "x-ratelimit-limit": str(state.limit),
            "x-ratelimit-remaining": str(state.remaining),
            "x-ratelimit-reset": str(int(state.reset_at + 0.999)),
        }

    async def _fault_response(self, request: web.Request, status: int) -> web.StreamResponse:
        headers = self.rate_headers(self.org_window.peek())
        if status == 429:
            headers["x-ratelimit-remaining"] = "0"
        return json_response(ApiError(status, f"simulated fault {status}").body(), status, headers)

    @web.middleware
    async def _api_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ):
        if request.path.startswith(SIM_PREFIX):
            return await handler(request)
        s = self.settings
        try:
            # 1. authentication and roles
            auth = request.headers.get("Authorization", "")
            token = auth[7:].strip() if auth.startswith("Bearer ") else ""
            key = self.keys.get(token)
            if key is None:
                raise ApiError(401, "Missing or invalid API key." if token else "Authorization header is missing.")
            request[SIM_KEY] = key
            roles = getattr(handler, "roles", R_ANY)
            if not key.allows(roles):
                raise ApiError(403, f"This API key lacks a role for this operation (one of: {', '.join(roles)}).")
            # 2. the org-wide window
            allowed, state = self.org_window.take("")
            if not allowed:
                raise ApiError(429, "Rate limit exceeded for the organization.")
            response = await handler(request)
        except ApiError as exc:
            state = self.org_window.peek()
            headers = self.rate_headers(state) if (s.rate_headers_always or exc.status == 429) else {}
            return json_response(exc.body(), exc.status, headers)
        except web.HTTPException:
            raise
        if s.rate_headers_always:
            response.headers.update(self.rate_headers(self.org_window.peek()))
        return response


def route(*roles: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.roles = roles or R_ANY  # type: ignore[attr-defined]
        return fn

    return mark


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        raise ApiError(400, "Invalid request body or parameters: the body is empty.", "/data")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "Invalid request body or parameters: not valid JSON.", "/data") from None


def _page_params(request: web.Request, max_size: int) -> tuple[int, int]:
    try:
        page = int(request.query.get("page", "1"))
        size = int(request.query.get("pageSize", str(min(100, max_size))))
    except ValueError:
        raise ApiError(400, "page and pageSize must be integers.", parameter="page") from None
    if page < 1:
        raise ApiError(400, "page must be >= 1.", parameter="page")
    if not 1 <= size <= max_size:
        raise ApiError(400, f"pageSize must be between 1 and {max_size}.", parameter="pageSize")
    return page, size


def _paged(request: web.Request, items: list[Any], max_size: int) -> dict[str, Any]:
    page, size = _page_params(request, max_size)
    total = len(items)
    pages = max(1, -(-total // size))
    chunk = items[(page - 1) * size : page * size]

    def link(p: int) -> str:
        query = dict(request.query)
        query.update(page=str(p), pageSize=str(size))
        return f"{request.path}?{urllib.parse.urlencode(query)}"

    return {
        "data": chunk,
        "links": {
            "self": link(page),
            "first": link(1),
            "prev": link(page - 1) if page > 1 else None,
            "next": link(page + 1) if page < pages else None,
            "last": link(pages),
        },
        "meta": {"page": page, "pageSize": size, "total": total, "totalPages": pages},
    }


class _Routes:
    def __init__(self, sim: KustomerSim) -> None:
        self.sim = sim

    def add(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/v1/auth/tokens/current", self.token_current)
        r.add_get("/v1/users/current", self.user_current)
        r.add_get("/v1/users", self.users)
        r.add_get("/v1/users/{id}", self.user)
        r.add_get("/v1/companies", self.companies)
        r.add_post("/v1/companies", self.create_company)
        r.add_get("/v1/companies/{id}", self.company)
        r.add_post("/v1/customers/search", self.search)
        r.add_post("/v1/customers", self.create_customer)
        r.add_get("/v1/customers", self.list_customers)
        r.add_get("/v1/customers/{ident}/conversations", self.customer_conversations)
        r.add_get("/v1/customers/{ident}", self.get_customer)
        r.add_put("/v1/customers/{ident}", self.put_customer)
        r.add_patch("/v1/customers/{ident}", self.patch_customer)
        r.add_post("/v1/conversations", self.create_conversation)
        r.add_get("/v1/conversations", self.list_conversations)
        r.add_get("/v1/conversations/{id}", self.get_conversation)
        r.add_put("/v1/conversations/{id}", self.update_conversation)
        r.add_patch("/v1/conversations/{id}", self.update_conversation)
        r.add_get("/v1/conversations/{id}/notes", self.conversation_notes)
        r.add_post("/v1/conversations/{id}/notes", self.create_legacy_note)
        r.add_post("/v1/notes", self.create_note)
        r.add_post("/v1/notes/bulk", self.create_notes_bulk)
        r.add_get("/v1/notes/{id}", self.get_note)
        r.add_put("/v1/notes/{id}", self.update_note)
        r.add_patch("/v1/notes/{id}", self.update_note)
        r.add_get("/v1/outbound-webhooks/events", self.webhook_events)
        r.add_post("/v1/outbound-webhooks", self.create_webhook)
        r.add_get("/v1/outbound-webhooks", self.list_webhooks)
        r.add_get("/v1/outbound-webhooks/{id}", self.get_webhook)
        r.add_delete("/v1/outbound-webhooks/{id}", self.delete_webhook)
        # inspection
        r.add_get(SIM_PREFIX + "state", self.state)
        r.add_post(SIM_PREFIX + "seed", self.seed)
        r.add_post(SIM_PREFIX + "keys", self.add_key)
        r.add_post(SIM_PREFIX + "customers", self.agent_create)
        r.add_post(SIM_PREFIX + "customers/{id}/edit", self.agent_edit)
        r.add_get(SIM_PREFIX + "deliveries", self.deliveries)
        r.add_post(SIM_PREFIX + "deliveries/{event_id}/redeliver", self.redeliver)
        r.add_get(SIM_PREFIX + "settings", self.get_settings)
        r.add_post(SIM_PREFIX + "settings", self.set_settings)

    def user_resource(self, u: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "user",
            "id": u["id"],
            "attributes": {
                "name": u["name"],
                "displayName": u["name"],
                "email": u["email"],
                "userType": "machine" if u["machine"] else "user",
                "createdAt": _iso(u["createdAt"]),
            },
            "links": {"self": f"/v1/users/{u['id']}"},
        }

    def company_resource(self, c: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "company",
            "id": c["id"],
            "attributes": {**c["attributes"], "createdAt": _iso(c["createdAt"]), "updatedAt": _iso(c["updatedAt"])},
            "links": {"self": f"/v1/companies/{c['id']}"},
        }

    # -- identity ----------------------------------------------------------------------------
    @route()
    async def token_current(self, request: web.Request) -> web.Response:
        key: Key = request[SIM_KEY]
        return json_response(
            {
                "data": {
                    "type": "token",
                    "id": hashlib.sha1(key.token.encode()).hexdigest()[:24],
                    "attributes": {"name": key.name, "roles": list(key.roles)},
                    "relationships": {
                        "user": self.sim._rel("user", key.user_id, "users"),
                        "org": self.sim._rel("org", self.sim.org_id, "orgs"),
                    },
                }
            }
        )

    @route()
    async def user_current(self, request: web.Request) -> web.Response:
        return json_response({"data": self.user_resource(self.sim.users[request[SIM_KEY].user_id])})

    @route()
    async def users(self, request: web.Request) -> web.Response:
        items = [self.user_resource(u) for u in sorted(self.sim.users.values(), key=lambda u: u["id"])]
        return json_response(_paged(request, items, 500))

    @route()
    async def user(self, request: web.Request) -> web.Response:
        u = self.sim.users.get(request.match_info["id"])
        if u is None:
            raise ApiError(404, "User not found.")
        return json_response({"data": self.user_resource(u)})

    # -- companies ---------------------------------------------------------------------------
    @route(*R_CUSTOMER_READ)
    async def companies(self, request: web.Request) -> web.Response:
        items = [self.company_resource(c) for c in self.sim.companies.values()]
        return json_response(_paged(request, items, 100))

    @route(*R_CUSTOMER_READ)
    async def company(self, request: web.Request) -> web.Response:
        c = self.sim.companies.get(request.match_info["id"])
        if c is None:
            raise ApiError(404, "Company not found.")
        return json_response({"data": self.company_resource(c)})

    @route(*R_CUSTOMER_WRITE)
    async def create_company(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body["name"]:
            raise ApiError(400, "name is required.", "/data/attributes/name")
        cid = self.sim.seed({"companies": [{"name": body["name"]}]})["companies"][0]
        set_effect(request, f"company.create {cid}")
        return json_response({"data": self.company_resource(self.sim.companies[cid])}, self.sim.settings.create_status)

    # -- customers ---------------------------------------------------------------------------
    def _lookup(self, ident: str) -> dict[str, Any] | None:
        for prefix, kind in (("email=", "email"), ("phone=", "phone"), ("externalId=", "externalId")):
            if ident.startswith(prefix):
                return self.sim.find_customer(kind, urllib.parse.unquote(ident[len(prefix) :]))
        return self.sim.customers.get(ident)

    def _customer_or_404(self, ident: str) -> dict[str, Any]:
        c = self._lookup(ident)
        if c is None:
            raise ApiError(404, "Customer not found.")
        return c

    @route(*R_CUSTOMER_WRITE)
    async def create_customer(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        key: Key = request[SIM_KEY]
        customer = self.sim._create_customer(body, key.user_id)
        set_effect(request, f"customer.create {customer['id']}")
        self.sim.customer_event(customer, "kustomer.customer.create", "api-gw")
        return json_response({"data": self.sim.customer_resource(customer)}, self.sim.settings.create_status)

    @route(*R_CUSTOMER_READ)
    async def get_customer(self, request: web.Request) -> web.Response:
        return json_response({"data": self.sim.customer_resource(self._customer_or_404(request.match_info["ident"]))})

    async def _update(self, request: web.Request, replace: bool) -> web.Response:
        customer = self._customer_or_404(request.match_info["ident"])
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise ApiError(400, "Invalid request body or parameters: expected a JSON object.", "/data")
        before = self.sim.customer_resource(customer)["attributes"]
        self.sim._update_customer(customer, body, request[SIM_KEY].user_id, replace)
        set_effect(request, f"customer.update {customer['id']}")
        self.sim.customer_event(customer, "kustomer.customer.update", "api-gw", before)
        return json_response({"data": self.sim.customer_resource(customer)})

    @route(*R_CUSTOMER_WRITE)
    async def put_customer(self, request: web.Request) -> web.Response:
        return await self._update(request, replace=request.query.get("replace", "true").lower() != "false")

    @route(*R_CUSTOMER_WRITE)
    async def patch_customer(self, request: web.Request) -> web.Response:
        if not self.sim.settings.patch_customers:
            raise web.HTTPMethodNotAllowed("PATCH", ["GET", "PUT"])
        return await self._update(request, replace=False)

    @route(*R_CUSTOMER_READ)
    async def list_customers(self, request: web.Request) -> web.Response:
        items = list(self.sim.customers.values())
        for field_name in ("updatedAt", "createdAt"):
            for op in ("gte", "gt", "lte", "lt"):
                raw = request.query.get(f"filter[{field_name}][{op}]")
                if raw is None:
                    continue
                ts = _parse_time(raw)
                if ts is None:
                    raise ApiError(
                        400, f"filter[{field_name}][{op}] must be a date.", parameter=f"filter[{field_name}][{op}]"
                    )
                cmp = {
                    "gte": lambda a, b: a >= b - 0.0005,
                    "gt": lambda a, b: a > b + 0.0005,
                    "lte": lambda a, b: a <= b + 0.0005,
                    "lt": lambda a, b: a < b - 0.0005,
                }[op]
                items = [c for c in items if cmp(c[field_name], ts)]
        sort = request.query.get("sort", "-createdAt")
        field_name = sort.lstrip("-")
        if field_name not in ("createdAt", "updatedAt"):
            raise ApiError(400, "sort must be one of createdAt, -createdAt, updatedAt, -updatedAt.", parameter="sort")
        items.sort(key=lambda c: (c[field_name], c["id"]), reverse=sort.startswith("-"))
        page = _paged(request, items, self.sim.settings.max_page_size)
        page["data"] = [self.sim.customer_resource(c) for c in page["data"]]
        return json_response(page)

    @route(*R_CONV_READ)
    async def customer_conversations(self, request: web.Request) -> web.Response:
        customer = self._customer_or_404(request.match_info["ident"])
        items = sorted(
            (c for c in self.sim.conversations.values() if c["customer"] == customer["id"]),
            key=lambda c: (c["createdAt"], c["id"]),
            reverse=True,
        )
        page = _paged(request, items, self.sim.settings.max_page_size)
        page["data"] = [self.sim.conversation_resource(c) for c in page["data"]]
        return json_response(page)

    # -- search ------------------------------------------------------------------------------
    @route(*R_SEARCH)
    async def search(self, request: web.Request) -> web.Response:
        allowed, _ = self.sim.search_windows.take(request[SIM_KEY].token)
        if not allowed:
            raise ApiError(429, "Search rate limit exceeded for this API key.")
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise ApiError(400, "Invalid request body or parameters: expected a JSON object.", "/data")
        context = body.get("queryContext", "customer")
        if context not in ("customer", "conversation"):
            raise ApiError(400, "queryContext must be customer or conversation here.", "/queryContext")
        pool = self.sim.customers if context == "customer" else self.sim.conversations
        two_years = time.time() - 2 * 365 * 86400
        items = [x for x in pool.values() if x["updatedAt"] >= two_years]
        for group in ("and", "or", "not"):
            criteria = body.get(group) or []
            if not isinstance(criteria, list):
                raise ApiError(400, f"{group} must be an array of criteria.", f"/{group}")
            for crit in criteria:
                if not isinstance(crit, dict) or len(crit) != 1:
                    raise ApiError(400, f"each criterion in {group} must have one attribute.", f"/{group}")
        items = [x for x in items if self._matches(context, x, body)]
        for spec in reversed(body.get("sort") or [{f"{context}_updated_at": "desc"}]):
            ((attr, direction),) = spec.items()
            items.sort(
                key=lambda x, a=attr: str(self._value(context, x, a)[0] if self._value(context, x, a) else ""),
                reverse=str(direction).lower() == "desc",
            )
        page = _paged(request, items, self.sim.settings.search_max_page_size)
        render = self.sim.customer_resource if context == "customer" else self.sim.conversation_resource
        if request.query.get("idsOnly") == "true":
            page["data"] = [{"type": context, "id": x["id"]} for x in page["data"]]
        else:
            page["data"] = [render(x) for x in page["data"]]
        return json_response(page)

    def _value(self, context: str, item: dict[str, Any], attr: str) -> list[Any]:
        name = attr.removeprefix(f"{context}_")
        a = item["attributes"]
        if name in ("updated_at", "created_at"):
            return [_iso(item["updatedAt" if name == "updated_at" else "createdAt"])]
        if name == "phones":
            return [_norm_phone(p["phone"]) for p in a.get("phones") or []]
        if name == "emails":
            return [e["email"].lower() for e in a.get("emails") or []]
        if name == "external_id":
            return [a.get("externalId")] if a.get("externalId") else []
        if name == "status":
            return [a.get("status")]
        if name == "priority":
            return [a.get("priority")]
        raise ApiError(400, f"unknown search attribute {attr!r}.", "/and")

    def _matches(self, context: str, item: dict[str, Any], body: dict[str, Any]) -> bool:
        def test(crit: dict[str, Any]) -> bool:
            ((attr, cond),) = crit.items()
            if not isinstance(cond, dict) or len(cond) != 1:
                raise ApiError(400, f"criterion {attr!r} needs exactly one operator.", "/and")
            ((op, want),) = cond.items()
            values = self._value(context, item, attr)
            if attr.endswith(("_updated_at", "_created_at")):
                ts = _parse_time(str(want))
                if ts is None:
                    raise ApiError(400, f"{attr}: {want!r} is not a date.", "/and")
                got = [_parse_time(v) or 0 for v in values]
                want = ts
            elif attr.endswith("_phones"):
                want, got = _norm_phone(str(want)), values
            elif attr.endswith("_emails"):
                want, got = str(want).lower(), values
            else:
                got = values
            ops = {
                "equals": lambda a: a == want,
                "gte": lambda a: a >= want,
                "gt": lambda a: a > want,
                "lte": lambda a: a <= want,
                "lt": lambda a: a < want,
            }
            if op not in ops:
                raise ApiError(400, f"unknown operator {op!r}.", "/and")
            return any(ops[op](v) for v in got if v is not None)

        ands, ors, nots = body.get("and") or [], body.get("or") or [], body.get("not") or []
        return all(test(c) for c in ands) and (not ors or any(test(c) for c in ors)) and not any(test(c) for c in nots)

    # -- conversations -----------------------------------------------------------------------
    @route(*R_CONV_WRITE)
    async def create_conversation(self, request: web.Request) -> web.Response:
        body = self.sim._validate_conversation(await _json_body(request), create=True)
        if not body.get("importedAt"):
            allowed, _ = self.sim.conversation_windows.take(body["customer"])
            if not allowed:
                raise ApiError(429, "Too many conversations for this customer; try again later.")
        author = request[SIM_KEY].user_id
        now = time.time()
        cid = self.sim.new_id()
        attrs = {
            "name": body.get("name"),
            "status": body.get("status", "open"),
            "direction": body.get("direction", "in"),
            "priority": body.get("priority", 1),
            "externalId": body.get("externalId"),
            "tags": body.get("tags") or [],
            "assignedUsers": body.get("assignedUsers") or [],
            "assignedTeams": body.get("assignedTeams") or [],
            "custom": body.get("custom") or {},
            "defaultLang": body.get("defaultLang"),
            "importedAt": body.get("importedAt"),
        }
        conv = {
            "id": cid,
            "customer": body["customer"],
            "attributes": attrs,
            "createdAt": now,
            "updatedAt": now,
            "rev": 1,
            "createdBy": author,
            "modifiedBy": author,
        }
        self.sim.conversations[cid] = conv
        set_effect(request, f"conversation.create {cid} externalId={attrs['externalId']}")
        return json_response({"data": self.sim.conversation_resource(conv)}, self.sim.settings.create_status)

    def _conversation_or_404(self, cid: str) -> dict[str, Any]:
        conv = self.sim.conversations.get(cid)
        if conv is None:
            raise ApiError(404, "Conversation not found.")
        return conv

    @route(*R_CONV_READ)
    async def get_conversation(self, request: web.Request) -> web.Response:
        return json_response(
            {"data": self.sim.conversation_resource(self._conversation_or_404(request.match_info["id"]))}
        )

    @route(*R_CONV_WRITE)
    async def update_conversation(self, request: web.Request) -> web.Response:
        conv = self._conversation_or_404(request.match_info["id"])
        body = self.sim._validate_conversation(await _json_body(request), create=False)
        body.pop("customer", None)
        conv["attributes"].update({k: v for k, v in body.items() if k in conv["attributes"]})
        conv["rev"] += 1
        conv["updatedAt"] = time.time()
        conv["modifiedBy"] = request[SIM_KEY].user_id
        set_effect(request, f"conversation.update {conv['id']}")
        return json_response({"data": self.sim.conversation_resource(conv)})

    @route(*R_CONV_READ)
    async def list_conversations(self, request: web.Request) -> web.Response:
        items = sorted(self.sim.conversations.values(), key=lambda c: (c["createdAt"], c["id"]), reverse=True)
        page = _paged(request, items, self.sim.settings.max_page_size)
        page["data"] = [self.sim.conversation_resource(c) for c in page["data"]]
        return json_response(page)

    # -- notes -------------------------------------------------------------------------------
    @route(*R_NOTE_WRITE)
    async def create_note(self, request: web.Request) -> web.Response:
        body = self.sim._validate_note(await _json_body(request), need_conversation=True)
        note = self.sim.create_note(body["conversation"], body, request[SIM_KEY].user_id)
        set_effect(request, f"note.create {note['id']} conversation={note['conversation']}")
        return json_response({"data": self.sim.note_resource(note)}, self.sim.settings.create_status)

    @route(*R_NOTE_WRITE)
    async def create_legacy_note(self, request: web.Request) -> web.Response:
        if not self.sim.settings.legacy_notes_route:
            raise web.HTTPMethodNotAllowed("POST", ["GET"])
        conv = self._conversation_or_404(request.match_info["id"])
        body = self.sim._validate_note(await _json_body(request), need_conversation=False)
        note = self.sim.create_note(conv["id"], body, request[SIM_KEY].user_id)
        set_effect(request, f"note.create {note['id']} conversation={note['conversation']}")
        return json_response({"data": self.sim.note_resource(note)}, self.sim.settings.create_status)

    @route(*R_NOTE_WRITE)
    async def create_notes_bulk(self, request: web.Request) -> web.Response:
        items = self.sim._validate_bulk_notes(await _json_body(request))
        job = self.sim.accept_bulk_notes(items, request[SIM_KEY].user_id, (request.method, request.path))
        set_items(request, job.items)
        set_effect(request, f"notes.bulk {job.id} items={len(items)}")
        attrs = {"status": "queued", "count": len(items), "createdAt": _iso(job.created_at)}
        return json_response({"data": {"type": "bulk", "id": job.id, "attributes": attrs}}, 202)

    @route(*R_NOTE_READ)
    async def conversation_notes(self, request: web.Request) -> web.Response:
        conv = self._conversation_or_404(request.match_info["id"])
        items = sorted(
            (n for n in self.sim.notes.values() if n["conversation"] == conv["id"]),
            key=lambda n: (n["createdAt"], n["id"]),
        )
        page = _paged(request, items, self.sim.settings.max_page_size)
        page["data"] = [self.sim.note_resource(n) for n in page["data"]]
        return json_response(page)

    @route(*R_NOTE_READ)
    async def get_note(self, request: web.Request) -> web.Response:
        note = self.sim.notes.get(request.match_info["id"])
        if note is None:
            raise ApiError(404, "Note not found.")
        return json_response({"data": self.sim.note_resource(note)})

    @route(*R_NOTE_WRITE)
    async def update_note(self, request: web.Request) -> web.Response:
        note = self.sim.notes.get(request.match_info["id"])
        if note is None:
            raise ApiError(404, "Note not found.")
        body = self.sim._validate_note(await _json_body(request), need_conversation=False)
        note["body"] = body["body"]
        note["updatedAt"] = time.time()
        set_effect(request, f"note.update {note['id']}")
        return json_response({"data": self.sim.note_resource(note)})

    # -- outbound webhooks -------------------------------------------------------------------
    def webhook_resource(self, h: Webhook) -> dict[str, Any]:
        return {
            "type": "outboundWebhook",
            "id": h.id,
            "attributes": {
                "name": h.name,
                "url": h.url,
                "events": h.events,
                "headers": h.headers,
                "enabled": h.enabled,
                "token": h.token,
                "createdAt": _iso(h.created_at),
            },
            "links": {"self": f"/v1/outbound-webhooks/{h.id}"},
        }

    @route(*R_HOOKS)
    async def webhook_events(self, request: web.Request) -> web.Response:
        return json_response({"data": [{"type": "event", "id": e, "attributes": {"name": e}} for e in SUBSCRIBABLE]})

    @route(*R_HOOKS)
    async def create_webhook(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise ApiError(400, "Invalid request body or parameters: expected a JSON object.", "/data")
        name, url, events = body.get("name"), body.get("url"), body.get("events")
        if not isinstance(name, str) or not name or len(name) > 255:
            raise ApiError(400, "name is required (at most 255 characters).", "/data/attributes/name")
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise ApiError(400, "url is required.", "/data/attributes/url")
        if url.startswith("http://") and not self.sim.settings.webhook_allow_http:
            raise ApiError(400, "url must use https.", "/data/attributes/url")
        if not isinstance(events, list) or not events or len(events) > 12:
            raise ApiError(400, "events is required: 1 to 12 event names.", "/data/attributes/events")
        unknown = [e for e in events if e not in SUBSCRIBABLE]
        if unknown:
            raise ApiError(400, f"unknown event(s): {', '.join(map(str, unknown))}.", "/data/attributes/events")
        headers = body.get("headers") or []
        if not isinstance(headers, list) or not all(
            isinstance(h, dict) and {"name", "value"} <= set(h) for h in headers
        ):
            raise ApiError(400, "headers must be an array of {name, value}.", "/data/attributes/headers")
        hook = Webhook(
            self.sim.new_id(),
            name,
            url,
            list(events),
            headers,
            secrets.token_hex(24),
            enabled=bool(body.get("enabled", True)),
        )
        self.sim.webhooks[hook.id] = hook
        set_effect(request, f"webhook.create {hook.id}")
        return json_response({"data": self.webhook_resource(hook)}, self.sim.settings.create_status)

    @route(*R_HOOKS)
    async def list_webhooks(self, request: web.Request) -> web.Response:
        return json_response(_paged(request, [self.webhook_resource(h) for h in self.sim.webhooks.values()], 100))

    @route(*R_HOOKS)
    async def get_webhook(self, request: web.Request) -> web.Response:
        hook = self.sim.webhooks.get(request.match_info["id"])
        if hook is None:
            raise ApiError(404, "Outbound webhook not found.")
        return json_response({"data": self.webhook_resource(hook)})

    @route(*R_HOOKS)
    async def delete_webhook(self, request: web.Request) -> web.Response:
        if self.sim.webhooks.pop(request.match_info["id"], None) is None:
            raise ApiError(404, "Outbound webhook not found.")
        set_effect(request, f"webhook.delete {request.match_info['id']}")
        return web.Response(status=204)

    # -- inspection --------------------------------------------------------------------------
    async def state(self, request: web.Request) -> web.Response:
        sim = self.sim
        return json_response(
            {
                "org": {"id": sim.org_id, "name": sim.settings.org_name},
                "customers": [sim.customer_resource(c) for c in sim.customers.values()],
                "companies": [self.company_resource(c) for c in sim.companies.values()],
                "users": [self.user_resource(u) for u in sim.users.values()],
                "keys": [{"name": k.name, "roles": list(k.roles), "user": k.user_id} for k in sim.keys.values()],
                "conversations": [sim.conversation_resource(c) for c in sim.conversations.values()],
                "notes": [sim.note_resource(n) for n in sim.notes.values()],
                "bulk_jobs": [j.public() for j in sim.bulk_jobs.values()],
                "webhooks": [self.webhook_resource(h) for h in sim.webhooks.values()],
                "deliveries": [self._delivery(d) for d in sim.deliveries],
            }
        )

    async def seed(self, request: web.Request) -> web.Response:
        try:
            created = self.sim.seed(await request.json(loads=orjson.loads))
        except ApiError as exc:
            return json_response(exc.body(), exc.status)
        except (KeyError, TypeError, ValueError) as exc:
            return json_response({"error": f"bad seed: {exc}"}, 400)
        return json_response(created, 201)

    async def add_key(self, request: web.Request) -> web.Response:
        body = await request.json(loads=orjson.loads)
        if not isinstance(body, dict) or not body.get("key") or not isinstance(body.get("roles"), list):
            return json_response({"error": "expected {key, roles: [...]}"}, 400)
        key = self.sim.add_key(body["key"], tuple(body["roles"]), body.get("name"))
        return json_response({"user": key.user_id, "roles": list(key.roles)}, 201)

    async def agent_create(self, request: web.Request) -> web.Response:
        body = await request.json(loads=orjson.loads)
        attrs = body.get("attributes") if isinstance(body, dict) else None
        if not isinstance(attrs, dict):
            return json_response({"error": "expected {attributes: {...}, user?, company?}"}, 400)
        author = body.get("user") or self.sim.agent_id
        try:
            customer = self.sim._create_customer(attrs, author, company=body.get("company"))
        except ApiError as exc:
            return json_response(exc.body(), exc.status)
        self.sim.customer_event(customer, "kustomer.customer.create", "web")
        return json_response({"data": self.sim.customer_resource(customer)}, 201)

    async def agent_edit(self, request: web.Request) -> web.Response:
        customer = self.sim.customers.get(request.match_info["id"])
        if customer is None:
            return json_response({"error": "no such customer"}, 404)
        body = await request.json(loads=orjson.loads)
        attrs = body.get("attributes") if isinstance(body, dict) else None
        if not isinstance(attrs, dict):
            return json_response({"error": "expected {attributes: {...}}"}, 400)
        before = self.sim.customer_resource(customer)["attributes"]
        try:
            self.sim._update_customer(customer, attrs, body.get("user") or self.sim.agent_id, replace=False)
        except ApiError as exc:
            return json_response(exc.body(), exc.status)
        self.sim.customer_event(customer, "kustomer.customer.update", "web", before)
        return json_response({"data": self.sim.customer_resource(customer)})

    @staticmethod
    def _delivery(d: Delivery) -> dict[str, Any]:
        return {
            "event_id": d.event_id,
            "webhook": d.webhook_id,
            "event": d.event,
            "status": d.status,
            "attempts": d.attempts,
            "body": orjson.loads(d.body),
        }

    async def deliveries(self, request: web.Request) -> web.Response:
        status = request.query.get("status")
        rows = [self._delivery(d) for d in self.sim.deliveries if status is None or d.status == status]
        return json_response({"deliveries": rows, "count": len(rows)})

    async def redeliver(self, request: web.Request) -> web.Response:
        found = [d for d in self.sim.deliveries if d.event_id == request.match_info["event_id"]]
        if not found:
            return json_response({"error": "no such event"}, 404)
        for d in found:
            hook = self.sim.webhooks.get(d.webhook_id)
            if hook is not None:
                again = Delivery(d.event_id, hook.id, d.event, d.body)
                self.sim.deliveries.append(again)
                self.sim._spawn(self.sim._deliver(hook, again))
        return json_response({"redelivered": len(found)}, 202)

    async def get_settings(self, request: web.Request) -> web.Response:
        return json_response(asdict(self.sim.settings))

    async def set_settings(self, request: web.Request) -> web.Response:
        body = await request.json(loads=orjson.loads)
        names = {f.name for f in fields(KustomerSimSettings)}
        unknown = set(body) - names if isinstance(body, dict) else {"(body)"}
        if unknown:
            return json_response({"error": f"unknown settings: {sorted(unknown)}"}, 400)
        for k, v in body.items():
            setattr(self.sim.settings, k, v)
        try:
            self.sim.settings.check()
        except ValueError as exc:
            return json_response({"error": str(exc)}, 400)
        s = self.sim.settings
        self.sim.org_window.limit, self.sim.org_window.window_s = s.rate_limit, s.window_seconds
        self.sim.search_windows.limit = s.search_limit
        self.sim.conversation_windows.limit = self.sim.note_windows.limit = s.per_customer_limit
        return json_response(asdict(s))


@contextlib.asynccontextmanager
async def running_kustomer_sim(
    settings: KustomerSimSettings | None = None,
    *,
    keys: dict[str, tuple[str, ...]] | None = None,
    seed: dict[str, Any] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> AsyncIterator[tuple[KustomerSim, str]]:
    """``async with running_kustomer_sim(settings, keys={"k": ALL_ROLES}) as (sim, base_url)``."""
    sim = KustomerSim(settings, keys=keys, seed=seed)
    server = SimServer(sim.build_app(), host, port)
    await server.start()
    sim.root_url = server.base_url
    try:
        yield sim, server.base_url
    finally:
        await server.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = KustomerSimSettings()
    a = parser.add_argument
    a("--api-key", action="append", default=[], help="an API key with every role (repeatable)")
    a("--org-name", default=d.org_name)
    a("--rate-limit", type=int, default=d.rate_limit, help="org-wide requests per window (default 1000)")
    a("--window-seconds", type=float, default=d.window_seconds)
    a("--per-customer-limit", type=int, default=d.per_customer_limit)
    a("--search-limit", type=int, default=d.search_limit)
    a("--rate-headers", choices=("always", "429"), default="always")
    a("--create-status", type=int, choices=(200, 201), default=d.create_status)
    a(
        "--unique-phones",
        choices=("exact", "e164"),
        default=d.unique_phones,
        help="phone uniqueness compares the exact stored value (default) or E.164",
    )
    a("--no-patch-customers", action="store_true")
    a("--no-legacy-notes", action="store_true")
    a("--bulk-max-items", type=int, default=d.bulk_max_items, help="notes per POST /v1/notes/bulk (default 100)")
    a("--bulk-delay", type=float, default=d.bulk_delay_s, help="seconds until a bulk's notes exist (default 0.5)")
    a("--webhook-allow-http", action="store_true", help="accept http:// webhook URLs (local runs)")
    a("--webhook-attempts", type=int, default=d.webhook_attempts)
    a("--webhook-base-delay", type=float, default=d.webhook_base_delay_s)
    a("--webhook-timeout", type=float, default=d.webhook_timeout_s)
    a("--webhook-shuffle-ms", type=int, default=d.webhook_shuffle_ms, help="random delay per delivery (out of order)")
    a("--seed-file", type=Path, help="JSON seed: customers, companies, users")
    a("--fault-seed", type=int)


def app_from_args(args: argparse.Namespace) -> web.Application:
    settings = KustomerSimSettings(
        org_name=args.org_name,
        rate_limit=args.rate_limit,
        window_seconds=args.window_seconds,
        per_customer_limit=args.per_customer_limit,
        search_limit=args.search_limit,
        rate_headers_always=args.rate_headers == "always",
        create_status=args.create_status,
        unique_phones=args.unique_phones,
        patch_customers=not args.no_patch_customers,
        legacy_notes_route=not args.no_legacy_notes,
        bulk_max_items=args.bulk_max_items,
        bulk_delay_s=args.bulk_delay,
        webhook_allow_http=args.webhook_allow_http,
        webhook_attempts=args.webhook_attempts,
        webhook_base_delay_s=args.webhook_base_delay,
        webhook_timeout_s=args.webhook_timeout,
        webhook_shuffle_ms=args.webhook_shuffle_ms,
    )
    keys = {k: ALL_ROLES for k in args.api_key} or {"sim-api-key": ALL_ROLES}
    seed = orjson.loads(args.seed_file.read_bytes()) if args.seed_file else None
    sim = KustomerSim(settings, keys=keys, seed=seed, fault_seed=args.fault_seed)
    log.info("kustomer_sim_configured", org=settings.org_name, keys=len(keys), rate_limit=settings.rate_limit)
    return sim.build_app()


__all__ = ["ALL_ROLES", "KustomerSim", "KustomerSimSettings", "add_arguments", "app_from_args", "running_kustomer_sim"]
