"""Contract tests of the Kustomer simulator, through the typed client and through raw HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import shutil
import signal
import sys
import time
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from devkit.net import free_port
from devkit.sim.kustomer import ALL_ROLES, KustomerSimSettings, running_kustomer_sim
from pipeline.clients.http import (
    AmbiguousOutcomeError,
    RejectedError,
    RetryExhaustedError,
    RetryPolicy,
    create_or_find,
)
from pipeline.clients.kustomer import ConflictError, KustomerClient
from tests.conftest import REPO

KEY = "test-key"
OBJECT_ID = re.compile(r"^[0-9a-f]{24}$")
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
JANA = {
    "name": "Jana Nováková",
    "emails": [{"type": "work", "email": "jana@example.org"}],
    "phones": [{"type": "mobile", "phone": "+421905123456"}],
    "sharedPhones": [{"type": "work", "phone": "+421232123456"}],
    "whatsapps": [{"type": "mobile", "phone": "whatsapp:+421905123456"}],
    "urls": [{"type": "website", "url": "https://acme.example.sk"}],
    "locations": [{"type": "work", "address1": "Hlavná 12", "cityName": "Bratislava", "countryCode": "SK"}],
}


class Raw:
    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http, self.base = http, base

    async def call(
        self, method: str, path: str, body: Any = None, key: str | None = KEY, params: dict[str, str] | None = None
    ) -> tuple[int, Any, Any]:
        headers = {"Accept": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else orjson.dumps(body)
            headers["Content-Type"] = "application/json"
        async with self.http.request(method, self.base + path, data=data, headers=headers, params=params) as r:
            raw = await r.read()
            return r.status, (orjson.loads(raw) if raw else None), r.headers


def settings(**over: Any) -> KustomerSimSettings:
    return KustomerSimSettings(**{"webhook_allow_http": True, "webhook_base_delay_s": 0.05, **over})


@pytest.fixture
async def env():
    async with running_kustomer_sim(settings(), keys={KEY: ALL_ROLES}) as (sim, url), aiohttp.ClientSession() as http:
        client = KustomerClient.from_credentials(
            http, url, KEY, policy=RetryPolicy(initial_s=0.01, max_backoff_s=0.05, deadline_s=5, timeout_s=1)
        )
        yield sim, url, client, Raw(http, url)


def writes(sim, pattern: str) -> int:
    return sum(1 for e in sim.log.entries if e.effect and re.search(pattern, e.effect))


# -- auth and envelopes ------------------------------------------------------------------------


async def test_401_for_missing_or_unknown_key_and_403_for_a_missing_role(env):
    sim, url, client, raw = env
    status, body, headers = await raw.call("GET", "/v1/customers", key=None)
    assert status == 401 and body["errors"][0]["code"] == "unauthorized"
    assert "x-ratelimit-limit" in headers
    assert (await raw.call("GET", "/v1/customers", key="nope"))[0] == 401
    status, _, _ = await raw.call(
        "POST", "/_sim/keys", {"key": "reader", "roles": ["org.permission.customer.read"]}, key=None
    )
    assert status == 201
    assert (await raw.call("GET", "/v1/customers", key="reader"))[0] == 200
    status, body, _ = await raw.call("POST", "/v1/customers", {"name": "x"}, key="reader")
    assert (
        status == 403
        and body["errors"][0]["code"] == "forbidden"
        and "org.user.customer.write" in body["errors"][0]["detail"]
    )
    assert (await raw.call("POST", "/v1/conversations", {"customer": "x"}, key="reader"))[0] == 403
    assert not sim.customers


async def test_customer_envelope_ids_timestamps_rev_and_machine_user(env):
    sim, url, client, raw = env
    status, body, headers = await raw.call("POST", "/v1/customers", JANA)
    assert status == 201
    data = body["data"]
    assert data["type"] == "customer" and OBJECT_ID.match(data["id"])
    assert data["links"]["self"] == f"/v1/customers/{data['id']}"
    a = data["attributes"]
    assert ISO_MS.match(a["createdAt"]) and ISO_MS.match(a["updatedAt"]) and a["rev"] == 1
    assert a["firstName"] == "Jana" and a["lastName"] == "Nováková" and a["displayName"] == "Jana Nováková"
    assert a["phones"][0] == {"type": "mobile", "phone": "+421905123456", "verified": False}
    me = await client.own_user_id()
    assert data["relationships"]["createdBy"]["data"] == {"type": "user", "id": me}
    assert data["relationships"]["modifiedBy"]["links"]["self"] == f"/v1/users/{me}"
    user = await client.get_user(me)
    assert user["attributes"]["userType"] == "machine" and user["attributes"]["email"] is None
    updated = await client.update_customer(data["id"], {"name": "Jana N."})
    assert updated["attributes"]["rev"] == 2 and updated["attributes"]["updatedAt"] > a["updatedAt"]
    assert updated["attributes"]["emails"] == a["emails"], "replace=false keeps what was not sent"
    assert int(headers["x-ratelimit-remaining"]) < int(headers["x-ratelimit-limit"])


# -- customers ---------------------------------------------------------------------------------


async def test_lookups_by_email_phone_external_id_and_404(env):
    sim, url, client, raw = env
    created = await client.create_customer({**JANA, "externalId": "1451646073"})
    assert (await client.find_customer_by_phone("+421905123456"))["id"] == created["id"]
    assert (await client.find_customer_by_email("JANA@example.org"))["id"] == created["id"]
    assert (await client.find_customer_by_external_id("1451646073"))["id"] == created["id"]
    status, body, _ = await raw.call("GET", "/v1/customers/phone=%2B421905123456")
    assert status == 200 and body["data"]["id"] == created["id"]
    assert await client.find_customer_by_phone("+420601123456") is None
    status, body, _ = await raw.call("GET", "/v1/customers/email=nobody%40example.org")
    assert status == 404 and body["errors"][0]["code"] == "not_found"
    assert await client.get_customer("0" * 24) is None


@pytest.mark.parametrize(
    ("second", "pointer"),
    [
        ({"emails": [{"email": "Jana@Example.org"}]}, "/data/attributes/emails/0/email"),
        ({"phones": [{"phone": "+421905123456"}]}, "/data/attributes/phones/0/phone"),
        ({"whatsapps": [{"phone": "whatsapp:+421905123456"}]}, "/data/attributes/whatsapps/0/phone"),
        ({"externalId": "ext-1"}, "/data/attributes/externalId"),
    ],
)
async def test_unique_values_conflict_with_409_and_nothing_is_written(env, second, pointer):
    sim, url, client, raw = env
    await client.create_customer({**JANA, "externalId": "ext-1"})
    with pytest.raises(ConflictError) as err:
        await client.create_customer({"name": "Other", **second})
    assert err.value.errors[0]["source"]["pointer"] == pointer and err.value.errors[0]["code"] == "duplicate"
    assert len(sim.customers) == 1
    status, body, _ = await raw.call("POST", "/v1/customers", {"name": "Other", **second})
    assert status == 409 and body["errors"][0]["status"] == "409"


async def test_phone_uniqueness_compares_stored_values_and_lookups_match_any_notation():
    # [ASSUMPTION] setting unique_phones: "exact" (default) lets another notation of a number
    # exist on a second customer; "e164" refuses it. Lookups match on E.164 either way.
    async with running_kustomer_sim(settings(), keys={KEY: ALL_ROLES}) as (sim, url), aiohttp.ClientSession() as http:
        client = KustomerClient.from_credentials(http, url, KEY)
        first = await client.create_customer({"name": "A", "phones": [{"phone": "+421905123456"}]})
        second = await client.create_customer({"name": "B", "phones": [{"phone": "+421 905 123 456"}]})
        assert first["id"] != second["id"]
        assert (await client.find_customer_by_phone("00421905123456"))["id"] == first["id"]
    async with (
        running_kustomer_sim(settings(unique_phones="e164"), keys={KEY: ALL_ROLES}) as (sim, url),
        aiohttp.ClientSession() as http,
    ):
        client = KustomerClient.from_credentials(http, url, KEY)
        await client.create_customer({"name": "A", "phones": [{"phone": "+421905123456"}]})
        with pytest.raises(ConflictError):
            await client.create_customer({"name": "B", "phones": [{"phone": "+421 905 123 456"}]})


async def test_shared_lists_are_not_unique_and_updates_conflict_too(env):
    sim, url, client, raw = env
    a = await client.create_customer(JANA)
    b = await client.create_customer(
        {
            "name": "Colleague",
            "sharedPhones": [{"phone": "+421232123456"}],
            "sharedEmails": [{"email": "info@acme.example.sk"}],
        }
    )
    assert len(sim.customers) == 2
    with pytest.raises(ConflictError):
        await client.update_customer(b["id"], {"phones": [{"phone": "+421905123456"}]})
    assert (await client.get_customer(b["id"]))["attributes"]["phones"] == []
    assert (await client.get_customer(a["id"]))["attributes"]["rev"] == 1


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        ({"name": 5}, "/data/attributes/name"),
        ({"name": "x", "gender": "x"}, "/data/attributes/gender"),
        ({"name": "x", "emails": [{"email": "not-an-email"}]}, "/data/attributes/emails/0/email"),
        ({"name": "x", "phones": "+421905123456"}, "/data/attributes/phones"),
        ({"name": "x", "custom": {"tier": "gold"}}, "/data/attributes/custom/tier"),
        ([1, 2], "/data"),
    ],
)
async def test_bad_bodies_are_400_naming_the_field(env, body, pointer):
    sim, url, client, raw = env
    status, resp, _ = await raw.call("POST", "/v1/customers", body)
    assert status == 400
    assert resp["errors"][0]["code"] == "bad_request" and resp["errors"][0]["source"]["pointer"] == pointer
    with pytest.raises(RejectedError):
        await client.create_customer(body)
    assert not sim.customers
    assert (await raw.call("POST", "/v1/customers", b"{nope"))[0] == 400


async def test_put_replaces_without_replace_false_and_patch_merges(env):
    sim, url, client, raw = env
    c = await client.create_customer(JANA)
    status, body, _ = await raw.call("PUT", f"/v1/customers/{c['id']}", {"name": "Only name"})
    assert status == 200 and body["data"]["attributes"]["emails"] == []
    assert await client.find_customer_by_email("jana@example.org") is None, "the replaced e-mail is free again"
    status, body, _ = await raw.call("PATCH", f"/v1/customers/{c['id']}", {"emails": [{"email": "j@example.org"}]})
    assert (
        status == 200 and body["data"]["attributes"]["name"] == "Only name" and body["data"]["attributes"]["rev"] == 3
    )
    assert (await raw.call("PUT", "/v1/customers/" + "0" * 24, {"name": "x"}))[0] == 404


async def test_companies_users_and_the_company_relationship(env):
    sim, url, client, raw = env
    status, body, _ = await raw.call(
        "POST",
        "/_sim/seed",
        {"companies": [{"name": "Acme s.r.o."}], "users": [{"name": "Eva", "email": "eva@example.com"}]},
        key=None,
    )
    assert status == 201
    company_id, user_id = body["companies"][0], body["users"][0]
    assert (await client.get_company(company_id))["attributes"]["name"] == "Acme s.r.o."
    assert (await client.get_user(user_id))["attributes"]["email"] == "eva@example.com"
    assert await client.get_company("0" * 24) is None
    status, _, _ = await raw.call(
        "POST", "/_sim/seed", {"customers": [{**JANA, "company": company_id, "createdBy": user_id}]}, key=None
    )
    customer = await client.find_customer_by_phone("+421905123456")
    assert customer["relationships"]["company"]["data"]["id"] == company_id
    assert customer["relationships"]["createdBy"]["data"]["id"] == user_id
    assert customer["attributes"]["companyName"] == "Acme s.r.o."
    status, body, _ = await raw.call("POST", "/v1/companies", {"name": "Beta"})
    assert status == 201 and body["data"]["type"] == "company"


async def test_list_filters_sort_and_pagination_walk_to_the_end(env):
    sim, url, client, raw = env
    for i in range(7):
        await client.create_customer({"name": f"C{i}", "emails": [{"email": f"c{i}@example.org"}]})
        await asyncio.sleep(0.002)
    middle = sorted(sim.customers.values(), key=lambda c: c["updatedAt"])[3]
    since = (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(middle["updatedAt"]))
        + f".{int(middle['updatedAt'] * 1000) % 1000:03d}Z"
    )
    pages = [p async for p in client.iter_customers(updated_since=since, page_size=2)]
    names = [c["attributes"]["name"] for p in pages for c in p]
    assert names == ["C3", "C4", "C5", "C6"] and len(pages) == 2
    status, body, _ = await raw.call(
        "GET", "/v1/customers", params={"page": "4", "pageSize": "2", "sort": "-createdAt"}
    )
    assert body["links"]["next"] is None and body["links"]["prev"] is not None and body["meta"]["totalPages"] == 4
    assert [c["attributes"]["name"] for c in body["data"]] == ["C0"]
    assert (await raw.call("GET", "/v1/customers", params={"pageSize": "101"}))[0] == 400
    assert (await raw.call("GET", "/v1/customers", params={"sort": "name"}))[0] == 400
    assert (await raw.call("GET", "/v1/customers", params={"filter[updatedAt][gte]": "yesterday"}))[0] == 400


async def test_search_subset_pagination_ids_only_and_its_own_limit():
    async with (
        running_kustomer_sim(settings(search_limit=3), keys={KEY: ALL_ROLES}) as (sim, url),
        aiohttp.ClientSession() as http,
    ):
        client = KustomerClient.from_credentials(http, url, KEY, policy=RetryPolicy(deadline_s=2))
        raw = Raw(http, url)
        for i in range(5):
            await client.create_customer({"name": f"S{i}", "phones": [{"phone": f"+42190511111{i}"}]})
        body = {
            "queryContext": "customer",
            "and": [{"customer_updated_at": {"gte": "2020-01-01T00:00:00Z"}}],
            "sort": [{"customer_updated_at": "asc"}],
        }
        pages = [p async for p in client.search(body, page_size=2)]
        assert [len(p) for p in pages] == [2, 2, 1]
        assert [c["attributes"]["name"] for p in pages for c in p] == [f"S{i}" for i in range(5)]
        status, resp, headers = await raw.call(
            "POST",
            "/v1/customers/search",
            {"and": [{"customer_phones": {"equals": "+421905111113"}}]},
            params={"idsOnly": "true"},
        )
        assert status == 429, "three searches per window were allowed and used"
        assert headers["x-ratelimit-remaining"] is not None
        await client.executor.window.acquire()
    async with running_kustomer_sim(settings(), keys={KEY: ALL_ROLES}) as (sim, url), aiohttp.ClientSession() as http:
        raw = Raw(http, url)
        await raw.call("POST", "/v1/customers", {"name": "P", "phones": [{"phone": "+421905111113"}]})
        status, resp, _ = await raw.call(
            "POST",
            "/v1/customers/search",
            {"and": [{"customer_phones": {"equals": "+421905111113"}}]},
            params={"idsOnly": "true"},
        )
        assert status == 200 and resp["data"] == [{"type": "customer", "id": next(iter(sim.customers))}]
        assert (await raw.call("POST", "/v1/customers/search", {"and": [{"customer_shoe_size": {"equals": 1}}]}))[
            0
        ] == 400
        assert (await raw.call("POST", "/v1/customers/search", {"queryContext": "kobject"}))[0] == 400
        assert (await raw.call("POST", "/v1/customers/search", {}, params={"pageSize": "501"}))[0] == 400


# -- conversations and notes -------------------------------------------------------------------


async def test_conversations_create_get_update_list_and_per_customer(env):
    sim, url, client, raw = env
    c = await client.create_customer(JANA)
    conv = await client.create_conversation(
        {
            "customer": c["id"],
            "name": "Incoming call from +421905123456",
            "status": "done",
            "direction": "in",
            "externalId": "cloudtalk-call-1",
        }
    )
    a = conv["attributes"]
    assert OBJECT_ID.match(conv["id"]) and a["status"] == "done" and a["ended"] is True and a["direction"] == "in"
    assert a["externalId"] == "cloudtalk-call-1" and conv["relationships"]["customer"]["data"]["id"] == c["id"]
    assert (await client.get_conversation(conv["id"]))["attributes"]["name"].startswith("Incoming")
    again = await client.update_conversation(conv["id"], {"status": "open"})
    assert again["attributes"]["status"] == "open" and again["attributes"]["rev"] == 2
    await client.create_conversation({"customer": c["id"], "status": "open"})
    per_customer = [x async for p in client.iter_customer_conversations(c["id"], page_size=1) for x in p]
    assert len(per_customer) == 2
    everything = [x async for p in client.iter_conversations() for x in p]
    assert len(everything) == 2
    assert (await client.get_customer(c["id"]))["attributes"]["conversationCounts"]["all"] == 2
    assert await client.get_conversation("0" * 24) is None


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        ({}, "/data/attributes/customer"),
        ({"customer": "0" * 24}, "/data/attributes/customer"),
        ({"customer": "REPLACE", "status": "closed"}, "/data/attributes/status"),
        ({"customer": "REPLACE", "direction": "sideways"}, "/data/attributes/direction"),
        ({"customer": "REPLACE", "priority": 9}, "/data/attributes/priority"),
    ],
)
async def test_conversation_bad_bodies_are_400(env, body, pointer):
    sim, url, client, raw = env
    c = await client.create_customer(JANA)
    body = {k: (c["id"] if v == "REPLACE" else v) for k, v in body.items()}
    status, resp, _ = await raw.call("POST", "/v1/conversations", body)
    assert status == 400 and resp["errors"][0]["source"]["pointer"] == pointer
    assert not sim.conversations


async def test_notes_both_forms_list_update_and_limits(env):
    sim, url, client, raw = env
    c = await client.create_customer(JANA)
    conv = await client.create_conversation({"customer": c["id"]})
    note = await client.create_note(conv["id"], "CloudTalk call 1\nDirection: Incoming")
    assert note["relationships"]["customer"]["data"]["id"] == c["id"]
    status, body, _ = await raw.call("POST", f"/v1/conversations/{conv['id']}/notes", {"body": "legacy form"})
    assert status == 201 and body["data"]["relationships"]["conversation"]["data"]["id"] == conv["id"]
    notes = [n async for p in client.iter_conversation_notes(conv["id"]) for n in p]
    assert [n["attributes"]["body"].split("\n")[0] for n in notes] == ["CloudTalk call 1", "legacy form"]
    assert (await client.get_conversation(conv["id"]))["attributes"]["noteCount"] == 2
    status, body, _ = await raw.call("PATCH", f"/v1/notes/{note['id']}", {"body": "edited"})
    assert status == 200 and body["data"]["attributes"]["body"] == "edited"
    status, body, _ = await raw.call("POST", "/v1/notes", {"conversation": conv["id"], "body": "x" * 10_241})
    assert status == 400 and body["errors"][0]["source"]["pointer"] == "/data/attributes/body"
    assert (await raw.call("POST", "/v1/notes", {"body": "no conversation"}))[0] == 400
    assert (await raw.call("POST", "/v1/notes", {"conversation": conv["id"], "body": ""}))[0] == 400
    assert (
        await raw.call(
            "POST", "/v1/notes", {"conversation": conv["id"], "body": "x", "userMentions": [{"user": "u"}] * 21}
        )
    )[0] == 400
    assert (await raw.call("GET", "/v1/notes/" + "0" * 24))[0] == 404
    assert len(sim.notes) == 2


# -- rate limits -------------------------------------------------------------------------------


async def test_org_budget_429_with_headers_and_the_client_waits_for_the_reset():
    async with (
        running_kustomer_sim(settings(rate_limit=5, window_seconds=1.5), keys={KEY: ALL_ROLES}) as (sim, url),
        aiohttp.ClientSession() as http,
    ):
        raw = Raw(http, url)
        statuses = [(await raw.call("GET", "/v1/customers"))[0] for _ in range(6)]
        assert statuses == [200] * 5 + [429]
        status, body, headers = await raw.call("GET", "/v1/customers")
        assert status == 429 and body["errors"][0]["code"] == "too_many_requests"
        assert headers["x-ratelimit-limit"] == "5" and headers["x-ratelimit-remaining"] == "0"
        assert int(headers["x-ratelimit-reset"]) >= int(time.time())
        sim.log.clear()
        client = KustomerClient.from_credentials(http, url, KEY, policy=RetryPolicy(max_attempts=1))
        started = time.monotonic()
        created = [
            await client.create_customer({"name": f"R{i}", "emails": [{"email": f"r{i}@example.org"}]})
            for i in range(8)
        ]
        assert len({c["id"] for c in created}) == 8 and len(sim.customers) == 8
        assert time.monotonic() - started >= 1.0, "eight writes with five per window needed the next window"
        posts = [e for e in sim.log.entries if e.method == "POST"]
        assert sum(1 for e in posts if e.status == 201) == 8, "no duplicate creates"
        assert writes(sim, r"^customer\.create") == 8


async def test_per_customer_limit_on_conversations_and_notes():
    async with (
        running_kustomer_sim(settings(per_customer_limit=2), keys={KEY: ALL_ROLES}) as (sim, url),
        aiohttp.ClientSession() as http,
    ):
        raw = Raw(http, url)
        _, c, _ = await raw.call("POST", "/v1/customers", {"name": "Busy"})
        cid = c["data"]["id"]
        statuses = [(await raw.call("POST", "/v1/conversations", {"customer": cid}))[0] for _ in range(3)]
        assert statuses == [201, 201, 429]
        status, _, _ = await raw.call(
            "POST", "/v1/conversations", {"customer": cid, "importedAt": "2026-01-01T00:00:00Z"}
        )
        assert status == 201, "importedAt bodies are exempt"
        conv = next(iter(sim.conversations))
        notes = [(await raw.call("POST", "/v1/notes", {"conversation": conv, "body": "n"}))[0] for _ in range(3)]
        assert notes == [201, 201, 429] and len(sim.notes) == 2


# -- outbound webhooks ---------------------------------------------------------------------------


class Receiver:
    def __init__(self, fail_first: int = 0) -> None:
        self.events: list[tuple[bytes, dict[str, str]]] = []
        self.fail_first = fail_first
        self.calls = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        if self.calls <= self.fail_first:
            return web.Response(status=503)
        self.events.append((await request.read(), dict(request.headers)))
        return web.Response(status=200)


@pytest.fixture
async def receiver():
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    server = TestServer(app)
    await server.start_server()
    rec.url = str(server.make_url("/hook"))
    yield rec
    await server.close()


async def test_webhook_create_validation_and_management(env):
    sim, url, client, raw = env
    status, body, _ = await raw.call("POST", "/v1/outbound-webhooks", {"name": "x", "url": "ftp://x", "events": []})
    assert status == 400
    strict = settings(webhook_allow_http=False)
    async with running_kustomer_sim(strict, keys={KEY: ALL_ROLES}) as (_, u2), aiohttp.ClientSession() as http:
        status, body, _ = await Raw(http, u2).call(
            "POST",
            "/v1/outbound-webhooks",
            {"name": "x", "url": "http://127.0.0.1/h", "events": ["kustomer.customer.create"]},
        )
        assert status == 400 and "https" in body["errors"][0]["detail"]
    too_many = {"name": "x", "url": "https://h.example/x", "events": ["kustomer.customer.create"] * 13}
    assert (await raw.call("POST", "/v1/outbound-webhooks", too_many))[0] == 400
    assert (
        await raw.call(
            "POST",
            "/v1/outbound-webhooks",
            {"name": "x", "url": "https://h.example/x", "events": ["kustomer.shoe.create"]},
        )
    )[0] == 400
    hook = await client.create_outbound_webhook("sync", "https://h.example/x", ["kustomer.customer.create"])
    assert len(hook["attributes"]["token"]) >= 32
    assert [h["id"] for h in await client.list_outbound_webhooks()] == [hook["id"]]
    status, body, _ = await raw.call("GET", f"/v1/outbound-webhooks/{hook['id']}")
    assert body["data"]["attributes"]["token"] == hook["attributes"]["token"]
    status, body, _ = await raw.call("GET", "/v1/outbound-webhooks/events")
    assert {"kustomer.customer.create", "kustomer.customer.update"} <= {e["id"] for e in body["data"]}
    assert await client.delete_outbound_webhook(hook["id"]) is True
    assert await client.delete_outbound_webhook(hook["id"]) is False


async def test_customer_events_are_signed_and_carry_changes(env, receiver):
    sim, url, client, raw = env
    hook = await client.create_outbound_webhook(
        "sync",
        receiver.url,
        list(("kustomer.customer.create", "kustomer.customer.update")),
        headers=[{"name": "X-Team", "value": "support"}],
    )
    token = hook["attributes"]["token"]
    c = await client.create_customer(JANA)
    await client.update_customer(c["id"], {"name": "Jana N."})
    status, _, _ = await raw.call(
        "POST", f"/_sim/customers/{c['id']}/edit", {"attributes": {"name": "Jana Agent"}}, key=None
    )
    assert status == 200
    assert await sim.wait_deliveries(5)
    assert len(receiver.events) == 3
    bodies = []
    for raw_body, headers in receiver.events:
        expected = hmac.new(token.encode(), raw_body, hashlib.sha256).hexdigest()  # independent computation
        assert headers["X-Kustomer-Webhook-Signature"] == expected
        assert headers["X-Team"] == "support" and headers["Content-Type"] == "application/json"
        bodies.append(orjson.loads(raw_body))
    create, update, agent = sorted(bodies, key=lambda b: b["data"]["attributes"]["rev"])
    assert create["name"] == "kustomer.customer.create" and "changes" not in create
    assert {
        k
        for k in (
            "id",
            "name",
            "org",
            "orgName",
            "partition",
            "data",
            "createdAt",
            "persist",
            "client",
            "dataId",
            "meta",
            "snsFilters",
        )
    } <= set(create)
    assert update["changes"]["attributes"]["name"] == {"op": "replace", "before": "Jana Nováková", "after": "Jana N."}
    assert update["changes"]["attributes"]["rev"] == {"op": "replace", "before": 1, "after": 2}
    assert update["client"] == "api-gw" and agent["client"] == "web"
    me = await client.own_user_id()
    assert update["data"]["relationships"]["modifiedBy"]["data"]["id"] == me
    assert agent["data"]["relationships"]["modifiedBy"]["data"]["id"] != me, "a person's edit"
    assert receiver.events[0][1]["X-Kustomer-Webhook-Event"] in ("kustomer.customer.create", "kustomer.customer.update")


async def test_failed_deliveries_are_retried_at_least_once(env, receiver):
    sim, url, client, raw = env
    receiver.fail_first = 2
    await client.create_outbound_webhook("sync", receiver.url, ["kustomer.customer.create"])
    await client.create_customer(JANA)
    assert await sim.wait_deliveries(5)
    assert receiver.calls == 3 and len(receiver.events) == 1
    status, body, _ = await raw.call("GET", "/_sim/deliveries", key=None)
    assert body["deliveries"][0]["status"] == "delivered" and len(body["deliveries"][0]["attempts"]) == 3
    event_id = body["deliveries"][0]["event_id"]
    assert (await raw.call("POST", f"/_sim/deliveries/{event_id}/redeliver", key=None))[0] == 202
    assert await sim.wait_deliveries(5)
    assert len(receiver.events) == 2 and receiver.events[0][0] == receiver.events[1][0], "same event again"


# -- faults ------------------------------------------------------------------------------------


async def fault(raw: Raw, **spec: Any) -> None:
    status, _, _ = await raw.call("POST", "/_sim/faults", spec, key=None)
    assert status == 201


async def test_injected_5xx_are_retried_on_reads_reported_on_creates_and_4xx_never_retried(env):
    sim, url, client, raw = env
    await fault(raw, match="POST /v1/customers$", kind="status", status=500, script=[True, True])
    with pytest.raises(AmbiguousOutcomeError):  # a 5xx does not say whether the customer exists
        await client.create_customer(JANA)
    created, found = await create_or_find(
        lambda: client.create_customer(JANA), lambda: client.find_customer_by_phone("+421905123456"), settle_s=0.0
    )
    posts = [e for e in sim.log.entries if e.method == "POST" and e.path == "/v1/customers"]
    assert [e.status for e in posts] == [500, 500, 201] and len(sim.customers) == 1
    assert created["id"] in sim.customers and found is False
    await fault(raw, match="GET /v1/customers/", kind="status", status=503, times=1)
    assert (await client.get_customer(created["id"]))["id"] == created["id"]
    sim.log.clear()
    with pytest.raises(RejectedError):
        await client.create_customer({"name": 1})
    assert len([e for e in sim.log.entries if e.method == "POST"]) == 1, "a 400 is never retried"


async def test_injected_429_burst_latency_timeout_and_reset():
    # a short window: a 429 announces the window's reset and the client waits for it
    async with (
        running_kustomer_sim(settings(window_seconds=0.5), keys={KEY: ALL_ROLES}) as (sim, url),
        aiohttp.ClientSession() as http,
    ):
        client = KustomerClient.from_credentials(
            http,
            url,
            KEY,
            policy=RetryPolicy(initial_s=0.01, max_backoff_s=0.05, max_attempts=2, deadline_s=5, timeout_s=1),
        )
        await _burst_latency_timeout_reset(sim, client, Raw(http, url))


async def _burst_latency_timeout_reset(sim, client, raw) -> None:
    await fault(raw, match="GET /v1/customers$", kind="status", status=429, script=[True, True, True])
    pages = [p async for p in client.iter_customers()]
    assert pages == [[]] and client.executor.rate_limited == 3, "three 429 waits, and no retry attempt spent on them"
    await fault(raw, match="GET /v1/users/current", kind="latency", latency_ms=300)
    started = time.monotonic()
    await raw.call("GET", "/v1/users/current")
    assert time.monotonic() - started >= 0.3
    await fault(raw, match="GET /v1/auth/tokens/current", kind="timeout", latency_ms=1500, times=1)
    assert await client.own_user_id(), "timed out once (1 s client timeout), then answered"
    await fault(raw, match="GET /v1/companies", kind="reset", times=1)
    assert (await client.get_company("0" * 24)) is None, "reset once, then a real 404"
    await fault(raw, match="GET /v1/companies", kind="status", status=500)
    with pytest.raises(RetryExhaustedError):
        await client.get_company("0" * 24)


# -- the CLI process ---------------------------------------------------------------------------


async def curl(*args: str) -> tuple[int, Any]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-s", "-w", "\n%{http_code}", *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    text, _, code = out.decode().rpartition("\n")
    return int(code), (orjson.loads(text) if text else None)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_cli_process_answers_curl_like_the_reference():
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devkit",
        "sim",
        "kustomer",
        "--port",
        str(port),
        "--api-key",
        "cli-key",
        cwd=REPO,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        line = await asyncio.wait_for(proc.stderr.readline(), 20)
        while b"listening" not in line:
            line = await asyncio.wait_for(proc.stderr.readline(), 20)
        base = f"http://127.0.0.1:{port}"
        status, body = await curl(f"{base}/v1/customers")
        assert status == 401 and body["errors"][0]["code"] == "unauthorized"
        status, body = await curl(
            "-X",
            "POST",
            "-H",
            "Authorization: Bearer cli-key",
            "-H",
            "Content-Type: application/json",
            "-d",
            orjson.dumps(JANA).decode(),
            f"{base}/v1/customers",
        )
        assert status == 201 and OBJECT_ID.match(body["data"]["id"])
        status, body = await curl("-H", "Authorization: Bearer cli-key", f"{base}/v1/customers/phone=%2B421905123456")
        assert status == 200 and body["data"]["attributes"]["name"] == "Jana Nováková"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
