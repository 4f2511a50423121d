"""The CloudTalk sink's bulk writes against the CloudTalk simulator, over HTTP: a bulk request's
commands settle one by one (added, refused, failed on their own), and a bulk request read as one
operation per command never overdraws the company's window — it waits for the reset instead of
being refused as a whole. Requests and effects are counted in the simulator's log."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from devkit.sim.cloudtalk import CloudTalkSimSettings, running_cloudtalk_sim
from pipeline.clients.cloudtalk import CloudTalkClient
from pipeline.clients.http import DeferredError, RejectedError, RetryPolicy
from pipeline.sink.base import Done, Write
from pipeline.sink.cloudtalk import CloudTalkEffects
from pipeline.sink.ledger import PARKED, LedgerEntry


def upsert(n: int, name: str | None = None, phone: str | None = None) -> dict[str, Any]:
    return {
        "command_id": f"cmd-{n}",
        "type": "cloudtalk.upsert_contact",
        "integration": "support",
        "event_id": f"event-{n}",
        "occurred_at": "2026-03-01T10:00:00.000Z",
        "priority": "bulk",
        "customer_id": f"{n:024x}",
        "version": {"rev": 1, "updated_at": "2026-03-01T10:00:00.000Z"},
        "merge_key": "phone",
        "contact": {
            "name": name if name is not None else f"Person {n}",
            "phones": [phone or f"+4219051{n:05d}"],
            "emails": [],
            "external_url": {"name": "Kustomer", "url": f"https://acme.kustomerapp.com/app/customers/{n:024x}"},
        },
    }


class NoKustomer:
    async def own_user_id(self) -> str | None:
        return None


def bulk_log(sim: Any) -> list[Any]:
    return [e for e in sim.log.entries if e.path == "/api/bulk/contacts.json"]


async def prepared(effects: CloudTalkEffects, commands: list[dict[str, Any]]) -> list[Write]:
    writes = []
    for c in commands:
        w = await effects.prepare(c, None, {})
        assert isinstance(w, Write), w
        writes.append(w)
    return writes


async def test_each_command_of_a_bulk_answer_settles_on_its_own() -> None:
    settings = CloudTalkSimSettings(key_id="id", key_secret="secret")
    async with running_cloudtalk_sim(settings) as (sim, api), aiohttp.ClientSession() as http:
        ct = CloudTalkClient.from_credentials(http, api, "id", "secret", policy=RetryPolicy(initial_s=0.01))
        effects = CloudTalkEffects(ct, {"support": NoKustomer()})  # type: ignore[dict-item]
        commands = [upsert(1), upsert(2, name="x" * 151), upsert(3), upsert(4)]  # a name over 150: refused
        writes = await prepared(effects, commands)
        assert [w.item["action"] for w in writes] == ["add_contact"] * 4
        assert [w.item["command_id"] for w in writes] == ["cmd-1", "cmd-2", "cmd-3", "cmd-4"], "ledger ids"
        sim.faults.add(match="POST /api/bulk", kind="item", status=500, script=[False, False, True, False])
        results = await effects.write(writes)

        assert len(bulk_log(sim)) == 1, "four commands, one request"
        done, refused, failed, done_too = results
        assert isinstance(done, Done) and done.outcome == "created" and done.steps["bulk"] == 4
        assert isinstance(refused, RejectedError) and refused.status == 406 and "name" in str(refused)
        assert isinstance(failed, DeferredError) and failed.unsettled, "an add that failed is looked up first"
        assert isinstance(done_too, Done)
        effects_logged = [i["effect"] for i in bulk_log(sim)[0].items if i.get("effect")]
        assert len(effects_logged) == 2 and all(e.startswith("contact.add") for e in effects_logged)
        assert {done.steps["contact_id"], done_too.steps["contact_id"]} == {e.split()[1] for e in effects_logged}


async def test_an_edit_in_bulk_of_a_contact_deleted_meanwhile_is_refused_alone() -> None:
    settings = CloudTalkSimSettings(key_id="id", key_secret="secret")
    async with running_cloudtalk_sim(settings) as (sim, api), aiohttp.ClientSession() as http:
        ct = CloudTalkClient.from_credentials(http, api, "id", "secret", policy=RetryPolicy(initial_s=0.01))
        effects = CloudTalkEffects(ct, {"support": NoKustomer()}, index=None)  # type: ignore[dict-item]
        first = await effects.write(await prepared(effects, [upsert(1), upsert(2)]))
        assert all(isinstance(r, Done) for r in first)
        ids = [r.steps["contact_id"] for r in first if isinstance(r, Done)]
        index = {k: v for r in first if isinstance(r, Done) for k, v in r.index.items()}
        newer = [upsert(1, name="Renamed One"), upsert(2, name="Renamed Two")]
        for c in newer:
            c["version"] = {"rev": 2, "updated_at": "2026-03-02T10:00:00.000Z"}
        writes = []
        for c in newer:
            w = await effects.prepare(c, None, index)
            assert isinstance(w, Write) and w.item["action"] == "edit_contact"
            writes.append(w)
        assert await ct.delete_contact(ids[0])
        results = await effects.write(writes)
        gone, renamed = results
        assert isinstance(gone, RejectedError) and gone.status == 404
        assert isinstance(renamed, Done) and renamed.outcome == "updated"
        assert (await ct.get_contact(ids[1]))["Contact"]["name"] == "Renamed Two"  # type: ignore[index]


async def test_a_bulk_request_counted_per_command_waits_for_the_window_instead_of_being_refused() -> None:
    settings = CloudTalkSimSettings(
        key_id="id", key_secret="secret", rate_limit=12, window_seconds=2.0, bulk_counts_per_item=True
    )
    async with running_cloudtalk_sim(settings) as (sim, api), aiohttp.ClientSession() as http:
        ct = CloudTalkClient.from_credentials(http, api, "id", "secret", policy=RetryPolicy(initial_s=0.01))
        effects = CloudTalkEffects(ct, {"support": NoKustomer()}, live_reserve=0)  # type: ignore[dict-item]
        for _ in range(5):  # the window learns what is left: 7 of 12
            await ct.list_contacts(limit=1)
        writes = await prepared(effects, [upsert(n) for n in range(10)])
        started = time.monotonic()
        results = await effects.write(writes)
        waited = time.monotonic() - started
        assert all(isinstance(r, Done) for r in results), results
        assert [e.status for e in bulk_log(sim)] == [200], "sent once, when the window could take all ten"
        assert not [e for e in sim.log.entries if e.status == 429]
        assert waited > 0.2, "it waited for the reset"


async def test_a_bulk_request_whose_answer_is_lost_is_looked_up_by_link_never_repeated() -> None:
    settings = CloudTalkSimSettings(key_id="id", key_secret="secret")
    async with running_cloudtalk_sim(settings) as (sim, api), aiohttp.ClientSession() as http:
        ct = CloudTalkClient.from_credentials(
            http, api, "id", "secret", policy=RetryPolicy(timeout_s=0.5, initial_s=0.01)
        )
        effects = CloudTalkEffects(ct, {"support": NoKustomer()}, settle_s=2.0)  # type: ignore[dict-item]
        commands = [upsert(1), upsert(2), upsert(3)]
        writes = await prepared(effects, commands)
        # CloudTalk holds the request past the client's timeout, then applies it
        sim.faults.add(match="POST /api/bulk", kind="latency", latency_ms=1500, times=1)
        results = await effects.write(writes)
        assert all(isinstance(r, DeferredError) and r.unsettled for r in results), results
        waits = [r.until - time.time() for r in results if isinstance(r, DeferredError)]
        assert all(0.5 < w <= 2.0 for w in waits), waits  # until the settle time after the request left
        await asyncio.sleep(max(waits))
        assert len(bulk_log(sim)) == 1 and len(sim.company.contacts) == 3, "the held request landed"
        # resumed as parked with `reconcile`: each finds its contact by link; nothing is added again
        parked = LedgerEntry("cmd", PARKED, reconcile=True)
        for c in commands:
            w = await effects.prepare(c, parked, {})
            assert isinstance(w, Done) and w.outcome == "reconciled", w
        assert len(sim.company.contacts) == 3 and len(bulk_log(sim)) == 1
        assert not [e for e in sim.log.entries if e.path == "/api/contacts/add.json"]
