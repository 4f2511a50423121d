"""Live work first during an initial import (issue "Initial import and export at the platforms'
pace", point 3), through the whole pipeline: the CloudTalk simulator allows 30 requests a minute,
an initial import of 60 Kustomer customers is under way, and a person's edit of a customer reaches
CloudTalk within seconds — the import leaves ``CLOUDTALK_LIVE_RESERVE`` requests of each window to
it — while the import still completes, every customer exactly once (counted in the simulator's
request log). ``pipeline status`` shows the import's progress meanwhile."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import orjson
import pytest

from tests.e2e.conftest import Flow, wait_for
from tests.e2e.test_contact_index_e2e import adds, api_requests
from tests.e2e.test_contacts_e2e import contacts, idle

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]

SIZE = 60
WINDOW_S, LIMIT, RESERVE = 20.0, 10, 3  # 30 requests a minute; the import gets 7 of every 10


@pytest.mark.services("ingest", "process-contacts-import", "sink-cloudtalk")
@pytest.mark.env(CLOUDTALK_LIVE_RESERVE=str(RESERVE))
async def test_a_live_edit_reaches_cloudtalk_within_seconds_during_an_initial_import(flow: Flow):
    flow.csim.update_settings({"rate_limit": LIMIT, "window_seconds": WINDOW_S})
    seeded = await flow._sim(
        "POST",
        f"{flow.k_url}/_sim/seed",
        {"customers": [{"name": f"Person {n}", "phones": [{"phone": f"+4219057{n:05d}"}]} for n in range(SIZE)]},
    )
    customer_ids = seeded["customers"]
    assert len(customer_ids) == SIZE
    start = len(flow.csim.log.entries)
    began = time.monotonic()
    flow.stack.add("poll-customers", ["poll", "customers"])  # no cursor yet: the initial import
    await flow.stack.wait_ready(["poll-customers"], timeout=90)

    # the import is under way: some contacts written, the window spent down to the reserve
    await wait_for(lambda: adds(flow) >= 2 * (LIMIT - RESERVE), 120, "the import to be under way")
    assert adds(flow) < SIZE - 10, "the import must still be running for the measurement to mean anything"

    # pipeline status shows it: done, remaining, rate, ETA
    code, out, err = await flow.cli("status", "--json")
    assert code == 0, err
    progress = orjson.loads(out)["integrations"]["support"]["import"]
    print(f"\nstatus during the import: {progress}")
    assert progress["done"] > 0 and progress["remaining"] > 0, progress
    assert progress["emitted"] == SIZE and progress["done"] + progress["remaining"] == SIZE, progress
    assert progress["rate_per_min"] > 0 and progress["eta_s"] is not None, progress
    code, text, err = await flow.cli("status")
    assert code == 0 and "imports (bulk commands" in text, (text, err)
    print(next(line for line in text.splitlines() if line.strip().startswith("support") and "/min" in line))

    # a person edits a customer the import has not reached yet (the last of the pass)
    before = adds(flow)
    edited_at = time.monotonic()
    await flow.person_edits_customer(customer_ids[-1], name="Edited Live")

    async def arrived() -> bool:
        return any(c["name"] == "Edited Live" for c in await contacts(flow))

    await wait_for(arrived, 30, "the live edit in CloudTalk")
    latency = time.monotonic() - edited_at
    print(f"\nlive edit → CloudTalk during the import: {latency:.2f} s (import at {before}/{SIZE} contacts)")
    assert latency < 8.0, f"the live edit waited {latency:.1f} s behind the import"
    assert adds(flow) < SIZE, "the import was still running when the edit arrived"

    # the import completes, exactly once
    await wait_for(lambda: adds(flow) >= SIZE, 600, f"all {SIZE} contacts")
    await idle(flow)
    took = time.monotonic() - began
    asked = api_requests(flow, start)
    print(
        f"\nimport of {SIZE} customers at {LIMIT}/{WINDOW_S:.0f}s with a live reserve of {RESERVE}: {took:.0f} s, "
        f"{len(asked)} CloudTalk requests",
        Counter(a.split("?")[0].rsplit("/", 1)[0] for a in asked),
    )
    everyone = await contacts(flow)
    names = Counter(c["name"] for c in everyone)
    assert len(everyone) == SIZE and adds(flow) == SIZE, "one contact per customer, created once"
    assert names["Edited Live"] == 1 and "Person 59" not in names, "the edit won over the import's older version"
    assert all(n == 1 for n in names.values()), names
    assert all(len(c["links"]) == 1 for c in everyone)
    limited = [e for e in flow.csim.log.entries[start:] if e.status == 429]
    print(f"429 answers: {len(limited)}")
    code, out, _ = await flow.cli("status", "--json")
    final = orjson.loads(out)["integrations"]["support"]["import"]
    print(f"status after the import: {final}")
    assert final["remaining"] == 0 and final["done"] >= SIZE - 1, final
    await asyncio.sleep(0)
