"""Contract tests of the CloudTalk simulator and the CloudTalk client.

Every endpoint and error status is exercised through the typed client and through raw HTTP;
workflow deliveries go to a small receiver app; one test runs the simulator as a process
(``python -m devkit sim cloudtalk``) and talks to it with ``curl``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import re
import shutil
import signal
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from devkit.net import free_port
from devkit.sim.base import SimServer
from devkit.sim.cloudtalk import (
    CLOUDTALK_SIM,
    CloudTalkSim,
    CloudTalkSimSettings,
    add_arguments,
    app_from_args,
    running_cloudtalk_sim,
)
from pipeline.clients.cloudtalk import CloudTalkClient, ValidationError
from pipeline.clients.http import (
    AmbiguousOutcomeError,
    RejectedError,
    RetryExhaustedError,
    RetryPolicy,
    create_or_find,
)

KEY_ID, KEY_SECRET = "test-key-id", "test-secret"
AGENT = {
    "id": 493933,
    "firstname": "Max",
    "lastname": "Yellow",
    "email": "max.yellow@example.com",
    "extension": 1001,
    "associated_numbers": ["+442012345678"],
    "groups": ["support"],
}
SEED = {
    "agents": [
        AGENT,
        {
            "id": 493934,
            "firstname": "Eva",
            "lastname": "Green",
            "email": "eva.green@example.com",
            "extension": 1002,
            "associated_numbers": ["+421221291400"],
        },
    ],
    "numbers": [
        {"id": 12345, "caller_id_e164": "+442012345678", "internal_name": "UK Support"},
        {"id": 12346, "caller_id_e164": "+421221291400", "internal_name": "SK Sales", "source_id": 493934},
    ],
    "attributes": [{"id": 123, "title": "Salary"}],
}
FAST = RetryPolicy(initial_s=0.01, max_backoff_s=0.05, max_attempts=5, deadline_s=10.0, timeout_s=2.0)
NOT_FOUND = {"responseData": {"status": 404, "message": "Not found."}}
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

JANA = {
    "name": "Jana Nováková",
    "company": "Acme s.r.o.",
    "website": "https://acme.example.sk",
    "address": "Hlavná 12 3rd floor",
    "city": "Bratislava",
    "zip": "81101",
    "state": "Bratislavský kraj",
    "country_id": 199,
    "favorite_agent": 493933,
    "ExternalUrl": [{"name": "Kustomer", "url": "https://acme.kustomerapp.com/app/customers/65f1c0a2e4b0a1b2c3d4e5f6"}],
    "ContactNumber": [{"public_number": "+421905123456"}, {"public_number": "+447700900123"}],
    "ContactEmail": [{"email": "jana@example.org"}],
    "ContactsTag": [{"name": "kustomer-support"}],
}


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


def settings(**overrides: Any) -> CloudTalkSimSettings:
    base: dict[str, Any] = {
        "key_id": KEY_ID,
        "key_secret": KEY_SECRET,
        "rate_limit": 10_000,
        "delivery_base_delay_s": 0.02,
        "delivery_timeout_s": 1.0,
    }
    return CloudTalkSimSettings(**{**base, **overrides})


class Raw:
    """Plain HTTP against the simulator: ``(status, json body, headers)``."""

    def __init__(self, session: aiohttp.ClientSession, api: str, root: str) -> None:
        self.session, self.api, self.root = session, api, root

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, Any] | None = None,
        auth: tuple[str, str] | None = (KEY_ID, KEY_SECRET),
    ) -> tuple[int, Any, Any]:
        headers = {"Accept": "application/json"}
        if auth is not None:
            headers["Authorization"] = aiohttp.encode_basic_auth(*auth)
        data = orjson.dumps(body) if body is not None else None
        if data is not None:
            headers["Content-Type"] = "application/json"
        url = (self.root if path.startswith("/_sim/") else self.api) + path
        async with self.session.request(method, url, data=data, headers=headers, params=params) as resp:
            raw = await resp.read()
            return resp.status, (orjson.loads(raw) if raw else None), resp.headers

    async def sim(self, method: str, path: str, body: Any = None, **params: Any) -> tuple[int, Any]:
        status, data, _ = await self.call(method, "/_sim/" + path, body, params=params or None, auth=None)
        return status, data


class Env:
    def __init__(self, sim: CloudTalkSim, api: str, session: aiohttp.ClientSession) -> None:
        self.sim, self.api, self.session = sim, api, session
        self.raw = Raw(session, api, sim.root_url or "")
        self.client = CloudTalkClient.from_credentials(session, api, KEY_ID, KEY_SECRET, policy=FAST)

    def requests(self, method: str | None = None, path: str | None = None) -> list[Any]:
        return [
            e
            for e in self.sim.log.entries
            if (method is None or e.method == method) and (path is None or re.search(path, e.path))
        ]


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async with running_cloudtalk_sim(settings(), seed=SEED) as (sim, api), aiohttp.ClientSession() as session:
        yield Env(sim, api, session)


class Receiver:
    """A workflow target: records every request; the first ``fail_first`` answer 500."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.fail_first = 0
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.server = SimServer(app)

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "headers": request.headers,
                "body": orjson.loads(raw) if raw else None,
            }
        )
        if len(self.requests) <= self.fail_first:
            return web.Response(status=500, text="not now")
        return web.Response(status=200, text="ok")

    @property
    def url(self) -> str:
        return self.server.base_url

    def on(self, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == path]

    async def wait_for(self, count: int, path: str | None = None, within_s: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            got = self.on(path) if path else self.requests
            if len(got) >= count:
                return got
            await asyncio.sleep(0.01)
        raise AssertionError(
            f"expected {count} deliveries on {path}, got {len(self.on(path) if path else self.requests)}"
        )


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.server.start()
    yield r
    await r.server.stop()


async def add_workflows(env: Env, receiver: Receiver, *triggers: str) -> None:
    specs = [
        {"trigger": t, "url": f"{receiver.url}/hooks/{t}", "headers": {"X-Pipeline-Secret": "test-shared-token"}}
        for t in triggers
    ]
    status, body = await env.raw.sim("POST", "workflows", specs)
    assert status == 201, body


def assert_delivery_headers(request: dict[str, Any]) -> None:
    h = request["headers"]
    assert request["method"] == "POST"
    assert h["User-Agent"] == "cloudtalk-workflow-automation"
    assert h["Accept"] == "application/json, text/plain, */*"
    assert h["Content-Type"] == "application/json"
    assert h["X-Pipeline-Secret"] == "test-shared-token"


# --------------------------------------------------------------------------------------------
# Auth, unknown routes
# --------------------------------------------------------------------------------------------


async def test_missing_or_wrong_credentials_get_401_and_no_rate_headers(env: Env) -> None:
    for auth in (None, (KEY_ID, "wrong"), ("unknown", KEY_SECRET)):
        status, body, headers = await env.raw.call("GET", "/contacts/index.json", auth=auth)
        assert status == 401
        assert body == {"responseData": {"status": 401, "message": "Unauthorized action"}}
        assert "X-CloudTalkAPI-Remaining" not in headers
    status, _, _ = await env.raw.call("PUT", "/contacts/add.json", {"name": "Nobody"}, auth=None)
    assert status == 401 and env.sim.company.contacts == {}

    bad = CloudTalkClient.from_credentials(env.session, env.api, KEY_ID, "wrong", policy=FAST)
    before = len(env.requests())
    with pytest.raises(RejectedError) as info:
        await bad.list_contacts()
    assert info.value.status == 401
    assert len(env.requests()) == before + 1  # a 4xx is never retried


async def test_unknown_route_and_wrong_method_use_the_error_envelope(env: Env) -> None:
    status, body, headers = await env.raw.call("GET", "/nothing/here.json")
    assert (status, body) == (404, NOT_FOUND)
    assert headers["X-CloudTalkAPI-Limit"] == "10000"
    status, body, _ = await env.raw.call("GET", "/contacts/add.json")
    assert status == 405 and body["responseData"]["status"] == 405


async def test_malformed_json_is_a_400_and_changes_nothing(env: Env) -> None:
    async with env.session.put(
        f"{env.api}/contacts/add.json",
        data=b"{not json",
        headers={"Authorization": aiohttp.encode_basic_auth(KEY_ID, KEY_SECRET), "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 400
        assert await resp.json() == {"responseData": {"status": 400, "message": "Request body is not valid JSON."}}
    status, body, _ = await env.raw.call("PUT", "/contacts/add.json", ["a", "list"])
    assert status == 406 and list(body["responseData"]["data"]) == ["body"]
    assert env.sim.company.contacts == {}


# --------------------------------------------------------------------------------------------
# Contacts: add, show, index, edit, delete, tags
# --------------------------------------------------------------------------------------------


async def test_add_and_show_return_the_documented_shapes(env: Env) -> None:
    status, body, _ = await env.raw.call("PUT", "/contacts/add.json", JANA)
    assert status == 201
    cid = body["responseData"]["data"]["id"]
    assert body == {"responseData": {"status": 201, "data": {"id": cid}}} and isinstance(cid, str)
    assert env.requests("PUT")[-1].effect == f"contact.add {cid}"

    status, show, _ = await env.raw.call("GET", f"/contacts/show/{cid}.json")
    assert status == 200
    contact = dict(show["responseData"]["Contact"])
    assert ISO_MS.match(contact.pop("created")) and ISO_MS.match(contact.pop("modified"))
    tag_id = contact["tags"][0]["id"]
    assert contact == {
        "id": cid,
        "name": "Jana Nováková",
        "title": "",
        "company": "Acme s.r.o.",
        "industry": "",
        "website": "https://acme.example.sk",
        "address": "Hlavná 12 3rd floor",
        "city": "Bratislava",
        "zip": "81101",
        "state": "Bratislavský kraj",
        "country_id": "199",
        "favorite_agent": "493933",
        "type": "contact",
        "contact_numbers": ["+421905123456", "+447700900123"],
        "contact_emails": ["jana@example.org"],
        "tags": [{"id": tag_id, "name": "kustomer-support"}],
        "external_urls": [
            {
                "external_system": "Kustomer",
                "external_url": "https://acme.kustomerapp.com/app/customers/65f1c0a2e4b0a1b2c3d4e5f6",
            }
        ],
        "custom_fields": [],
    }
    rest = {k: v for k, v in show["responseData"].items() if k != "Contact"}
    assert rest == {
        "ExternalUrl": JANA["ExternalUrl"],
        "ContactNumber": JANA["ContactNumber"],
        "ContactEmail": JANA["ContactEmail"],
        "ContactsTag": [{"name": "kustomer-support"}],
        "ContactAttribute": [],
    }

    client_id = await env.client.add_contact(
        {**JANA, "name": "Jana Second", "ContactAttribute": [{"attribute_id": 123, "value": "5000"}]}
    )
    shown = await env.client.get_contact(client_id)
    assert shown is not None and shown["Contact"]["name"] == "Jana Second"
    assert shown["Contact"]["custom_fields"] == [{"key": "Salary", "value": "5000"}]
    assert shown["ContactAttribute"] == [{"attribute_id": "123", "title": "Salary", "value": "5000"}]
    assert await env.client.get_contact(cid) == show["responseData"]


async def test_show_of_unknown_contact_is_404(env: Env) -> None:
    status, body, _ = await env.raw.call("GET", "/contacts/show/999.json")
    assert (status, body) == (404, NOT_FOUND)
    assert await env.client.get_contact(999) is None


INVALID_BODIES = [
    pytest.param({"company": "No name"}, "name", id="missing-name"),
    pytest.param({"name": "   "}, "name", id="blank-name"),
    pytest.param({"name": "x" * 151}, "name", id="name-too-long"),
    pytest.param({"name": "A", "zip": "1" * 16}, "zip", id="zip-too-long"),
    pytest.param({"name": "A", "company": "c" * 101}, "company", id="company-too-long"),
    pytest.param({"name": "A", "website": "w" * 101}, "website", id="website-too-long"),
    pytest.param({"name": "A", "ContactNumber": [{"public_number": "447700900123"}]}, "public_number", id="no-plus"),
    pytest.param({"name": "A", "ContactNumber": [{"public_number": "+44 7700 900123"}]}, "public_number", id="spaces"),
    pytest.param({"name": "A", "ContactNumber": [{"public_number": "07700900123"}]}, "public_number", id="national"),
    pytest.param({"name": "A", "ContactNumber": [{"public_number": 447700900123}]}, "public_number", id="integer"),
    pytest.param({"name": "A", "ContactNumber": [{"public_number": "+4412"}]}, "public_number", id="too-short"),
    pytest.param({"name": "A", "ContactEmail": [{"email": "not-an-email"}]}, "email", id="bad-email"),
    pytest.param({"name": "A", "country_id": 9999}, "country_id", id="unknown-country"),
    pytest.param({"name": "A", "country_id": "GB"}, "country_id", id="country-not-an-id"),
    pytest.param({"name": "A", "favorite_agent": 1}, "favorite_agent", id="unknown-agent"),
    pytest.param(
        {"name": "A", "ExternalUrl": [{"name": f"n{i}", "url": "https://x.example"} for i in range(4)]},
        "ExternalUrl",
        id="four-external-urls",
    ),
    pytest.param(
        {"name": "A", "ExternalUrl": [{"name": "n" * 31, "url": "https://x.example"}]},
        "ExternalUrl",
        id="external-url-name-too-long",
    ),
    pytest.param({"name": "A", "ContactsTag": ["plain-string"]}, "ContactsTag", id="tag-not-an-object"),
    pytest.param(
        {"name": "A", "ContactAttribute": [{"attribute_id": 999, "value": "x"}]},
        "ContactAttribute",
        id="unknown-attribute",
    ),
]


@pytest.mark.parametrize(("body", "field"), INVALID_BODIES)
async def test_add_rejects_invalid_input_with_per_field_messages(env: Env, body: dict[str, Any], field: str) -> None:
    status, resp, _ = await env.raw.call("PUT", "/contacts/add.json", body)
    assert status == 406
    data = resp["responseData"]
    assert data["status"] == 406 and data["message"] == "Invalid input data."
    assert list(data["data"]) == [field] and all(isinstance(m, str) and m for m in data["data"][field])

    with pytest.raises(ValidationError) as info:
        await env.client.add_contact(body)  # type: ignore[arg-type]
    assert info.value.status == 406 and info.value.fields == data["data"]
    assert env.sim.company.contacts == {} and env.sim.company.tags == {}
    assert all(e.effect is None for e in env.requests())


async def test_add_reports_every_bad_field_at_once(env: Env) -> None:
    status, resp, _ = await env.raw.call(
        "PUT", "/contacts/add.json", {"zip": "1" * 20, "ContactEmail": [{"email": "x"}], "country_id": 1}
    )
    assert status == 406
    assert set(resp["responseData"]["data"]) == {"name", "zip", "email", "country_id"}


async def test_edit_changes_only_sent_keys_clears_with_empty_string_and_replaces_lists(env: Env) -> None:
    cid = await env.client.add_contact(
        {**JANA, "title": "Dr.", "ContactAttribute": [{"attribute_id": 123, "value": "1"}]}
    )

    status, body, _ = await env.raw.call("POST", f"/contacts/edit/{cid}.json", {"city": "Košice"})
    assert (status, body) == (200, {"responseData": {"status": 200}})
    assert env.requests("POST")[-1].effect == f"contact.edit {cid}"
    shown = await env.client.get_contact(cid)
    assert shown is not None
    c = shown["Contact"]
    assert (c["city"], c["title"], c["company"], c["zip"]) == ("Košice", "Dr.", "Acme s.r.o.", "81101")
    assert c["contact_numbers"] == ["+421905123456", "+447700900123"]
    assert c["custom_fields"] == [{"key": "Salary", "value": "1"}]

    assert await env.client.edit_contact(
        cid,
        {
            "title": "",
            "country_id": "",
            "favorite_agent": "",
            "ContactNumber": [{"public_number": "+420601123456"}],
            "ContactEmail": "",
            "ContactsTag": [{"name": "vip"}],
            "ContactAttribute": "",
        },
    )
    shown = await env.client.get_contact(cid)
    assert shown is not None
    c = shown["Contact"]
    assert (c["title"], c["country_id"], c["favorite_agent"]) == ("", None, None)
    assert c["contact_numbers"] == ["+420601123456"] and shown["ContactNumber"] == [{"public_number": "+420601123456"}]
    assert c["contact_emails"] == [] and shown["ContactEmail"] == []
    assert [t["name"] for t in c["tags"]] == ["vip"] and shown["ContactsTag"] == [{"name": "vip"}]
    assert c["custom_fields"] == [] and shown["ContactAttribute"] == []
    assert (c["name"], c["city"], c["company"]) == ("Jana Nováková", "Košice", "Acme s.r.o.")
    assert shown["ExternalUrl"] == JANA["ExternalUrl"]

    status, body, _ = await env.raw.call("POST", f"/contacts/edit/{cid}.json", {"ExternalUrl": []})
    assert status == 200
    assert (await env.client.get_contact(cid))["ExternalUrl"] == []  # type: ignore[index]


async def test_edit_errors_leave_the_contact_untouched(env: Env) -> None:
    cid = await env.client.add_contact({"name": "Keep Me", "city": "Brno"})
    before = await env.client.get_contact(cid)
    status, body, _ = await env.raw.call(
        "POST", f"/contacts/edit/{cid}.json", {"city": "Praha", "ContactNumber": [{"public_number": "123"}]}
    )
    assert status == 406 and list(body["responseData"]["data"]) == ["public_number"]
    status, body, _ = await env.raw.call("POST", f"/contacts/edit/{cid}.json", {"name": ""})
    assert status == 406 and list(body["responseData"]["data"]) == ["name"]
    with pytest.raises(ValidationError) as info:
        await env.client.edit_contact(cid, {"zip": "9" * 16})
    assert list(info.value.fields) == ["zip"]
    assert await env.client.get_contact(cid) == before

    status, body, _ = await env.raw.call("POST", "/contacts/edit/999.json", {"city": "Praha"})
    assert (status, body) == (404, NOT_FOUND)
    assert await env.client.edit_contact(999, {"city": "Praha"}) is False


async def test_delete_removes_the_contact_and_then_404s(env: Env) -> None:
    cid = await env.client.add_contact({"name": "Short Lived"})
    status, body, _ = await env.raw.call("DELETE", f"/contacts/delete/{cid}.json")
    assert (status, body) == (200, {"responseData": {"status": 200}})
    assert env.requests("DELETE")[-1].effect == f"contact.delete {cid}"
    status, body, _ = await env.raw.call("DELETE", f"/contacts/delete/{cid}.json")
    assert (status, body) == (404, NOT_FOUND)
    assert await env.client.get_contact(cid) is None

    other = await env.client.add_contact({"name": "Also Short Lived"})
    assert await env.client.delete_contact(other) is True
    assert await env.client.delete_contact(other) is False
    assert env.sim.company.contacts == {}


async def test_phone_numbers_are_not_unique_across_api_contacts(env: Env) -> None:
    body = {"name": "Twin", "ContactNumber": [{"public_number": "+447700900123"}]}
    first, second = await env.client.add_contact(body), await env.client.add_contact(body)  # type: ignore[arg-type]
    assert first != second and len(env.sim.company.contacts) == 2


async def test_index_items_carry_single_first_values_while_show_has_lists(env: Env) -> None:
    cid = await env.client.add_contact(
        {
            **JANA,
            "ContactEmail": [{"email": "a@example.org"}, {"email": "b@example.org"}],
            "ContactAttribute": [{"attribute_id": 123, "value": "7"}],
        }
    )
    bare = await env.client.add_contact({"name": "Bare"})
    status, body, _ = await env.raw.call("GET", "/contacts/index.json")
    assert status == 200
    page = body["responseData"]
    assert (page["itemsCount"], page["pageCount"], page["pageNumber"], page["limit"]) == (2, 1, 1, 30)
    assert page["data"] == [
        {
            "Contact": {"id": cid, "name": "Jana Nováková", "company": "Acme s.r.o."},
            "ContactNumber": {"public_number": "+421905123456"},
            "ContactEmail": {"email": "a@example.org"},
            "ContactAttribute": [{"attribute_id": "123", "title": "Salary", "value": "7"}],
        },
        {
            "Contact": {"id": bare, "name": "Bare", "company": ""},
            "ContactNumber": {"public_number": None},
            "ContactEmail": {"email": None},
            "ContactAttribute": [],
        },
    ]
    shown = await env.client.get_contact(cid)
    assert shown is not None and [e["email"] for e in shown["ContactEmail"]] == ["a@example.org", "b@example.org"]
    assert (await env.client.list_contacts())["data"] == page["data"]


async def test_keyword_and_filters(env: Env) -> None:
    jana = await env.client.add_contact({**JANA, "industry": "Retail"})
    john = await env.client.add_contact(
        {
            "name": "John Smith",
            "company": "Globex",
            "country_id": 235,
            "ContactNumber": [{"public_number": "+12025550143"}],
            "ContactEmail": [{"email": "john.smith@example.com"}],
        }
    )

    async def ids(**params: Any) -> list[str]:
        status, body, _ = await env.raw.call("GET", "/contacts/index.json", params=params)
        assert status == 200, body
        return [item["Contact"]["id"] for item in body["responseData"]["data"]]

    assert await ids(keyword="jana") == [jana]
    assert await ids(keyword="NOVÁ") == [jana]
    assert await ids(keyword="+12025550143") == [john]
    assert await ids(keyword="12025550143") == [john]
    assert await ids(keyword="5550") == [john]
    assert await ids(keyword="SMITH@example") == [john]
    assert await ids(keyword="Globex") == []  # company is not searched by default
    assert await ids(keyword="nobody") == []
    assert await ids(country_id=235) == [john]
    assert await ids(industry="retail") == [jana]
    tag_id = env.sim.company.tag_id("kustomer-support")
    assert await ids(tag_id=tag_id) == [jana]
    status, body, _ = await env.raw.call("GET", "/contacts/index.json", params={"tag_id": "x"})
    assert status == 406 and list(body["responseData"]["data"]) == ["tag_id"]

    page = await env.client.list_contacts(keyword="john")
    assert [i["Contact"]["id"] for i in page["data"]] == [john]
    page = await env.client.list_contacts(country_id=199, tag_id=tag_id)
    assert [i["Contact"]["id"] for i in page["data"]] == [jana]

    status, _ = await env.raw.sim("POST", "settings", {"keyword_fields": ["name", "company"]})
    assert status == 200
    assert await ids(keyword="Globex") == [john]
    assert await ids(keyword="12025550143") == []


async def test_pagination_walks_to_the_last_page_and_limit_is_bounded(env: Env) -> None:
    env.sim.seed({"contacts": [{"name": f"Contact {i:02d}"} for i in range(65)]})
    status, body, _ = await env.raw.call("GET", "/contacts/index.json")
    page = body["responseData"]
    assert (page["itemsCount"], page["pageCount"], page["pageNumber"], page["limit"], len(page["data"])) == (
        65,
        3,
        1,
        30,
        30,
    )
    status, body, _ = await env.raw.call("GET", "/contacts/index.json", params={"page": 3})
    assert len(body["responseData"]["data"]) == 5 and body["responseData"]["pageNumber"] == 3
    status, body, _ = await env.raw.call("GET", "/contacts/index.json", params={"page": 4})
    assert status == 200 and body["responseData"]["data"] == []

    pages = [p async for p in env.client.iter_contacts(limit=30)]
    assert [p["pageNumber"] for p in pages] == [1, 2, 3]
    names = [i["Contact"]["name"] for p in pages for i in p["data"]]
    assert names == [f"Contact {i:02d}" for i in range(65)]
    assert len([p async for p in env.client.iter_contacts()]) == 1
    assert len(env.requests("GET", r"/contacts/index\.json$")) == 3 + 3 + 1

    for params, field in (
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"page": 0}, "page"),
    ):
        status, body, _ = await env.raw.call("GET", "/contacts/index.json", params=params)
        assert status == 406 and list(body["responseData"]["data"]) == [field], params
    status, body, _ = await env.raw.call("GET", "/contacts/index.json", params={"limit": 1000})
    assert status == 200 and body["responseData"]["pageCount"] == 1
    with pytest.raises(ValidationError) as info:
        await env.client.list_contacts(limit=1001)
    assert list(info.value.fields) == ["limit"]


async def test_add_and_remove_tags(env: Env) -> None:
    cid = await env.client.add_contact({"name": "Tagged", "ContactsTag": [{"name": "first"}]})
    status, body, _ = await env.raw.call("PUT", f"/contacts/addTags/{cid}.json", {"tags": ["second", "third"]})
    assert status == 200
    data = body["responseData"]
    assert data["status"] == 200 and data["message"] == "Tags were sucessfully added."
    assert [t["name"] for t in data["data"]["tags"]] == ["second", "third"] and data["data"]["contact_id"] == cid
    assert env.requests("PUT")[-1].effect == f"contact.addTags {cid}"

    result = await env.client.remove_tags(cid, ["first", "never-assigned"])
    assert result is not None and [t["name"] for t in result["tags"]] == ["first"]
    result = await env.client.add_tags(cid, ["fourth"])
    assert result is not None and result["contact_id"] == cid
    shown = await env.client.get_contact(cid)
    assert shown is not None and [t["name"] for t in shown["Contact"]["tags"]] == ["second", "third", "fourth"]

    status, body, _ = await env.raw.call("DELETE", f"/contacts/removeTags/{cid}.json", {"tags": ["second"]})
    assert status == 200 and body["responseData"]["message"] == "Tags were successfully removed."
    status, body, _ = await env.raw.call("PUT", f"/contacts/addTags/{cid}.json", {"tags": []})
    assert status == 406 and list(body["responseData"]["data"]) == ["tags"]
    with pytest.raises(ValidationError):
        await env.client.add_tags(cid, [""])
    status, body, _ = await env.raw.call("PUT", "/contacts/addTags/999.json", {"tags": ["x"]})
    assert (status, body) == (404, NOT_FOUND)
    status, body, _ = await env.raw.call("DELETE", "/contacts/removeTags/999.json", {"tags": ["x"]})
    assert (status, body) == (404, NOT_FOUND)
    assert await env.client.add_tags(999, ["x"]) is None
    assert await env.client.remove_tags(999, ["x"]) is None
    assert "x" not in env.sim.company.tags.values()


# --------------------------------------------------------------------------------------------
# Reference data
# --------------------------------------------------------------------------------------------


async def test_countries_are_a_plain_list_with_cloudtalk_ids(env: Env) -> None:
    status, body, _ = await env.raw.call("GET", "/countries/index.json")
    assert status == 200
    countries = [item["Country"] for item in body["responseData"]]
    assert len(countries) >= 60
    assert {"id": "61", "name": "Denmark", "country_code": "DK", "iso3": "DNK", "calling_code": "45"} in countries
    assert {
        "id": "235",
        "name": "United Kingdom",
        "country_code": "GB",
        "iso3": "GBR",
        "calling_code": "44",
    } in countries
    codes = {c["country_code"] for c in countries}
    assert {"SK", "CZ", "US", "DE", "AT", "PL", "FR"} <= codes
    assert await env.client.list_countries() == countries


async def test_agents_numbers_tags_attributes(env: Env) -> None:
    status, body, _ = await env.raw.call("GET", "/agents/index.json")
    assert status == 200 and body["responseData"]["itemsCount"] == 2
    max_agent = body["responseData"]["data"][0]["Agent"]
    assert {
        k: max_agent[k]
        for k in (
            "id",
            "firstname",
            "lastname",
            "email",
            "extension",
            "default_number",
            "associated_numbers",
            "availability_status",
            "call_number_id",
        )
    } == {
        "id": "493933",
        "firstname": "Max",
        "lastname": "Yellow",
        "email": "max.yellow@example.com",
        "extension": "1001",
        "default_number": "+442012345678",
        "associated_numbers": ["+442012345678"],
        "availability_status": "online",
        "call_number_id": 12345,
    }
    status, body, _ = await env.raw.call("GET", "/agents/index.json", params={"associated_number": "+421221291400"})
    assert [a["Agent"]["id"] for a in body["responseData"]["data"]] == ["493934"]
    pages = [p async for p in env.client.iter_agents(agent_id=493933)]
    assert [a["Agent"]["email"] for p in pages for a in p["data"]] == ["max.yellow@example.com"]

    status, body, _ = await env.raw.call("GET", "/numbers/index.json", params={"is_free": 0})
    assert [n["CallNumber"]["id"] for n in body["responseData"]["data"]] == ["12346"]
    numbers = [n["CallNumber"] async for p in env.client.iter_numbers() for n in p["data"]]
    assert numbers[0] == {
        "id": "12345",
        "country_code": "44",
        "area_code": "20",
        "internal_name": "UK Support",
        "caller_id_e164": "442012345678",
        "is_redirected": False,
        "connected_to": "1",
        "source_id": None,
    }
    assert len(numbers) == 2

    await env.client.add_contact({"name": "T", "ContactsTag": [{"name": "vip"}, {"name": "shopify"}]})
    tags = [t["Tag"] async for p in env.client.iter_tags() for t in p["data"]]
    assert [t["name"] for t in tags] == ["vip", "shopify"]
    status, body, _ = await env.raw.call("GET", "/tags/index.json", params={"id": tags[1]["id"]})
    assert body["responseData"]["data"] == [{"Tag": tags[1]}]

    status, body, _ = await env.raw.call("GET", "/contacts/attributes.json")
    assert (status, body) == (200, {"responseData": [{"ContactAttribute": {"id": "123", "title": "Salary"}}]})
    assert await env.client.list_attributes() == [{"id": "123", "title": "Salary"}]


# --------------------------------------------------------------------------------------------
# Calls
# --------------------------------------------------------------------------------------------

CALL_A = {
    "direction": "incoming",
    "status": "answered",
    "internal_number": "+442012345678",
    "external_number": "+447700900123",
    "agent_id": 493933,
    "waiting_time": 12,
    "talking_time": 263,
    "wrapup_time": 30,
    "is_voicemail": False,
    "recorded": True,
    "tags": ["Billing"],
    "notes": ["Customer asked for refund status"],
    "rating": 4,
    "started_at": "2026-03-02T09:14:05.000Z",
}
CALL_B = {
    "direction": "outgoing",
    "status": "missed",
    "internal_number": "+421221291400",
    "external_number": "+421905123456",
    "agent_id": 493934,
    "waiting_time": 20,
    "started_at": "2026-03-02T10:00:00Z",
}
CALL_C = {
    "direction": "incoming",
    "status": "missed",
    "internal_number": "+442012345678",
    "external_number": "+447700900999",
    "waiting_time": 30,
    "is_voicemail": True,
    "started_at": "2026-03-03 08:00:00",
}


async def test_calls_index_record_shape_filters_and_order(env: Env) -> None:
    jana = await env.client.add_contact(JANA)
    # ended out of order: the index is ordered by started_at
    c = env.sim.end_call(CALL_C)
    b = env.sim.end_call(CALL_B)
    a = env.sim.end_call(CALL_A)
    assert all(len(str(x.id)) == 10 for x in (a, b, c)) and c.id < b.id < a.id

    status, body, _ = await env.raw.call("GET", "/calls/index.json")
    assert status == 200
    page = body["responseData"]
    assert [i["Cdr"]["id"] for i in page["data"]] == [str(a.id), str(b.id), str(c.id)]
    assert (page["itemsCount"], page["pageCount"], page["limit"]) == (3, 1, 30)

    item = page["data"][0]
    billing_tag = item["Tags"][0]["id"]
    assert item["Cdr"] == {
        "id": str(a.id),
        "billsec": "275",
        "type": "incoming",
        "country_code": "44",
        "public_external": "447700900123",
        "public_internal": "442012345678",
        "recorded": True,
        "is_voicemail": False,
        "fax_email": "",
        "is_redirected": "0",
        "redirected_from": "",
        "transferred_from": "",
        "is_local": True,
        "user_id": "493933",
        "talking_time": "263",
        "started_at": "2026-03-02T09:14:05.000Z",
        "answered_at": "2026-03-02T09:14:17.000Z",
        "ended_at": "2026-03-02T09:18:40.000Z",
        "waiting_time": 12,
        "wrapup_time": 30,
        "recording_link": f"https://my.cloudtalk.io/r/play/{a.id}",
    }
    assert {k: item["Contact"][k] for k in ("id", "name", "type", "contact_numbers", "contact_emails")} == {
        "id": jana,
        "name": "Jana Nováková",
        "type": "contact",
        "contact_numbers": ["421905123456", "447700900123"],
        "contact_emails": ["jana@example.org"],
    }
    assert item["Contact"]["favorite_agent"]["id"] == "493933"
    assert item["CallNumber"] == {
        "id": "12345",
        "internal_name": "UK Support",
        "caller_id_e164": "442012345678",
        "country_code": "44",
        "area_code": "20",
    }
    assert item["Agent"] == {
        "id": "493933",
        "firstname": "Max",
        "lastname": "Yellow",
        "fullname": "Max Yellow",
        "email": "max.yellow@example.com",
        "language": "en",
        "role": "Agent",
        "status": "online",
        "default_outbound_number": "442012345678",
        "associated_numbers": ["442012345678"],
        "groups": ["support"],
    }
    assert item["BillingData"] == {"price": "0.000000"}
    assert [n["name"] for n in item["Notes"]] == ["Customer asked for refund status"]
    assert item["Tags"] == [{"id": billing_tag, "name": "Billing"}]
    assert [(r["type"], r["rating"]) for r in item["Ratings"]] == [("agent", 4)]

    unknown = page["data"][2]
    assert "Contact" not in unknown and "Agent" not in unknown
    assert unknown["Cdr"]["answered_at"] is None and unknown["Cdr"]["recording_link"] is None
    assert unknown["Cdr"]["is_voicemail"] is True and unknown["Cdr"]["talking_time"] == "0"

    async def ids(**params: Any) -> list[int]:
        status, body, _ = await env.raw.call("GET", "/calls/index.json", params=params)
        assert status == 200, body
        return [int(i["Cdr"]["id"]) for i in body["responseData"]["data"]]

    assert await ids(date_from="2026-03-02 09:14:05", date_to="2026-03-02 10:00:00") == [a.id, b.id]
    assert await ids(date_from="2026-03-02 09:14:06") == [b.id, c.id]
    assert await ids(date_to="2026-03-02 09:14:04") == []
    assert await ids(type="outgoing") == [b.id]
    assert await ids(status="missed") == [b.id, c.id]
    assert await ids(status="answered") == [a.id]
    assert await ids(call_id=c.id) == [c.id]
    assert await ids(public_external="+421905123456") == [b.id]
    assert await ids(public_internal="442012345678") == [a.id, c.id]
    assert await ids(contact_id=jana) == [a.id, b.id]
    assert await ids(user_id=493934) == [b.id]
    assert await ids(agent_extension=1001) == [a.id]
    assert await ids(tag_id=billing_tag) == [a.id]
    for params in ({"date_from": "yesterday"}, {"type": "fax"}, {"status": "busy"}, {"limit": 0}):
        status, body, _ = await env.raw.call("GET", "/calls/index.json", params=params)
        assert status == 406 and list(body["responseData"]["data"]) == list(params)

    pages = [
        p
        async for p in env.client.iter_calls(
            date_from=datetime(2026, 3, 2, tzinfo=UTC), date_to="2026-03-02 23:59:59", limit=1
        )
    ]
    assert [int(i["Cdr"]["id"]) for p in pages for i in p["data"]] == [a.id, b.id]
    assert [p["pageNumber"] for p in pages] == [1, 2]
    missed = [i async for p in env.client.iter_calls(status="missed", type="incoming") for i in p["data"]]
    assert [int(i["Cdr"]["id"]) for i in missed] == [c.id]
    record = await env.client.get_call(a.id)
    assert record is not None and record == item
    assert await env.client.get_call(1) is None


async def test_calls_without_contact_or_agent_can_carry_null_keys(env: Env) -> None:
    env.sim.update_settings({"call_missing_relation": "null"})
    call = env.sim.end_call({**CALL_C, "talking_time": 40})  # nobody talks on a missed call
    record = await env.client.get_call(call.id)
    assert record is not None and record["Contact"] is None and record["Agent"] is None
    assert (record["Cdr"]["talking_time"], record["Cdr"]["billsec"]) == ("0", "30")


# --------------------------------------------------------------------------------------------
# Rate limit
# --------------------------------------------------------------------------------------------


async def test_429_with_the_three_headers_once_the_budget_is_spent(env: Env) -> None:
    env.sim.update_settings({"rate_limit": 5, "window_seconds": 2.0})
    env.sim.window.reset()
    remaining = []
    for _ in range(5):
        status, _, headers = await env.raw.call("GET", "/contacts/index.json")
        assert status == 200
        assert headers["X-CloudTalkAPI-Limit"] == "5"
        remaining.append(int(headers["X-CloudTalkAPI-Remaining"]))
    assert remaining == [4, 3, 2, 1, 0]
    status, body, headers = await env.raw.call("PUT", "/contacts/add.json", {"name": "Refused"})
    assert status == 429
    assert body == {"responseData": {"status": 429, "message": "Too Many Requests"}}
    assert headers["X-CloudTalkAPI-Limit"] == "5" and headers["X-CloudTalkAPI-Remaining"] == "0"
    reset_at = int(headers["X-CloudTalkAPI-ResetTime"])
    assert time.time() < reset_at <= time.time() + 3
    assert "Retry-After" not in headers
    assert env.sim.company.contacts == {}  # a refused request changes nothing

    # Another company has its own window and its own data.
    status, _ = await env.raw.sim("POST", "companies", {"key_id": "other-key", "key_secret": "other-secret"})
    assert status == 201
    status, body, _ = await env.raw.call(
        "PUT", "/contacts/add.json", {"name": "Other Co"}, auth=("other-key", "other-secret")
    )
    assert status == 201
    assert env.sim.company.contacts == {}
    status, state = await env.raw.sim("GET", "state", company="other-key")
    assert [c["Contact"]["name"] for c in state["contacts"]] == ["Other Co"]

    # The client, knowing nothing of the spent window, gets a 429, waits for the reset, succeeds once.
    started = time.time()
    cid = await env.client.add_contact({"name": "Patient"})
    assert time.time() >= reset_at - 1.0 and time.time() - started < 4
    adds = env.requests("PUT", r"/contacts/add\.json$")
    assert [e.status for e in adds] == [429, 201, 429, 201]  # raw refused, other company, client 429, client 201
    assert [e.effect for e in adds] == [None, adds[1].effect, None, f"contact.add {cid}"]
    assert adds[1].effect and adds[1].effect.startswith("contact.add ")
    assert [c.name for c in env.sim.company.contacts.values()] == ["Patient"]
    assert env.client.executor.rate_limited == 1


async def test_client_paces_itself_from_the_headers(env: Env) -> None:
    env.sim.update_settings({"rate_limit": 4, "window_seconds": 1.0})
    env.sim.window.reset()
    for i in range(6):
        await env.client.add_contact({"name": f"Paced {i}"})
    assert [e.status for e in env.requests("PUT")] == [201] * 6  # waited for the reset, never refused
    assert env.client.executor.rate_limited == 0


async def test_rate_headers_only_on_429_when_so_configured(env: Env) -> None:
    env.sim.update_settings({"rate_headers_always": False, "rate_limit": 1, "window_seconds": 2.0})
    env.sim.window.reset()
    status, _, headers = await env.raw.call("GET", "/tags/index.json")
    assert status == 200 and "X-CloudTalkAPI-Limit" not in headers
    status, _, headers = await env.raw.call("GET", "/tags/index.json")
    assert status == 429 and headers["X-CloudTalkAPI-Remaining"] == "0"


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------


async def test_injected_5xx_on_a_create_are_not_retried_blindly_and_the_effect_happens_once(env: Env) -> None:
    status, _ = await env.raw.sim(
        "POST",
        "faults",
        [
            {"match": r"PUT /api/contacts/add\.json", "status": 500, "times": 1},
            {"match": r"PUT /api/contacts/add\.json", "status": 503, "times": 1},
        ],
    )
    assert status == 201
    # a 5xx does not say whether the contact was added: the client reports it instead of retrying
    with pytest.raises(AmbiguousOutcomeError) as info:
        await env.client.add_contact({"name": "Retried"})
    assert info.value.status == 500
    assert [e.status for e in env.requests("PUT")] == [500]

    async def find() -> str | None:
        page = await env.client.list_contacts(keyword="Retried")
        return page["data"][0]["Contact"]["id"] if page["data"] else None

    cid, found = await create_or_find(lambda: env.client.add_contact({"name": "Retried"}), find, settle_s=0.0)
    adds = env.requests("PUT")
    assert [(e.status, e.fault) for e in adds] == [(500, "status"), (503, "status"), (201, None)]
    assert [e.effect for e in adds] == [None, None, f"contact.add {cid}"] and found is False
    assert len(env.sim.company.contacts) == 1

    # reads are idempotent: a 5xx is retried
    await env.raw.sim("POST", "faults", {"match": "GET /api/contacts/show", "status": 500, "times": 1})
    assert (await env.client.get_contact(cid))["Contact"]["name"] == "Retried"
    await env.raw.sim("POST", "faults", {"match": "GET /api/contacts/show", "status": 500, "times": 1})
    status, body, headers = await env.raw.call("GET", f"/contacts/show/{cid}.json")
    assert (status, body) == (500, {"responseData": {"status": 500, "message": "Something went wrong."}})
    assert "X-CloudTalkAPI-Limit" in headers


async def test_injected_4xx_are_not_retried(env: Env) -> None:
    await env.raw.sim("POST", "faults", {"match": "PUT /api/contacts/add", "status": 403, "times": 1})
    with pytest.raises(RejectedError) as info:
        await env.client.add_contact({"name": "Forbidden"})
    assert info.value.status == 403 and not isinstance(info.value, ValidationError)
    assert [e.status for e in env.requests("PUT")] == [403]
    await env.raw.sim("POST", "faults", {"match": "PUT /api/contacts/add", "status": 406, "times": 1})
    with pytest.raises(ValidationError) as vinfo:
        await env.client.add_contact({"name": "Invalid"})
    assert vinfo.value.fields == {}
    assert env.sim.company.contacts == {}


async def test_persistent_5xx_exhaust_the_retries(env: Env) -> None:
    await env.raw.sim("POST", "faults", {"match": "GET /api/tags", "status": 502})
    client = CloudTalkClient.from_credentials(
        env.session,
        env.api,
        KEY_ID,
        KEY_SECRET,
        policy=RetryPolicy(initial_s=0.01, max_backoff_s=0.02, max_attempts=3, timeout_s=1.0),
    )
    with pytest.raises(RetryExhaustedError):
        [p async for p in client.iter_tags()]
    assert len(env.requests("GET", "/api/tags")) == 3


async def test_injected_429_burst_is_waited_out(env: Env) -> None:
    env.sim.update_settings({"window_seconds": 1.0})
    await env.raw.sim("POST", "faults", {"match": "GET /api/countries", "status": 429, "times": 2})
    status, body, headers = await env.raw.call("GET", "/countries/index.json")
    assert status == 429 and body["responseData"]["status"] == 429
    assert headers["X-CloudTalkAPI-Remaining"] == "0" and "X-CloudTalkAPI-ResetTime" in headers
    countries = await env.client.list_countries()
    assert len(countries) >= 60
    assert [e.status for e in env.requests("GET", "/api/countries")] == [429, 429, 200]
    assert env.client.executor.rate_limited == 1


async def test_latency_timeout_and_reset_faults(env: Env) -> None:
    cid = await env.client.add_contact({"name": "Slow"})
    await env.raw.sim(
        "POST", "faults", {"match": "GET /api/contacts/show", "kind": "latency", "latency_ms": 300, "times": 1}
    )
    started = time.monotonic()
    assert await env.client.get_contact(cid) is not None
    assert time.monotonic() - started >= 0.3

    impatient = CloudTalkClient.from_credentials(
        env.session,
        env.api,
        KEY_ID,
        KEY_SECRET,
        policy=RetryPolicy(initial_s=0.01, max_backoff_s=0.02, max_attempts=4, timeout_s=0.3),
    )
    await env.raw.sim(
        "POST", "faults", {"match": "POST /api/contacts/edit", "kind": "timeout", "latency_ms": 600, "times": 1}
    )
    assert await impatient.edit_contact(cid, {"city": "Žilina"}) is True
    edits = env.requests("POST", "/api/contacts/edit")
    assert [(e.fault, e.status) for e in edits] == [("timeout", -1), (None, 200)]

    await env.raw.sim("POST", "faults", {"match": "DELETE /api/contacts/delete", "kind": "reset", "times": 1})
    assert await env.client.delete_contact(cid) is True
    deletes = env.requests("DELETE")
    assert [(e.fault, e.status) for e in deletes] == [("reset", -1), (None, 200)]
    assert env.sim.company.contacts == {}


# --------------------------------------------------------------------------------------------
# Workflow deliveries
# --------------------------------------------------------------------------------------------


async def test_call_ended_delivers_the_canonical_body_with_headers(env: Env, receiver: Receiver) -> None:
    await add_workflows(env, receiver, "call.ended")
    jana = await env.client.add_contact(JANA)
    status, made = await env.raw.sim("POST", "calls", CALL_A)
    assert status == 201
    [request] = await receiver.wait_for(1, "/hooks/call.ended")
    assert_delivery_headers(request)
    call_id = made["call_id"]
    encoded = urllib.parse.quote(base64.b64encode(str(call_id).encode()).decode(), safe="")
    body = request["body"]
    assert re.fullmatch(rf"https://my\.cloudtalk\.io/pub/r/{re.escape(encoded)}/[\w-]+\.wav", body["recording_url"])
    assert body == {
        "event": "call.ended",
        "call_id": call_id,
        "call_uuid": made["call_uuid"],
        "direction": "incoming",
        "status": "answered",
        "internal_number": 442012345678,
        "internal_number_name": "UK Support",
        "external_number": 447700900123,
        "contact_id": int(jana),
        "agent_id": 493933,
        "agent_first_name": "Max",
        "agent_last_name": "Yellow",
        "agent_email": "max.yellow@example.com",
        "started_at": "2026-03-02T09:14:05.000Z",
        "answered_at": "2026-03-02T09:14:17.000Z",
        "ended_at": "2026-03-02T09:18:40.000Z",
        "waiting_time": 12,
        "talking_time": 263,
        "wrapup_time": 30,
        "is_voicemail": False,
        "recording_url": body["recording_url"],
        "call_tags": ["Billing"],
        "call_notes": ["Customer asked for refund status"],
        "rating": 4,
    }
    assert re.fullmatch(r"[0-9a-f-]{36}", made["call_uuid"])
    record = await env.client.get_call(call_id)
    assert record is not None and record["Cdr"]["id"] == str(call_id) and record["Contact"]["id"] == jana

    status, made = await env.raw.sim("POST", "calls", CALL_C)
    [_, request] = await receiver.wait_for(2, "/hooks/call.ended")
    assert made["call_id"] > call_id
    missed = request["body"]
    assert {
        k: missed[k]
        for k in (
            "status",
            "contact_id",
            "agent_id",
            "agent_email",
            "answered_at",
            "talking_time",
            "recording_url",
            "rating",
            "is_voicemail",
            "external_number",
            "call_tags",
            "call_notes",
            "started_at",
            "ended_at",
        )
    } == {
        "status": "missed",
        "contact_id": None,
        "agent_id": None,
        "agent_email": None,
        "answered_at": None,
        "talking_time": 0,
        "recording_url": None,
        "rating": None,
        "is_voicemail": True,
        "external_number": 447700900999,
        "call_tags": [],
        "call_notes": [],
        "started_at": "2026-03-03T08:00:00.000Z",
        "ended_at": "2026-03-03T08:00:30.000Z",
    }
    status, deliveries = await env.raw.sim("GET", "deliveries", trigger="call.ended")
    assert [d["status"] for d in deliveries["deliveries"]] == ["delivered", "delivered"]
    assert "X-Pipeline-Secret" in deliveries["deliveries"][0]["header_names"]
    assert "test-shared-token" not in orjson.dumps(deliveries).decode()


async def test_deliver_times_and_deliver_false(env: Env, receiver: Receiver) -> None:
    await add_workflows(env, receiver, "call.ended")
    status, made = await env.raw.sim("POST", "calls", {**CALL_B, "deliver_times": 2})
    assert status == 201
    first, second = await receiver.wait_for(2, "/hooks/call.ended")
    assert first["body"] == second["body"] and first["body"]["call_id"] == made["call_id"]
    await env.raw.sim("POST", "calls", {**CALL_B, "deliver": False})
    assert await env.sim.wait_deliveries(2.0)
    assert len(receiver.requests) == 2
    assert len(env.sim.company.calls) == 2


async def test_call_ended_waits_for_wrap_up(env: Env, receiver: Receiver) -> None:
    await add_workflows(env, receiver, "call.ended")
    await env.raw.sim("POST", "settings", {"wrapup_delay_s": 0.3})
    started = time.monotonic()
    await env.raw.sim("POST", "calls", CALL_B)
    await receiver.wait_for(1, "/hooks/call.ended")
    assert time.monotonic() - started >= 0.3


async def test_sms_received_and_sent_bodies(env: Env, receiver: Receiver) -> None:
    await add_workflows(env, receiver, "sms.received", "sms.sent")
    jana = await env.client.add_contact(JANA)
    status, made = await env.raw.sim(
        "POST",
        "sms",
        {
            "direction": "incoming",
            "internal_number": "+442012345678",
            "external_number": "+447700900123",
            "text": "Hi, is my refund processed yet?",
            "created_at": "2026-03-02T10:01:22Z",
        },
    )
    assert status == 201
    [received] = await receiver.wait_for(1, "/hooks/sms.received")
    assert_delivery_headers(received)
    assert received["body"] == {
        "event": "sms.received",
        "sms_id": made["sms_id"],
        "direction": "incoming",
        "sender": 447700900123,
        "recipient": 442012345678,
        "internal_number": 442012345678,
        "external_number": 447700900123,
        "contact_id": int(jana),
        "agent_id": None,
        "text": "Hi, is my refund processed yet?",
        "created_at": "2026-03-02T10:01:22.000Z",
    }
    status, made2 = await env.raw.sim(
        "POST",
        "sms",
        {
            "direction": "outgoing",
            "internal_number": "442012345678",
            "external_number": 12025550143,
            "agent_id": 493933,
            "text": "Yes, it is.",
            "created_at": "2026-03-02 10:05:00",
        },
    )
    [sent] = await receiver.wait_for(1, "/hooks/sms.sent")
    assert sent["body"] == {
        "event": "sms.sent",
        "sms_id": made2["sms_id"],
        "direction": "outgoing",
        "sender": 442012345678,
        "recipient": 12025550143,
        "internal_number": 442012345678,
        "external_number": 12025550143,
        "contact_id": None,
        "agent_id": 493933,
        "text": "Yes, it is.",
        "created_at": "2026-03-02T10:05:00.000Z",
    }
    assert made2["sms_id"] > made["sms_id"]
    status, body = await env.raw.sim("POST", "sms", {"direction": "sideways", "internal_number": "x"})
    assert status == 400 and set(body["errors"]) >= {"direction", "internal_number", "external_number"}


def expected_contact(event: str, show: dict[str, Any]) -> dict[str, Any]:
    c = show["Contact"]
    return {
        "event": event,
        "contact_id": int(c["id"]),
        "name": c["name"],
        "title": c["title"],
        "company": c["company"],
        "industry": c["industry"],
        "website": c["website"],
        "address": c["address"],
        "city": c["city"],
        "zip": c["zip"],
        "state": c["state"],
        "country_id": int(c["country_id"]) if c["country_id"] else None,
        "favorite_agent": int(c["favorite_agent"]) if c["favorite_agent"] else None,
        "contact_numbers": [int(n.lstrip("+")) for n in c["contact_numbers"]],
        "contact_emails": c["contact_emails"],
        "tags": [t["name"] for t in c["tags"]],
        "external_urls": [{"name": u["name"], "url": u["url"]} for u in show["ExternalUrl"]],
        "created_at": c["created"],
        "modified_at": c["modified"],
    }


async def test_contact_workflows_fire_on_api_writes(env: Env, receiver: Receiver) -> None:
    await add_workflows(env, receiver, "contact.created", "contact.updated", "contact.deleted")
    cid = await env.client.add_contact(JANA)
    [created] = await receiver.wait_for(1, "/hooks/contact.created")
    assert_delivery_headers(created)
    show = await env.client.get_contact(cid)
    assert created["body"] == expected_contact("contact.created", show)  # type: ignore[arg-type]
    assert created["body"]["contact_numbers"] == [421905123456, 447700900123]
    assert created["body"]["country_id"] == 199 and created["body"]["favorite_agent"] == 493933

    await env.client.edit_contact(cid, {"title": "Dr.", "ContactEmail": ""})
    [updated] = await receiver.wait_for(1, "/hooks/contact.updated")
    show = await env.client.get_contact(cid)
    assert updated["body"] == expected_contact("contact.updated", show)  # type: ignore[arg-type]
    assert updated["body"]["title"] == "Dr." and updated["body"]["contact_emails"] == []

    await env.client.add_tags(cid, ["vip"])
    tagged = (await receiver.wait_for(2, "/hooks/contact.updated"))[1]
    assert tagged["body"]["tags"] == ["kustomer-support", "vip"]

    await env.client.delete_contact(cid)
    [deleted] = await receiver.wait_for(1, "/hooks/contact.deleted")
    assert set(deleted["body"]) == {"event", "contact_id", "name", "modified_at"}
    assert deleted["body"]["event"] == "contact.deleted" and deleted["body"]["contact_id"] == int(cid)
    assert deleted["body"]["name"] == "Jana Nováková" and ISO_MS.match(deleted["body"]["modified_at"])

    with pytest.raises(ValidationError):
        await env.client.add_contact({"company": "nameless"})
    assert await env.sim.wait_deliveries(2.0)
    assert len(receiver.requests) == 4  # a rejected write fires nothing


async def test_contact_workflows_fire_on_agent_writes(env: Env, receiver: Receiver) -> None:
    await add_workflows(env, receiver, "contact.created", "contact.updated", "contact.deleted")
    status, made = await env.raw.sim(
        "POST", "contacts", {"name": "Walk-in", "ContactNumber": [{"public_number": "+420601123456"}]}
    )
    assert status == 201
    [created] = await receiver.wait_for(1, "/hooks/contact.created")
    assert created["body"] == expected_contact("contact.created", made["contact"])
    status, made = await env.raw.sim("PATCH", f"contacts/{made['id']}", {"company": "Walk-in Ltd"})
    assert status == 200
    [updated] = await receiver.wait_for(1, "/hooks/contact.updated")
    assert updated["body"] == expected_contact("contact.updated", made["contact"])
    status, _ = await env.raw.sim("DELETE", f"contacts/{made['id']}")
    assert status == 200
    [deleted] = await receiver.wait_for(1, "/hooks/contact.deleted")
    assert deleted["body"]["contact_id"] == made["id"]
    status, body = await env.raw.sim("POST", "contacts", {"name": "Bad", "ContactNumber": [{"public_number": "1"}]})
    assert status == 400 and list(body["errors"]) == ["public_number"]
    status, _ = await env.raw.sim("DELETE", "contacts/12345")
    assert status == 404


async def test_failing_receiver_is_retried_until_delivered(env: Env, receiver: Receiver) -> None:
    receiver.fail_first = 2
    await add_workflows(env, receiver, "sms.received")
    await env.raw.sim(
        "POST", "sms", {"internal_number": "+442012345678", "external_number": "+447700900123", "text": "retry me"}
    )
    requests = await receiver.wait_for(3, "/hooks/sms.received")
    assert len({orjson.dumps(r["body"]) for r in requests}) == 1
    assert await env.sim.wait_deliveries(2.0)
    [delivery] = env.sim.company.deliveries
    assert delivery.status == "delivered" and [a["status"] for a in delivery.attempts] == [500, 500, 200]


async def test_unreachable_receiver_gives_up_after_the_configured_attempts(env: Env) -> None:
    env.sim.update_settings({"delivery_attempts": 3})
    env.sim.add_workflow("contact.created", f"http://127.0.0.1:{free_port()}/gone")
    await env.client.add_contact({"name": "Nobody listens"})
    assert await env.sim.wait_deliveries(5.0)
    status, body = await env.raw.sim("GET", "deliveries", status="failed")
    [delivery] = body["deliveries"]
    assert len(delivery["attempts"]) == 3 and all(a["error"] for a in delivery["attempts"])


async def test_wildcard_workflow_gets_every_trigger(env: Env, receiver: Receiver) -> None:
    env.sim.add_workflow("*", f"{receiver.url}/all", method="PUT", headers={"Authorization": "Bearer test-token"})
    cid = await env.client.add_contact({"name": "Everything", "ContactNumber": [{"public_number": "+447700900123"}]})
    await env.client.edit_contact(cid, {"city": "Leeds"})
    env.sim.end_call(CALL_A)
    env.sim.sms_event({"internal_number": "+442012345678", "external_number": "+447700900123", "text": "in"})
    env.sim.sms_event(
        {
            "direction": "outgoing",
            "internal_number": "+442012345678",
            "external_number": "+447700900123",
            "text": "out",
            "agent_id": 493933,
        }
    )
    await env.client.delete_contact(cid)
    got = await receiver.wait_for(6, "/all")
    assert sorted(r["body"]["event"] for r in got) == sorted(
        ["contact.created", "contact.updated", "call.ended", "sms.received", "sms.sent", "contact.deleted"]
    )
    assert all(r["method"] == "PUT" and r["headers"]["Authorization"] == "Bearer test-token" for r in got)


# --------------------------------------------------------------------------------------------
# Call Modified, Recording Uploaded, conversation intelligence
# --------------------------------------------------------------------------------------------

AI_NOT_FOUND = {"statusCode": 404, "message": "Not found", "error": "Not Found"}
AI_PATHS = ("summary", "smart-notes", "transcription", "details-link")


async def test_call_modified_updates_the_history_and_delivers_the_full_current_annotations(
    env: Env, receiver: Receiver
) -> None:
    await add_workflows(env, receiver, "call.modified")
    status, made = await env.raw.sim("POST", "calls", CALL_A)
    assert status == 201
    call_id = made["call_id"]
    [first_note] = made["record"]["Notes"]

    status, out = await env.raw.sim(
        "POST",
        f"calls/{call_id}/modify",
        {"tags": ["Billing", "Refund"], "notes": ["Customer asked for refund status", "Refund approved"], "rating": 2},
    )
    assert status == 200, out
    record = await env.client.get_call(call_id)
    assert record is not None and record == out["record"]
    assert [t["name"] for t in record["Tags"]] == ["Billing", "Refund"]
    assert [n["name"] for n in record["Notes"]] == ["Customer asked for refund status", "Refund approved"]
    assert record["Notes"][0] == first_note  # an unchanged note keeps its id
    assert [(r["type"], r["rating"]) for r in record["Ratings"]] == [("agent", 2)]
    refund = next(t["id"] for t in record["Tags"] if t["name"] == "Refund")
    status, body, _ = await env.raw.call("GET", "/calls/index.json", params={"tag_id": refund})
    assert [i["Cdr"]["id"] for i in body["responseData"]["data"]] == [str(call_id)]

    [request] = await receiver.wait_for(1, "/hooks/call.modified")
    assert_delivery_headers(request)
    body = request["body"]
    assert body == out["body"]  # the answer shows the body that was sent
    assert ISO_MS.match(body["modified_at"])
    assert body == {
        "event": "call.modified",
        "call_id": call_id,
        "call_uuid": made["call_uuid"],
        "direction": "incoming",
        "internal_number": 442012345678,
        "external_number": 447700900123,
        "call_tags": ["Billing", "Refund"],
        "call_notes": ["Customer asked for refund status", "Refund approved"],
        "rating": 2,
        "modified_at": body["modified_at"],
    }

    # Only the rating is sent: the body still carries every current tag and note.
    status, out = await env.raw.sim("POST", f"calls/{call_id}/modify", {"rating": None, "deliver_times": 2})
    assert status == 200 and out["record"]["Ratings"] == []
    _, first, second = await receiver.wait_for(3, "/hooks/call.modified")
    assert first["body"] == second["body"]
    assert {k: first["body"][k] for k in ("call_tags", "call_notes", "rating")} == {
        "call_tags": ["Billing", "Refund"],
        "call_notes": ["Customer asked for refund status", "Refund approved"],
        "rating": None,
    }

    status, out = await env.raw.sim("POST", f"calls/{call_id}/modify", {"tags": [], "deliver": False})
    assert status == 200 and out["record"]["Tags"] == []
    assert await env.sim.wait_deliveries(2.0)
    assert len(receiver.on("/hooks/call.modified")) == 3
    status, deliveries = await env.raw.sim("GET", "deliveries", trigger="call.modified")
    assert [d["status"] for d in deliveries["deliveries"]] == ["delivered"] * 3


async def test_recording_uploaded_sets_the_link_and_delivers(env: Env, receiver: Receiver) -> None:
    await add_workflows(env, receiver, "call.ended", "recording.uploaded")
    status, made = await env.raw.sim("POST", "calls", {**CALL_A, "recorded": False})
    assert status == 201
    call_id = made["call_id"]
    assert made["record"]["Cdr"]["recorded"] is False and made["record"]["Cdr"]["recording_link"] is None
    [ended] = await receiver.wait_for(1, "/hooks/call.ended")
    assert ended["body"]["recording_url"] is None
    record = await env.client.get_call(call_id)
    assert record is not None and (record["Cdr"]["recorded"], record["Cdr"]["recording_link"]) == (False, None)

    status, out = await env.raw.sim("POST", f"calls/{call_id}/recording")
    assert status == 200, out
    encoded = urllib.parse.quote(base64.b64encode(str(call_id).encode()).decode(), safe="")
    url = out["body"]["recording_url"]
    assert re.fullmatch(rf"https://my\.cloudtalk\.io/pub/r/{re.escape(encoded)}/[\w-]+\.wav", url)
    record = await env.client.get_call(call_id)
    assert record is not None and record == out["record"]
    assert (record["Cdr"]["recorded"], record["Cdr"]["recording_link"]) == (True, url)

    [request] = await receiver.wait_for(1, "/hooks/recording.uploaded")
    assert_delivery_headers(request)
    body = request["body"]
    assert body == out["body"]
    assert ISO_MS.match(body["uploaded_at"])
    assert body == {
        "event": "recording.uploaded",
        "call_id": call_id,
        "call_uuid": made["call_uuid"],
        "internal_number": 442012345678,
        "external_number": 447700900123,
        "recording_url": url,
        "uploaded_at": body["uploaded_at"],
    }

    given = "https://recordings.example.com/calls/abc.wav"
    status, out = await env.raw.sim("POST", f"calls/{call_id}/recording", {"recording_url": given})
    assert status == 200 and out["record"]["Cdr"]["recording_link"] == given
    [_, request] = await receiver.wait_for(2, "/hooks/recording.uploaded")
    assert request["body"]["recording_url"] == given
    status, out = await env.raw.sim("POST", f"calls/{call_id}/recording", {"recording_url": "ftp://x", "deliver": 0})
    assert status == 400 and list(out["errors"]) == ["recording_url"]

    # A call ended recorded keeps its history link and its call.ended recording URL.
    status, made = await env.raw.sim("POST", "calls", CALL_A)
    [_, ended] = await receiver.wait_for(2, "/hooks/call.ended")
    assert made["record"]["Cdr"]["recording_link"] == f"https://my.cloudtalk.io/r/play/{made['call_id']}"
    assert ended["body"]["recording_url"].startswith("https://my.cloudtalk.io/pub/r/")


async def test_conversation_intelligence_answers_404_until_set_then_the_documented_shapes(env: Env) -> None:
    call = env.sim.end_call(CALL_A)
    for path in AI_PATHS:
        status, body, headers = await env.raw.call("GET", f"/ai/calls/{call.id}/{path}")
        assert (status, body) == (404, AI_NOT_FOUND)
        assert headers["X-CloudTalkAPI-Limit"] == "10000"

    status, out = await env.raw.sim("POST", f"calls/{call.id}/insights", {"summary": "Refund explained."})
    assert status == 200 and out["insights"]["summary"] == "Refund explained."
    status, body, _ = await env.raw.call("GET", f"/ai/calls/{call.id}/summary")
    assert (status, body) == (200, {"summary": "Refund explained."})
    status, body, _ = await env.raw.call("GET", f"/ai/calls/{call.id}/smart-notes")
    assert (status, body) == (404, AI_NOT_FOUND)  # only the sent keys are set

    status, out = await env.raw.sim(
        "POST",
        f"calls/{call.id}/insights",
        {
            "smart_notes": "Customer wants a refund",
            "transcription": "Agent: Hello. Customer: Hi, about my refund…",
            "details_link": "https://my.cloudtalk.io/ai/calls/details/1",
        },
    )
    assert status == 200, out
    expected = {
        "summary": {"summary": "Refund explained."},
        "smart-notes": {"smart_notes": ["Customer wants a refund"]},
        "transcription": {"transcription": "Agent: Hello. Customer: Hi, about my refund…"},
        "details-link": {"url": "https://my.cloudtalk.io/ai/calls/details/1"},
    }
    for path in AI_PATHS:
        status, body, _ = await env.raw.call("GET", f"/ai/calls/{call.id}/{path}")
        assert (status, body) == (200, expected[path])
    await env.raw.sim("POST", f"calls/{call.id}/insights", {"smart_notes": ["one", "two"], "summary": None})
    status, body, _ = await env.raw.call("GET", f"/ai/calls/{call.id}/smart-notes")
    assert (status, body) == (200, {"smart_notes": ["one", "two"]})
    status, body, _ = await env.raw.call("GET", f"/ai/calls/{call.id}/summary")
    assert (status, body) == (404, AI_NOT_FOUND)

    status, body, _ = await env.raw.call("GET", f"/ai/calls/{call.id + 1000}/transcription")
    assert (status, body) == (404, AI_NOT_FOUND)
    logged = env.requests("GET", r"^/api/ai/calls/")
    assert len(logged) == 4 + 2 + 4 + 2 + 1
    assert [e.status for e in logged][-3:] == [200, 404, 404] and all(e.effect is None for e in logged)


async def test_conversation_intelligence_needs_auth_and_counts_in_the_rate_window(env: Env) -> None:
    call = env.sim.end_call(CALL_A)
    env.sim.set_insights(call.id, {"summary": "Short call."})
    for auth in (None, (KEY_ID, "wrong")):
        status, body, headers = await env.raw.call("GET", f"/ai/calls/{call.id}/summary", auth=auth)
        assert (status, body) == (401, {"responseData": {"status": 401, "message": "Unauthorized action"}})
        assert "X-CloudTalkAPI-Remaining" not in headers

    env.sim.update_settings({"rate_limit": 3, "window_seconds": 2.0})
    env.sim.window.reset()
    remaining = []
    for path in ("/calls/index.json", f"/ai/calls/{call.id}/summary", f"/ai/calls/{call.id}/details-link"):
        status, _, headers = await env.raw.call("GET", path)
        assert status in (200, 404)
        remaining.append(headers["X-CloudTalkAPI-Remaining"])
    assert remaining == ["2", "1", "0"]
    for path in (f"/ai/calls/{call.id}/summary", "/calls/index.json"):
        status, body, headers = await env.raw.call("GET", path)
        assert (status, body) == (429, {"responseData": {"status": 429, "message": "Too Many Requests"}})
        assert headers["X-CloudTalkAPI-Remaining"] == "0"
    summaries = env.requests("GET", r"/summary$")
    assert [e.status for e in summaries] == [401, 401, 200, 429]


async def test_call_endpoints_answer_404_for_unknown_calls_and_400_for_bad_input(env: Env) -> None:
    for path in ("modify", "recording", "insights"):
        status, body = await env.raw.sim("POST", f"calls/1/{path}", {})
        assert status == 404 and "not found" in body["error"]
    call = env.sim.end_call(CALL_A)
    status, _ = await env.raw.sim("POST", "companies", {"key_id": "other-key", "key_secret": "other-secret"})
    assert status == 201
    status, _ = await env.raw.sim("POST", f"calls/{call.id}/modify", {"rating": 1}, company="other-key")
    assert status == 404  # calls belong to a company
    status, body, _ = await env.raw.call("GET", f"/ai/calls/{call.id}/summary", auth=("other-key", "other-secret"))
    assert (status, body) == (404, AI_NOT_FOUND)

    before = env.sim.state()["calls"]
    status, body = await env.raw.sim(
        "POST", f"calls/{call.id}/modify", {"tags": "Billing", "notes": [1], "rating": 6, "deliver_times": -1}
    )
    assert status == 400 and sorted(body["errors"]) == ["deliver_times", "notes", "rating", "tags"]
    status, body = await env.raw.sim("POST", f"calls/{call.id}/insights", {"summary": 3, "sentiment": "happy"})
    assert status == 400 and sorted(body["errors"]) == ["body", "summary"]
    status, body = await env.raw.sim("POST", f"calls/{call.id}/modify", ["rating"])
    assert status == 400
    assert env.sim.state()["calls"] == before and call.insights == {}


# --------------------------------------------------------------------------------------------
# Inspection API
# --------------------------------------------------------------------------------------------


async def test_settings_seed_state_and_reset(env: Env) -> None:
    status, current = await env.raw.sim("GET", "settings")
    assert status == 200 and current["page_size"] == 30 and current["key_secret"] == "[redacted]"
    status, body = await env.raw.sim("POST", "settings", {"page_size": 2})
    assert status == 200 and body["page_size"] == 2
    for bad in ({"page_size": 0}, {"page_size": "two"}, {"nonsense": 1}, {"key_secret": "x"}, {"merge_rule": "x"}):
        status, _ = await env.raw.sim("POST", "settings", bad)
        assert status == 400, bad

    status, body = await env.raw.sim(
        "POST",
        "seed",
        {"contacts": [{"name": "Seeded A"}, {"name": "Seeded B"}, {"name": "Seeded C"}], "tags": ["seed-tag"]},
    )
    assert status == 201 and len(body["created"]["contacts"]) == 3
    page = await env.client.list_contacts(limit=None)
    assert (page["limit"], page["pageCount"], len(page["data"])) == (2, 2, 2)
    status, body = await env.raw.sim("POST", "seed", {"contacts": [{"company": "no name"}]})
    assert status == 400

    env.sim.end_call(CALL_B)
    status, state = await env.raw.sim("GET", "state")
    assert status == 200
    assert [c["Contact"]["name"] for c in state["contacts"]] == ["Seeded A", "Seeded B", "Seeded C"]
    assert len(state["calls"]) == 1 and len(state["agents"]) == 2 and state["tags"][0]["name"] == "seed-tag"

    status, _ = await env.raw.sim("POST", "reset")
    assert status == 200
    status, state = await env.raw.sim("GET", "state")
    assert state["contacts"] == [] and state["calls"] == [] and len(state["agents"]) == 2
    assert env.sim.log.entries == []


async def test_integration_import_merges_by_phone_or_name_but_api_adds_do_not(env: Env) -> None:
    status, first = await env.raw.sim(
        "POST",
        "contacts/import",
        {
            "name": "John Jones",
            "ContactNumber": [{"public_number": "+447700900001"}, {"public_number": "+447700900002"}],
        },
    )
    assert status == 201 and first["merged"] is False
    status, second = await env.raw.sim(
        "POST",
        "contacts/import",
        {
            "name": "John J",
            "company": "Jones Ltd",
            "ContactNumber": [{"public_number": "+447700900002"}, {"public_number": "+447700900003"}],
        },
    )
    assert second["merged"] is True and second["id"] == first["id"]
    merged = second["contact"]["Contact"]
    assert merged["name"] == "John J" and merged["company"] == "Jones Ltd"
    assert merged["contact_numbers"] == ["+447700900001", "+447700900002", "+447700900003"]
    status, third = await env.raw.sim("POST", "contacts/import", {"name": "John J"})
    assert third["merged"] is True

    body = {"name": "John J", "ContactNumber": [{"public_number": "+447700900002"}]}
    api_id = await env.client.add_contact(body)  # type: ignore[arg-type]
    assert int(api_id) != first["id"] and len(env.sim.company.contacts) == 2

    env.sim.update_settings({"merge_api_contacts": True, "merge_rule": "phone"})
    again = await env.client.add_contact({"name": "Other Name", "ContactNumber": [{"public_number": "+447700900003"}]})
    assert int(again) == first["id"] and len(env.sim.company.contacts) == 2


# --------------------------------------------------------------------------------------------
# The CLI: flags, and the process driven with curl
# --------------------------------------------------------------------------------------------


async def test_cli_flags_configure_the_simulator(tmp_path: Path, receiver: Receiver) -> None:
    seed = tmp_path / "seed.json"
    seed.write_bytes(orjson.dumps({"agents": [AGENT], "contacts": [{"name": "From Seed File"}]}))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--key-id",
            "cli-key",
            "--key-secret",
            "cli-secret",
            "--rate-limit",
            "7",
            "--window-seconds",
            "3",
            "--rate-headers",
            "429",
            "--page-size",
            "10",
            "--merge-rule",
            "phone",
            "--keyword-fields",
            "name,company",
            "--workflow",
            f"contact.created={receiver.url}/created",
            "--workflow",
            f"*={receiver.url}/all",
            "--workflow-header",
            "X-Pipeline-Secret:test-shared-token",
            "--delivery-attempts",
            "2",
            "--company",
            "second-key:second-secret",
            "--seed-file",
            str(seed),
        ]
    )
    app = app_from_args(args)
    sim = app[CLOUDTALK_SIM]
    s = sim.settings
    assert (
        s.key_id,
        s.rate_limit,
        s.window_seconds,
        s.rate_headers_always,
        s.page_size,
        s.merge_rule,
        s.keyword_fields,
        s.delivery_attempts,
    ) == ("cli-key", 7, 3.0, False, 10, "phone", ("name", "company"), 2)
    assert [c.key_id for c in sim.companies] == ["cli-key", "second-key"]
    assert [w.trigger for w in sim.company.workflows] == ["contact.created", "*"]
    assert [c.name for c in sim.company.contacts.values()] == ["From Seed File"]

    async with SimServer(app) as server, aiohttp.ClientSession() as session:
        client = CloudTalkClient.from_credentials(
            session, server.base_url + "/api", "cli-key", "cli-secret", policy=FAST
        )
        await client.add_contact({"name": "Via CLI App", "favorite_agent": 493933})
        created = await receiver.wait_for(1, "/created")
        everything = await receiver.wait_for(1, "/all")
        assert created[0]["body"] == everything[0]["body"] and created[0]["body"]["name"] == "Via CLI App"
        assert_delivery_headers(created[0])
    with pytest.raises(SystemExit):
        parser.parse_args(["--workflow", "no-equals-sign"])


# --------------------------------------------------------------------------------------------
# The CLI process, driven with curl
# --------------------------------------------------------------------------------------------


async def curl(*args: str) -> tuple[int, Any]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-s", "-w", "\n%{http_code}", *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    text, _, code = out.decode().rpartition("\n")
    return int(code), (orjson.loads(text) if text else None)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_cli_process_serves_the_api_to_curl(receiver: Receiver) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devkit",
        "sim",
        "cloudtalk",
        "--port",
        str(port),
        "--key-id",
        "I",
        "--key-secret",
        "S",
        "--workflow",
        f"call.ended={receiver.url}/cli",
        "--workflow-header",
        "X-Pipeline-Secret:test-shared-token",
        "--log-level",
        "WARNING",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                assert proc.returncode is None, "simulator exited"
                assert time.monotonic() < deadline, "simulator did not start"
                await asyncio.sleep(0.1)

        assert await curl(f"{base}/api/contacts/index.json") == (
            401,
            {"responseData": {"status": 401, "message": "Unauthorized action"}},
        )
        code, body = await curl(
            "-u",
            "I:S",
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/json",
            "-d",
            '{"name": "Curl Contact", "ContactNumber": [{"public_number": "+447700900123"}]}',
            f"{base}/api/contacts/add.json",
        )
        assert code == 201
        cid = body["responseData"]["data"]["id"]
        code, body = await curl("-u", "I:S", "-H", "Accept: application/json", f"{base}/api/contacts/show/{cid}.json")
        assert code == 200
        assert body["responseData"]["Contact"]["name"] == "Curl Contact"
        assert body["responseData"]["ContactNumber"] == [{"public_number": "+447700900123"}]

        call = {k: v for k, v in CALL_A.items() if k != "agent_id"}  # no agents are seeded here
        code, body = await curl("-X", "POST", "-d", orjson.dumps(call).decode(), f"{base}/_sim/calls")
        assert code == 201
        [delivery] = await receiver.wait_for(1, "/cli", within_s=10)
        assert_delivery_headers(delivery)
        assert delivery["body"]["call_id"] == body["call_id"] and delivery["body"]["contact_id"] == int(cid)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            raise
    assert proc.returncode == 0
