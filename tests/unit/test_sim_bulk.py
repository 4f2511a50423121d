"""The simulators' bulk endpoints: CloudTalk ``POST /api/bulk/contacts.json`` and Kustomer
``POST /v1/notes/bulk`` (reference §3.4, §2.2), plus the CloudTalk index's 1,000-item pages.

Plain HTTP against the in-process simulators, so the answers are checked as a client sees them.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from devkit.sim.cloudtalk import CloudTalkSim, CloudTalkSimSettings, running_cloudtalk_sim
from devkit.sim.kustomer import ALL_ROLES, KustomerSim, KustomerSimSettings, running_kustomer_sim

KEY_ID, KEY_SECRET = "bulk-key-id", "bulk-key-secret"
AGENT_ID = 493933
BULK = "/bulk/contacts.json"


def cloudtalk_settings(**overrides: Any) -> CloudTalkSimSettings:
    base: dict[str, Any] = {"key_id": KEY_ID, "key_secret": KEY_SECRET, "rate_limit": 10_000}
    return CloudTalkSimSettings(**{**base, **overrides})


class CloudTalk:
    """A simulator and plain HTTP against it: ``(status, json body, headers)``."""

    def __init__(self, sim: CloudTalkSim, api: str, session: aiohttp.ClientSession) -> None:
        self.sim, self.api, self.session = sim, api, session

    async def call(
        self, method: str, path: str, body: Any = None, *, params: dict[str, Any] | None = None, raw: bytes = b""
    ) -> tuple[int, Any, Any]:
        headers = {"Accept": "application/json", "Authorization": aiohttp.encode_basic_auth(KEY_ID, KEY_SECRET)}
        data = orjson.dumps(body) if body is not None else raw or None
        if data is not None:
            headers["Content-Type"] = "application/json"
        async with self.session.request(method, self.api + path, data=data, headers=headers, params=params) as resp:
            text = await resp.read()
            return resp.status, (orjson.loads(text) if text else None), resp.headers

    async def bulk(self, commands: Any) -> tuple[int, Any, Any]:
        return await self.call("POST", BULK, commands)

    def bulk_entries(self) -> list[Any]:
        return [e for e in self.sim.log.entries if e.method == "POST" and e.path == "/api" + BULK]


@pytest.fixture
async def ct() -> AsyncIterator[CloudTalk]:
    seed = {"agents": [{"id": AGENT_ID, "firstname": "Max", "lastname": "Yellow", "email": "max@example.com"}]}
    async with (
        running_cloudtalk_sim(cloudtalk_settings(), seed=seed) as (sim, api),
        aiohttp.ClientSession() as session,
    ):
        yield CloudTalk(sim, api, session)


def adds(n: int, prefix: str = "cmd") -> list[dict[str, Any]]:
    return [
        {
            "action": "add_contact",
            "command_id": f"{prefix}-{i}",
            "data": {"name": f"Bulk {prefix} {i}", "ContactNumber": [{"public_number": f"+4420794601{i:02d}"}]},
        }
        for i in range(n)
    ]


# --------------------------------------------------------------------------------------------
# CloudTalk bulk
# --------------------------------------------------------------------------------------------


async def test_a_bulk_of_ten_adds_creates_ten_contacts_each_logged_with_its_command_id(ct: CloudTalk) -> None:
    status, body, headers = await ct.bulk(adds(10))
    assert status == 200
    results = body["responseData"]["data"]
    assert body["responseData"]["status"] == 200
    assert [r["command_id"] for r in results] == [f"cmd-{i}" for i in range(10)]
    assert {r["status"] for r in results} == {201}
    ids = [int(r["data"]["id"]) for r in results]
    assert sorted(ct.sim.company.contacts) == sorted(ids)
    assert [ct.sim.company.contacts[i].name for i in ids] == [f"Bulk cmd {i}" for i in range(10)]

    (entry,) = ct.bulk_entries()
    assert entry.status == 200 and entry.effect == "bulk.contacts applied=10 commands=10"
    assert [item["command_id"] for item in entry.items] == [f"cmd-{i}" for i in range(10)]
    assert [item["effect"] for item in entry.items] == [f"contact.add {i}" for i in ids]
    per_command = Counter(item["command_id"] for item in entry.items if item["effect"])
    assert set(per_command.values()) == {1}, "one effect per command"
    # the request log route shows the same items
    async with ct.session.get(ct.sim.root_url + "/_sim/requests", params={"path": "bulk"}) as resp:
        rows = (await resp.json())["requests"]
    assert [i["effect"] for i in rows[0]["items"]] == [f"contact.add {i}" for i in ids]
    assert headers["X-CloudTalkAPI-Remaining"] == str(10_000 - 10)


async def test_eleven_commands_or_a_malformed_body_are_406_and_nothing_is_applied(ct: CloudTalk) -> None:
    status, body, _ = await ct.bulk(adds(11))
    assert status == 406
    assert body["responseData"]["status"] == 406 and body["responseData"]["message"] == "Invalid input data."
    assert list(body["responseData"]["data"]) == ["body"]
    malformed: list[Any] = [
        {"action": "add_contact", "command_id": "x", "data": {"name": "Not an array"}},
        [],
        ["not an object"],
        [*adds(2), {"action": "merge_contact", "command_id": "m", "data": {}}],
        [*adds(2), {"action": "add_contact", "data": {"name": "No command id"}}],
        [*adds(2), {"action": "add_contact", "command_id": "cmd-0", "data": {"name": "Repeated id"}}],
        [*adds(2), {"action": "add_contact", "command_id": "d", "data": "not an object"}],
    ]
    for commands in malformed:
        status, body, _ = await ct.bulk(commands)
        assert status == 406, commands
    status, body, _ = await ct.call("POST", BULK, raw=b"[{not json")
    assert status == 400
    assert ct.sim.company.contacts == {}
    assert all(e.effect is None and e.items is None for e in ct.bulk_entries())


async def test_a_partial_failure_applies_the_valid_commands_only(ct: CloudTalk) -> None:
    existing = ct.sim.create_contact({"name": "Existing"})
    gone = ct.sim.create_contact({"name": "To delete"})
    commands = [
        {"action": "add_contact", "command_id": "ok-add", "data": {"name": "Valid"}},
        {"action": "add_contact", "command_id": "no-name", "data": {"company": "Nameless"}},
        {"action": "edit_contact", "command_id": "ok-edit", "data": {"id": existing.id, "city": "Žilina"}},
        {"action": "edit_contact", "command_id": "bad-zip", "data": {"id": existing.id, "zip": "1" * 16}},
        {"action": "edit_contact", "command_id": "unknown", "data": {"id": 999, "city": "Nowhere"}},
        {"action": "delete_contact", "command_id": "ok-delete", "data": {"id": gone.id}},
        {"action": "add_note", "command_id": "ok-note", "data": {"contact_id": existing.id, "note": "Called back"}},
        {"action": "add_note", "command_id": "empty-note", "data": {"contact_id": existing.id, "note": ""}},
        {"action": "add_activity", "command_id": "ok-act", "data": {"contact_id": existing.id, "name": "Demo"}},
        {"action": "add_activity", "command_id": "no-contact", "data": {"name": "Orphan"}},
    ]
    status, body, _ = await ct.bulk(commands)
    assert status == 200
    results = {r["command_id"]: r for r in body["responseData"]["data"]}
    assert [r["command_id"] for r in body["responseData"]["data"]] == [c["command_id"] for c in commands]
    assert {k: r["status"] for k, r in results.items()} == {
        "ok-add": 201,
        "no-name": 406,
        "ok-edit": 200,
        "bad-zip": 406,
        "unknown": 404,
        "ok-delete": 200,
        "ok-note": 201,
        "empty-note": 406,
        "ok-act": 201,
        "no-contact": 406,
    }
    # the failed ones answer like the single endpoints do
    assert results["no-name"] == {
        "command_id": "no-name",
        "status": 406,
        "message": "Invalid input data.",
        "data": {"name": ["This field is required."]},
    }
    assert list(results["bad-zip"]["data"]) == ["zip"]
    assert results["unknown"] == {"command_id": "unknown", "status": 404, "message": "Not found."}
    assert list(results["no-contact"]["data"]) == ["contact_id"]

    contacts = ct.sim.company.contacts
    assert sorted(c.name for c in contacts.values()) == ["Existing", "Valid"]
    assert contacts[existing.id].city == "Žilina" and contacts[existing.id].zip == ""
    assert [n.note for n in ct.sim.company.contact_notes.values()] == ["Called back"]
    assert [a.name for a in ct.sim.company.activities.values()] == ["Demo"]
    (entry,) = ct.bulk_entries()
    assert entry.effect == "bulk.contacts applied=5 commands=10"
    applied = {i["command_id"]: i["effect"] for i in entry.items if i["effect"]}
    assert applied == {
        "ok-add": f"contact.add {results['ok-add']['data']['id']}",
        "ok-edit": f"contact.edit {existing.id}",
        "ok-delete": f"contact.delete {gone.id}",
        "ok-note": f"note.add {results['ok-note']['data']['id']} contact={existing.id}",
        "ok-act": f"activity.add {results['ok-act']['data']['id']} contact={existing.id}",
    }


async def test_notes_and_activities_can_be_edited_and_deleted_in_bulk(ct: CloudTalk) -> None:
    contact = ct.sim.create_contact({"name": "Noted"})
    status, body, _ = await ct.bulk(
        [
            {"action": "add_note", "command_id": 1, "data": {"contact_id": contact.id, "note": "First"}},
            {
                "action": "add_activity",
                "command_id": 2,
                "data": {"contact_id": contact.id, "name": "Call", "activity_date": "2025-03-21 10:00:00"},
            },
        ]
    )
    note_id, activity_id = (int(r["data"]["id"]) for r in body["responseData"]["data"])
    status, body, _ = await ct.bulk(
        [
            {"action": "edit_note", "command_id": 3, "data": {"id": note_id, "note": "Second", "user_id": AGENT_ID}},
            {"action": "edit_note", "command_id": 4, "data": {"id": note_id, "user_id": 1}},
            {"action": "edit_activity", "command_id": 5, "data": {"id": activity_id, "activity_date": "soon"}},
            {"action": "edit_activity", "command_id": 6, "data": {"id": activity_id, "description": "Demo call"}},
        ]
    )
    assert [(r["command_id"], r["status"]) for r in body["responseData"]["data"]] == [
        (3, 200),
        (4, 406),
        (5, 406),
        (6, 200),
    ]
    note = ct.sim.company.contact_notes[note_id]
    assert (note.note, note.user_id) == ("Second", AGENT_ID)
    activity = ct.sim.company.activities[activity_id].public()
    assert activity["description"] == "Demo call" and activity["activity_date"] == "2025-03-21T10:00:00.000Z"

    status, body, _ = await ct.bulk(
        [
            {"action": "delete_note", "command_id": 7, "data": {"id": note_id}},
            {"action": "delete_note", "command_id": 8, "data": {"id": note_id}},
            {"action": "delete_activity", "command_id": 9, "data": {"id": activity_id}},
        ]
    )
    assert [r["status"] for r in body["responseData"]["data"]] == [200, 404, 200]
    assert ct.sim.company.contact_notes == {} and ct.sim.company.activities == {}
    assert [i["effect"] for i in ct.bulk_entries()[-1].items] == [
        f"note.delete {note_id}",
        None,
        f"activity.delete {activity_id}",
    ]


async def test_per_command_charging_refuses_the_61st_command_within_a_minute(ct: CloudTalk) -> None:
    ct.sim.update_settings({"rate_limit": 60, "window_seconds": 60.0})
    ct.sim.window.reset()
    remaining = []
    for batch in range(6):
        status, _, headers = await ct.bulk(adds(10, f"b{batch}"))
        assert status == 200
        remaining.append(int(headers["X-CloudTalkAPI-Remaining"]))
    assert remaining == [50, 40, 30, 20, 10, 0]
    status, body, headers = await ct.bulk(adds(1, "late"))
    assert status == 429 and body == {"responseData": {"status": 429, "message": "Too Many Requests"}}
    assert headers["X-CloudTalkAPI-Remaining"] == "0"
    assert len(ct.sim.company.contacts) == 60


async def test_a_bulk_the_window_cannot_take_whole_is_refused_and_takes_nothing(ct: CloudTalk) -> None:
    ct.sim.update_settings({"rate_limit": 15, "window_seconds": 60.0})
    ct.sim.window.reset()
    assert (await ct.bulk(adds(10, "first")))[0] == 200
    status, _, headers = await ct.bulk(adds(10, "second"))
    assert status == 429 and headers["X-CloudTalkAPI-Remaining"] == "5"
    assert len(ct.sim.company.contacts) == 10
    status, _, headers = await ct.bulk(adds(5, "third"))  # the refused request took nothing
    assert status == 200 and headers["X-CloudTalkAPI-Remaining"] == "0"
    assert ct.bulk_entries()[1].items is None


async def test_per_request_charging_fits_ten_bulks_of_ten(ct: CloudTalk) -> None:
    ct.sim.update_settings({"rate_limit": 60, "window_seconds": 60.0, "bulk_counts_per_item": False})
    ct.sim.window.reset()
    for batch in range(10):
        status, _, headers = await ct.bulk(adds(10, f"b{batch}"))
        assert status == 200
    assert headers["X-CloudTalkAPI-Remaining"] == "50"
    assert len(ct.sim.company.contacts) == 100


async def test_request_faults_hit_the_bulk_route_and_change_nothing(ct: CloudTalk) -> None:
    ct.sim.faults.add(match="POST /api/bulk/contacts", kind="status", status=503, times=1)
    status, body, _ = await ct.bulk(adds(3))
    assert (status, body) == (503, {"responseData": {"status": 503, "message": "Service unavailable."}})
    ct.sim.faults.add(match="POST /api/bulk/contacts", kind="reset", times=1)
    with pytest.raises(aiohttp.ClientError):
        await ct.bulk(adds(3))
    ct.sim.faults.add(match="POST /api/bulk/contacts", kind="timeout", latency_ms=300, times=1)
    with pytest.raises((aiohttp.ClientError, asyncio.TimeoutError)):
        await ct.bulk(adds(3))
    assert ct.sim.company.contacts == {}
    assert [(e.status, e.fault) for e in ct.bulk_entries()] == [(503, "status"), (-1, "reset"), (-1, "timeout")]

    # latency: the commands are applied, only later
    ct.sim.faults.add(match="POST /api/bulk/contacts", kind="latency", latency_ms=200, times=1)
    started = time.monotonic()
    status, _, _ = await ct.bulk(adds(3))
    assert status == 200 and time.monotonic() - started >= 0.2
    assert len(ct.sim.company.contacts) == 3


async def test_item_faults_fail_chosen_commands_while_the_others_are_applied(ct: CloudTalk) -> None:
    async with ct.session.post(
        ct.sim.root_url + "/_sim/faults",
        json={"match": "POST /api/bulk", "kind": "item", "status": 500, "script": [False, True, False, True]},
    ) as resp:
        assert resp.status == 201
    status, body, _ = await ct.bulk(adds(6))
    assert status == 200
    results = body["responseData"]["data"]
    assert [r["status"] for r in results] == [201, 500, 201, 500, 201, 201]
    assert results[1] == {"command_id": "cmd-1", "status": 500, "message": "Something went wrong."}
    assert sorted(c.name for c in ct.sim.company.contacts.values()) == [f"Bulk cmd {i}" for i in (0, 2, 4, 5)]
    (entry,) = ct.bulk_entries()
    assert entry.fault is None and entry.effect == "bulk.contacts applied=4 commands=6"
    assert [(i["fault"], i["effect"] is None) for i in entry.items] == [
        (None, False),
        ("item", True),
        (None, False),
        ("item", True),
        (None, False),
        (None, False),
    ]
    # item rules never fail whole requests, and a fraction fails about that share of the commands
    ct.sim.faults.clear()
    ct.sim.faults.add(match="POST /api/bulk", kind="item", status=500, probability=0.5)
    statuses = []
    for batch in range(10):
        _, body, _ = await ct.bulk(adds(10, f"p{batch}"))
        statuses += [r["status"] for r in body["responseData"]["data"]]
    assert 25 <= statuses.count(500) <= 75 and statuses.count(201) == 100 - statuses.count(500)
    status, _, _ = await ct.call("GET", "/contacts/index.json")
    assert status == 200


async def test_the_contacts_index_pages_up_to_1000_per_request(ct: CloudTalk) -> None:
    ct.sim.seed({"contacts": [{"name": f"Contact {i:04d}"} for i in range(2500)]})
    names: list[str] = []
    for page in (1, 2, 3):
        status, body, _ = await ct.call("GET", "/contacts/index.json", params={"limit": 1000, "page": page})
        assert status == 200
        data = body["responseData"]
        assert (data["itemsCount"], data["pageCount"], data["pageNumber"], data["limit"]) == (2500, 3, page, 1000)
        names += [item["Contact"]["name"] for item in data["data"]]
    assert names == [f"Contact {i:04d}" for i in range(2500)]
    index_requests = [e for e in ct.sim.log.entries if e.path == "/api/contacts/index.json"]
    assert len(index_requests) == 3
    status, body, _ = await ct.call("GET", "/contacts/index.json", params={"limit": 1001})
    assert status == 406 and list(body["responseData"]["data"]) == ["limit"]


# --------------------------------------------------------------------------------------------
# Kustomer bulk notes
# --------------------------------------------------------------------------------------------


class Kustomer:
    def __init__(self, sim: KustomerSim, base: str, session: aiohttp.ClientSession) -> None:
        self.sim, self.base, self.session = sim, base, session

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": "Bearer k", "Accept": "application/json"}
        async with self.session.request(method, self.base + path, json=body, headers=headers) as resp:
            text = await resp.read()
            return resp.status, (orjson.loads(text) if text else None)

    async def conversation(self, phone: str) -> str:
        status, customer = await self.call("POST", "/v1/customers", {"name": phone, "phones": [{"phone": phone}]})
        assert status in (200, 201), customer
        status, conv = await self.call("POST", "/v1/conversations", {"customer": customer["data"]["id"]})
        assert status in (200, 201), conv
        return conv["data"]["id"]

    async def notes_of(self, conversation: str) -> list[dict[str, Any]]:
        status, page = await self.call("GET", f"/v1/conversations/{conversation}/notes")
        assert status == 200
        return page["data"]

    def bulk_entries(self) -> list[Any]:
        return [e for e in self.sim.log.entries if e.path == "/v1/notes/bulk"]


@pytest.fixture
async def kst() -> AsyncIterator[Kustomer]:
    settings = KustomerSimSettings(bulk_delay_s=0.3)
    async with running_kustomer_sim(settings, keys={"k": ALL_ROLES}) as (sim, base), aiohttp.ClientSession() as s:
        yield Kustomer(sim, base, s)


async def test_bulk_notes_appear_after_the_async_delay_with_their_client_ref(kst: Kustomer) -> None:
    first, second = await kst.conversation("+421905123456"), await kst.conversation("+421905654321")
    items = [
        {"conversation": first, "body": "Call 1", "_clientRef": "call-1"},
        {"conversation": second, "body": "Call 2", "_clientRef": "call-2"},
        {"conversation": first, "body": "Call 3"},
    ]
    accepted_at = time.monotonic()
    status, body = await kst.call("POST", "/v1/notes/bulk", items)
    assert status == 202
    job = body["data"]
    assert job["type"] == "bulk" and job["attributes"]["status"] == "queued" and job["attributes"]["count"] == 3
    assert await kst.notes_of(first) == [], "nothing exists yet: the bulk is asynchronous"

    assert await kst.sim.wait_bulk(5.0)
    assert time.monotonic() - accepted_at >= 0.3
    notes = await kst.notes_of(first)
    assert [(n["attributes"]["body"], n["attributes"].get("_clientRef")) for n in notes] == [
        ("Call 1", "call-1"),
        ("Call 3", None),
    ]
    (other,) = await kst.notes_of(second)
    assert other["attributes"]["_clientRef"] == "call-2"
    assert other["relationships"]["conversation"]["data"]["id"] == second

    (entry,) = kst.bulk_entries()
    assert entry.status == 202 and entry.effect == f"notes.bulk {job['id']} items=3"
    assert [(i["_clientRef"], i["status"]) for i in entry.items] == [("call-1", 201), ("call-2", 201), (None, 201)]
    by_ref = {i["_clientRef"]: i["effect"] for i in entry.items}
    assert by_ref["call-2"] == f"note.create {other['id']} conversation={second}"
    assert len(kst.sim.notes) == 3


async def test_bulk_notes_count_per_item_against_the_customer_note_window(kst: Kustomer) -> None:
    kst.sim.settings.per_customer_limit = 5
    kst.sim.note_windows.limit = 5
    conv = await kst.conversation("+421905123456")
    status, _ = await kst.call("POST", "/v1/notes/bulk", [{"conversation": conv, "body": f"n{i}"} for i in range(4)])
    assert status == 202
    status, body = await kst.call("POST", "/v1/notes/bulk", [{"conversation": conv, "body": f"m{i}"} for i in range(2)])
    assert status == 429 and body["errors"][0]["code"] == "too_many_requests"
    status, _ = await kst.call("POST", "/v1/notes", {"conversation": conv, "body": "the fifth"})
    assert status == 201
    status, _ = await kst.call("POST", "/v1/notes", {"conversation": conv, "body": "the sixth"})
    assert status == 429
    assert await kst.sim.wait_bulk(5.0)
    assert sorted(n["body"] for n in kst.sim.notes.values()) == ["n0", "n1", "n2", "n3", "the fifth"]
    assert [e.status for e in kst.bulk_entries()] == [202, 429]


async def test_invalid_bulk_notes_are_refused_whole_and_item_faults_fail_single_notes(kst: Kustomer) -> None:
    conv = await kst.conversation("+421905123456")
    for items, pointer in (
        ({"conversation": conv, "body": "not an array"}, "/data"),
        ([], "/data"),
        ([{"conversation": conv, "body": "ok"}, {"conversation": conv, "body": ""}], "/data/1/attributes/body"),
        ([{"conversation": "000000000000000000000000", "body": "x"}], "/data/0/attributes/conversation"),
        ([{"conversation": conv, "body": "x", "_clientRef": 7}], "/data/0/_clientRef"),
        ([{"conversation": conv, "body": "x"}] * 101, "/data"),
    ):
        status, body = await kst.call("POST", "/v1/notes/bulk", items)
        assert status == 400 and body["errors"][0]["source"]["pointer"] == pointer, items
    assert kst.sim.bulk_jobs == {}

    kst.sim.faults.add(match="POST /v1/notes/bulk", kind="item", status=500, script=[False, True, False])
    items = [{"conversation": conv, "body": f"b{i}", "_clientRef": f"r{i}"} for i in range(3)]
    status, _ = await kst.call("POST", "/v1/notes/bulk", items)
    assert status == 202
    assert await kst.sim.wait_bulk(5.0)
    assert [n["attributes"]["_clientRef"] for n in await kst.notes_of(conv)] == ["r0", "r2"]
    entry = kst.bulk_entries()[-1]
    assert [(i["status"], i["fault"]) for i in entry.items] == [(201, None), (500, "item"), (201, None)]

    kst.sim.faults.add(match="POST /v1/notes/bulk", kind="status", status=503, times=1)
    status, _ = await kst.call("POST", "/v1/notes/bulk", items)
    assert status == 503
    assert await kst.sim.wait_bulk(5.0) and len(kst.sim.notes) == 2
