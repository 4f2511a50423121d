"""CloudTalk REST API simulator, with Workflow-Automation "webhook" deliveries.

Serves the API exactly as under ``https://my.cloudtalk.io/api`` (reference §3): a client's base
URL is ``http://host:port/api``. HTTP Basic auth with an API key id + secret; each key pair
selects a *company* with its own data and its own rate window.

API routes (all but ``/api/ai/…`` answer the ``{"responseData": …}`` envelopes of §3.2)::

    GET    /api/contacts/index.json           keyword, country_id, tag_id, industry, page, limit
    PUT    /api/contacts/add.json             201 {"status":201,"data":{"id":"<id>"}}
    POST   /api/contacts/edit/{id}.json       only sent keys change; "" clears; lists are replaced
    DELETE /api/contacts/delete/{id}.json
    GET    /api/contacts/show/{id}.json
    GET    /api/contacts/attributes.json
    PUT    /api/contacts/addTags/{id}.json    {"tags": ["name", …]}  (tags created on demand)
    DELETE /api/contacts/removeTags/{id}.json {"tags": ["name", …]}
    POST   /api/bulk/contacts.json            array of ≤10 {"action", "command_id", "data"} (below)
    GET    /api/countries/index.json          plain list of {"Country": …}
    GET    /api/agents/index.json             id, associated_number, page, limit
    GET    /api/numbers/index.json            id, country_code, area_code, connected_to, is_free, page, limit
    GET    /api/tags/index.json               id, page, limit
    GET    /api/calls/index.json              date_from, date_to, type, status, call_id, public_external,
                                              public_internal, contact_id, user_id, agent_extension,
                                              tag_id, page, limit
    GET    /api/ai/calls/{callId}/summary         conversation intelligence (below): no envelope
    GET    /api/ai/calls/{callId}/smart-notes
    GET    /api/ai/calls/{callId}/transcription
    GET    /api/ai/calls/{callId}/details-link

Errors: 401 ``Unauthorized action`` (bad/missing credentials), 404 ``Not found.``, 406
``Invalid input data.`` with per-field ``data`` messages, 429 when the company's window is spent
(no ``Retry-After``), 500 ``Something went wrong.``. Requests rejected with 401/406/429 never
change state. Validation keys in 406 ``data``: the body field name (``name``, ``zip``,
``country_id``, ``ExternalUrl``, ``ContactsTag``, ``ContactAttribute``, …); errors of a single
list item use the item's field name, as in the documented ``email`` example: ``public_number``
(``ContactNumber``) and ``email`` (``ContactEmail``). Query parameter errors use the parameter's name.

Choices where the reference is silent (documented here, several are settings):

* Collections are ordered by id (contacts, agents, numbers, tags); calls oldest first
  (``started_at``, then id). ``pageCount`` is at least 1; a page past the end has empty ``data``.
* Contacts index items carry ``ContactNumber``/``ContactEmail`` as single objects holding the first
  value, or ``{"public_number": null}`` / ``{"email": null}`` when there is none.
* Numbers: contacts (show, index) and agents (index) render ``+E.164`` strings; call records and
  ``CallNumber.caller_id_e164`` render digits without ``+`` as strings (§4.1); workflow bodies send
  JSON integers without ``+`` (§3.7). Phone numbers are not unique: API adds never merge unless
  ``merge_api_contacts`` is set; integration imports (``/_sim/contacts/import``) follow ``merge_rule``.
* The internal number of an ended call that is not a seeded CloudTalk number is added to the
  numbers (named ``internal_number_name`` or the number itself).
* ``date_from``/``date_to`` (``2017-12-24 12:22:00``, UTC; ISO-8601 also accepted) form an
  inclusive window on ``started_at``, compared at second precision.
* A call's contact is the oldest contact holding the external number (numbers are not unique in
  CloudTalk). Calls of unknown numbers carry no ``Contact`` key (setting ``call_missing_relation``:
  ``omit`` | ``null``); the same applies to ``Agent`` for calls nobody answered.
* ``answered`` = the call has ``answered_at`` (status given when the call is ended); ``missed``
  otherwise (§3.5 assumption).
* ``recording_link``/``recording_url`` are ``null`` unless the call was recorded. A call ended
  with ``recorded: true`` shows ``https://my.cloudtalk.io/r/play/<id>`` in the history and
  ``https://my.cloudtalk.io/pub/r/<base64 of id>/<token>.wav`` in ``call.ended``; once a recording
  is uploaded (``/_sim/calls/{id}/recording``) both show the uploaded link.
* A call's ``Ratings`` hold at most one agent rating (``type`` ``agent``).
* Bulk (§3.4 gives only the path, the ≤10 limit and the actions): the answer format above; the
  target of ``edit_*``/``delete_*`` is ``data.id`` and the contact of ``add_note``/``add_activity``
  is ``data.contact_id`` (a missing or non-integer one is a 406 naming that key); commands are
  independent (a partial failure is still a 200); ``command_id`` must be unique in the request.
* Bulk rate accounting (setting ``bulk_counts_per_item``): by default a bulk request takes one
  operation per command from the company's window of 60 (the cautious reading of "60 operations
  per minute", §3.3), otherwise one per request. When the window cannot take the whole request it
  is refused with 429 and nothing is applied nor taken; a body refused as malformed costs one.
* Contact notes and activities have no routes of their own here (the notes index's filters and
  shapes are not documented); they are written through the bulk endpoint, shown in
  ``/_sim/state`` (``contact_notes``, ``activities``) and removed with their contact. ``user_id``
  of a note must be an agent of the company; ``activity_date`` takes the call-history formats.

Bulk (``POST /api/bulk/contacts.json``, §3.4): a JSON array of 1 to 10 commands ``{"action",
"command_id", "data"}``. Actions and their ``data``: ``add_contact`` (the add body),
``edit_contact`` (``id`` + the edit body), ``delete_contact`` (``id``), ``add_note`` (``contact_id``,
``note`` (required), ``user_id``), ``edit_note`` (``id``, ``note``, ``user_id``), ``delete_note``
(``id``), ``add_activity`` (``contact_id``, ``name`` (required), ``type``, ``activity_date``,
``description``, ``activity_author``, ``external_id``, ``external_url``), ``edit_activity`` (``id``
+ those fields), ``delete_activity`` (``id``). Each command is validated and applied exactly as its
single endpoint (same 404/406 rules, same workflows fire) in array order, on its own. The answer
is 200 with one result per command, in order; a result is the single endpoint's ``responseData``
plus the ``command_id``::

    {"responseData": {"status": 200, "data": [
        {"command_id": "c1", "status": 201, "data": {"id": "1451646001"}},
        {"command_id": "c2", "status": 200},
        {"command_id": "c3", "status": 404, "message": "Not found."},
        {"command_id": "c4", "status": 406, "message": "Invalid input data.", "data": {"name": [...]}}]}}

A body that is not such an array (not an array, empty, more than 10 commands, a command that is not
an object, an unknown ``action``, a missing or repeated ``command_id``, ``data`` not an object) is a
406 with messages under ``body`` or ``<index>.<key>``, and nothing is applied; unparseable JSON is a
400 as everywhere. The request log keeps one entry per bulk request, its ``items`` holding per
command ``{"command_id", "action", "status", "effect", "fault"}`` with the same effect strings as the
single writes (``contact.add <id>``, ``contact.edit <id>``, ``note.add <id> contact=<id>``, …); the
entry's own ``effect`` is ``bulk.contacts applied=<n> commands=<m>`` when anything was applied.
Request faults (``/_sim/faults``: status, latency, timeout, reset) hit the bulk route like any other;
an ``item`` fault rule (``{"match": "POST /api/bulk", "kind": "item", "status": 500,
"probability": 0.3}`` or a ``script``) answers single commands with that status and the CloudTalk
error message, not applied, while the other commands are applied.

Conversation intelligence (``/api/ai/calls/{callId}/…``): authenticated, rate-limited and logged
like every other API route (401/429/405 keep the ``responseData`` envelope), but answers carry no
envelope. Data comes from ``POST /_sim/calls/{id}/insights``; until a value is set, and for a call
the company does not have, the answer is 404 ``{"statusCode": 404, "message": "Not found",
"error": "Not Found"}``. Response shapes [ASSUMPTION: field names unconfirmed]::

    summary        {"summary": str}
    smart-notes    {"smart_notes": [str…]}
    transcription  {"transcription": str}
    details-link   {"url": str}

Inspection routes (no auth; ``?company=<key id>`` selects a company, default the first one)::

    GET    /_sim/requests  DELETE /_sim/requests      request log (base)
    GET    /_sim/faults    POST   /_sim/faults   DELETE /_sim/faults   fault plan (base)
    POST   /_sim/reset                                 back to the start state (seed, workflows)
    GET    /_sim/state                                 contacts, contact_notes, activities, calls, sms,
                                                       deliveries, workflows, …
    POST   /_sim/seed       {"contacts":[…], "agents":[…], "numbers":[…], "tags":[…],
                             "attributes":[…], "workflows":[…]}   (no workflows fire)
    POST   /_sim/calls      end a call: {"direction", "status", "internal_number",
                             "external_number", "agent_id", "waiting_time", "talking_time",
                             "wrapup_time", "is_voicemail", "recorded", "tags", "notes", "rating",
                             "started_at"?, "contact_id"?, "internal_number_name"?,
                             "deliver": true, "deliver_times": 1}
    POST   /_sim/calls/{id}/modify     tags/notes/rating changed after wrap-up or in Call History:
                             any of {"tags": [str…], "notes": [str…], "rating": 1..5|null,
                             "deliver": true, "deliver_times": 1}; sent keys replace the stored
                             ones (an unchanged note keeps its id)   → call.modified
    POST   /_sim/calls/{id}/recording  {"recording_url"?: str (default the pub/r form above),
                             "deliver": true, "deliver_times": 1}; the call becomes recorded with
                             that link                               → recording.uploaded
    POST   /_sim/calls/{id}/insights   any of {"summary": str, "smart_notes": [str…] | str,
                             "transcription": str, "details_link": str}; null removes one (no
                             workflow); answers {"call_id", "insights"}
    POST   /_sim/sms        {"direction", "internal_number", "external_number", "text",
                             "agent_id"?, "created_at"?, "deliver": true, "deliver_times": 1}
    POST   /_sim/contacts           an agent creates a contact (API add body)   → contact.created
    PATCH  /_sim/contacts/{id}      an agent edits a contact (API edit body)    → contact.updated
    DELETE /_sim/contacts/{id}      an agent deletes a contact                  → contact.deleted
    POST   /_sim/contacts/import    an integration import (merge rule applies)  → created/updated
    GET    /_sim/workflows  POST /_sim/workflows {"trigger","url","method","headers","active"}
    DELETE /_sim/workflows  DELETE /_sim/workflows/{id}
    GET    /_sim/deliveries ?trigger=&status=&since=
    GET    /_sim/settings   POST /_sim/settings {field: value, …}   (runtime changes)
    POST   /_sim/companies  {"key_id", "key_secret", "name"?}

Workflow deliveries (§3.7): every active workflow whose trigger matches (``*`` matches all) gets
the canonical body (§4.1, §4.2, and the call and contact bodies below) from a background task, with
``Content-Type: application/json``, ``User-Agent: cloudtalk-workflow-automation``,
``Accept: application/json, text/plain, */*`` and the workflow's static headers. Non-2xx answers,
timeouts and connection errors are retried with exponential backoff (at-least-once). The delivery
log shows header *names* only: static headers usually carry secrets.

Triggers: ``call.ended``, ``call.modified`` ("Call Modified"), ``recording.uploaded`` ("Recording
Uploaded"), ``sms.received``, ``sms.sent``, ``contact.created``, ``contact.updated``,
``contact.deleted``. The call endpoints under ``/_sim/calls/{id}/`` answer 404 ``{"error"}`` for an
unknown call id; modify and recording answer 200 ``{"call_id", "record" (as the history shows it),
"body" (the workflow body)}``.

Call workflow bodies (numbers are JSON integers without ``+``, times ``YYYY-MM-DDTHH:MM:SS.000Z``)::

    call.modified: {"event", "call_id", "call_uuid", "direction", "internal_number",
        "external_number", "call_tags": [str…], "call_notes": [str…], "rating": int|null,
        "modified_at"}                  (always the call's full current tags, notes and rating)
    recording.uploaded: {"event", "call_id", "call_uuid", "internal_number", "external_number",
        "recording_url", "uploaded_at"}

Contact workflow bodies::

    contact.created / contact.updated: {"event", "contact_id", "name", "title", "company",
        "industry", "website", "address", "city", "zip", "state", "country_id", "favorite_agent",
        "contact_numbers": [int…], "contact_emails": [str…], "tags": [str…],
        "external_urls": [{"name", "url"}], "created_at", "modified_at"}
    contact.deleted: {"event", "contact_id", "name", "modified_at"}

Settings (:class:`CloudTalkSimSettings`; CLI flag; runtime via ``POST /_sim/settings``)::

    key_id / key_secret      sim-key-id / sim-key-secret   --key-id / --key-secret (start only)
    rate_limit               60     requests per window per company (§3.3)      --rate-limit
    window_seconds           60.0   rate window length                          --window-seconds
    rate_headers_always      true   X-CloudTalkAPI-* on every response [ASSUMPTION §3.3]; false =
                                    only on 429                                 --rate-headers always|429
    bulk_counts_per_item     true   a bulk request takes one operation per command from the window
                                    [ASSUMPTION §3.3]; false = one per request  --bulk-counts-per-request
    page_size                30     default `limit` [ASSUMPTION §3.2]           --page-size
    keyword_fields           name,number,email   what `keyword` searches [ASSUMPTION §3.4]
                                    (numbers match with or without '+')         --keyword-fields
    keyword_substring        true   case-insensitive substring; false = whole value  --keyword-exact
    merge_api_contacts       false  merge API-created contacts too [CONFLICT §1.9]  --merge-api-contacts
    merge_rule               phone_or_name   integration imports: none|phone|email|phone_or_email|
                                    phone_or_name (§1.9 simulator default)      --merge-rule
    phone_validation         possible   E.164 check: format|possible|valid [ASSUMPTION]  --phone-validation
    call_missing_relation    omit   call records of unknown numbers / no agent: omit|null  --call-missing-relation
    contact_updated_on_noop  true   an edit changing nothing still fires contact.updated  --no-updated-on-noop
    wrapup_delay_s           0.0    call.ended fires this long after the call ends (§3.7)  --wrapup-delay
    delivery_attempts        5      tries per delivery, the first included      --delivery-attempts
    delivery_base_delay_s    0.5    retry n waits base * 2**(n-1) ...           --delivery-base-delay
    delivery_max_delay_s     30.0   ... at most this long
    delivery_timeout_s       5.0    per attempt                                 --delivery-timeout

Other CLI flags: ``--company KEY_ID:SECRET`` (another company, repeatable), ``--workflow
TRIGGER=URL`` (repeatable; ``*`` = every trigger), ``--workflow-header NAME:VALUE`` (repeatable,
sent on every CLI workflow), ``--workflow-method``, ``--seed-file`` (the ``/_sim/seed`` JSON),
``--fault-seed``. ``POST /_sim/reset`` returns to the seed file and CLI workflows.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import itertools
import math
import re
import secrets
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import phonenumbers
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
    set_effect,
    set_items,
)

log = get_logger(__name__)

HELP = "CloudTalk REST API simulator (contacts, calls, reference data) with workflow-automation deliveries"
DEFAULT_PORT = 8092
API_PREFIX = "/api"

TRIGGERS = (
    "call.ended",
    "call.modified",
    "recording.uploaded",
    "sms.received",
    "sms.sent",
    "contact.created",
    "contact.updated",
    "contact.deleted",
)
INSIGHTS = ("summary", "smart_notes", "transcription", "details_link")  # conversation intelligence
MERGE_RULES = ("none", "phone", "email", "phone_or_email", "phone_or_name")
KEYWORD_FIELDS = ("name", "number", "email", "company")
PHONE_VALIDATION = ("format", "possible", "valid")
MISSING_RELATION = ("omit", "null")
MAX_LIMIT = 1000

DELIVERY_HEADERS = {
    "Content-Type": "application/json",
    "User-Agent": "cloudtalk-workflow-automation",
    "Accept": "application/json, text/plain, */*",
    "Accept-Encoding": "gzip",
}

# (id, name, ISO-2, ISO-3, calling code). Ids follow CloudTalk's (61 Denmark, 235 United Kingdom).
COUNTRIES: tuple[tuple[int, str, str, str, str], ...] = (
    (4, "Albania", "AL", "ALB", "355"),
    (11, "Argentina", "AR", "ARG", "54"),
    (14, "Australia", "AU", "AUS", "61"),
    (15, "Austria", "AT", "AUT", "43"),
    (21, "Belarus", "BY", "BLR", "375"),
    (22, "Belgium", "BE", "BEL", "32"),
    (29, "Bosnia and Herzegovina", "BA", "BIH", "387"),
    (31, "Brazil", "BR", "BRA", "55"),
    (36, "Bulgaria", "BG", "BGR", "359"),
    (41, "Canada", "CA", "CAN", "1"),
    (46, "Chile", "CL", "CHL", "56"),
    (47, "China", "CN", "CHN", "86"),
    (50, "Colombia", "CO", "COL", "57"),
    (55, "Croatia", "HR", "HRV", "385"),
    (58, "Cyprus", "CY", "CYP", "357"),
    (59, "Czech Republic", "CZ", "CZE", "420"),
    (61, "Denmark", "DK", "DNK", "45"),
    (66, "Egypt", "EG", "EGY", "20"),
    (70, "Estonia", "EE", "EST", "372"),
    (75, "Finland", "FI", "FIN", "358"),
    (76, "France", "FR", "FRA", "33"),
    (82, "Germany", "DE", "DEU", "49"),
    (85, "Greece", "GR", "GRC", "30"),
    (98, "Hong Kong", "HK", "HKG", "852"),
    (99, "Hungary", "HU", "HUN", "36"),
    (100, "Iceland", "IS", "ISL", "354"),
    (101, "India", "IN", "IND", "91"),
    (102, "Indonesia", "ID", "IDN", "62"),
    (105, "Ireland", "IE", "IRL", "353"),
    (107, "Israel", "IL", "ISR", "972"),
    (108, "Italy", "IT", "ITA", "39"),
    (110, "Japan", "JP", "JPN", "81"),
    (114, "Kenya", "KE", "KEN", "254"),
    (119, "Latvia", "LV", "LVA", "371"),
    (125, "Lithuania", "LT", "LTU", "370"),
    (126, "Luxembourg", "LU", "LUX", "352"),
    (128, "North Macedonia", "MK", "MKD", "389"),
    (131, "Malaysia", "MY", "MYS", "60"),
    (134, "Malta", "MT", "MLT", "356"),
    (140, "Mexico", "MX", "MEX", "52"),
    (145, "Montenegro", "ME", "MNE", "382"),
    (147, "Morocco", "MA", "MAR", "212"),
    (154, "Netherlands", "NL", "NLD", "31"),
    (156, "New Zealand", "NZ", "NZL", "64"),
    (159, "Nigeria", "NG", "NGA", "234"),
    (164, "Norway", "NO", "NOR", "47"),
    (166, "Pakistan", "PK", "PAK", "92"),
    (172, "Peru", "PE", "PER", "51"),
    (173, "Philippines", "PH", "PHL", "63"),
    (174, "Poland", "PL", "POL", "48"),
    (175, "Portugal", "PT", "PRT", "351"),
    (179, "Romania", "RO", "ROU", "40"),
    (180, "Russia", "RU", "RUS", "7"),
    (192, "Saudi Arabia", "SA", "SAU", "966"),
    (194, "Serbia", "RS", "SRB", "381"),
    (197, "Singapore", "SG", "SGP", "65"),
    (199, "Slovakia", "SK", "SVK", "421"),
    (200, "Slovenia", "SI", "SVN", "386"),
    (203, "South Africa", "ZA", "ZAF", "27"),
    (204, "South Korea", "KR", "KOR", "82"),
    (207, "Spain", "ES", "ESP", "34"),
    (213, "Sweden", "SE", "SWE", "46"),
    (214, "Switzerland", "CH", "CHE", "41"),
    (216, "Taiwan", "TW", "TWN", "886"),
    (219, "Thailand", "TH", "THA", "66"),
    (227, "Turkey", "TR", "TUR", "90"),
    (233, "Ukraine", "UA", "UKR", "380"),
    (234, "United Arab Emirates", "AE", "ARE", "971"),
    (235, "United Kingdom", "GB", "GBR", "44"),
    (236, "United States", "US", "USA", "1"),
    (237, "Uruguay", "UY", "URY", "598"),
    (241, "Venezuela", "VE", "VEN", "58"),
    (242, "Vietnam", "VN", "VNM", "84"),
)
COUNTRY_IDS = frozenset(c[0] for c in COUNTRIES)


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass
class CloudTalkSimSettings:
    """Everything configurable; [ASSUMPTION] marks defaults the reference could not confirm."""

    key_id: str = "sim-key-id"  # [--key-id] credentials of the default company
    key_secret: str = "sim-key-secret"  # [--key-secret]
    company_name: str = "Simulated company"
    rate_limit: int = 60  # [--rate-limit] requests per window per company (§3.3)
    window_seconds: float = 60.0  # [--window-seconds] rate window length
    rate_headers_always: bool = True  # [--rate-headers always|429] [ASSUMPTION §3.3]
    bulk_counts_per_item: bool = True  # [--bulk-counts-per-request] [ASSUMPTION §3.3/§3.4] a bulk
    # request takes one operation per command from the window (False: one per request)
    page_size: int = 30  # [--page-size] default `limit` [ASSUMPTION §3.2]
    keyword_fields: tuple[str, ...] = ("name", "number", "email")  # [--keyword-fields] [ASSUMPTION §3.4]
    keyword_substring: bool = True  # [--keyword-exact] substring vs whole-value match
    merge_api_contacts: bool = False  # [--merge-api-contacts] [CONFLICT §1.9]: off for API
    merge_rule: str = "phone_or_name"  # [--merge-rule] integration imports (§1.9)
    phone_validation: str = "possible"  # [--phone-validation] format|possible|valid [ASSUMPTION]
    call_missing_relation: str = "omit"  # [--call-missing-relation] omit|null [ASSUMPTION]
    contact_updated_on_noop: bool = True  # [--no-updated-on-noop] an edit changing nothing still fires [ASSUMPTION]
    wrapup_delay_s: float = 0.0  # [--wrapup-delay] call.ended fires after wrap-up (§3.7)
    delivery_attempts: int = 5  # [--delivery-attempts] tries per delivery, first included
    delivery_base_delay_s: float = 0.5  # [--delivery-base-delay] backoff: base * 2**(n-1)
    delivery_max_delay_s: float = 30.0  # backoff cap
    delivery_timeout_s: float = 5.0  # [--delivery-timeout] per attempt

    def __post_init__(self) -> None:
        self.keyword_fields = tuple(self.keyword_fields)
        problems = []
        if not self.key_id or not self.key_secret:
            problems.append("key_id and key_secret must not be empty")
        if self.rate_limit < 1:
            problems.append("rate_limit must be >= 1")
        if self.window_seconds <= 0:
            problems.append("window_seconds must be > 0")
        if not 1 <= self.page_size <= MAX_LIMIT:
            problems.append(f"page_size must be 1..{MAX_LIMIT}")
        if not self.keyword_fields or set(self.keyword_fields) - set(KEYWORD_FIELDS):
            problems.append(f"keyword_fields must be a non-empty subset of {KEYWORD_FIELDS}")
        if self.merge_rule not in MERGE_RULES:
            problems.append(f"merge_rule must be one of {MERGE_RULES}")
        if self.phone_validation not in PHONE_VALIDATION:
            problems.append(f"phone_validation must be one of {PHONE_VALIDATION}")
        if self.call_missing_relation not in MISSING_RELATION:
            problems.append(f"call_missing_relation must be one of {MISSING_RELATION}")
        if self.wrapup_delay_s < 0 or self.delivery_base_delay_s < 0 or self.delivery_max_delay_s < 0:
            problems.append("delays must be >= 0")
        if self.delivery_attempts < 1:
            problems.append("delivery_attempts must be >= 1")
        if self.delivery_timeout_s <= 0:
            problems.append("delivery_timeout_s must be > 0")
        if problems:
            raise ValueError("; ".join(problems))

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        data["key_secret"] = "[redacted]"
        data["keyword_fields"] = list(self.keyword_fields)
        return data


RUNTIME_FIXED = frozenset({"key_id", "key_secret"})


def _coerce_setting(name: str, value: Any, current: Any) -> Any:
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected true/false")
        return value
    if isinstance(current, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: expected an integer")
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: expected a number")
        return float(value)
    if isinstance(current, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name}: expected a list of strings")
        return tuple(value)
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a string")
    return value


# --------------------------------------------------------------------------------------------
# Error shapes (the one place)
# --------------------------------------------------------------------------------------------

MESSAGES = {
    400: "Bad request.",
    401: "Unauthorized action",
    403: "Forbidden.",
    404: "Not found.",
    405: "Method not allowed.",
    406: "Invalid input data.",
    408: "Request timeout.",
    409: "Conflict.",
    410: "Gone.",
    424: "Failed dependency.",
    429: "Too Many Requests",
    500: "Something went wrong.",
    502: "Bad gateway.",
    503: "Service unavailable.",
    504: "Gateway timeout.",
}


def error_response(
    status: int, message: str | None = None, data: Any = None, headers: dict[str, str] | None = None
) -> web.Response:
    """``{"responseData": {"status", "message"[, "data"]}}`` for every error the API answers."""
    body: dict[str, Any] = {"status": status, "message": message or MESSAGES.get(status, "Error.")}
    if data is not None:
        body["data"] = data
    return json_response({"responseData": body}, status=status, headers=headers)


class InvalidInput(Exception):
    """406 with per-field messages."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__(errors)
        self.errors = errors


class NotFound(Exception):
    """404 ``Not found.``"""


class BadRequest(Exception):
    """400 (unparseable body)."""


class _Errors:
    def __init__(self) -> None:
        self.errors: dict[str, list[str]] = {}

    def add(self, key: str, message: str) -> None:
        messages = self.errors.setdefault(key, [])
        if message not in messages:
            messages.append(message)

    def raise_if_any(self) -> None:
        if self.errors:
            raise InvalidInput(self.errors)


# --------------------------------------------------------------------------------------------
# Phone numbers and time
# --------------------------------------------------------------------------------------------

_E164 = re.compile(r"^\+[1-9]\d{6,14}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[A-Za-z]{2,}$")


def check_e164(value: Any, mode: str) -> str | None:
    """The number when ``value`` is a full international E.164 string acceptable under ``mode``."""
    if not isinstance(value, str) or not _E164.match(value):
        return None
    if mode == "format":
        return value
    try:
        parsed = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException:
        return None
    ok = phonenumbers.is_valid_number(parsed) if mode == "valid" else phonenumbers.is_possible_number(parsed)
    return value if ok else None


def loose_e164(value: Any) -> str | None:
    """Inspection input: ``+447700900123``, ``447700900123`` or the integer → ``+447700900123``."""
    if isinstance(value, bool) or value is None:
        return None
    text = str(value).strip().replace(" ", "")
    if not text.startswith("+"):
        text = "+" + text
    return text if _E164.match(text) else None


def digits(e164: str | None) -> str | None:
    return e164.lstrip("+") if e164 else None


def as_int_number(e164: str | None) -> int | None:
    return int(e164.lstrip("+")) if e164 else None


def number_parts(e164: str) -> tuple[str, str]:
    """(calling code, geographic area code or "")."""
    try:
        parsed = phonenumbers.parse(e164, None)
    except phonenumbers.NumberParseException:
        return "", ""
    nsn = phonenumbers.national_significant_number(parsed)
    area_len = phonenumbers.length_of_geographical_area_code(parsed)
    return str(parsed.country_code), nsn[:area_len] if area_len else ""


def parse_time(value: Any) -> float | None:
    """``2017-12-24 12:22:00`` or ISO-8601; naive times are UTC."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        dt = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def iso(ts: float | None) -> str | None:
    return None if ts is None else now_iso_ms(ts)


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------

SCALAR_LIMITS = {
    "name": 150,
    "title": 255,
    "company": 100,
    "industry": 100,
    "website": 100,
    "address": 255,
    "city": 255,
    "zip": 15,
    "state": 255,
}
LIST_FIELDS = ("ContactNumber", "ContactEmail", "ContactsTag", "ExternalUrl", "ContactAttribute")


@dataclass
class Contact:
    id: int
    name: str
    created: float
    modified: float
    title: str = ""
    company: str = ""
    industry: str = ""
    website: str = ""
    address: str = ""
    city: str = ""
    zip: str = ""
    state: str = ""
    country_id: int | None = None
    favorite_agent: int | None = None
    type: str = "contact"
    numbers: list[str] = field(default_factory=list)  # +E.164
    emails: list[str] = field(default_factory=list)
    tag_ids: list[int] = field(default_factory=list)
    external_urls: list[dict[str, str]] = field(default_factory=list)  # {name, url}
    attributes: list[tuple[int, str]] = field(default_factory=list)  # (attribute id, value)

    def snapshot(self) -> tuple:
        return tuple(v for k, v in asdict(self).items() if k not in ("modified",))


@dataclass
class Agent:
    id: int
    firstname: str
    lastname: str
    email: str
    voice_id: str
    extension: int | None = None
    availability_status: str = "online"
    language: str = "en"
    role: str = "Agent"
    groups: list[str] = field(default_factory=list)
    associated_numbers: list[str] = field(default_factory=list)  # +E.164
    default_number: str | None = None
    call_number_id: int | None = None
    status_outbound: bool = True
    is_daily_limit_ok: bool = True
    daily_price_limit: int | None = None


@dataclass
class CallNumber:
    id: int
    e164: str
    internal_name: str
    country_code: str
    area_code: str
    connected_to: int | None = 1
    source_id: int | None = None
    is_redirected: bool = False


@dataclass
class Call:
    id: int
    uuid: str
    direction: str
    answered: bool
    internal: str
    external: str
    contact_id: int | None
    agent_id: int | None
    started_at: float
    waiting_time: int
    talking_time: int
    wrapup_time: int
    is_voicemail: bool
    recorded: bool
    recording_token: str
    tag_ids: list[int]
    notes: list[tuple[int, str]]
    rating: tuple[int, int] | None  # (rating id, 1..5)
    recording_link: str | None = None  # set by an uploaded recording (history and bodies show it)
    insights: dict[str, Any] = field(default_factory=dict)  # INSIGHTS key → value; absent = 404

    @property
    def answered_at(self) -> float | None:
        return self.started_at + self.waiting_time if self.answered else None

    @property
    def ended_at(self) -> float:
        return self.started_at + self.waiting_time + self.talking_time


@dataclass
class ContactNote:
    """A note on a contact (§3.4 ``notes/add``); written here through the bulk endpoint."""

    id: int
    contact_id: int
    note: str
    user_id: int | None
    created: float
    modified: float

    def public(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "contact_id": str(self.contact_id),
            "note": self.note,
            "user_id": _sid(self.user_id),
            "created": iso(self.created),
            "modified": iso(self.modified),
        }


ACTIVITY_TEXT_FIELDS = ("type", "name", "description", "activity_author", "external_id", "external_url")


@dataclass
class ContactActivity:
    """An activity on a contact (§3.4 ``activity/add``); written here through the bulk endpoint."""

    id: int
    contact_id: int
    name: str
    created: float
    modified: float
    type: str = ""
    description: str = ""
    activity_author: str = ""
    external_id: str = ""
    external_url: str = ""
    activity_date: float | None = None

    def public(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "contact_id": str(self.contact_id),
            **{key: getattr(self, key) for key in ACTIVITY_TEXT_FIELDS},
            "activity_date": iso(self.activity_date),
            "created": iso(self.created),
            "modified": iso(self.modified),
        }


@dataclass
class Sms:
    id: int
    direction: str
    internal: str
    external: str
    contact_id: int | None
    agent_id: int | None
    text: str
    created_at: float


@dataclass
class Workflow:
    id: int
    trigger: str
    url: str
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    active: bool = True

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "trigger": self.trigger,
            "url": self.url,
            "method": self.method,
            "header_names": sorted(self.headers),
            "active": self.active,
        }


@dataclass
class Delivery:
    id: int
    workflow_id: int
    trigger: str
    url: str
    method: str
    body: dict[str, Any]
    header_names: list[str]
    copy: int
    created_at: float
    status: str = "pending"  # pending | delivered | failed
    attempts: list[dict[str, Any]] = field(default_factory=list)
    delivered_at: float | None = None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "workflow_id": self.workflow_id,
            "trigger": self.trigger,
            "url": self.url,
            "method": self.method,
            "body": self.body,
            "header_names": self.header_names,
            "copy": self.copy,
            "created_at": iso(self.created_at),
            "status": self.status,
            "attempts": self.attempts,
            "delivered_at": iso(self.delivered_at),
        }


@dataclass
class Company:
    id: int
    name: str
    key_id: str
    key_secret: str
    contacts: dict[int, Contact] = field(default_factory=dict)
    tags: dict[int, str] = field(default_factory=dict)
    attributes: dict[int, str] = field(default_factory=dict)
    agents: dict[int, Agent] = field(default_factory=dict)
    numbers: dict[int, CallNumber] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    sms: list[Sms] = field(default_factory=list)
    workflows: list[Workflow] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    contact_notes: dict[int, ContactNote] = field(default_factory=dict)
    activities: dict[int, ContactActivity] = field(default_factory=dict)

    def clear(self) -> None:
        for store in (
            self.contacts,
            self.tags,
            self.attributes,
            self.agents,
            self.numbers,
            self.contact_notes,
            self.activities,
        ):
            store.clear()
        for seq in (self.calls, self.sms, self.workflows, self.deliveries):
            seq.clear()

    def tag_id(self, name: str) -> int | None:
        return next((tid for tid, n in self.tags.items() if n == name), None)

    def contact_by_number(self, e164: str) -> Contact | None:
        return next((c for c in sorted(self.contacts.values(), key=lambda c: c.id) if e164 in c.numbers), None)

    def number_by_e164(self, e164: str) -> CallNumber | None:
        return next((n for n in self.numbers.values() if n.e164 == e164), None)


COMPANY = web.RequestKey("cloudtalk_company", Company)  # the authenticated company of an API request


# --------------------------------------------------------------------------------------------
# Contact bodies: validate everything first, then apply (a 406 never changes state)
# --------------------------------------------------------------------------------------------


@dataclass
class ContactChanges:
    scalars: dict[str, str] = field(default_factory=dict)
    country_id: int | None = None
    favorite_agent: int | None = None
    sent: set[str] = field(default_factory=set)  # every recognised key present in the body
    numbers: list[str] = field(default_factory=list)
    emails: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    external_urls: list[dict[str, str]] = field(default_factory=list)
    attributes: list[tuple[int, str]] = field(default_factory=list)


def _as_id(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _deliver_times(spec: dict[str, Any], errors: _Errors) -> int:
    times = spec.get("deliver_times", 1)
    if isinstance(times, bool) or not isinstance(times, int) or times < 0:
        errors.add("deliver_times", "deliver_times must be a non-negative integer.")
        return 0
    return times


def _list_items(body: dict[str, Any], key: str, errors: _Errors) -> list[dict[str, Any]] | None:
    """The items of a list field; ``""``/``None`` clear (→ []); ``None`` when invalid."""
    value = body[key]
    if value is None or value == "":
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        errors.add(key, f"{key} must be a list of objects.")
        return None
    return value


def parse_contact_body(body: Any, company: Company, settings: CloudTalkSimSettings, *, partial: bool) -> ContactChanges:
    """Validate an add (``partial=False``) or edit body; raise :class:`InvalidInput`."""
    errors = _Errors()
    if not isinstance(body, dict):
        raise InvalidInput({"body": ["Request body must be a JSON object."]})
    changes = ContactChanges()
    if not partial and body.get("name") is None:
        errors.add("name", "This field is required.")
    for key, limit in SCALAR_LIMITS.items():
        if key not in body:
            continue
        value = body[key]
        if value is None:
            value = ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            errors.add(key, "Must be a string.")
            continue
        if len(value) > limit:
            errors.add(key, f"Maximum length is {limit} characters.")
        if key == "name" and not value.strip():
            errors.add("name", "This field is required.")
        changes.scalars[key] = value
        changes.sent.add(key)
    if "country_id" in body:
        changes.sent.add("country_id")
        if body["country_id"] not in (None, ""):
            cid = _as_id(body["country_id"])
            if cid is None or cid not in COUNTRY_IDS:
                errors.add("country_id", "Country does not exist.")
            changes.country_id = cid
    if "favorite_agent" in body:
        changes.sent.add("favorite_agent")
        if body["favorite_agent"] not in (None, ""):
            aid = _as_id(body["favorite_agent"])
            if aid is None or aid not in company.agents:
                errors.add("favorite_agent", "Agent does not exist.")
            changes.favorite_agent = aid
    for key in LIST_FIELDS:
        if key not in body:
            continue
        changes.sent.add(key)
        items = _list_items(body, key, errors)
        if items is not None:
            _parse_list(key, items, changes, company, settings, errors)
    errors.raise_if_any()
    return changes


def _parse_list(
    key: str,
    items: list[dict[str, Any]],
    changes: ContactChanges,
    company: Company,
    settings: CloudTalkSimSettings,
    errors: _Errors,
) -> None:
    if key == "ContactNumber":
        for item in items:
            number = check_e164(item.get("public_number"), settings.phone_validation)
            if number is None:
                errors.add(
                    "public_number",
                    f"{item.get('public_number')!r} is not a full international E.164 number (e.g. +442012345678).",
                )
            elif number not in changes.numbers:
                changes.numbers.append(number)
    elif key == "ContactEmail":
        for item in items:
            email = item.get("email")
            if not isinstance(email, str) or not _EMAIL.match(email) or len(email) > 255:
                errors.add("email", "Please supply a valid email address.")
            elif email not in changes.emails:
                changes.emails.append(email)
    elif key == "ContactsTag":
        for item in items:
            name = item.get("name")
            if not isinstance(name, str) or not name.strip() or len(name) > 255:
                errors.add("ContactsTag", "Every tag needs a name of 1 to 255 characters.")
            elif name not in changes.tags:
                changes.tags.append(name)
    elif key == "ExternalUrl":
        if len(items) > 3:
            errors.add("ExternalUrl", "At most 3 external URLs are allowed.")
        for item in items:
            name, url = item.get("name"), item.get("url")
            if not isinstance(name, str) or not name or len(name) > 30:
                errors.add("ExternalUrl", "Every external URL needs a name of 1 to 30 characters.")
            if not isinstance(url, str) or not url:
                errors.add("ExternalUrl", "Every external URL needs a url.")
            if isinstance(name, str) and isinstance(url, str):
                changes.external_urls.append({"name": name, "url": url})
    elif key == "ContactAttribute":
        for item in items:
            aid = _as_id(item.get("attribute_id"))
            value = item.get("value", "")
            if aid is None or aid not in company.attributes:
                errors.add("ContactAttribute", f"Attribute {item.get('attribute_id')!r} does not exist.")
            elif not isinstance(value, str) or len(value) > 255:
                errors.add("ContactAttribute", "Attribute values are strings of at most 255 characters.")
            else:
                changes.attributes = [a for a in changes.attributes if a[0] != aid] + [(aid, value)]


def _ensure_tags(company: Company, names: Iterable[str], next_id: Callable[[], int]) -> list[int]:
    ids = []
    for name in names:
        tid = company.tag_id(name)
        if tid is None:
            tid = next_id()
            company.tags[tid] = name
        ids.append(tid)
    return ids


def apply_changes(contact: Contact, changes: ContactChanges, company: Company, next_tag_id: Callable[[], int]) -> None:
    """Only sent keys change; sent lists replace the stored list."""
    for key, value in changes.scalars.items():
        setattr(contact, key, value)
    if "country_id" in changes.sent:
        contact.country_id = changes.country_id
    if "favorite_agent" in changes.sent:
        contact.favorite_agent = changes.favorite_agent
    if "ContactNumber" in changes.sent:
        contact.numbers = list(changes.numbers)
    if "ContactEmail" in changes.sent:
        contact.emails = list(changes.emails)
    if "ContactsTag" in changes.sent:
        contact.tag_ids = _ensure_tags(company, changes.tags, next_tag_id)
    if "ExternalUrl" in changes.sent:
        contact.external_urls = [dict(u) for u in changes.external_urls]
    if "ContactAttribute" in changes.sent:
        contact.attributes = list(changes.attributes)


def merge_changes(contact: Contact, changes: ContactChanges, company: Company, next_tag_id: Callable[[], int]) -> None:
    """§1.9: union of numbers and e-mails, newest value of every other attribute."""
    for key, value in changes.scalars.items():
        if value:
            setattr(contact, key, value)
    if changes.country_id is not None:
        contact.country_id = changes.country_id
    if changes.favorite_agent is not None:
        contact.favorite_agent = changes.favorite_agent
    contact.numbers += [n for n in changes.numbers if n not in contact.numbers]
    contact.emails += [e for e in changes.emails if e.lower() not in {x.lower() for x in contact.emails}]
    contact.tag_ids += [t for t in _ensure_tags(company, changes.tags, next_tag_id) if t not in contact.tag_ids]
    urls = {u["name"]: u for u in contact.external_urls}
    urls.update({u["name"]: dict(u) for u in changes.external_urls})
    contact.external_urls = list(urls.values())[-3:]
    attrs = dict(contact.attributes)
    attrs.update(dict(changes.attributes))
    contact.attributes = list(attrs.items())


def find_merge_target(company: Company, changes: ContactChanges, rule: str) -> Contact | None:
    numbers = set(changes.numbers)
    emails = {e.lower() for e in changes.emails}
    name = changes.scalars.get("name", "").strip()
    for contact in sorted(company.contacts.values(), key=lambda c: c.id):
        phone_hit = bool(numbers & set(contact.numbers))
        email_hit = bool(emails & {e.lower() for e in contact.emails})
        name_hit = bool(name) and contact.name.strip() == name
        if (
            (rule == "phone" and phone_hit)
            or (rule == "email" and email_hit)
            or (rule == "phone_or_email" and (phone_hit or email_hit))
            or (rule == "phone_or_name" and (phone_hit or name_hit))
        ):
            return contact
    return None


def _required_id(data: dict[str, Any], key: str) -> int:
    """The id under ``key`` of a bulk command's ``data``; 406 naming ``key`` when absent or bad."""
    if data.get(key) in (None, ""):
        raise InvalidInput({key: ["This field is required."]})
    value = _as_id(data[key])
    if value is None:
        raise InvalidInput({key: ["Must be an integer id."]})
    return value


def _text(body: dict[str, Any], key: str, errors: _Errors) -> str | None:
    """A string field (``None`` reads as ``""``; numbers as their text); None when invalid."""
    value = body[key]
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        errors.add(key, "Must be a string.")
        return None
    return value


def parse_note_body(body: Any, company: Company, *, partial: bool) -> dict[str, Any]:
    """``{note (required on add), user_id}`` → the sent keys, validated; raise :class:`InvalidInput`."""
    if not isinstance(body, dict):
        raise InvalidInput({"body": ["Request body must be a JSON object."]})
    errors = _Errors()
    changes: dict[str, Any] = {}
    if "note" in body or not partial:
        text = _text(body, "note", errors) if "note" in body else ""
        if text is not None and not text.strip():
            errors.add("note", "This field is required.")
        changes["note"] = text
    if "user_id" in body:
        uid = None
        if body["user_id"] not in (None, ""):
            uid = _as_id(body["user_id"])
            if uid is None or uid not in company.agents:
                errors.add("user_id", "Agent does not exist.")
        changes["user_id"] = uid
    errors.raise_if_any()
    return changes


def parse_activity_body(body: Any, *, partial: bool) -> dict[str, Any]:
    """``{type, name (required on add), activity_date, description, activity_author, external_id,
    external_url}`` → the sent keys, validated; raise :class:`InvalidInput`."""
    if not isinstance(body, dict):
        raise InvalidInput({"body": ["Request body must be a JSON object."]})
    errors = _Errors()
    changes: dict[str, Any] = {}
    for key in ACTIVITY_TEXT_FIELDS:
        if key in body:
            value = _text(body, key, errors)
            if value is not None:
                changes[key] = value
    if (not partial or "name" in body) and "name" not in errors.errors and not changes.get("name", "").strip():
        errors.add("name", "This field is required.")
    if "activity_date" in body:
        when = None
        if body["activity_date"] not in (None, ""):
            when = parse_time(body["activity_date"])
            if when is None:
                errors.add("activity_date", "Must be a date and time, e.g. 2017-12-24 12:22:00.")
        changes["activity_date"] = when
    errors.raise_if_any()
    return changes


BULK_PATH = "/bulk/contacts.json"
BULK_MAX_COMMANDS = 10  # §3.4
BULK_ACTIONS = (
    "add_contact",
    "edit_contact",
    "delete_contact",
    "add_activity",
    "edit_activity",
    "delete_activity",
    "add_note",
    "edit_note",
    "delete_note",
)


@dataclass
class BulkCommand:
    action: str
    command_id: str | int
    data: dict[str, Any]


def parse_bulk_body(body: Any) -> list[BulkCommand]:
    """The commands of a bulk request; :class:`InvalidInput` (406, nothing applied) when the body is
    not an array of 1..10 ``{action, command_id, data}`` objects with known actions and distinct
    command ids. The ``data`` of each command is validated later, command by command."""
    if not isinstance(body, list) or not body:
        raise InvalidInput({"body": ["Request body must be a JSON array of commands."]})
    if len(body) > BULK_MAX_COMMANDS:
        raise InvalidInput({"body": [f"At most {BULK_MAX_COMMANDS} commands per request."]})
    errors = _Errors()
    commands: list[BulkCommand] = []
    seen: set[str] = set()
    for index, item in enumerate(body):
        if not isinstance(item, dict):
            errors.add(str(index), "Every command must be an object {action, command_id, data}.")
            continue
        action, command_id, data = item.get("action"), item.get("command_id"), item.get("data")
        if action not in BULK_ACTIONS:
            errors.add(f"{index}.action", f"action must be one of {', '.join(BULK_ACTIONS)}.")
        if isinstance(command_id, bool) or not isinstance(command_id, (str, int)) or command_id == "":
            errors.add(f"{index}.command_id", "command_id is required (a string or an integer).")
        elif str(command_id) in seen:
            errors.add(f"{index}.command_id", f"command_id {command_id!r} is used twice.")
        else:
            seen.add(str(command_id))
        if not isinstance(data, dict):
            errors.add(f"{index}.data", "data must be an object.")
        if isinstance(data, dict) and action in BULK_ACTIONS and isinstance(command_id, (str, int)):
            commands.append(BulkCommand(action, command_id, data))
    errors.raise_if_any()
    return commands


def bulk_request_cost(body: Any, per_item: bool) -> int:
    """What a bulk request takes from the company's window: one per command (``per_item``) or one;
    a body that will be refused as malformed costs one, like any other refused request."""
    if per_item and isinstance(body, list) and 1 <= len(body) <= BULK_MAX_COMMANDS:
        return len(body)
    return 1


# --------------------------------------------------------------------------------------------
# Renderers (the API's shapes)
# --------------------------------------------------------------------------------------------


def _sid(value: int | None) -> str | None:
    return None if value is None else str(value)


def render_contact_show(c: Contact, company: Company) -> dict[str, Any]:
    tags = [{"id": str(t), "name": company.tags[t]} for t in c.tag_ids if t in company.tags]
    attrs = [(aid, company.attributes.get(aid, ""), value) for aid, value in c.attributes]
    return {
        "Contact": {
            "id": str(c.id),
            "name": c.name,
            "title": c.title,
            "company": c.company,
            "industry": c.industry,
            "website": c.website,
            "address": c.address,
            "city": c.city,
            "zip": c.zip,
            "state": c.state,
            "country_id": _sid(c.country_id),
            "favorite_agent": _sid(c.favorite_agent),
            "type": c.type,
            "created": iso(c.created),
            "modified": iso(c.modified),
            "contact_numbers": list(c.numbers),
            "contact_emails": list(c.emails),
            "tags": tags,
            "external_urls": [{"external_system": u["name"], "external_url": u["url"]} for u in c.external_urls],
            "custom_fields": [{"key": title, "value": value} for _, title, value in attrs],
        },
        "ExternalUrl": [{"name": u["name"], "url": u["url"]} for u in c.external_urls],
        "ContactNumber": [{"public_number": n} for n in c.numbers],
        "ContactEmail": [{"email": e} for e in c.emails],
        "ContactsTag": [{"name": t["name"]} for t in tags],
        "ContactAttribute": [{"attribute_id": str(aid), "title": title, "value": value} for aid, title, value in attrs],
    }


def render_contact_index(c: Contact, company: Company) -> dict[str, Any]:
    return {
        "Contact": {"id": str(c.id), "name": c.name, "company": c.company},
        "ContactNumber": {"public_number": c.numbers[0] if c.numbers else None},
        "ContactEmail": {"email": c.emails[0] if c.emails else None},
        "ContactAttribute": [
            {"attribute_id": str(aid), "title": company.attributes.get(aid, ""), "value": v} for aid, v in c.attributes
        ],
    }


def render_agent_index(a: Agent) -> dict[str, Any]:
    return {
        "Agent": {
            "id": str(a.id),
            "name": a.voice_id,
            "firstname": a.firstname,
            "lastname": a.lastname,
            "email": a.email,
            "is_daily_limit_ok": a.is_daily_limit_ok,
            "status_outbound": a.status_outbound,
            "availability_status": a.availability_status,
            "extension": _sid(a.extension),
            "call_number_id": a.call_number_id,
            "default_number": a.default_number,
            "associated_numbers": list(a.associated_numbers),
            "daily_price_limit": a.daily_price_limit,
        }
    }


def render_agent_call(a: Agent) -> dict[str, Any]:
    return {
        "id": str(a.id),
        "firstname": a.firstname,
        "lastname": a.lastname,
        "fullname": f"{a.firstname} {a.lastname}".strip(),
        "email": a.email,
        "language": a.language,
        "role": a.role,
        "status": a.availability_status,
        "default_outbound_number": digits(a.default_number),
        "associated_numbers": [digits(n) for n in a.associated_numbers],
        "groups": list(a.groups),
    }


def render_number_index(n: CallNumber) -> dict[str, Any]:
    return {
        "CallNumber": {
            "id": str(n.id),
            "country_code": n.country_code,
            "area_code": n.area_code,
            "internal_name": n.internal_name,
            "caller_id_e164": digits(n.e164),
            "is_redirected": n.is_redirected,
            "connected_to": _sid(n.connected_to),
            "source_id": _sid(n.source_id),
        }
    }


def render_number_call(n: CallNumber) -> dict[str, Any]:
    return {
        "id": str(n.id),
        "internal_name": n.internal_name,
        "caller_id_e164": digits(n.e164),
        "country_code": n.country_code,
        "area_code": n.area_code,
    }


def render_contact_call(c: Contact, company: Company) -> dict[str, Any]:
    show = render_contact_show(c, company)["Contact"]
    agent = company.agents.get(c.favorite_agent) if c.favorite_agent is not None else None
    return {
        "id": show["id"],
        "name": c.name,
        "title": c.title,
        "company": c.company,
        "industry": c.industry,
        "address": c.address,
        "city": c.city,
        "zip": c.zip,
        "state": c.state,
        "type": c.type,
        "contact_numbers": [digits(n) for n in c.numbers],
        "contact_emails": list(c.emails),
        "tags": show["tags"],
        "external_urls": show["external_urls"],
        "custom_fields": show["custom_fields"],
        "favorite_agent": render_agent_call(agent) if agent else None,
    }


def public_recording_url(call: Call) -> str:
    """``https://my.cloudtalk.io/pub/r/<base64 of the call id>/<random token>.wav``."""
    encoded = urllib.parse.quote(base64.b64encode(str(call.id).encode()).decode(), safe="")
    return f"https://my.cloudtalk.io/pub/r/{encoded}/{call.recording_token}.wav"


def recording_url(call: Call) -> str | None:
    """The ``recording_url`` of workflow bodies: None unless recorded; an uploaded link wins."""
    if not call.recorded:
        return None
    return call.recording_link or public_recording_url(call)


def recording_link(call: Call) -> str | None:
    """``Cdr.recording_link`` of the history: None unless recorded; an uploaded link wins."""
    if not call.recorded:
        return None
    return call.recording_link or f"https://my.cloudtalk.io/r/play/{call.id}"


def render_call(call: Call, company: Company, settings: CloudTalkSimSettings) -> dict[str, Any]:
    internal_cc, _ = number_parts(call.internal)
    external_cc, _ = number_parts(call.external)
    item: dict[str, Any] = {
        "Cdr": {
            "id": str(call.id),
            "billsec": str(call.waiting_time + call.talking_time),
            "type": call.direction,
            "country_code": external_cc,
            "public_external": digits(call.external),
            "public_internal": digits(call.internal),
            "recorded": call.recorded,
            "is_voicemail": call.is_voicemail,
            "fax_email": "",
            "is_redirected": "0",
            "redirected_from": "",
            "transferred_from": "",
            "is_local": internal_cc == external_cc,
            "user_id": _sid(call.agent_id),
            "talking_time": str(call.talking_time),
            "started_at": iso(call.started_at),
            "answered_at": iso(call.answered_at),
            "ended_at": iso(call.ended_at),
            "waiting_time": call.waiting_time,
            "wrapup_time": call.wrapup_time,
            "recording_link": recording_link(call),
        }
    }
    contact = company.contacts.get(call.contact_id) if call.contact_id is not None else None
    if contact is not None:
        item["Contact"] = render_contact_call(contact, company)
    elif settings.call_missing_relation == "null":
        item["Contact"] = None
    number = company.number_by_e164(call.internal)
    item["CallNumber"] = render_number_call(number) if number else None
    agent = company.agents.get(call.agent_id) if call.agent_id is not None else None
    if agent is not None:
        item["Agent"] = render_agent_call(agent)
    elif settings.call_missing_relation == "null":
        item["Agent"] = None
    item["BillingData"] = {"price": "0.000000"}
    item["Notes"] = [{"id": str(nid), "name": text} for nid, text in call.notes]
    item["Tags"] = [{"id": str(t), "name": company.tags.get(t, "")} for t in call.tag_ids]
    item["Ratings"] = [{"id": str(call.rating[0]), "type": "agent", "rating": call.rating[1]}] if call.rating else []
    return item


def call_ended_body(call: Call, company: Company) -> dict[str, Any]:
    number = company.number_by_e164(call.internal)
    agent = company.agents.get(call.agent_id) if call.agent_id is not None else None
    return {
        "event": "call.ended",
        "call_id": call.id,
        "call_uuid": call.uuid,
        "direction": call.direction,
        "status": "answered" if call.answered else "missed",
        "internal_number": as_int_number(call.internal),
        "internal_number_name": number.internal_name if number else None,
        "external_number": as_int_number(call.external),
        "contact_id": call.contact_id,
        "agent_id": call.agent_id,
        "agent_first_name": agent.firstname if agent else None,
        "agent_last_name": agent.lastname if agent else None,
        "agent_email": agent.email if agent else None,
        "started_at": iso(call.started_at),
        "answered_at": iso(call.answered_at),
        "ended_at": iso(call.ended_at),
        "waiting_time": call.waiting_time,
        "talking_time": call.talking_time,
        "wrapup_time": call.wrapup_time,
        "is_voicemail": call.is_voicemail,
        "recording_url": recording_url(call),
        "call_tags": [company.tags.get(t, "") for t in call.tag_ids],
        "call_notes": [text for _, text in call.notes],
        "rating": call.rating[1] if call.rating else None,
    }


def call_modified_body(call: Call, company: Company) -> dict[str, Any]:
    """``call.modified``: the call's full current tags, notes and rating."""
    return {
        "event": "call.modified",
        "call_id": call.id,
        "call_uuid": call.uuid,
        "direction": call.direction,
        "internal_number": as_int_number(call.internal),
        "external_number": as_int_number(call.external),
        "call_tags": [company.tags.get(t, "") for t in call.tag_ids],
        "call_notes": [text for _, text in call.notes],
        "rating": call.rating[1] if call.rating else None,
        "modified_at": now_iso_ms(),
    }


def recording_uploaded_body(call: Call) -> dict[str, Any]:
    return {
        "event": "recording.uploaded",
        "call_id": call.id,
        "call_uuid": call.uuid,
        "internal_number": as_int_number(call.internal),
        "external_number": as_int_number(call.external),
        "recording_url": recording_url(call),
        "uploaded_at": now_iso_ms(),
    }


def render_insight(kind: str, value: Any) -> dict[str, Any]:
    """Conversation intelligence answers (no envelope) [ASSUMPTION: the field names]."""
    key = {"details_link": "url"}.get(kind, kind)
    return {key: list(value) if isinstance(value, list) else value}


AI_NOT_FOUND = {"statusCode": 404, "message": "Not found", "error": "Not Found"}


def sms_body(sms: Sms) -> dict[str, Any]:
    incoming = sms.direction == "incoming"
    sender, recipient = (sms.external, sms.internal) if incoming else (sms.internal, sms.external)
    return {
        "event": "sms.received" if incoming else "sms.sent",
        "sms_id": sms.id,
        "direction": sms.direction,
        "sender": as_int_number(sender),
        "recipient": as_int_number(recipient),
        "internal_number": as_int_number(sms.internal),
        "external_number": as_int_number(sms.external),
        "contact_id": sms.contact_id,
        "agent_id": None if incoming else sms.agent_id,
        "text": sms.text,
        "created_at": iso(sms.created_at),
    }


def contact_body(event: str, c: Contact, company: Company) -> dict[str, Any]:
    return {
        "event": event,
        "contact_id": c.id,
        "name": c.name,
        "title": c.title,
        "company": c.company,
        "industry": c.industry,
        "website": c.website,
        "address": c.address,
        "city": c.city,
        "zip": c.zip,
        "state": c.state,
        "country_id": c.country_id,
        "favorite_agent": c.favorite_agent,
        "contact_numbers": [as_int_number(n) for n in c.numbers],
        "contact_emails": list(c.emails),
        "tags": [company.tags[t] for t in c.tag_ids if t in company.tags],
        "external_urls": [{"name": u["name"], "url": u["url"]} for u in c.external_urls],
        "created_at": iso(c.created),
        "modified_at": iso(c.modified),
    }


# --------------------------------------------------------------------------------------------
# Query helpers
# --------------------------------------------------------------------------------------------


def int_param(
    query: Any, name: str, errors: _Errors, *, minimum: int | None = None, maximum: int | None = None
) -> int | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        errors.add(name, f"{name} must be an integer.")
        return None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        errors.add(name, f"{name} must be {bounds}.")
        return None
    return value


def page_params(query: Any, settings: CloudTalkSimSettings, errors: _Errors) -> tuple[int, int]:
    limit = int_param(query, "limit", errors, minimum=1, maximum=MAX_LIMIT)
    page = int_param(query, "page", errors, minimum=1)
    return (page or 1), (limit or settings.page_size)


def paginate(items: list[Any], page: int, limit: int, render: Callable[[Any], Any]) -> dict[str, Any]:
    total = len(items)
    start = (page - 1) * limit
    return {
        "itemsCount": total,
        "pageCount": max(1, math.ceil(total / limit)),
        "pageNumber": page,
        "limit": limit,
        "data": [render(item) for item in items[start : start + limit]],
    }


def keyword_matches(c: Contact, keyword: str, settings: CloudTalkSimSettings) -> bool:
    kw = keyword.strip().lower()
    if not kw:
        return True

    def hit(value: str) -> bool:
        value = value.lower()
        return kw in value if settings.keyword_substring else kw == value

    fields_ = settings.keyword_fields
    if "name" in fields_ and hit(c.name):
        return True
    if "company" in fields_ and c.company and hit(c.company):
        return True
    if "email" in fields_ and any(hit(e) for e in c.emails):
        return True
    if "number" in fields_:
        kw_digits = re.sub(r"[\s\-()]", "", kw).lstrip("+")
        if kw_digits.isdigit():
            for n in c.numbers:
                d = n.lstrip("+")
                if (kw_digits in d) if settings.keyword_substring else kw_digits == d:
                    return True
    return False


async def read_json(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("Request body is not valid JSON.") from None


def _object(body: Any) -> dict[str, Any]:
    """An inspection body that may be empty (``{}``) but must otherwise be a JSON object."""
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    return body


def basic_credentials(header: str) -> tuple[str, str] | None:
    """(key id, secret) from ``Authorization: Basic …``; None when absent or malformed."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    login, sep, password = decoded.partition(":")
    return (login, password) if sep else None


def ok(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"responseData": data}, status=status, headers=headers)


# --------------------------------------------------------------------------------------------
# The simulator
# --------------------------------------------------------------------------------------------


class CloudTalkSim:
    """State, settings and behaviour of the simulated CloudTalk; :meth:`build_app` serves it."""

    def __init__(
        self,
        settings: CloudTalkSimSettings | None = None,
        seed: dict[str, Any] | None = None,
        fault_seed: int | None = None,
    ) -> None:
        self.settings = settings or CloudTalkSimSettings()
        self.log = RequestLog()
        self.faults = FaultPlan(fault_seed)
        self.window = FixedWindow(self.settings.rate_limit, self.settings.window_seconds)
        self.initial_seed = seed or {}
        self.companies: list[Company] = []
        self._ids = {
            name: itertools.count(start)
            for name, start in (
                ("company", 100001),
                ("contact", 1451646001),
                ("tag", 601),
                ("attribute", 121),
                ("agent", 493901),
                ("number", 12301),
                ("call", 1002409001),
                ("sms", 88231001),
                ("note", 21),
                ("contact_note", 31001),
                ("activity", 7001),
                ("rating", 9),
                ("workflow", 1),
                ("delivery", 1),
            )
        }
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self.root_url: str | None = None  # set once served (inspection routes live here)
        self.add_company(self.settings.key_id, self.settings.key_secret, self.settings.company_name)
        self.seed(self.initial_seed)

    # ---- companies and ids ------------------------------------------------------------------

    def next_id(self, kind: str) -> int:
        return next(self._ids[kind])

    def add_company(self, key_id: str, key_secret: str, name: str | None = None) -> Company:
        if not key_id or not key_secret:
            raise ValueError("key_id and key_secret are required")
        if any(c.key_id == key_id for c in self.companies):
            raise ValueError(f"a company with key id {key_id!r} exists")
        company = Company(self.next_id("company"), name or f"Company {key_id}", key_id, key_secret)
        self.companies.append(company)
        return company

    @property
    def company(self) -> Company:
        """The default company (the CLI's key pair)."""
        return self.companies[0]

    def company_for(self, key_id: str | None) -> Company:
        if key_id is None:
            return self.company
        for company in self.companies:
            if company.key_id == key_id:
                return company
        raise NotFound(f"no company with key id {key_id!r}")

    def authenticate(self, request: web.Request) -> Company | None:
        credentials = basic_credentials(request.headers.get("Authorization", ""))
        if credentials is None:
            return None
        login, password = credentials
        for company in self.companies:
            if secrets.compare_digest(login.encode(), company.key_id.encode()) and secrets.compare_digest(
                password.encode(), company.key_secret.encode()
            ):
                return company
        return None

    # ---- settings ---------------------------------------------------------------------------

    def update_settings(self, changes: dict[str, Any]) -> CloudTalkSimSettings:
        known = {f.name for f in fields(CloudTalkSimSettings)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown settings: {sorted(unknown)}")
        fixed = set(changes) & RUNTIME_FIXED
        if fixed:
            raise ValueError(f"settings fixed at start: {sorted(fixed)}")
        coerced = {k: _coerce_setting(k, v, getattr(self.settings, k)) for k, v in changes.items()}
        self.settings = replace(self.settings, **coerced)
        self.window.limit = self.settings.rate_limit
        self.window.window_s = self.settings.window_seconds
        return self.settings

    # ---- seeding and reset ------------------------------------------------------------------

    def seed(self, data: dict[str, Any], company: Company | None = None) -> dict[str, list[int]]:
        """Reference data and contacts as they exist before the test; fires no workflow."""
        company = company or self.company
        if not isinstance(data, dict):
            raise ValueError("seed must be a JSON object")
        unknown = set(data) - {"tags", "attributes", "agents", "numbers", "contacts", "workflows"}
        if unknown:
            raise ValueError(f"unknown seed sections: {sorted(unknown)}")
        created: dict[str, list[int]] = {}
        for name in data.get("tags", []):
            created.setdefault("tags", []).extend(_ensure_tags(company, [str(name)], lambda: self.next_id("tag")))
        for spec in data.get("attributes", []):
            spec = {"title": spec} if isinstance(spec, str) else spec
            aid = int(spec.get("id") or self.next_id("attribute"))
            company.attributes[aid] = str(spec["title"])
            created.setdefault("attributes", []).append(aid)
        for spec in data.get("numbers", []):
            created.setdefault("numbers", []).append(self._seed_number(company, spec).id)
        for spec in data.get("agents", []):
            created.setdefault("agents", []).append(self._seed_agent(company, spec).id)
        for spec in data.get("contacts", []):
            contact = self._insert_contact(company, spec, fire=False, explicit_id=spec.get("id"))
            created.setdefault("contacts", []).append(contact.id)
        for spec in data.get("workflows", []):
            created.setdefault("workflows", []).append(self.add_workflow(company=company, **spec).id)
        return created

    def _seed_number(self, company: Company, spec: dict[str, Any]) -> CallNumber:
        e164 = loose_e164(spec.get("caller_id_e164") or spec.get("number"))
        if e164 is None:
            raise ValueError(f"number needs caller_id_e164 in E.164: {spec!r}")
        calling, area = number_parts(e164)
        number = CallNumber(
            id=int(spec.get("id") or self.next_id("number")),
            e164=e164,
            internal_name=str(spec.get("internal_name") or e164),
            country_code=str(spec.get("country_code") or calling),
            area_code=str(spec.get("area_code") if spec.get("area_code") is not None else area),
            connected_to=spec.get("connected_to", 1),
            source_id=spec.get("source_id"),
            is_redirected=bool(spec.get("is_redirected", False)),
        )
        company.numbers[number.id] = number
        return number

    def _seed_agent(self, company: Company, spec: dict[str, Any]) -> Agent:
        aid = int(spec.get("id") or self.next_id("agent"))
        numbers = [n for n in (loose_e164(x) for x in spec.get("associated_numbers", [])) if n]
        default = loose_e164(spec.get("default_number")) if spec.get("default_number") else None
        default = default or (numbers[0] if numbers else None)
        call_number = company.number_by_e164(default) if default else None
        agent = Agent(
            id=aid,
            firstname=str(spec.get("firstname", "")),
            lastname=str(spec.get("lastname", "")),
            email=str(spec.get("email", "")),
            voice_id=str(spec.get("name") or 100000 + aid % 900000),
            extension=spec.get("extension"),
            availability_status=spec.get("availability_status", "online"),
            language=spec.get("language", "en"),
            role=spec.get("role", "Agent"),
            groups=list(spec.get("groups", [])),
            associated_numbers=numbers,
            default_number=default,
            call_number_id=spec.get("call_number_id") or (call_number.id if call_number else None),
            status_outbound=bool(spec.get("status_outbound", True)),
            is_daily_limit_ok=bool(spec.get("is_daily_limit_ok", True)),
            daily_price_limit=spec.get("daily_price_limit"),
        )
        company.agents[aid] = agent
        return agent

    def reset(self) -> None:
        """Back to the start state: data cleared, start seed and workflows re-applied."""
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()
        for company in self.companies:
            company.clear()
        self.window.reset()
        self.seed(self.initial_seed)

    # ---- contacts ---------------------------------------------------------------------------

    def _insert_contact(
        self, company: Company, body: Any, *, fire: bool, explicit_id: Any = None, merge_rule: str = "none"
    ) -> Contact:
        changes = parse_contact_body(body, company, self.settings, partial=False)
        return self._create_from_changes(
            company, changes, body, fire=fire, explicit_id=explicit_id, merge_rule=merge_rule
        )[0]

    def _create_from_changes(
        self,
        company: Company,
        changes: ContactChanges,
        body: dict[str, Any],
        *,
        fire: bool,
        explicit_id: Any = None,
        merge_rule: str = "none",
    ) -> tuple[Contact, bool]:
        now = time.time()
        target = find_merge_target(company, changes, merge_rule) if merge_rule != "none" else None
        if target is not None:
            merge_changes(target, changes, company, lambda: self.next_id("tag"))
            target.modified = now
            if fire:
                self.fire(company, "contact.updated", contact_body("contact.updated", target, company))
            return target, True
        cid = int(explicit_id) if explicit_id is not None else self.next_id("contact")
        if cid in company.contacts:
            raise ValueError(f"contact {cid} exists")
        contact = Contact(
            id=cid,
            name="",
            created=now,
            modified=now,
            type=body.get("type", "contact") if body.get("type") in ("contact", "lead") else "contact",
        )
        apply_changes(contact, changes, company, lambda: self.next_id("tag"))
        company.contacts[cid] = contact
        if fire:
            self.fire(company, "contact.created", contact_body("contact.created", contact, company))
        return contact, False

    def create_contact(self, body: Any, company: Company | None = None, *, via: str = "agent") -> Contact:
        """An API add (``via="api"``, merged only when ``merge_api_contacts``) or an agent's create."""
        company = company or self.company
        rule = self.settings.merge_rule if (via == "api" and self.settings.merge_api_contacts) else "none"
        return self._insert_contact(company, body, fire=True, merge_rule=rule)

    def import_contact(self, body: Any, company: Company | None = None) -> tuple[Contact, bool]:
        """An integration import: the merge rule applies (§1.9). Returns (contact, merged)."""
        company = company or self.company
        changes = parse_contact_body(body, company, self.settings, partial=False)
        return self._create_from_changes(company, changes, body, fire=True, merge_rule=self.settings.merge_rule)

    def get_contact(self, contact_id: int, company: Company | None = None) -> Contact:
        contact = (company or self.company).contacts.get(contact_id)
        if contact is None:
            raise NotFound(contact_id)
        return contact

    def edit_contact(self, contact_id: int, body: Any, company: Company | None = None) -> Contact:
        company = company or self.company
        contact = self.get_contact(contact_id, company)
        changes = parse_contact_body(body, company, self.settings, partial=True)
        before = contact.snapshot()
        apply_changes(contact, changes, company, lambda: self.next_id("tag"))
        changed = contact.snapshot() != before
        if changed:
            contact.modified = time.time()
        if changed or self.settings.contact_updated_on_noop:
            self.fire(company, "contact.updated", contact_body("contact.updated", contact, company))
        return contact

    def delete_contact(self, contact_id: int, company: Company | None = None) -> Contact:
        company = company or self.company
        contact = self.get_contact(contact_id, company)
        del company.contacts[contact_id]
        for store in (company.contact_notes, company.activities):
            for item_id in [i for i, item in store.items() if item.contact_id == contact_id]:
                del store[item_id]
        body = {"event": "contact.deleted", "contact_id": contact.id, "name": contact.name, "modified_at": now_iso_ms()}
        self.fire(company, "contact.deleted", body)
        return contact

    # ---- contact notes and activities (reachable through the bulk endpoint) -------------------

    def add_note(self, contact_id: int, body: Any, company: Company | None = None) -> ContactNote:
        company = company or self.company
        self.get_contact(contact_id, company)  # 404 before 406, as the contact routes do
        changes = parse_note_body(body, company, partial=False)
        now = time.time()
        note = ContactNote(self.next_id("contact_note"), contact_id, changes["note"], changes.get("user_id"), now, now)
        company.contact_notes[note.id] = note
        return note

    def edit_note(self, note_id: int, body: Any, company: Company | None = None) -> ContactNote:
        company = company or self.company
        note = company.contact_notes.get(note_id)
        if note is None:
            raise NotFound(note_id)
        for key, value in parse_note_body(body, company, partial=True).items():
            setattr(note, key, value)
        note.modified = time.time()
        return note

    def delete_note(self, note_id: int, company: Company | None = None) -> ContactNote:
        company = company or self.company
        note = company.contact_notes.pop(note_id, None)
        if note is None:
            raise NotFound(note_id)
        return note

    def add_activity(self, contact_id: int, body: Any, company: Company | None = None) -> ContactActivity:
        company = company or self.company
        self.get_contact(contact_id, company)
        changes = parse_activity_body(body, partial=False)
        now = time.time()
        activity = ContactActivity(self.next_id("activity"), contact_id, changes.pop("name"), now, now, **changes)
        company.activities[activity.id] = activity
        return activity

    def edit_activity(self, activity_id: int, body: Any, company: Company | None = None) -> ContactActivity:
        company = company or self.company
        activity = company.activities.get(activity_id)
        if activity is None:
            raise NotFound(activity_id)
        for key, value in parse_activity_body(body, partial=True).items():
            setattr(activity, key, value)
        activity.modified = time.time()
        return activity

    def delete_activity(self, activity_id: int, company: Company | None = None) -> ContactActivity:
        company = company or self.company
        activity = company.activities.pop(activity_id, None)
        if activity is None:
            raise NotFound(activity_id)
        return activity

    # ---- bulk -------------------------------------------------------------------------------

    def run_bulk_command(self, company: Company, command: BulkCommand) -> tuple[dict[str, Any], str | None]:
        """Apply one command as its single endpoint would: (its ``responseData``, its effect or None)."""
        data, action = command.data, command.action
        try:
            if action == "add_contact":
                contact = self.create_contact(data, company, via="api")
                return {"status": 201, "data": {"id": str(contact.id)}}, f"contact.add {contact.id}"
            if action in ("add_note", "add_activity"):
                contact_id = _required_id(data, "contact_id")
                body = {k: v for k, v in data.items() if k != "contact_id"}
                if action == "add_note":
                    note = self.add_note(contact_id, body, company)
                    return {"status": 201, "data": {"id": str(note.id)}}, f"note.add {note.id} contact={contact_id}"
                activity = self.add_activity(contact_id, body, company)
                effect = f"activity.add {activity.id} contact={contact_id}"
                return {"status": 201, "data": {"id": str(activity.id)}}, effect
            target = _required_id(data, "id")
            body = {k: v for k, v in data.items() if k != "id"}
            verb, noun = action.split("_", 1)
            if action == "edit_contact":
                self.edit_contact(target, body, company)
            elif action == "delete_contact":
                self.delete_contact(target, company)
            elif action == "edit_note":
                self.edit_note(target, body, company)
            elif action == "delete_note":
                self.delete_note(target, company)
            elif action == "edit_activity":
                self.edit_activity(target, body, company)
            else:
                self.delete_activity(target, company)
            return {"status": 200}, f"{noun}.{verb} {target}"
        except InvalidInput as exc:
            return {"status": 406, "message": MESSAGES[406], "data": exc.errors}, None
        except NotFound:
            return {"status": 404, "message": MESSAGES[404]}, None
        except Exception:
            log.exception("cloudtalk_sim_bulk_command_failed", action=action, command_id=command.command_id)
            return {"status": 500, "message": MESSAGES[500]}, None

    def change_tags(
        self, contact_id: int, names: Any, *, add: bool, company: Company | None = None
    ) -> tuple[Contact, list[dict[str, str]]]:
        company = company or self.company
        contact = self.get_contact(contact_id, company)
        if (
            not isinstance(names, list)
            or not names
            or not all(isinstance(n, str) and n.strip() and len(n) <= 255 for n in names)
        ):
            raise InvalidInput({"tags": ["tags must be a non-empty list of tag names."]})
        if add:
            ids = _ensure_tags(company, names, lambda: self.next_id("tag"))
            changed = [t for t in ids if t not in contact.tag_ids]
            contact.tag_ids += changed
        else:
            ids = [t for t in (company.tag_id(n) for n in names) if t is not None and t in contact.tag_ids]
            changed = ids
            contact.tag_ids = [t for t in contact.tag_ids if t not in ids]
        if changed:
            contact.modified = time.time()
        if changed or self.settings.contact_updated_on_noop:
            self.fire(company, "contact.updated", contact_body("contact.updated", contact, company))
        return contact, [{"id": str(t), "name": company.tags[t]} for t in dict.fromkeys(ids)]

    # ---- calls and SMS ----------------------------------------------------------------------

    def end_call(self, spec: dict[str, Any], company: Company | None = None) -> Call:
        """A call ended: store the CDR and (unless ``deliver`` is false) fire ``call.ended``."""
        company = company or self.company
        errors = _Errors()
        direction = spec.get("direction", "incoming")
        if direction not in ("incoming", "outgoing", "internal"):
            errors.add("direction", "direction must be incoming, outgoing or internal.")
        status = spec.get("status", "answered")
        if status not in ("answered", "missed"):
            errors.add("status", "status must be answered or missed.")
        internal = loose_e164(spec.get("internal_number"))
        external = loose_e164(spec.get("external_number"))
        if internal is None:
            errors.add("internal_number", "internal_number must be an E.164 number.")
        if external is None:
            errors.add("external_number", "external_number must be an E.164 number.")
        agent_id = _as_id(spec.get("agent_id")) if spec.get("agent_id") is not None else None
        if spec.get("agent_id") is not None and agent_id not in company.agents:
            errors.add("agent_id", "Agent does not exist.")
        durations = {}
        for key, default in (
            ("waiting_time", 5),
            ("talking_time", 60 if status == "answered" else 0),
            ("wrapup_time", 0),
        ):
            value = spec.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                errors.add(key, f"{key} must be a non-negative integer (seconds).")
            durations[key] = value
        rating = spec.get("rating")
        if rating is not None and (isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5):
            errors.add("rating", "rating must be 1..5 or null.")
        started = parse_time(spec["started_at"]) if spec.get("started_at") else None
        if spec.get("started_at") and started is None:
            errors.add("started_at", "started_at must be an ISO-8601 time.")
        tags, notes = spec.get("tags", []), spec.get("notes", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
            errors.add("tags", "tags must be a list of names.")
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            errors.add("notes", "notes must be a list of strings.")
        times = spec.get("deliver_times", 1)
        if isinstance(times, bool) or not isinstance(times, int) or times < 0:
            errors.add("deliver_times", "deliver_times must be a non-negative integer.")
        errors.raise_if_any()
        assert internal is not None and external is not None
        if status == "missed":
            durations["talking_time"] = 0
        if started is None:
            started = time.time() - durations["waiting_time"] - durations["talking_time"]
        if company.number_by_e164(internal) is None:
            self._seed_number(company, {"caller_id_e164": internal, "internal_name": spec.get("internal_number_name")})
        contact_id = _as_id(spec.get("contact_id")) if spec.get("contact_id") is not None else None
        if contact_id is None and direction != "internal":
            contact = company.contact_by_number(external)
            contact_id = contact.id if contact else None
        call = Call(
            id=self.next_id("call"),
            uuid=str(uuid.uuid4()),
            direction=direction,
            answered=status == "answered",
            internal=internal,
            external=external,
            contact_id=contact_id,
            agent_id=agent_id,
            started_at=started,
            waiting_time=durations["waiting_time"],
            talking_time=durations["talking_time"],
            wrapup_time=durations["wrapup_time"],
            is_voicemail=bool(spec.get("is_voicemail", False)),
            recorded=bool(spec.get("recorded", False)),
            recording_token=secrets.token_urlsafe(12),
            tag_ids=_ensure_tags(company, tags, lambda: self.next_id("tag")),
            notes=[(self.next_id("note"), n) for n in notes],
            rating=(self.next_id("rating"), rating) if rating is not None else None,
        )
        company.calls.append(call)
        if spec.get("deliver", True):
            self.fire(
                company, "call.ended", call_ended_body(call, company), times=times, delay=self.settings.wrapup_delay_s
            )
        return call

    def get_call(self, call_id: int, company: Company | None = None) -> Call:
        call = next((c for c in (company or self.company).calls if c.id == call_id), None)
        if call is None:
            raise NotFound(f"call {call_id}")
        return call

    def modify_call(
        self, call_id: int, spec: dict[str, Any], company: Company | None = None
    ) -> tuple[Call, dict[str, Any]]:
        """Tags / notes / rating changed after wrap-up: sent keys replace; fire ``call.modified``."""
        company = company or self.company
        call = self.get_call(call_id, company)
        errors = _Errors()
        tags, notes, rating = spec.get("tags"), spec.get("notes"), spec.get("rating")
        if "tags" in spec and (not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags)):
            errors.add("tags", "tags must be a list of names.")
        if "notes" in spec and (not isinstance(notes, list) or not all(isinstance(n, str) for n in notes)):
            errors.add("notes", "notes must be a list of strings.")
        if rating is not None and (isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5):
            errors.add("rating", "rating must be 1..5 or null.")
        times = _deliver_times(spec, errors)
        errors.raise_if_any()
        if isinstance(tags, list):
            call.tag_ids = list(dict.fromkeys(_ensure_tags(company, tags, lambda: self.next_id("tag"))))
        if isinstance(notes, list):
            kept = list(call.notes)  # an unchanged note keeps its id
            new_notes = []
            for text in notes:
                old = next((n for n in kept if n[1] == text), None)
                if old is not None:
                    kept.remove(old)
                new_notes.append(old or (self.next_id("note"), text))
            call.notes = new_notes
        if "rating" in spec:
            if rating is None:
                call.rating = None
            elif call.rating is None or call.rating[1] != rating:
                call.rating = (self.next_id("rating"), rating)
        body = call_modified_body(call, company)
        if spec.get("deliver", True):
            self.fire(company, "call.modified", body, times=times)
        return call, body

    def upload_recording(
        self, call_id: int, spec: dict[str, Any], company: Company | None = None
    ) -> tuple[Call, dict[str, Any]]:
        """The call's recording was uploaded: it is recorded with that link; fire ``recording.uploaded``."""
        company = company or self.company
        call = self.get_call(call_id, company)
        errors = _Errors()
        url = spec.get("recording_url")
        if url is not None and (not isinstance(url, str) or not url.startswith(("http://", "https://"))):
            errors.add("recording_url", "recording_url must be an http(s) URL.")
        times = _deliver_times(spec, errors)
        errors.raise_if_any()
        call.recorded = True
        call.recording_link = url or public_recording_url(call)
        body = recording_uploaded_body(call)
        if spec.get("deliver", True):
            self.fire(company, "recording.uploaded", body, times=times)
        return call, body

    def set_insights(self, call_id: int, spec: dict[str, Any], company: Company | None = None) -> Call:
        """Conversation intelligence of a call: sent keys are set, ``null`` removes one (404 again)."""
        call = self.get_call(call_id, company)
        errors = _Errors()
        unknown = sorted(set(spec) - set(INSIGHTS))
        if unknown:
            errors.add("body", f"unknown keys {unknown}; expected any of {list(INSIGHTS)}.")
        values: dict[str, Any] = {}
        for key in INSIGHTS:
            if key not in spec:
                continue
            value = spec[key]
            if key == "smart_notes" and isinstance(value, str):
                value = [value]
            if value is None:
                values[key] = None
            elif key == "smart_notes":
                if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
                    errors.add(key, "smart_notes must be a string or a list of strings.")
                values[key] = value
            elif not isinstance(value, str):
                errors.add(key, f"{key} must be a string.")
            else:
                values[key] = value
        errors.raise_if_any()
        for key, value in values.items():
            if value is None:
                call.insights.pop(key, None)
            else:
                call.insights[key] = list(value) if isinstance(value, list) else value
        return call

    def sms_event(self, spec: dict[str, Any], company: Company | None = None) -> Sms:
        """An SMS was sent or received: fire ``sms.sent`` / ``sms.received`` (no SMS API exists)."""
        company = company or self.company
        errors = _Errors()
        direction = spec.get("direction", "incoming")
        if direction not in ("incoming", "outgoing"):
            errors.add("direction", "direction must be incoming or outgoing.")
        internal = loose_e164(spec.get("internal_number"))
        external = loose_e164(spec.get("external_number"))
        if internal is None:
            errors.add("internal_number", "internal_number must be an E.164 number.")
        if external is None:
            errors.add("external_number", "external_number must be an E.164 number.")
        text = spec.get("text", "")
        if not isinstance(text, str):
            errors.add("text", "text must be a string.")
        agent_id = _as_id(spec.get("agent_id")) if spec.get("agent_id") is not None else None
        if spec.get("agent_id") is not None and agent_id not in company.agents:
            errors.add("agent_id", "Agent does not exist.")
        created = parse_time(spec["created_at"]) if spec.get("created_at") else time.time()
        if created is None:
            errors.add("created_at", "created_at must be an ISO-8601 time.")
        times = spec.get("deliver_times", 1)
        if isinstance(times, bool) or not isinstance(times, int) or times < 0:
            errors.add("deliver_times", "deliver_times must be a non-negative integer.")
        errors.raise_if_any()
        assert internal is not None and external is not None and created is not None
        contact = company.contact_by_number(external)
        sms = Sms(
            id=self.next_id("sms"),
            direction=direction,
            internal=internal,
            external=external,
            contact_id=contact.id if contact else None,
            agent_id=None if direction == "incoming" else agent_id,
            text=text,
            created_at=created,
        )
        company.sms.append(sms)
        if spec.get("deliver", True):
            trigger = "sms.received" if direction == "incoming" else "sms.sent"
            self.fire(company, trigger, sms_body(sms), times=times)
        return sms

    # ---- workflows and deliveries -----------------------------------------------------------

    def add_workflow(
        self,
        trigger: str,
        url: str,
        method: str = "POST",
        headers: dict[str, str] | None = None,
        active: bool = True,
        company: Company | None = None,
    ) -> Workflow:
        if trigger != "*" and trigger not in TRIGGERS:
            raise ValueError(f"trigger must be one of {TRIGGERS} or '*'")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError("url must be an http(s) URL")
        method = str(method).upper()
        if method not in ("POST", "PUT", "PATCH", "GET", "DELETE"):
            raise ValueError("method must be POST, PUT, PATCH, GET or DELETE")
        headers = dict(headers or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise ValueError("headers must map names to string values")
        workflow = Workflow(self.next_id("workflow"), trigger, url, method, headers, bool(active))
        (company or self.company).workflows.append(workflow)
        return workflow

    def fire(
        self, company: Company, trigger: str, body: dict[str, Any], *, times: int = 1, delay: float = 0.0
    ) -> list[Delivery]:
        """Queue one delivery per matching active workflow (``times`` copies each)."""
        out = []
        for workflow in company.workflows:
            if not workflow.active or workflow.trigger not in (trigger, "*"):
                continue
            for copy in range(1, times + 1):
                delivery = Delivery(
                    self.next_id("delivery"),
                    workflow.id,
                    trigger,
                    workflow.url,
                    workflow.method,
                    body,
                    sorted(set(DELIVERY_HEADERS) | set(workflow.headers)),
                    copy,
                    time.time(),
                )
                company.deliveries.append(delivery)
                out.append(delivery)
                self._spawn(self._deliver(delivery, workflow, delay))
        return out

    def _spawn(self, coro: Any) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no running loop: nothing can be delivered
            coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _client_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def _deliver(self, delivery: Delivery, workflow: Workflow, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        settings = self.settings
        headers = {**DELIVERY_HEADERS, **workflow.headers}
        data = None if delivery.method == "GET" else orjson.dumps(delivery.body)
        session = await self._client_session()
        for attempt in range(1, settings.delivery_attempts + 1):
            record: dict[str, Any] = {"attempt": attempt, "at": now_iso_ms(), "status": None, "error": None}
            try:
                async with session.request(
                    delivery.method,
                    delivery.url,
                    data=data,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=settings.delivery_timeout_s),
                    allow_redirects=False,
                ) as resp:
                    await resp.read()
                    record["status"] = resp.status
            except (TimeoutError, aiohttp.ClientError) as exc:
                record["error"] = f"{type(exc).__name__}: {exc}"[:300]
            delivery.attempts.append(record)
            status = record["status"]
            if status is not None and 200 <= status < 300:
                delivery.status, delivery.delivered_at = "delivered", time.time()
                log.info(
                    "workflow_delivered",
                    trigger=delivery.trigger,
                    delivery_id=delivery.id,
                    attempt=attempt,
                    status=status,
                )
                return
            log.warning(
                "workflow_delivery_failed",
                trigger=delivery.trigger,
                delivery_id=delivery.id,
                attempt=attempt,
                status=status,
                error=record["error"],
            )
            if attempt < settings.delivery_attempts:
                await asyncio.sleep(
                    min(settings.delivery_base_delay_s * 2 ** (attempt - 1), settings.delivery_max_delay_s)
                )
        delivery.status = "failed"

    async def wait_deliveries(self, within_s: float = 10.0) -> bool:
        """Wait until no delivery is in flight; False when some still are after ``within_s``."""
        deadline = asyncio.get_running_loop().time() + within_s
        while self._tasks:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            await asyncio.wait(list(self._tasks), timeout=left)
        return True

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- state view -------------------------------------------------------------------------

    def state(self, company: Company | None = None) -> dict[str, Any]:
        company = company or self.company
        return {
            "company": {"id": company.id, "name": company.name, "key_id": company.key_id},
            "contacts": [
                render_contact_show(c, company) for c in sorted(company.contacts.values(), key=lambda c: c.id)
            ],
            "calls": [render_call(c, company, self.settings) for c in company.calls],
            "sms": [sms_body(s) for s in company.sms],
            "contact_notes": [n.public() for n in company.contact_notes.values()],
            "activities": [a.public() for a in company.activities.values()],
            "deliveries": [d.public() for d in company.deliveries],
            "workflows": [w.public() for w in company.workflows],
            "tags": [{"id": tid, "name": name} for tid, name in sorted(company.tags.items())],
            "attributes": [{"id": aid, "title": t} for aid, t in sorted(company.attributes.items())],
            "agents": [render_agent_index(a)["Agent"] for a in company.agents.values()],
            "numbers": [render_number_index(n)["CallNumber"] for n in company.numbers.values()],
            "settings": self.settings.public(),
        }

    # ---- HTTP -------------------------------------------------------------------------------

    def rate_headers(self, state: WindowState) -> dict[str, str]:
        return {
            "X-CloudTalkAPI-Limit": str(state.limit),
            "X-CloudTalkAPI-Remaining": str(state.remaining),
            "X-CloudTalkAPI-ResetTime": str(math.ceil(state.reset_at)),
        }

    @web.middleware
    async def api_middleware(self, request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        """Auth → company rate window → handler; every API answer in the CloudTalk error shape."""
        if request.path.startswith(SIM_PREFIX):
            return await handler(request)
        company = self.authenticate(request)
        if company is None:
            return error_response(401)
        allowed, state = self.window.take(str(company.id), await self._request_cost(request))
        headers = self.rate_headers(state) if (self.settings.rate_headers_always or not allowed) else {}
        if not allowed:
            return error_response(429, headers=headers)
        request[COMPANY] = company
        try:
            response = await handler(request)
        except InvalidInput as exc:
            response = error_response(406, data=exc.errors)
        except NotFound:
            response = error_response(404)
        except BadRequest as exc:
            response = error_response(400, str(exc))
        except web.HTTPException as exc:  # unknown route, wrong method
            response = error_response(exc.status)
        except Exception:
            log.exception("cloudtalk_sim_handler_failed", path=request.path)
            response = error_response(500)
        response.headers.update(headers)
        return response

    async def _request_cost(self, request: web.Request) -> int:
        """Operations a request takes from the company's window: one, or one per bulk command."""
        if request.method != "POST" or request.path != API_PREFIX + BULK_PATH:
            return 1
        try:
            body = orjson.loads(await request.read() or b"null")
        except orjson.JSONDecodeError:
            return 1
        return bulk_request_cost(body, self.settings.bulk_counts_per_item)

    async def fault_response(self, request: web.Request, status: int) -> web.StreamResponse:
        company = self.authenticate(request)
        headers: dict[str, str] = {}
        if company is not None and (status == 429 or self.settings.rate_headers_always):
            state = self.window.peek(str(company.id))
            if status == 429:
                state = WindowState(state.limit, 0, state.reset_at)
            headers = self.rate_headers(state)
        return error_response(status, headers=headers)

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[make_middleware(self.log, self.faults), self.api_middleware])
        app[FAULT_RESPONDER] = self.fault_response
        app[CLOUDTALK_SIM] = self
        api = API_PREFIX
        r = app.router
        r.add_get(api + "/contacts/index.json", self.h_contacts_index)
        r.add_put(api + "/contacts/add.json", self.h_contacts_add)
        r.add_post(api + r"/contacts/edit/{id:\d+}.json", self.h_contacts_edit)
        r.add_delete(api + r"/contacts/delete/{id:\d+}.json", self.h_contacts_delete)
        r.add_get(api + r"/contacts/show/{id:\d+}.json", self.h_contacts_show)
        r.add_get(api + "/contacts/attributes.json", self.h_attributes)
        r.add_put(api + r"/contacts/addTags/{id:\d+}.json", self.h_add_tags)
        r.add_delete(api + r"/contacts/removeTags/{id:\d+}.json", self.h_remove_tags)
        r.add_post(api + BULK_PATH, self.h_bulk_contacts)
        r.add_get(api + "/countries/index.json", self.h_countries)
        r.add_get(api + "/agents/index.json", self.h_agents)
        r.add_get(api + "/numbers/index.json", self.h_numbers)
        r.add_get(api + "/tags/index.json", self.h_tags)
        r.add_get(api + "/calls/index.json", self.h_calls)
        for path, kind in (
            ("summary", "summary"),
            ("smart-notes", "smart_notes"),
            ("transcription", "transcription"),
            ("details-link", "details_link"),
        ):
            r.add_get(api + rf"/ai/calls/{{call_id:\d+}}/{path}", functools.partial(self.h_insight, kind))
        inspection_routes(app, self.log, self.faults, self.reset)
        self._inspection_routes(app)

        async def on_cleanup(_app: web.Application) -> None:
            await self.close()

        app.on_cleanup.append(on_cleanup)
        return app

    # ---- API handlers -----------------------------------------------------------------------

    async def h_contacts_index(self, request: web.Request) -> web.Response:
        company: Company = request[COMPANY]
        q = request.query
        errors = _Errors()
        page, limit = page_params(q, self.settings, errors)
        country_id = int_param(q, "country_id", errors)
        tag_id = int_param(q, "tag_id", errors)
        errors.raise_if_any()
        keyword, industry = q.get("keyword"), q.get("industry")
        items = [
            c
            for c in sorted(company.contacts.values(), key=lambda c: c.id)
            if (country_id is None or c.country_id == country_id)
            and (tag_id is None or tag_id in c.tag_ids)
            and (not industry or c.industry.lower() == industry.lower())
            and (not keyword or keyword_matches(c, keyword, self.settings))
        ]
        return ok(paginate(items, page, limit, lambda c: render_contact_index(c, company)))

    async def h_contacts_add(self, request: web.Request) -> web.Response:
        company: Company = request[COMPANY]
        contact = self.create_contact(await read_json(request), company, via="api")
        set_effect(request, f"contact.add {contact.id}")
        return ok({"status": 201, "data": {"id": str(contact.id)}}, status=201)

    async def h_contacts_edit(self, request: web.Request) -> web.Response:
        company: Company = request[COMPANY]
        cid = int(request.match_info["id"])
        body = await read_json(request)
        self.edit_contact(cid, body, company)
        set_effect(request, f"contact.edit {cid}")
        return ok({"status": 200})

    async def h_contacts_delete(self, request: web.Request) -> web.Response:
        company: Company = request[COMPANY]
        cid = int(request.match_info["id"])
        self.delete_contact(cid, company)
        set_effect(request, f"contact.delete {cid}")
        return ok({"status": 200})

    async def h_contacts_show(self, request: web.Request) -> web.Response:
        company: Company = request[COMPANY]
        contact = self.get_contact(int(request.match_info["id"]), company)
        return ok(render_contact_show(contact, company))

    async def h_attributes(self, request: web.Request) -> web.Response:
        company: Company = request[COMPANY]
        return ok(
            [
                {"ContactAttribute": {"id": str(aid), "title": title}}
                for aid, title in sorted(company.attributes.items())
            ]
        )

    async def _tags_change(self, request: web.Request, add: bool) -> web.Response:
        company: Company = request[COMPANY]
        cid = int(request.match_info["id"])
        self.get_contact(cid, company)  # 404 before 406
        body = await read_json(request)
        names = body.get("tags") if isinstance(body, dict) else None
        _, tags = self.change_tags(cid, names, add=add, company=company)
        set_effect(request, f"contact.{'addTags' if add else 'removeTags'} {cid}")
        message = "Tags were sucessfully added." if add else "Tags were successfully removed."
        return ok({"status": 200, "message": message, "data": {"tags": tags, "contact_id": str(cid)}})

    async def h_add_tags(self, request: web.Request) -> web.Response:
        return await self._tags_change(request, add=True)

    async def h_remove_tags(self, request: web.Request) -> web.Response:
        return await self._tags_change(request, add=False)

    async def h_bulk_contacts(self, request: web.Request) -> web.Response:
        """Commands run in order, each on its own (a failed one leaves the others applied)."""
        company: Company = request[COMPANY]
        commands = parse_bulk_body(await read_json(request))
        results: list[dict[str, Any]] = []
        logged: list[dict[str, Any]] = []
        for command in commands:
            rule = self.faults.pick_item(request.method, request.path)
            if rule is not None:
                result: dict[str, Any] = {"status": rule.status, "message": MESSAGES.get(rule.status, "Error.")}
                effect = None
            else:
                result, effect = self.run_bulk_command(company, command)
            results.append({"command_id": command.command_id, **result})
            logged.append(
                {
                    "command_id": command.command_id,
                    "action": command.action,
                    "status": result["status"],
                    "effect": effect,
                    "fault": rule.kind if rule is not None else None,
                }
            )
        set_items(request, logged)
        applied = sum(1 for item in logged if item["effect"])
        if applied:
            set_effect(request, f"bulk.contacts applied={applied} commands={len(commands)}")
        return ok({"status": 200, "data": results})

    async def h_countries(self, _request: web.Request) -> web.Response:
        return ok(
            [
                {"Country": {"id": str(cid), "name": name, "country_code": iso2, "iso3": iso3, "calling_code": calling}}
                for cid, name, iso2, iso3, calling in COUNTRIES
            ]
        )

    async def h_agents(self, request: web.Request) -> web.Response:
        company: Company = request[COMPANY]
        q = request.query
        errors = _Errors()
        page, limit = page_params(q, self.settings, errors)
        agent_id = int_param(q, "id", errors)
        errors.raise_if_any()
        number = loose_e164(q.get("associated_number")) if q.get("associated_number") else None
        items = [
            a
            for _, a in sorted(company.agents.items())
            if (agent_id is None or a.id == agent_id)
            and (not q.get("associated_number") or number in a.associated_numbers)
        ]
        return ok(paginate(items, page, limit, render_agent_index))

    async def h_numbers(self, request: web.Request) -> web.Response:
        company: Company = request[COMPANY]
        q = request.query
        errors = _Errors()
        page, limit = page_params(q, self.settings, errors)
        nid = int_param(q, "id", errors)
        country_code = int_param(q, "country_code", errors)
        area_code = int_param(q, "area_code", errors)
        connected_to = int_param(q, "connected_to", errors, minimum=0, maximum=3)
        is_free = int_param(q, "is_free", errors, minimum=0, maximum=1)
        errors.raise_if_any()
        items = [
            n
            for _, n in sorted(company.numbers.items())
            if (nid is None or n.id == nid)
            and (country_code is None or n.country_code == str(country_code))
            and (area_code is None or n.area_code == str(area_code))
            and (connected_to is None or n.connected_to == connected_to)
            and (is_free is None or (n.source_id is None) == bool(is_free))
        ]
        return ok(paginate(items, page, limit, render_number_index))

    async def h_tags(self, request: web.Request) -> web.Response:
        company: Company = request[COMPANY]
        q = request.query
        errors = _Errors()
        page, limit = page_params(q, self.settings, errors)
        tid = int_param(q, "id", errors)
        errors.raise_if_any()
        items = [(i, n) for i, n in sorted(company.tags.items()) if tid is None or i == tid]
        return ok(paginate(items, page, limit, lambda t: {"Tag": {"id": str(t[0]), "name": t[1]}}))

    async def h_calls(self, request: web.Request) -> web.Response:
        company: Company = request[COMPANY]
        q = request.query
        errors = _Errors()
        page, limit = page_params(q, self.settings, errors)
        ints = {
            name: int_param(q, name, errors)
            for name in ("call_id", "contact_id", "user_id", "tag_id", "agent_extension")
        }
        window: dict[str, float | None] = {}
        for name in ("date_from", "date_to"):
            window[name] = parse_time(q[name]) if q.get(name) else None
            if q.get(name) and window[name] is None:
                errors.add(name, f"{name} must look like 2017-12-24 12:22:00.")
        ctype, status = q.get("type"), q.get("status")
        if ctype and ctype not in ("incoming", "outgoing", "internal"):
            errors.add("type", "type must be incoming, outgoing or internal.")
        if status and status not in ("answered", "missed"):
            errors.add("status", "status must be answered or missed.")
        errors.raise_if_any()
        external = loose_e164(q["public_external"]) if q.get("public_external") else None
        internal = loose_e164(q["public_internal"]) if q.get("public_internal") else None
        ext_agents = (
            {a.id for a in company.agents.values() if a.extension == ints["agent_extension"]}
            if ints["agent_extension"] is not None
            else None
        )

        def keep(c: Call) -> bool:
            started = math.floor(c.started_at)
            return (
                (window["date_from"] is None or started >= window["date_from"])
                and (window["date_to"] is None or started <= window["date_to"])
                and (not ctype or c.direction == ctype)
                and (not status or c.answered == (status == "answered"))
                and (ints["call_id"] is None or c.id == ints["call_id"])
                and (ints["contact_id"] is None or c.contact_id == ints["contact_id"])
                and (ints["user_id"] is None or c.agent_id == ints["user_id"])
                and (ints["tag_id"] is None or ints["tag_id"] in c.tag_ids)
                and (ext_agents is None or c.agent_id in ext_agents)
                and (not q.get("public_external") or c.external == external)
                and (not q.get("public_internal") or c.internal == internal)
            )

        items = sorted((c for c in company.calls if keep(c)), key=lambda c: (c.started_at, c.id))
        return ok(paginate(items, page, limit, lambda c: render_call(c, company, self.settings)))

    async def h_insight(self, kind: str, request: web.Request) -> web.Response:
        """Conversation intelligence: the bare object, or the AI service's own 404 (no envelope)."""
        company: Company = request[COMPANY]
        call_id = int(request.match_info["call_id"])
        call = next((c for c in company.calls if c.id == call_id), None)
        if call is None or kind not in call.insights:
            return json_response(AI_NOT_FOUND, status=404)
        return json_response(render_insight(kind, call.insights[kind]))

    # ---- inspection handlers ----------------------------------------------------------------

    def _inspection_routes(self, app: web.Application) -> None:
        p, r = SIM_PREFIX, app.router
        r.add_get(p + "state", self.i_state)
        r.add_post(p + "seed", self.i_seed)
        r.add_post(p + "calls", self.i_end_call)
        r.add_post(p + r"calls/{id:\d+}/modify", self.i_modify_call)
        r.add_post(p + r"calls/{id:\d+}/recording", self.i_upload_recording)
        r.add_post(p + r"calls/{id:\d+}/insights", self.i_set_insights)
        r.add_post(p + "sms", self.i_sms)
        r.add_post(p + "contacts/import", self.i_import_contact)
        r.add_post(p + "contacts", self.i_create_contact)
        r.add_patch(p + r"contacts/{id:\d+}", self.i_edit_contact)
        r.add_delete(p + r"contacts/{id:\d+}", self.i_delete_contact)
        r.add_get(p + "workflows", self.i_workflows)
        r.add_post(p + "workflows", self.i_add_workflow)
        r.add_delete(p + "workflows", self.i_clear_workflows)
        r.add_delete(p + r"workflows/{id:\d+}", self.i_delete_workflow)
        r.add_get(p + "deliveries", self.i_deliveries)
        r.add_get(p + "settings", self.i_settings)
        r.add_post(p + "settings", self.i_update_settings)
        r.add_post(p + "companies", self.i_add_company)

    @staticmethod
    def _inspect(handler: Callable[..., Any]) -> Callable[..., Any]:
        """Inspection errors: 400 ``{"error", "errors"?}``; 404 for unknown ids / companies."""

        @functools.wraps(handler)
        async def wrapped(self: CloudTalkSim, request: web.Request) -> web.StreamResponse:
            try:
                company = self.company_for(request.query.get("company"))
                body = await read_json(request) if request.can_read_body else None
                return await handler(self, request, company, body)
            except InvalidInput as exc:
                return json_response({"error": "invalid input", "errors": exc.errors}, status=400)
            except NotFound as exc:
                return json_response({"error": f"not found: {exc}"}, status=404)
            except (BadRequest, ValueError, TypeError, KeyError) as exc:
                return json_response({"error": str(exc)}, status=400)

        return wrapped

    @_inspect
    async def i_state(self, _request: web.Request, company: Company, _body: Any) -> web.Response:
        return json_response(self.state(company))

    @_inspect
    async def i_seed(self, _request: web.Request, company: Company, body: Any) -> web.Response:
        return json_response({"created": self.seed(body or {}, company)}, status=201)

    @_inspect
    async def i_end_call(self, _request: web.Request, company: Company, body: Any) -> web.Response:
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        call = self.end_call(body, company)
        return json_response(
            {
                "call_id": call.id,
                "call_uuid": call.uuid,
                "contact_id": call.contact_id,
                "record": render_call(call, company, self.settings),
                "body": call_ended_body(call, company),
            },
            status=201,
        )

    @_inspect
    async def i_modify_call(self, request: web.Request, company: Company, body: Any) -> web.Response:
        call, sent = self.modify_call(int(request.match_info["id"]), _object(body), company)
        return json_response({"call_id": call.id, "record": render_call(call, company, self.settings), "body": sent})

    @_inspect
    async def i_upload_recording(self, request: web.Request, company: Company, body: Any) -> web.Response:
        call, sent = self.upload_recording(int(request.match_info["id"]), _object(body), company)
        return json_response({"call_id": call.id, "record": render_call(call, company, self.settings), "body": sent})

    @_inspect
    async def i_set_insights(self, request: web.Request, company: Company, body: Any) -> web.Response:
        call = self.set_insights(int(request.match_info["id"]), _object(body), company)
        return json_response({"call_id": call.id, "insights": {k: call.insights.get(k) for k in INSIGHTS}})

    @_inspect
    async def i_sms(self, _request: web.Request, company: Company, body: Any) -> web.Response:
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        sms = self.sms_event(body, company)
        return json_response({"sms_id": sms.id, "body": sms_body(sms)}, status=201)

    @_inspect
    async def i_create_contact(self, _request: web.Request, company: Company, body: Any) -> web.Response:
        contact = self.create_contact(body, company, via="agent")
        return json_response({"id": contact.id, "contact": render_contact_show(contact, company)}, status=201)

    @_inspect
    async def i_import_contact(self, _request: web.Request, company: Company, body: Any) -> web.Response:
        contact, merged = self.import_contact(body, company)
        return json_response(
            {"id": contact.id, "merged": merged, "contact": render_contact_show(contact, company)}, status=201
        )

    @_inspect
    async def i_edit_contact(self, request: web.Request, company: Company, body: Any) -> web.Response:
        contact = self.edit_contact(int(request.match_info["id"]), body, company)
        return json_response({"id": contact.id, "contact": render_contact_show(contact, company)})

    @_inspect
    async def i_delete_contact(self, request: web.Request, company: Company, _body: Any) -> web.Response:
        contact = self.delete_contact(int(request.match_info["id"]), company)
        return json_response({"id": contact.id, "deleted": True})

    @_inspect
    async def i_workflows(self, _request: web.Request, company: Company, _body: Any) -> web.Response:
        return json_response({"workflows": [w.public() for w in company.workflows]})

    @_inspect
    async def i_add_workflow(self, _request: web.Request, company: Company, body: Any) -> web.Response:
        specs = body if isinstance(body, list) else [body]
        if not all(isinstance(s, dict) for s in specs):
            raise ValueError("body must be a workflow object or a list of them")
        made = [self.add_workflow(company=company, **s) for s in specs]
        return json_response({"workflows": [w.public() for w in made]}, status=201)

    @_inspect
    async def i_clear_workflows(self, _request: web.Request, company: Company, _body: Any) -> web.Response:
        company.workflows.clear()
        return json_response({"cleared": True})

    @_inspect
    async def i_delete_workflow(self, request: web.Request, company: Company, _body: Any) -> web.Response:
        wid = int(request.match_info["id"])
        if not any(w.id == wid for w in company.workflows):
            raise NotFound(f"workflow {wid}")
        company.workflows[:] = [w for w in company.workflows if w.id != wid]
        return json_response({"deleted": wid})

    @_inspect
    async def i_deliveries(self, request: web.Request, company: Company, _body: Any) -> web.Response:
        q = request.query
        since = int(q.get("since", "0"))
        rows = [
            d.public()
            for d in company.deliveries
            if d.id > since and q.get("trigger") in (None, d.trigger) and q.get("status") in (None, d.status)
        ]
        return json_response({"deliveries": rows, "count": len(rows)})

    @_inspect
    async def i_settings(self, _request: web.Request, _company: Company, _body: Any) -> web.Response:
        return json_response(self.settings.public())

    @_inspect
    async def i_update_settings(self, _request: web.Request, _company: Company, body: Any) -> web.Response:
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object of settings")
        return json_response(self.update_settings(body).public())

    @_inspect
    async def i_add_company(self, _request: web.Request, _company: Company, body: Any) -> web.Response:
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        company = self.add_company(str(body.get("key_id", "")), str(body.get("key_secret", "")), body.get("name"))
        return json_response({"id": company.id, "name": company.name, "key_id": company.key_id}, status=201)


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------

CLOUDTALK_SIM = web.AppKey("cloudtalk_sim", CloudTalkSim)  # the simulator behind an app


@contextlib.asynccontextmanager
async def running_cloudtalk_sim(
    settings: CloudTalkSimSettings | None = None,
    *,
    seed: dict[str, Any] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> AsyncIterator[tuple[CloudTalkSim, str]]:
    """``async with running_cloudtalk_sim(settings) as (sim, api_base_url)``; the inspection routes
    live at ``api_base_url`` without ``/api`` (also ``sim.root_url``)."""
    sim = CloudTalkSim(settings, seed=seed)
    server = SimServer(sim.build_app(), host, port)
    await server.start()
    sim.root_url = server.base_url
    try:
        yield sim, server.base_url + API_PREFIX
    finally:
        await server.stop()


def _pair(text: str, sep: str, what: str) -> tuple[str, str]:
    left, found, right = text.partition(sep)
    if not found or not left.strip() or not right.strip():
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return left.strip(), right.strip()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = CloudTalkSimSettings()
    a = parser.add_argument
    a("--key-id", default=d.key_id, help="API access key id of the default company")
    a("--key-secret", default=d.key_secret, help="API access key secret of the default company")
    a(
        "--company",
        action="append",
        default=[],
        metavar="KEY_ID:SECRET",
        type=lambda s: _pair(s, ":", "KEY_ID:SECRET"),
        help="another company (own data and rate window); repeatable",
    )
    a("--rate-limit", type=int, default=d.rate_limit, help="requests per window per company (default 60)")
    a("--window-seconds", type=float, default=d.window_seconds, help="rate window length (default 60)")
    a(
        "--rate-headers",
        choices=("always", "429"),
        default="always",
        help="send X-CloudTalkAPI-* headers on every response or only on 429 (default always)",
    )
    a(
        "--bulk-counts-per-request",
        action="store_true",
        help="a bulk request takes one operation from the rate window (default: one per command)",
    )
    a("--page-size", type=int, default=d.page_size, help="default page size when limit is omitted (default 30)")
    a(
        "--keyword-fields",
        default=",".join(d.keyword_fields),
        help=f"what keyword searches, comma-separated from {','.join(KEYWORD_FIELDS)}",
    )
    a("--keyword-exact", action="store_true", help="keyword must equal a whole value (default: substring)")
    a("--merge-api-contacts", action="store_true", help="apply the merge rule to API-created contacts too")
    a("--merge-rule", choices=MERGE_RULES, default=d.merge_rule, help="merge rule of integration imports")
    a(
        "--phone-validation",
        choices=PHONE_VALIDATION,
        default=d.phone_validation,
        help="E.164 check of contact numbers: format, possible (default) or valid number",
    )
    a(
        "--call-missing-relation",
        choices=MISSING_RELATION,
        default=d.call_missing_relation,
        help="call records without contact/agent: omit the key (default) or send null",
    )
    a("--no-updated-on-noop", action="store_true", help="an edit that changes nothing fires no contact.updated")
    a("--wrapup-delay", type=float, default=d.wrapup_delay_s, help="seconds between call end and call.ended")
    a("--delivery-attempts", type=int, default=d.delivery_attempts, help="tries per workflow delivery")
    a("--delivery-base-delay", type=float, default=d.delivery_base_delay_s, help="first retry delay (s)")
    a("--delivery-timeout", type=float, default=d.delivery_timeout_s, help="per-attempt timeout (s)")
    a(
        "--workflow",
        action="append",
        default=[],
        metavar="TRIGGER=URL",
        type=lambda s: _pair(s, "=", "TRIGGER=URL"),
        help=f"deliver TRIGGER ({', '.join(TRIGGERS)} or *) to URL; repeatable",
    )
    a(
        "--workflow-header",
        action="append",
        default=[],
        metavar="NAME:VALUE",
        type=lambda s: _pair(s, ":", "NAME:VALUE"),
        help="static header on every delivery; repeatable",
    )
    a("--workflow-method", default="POST", choices=("POST", "PUT", "PATCH", "GET", "DELETE"))
    a("--seed-file", type=Path, default=None, help="JSON seed: contacts, agents, numbers, tags, attributes, workflows")
    a("--fault-seed", type=int, default=None, help="random seed of probabilistic faults")


def settings_from_args(args: argparse.Namespace) -> CloudTalkSimSettings:
    return CloudTalkSimSettings(
        key_id=args.key_id,
        key_secret=args.key_secret,
        rate_limit=args.rate_limit,
        window_seconds=args.window_seconds,
        rate_headers_always=args.rate_headers == "always",
        bulk_counts_per_item=not args.bulk_counts_per_request,
        page_size=args.page_size,
        keyword_fields=tuple(f.strip() for f in args.keyword_fields.split(",") if f.strip()),
        keyword_substring=not args.keyword_exact,
        merge_api_contacts=args.merge_api_contacts,
        merge_rule=args.merge_rule,
        phone_validation=args.phone_validation,
        call_missing_relation=args.call_missing_relation,
        contact_updated_on_noop=not args.no_updated_on_noop,
        wrapup_delay_s=args.wrapup_delay,
        delivery_attempts=args.delivery_attempts,
        delivery_base_delay_s=args.delivery_base_delay,
        delivery_timeout_s=args.delivery_timeout,
    )


def app_from_args(args: argparse.Namespace) -> web.Application:
    seed: dict[str, Any] = orjson.loads(args.seed_file.read_bytes()) if args.seed_file else {}
    headers = dict(args.workflow_header)
    seed["workflows"] = list(seed.get("workflows", [])) + [
        {"trigger": trigger, "url": url, "method": args.workflow_method, "headers": headers}
        for trigger, url in args.workflow
    ]
    sim = CloudTalkSim(settings_from_args(args), seed=seed, fault_seed=args.fault_seed)
    for key_id, key_secret in args.company:
        sim.add_company(key_id, key_secret)
    log.info(
        "cloudtalk_sim_configured",
        companies=len(sim.companies),
        workflows=len(sim.company.workflows),
        rate_limit=sim.settings.rate_limit,
    )
    return sim.build_app()
