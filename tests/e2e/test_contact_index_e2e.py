"""The CloudTalk sink's contacts index through the whole pipeline: what an import costs in CloudTalk
requests with and without it, a contact created in CloudTalk moments before its customer arrives
is found by the index's tail and merged into, and a sink killed with kill -9 in the middle of an
import leaves every contact right and single. Requests are counted in the simulator's log."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter

import pytest

from tests.e2e.conftest import Flow, wait_for
from tests.e2e.test_contacts_e2e import contacts, idle, numbers

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]


def api_requests(flow: Flow, since: int = 0) -> list[str]:
    """CloudTalk API requests (not the simulator's own routes) after the first ``since``."""
    return [f"{e.method} {e.path}?{e.query}" for e in flow.csim.log.entries[since:] if e.path.startswith("/api/")]


def adds(flow: Flow) -> int:
    return sum(1 for e in flow.ct_writes() if e.startswith("contact.add"))


async def import_customers(flow: Flow, first: int, count: int) -> None:
    for n in range(first, first + count):
        await flow.person_creates_customer(name=f"Person {n}", phones=[{"phone": f"+4219056{n:05d}"}])


@pytest.mark.services("ingest", "process-contacts-import")
@pytest.mark.env(CLOUDTALK_INDEX_TAIL_S="5")
async def test_an_import_costs_far_fewer_cloudtalk_requests_with_the_index(flow: Flow):
    per_customer = {}
    size = 50
    for phase, index in enumerate(("off", "on")):
        name = f"sink-cloudtalk-index-{index}"
        flow.stack.add(name, ["sink", "cloudtalk"], {"CLOUDTALK_INDEX": index})
        await flow.stack.wait_ready([name], timeout=90)
        start, added = len(flow.csim.log.entries), adds(flow)
        await import_customers(flow, phase * size, size)
        await wait_for(lambda added=added: adds(flow) >= added + size, 180, f"{size} contacts ({index})")
        await idle(flow)
        asked = api_requests(flow, start)
        per_customer[index] = len(asked) / size
        print(
            f"\nCloudTalk requests, index {index}: {len(asked)} for {size} customers",
            Counter(a.split("?")[0].rsplit("/", 1)[0] for a in asked),
        )
        flow.stack.kill(name, signal.SIGTERM)
        await wait_for(lambda name=name: not flow.stack.services[name].running, 60, f"{name} to stop")
    print(
        f"\nCloudTalk requests per imported customer: without the index {per_customer['off']:.2f}, "
        f"with it {per_customer['on']:.2f}"
    )
    assert adds(flow) == 2 * size and len(await contacts(flow)) == 2 * size
    assert per_customer["on"] < 1.5 and per_customer["on"] < per_customer["off"] / 2, per_customer


@pytest.mark.services("ingest", "process-contacts-import", "sink-cloudtalk")
@pytest.mark.env(CLOUDTALK_INDEX_TAIL_S="2")
async def test_a_contact_created_in_cloudtalk_moments_before_is_found_and_merged(flow: Flow):
    await flow.person_creates_customer(name="Someone First", phones=[{"phone": "+421905100001"}])
    await wait_for(lambda: adds(flow) == 1, 60, "the first contact")
    await idle(flow)
    # an agent creates a contact whose *second* number is the next customer's; no workflow fires,
    # so only the index's tail can find it
    seeded = await flow._sim(
        "POST",
        f"{flow.ct_root}/_sim/seed",
        {
            "contacts": [
                {
                    "name": "Made In CloudTalk",
                    "ContactNumber": [{"public_number": "+421905100099"}, {"public_number": "+421905100002"}],
                }
            ]
        },
    )
    assert seeded is not None
    contact_id = next(str(c["id"]) for c in await contacts(flow) if c["name"] == "Made In CloudTalk")
    await asyncio.sleep(3)  # longer than CLOUDTALK_INDEX_TAIL_S
    start = len(flow.csim.log.entries)
    await flow.person_creates_customer(name="Second Customer", phones=[{"phone": "+421905100002"}])
    await wait_for(lambda: any(e.startswith("contact.edit") for e in flow.ct_writes()), 60, "the merge")
    await idle(flow)
    asked = api_requests(flow, start)
    print("\nrequests for the second customer:", asked)
    assert adds(flow) == 1, "merged, not duplicated"
    merged = next(c for c in await contacts(flow) if str(c["id"]) == contact_id)
    assert numbers(merged) == {"+421905100099", "+421905100002"} and merged["name"] == "Second Customer"
    assert not any("keyword=" in a for a in asked), "decided from the index, no search"
    assert any("page=" in a and "keyword" not in a for a in asked), "the tail was read"


@pytest.mark.services("ingest", "process-contacts-import", "sink-cloudtalk")
async def test_a_sink_killed_mid_import_leaves_every_contact_right_and_single(flow: Flow):
    singles, pairs = 30, 6
    await import_customers(flow, 0, singles)
    # customers sharing a number with an earlier one (another notation: Kustomer keeps both): merged
    for n in range(pairs):
        await flow.person_creates_customer(
            name=f"Person {n} B", phones=[{"phone": f"+421 905 6{n:05d}"}, {"phone": f"+4219057{n:05d}"}]
        )
    await wait_for(lambda: adds(flow) >= 8, 90, "the import to be under way")
    flow.stack.kill("sink-cloudtalk", signal.SIGKILL)
    killed_at = adds(flow)
    flow.stack.start("sink-cloudtalk")
    await wait_for(lambda: adds(flow) >= singles, 180, "every contact")
    await wait_for(lambda: sum(1 for e in flow.ct_writes() if e.startswith("contact.edit")) >= pairs, 120, "merges")
    await idle(flow)
    found = await contacts(flow)
    print(f"\nkilled after {killed_at} adds; {adds(flow)} adds in all, {len(found)} contacts")
    assert adds(flow) == singles == len(found), "no contact twice"
    holders = Counter(n for c in found for n in numbers(c))
    assert all(v == 1 for v in holders.values()), holders
    by_name = {c["name"]: c for c in found}
    for n in range(pairs):
        assert numbers(by_name[f"Person {n} B"]) == {f"+4219056{n:05d}", f"+4219057{n:05d}"}, "newest name"
    for n in range(pairs, singles):
        assert numbers(by_name[f"Person {n}"]) == {f"+4219056{n:05d}"}
