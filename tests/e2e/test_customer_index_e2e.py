"""The Kustomer API budget of a logged call: a known customer costs a conversation and a note.

The sink remembers the customer a number was found (or created) as in its ledger index, so only
the first call of a number looks it up. Ingest, the calls processor and the Kustomer sink run as
separate processes on the real broker; every request the sink makes is counted in the Kustomer
simulator's request log.
"""

from __future__ import annotations

import signal
from collections import Counter
from typing import Any

import pytest

from tests.e2e.conftest import Flow, quiet, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.e2e, pytest.mark.services("ingest", "process-calls", "sink-kustomer")]

NUMBERS = [f"+4479460500{i:02d}" for i in range(5)]


def seed_customers(flow: Flow, numbers: list[str]) -> dict[str, str]:
    """Customers that exist before any call (an agent made them): number -> customer id."""
    created = flow.ksim.seed(
        {
            "customers": [
                {"name": f"Customer {i}", "phones": [{"type": "mobile", "phone": n}]} for i, n in enumerate(numbers)
            ]
        }
    )
    return dict(zip(numbers, created["customers"], strict=True))


def api_requests(flow: Flow, since: int = 0) -> list[Any]:
    """The Kustomer API requests served from the ``since``-th on (the simulator's own routes are
    not logged)."""
    return [e for e in flow.ksim.log.entries[since:] if e.path.startswith("/v1/")]


def kinds(requests: list[Any]) -> Counter:
    def kind(e: Any) -> str:
        if e.method == "GET" and e.path.startswith("/v1/customers/phone="):
            return "customer.by_phone"
        return f"{e.method} {e.path}"

    return Counter(kind(e) for e in requests)


async def log_calls(flow: Flow, numbers: list[str], per_number: int) -> list[str]:
    """``per_number`` calls of each number, round robin; waits until every one has its note."""
    external_ids = []
    before = len(flow.ksim.notes)
    for _ in range(per_number):
        for n in numbers:
            call = await flow.end_call(external_number=n)
            external_ids.append(f"cloudtalk-call-{call['call_id']}")
    total = before + len(external_ids)
    await wait_for(lambda: len(flow.ksim.notes) >= total, 90, f"{total} notes")
    await quiet(flow, ("process-calls", "sink-kustomer"))
    return external_ids


def conversations_of(flow: Flow, external_ids: list[str]) -> dict[str, str]:
    """externalId -> the customer its conversation belongs to."""
    return {
        c["attributes"]["externalId"]: c["customer"]
        for c in flow.ksim.conversations.values()
        if c["attributes"]["externalId"] in external_ids
    }


async def test_calls_of_known_customers_cost_a_conversation_and_a_note_also_after_a_restart(flow: Flow):
    owners = seed_customers(flow, NUMBERS)
    first = await log_calls(flow, NUMBERS, per_number=4)  # 20 calls, 5 customers

    requests = api_requests(flow)
    per_call = len(requests) / len(first)
    print(f"\nfirst round: {len(requests)} Kustomer requests for {len(first)} calls = {per_call:.2f} per call")
    print(f"  {dict(kinds(requests))}")
    flow.assert_exactly_once(first)
    assert kinds(requests)["customer.by_phone"] == len(NUMBERS), "each number is looked up once"
    assert len(requests) == 3 * len(NUMBERS) + 2 * (len(first) - len(NUMBERS)), kinds(requests)
    by_customer = conversations_of(flow, first)
    assert Counter(by_customer.values()) == {cid: 4 for cid in owners.values()}, "each call on its number's customer"
    assert not flow.creates("customer.create")

    # a new instance of the sink loads the index with the ledger: nothing is looked up again
    flow.stack.kill("sink-kustomer", signal.SIGTERM)
    flow.stack.start("sink-kustomer")
    mark = len(flow.ksim.log.entries)

    second = await log_calls(flow, NUMBERS, per_number=4)

    requests = api_requests(flow, mark)
    per_call = len(requests) / len(second)
    print(f"steady state, after a restart: {len(requests)} requests for {len(second)} calls = {per_call:.2f} per call")
    assert per_call <= 2.05, kinds(requests)
    assert kinds(requests) == {"POST /v1/conversations": len(second), "POST /v1/notes": len(second)}
    flow.assert_exactly_once(first + second)
    assert Counter(conversations_of(flow, second).values()) == {cid: 4 for cid in owners.values()}


def delete_customer(flow: Flow, customer_id: str) -> None:
    """The customer disappears from Kustomer (deleted, or merged into another one)."""
    sim = flow.ksim
    sim._index(sim.customers[customer_id], False)
    del sim.customers[customer_id]


async def test_a_remembered_customer_that_was_deleted_or_merged_away_still_gets_the_call_once(flow: Flow):
    deleted, merged = NUMBERS[0], NUMBERS[1]
    owners = seed_customers(flow, [deleted, merged])
    first = await log_calls(flow, [deleted, merged], per_number=1)  # both customers are remembered now
    assert conversations_of(flow, first) == {first[0]: owners[deleted], first[1]: owners[merged]}

    # one customer is deleted; the other is merged into a customer that now holds its number
    delete_customer(flow, owners[deleted])
    delete_customer(flow, owners[merged])
    survivor = flow.ksim.seed({"customers": [{"name": "Merged", "phones": [{"type": "mobile", "phone": merged}]}]})
    survivor_id = survivor["customers"][0]
    mark = len(flow.ksim.log.entries)

    second = await log_calls(flow, [deleted, merged], per_number=1)

    flow.assert_exactly_once(first + second)
    owner_now = conversations_of(flow, second)
    recreated = flow.ksim.find_customer("phone", deleted)
    assert recreated is not None and recreated["id"] != owners[deleted], "the unknown number's customer is created"
    assert owner_now == {second[0]: recreated["id"], second[1]: survivor_id}
    assert flow.creates("customer.create") == 1
    refused = [
        e for e in api_requests(flow, mark) if e.method == "POST" and e.path == "/v1/conversations" and e.status >= 400
    ]
    assert len(refused) == 2, "each stale customer costs one refused conversation create"
    print(f"\nafter a delete and a merge: {dict(kinds(api_requests(flow, mark)))}")

    # the index follows: the next calls cost a conversation and a note again
    mark = len(flow.ksim.log.entries)
    third = await log_calls(flow, [deleted, merged], per_number=2)
    assert kinds(api_requests(flow, mark)) == {"POST /v1/conversations": 4, "POST /v1/notes": 4}
    flow.assert_exactly_once(first + second + third)
