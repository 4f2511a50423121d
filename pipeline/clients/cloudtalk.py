"""Typed async client of the CloudTalk REST API.

Every request goes through one :class:`~pipeline.sink.http.HttpExecutor` (Basic auth, pacing from
the ``X-CloudTalkAPI-*`` headers, 429 waits, backoff on 408/5xx/timeouts). Lookups accept 404 as
a normal answer (``None`` / ``False``); a 406 raises :class:`ValidationError` with the per-field
messages; any other 4xx raises :class:`~pipeline.sink.http.RejectedError`.

Collections: ``list_*`` return one page (the ``responseData`` collection), ``iter_*`` yield every
page up to ``pageCount``; ``limit=None`` leaves the page size to the API (30 by default).

Shapes follow the API as documented, including its quirks: ids arrive as strings, numbers as
``+E.164`` strings on contacts but digits without ``+`` on call records, and index items carry a
contact's *first* number / e-mail only (use :meth:`CloudTalkClient.get_contact` for all of them).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Generic, Literal, TypedDict, TypeVar

import aiohttp

from pipeline.clients.http import (
    CLOUDTALK_RATE_HEADERS,
    AmbiguousOutcomeError,
    ApiClient,
    HttpExecutor,
    RateWindow,
    RejectedError,
    RetryPolicy,
)

TARGET = "cloudtalk"

T = TypeVar("T")


class ValidationError(RejectedError):
    """406 ``Invalid input data.``; ``fields`` maps a field to its messages."""

    def __init__(
        self,
        target: str,
        op: str,
        status: int | None,
        message: str,
        body: Any = None,
        fields: Mapping[str, list[str]] | None = None,
    ) -> None:
        super().__init__(target, op, status, message, body)
        self.fields: dict[str, list[str]] = dict(fields or {})


# --------------------------------------------------------------------------------------------
# Resource shapes
# --------------------------------------------------------------------------------------------


class Page(TypedDict, Generic[T]):
    itemsCount: int
    pageCount: int
    pageNumber: int
    limit: int
    data: list[T]


class TagRef(TypedDict):
    id: str
    name: str


class ExternalUrlRef(TypedDict):
    external_system: str
    external_url: str


class CustomField(TypedDict):
    key: str
    value: str


class ContactDetail(TypedDict):
    id: str
    name: str
    title: str
    company: str
    industry: str
    website: str
    address: str
    city: str
    zip: str
    state: str
    country_id: str | None
    favorite_agent: str | None
    type: str
    created: str
    modified: str
    contact_numbers: list[str]
    contact_emails: list[str]
    tags: list[TagRef]
    external_urls: list[ExternalUrlRef]
    custom_fields: list[CustomField]


class ExternalUrl(TypedDict):
    name: str
    url: str


class ContactNumber(TypedDict):
    public_number: str


class ContactEmail(TypedDict):
    email: str


class ContactsTag(TypedDict):
    name: str


class ContactAttributeValue(TypedDict, total=False):
    attribute_id: str | int
    title: str
    value: str


class ContactShow(TypedDict):
    """``responseData`` of ``GET /contacts/show/{id}.json``."""

    Contact: ContactDetail
    ExternalUrl: list[ExternalUrl]
    ContactNumber: list[ContactNumber]
    ContactEmail: list[ContactEmail]
    ContactsTag: list[ContactsTag]
    ContactAttribute: list[ContactAttributeValue]


class ContactSummary(TypedDict):
    id: str
    name: str
    company: str


class ContactIndexItem(TypedDict):
    """One ``data[]`` item of ``GET /contacts/index.json`` (first number / e-mail only)."""

    Contact: ContactSummary
    ContactNumber: dict[str, str | None]
    ContactEmail: dict[str, str | None]
    ContactAttribute: list[ContactAttributeValue]


class ContactBody(TypedDict, total=False):
    """Add / edit body. On edit only sent keys change, ``""`` clears, sent lists replace."""

    name: str
    title: str
    company: str
    industry: str
    website: str
    address: str
    city: str
    zip: str
    state: str
    country_id: int | str
    favorite_agent: int | str
    ExternalUrl: list[ExternalUrl] | str
    ContactNumber: list[ContactNumber] | str
    ContactEmail: list[ContactEmail] | str
    ContactsTag: list[ContactsTag] | str
    ContactAttribute: list[ContactAttributeValue] | str


class BulkCommand(TypedDict):
    """One command of ``POST /bulk/contacts.json``: ``add_contact`` (``data``: the add body),
    ``edit_contact`` (``data``: ``id`` plus the edit body), …; ``command_id`` is echoed in its result."""

    action: str
    command_id: str
    data: dict[str, Any]


class BulkResult(TypedDict, total=False):
    """One command's result in a bulk answer: the single endpoint's ``responseData`` (``status``,
    ``data`` — an add's ``{"id"}``, a 406's messages per field —, ``message``) plus its ``command_id``."""

    command_id: str
    status: int
    data: Any
    message: str


BULK_MAX = 10  # commands per bulk request, at most (§3.4)


class Country(TypedDict):
    id: str
    name: str
    country_code: str
    iso3: str
    calling_code: str


class Agent(TypedDict, total=False):
    id: str
    name: str
    firstname: str
    lastname: str
    email: str
    availability_status: str
    extension: str | None
    call_number_id: int | None
    default_number: str | None
    associated_numbers: list[str]
    is_daily_limit_ok: bool
    status_outbound: bool
    daily_price_limit: int | None


class AgentItem(TypedDict):
    Agent: Agent


class CallNumber(TypedDict, total=False):
    id: str
    country_code: str
    area_code: str
    internal_name: str
    caller_id_e164: str
    is_redirected: bool
    connected_to: str | None
    source_id: str | None


class NumberItem(TypedDict):
    CallNumber: CallNumber


class Tag(TypedDict):
    id: str
    name: str


class TagItem(TypedDict):
    Tag: Tag


class AttributeDef(TypedDict):
    id: str
    title: str


class Cdr(TypedDict, total=False):
    id: str
    billsec: str
    type: Literal["incoming", "outgoing", "internal"]
    country_code: str
    public_external: str
    public_internal: str
    recorded: bool
    is_voicemail: bool
    fax_email: str
    is_redirected: str
    redirected_from: str
    transferred_from: str
    is_local: bool
    user_id: str | None
    talking_time: str
    waiting_time: int
    wrapup_time: int
    started_at: str
    answered_at: str | None
    ended_at: str
    recording_link: str | None


class CallRecord(TypedDict, total=False):
    """One ``data[]`` item of ``GET /calls/index.json``; ``Contact``/``Agent`` may be absent."""

    Cdr: Cdr
    Contact: dict[str, Any] | None
    CallNumber: dict[str, Any] | None
    Agent: dict[str, Any] | None
    BillingData: dict[str, str]
    Notes: list[dict[str, str]]
    Tags: list[TagRef]
    Ratings: list[dict[str, Any]]


class TagsResult(TypedDict):
    tags: list[TagRef]
    contact_id: str


CallType = Literal["incoming", "outgoing", "internal"]
CallStatus = Literal["answered", "missed"]


def format_time(value: datetime | str) -> str:
    """The calls filter's format, ``2017-12-24 12:22:00`` in UTC (naive datetimes are UTC)."""
    if isinstance(value, str):
        return value
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S")


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------


class CloudTalkClient(ApiClient):
    """``CloudTalkClient(executor, "https://my.cloudtalk.io/api")``."""

    @classmethod
    def from_credentials(
        cls,
        session: aiohttp.ClientSession,
        base_url: str,
        key_id: str,
        key_secret: str,
        *,
        window: RateWindow | None = None,
        policy: RetryPolicy | None = None,
    ) -> CloudTalkClient:
        """Build the executor: Basic auth, ``Accept: application/json``. The metrics' ``account``
        label is the API host (one CloudTalk company per pipeline): never the key id, which is a
        credential."""
        executor = HttpExecutor(
            session,
            TARGET,
            urllib.parse.urlsplit(base_url).netloc or TARGET,
            CLOUDTALK_RATE_HEADERS,
            window=window,
            policy=policy,
            basic_auth=(key_id, key_secret),
            default_headers={"Accept": "application/json"},
        )
        return cls(executor, base_url)

    # ---- plumbing ---------------------------------------------------------------------------

    def _rejected(self, exc: RejectedError) -> RejectedError:
        if exc.status == 406 and not isinstance(exc, ValidationError):
            data = _response_data(exc.body)
            fields = data.get("data") if isinstance(data.get("data"), dict) else {}
            return ValidationError(exc.target, exc.op, exc.status, str(data.get("message", exc)), exc.body, fields)
        return exc

    async def _page(self, path: str, op: str, params: Mapping[str, Any]) -> Page[Any]:
        response = await self._call("GET", path, op, params=params)
        return _response_data(response.body)  # type: ignore[return-value]

    async def _pages(self, path: str, op: str, params: dict[str, Any]) -> AsyncIterator[Page[Any]]:
        page = 1
        while True:
            result = await self._page(path, op, {**params, "page": page})
            yield result
            if not result.get("data") or page >= int(result.get("pageCount") or 1):
                return
            page += 1

    # ---- contacts ---------------------------------------------------------------------------

    async def list_contacts(
        self,
        *,
        keyword: str | None = None,
        tag_id: int | None = None,
        country_id: int | None = None,
        industry: str | None = None,
        page: int = 1,
        limit: int | None = 1000,
    ) -> Page[ContactIndexItem]:
        """One page of ``GET /contacts/index.json``."""
        return await self._page(
            "/contacts/index.json",
            "contacts.index",
            {
                "keyword": keyword,
                "tag_id": tag_id,
                "country_id": country_id,
                "industry": industry,
                "page": page,
                "limit": limit,
            },
        )

    async def iter_contacts(
        self,
        *,
        keyword: str | None = None,
        tag_id: int | None = None,
        country_id: int | None = None,
        industry: str | None = None,
        limit: int | None = 1000,
    ) -> AsyncIterator[Page[ContactIndexItem]]:
        """Every page of ``GET /contacts/index.json`` up to ``pageCount``."""
        async for page in self._pages(
            "/contacts/index.json",
            "contacts.index",
            {"keyword": keyword, "tag_id": tag_id, "country_id": country_id, "industry": industry, "limit": limit},
        ):
            yield page

    async def get_contact(self, contact_id: int | str) -> ContactShow | None:
        """The show ``responseData``, or ``None`` when the contact does not exist."""
        response = await self._call("GET", f"/contacts/show/{contact_id}.json", "contacts.show", accept=(404,))
        if response.status == 404:
            return None
        return _response_data(response.body)  # type: ignore[return-value]

    async def add_contact(self, body: ContactBody) -> str:
        """``PUT /contacts/add.json`` → the new contact id (a string, as CloudTalk sends it)."""
        # not idempotent: an ambiguous failure raises AmbiguousOutcomeError (see create_or_find)
        response = await self._call("PUT", "/contacts/add.json", "contacts.add", json=body, idempotent=False)
        return str(_response_data(response.body)["data"]["id"])

    async def edit_contact(self, contact_id: int | str, body: ContactBody) -> bool:
        """``POST /contacts/edit/{id}.json``; False when the contact does not exist."""
        response = await self._call(
            "POST", f"/contacts/edit/{contact_id}.json", "contacts.edit", json=body, accept=(404,)
        )
        return response.status != 404

    async def bulk_contacts(self, commands: Sequence[BulkCommand], *, cost: int = 1) -> list[BulkResult]:
        """``POST /bulk/contacts.json`` with 1 to :data:`BULK_MAX` commands → one result per
        command, in order (each applied on its own: a partial failure is still a 200). ``cost``:
        the operations the request takes from the company's window (one per command under the
        cautious reading). Not idempotent: an ambiguous failure raises ``AmbiguousOutcomeError``
        for the whole request."""
        if not 1 <= len(commands) <= BULK_MAX:
            raise ValueError(f"a bulk request carries 1 to {BULK_MAX} commands, not {len(commands)}")
        response = await self._call(
            "POST", "/bulk/contacts.json", "contacts.bulk", json=list(commands), idempotent=False, cost=cost
        )
        results = _response_data(response.body).get("data")
        if not isinstance(results, list) or len(results) != len(commands):  # applied or not: unknown
            got = len(results) if isinstance(results, list) else "no"
            raise AmbiguousOutcomeError(
                TARGET,
                "contacts.bulk",
                response.status,
                f"{got} results for {len(commands)} commands",
                response.sent_at,
            )
        return [r if isinstance(r, dict) else {"status": 0} for r in results]  # type: ignore[misc]

    async def delete_contact(self, contact_id: int | str) -> bool:
        """``DELETE /contacts/delete/{id}.json``; False when it was already gone."""
        response = await self._call("DELETE", f"/contacts/delete/{contact_id}.json", "contacts.delete", accept=(404,))
        return response.status != 404

    async def add_tags(self, contact_id: int | str, names: Sequence[str]) -> TagsResult | None:
        """Assign tags by name (created on demand); None when the contact does not exist."""
        return await self._tags("PUT", f"/contacts/addTags/{contact_id}.json", "contacts.addTags", names)

    async def remove_tags(self, contact_id: int | str, names: Sequence[str]) -> TagsResult | None:
        """Unassign tags by name; None when the contact does not exist."""
        return await self._tags("DELETE", f"/contacts/removeTags/{contact_id}.json", "contacts.removeTags", names)

    async def _tags(self, method: str, path: str, op: str, names: Sequence[str]) -> TagsResult | None:
        response = await self._call(method, path, op, json={"tags": list(names)}, accept=(404,))
        if response.status == 404:
            return None
        return _response_data(response.body)["data"]  # type: ignore[no-any-return]

    async def list_attributes(self) -> list[AttributeDef]:
        """The custom-field catalogue, ``GET /contacts/attributes.json``."""
        response = await self._call("GET", "/contacts/attributes.json", "contacts.attributes")
        return [item["ContactAttribute"] for item in _response_list(response.body)]

    # ---- reference data ---------------------------------------------------------------------

    async def list_countries(self) -> list[Country]:
        """Every country (``GET /countries/index.json`` is not paginated)."""
        response = await self._call("GET", "/countries/index.json", "countries.index")
        return [item["Country"] for item in _response_list(response.body)]

    async def iter_agents(
        self, *, agent_id: int | None = None, associated_number: str | None = None, limit: int | None = 1000
    ) -> AsyncIterator[Page[AgentItem]]:
        async for page in self._pages(
            "/agents/index.json",
            "agents.index",
            {"id": agent_id, "associated_number": associated_number, "limit": limit},
        ):
            yield page

    async def iter_numbers(self, *, limit: int | None = 1000) -> AsyncIterator[Page[NumberItem]]:
        async for page in self._pages("/numbers/index.json", "numbers.index", {"limit": limit}):
            yield page

    async def iter_tags(self, *, limit: int | None = 1000) -> AsyncIterator[Page[TagItem]]:
        async for page in self._pages("/tags/index.json", "tags.index", {"limit": limit}):
            yield page

    # ---- calls ------------------------------------------------------------------------------

    @staticmethod
    def _call_filters(
        date_from: datetime | str | None,
        date_to: datetime | str | None,
        call_id: int | str | None,
        type: CallType | None,
        status: CallStatus | None,
        contact_id: int | str | None,
        public_external: str | None,
        limit: int | None,
    ) -> dict[str, Any]:
        return {
            "date_from": format_time(date_from) if date_from is not None else None,
            "date_to": format_time(date_to) if date_to is not None else None,
            "call_id": call_id,
            "type": type,
            "status": status,
            "contact_id": contact_id,
            "public_external": public_external,
            "limit": limit,
        }

    async def list_calls(
        self,
        *,
        date_from: datetime | str | None = None,
        date_to: datetime | str | None = None,
        call_id: int | str | None = None,
        type: CallType | None = None,
        status: CallStatus | None = None,
        contact_id: int | str | None = None,
        public_external: str | None = None,
        page: int = 1,
        limit: int | None = 1000,
    ) -> Page[CallRecord]:
        """One page of ``GET /calls/index.json`` (oldest first)."""
        params = self._call_filters(date_from, date_to, call_id, type, status, contact_id, public_external, limit)
        return await self._page("/calls/index.json", "calls.index", {**params, "page": page})

    async def iter_calls(
        self,
        *,
        date_from: datetime | str | None = None,
        date_to: datetime | str | None = None,
        call_id: int | str | None = None,
        type: CallType | None = None,
        status: CallStatus | None = None,
        contact_id: int | str | None = None,
        public_external: str | None = None,
        limit: int | None = 1000,
    ) -> AsyncIterator[Page[CallRecord]]:
        """Every page of ``GET /calls/index.json``; ``date_from``/``date_to`` are inclusive, UTC."""
        params = self._call_filters(date_from, date_to, call_id, type, status, contact_id, public_external, limit)
        async for page in self._pages("/calls/index.json", "calls.index", params):
            yield page

    async def call_insights(self, call_id: int | str) -> dict[str, Any] | None:
        """Conversation intelligence of a call as call-modified fields (``summary``,
        ``smart_notes``, ``transcription_url``), or None while CloudTalk has no summary yet (404).

        ``GET /ai/calls/{id}/summary`` first (one request for a call that has nothing yet); with a
        summary, ``smart-notes`` and ``details-link`` (a 404 there: that part is absent). The
        response fields (``summary``, ``smart_notes``, ``url``) are an assumption (docs/platforms.md)."""
        summary = await self._insight(call_id, "summary")
        if summary is None:
            return None
        smart = await self._insight(call_id, "smart-notes")
        link = await self._insight(call_id, "details-link")
        notes = _field(smart, "smart_notes")
        return {
            "summary": _field(summary, "summary"),
            "smart_notes": [str(n) for n in notes] if isinstance(notes, list) else ([str(notes)] if notes else []),
            "transcription_url": _field(link, "url"),
        }

    async def _insight(self, call_id: int | str, kind: str) -> Any:
        response = await self._call("GET", f"/ai/calls/{call_id}/{kind}", f"ai.{kind}", accept=(404,))
        return None if response.status == 404 else response.body

    async def get_call(self, call_id: int | str) -> CallRecord | None:
        """The call record with this CDR id, or None."""
        page = await self.list_calls(call_id=call_id, limit=1)
        return page["data"][0] if page["data"] else None


def _field(body: Any, name: str) -> Any:
    """``body[name]`` of an object answer, the answer itself when it is a bare value."""
    if isinstance(body, dict):
        return body.get(name) or None
    return body or None


def _response_data(body: Any) -> dict[str, Any]:
    if isinstance(body, dict) and isinstance(body.get("responseData"), dict):
        return body["responseData"]
    return {}


def _response_list(body: Any) -> list[dict[str, Any]]:
    if isinstance(body, dict) and isinstance(body.get("responseData"), list):
        return body["responseData"]
    return []
