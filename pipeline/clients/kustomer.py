"""Typed async client of the Kustomer REST API, shared by pollers and sinks.

Every request goes through an :class:`~pipeline.sink.http.HttpExecutor` (pacing from the
``x-ratelimit-*`` headers, 429 waits, backoff for 408/5xx). Creates are not idempotent: an
ambiguous failure raises :class:`~pipeline.sink.http.AmbiguousOutcomeError` rather than a blind
retry (callers use :func:`~pipeline.sink.http.create_or_find`). Methods return the JSON:API resource
object (``data``); lookups return None on 404; ``create_customer`` raises :class:`ConflictError`
on 409 (an email, phone, WhatsApp number or externalId that belongs to another customer).
"""

from __future__ import annotations

import hashlib
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from typing import Any, TypedDict

import aiohttp

from pipeline.clients.http import (
    KUSTOMER_RATE_HEADERS,
    ApiClient,
    ApiError,
    ApiResponse,
    HttpExecutor,
    RateWindow,
    RetryPolicy,
)
from pipeline.core.config import PipelineConfig

TARGET = "kustomer"


class ConflictError(ApiError):
    """409: a unique value belongs to another customer; ``errors`` is the response's array."""

    def __init__(self, op: str, body: Any) -> None:
        errors = body.get("errors") if isinstance(body, dict) else None
        detail = (errors or [{}])[0].get("detail") if errors else "conflict"
        super().__init__(TARGET, op, 409, str(detail), body)
        self.errors = errors or []


class Relationship(TypedDict, total=False):
    data: dict[str, str] | None
    links: dict[str, str]


class Resource(TypedDict, total=False):
    """A JSON:API resource object: ``{"type", "id", "attributes", "relationships", "links"}``."""

    type: str
    id: str
    attributes: dict[str, Any]
    relationships: dict[str, Relationship]
    links: dict[str, str]


def _data(response: ApiResponse) -> Resource:
    body = response.body
    return body["data"] if isinstance(body, dict) and isinstance(body.get("data"), dict) else {}


class KustomerClient(ApiClient):
    """``KustomerClient(executor, "https://acme.api.kustomerapp.com")``."""

    @classmethod
    def from_credentials(
        cls,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: str,
        *,
        window: RateWindow | None = None,
        policy: RetryPolicy | None = None,
        account: str | None = None,
    ) -> KustomerClient:
        """Bearer auth, ``Accept: application/json``; the metrics' ``account`` label is ``account``
        (the sinks give the integration's name), else the API host — never the key."""
        host = urllib.parse.urlsplit(base_url).netloc or base_url
        executor = HttpExecutor(
            session,
            TARGET,
            account or host,
            KUSTOMER_RATE_HEADERS,
            window=window,
            policy=policy,
            default_headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"},
        )
        return cls(executor, base_url)

    async def _pages(
        self, path: str, op: str, params: dict[str, Any], method: str = "GET", json: Any = None
    ) -> AsyncIterator[list[Resource]]:
        """Follow ``links.next`` until it is null; yields each page's resources."""
        response = await self._call(method, path, op, params=params, json=json)
        while True:
            body = response.body if isinstance(response.body, dict) else {}
            yield list(body.get("data") or [])
            nxt = (body.get("links") or {}).get("next")
            if not nxt:
                return
            split = urllib.parse.urlsplit(nxt)
            query = dict(urllib.parse.parse_qsl(split.query))
            response = await self._call(method, split.path, op, params=query, json=json)

    @staticmethod
    def _ident(kind: str, value: str) -> str:
        return f"{kind}={urllib.parse.quote(value, safe='')}"

    # -- identity --------------------------------------------------------------------------------
    async def current_token(self) -> Resource:
        return _data(await self._call("GET", "/v1/auth/tokens/current", "auth.token"))

    async def own_user_id(self) -> str | None:
        """The machine user behind this API key: ``createdBy``/``modifiedBy`` of what it writes."""
        token = await self.current_token()
        user = ((token.get("relationships") or {}).get("user") or {}).get("data") or {}
        if user.get("id"):
            return user["id"]
        me = _data(await self._call("GET", "/v1/users/current", "users.current"))
        return me.get("id")

    # -- customers -------------------------------------------------------------------------------
    async def get_customer(self, customer_id: str) -> Resource | None:
        r = await self._call("GET", f"/v1/customers/{customer_id}", "customers.get", accept=(404,))
        return None if r.status == 404 else _data(r)

    async def _find(self, kind: str, value: str) -> Resource | None:
        r = await self._call("GET", f"/v1/customers/{self._ident(kind, value)}", f"customers.by_{kind}", accept=(404,))
        return None if r.status == 404 else _data(r)

    async def find_customer_by_phone(self, phone: str) -> Resource | None:
        return await self._find("phone", phone)

    async def find_customer_by_email(self, email: str) -> Resource | None:
        return await self._find("email", email)

    async def find_customer_by_external_id(self, external_id: str) -> Resource | None:
        return await self._find("externalId", external_id)

    async def create_customer(self, attributes: Mapping[str, Any]) -> Resource:
        r = await self._call(
            "POST", "/v1/customers", "customers.create", json=attributes, accept=(409,), idempotent=False
        )
        if r.status == 409:
            raise ConflictError("customers.create", r.body)
        return _data(r)

    async def update_customer(
        self, customer_id: str, attributes: Mapping[str, Any], *, replace: bool = False, method: str = "PUT"
    ) -> Resource:
        params = None if replace or method == "PATCH" else {"replace": "false"}
        r = await self._call(
            method, f"/v1/customers/{customer_id}", "customers.update", json=attributes, params=params, accept=(409,)
        )
        if r.status == 409:
            raise ConflictError("customers.update", r.body)
        return _data(r)

    async def iter_customers(
        self,
        *,
        updated_since: str | None = None,
        updated_before: str | None = None,
        sort: str = "updatedAt",
        page_size: int = 100,
    ) -> AsyncIterator[list[Resource]]:
        params = {
            "filter[updatedAt][gte]": updated_since,
            "filter[updatedAt][lt]": updated_before,
            "sort": sort,
            "page": 1,
            "pageSize": page_size,
        }
        async for page in self._pages("/v1/customers", "customers.list", params):
            yield page

    async def search(
        self, body: Mapping[str, Any], *, page_size: int = 100, ids_only: bool = False
    ) -> AsyncIterator[list[Resource]]:
        params = {"page": 1, "pageSize": page_size, "idsOnly": "true" if ids_only else None}
        async for page in self._pages("/v1/customers/search", "customers.search", params, method="POST", json=body):
            yield page

    async def get_company(self, company_id: str) -> Resource | None:
        r = await self._call("GET", f"/v1/companies/{company_id}", "companies.get", accept=(404,))
        return None if r.status == 404 else _data(r)

    async def get_user(self, user_id: str) -> Resource | None:
        r = await self._call("GET", f"/v1/users/{user_id}", "users.get", accept=(404,))
        return None if r.status == 404 else _data(r)

    # -- conversations and notes -----------------------------------------------------------------
    async def create_conversation(self, attributes: Mapping[str, Any]) -> Resource:
        return _data(
            await self._call("POST", "/v1/conversations", "conversations.create", json=attributes, idempotent=False)
        )

    async def get_conversation(self, conversation_id: str) -> Resource | None:
        r = await self._call("GET", f"/v1/conversations/{conversation_id}", "conversations.get", accept=(404,))
        return None if r.status == 404 else _data(r)

    async def update_conversation(self, conversation_id: str, attributes: Mapping[str, Any]) -> Resource:
        return _data(
            await self._call("PATCH", f"/v1/conversations/{conversation_id}", "conversations.update", json=attributes)
        )

    async def iter_conversations(self, *, page_size: int = 100) -> AsyncIterator[list[Resource]]:
        async for page in self._pages("/v1/conversations", "conversations.list", {"page": 1, "pageSize": page_size}):
            yield page

    async def iter_customer_conversations(
        self, customer_id: str, *, page_size: int = 100
    ) -> AsyncIterator[list[Resource]]:
        async for page in self._pages(
            f"/v1/customers/{customer_id}/conversations",
            "conversations.by_customer",
            {"page": 1, "pageSize": page_size},
        ):
            yield page

    async def create_note(self, conversation_id: str, body: str) -> Resource:
        return _data(
            await self._call(
                "POST",
                "/v1/notes",
                "notes.create",
                json={"conversation": conversation_id, "body": body},
                idempotent=False,
            )
        )

    async def iter_conversation_notes(
        self, conversation_id: str, *, page_size: int = 100
    ) -> AsyncIterator[list[Resource]]:
        async for page in self._pages(
            f"/v1/conversations/{conversation_id}/notes", "notes.by_conversation", {"page": 1, "pageSize": page_size}
        ):
            yield page

    # -- outbound webhooks -----------------------------------------------------------------------
    async def create_outbound_webhook(
        self, name: str, url: str, events: list[str], headers: list[dict[str, str]] | None = None
    ) -> Resource:
        body = {"name": name, "url": url, "events": events, "headers": headers or []}
        return _data(await self._call("POST", "/v1/outbound-webhooks", "webhooks.create", json=body, idempotent=False))

    async def list_outbound_webhooks(self) -> list[Resource]:
        out: list[Resource] = []
        async for page in self._pages("/v1/outbound-webhooks", "webhooks.list", {"page": 1, "pageSize": 100}):
            out.extend(page)
        return out

    async def delete_outbound_webhook(self, webhook_id: str) -> bool:
        r = await self._call("DELETE", f"/v1/outbound-webhooks/{webhook_id}", "webhooks.delete", accept=(404,))
        return r.status != 404


def kustomer_clients(
    session: aiohttp.ClientSession, config: PipelineConfig, policy: RetryPolicy
) -> dict[str, KustomerClient]:
    return KustomerClients(session, policy, config).clients


class KustomerClients:
    """A client per integration, kept in step with a changing integrations file.

    :attr:`clients` is one dict, updated in place by :meth:`update`: an integration added gets a
    client, a removed one loses it (its commands then fail with a clear reason), and one whose
    Kustomer settings or API key changed (a rotated key) gets a new client. Unchanged ones keep
    theirs, with its rate window; integrations on one Kustomer org share one window."""

    def __init__(self, session: aiohttp.ClientSession, policy: RetryPolicy, config: PipelineConfig) -> None:
        self.session, self.policy = session, policy
        self.clients: dict[str, KustomerClient] = {}
        self._windows: dict[str, RateWindow] = {}
        self._built: dict[str, str] = {}  # name -> digest of what its client was built from
        self.update(config)

    def update(self, config: PipelineConfig) -> list[str]:
        """Build what changed; the names of the integrations whose client is new."""
        fresh = []
        for integ in config.integrations:
            k = integ.kustomer
            key = k.api_key.value()
            digest = hashlib.sha256(f"{k.model_dump_json()}\0{key}".encode()).hexdigest()
            if self._built.get(integ.name) == digest:
                continue
            window = self._windows.setdefault(k.base_url, RateWindow(reserve=k.rate_limit_reserve))
            self.clients[integ.name] = KustomerClient.from_credentials(
                self.session, k.base_url, key, window=window, policy=self.policy, account=integ.name
            )
            self._built[integ.name] = digest
            fresh.append(integ.name)
        for gone in set(self.clients) - {i.name for i in config.integrations}:
            del self.clients[gone]
            del self._built[gone]
        return fresh
