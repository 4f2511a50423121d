"""The broker is killed during a mixed stream of SMS and contacts both ways; every flow rides it out.

Like ``test_broker_restart.py`` (calls), with its own broker, but for the other flows at once:
SMS (CloudTalk workflow → ``process sms`` → ``sink kustomer``), the contacts import (Kustomer
customer webhook → ``process contacts-import`` → ``sink cloudtalk``) and the contacts export
(CloudTalk contact workflow → ``process contacts-export`` → ``sink kustomer``) — ingest, three
processors and both sinks as separate processes. While the simulators produce an SMS every
~0.25 s and a Kustomer customer and a CloudTalk contact every ~0.75 s each, the broker is killed
with SIGKILL, left down for at least 10 s and started again on the same ports and data; nothing
restarts a service. Both simulators keep re-sending what ingest refused (503 while the broker is
away). Afterwards every webhook was answered 2xx in the end, and the simulators' state and request
logs show every SMS logged once, every customer imported once, every contact exported once —
and the echoes of the pipeline's own writes written nowhere. Printed: how long the broker was away
and, per flow, the time from its return to the first new effect.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest

from devkit.localkafka import LocalKafka
from tests.e2e.conftest import Flow, audit_rules, quiet, wait_for
from tests.e2e.own_broker import broker, kafka_bootstrap  # noqa: F401 - fixtures of this module

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]

OUTAGE_S = 12.0
RECOVERY_LIMIT_S = 30.0
SMS_NUMBERS = [f"+4479480000{n:02d}" for n in range(8)]
SERVICES = (
    "ingest",
    "process-sms",
    "process-contacts-import",
    "process-contacts-export",
    "sink-kustomer",
    "sink-cloudtalk",
)


def first_effect_after(sim: Any, at: float, prefix: str) -> float | None:
    times = [e.at for e in sim.log.entries if e.at > at and (e.effect or "").startswith(prefix)]
    return round(min(times) - at, 1) if times else None


@pytest.mark.services(*SERVICES)
async def test_broker_killed_during_sms_and_contacts_both_ways_every_accepted_event_lands_once(
    flow: Flow,
    broker: LocalKafka,  # noqa: F811 - the fixture imported from tests.e2e.own_broker
):
    flow.csim.settings.delivery_attempts, flow.csim.settings.delivery_max_delay_s = 300, 1.0
    flow.ksim.settings.webhook_attempts, flow.ksim.settings.webhook_max_delay_s = 300, 1.0

    customers: list[dict[str, Any]] = []  # created by people in Kustomer: imported
    contact_ids: list[str] = []  # created by people in CloudTalk: exported
    streaming = asyncio.Event()
    streaming.set()

    async def stream() -> None:
        i = 0
        while streaming.is_set():
            await flow.sms(external_number=SMS_NUMBERS[i % len(SMS_NUMBERS)], text=f"message {i}")
            if i % 3 == 0:
                n = len(customers)
                customers.append(
                    await flow.person_creates_customer(
                        name=f"Imported Person {n:03d}", phones=[{"type": "mobile", "phone": f"+421905300{n:03d}"}]
                    )
                )
            if i % 3 == 1:
                n = len(contact_ids)
                contact_ids.append(
                    await flow.person_creates_contact(
                        {"name": f"Exported Person {n:03d}", "ContactNumber": [{"public_number": f"+421911300{n:03d}"}]}
                    )
                )
            i += 1
            await asyncio.sleep(0.25)

    streamer = asyncio.create_task(stream())
    try:
        await wait_for(
            lambda: (
                len(flow.ksim.notes) >= 5
                and flow.ct_writes()
                and any(c["attributes"].get("externalId") for c in flow.ksim.customers.values())
            ),
            90,
            "all three flows to flow",
        )
        await asyncio.sleep(3)
        down_at = time.time()
        await asyncio.to_thread(broker.kill)
        await asyncio.sleep(OUTAGE_S)
        await asyncio.to_thread(broker.up, quiet=True)
        back_at = time.time()
        await asyncio.sleep(8)  # the stream goes on after the return
    finally:
        streaming.clear()
        await streamer

    # every webhook is answered 2xx in the end
    assert await flow.csim.wait_deliveries(180), "CloudTalk workflow deliveries still retrying"
    assert await flow.ksim.wait_deliveries(180), "Kustomer webhook deliveries still retrying"
    refused = [d.id for d in flow.csim.company.deliveries if d.status != "delivered"]
    refused += [d.event_id for d in flow.ksim.deliveries if d.status != "delivered"]
    assert not refused, f"webhooks never answered 2xx (ingest did not recover): {refused}"

    sms = [f"cloudtalk-sms-{s.id}" for s in flow.csim.company.sms]
    links = {f"https://acme.kustomerapp.com/app/customers/{c['id']}" for c in customers}

    def progress() -> dict[str, tuple[int, int]]:
        """flow → (landed, expected)"""
        return {
            "sms notes": (len(flow.ksim.notes), len(sms)),
            "imported contacts": (
                sum(1 for c in flow.csim.company.contacts.values() for u in c.external_urls if u["url"] in links),
                len(customers),
            ),
            "exported customers": (
                sum(1 for c in flow.ksim.customers.values() if c["attributes"].get("externalId")),
                len(contact_ids),
            ),
        }

    try:
        await wait_for(lambda: all(have >= want for have, want in progress().values()), 180, "every event")
    except AssertionError:
        raise AssertionError(f"not every event landed: {progress()}") from None
    await quiet(flow, ("process-sms", "process-contacts-import", "process-contacts-export"))
    await quiet(flow, ("sink-kustomer", "sink-cloudtalk"))
    await asyncio.sleep(3)  # anything late would be a duplicate
    await quiet(flow, ("sink-kustomer", "sink-cloudtalk"))

    # SMS: one conversation and one note each, one customer per number
    flow.assert_exactly_once(sms)
    per_phone = Counter(
        p["phone"]
        for c in flow.ksim.customers.values()
        for p in flow.ksim.customer_resource(c)["attributes"]["phones"]
        if p["phone"] in SMS_NUMBERS
    )
    assert per_phone == dict.fromkeys(SMS_NUMBERS, 1), per_phone
    # import: one CloudTalk contact per Kustomer customer people created, carrying its link. Whether
    # the customers the SMS flow created for new numbers are imported too is the import's rule, not
    # this test's: each of them becomes at most one contact, and nothing else is imported
    sms_links = {
        f"https://acme.kustomerapp.com/app/customers/{c['id']}"
        for c in flow.ksim.customers.values()
        if any(p["phone"] in SMS_NUMBERS for p in c["attributes"].get("phones") or [])
    }
    imported = Counter(u["url"] for c in flow.csim.company.contacts.values() for u in c.external_urls)
    assert {u: imported[u] for u in links} == dict.fromkeys(links, 1), imported
    sms_imported = {u: n for u, n in imported.items() if u not in links}
    # a customer the SMS flow created for a new number becomes one contact too
    assert sms_imported == dict.fromkeys(sms_links, 1), sms_imported
    # export: one Kustomer customer per CloudTalk contact
    exported = Counter(
        c["attributes"]["externalId"] for c in flow.ksim.customers.values() if c["attributes"].get("externalId")
    )
    assert exported == dict.fromkeys(contact_ids, 1), exported
    # the request logs: nothing written twice, no echo written back
    assert Counter(e.split()[0] for e in flow.ct_writes()) == {"contact.add": len(customers) + len(sms_imported)}
    assert Counter(e.split()[0] for e in flow.k_writes()) == {
        "customer.create": len(SMS_NUMBERS) + len(contact_ids),
        "conversation.create": len(sms),
        "note.create": len(sms),
    }
    assert set(await audit_rules(flow, "process-contacts-export")) >= {("dropped", "imported_from_kustomer")}
    assert ("skipped", "skipped:own_write") in await audit_rules(flow, "sink-cloudtalk")

    recovery = {
        "down_s": round(back_at - down_at, 1),
        "sms": first_effect_after(flow.ksim, back_at, "note.create"),
        "import": first_effect_after(flow.csim, back_at, "contact.add"),
        "export": first_effect_after(flow.ksim, back_at, "customer.create"),
    }
    print(
        f"\nbroker killed: {recovery}; SMS {len(sms)}, customers imported {len(customers)} "
        f"(+{len(sms_imported)} created for SMS numbers), contacts exported {len(contact_ids)}"
    )
    assert recovery["down_s"] >= 10, recovery
    for name in ("sms", "import", "export"):
        assert recovery[name] is not None and recovery[name] <= RECOVERY_LIMIT_S, recovery
