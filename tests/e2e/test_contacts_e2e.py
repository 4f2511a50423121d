"""Contacts both ways through the whole pipeline (reference 1.3–1.6, 1.9): import, merge, export,
no ping-pong, out-of-order versions, kill -9 mid-merge, replay. Every test counts the writes in
the simulators' request logs."""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import aiohttp
import orjson
import pytest

from pipeline.ingest.kustomer import kustomer_envelope
from pipeline.kafka.clients import durable_producer
from pipeline.kafka.lag import group_lag
from pipeline.kafka.reading import read_topic
from tests.e2e.conftest import SECRETS, Flow, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]
CONTACT_SERVICES = ("ingest", "process-contacts-import", "process-contacts-export", "sink-cloudtalk", "sink-kustomer")

JANA = {  # reference 4.4
    "name": "Jana Nováková",
    "emails": [{"type": "work", "email": "jana@example.org"}],
    "sharedEmails": [{"type": "work", "email": "info@acme.example.sk"}],
    "phones": [{"type": "mobile", "phone": "+421905123456"}, {"type": "work", "phone": "+447700900123"}],
    "sharedPhones": [{"type": "work", "phone": "+421232123456"}],
    "whatsapps": [{"type": "mobile", "phone": "whatsapp:+421905123456"}],
    "urls": [{"type": "website", "url": "https://acme.example.sk"}],
    "locations": [
        {"type": "home", "address": "Obchodná 5, 81106 Bratislava"},
        {
            "type": "work",
            "name": "Office",
            "address1": "Hlavná 12",
            "address2": "3rd floor",
            "cityName": "Bratislava",
            "regionName": "Bratislavský kraj",
            "zipCode": "81101",
            "countryName": "Slovakia",
            "countryCode": "SK",
        },
    ],
}


async def idle(flow: Flow, timeout: float = 90) -> None:
    groups = {
        "process-contacts-import": flow.topics.raw_customers,
        "process-contacts-export": flow.topics.raw_contacts,
        "sink-cloudtalk": flow.topics.cloudtalk_commands,
        "sink-kustomer": flow.topics.kustomer_commands,
    }

    async def quiet() -> bool:
        for group, topic in groups.items():
            if group not in flow.stack.services:
                continue
            if sum((await group_lag(flow.bootstrap, f"{flow.topics.prefix}{group}", [topic])).values()):
                return False
        deliveries = [d for d in flow.ksim.deliveries if d.status == "pending"]
        ct = await flow._sim("GET", f"{flow.ct_root}/_sim/deliveries?status=pending")
        return not deliveries and not ct.get("deliveries")

    await asyncio.sleep(1.0)
    await wait_for(quiet, timeout, "the contact flows to be idle")
    await asyncio.sleep(1.0)
    await wait_for(quiet, timeout, "the contact flows to stay idle")


async def contacts(flow: Flow) -> list[dict[str, Any]]:
    return [
        c["Contact"] | {"links": [u["url"] for u in c.get("ExternalUrl") or []]}
        for c in (await flow.ct_state())["contacts"]
    ]


def numbers(contact: dict[str, Any]) -> set[str]:
    return {n if str(n).startswith("+") else f"+{n}" for n in contact["contact_numbers"]}


async def audit_rules(flow: Flow, stage: str) -> list[tuple[str, str]]:
    out = []
    for r in await read_topic(flow.bootstrap, flow.topics.audit):
        a = orjson.loads(r.value)
        if a["stage"] == stage:
            out += [(d["decision"], d.get("rule", "")) for d in a["decisions"]]
    return out


async def seed_people(flow: Flow) -> dict[str, str]:
    """A Kustomer company and user; a CloudTalk agent with the user's e-mail."""
    k = await flow._sim(
        "POST",
        f"{flow.k_url}/_sim/seed",
        {"companies": [{"name": "Acme s.r.o."}], "users": [{"name": "Eva", "email": "eva@example.com"}]},
    )
    await flow._sim(
        "POST",
        f"{flow.ct_root}/_sim/seed",
        {"agents": [{"id": 493933, "firstname": "Eva", "lastname": "Agent", "email": "eva@example.com"}]},
    )
    auth = aiohttp.encode_basic_auth(SECRETS["E2E_CT_ID"], SECRETS["E2E_CT_SECRET"])
    async with flow.http.get(f"{flow.ct_root}/api/countries/index.json", headers={"Authorization": auth}) as r:
        countries = [item["Country"] for item in (await r.json())["responseData"]]
    sk = next((c for c in countries if c.get("country_code") == "SK"), None)
    return {"company": k["companies"][0], "user": k["users"][0], "sk": str(sk["id"]) if sk else ""}


@pytest.mark.services(*CONTACT_SERVICES)
async def test_import_maps_every_field_merges_by_phone_and_name_and_skips_by_rule(flow: Flow):
    ids = await seed_people(flow)
    await flow.person_creates_customer(user=ids["user"], company=ids["company"], **JANA)
    await flow.person_creates_customer(name="No Phone", emails=[{"email": "nophone@example.org"}])
    await flow.person_creates_customer(
        name="Shared Only", sharedPhones=[{"phone": "+421905000111"}], whatsapps=[{"phone": "whatsapp:+421905000222"}]
    )
    await flow.person_creates_customer(
        name="John Jones", phones=[{"phone": "+421905111111"}, {"phone": "+421905222222"}]
    )
    await asyncio.sleep(1.5)  # "John J" is the newer customer
    # the same number in another notation: Kustomer keeps both customers; CloudTalk gets one contact
    await flow.person_creates_customer(
        name="John J",
        phones=[{"phone": "+421 905 222 222"}, {"phone": "+421905333333"}],
        emails=[{"email": "jj@example.org"}],
    )
    await flow.person_creates_customer(name="Ann Lee", phones=[{"phone": "+420601111111"}])
    await wait_for(lambda: sum(1 for e in flow.ct_writes() if e.startswith("contact.add")) >= 3, 90, "3 contacts")
    # the same name, written differently, by a newer customer: merged, named after it
    await flow.person_creates_customer(name="Ann  lee", phones=[{"phone": "+420602222222"}])
    await idle(flow)

    by_name = {c["name"]: c for c in await contacts(flow)}
    assert sorted(by_name) == ["Ann  lee", "Jana Nováková", "John J"], by_name.keys()
    jana = by_name["Jana Nováková"]
    assert numbers(jana) == {"+421905123456"}, "shared, WhatsApp and invalid numbers are never copied"
    assert jana["contact_emails"] == ["jana@example.org"]
    assert jana["company"] == "Acme s.r.o." and jana["website"] == "https://acme.example.sk"
    assert (jana["address"], jana["city"], jana["zip"], jana["state"]) == (
        "Hlavná 12 3rd floor",
        "Bratislava",
        "81101",
        "Bratislavský kraj",
    )
    assert str(jana["country_id"]) == ids["sk"] and ids["sk"]
    assert str(jana["favorite_agent"]) == "493933", "the Created-by user's e-mail picks the agent"
    assert [t["name"] for t in jana["tags"]] == ["kustomer-support"]
    assert len(jana["links"]) == 1 and "/app/customers/" in jana["links"][0]
    john = by_name["John J"]
    assert numbers(john) == {"+421905111111", "+421905222222", "+421905333333"}, "union of numbers, newest name"
    assert len(john["links"]) == 2
    assert numbers(by_name["Ann  lee"]) == {"+420601111111", "+420602222222"}, "merged by name"
    adds = [e for e in flow.ct_writes() if e.startswith("contact.add")]
    assert len(adds) == 3, adds
    rules = await audit_rules(flow, "process-contacts-import")
    assert rules.count(("dropped", "no_phone")) == 2
    # no ping-pong: the contacts the pipeline wrote came back as CloudTalk events and were not exported
    export = await audit_rules(flow, "process-contacts-export")
    assert export and all(r == ("dropped", "imported_from_kustomer") for r in export), export
    assert flow.k_writes() == [], "nothing was written into Kustomer"


@pytest.mark.services(*CONTACT_SERVICES)
async def test_export_rule_4_no_ping_pong_and_person_edits_sync_both_ways(flow: Flow):
    await flow._sim(
        "POST", f"{flow.k_url}/_sim/seed", {"customers": [{"name": "Existing", "phones": [{"phone": "+421907777777"}]}]}
    )
    c1 = await flow.person_creates_contact(
        {
            "name": "Peter Horváth",
            "ContactNumber": [{"public_number": "+421911222333"}],
            "ContactEmail": [{"email": "peter.horvath@example.net"}],
        }
    )
    await flow.person_creates_contact({"name": "Taken", "ContactNumber": [{"public_number": "+421907777777"}]})
    await flow.person_creates_contact({"name": "Bad Number", "ContactNumber": [{"public_number": "+447700900123"}]})
    await wait_for(lambda: any(e.startswith("customer.create") for e in flow.k_writes()), 90, "the exported customer")
    await idle(flow)

    customers = {
        c["attributes"]["externalId"]: c for c in [flow.ksim.customer_resource(x) for x in flow.ksim.customers.values()]
    }
    k = customers[c1]["attributes"]
    assert k["name"] == "Peter Horváth"
    assert [(p["type"], p["phone"]) for p in k["phones"]] == [("work", "+421911222333")]
    assert [(e["type"], e["email"]) for e in k["emails"]] == [("work", "peter.horvath@example.net")]
    assert len(flow.ksim.customers) == 2, "Taken (phone exists) and Bad Number (invalid) were not exported"
    sink = await audit_rules(flow, "sink-kustomer")
    assert ("skipped", "skipped:phone_exists") in sink
    assert ("dropped", "invalid_phone") in await audit_rules(flow, "process-contacts-export")
    # the customer the pipeline wrote came back as a Kustomer webhook: not imported again
    assert ("skipped", "skipped:own_write") in await audit_rules(flow, "sink-cloudtalk")
    assert flow.ct_writes() == [], "nothing was written into CloudTalk"
    k_writes = len(flow.k_writes())

    # a person renames the customer in Kustomer: the contact follows; its echo changes nothing
    kid = customers[c1]["id"]
    await flow.person_edits_customer(kid, name="Peter H.")
    await wait_for(lambda: any(e.startswith("contact.edit") for e in flow.ct_writes()), 60, "the contact edit")
    await idle(flow)
    contact = next(c for c in await contacts(flow) if str(c["id"]) == c1)
    assert contact["name"] == "Peter H." and numbers(contact) == {"+421911222333"}
    assert len(flow.k_writes()) == k_writes, "the contact edit did not come back as a Kustomer write"

    # a person adds a number in CloudTalk: the customer gets it; its echo changes nothing
    await flow.person_edits_contact(
        c1, {"ContactNumber": [{"public_number": "+421911222333"}, {"public_number": "+421911444555"}]}
    )
    await wait_for(lambda: len(flow.k_writes()) > k_writes, 60, "the customer update")
    await idle(flow)
    phones = [p["phone"] for p in flow.ksim.customer_resource(flow.ksim.customers[kid])["attributes"]["phones"]]
    assert phones == ["+421911222333", "+421911444555"]
    assert len(flow.k_writes()) == k_writes + 1
    assert sum(1 for e in flow.ct_writes() if e.startswith("contact.")) == 1, "one CloudTalk write in all"


@pytest.mark.services("process-contacts-import", "sink-cloudtalk")
async def test_an_older_version_never_overwrites_a_newer_one(flow: Flow):
    base = {
        "type": "customer",
        "id": "65f1c0a2e4b0a1b2c3d4e5f6",
        "relationships": {"modifiedBy": {"data": {"type": "user", "id": "60aa11bb22cc33dd44ee55ff"}}},
    }

    def event(rev: int, name: str, updated: str, kind: str = "update") -> bytes:
        data = {
            **base,
            "attributes": {"name": name, "phones": [{"phone": "+421905123456"}], "rev": rev, "updatedAt": updated},
        }
        env = kustomer_envelope(
            {"id": f"ev{rev}", "name": f"kustomer.customer.{kind}", "createdAt": updated, "data": data},
            "support",
            "webhook",
        )
        return env.to_json()

    producer = durable_producer(flow.bootstrap, "e2e-test")
    await producer.start()
    try:
        # the update arrives before the create; an old update arrives after a newer one
        for payload in (
            event(2, "Jana v2", "2026-03-02T10:00:00.000Z"),
            event(1, "Jana v1", "2026-03-01T10:00:00.000Z", "create"),
            event(4, "Jana v4", "2026-03-04T10:00:00.000Z"),
            event(3, "Jana v3", "2026-03-03T10:00:00.000Z"),
        ):
            await producer.send_and_wait(flow.topics.raw_customers, payload, key=b"jana")
    finally:
        await producer.stop()
    await wait_for(lambda: len([e for e in flow.ct_writes() if e.startswith("contact.")]) >= 2, 60, "two writes")
    await idle(flow)
    (contact,) = await contacts(flow)
    assert contact["name"] == "Jana v4"
    assert [e.split()[0] for e in flow.ct_writes()] == ["contact.add", "contact.edit"], flow.ct_writes()
    rules = await audit_rules(flow, "sink-cloudtalk")
    assert rules.count(("skipped", "skipped:stale_version")) == 2


@pytest.mark.services("ingest", "process-contacts-import", "sink-cloudtalk")
async def test_cloudtalk_sink_killed_in_the_middle_of_a_merge_leaves_one_right_contact(flow: Flow):
    await flow.person_creates_customer(name="John Jones", phones=[{"phone": "+421905111111"}])
    await wait_for(lambda: any(e.startswith("contact.add") for e in flow.ct_writes()), 60, "the first contact")
    await idle(flow)
    # the merge edit hangs at CloudTalk; the sink is killed while it waits
    flow.csim.faults.add(match=r"POST /api/contacts/edit/", kind="latency", latency_ms=4000, times=1)
    await flow.person_creates_customer(name="John J", phones=[{"phone": "00421905111111"}, {"phone": "+421905999999"}])
    await wait_for(
        lambda: (
            any(e.path.startswith("/api/contacts/edit/") for e in flow.csim.log.entries)
            or any(r.fired for r in flow.csim.faults.rules)
        ),
        60,
        "the merge edit to start",
    )
    await asyncio.sleep(0.5)
    flow.stack.kill("sink-cloudtalk", signal.SIGKILL)
    flow.stack.start("sink-cloudtalk")
    await wait_for(lambda: sum(1 for e in flow.ct_writes() if e.startswith("contact.edit")) >= 1, 90, "the merge")
    await idle(flow)
    (contact,) = await contacts(flow)
    assert contact["name"] == "John J" and numbers(contact) == {"+421905111111", "+421905999999"}
    assert sum(1 for e in flow.ct_writes() if e.startswith("contact.add")) == 1, "one contact, never a second"


@pytest.mark.services(*CONTACT_SERVICES)
async def test_replaying_the_raw_topics_from_the_start_changes_nothing_at_either_side(flow: Flow):
    await flow.person_creates_customer(name="Jana", phones=[{"phone": "+421905123456"}])
    await flow.person_creates_contact({"name": "Peter", "ContactNumber": [{"public_number": "+421911222333"}]})
    await wait_for(lambda: flow.ct_writes() and flow.k_writes(), 90, "one write each way")
    await idle(flow)
    ct_before, k_before = list(flow.ct_writes()), list(flow.k_writes())
    for topic in ("customers", "contacts"):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pipeline",
            "replay",
            "raw",
            "--topic",
            topic,
            "--from",
            "2000-01-01T00:00:00Z",
            "--to",
            "2100-01-01T00:00:00Z",
            env=flow.stack.base_env | {"PATH": "/usr/bin:/bin"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert "replayed" in out.decode()
    await idle(flow)
    assert flow.ct_writes() == ct_before and flow.k_writes() == k_before, "a replay is a no-op at the targets"
