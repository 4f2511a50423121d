"""Bulk work completes the CloudTalk contacts index instead of asking about every new number.

CloudTalk's listing gives each contact's first number only, so any new number could be the second
number of a contact known from the listing: without more, the import asks CloudTalk (a keyword
search) for each. Bulk work instead shows each such contact once — when there are at most
``CLOUDTALK_INDEX_COMPLETE`` of them, or no more than the values asked about so far — and then
decides every later number from the index. The outcomes are the same either way; only the
requests differ (counted by the fake CloudTalk of tests/unit/test_contact_index.py).
"""

from __future__ import annotations

from typing import Any

from pipeline.sink.cloudtalk import CloudTalkEffects
from tests.unit.test_contact_index import FakeCloudTalk, NoKustomer, command, store

EXISTING = 20  # contacts in CloudTalk, known from the listing only
SECOND = "+421905009999"  # the second number of one of them


def cloudtalk() -> FakeCloudTalk:
    ct = FakeCloudTalk()
    for n in range(EXISTING):
        numbers = [f"+4219050{n:05d}"] + ([SECOND] if n == 7 else [])
        ct.create(f"Existing {n}", numbers)
    return ct


async def run(customers: int, complete_max: int, priority: str = "bulk") -> tuple[FakeCloudTalk, list[str]]:
    ct = cloudtalk()
    s = store(ct)
    assert await s.refresh(ct)  # the listing: every contact incomplete
    ct.requests.clear()
    effects = CloudTalkEffects(ct, {"support": NoKustomer()}, index=s, complete_max=complete_max)  # type: ignore[dict-item]
    ledger_index: dict[str, Any] = {}
    outcomes = []
    for n in range(customers):
        phone = SECOND if n == customers - 1 else f"+4219058{n:05d}"  # the last one holds the second number
        c = {**command(n, f"Customer {n}", [phone], merge_key="phone"), "priority": priority}
        done = await effects.perform(c, None, ledger_index)
        ledger_index.update(done.index)
        outcomes.append(done.outcome)
    return ct, outcomes


def searches(ct: FakeCloudTalk) -> int:
    return sum(1 for r in ct.requests if r.startswith("index keyword=+"))


def shows(ct: FakeCloudTalk) -> int:
    return sum(1 for r in ct.requests if r.startswith("show"))


async def test_an_import_shows_a_small_cloudtalk_once_and_then_asks_nothing() -> None:
    asked, asked_outcomes = await run(60, complete_max=0, priority="live")
    completed, outcomes = await run(60, complete_max=1000)
    assert outcomes == asked_outcomes == ["created"] * 59 + ["merged"], "the same decisions either way"
    assert len(completed.contacts) == len(asked.contacts) == EXISTING + 59
    assert searches(completed) == 0 and shows(completed) == EXISTING + 1, "each listed contact shown once (+ the merge)"
    assert searches(asked) == 60, "live work asks about every new number"
    print(f"\nrequests: asking {len(asked.requests)}, completing {len(completed.requests)}")
    assert len(completed.requests) < len(asked.requests) * 0.75


async def test_a_large_cloudtalk_is_asked_about_until_completing_it_costs_no_more() -> None:
    ct, outcomes = await run(60, complete_max=0)
    assert outcomes == ["created"] * 59 + ["merged"]
    # the first EXISTING numbers are asked about; then showing the EXISTING contacts is no dearer
    assert searches(ct) == EXISTING, ct.requests[:5]
    assert shows(ct) == EXISTING + 1
