"""An initial import of Kustomer customers written to CloudTalk in bulk requests (up to ten contacts
each), through the whole pipeline, with the services as separate processes and a real broker:

* the CloudTalk sink killed with kill -9 while one of its bulk requests is still held by CloudTalk
  — the request lands after the sink died — leaves every contact right and single once the sink
  is started again: each customer in exactly one contact, customers sharing a number merged into
  one contact with both numbers and the newest name, no contact added twice, and the contacts
  the request that landed added are found in CloudTalk by the restarted sink, not added again;
* a bulk answer in which some commands failed on their own settles each command by itself: the
  commands that were applied are done, the failed ones are written again, once each.

Everything is counted in the CloudTalk simulator's state and request log (a bulk request's
commands are its items, each with its own effect) and in the sink's audit records.
"""

from __future__ import annotations

import re
import signal
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from devkit.sim.base import LoggedRequest
from pipeline.kafka.reading import read_topic
from tests.e2e.conftest import Flow, wait_for
from tests.e2e.test_contact_index_e2e import adds
from tests.e2e.test_contacts_e2e import contacts, idle, numbers

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]

BULK_PATH = "/api/bulk/contacts.json"
ID_IN_PATH = re.compile(r"/\d+\.json$")
HOLD_MS = 5000  # how long CloudTalk holds the bulk request the sink dies in the middle of


@dataclass(frozen=True)
class Customer:
    id: str
    name: str
    phones: tuple[str, ...]  # E.164, as CloudTalk stores them

    @property
    def link(self) -> str:
        return f"https://acme.kustomerapp.com/app/customers/{self.id}"


@dataclass(frozen=True)
class Applied:
    """One write CloudTalk applied: a command of a bulk request, or a single request."""

    seq: int
    bulk: bool
    command_id: str | None
    effect: str
    links: frozenset[str]
    name: str | None  # the name it wrote, if it wrote one

    @property
    def contact(self) -> str:
        return self.effect.split()[1]


def iso(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


async def seed(flow: Flow, singles: int, pairs: int, first_pair_after: int) -> tuple[list[Customer], list[Customer]]:
    """``singles`` customers with a number each, and ``pairs`` newer customers — the same people
    entered again, under another name — holding one of those numbers written in another notation
    (Kustomer keeps both) and a number of their own; the ``n``-th of them is newer than the first
    ``first_pair_after + n`` singles."""
    base = datetime.now(UTC) - timedelta(hours=1)
    at = {n: base + timedelta(seconds=10 * n) for n in range(singles)}
    specs: list[dict[str, Any]] = [
        {"name": f"Person {n}", "phones": [{"phone": f"+4219058{n:05d}"}], "updatedAt": iso(at[n])}
        for n in range(singles)
    ]
    specs += [
        {
            "name": f"Person {n} B",
            "phones": [{"phone": f"+421 905 8{n:05d}"}, {"phone": f"+4219059{n:05d}"}],
            "updatedAt": iso(at[first_pair_after + n] + timedelta(seconds=5)),
        }
        for n in range(pairs)
    ]
    seeded = await flow._sim("POST", f"{flow.k_url}/_sim/seed", {"customers": specs})
    ids = seeded["customers"]
    assert len(ids) == singles + pairs
    firsts = [Customer(ids[n], f"Person {n}", (f"+4219058{n:05d}",)) for n in range(singles)]
    seconds = [
        Customer(ids[singles + n], f"Person {n} B", (f"+4219058{n:05d}", f"+4219059{n:05d}")) for n in range(pairs)
    ]
    return firsts, seconds


def bulk_requests(flow: Flow) -> list[LoggedRequest]:
    return [e for e in flow.csim.log.entries if e.method == "POST" and e.path == BULK_PATH]


def links_of(body: Any) -> frozenset[str]:
    urls = body.get("ExternalUrl") if isinstance(body, dict) else None
    return frozenset(str(u.get("url")) for u in urls or [] if isinstance(u, dict))


def applied_writes(flow: Flow) -> list[Applied]:
    """Every write CloudTalk applied, in the order it answered them, with the links it carried."""
    out: list[Applied] = []
    for e in flow.csim.log.entries:
        if e.items is not None:
            bodies = {c.get("command_id"): c.get("data") or {} for c in e.body or [] if isinstance(c, dict)}
            out += [
                Applied(e.seq, True, i["command_id"], i["effect"], links_of(body), body.get("name"))
                for i in e.items
                if i.get("effect")
                for body in [bodies.get(i["command_id"]) or {}]
            ]
        elif e.effect and e.path.startswith("/api/"):
            body = e.body if isinstance(e.body, dict) else {}
            out.append(Applied(e.seq, False, None, e.effect, links_of(body), body.get("name")))
    return out


def by_endpoint(flow: Flow) -> Counter[str]:
    return Counter(
        f"{e.method} {ID_IN_PATH.sub('/{id}.json', e.path)}"
        for e in flow.csim.log.entries
        if e.path.startswith("/api/")
    )


def older_name_rewrites(writes: list[Applied], merged: list[tuple[str, Customer, Customer]]) -> dict[str, list[int]]:
    """Merged contacts (id, older customer, newer customer) whose newer customer's name was later
    written over with the older customer's: contact id → the requests (seq) that did it."""
    out: dict[str, list[int]] = {}
    for contact_id, older, newer in merged:
        newest_seen = False
        for w in writes:
            if w.contact != contact_id or w.name is None:
                continue
            if w.name == newer.name:
                newest_seen = True
            elif w.name == older.name and newest_seen:
                out.setdefault(contact_id, []).append(w.seq)
    return out


async def sink_outcomes(flow: Flow) -> dict[str, list[str]]:
    """Command id → the outcomes the CloudTalk sink recorded for it (committed audit records)."""
    out: dict[str, list[str]] = {}
    for r in await read_topic(flow.bootstrap, flow.topics.audit):
        a = orjson.loads(r.value)
        if a["stage"] != "sink-cloudtalk":
            continue
        for d in a["decisions"]:
            if d.get("command_id"):
                out.setdefault(d["command_id"], []).append(f"{d['decision']}:{d.get('rule', '')}")
    return out


async def every_customer_linked(flow: Flow, customers: list[Customer]) -> bool:
    linked = {link for c in await contacts(flow) for link in c["links"]}
    return linked >= {c.link for c in customers}


async def assert_every_contact_right_and_single(
    flow: Flow, firsts: list[Customer], seconds: list[Customer]
) -> list[dict[str, Any]]:
    """One contact per person, each customer's link in exactly one contact, each number held by
    one contact, the pairs merged (both numbers, the newest name), no contact added twice."""
    found = await contacts(flow)
    everyone = firsts + seconds
    assert len(found) == len(firsts), f"{len(found)} contacts for {len(firsts)} people"
    assert adds(flow) == len(found), f"{adds(flow)} contacts added for {len(found)} contacts: one added twice"
    links = Counter(link for c in found for link in c["links"])
    assert set(links) == {c.link for c in everyone}, set(links) ^ {c.link for c in everyone}
    assert all(v == 1 for v in links.values()), [k for k, v in links.items() if v > 1]
    holders = Counter(n for c in found for n in numbers(c))
    assert all(v == 1 for v in holders.values()), [k for k, v in holders.items() if v > 1]
    by_link = {link: c for c in found for link in c["links"]}
    for second in seconds:
        merged = by_link[second.link]
        first = next(f for f in firsts if f.phones[0] == second.phones[0])
        assert by_link[first.link] is merged, f"{first.name} and {second.name} are not one contact"
        assert numbers(merged) == set(second.phones), numbers(merged)
        assert merged["name"] == second.name, f"{merged['name']!r}: not the newest name {second.name!r}"
        assert sorted(merged["links"]) == sorted([first.link, second.link])
    paired = {s.phones[0] for s in seconds}
    for first in firsts:
        if first.phones[0] not in paired:
            one = by_link[first.link]
            assert one["name"] == first.name and numbers(one) == set(first.phones), one
            assert one["links"] == [first.link], one["links"]
    per_link = Counter(link for w in applied_writes(flow) if w.effect.startswith("contact.add") for link in w.links)
    assert all(v == 1 for v in per_link.values()), [k for k, v in per_link.items() if v > 1]
    return found


@pytest.mark.services("ingest", "process-contacts-import", "sink-cloudtalk")
# the sink waits for CloudTalk's answer longer than CloudTalk holds the request, so it is killed
# waiting for it; after a crash it looks things up only once such a request has surely landed
@pytest.mark.env(SINK_HTTP_TIMEOUT_S="10", SINK_RECONCILE_SETTLE_S="15")
async def test_kill_9_of_the_cloudtalk_sink_in_the_middle_of_a_bulk_request_leaves_every_contact_right_and_single(
    flow: Flow,
):
    singles, pairs = 40, 5
    # the pairs' second customers are newer than their first ones (and than Person 10)
    firsts, seconds = await seed(flow, singles, pairs, first_pair_after=10)
    began = time.monotonic()
    # CloudTalk holds the second bulk request of the import for a while before applying it
    held = flow.csim.faults.add(
        match=f"POST {BULK_PATH}", kind="latency", latency_ms=HOLD_MS, script=[False, True], times=1
    )
    flow.stack.add("poll-customers", ["poll", "customers"])  # no cursor yet: the initial import
    await flow.stack.wait_ready(["poll-customers"], timeout=90)
    await wait_for(lambda: held.fired == 1, 120, "a bulk request of the import to be held")
    flow.stack.kill("sink-cloudtalk", signal.SIGKILL)
    killed_at = time.monotonic()
    # the request is logged once CloudTalk has answered it: the sink died before it had an answer
    assert not any(e.fault == "latency" for e in flow.csim.log.entries), "the sink had its answer before it died"
    adds_at_kill = adds(flow)
    flow.stack.start("sink-cloudtalk")

    await wait_for(lambda: any(e.fault == "latency" for e in flow.csim.log.entries), 30, "the held request to land")
    await wait_for(lambda: every_customer_linked(flow, firsts + seconds), 180, "every customer in a contact")
    await idle(flow)
    took = time.monotonic() - began

    found = await assert_every_contact_right_and_single(flow, firsts, seconds)
    bulks = bulk_requests(flow)
    sizes = [len(e.items or []) for e in bulks]
    writes = applied_writes(flow)
    add_writes = [w for w in writes if w.effect.startswith("contact.add")]
    outcomes = await sink_outcomes(flow)
    landed = next(e for e in bulks if e.fault == "latency")
    by_link = {link: str(c["id"]) for c in found for link in c["links"]}
    rewrites = older_name_rewrites(
        writes, [(by_link[s.link], next(f for f in firsts if f.phones[0] == s.phones[0]), s) for s in seconds]
    )
    print(
        f"\nkilled {killed_at - began:.1f} s into the import, {adds_at_kill} contacts added by then; "
        f"all right after {took:.0f} s"
        f"\nCloudTalk requests by endpoint: {dict(by_endpoint(flow))}"
        f"\nbulk requests: {len(bulks)}, commands in each: {sizes}"
        f"\nadds: {len(add_writes)} ({sum(w.bulk for w in add_writes)} in bulk, "
        f"{sum(not w.bulk for w in add_writes)} single), edits: "
        f"{sum(w.effect.startswith('contact.edit') for w in writes)}; contacts: {len(found)}"
        f"\nthe held request: {[(i['action'], i['status'], i['effect']) for i in landed.items or []]}"
        f"\nsink outcomes: {Counter(o for v in outcomes.values() for o in v)}"
        f"\nmerged contacts whose newer name was written over with the older one for a while: {rewrites}"
    )
    assert any(size > 1 for size in sizes), "the import wrote more than one contact per request"

    # the held request landed after the sink died: every command of it applied, once
    assert landed.status == 200 and landed.items, "the held request carried commands"
    assert all(i["effect"] for i in landed.items), landed.items
    held_ids = {i["command_id"] for i in landed.items}
    landed_adds = {i["effect"].split()[1] for i in landed.items if i["effect"].startswith("contact.add")}
    assert landed_adds <= {str(c["id"]) for c in found}, "the contacts the held request added are the contacts"
    # no add of it was sent again (an edit may be: the restarted sink writes a merge once more
    # when a reconciled older customer wrote its name over meanwhile; edits set values)
    again = [w for w in writes if w.command_id in held_ids and w.seq != landed.seq]
    assert not [w for w in again if w.effect.startswith("contact.add")], f"a held add sent again: {again}"
    bodies = {c["command_id"]: c["data"] for c in landed.body}
    for item in landed.items:
        if item["effect"].startswith("contact.add"):
            link = next(iter(links_of(bodies[item["command_id"]])))
            added = [w.seq for w in add_writes if link in w.links]
            assert added == [landed.seq], f"{link} added by requests {added}"
    # the restarted sink found what the held request added in CloudTalk (reconciled, not created);
    # its edits were applied (a merge found again is done, maybe written once more: edits set values)
    for item in landed.items:
        expected = {"done:reconciled"} if item["action"] == "add_contact" else {"done:reconciled", "done:merged"}
        assert set(outcomes.get(item["command_id"]) or []) <= expected, (item, outcomes.get(item["command_id"]))
        assert outcomes.get(item["command_id"]), item
    assert all(len(v) == 1 for v in outcomes.values()), {k: v for k, v in outcomes.items() if len(v) > 1}
    assert len(outcomes) == singles + pairs, f"{len(outcomes)} commands recorded for {singles + pairs} customers"


@pytest.mark.services("ingest", "process-contacts-import", "sink-cloudtalk")
async def test_a_partial_failure_inside_a_bulk_answer_settles_each_command_on_its_own(flow: Flow):
    singles = 20
    firsts, _ = await seed(flow, singles, 0, first_pair_after=0)
    # CloudTalk fails the second and fifth commands of the import's first bulk request (500) and
    # applies the others
    failing = flow.csim.faults.add(
        match=f"POST {BULK_PATH}", kind="item", status=500, script=[False, True, False, False, True], times=2
    )
    began = time.monotonic()
    flow.stack.add("poll-customers", ["poll", "customers"])
    await flow.stack.wait_ready(["poll-customers"], timeout=90)
    await wait_for(lambda: every_customer_linked(flow, firsts), 120, "every customer in a contact")
    await idle(flow)
    took = time.monotonic() - began

    found = await assert_every_contact_right_and_single(flow, firsts, [])
    bulks = bulk_requests(flow)
    writes = applied_writes(flow)
    outcomes = await sink_outcomes(flow)
    failed = [(e, i) for e in bulks for i in e.items or [] if i.get("fault") == "item"]
    print(
        f"\nall right after {took:.0f} s; CloudTalk requests by endpoint: {dict(by_endpoint(flow))}"
        f"\nbulk requests: {len(bulks)}, commands in each: {[len(e.items or []) for e in bulks]}"
        f"\nfailed commands: {[(e.seq, i['command_id'][:12], i['status']) for e, i in failed]}"
        f"\nwrites after the failures: {[(w.seq, w.bulk, w.effect) for w in writes if w.seq > failed[0][0].seq]}"
        f"\nsink outcomes: {Counter(o for v in outcomes.values() for o in v)}; contacts: {len(found)}"
    )
    assert failing.fired == 2 and len(failed) == 2, failed
    partial = {e.seq: e for e, _ in failed}.values()
    for request in partial:  # 200 for the request; the commands that did not fail were applied
        assert request.status == 200 and all(i["effect"] for i in request.items or [] if i.get("fault") is None)
    assert any(len(e.items or []) > 2 for e in partial), "the failures were part of a bulk request with others"
    for entry, item in failed:
        assert item["status"] == 500 and item["effect"] is None, item
        link = next(iter(links_of(next(c["data"] for c in entry.body if c["command_id"] == item["command_id"]))))
        carrying = [w for w in writes if link in w.links]
        # not applied when it failed; written again afterwards, once
        assert len(carrying) == 1 and carrying[0].seq > entry.seq, carrying
        assert carrying[0].effect.startswith("contact.add"), carrying
        assert outcomes.get(item["command_id"]) == ["done:created"], outcomes.get(item["command_id"])
    assert all(len(v) == 1 for v in outcomes.values()), {k: v for k, v in outcomes.items() if len(v) > 1}
    assert len(outcomes) == singles
