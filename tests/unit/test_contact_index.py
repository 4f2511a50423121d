"""The CloudTalk contacts index: how facts combine, how lookups decide (or ask), the freshness rule
and the tail read, and what the contacts import asks CloudTalk with and without it."""

from __future__ import annotations

import time
from typing import Any

import pytest

from pipeline.sink.cloudtalk import CloudTalkEffects
from pipeline.sink.contact_index import (
    ContactIndex,
    ContactIndexStore,
    combine,
    decide,
    deleted,
    entry_from_event,
    entry_from_item,
    entry_from_show,
    is_fresh,
    make_entry,
    tail_page,
)
from pipeline.sink.ledger import STARTED, LedgerEntry


def full(cid: int, name: str, numbers: list[str], emails: list[str] = (), v: float = 100.0, company: str = ""):
    return make_entry(cid, name, company, numbers, list(emails), complete=True, v=v, src="write")


def item(cid: int, name: str, number: str | None, email: str | None = None, company: str = "") -> dict[str, Any]:
    return {
        "Contact": {"id": str(cid), "name": name, "company": company},
        "ContactNumber": {"public_number": number},
        "ContactEmail": {"email": email},
    }


def index_of(*facts: dict[str, Any], paged: bool = True) -> ContactIndex:
    ix = ContactIndex()
    for f in facts:
        ix.apply(f)
    if paged:
        ix.apply_meta({"listed_upto": max([f["id"] for f in facts] or [0]), "paged_at": time.time()})
    return ix


# -- combining facts --------------------------------------------------------------------------


def test_the_newer_fact_wins_whatever_the_order():
    old = full(7, "Jana", ["+421905123456"], v=100)
    new = full(7, "Jana N", ["+421905123456", "+421905999999"], v=200)
    assert combine(old, new) == new and combine(new, old) == new


def test_an_index_item_that_agrees_keeps_what_a_complete_entry_knows_in_either_order():
    complete = full(7, "Jana", ["+421905123456", "+421905999999"], ["jana@example.org"], v=100)
    listed = entry_from_item(item(7, "Jana", "+421905123456", "jana@example.org"), 200)
    assert not listed["complete"] and listed["numbers"] == ["+421905123456"]
    for got in (combine(complete, listed), combine(listed, complete)):
        assert got["complete"] and got["numbers"] == ["+421905123456", "+421905999999"]
    # an item that disagrees (renamed since) replaces it, incomplete
    renamed = entry_from_item(item(7, "Jana Horvath", "+421905123456"), 300)
    got = combine(complete, renamed)
    assert got["name"] == "Jana Horvath" and not got["complete"]


def test_a_stale_event_never_undoes_the_sinks_newer_write_and_a_deletion_wins_when_newer():
    event = entry_from_event(
        {
            "type": "contact.updated",
            "payload": {
                "event": "contact.updated",
                "contact_id": 7,
                "name": "Jana",
                "contact_numbers": [421905123456],
                "contact_emails": ["JANA@example.org"],
                "modified_at": "2026-03-01 10:00:00",
            },
        }
    )
    assert event is not None and event["numbers"] == ["+421905123456"] and event["emails"] == ["jana@example.org"]
    ours = full(7, "Jana", ["+421905123456", "+421905999999"], v=event["v"] + 5)
    assert combine(ours, event) == ours and combine(event, ours) == ours
    gone = deleted(7, event["v"] + 10)
    assert combine(ours, gone) == gone and combine(gone, ours) == gone


def test_the_maps_follow_every_change():
    ix = ContactIndex()
    ix.apply(entry_from_item(item(3, "Ann Lee", "+420601111111", "ann@example.org"), 10))
    assert ix.by_number["+420601111111"] == {3} and ix.open_numbers == {3} and ix.open_emails == {3}
    ix.apply(full(3, "Ann  LEE", ["+420602222222"], v=20))
    assert "+420601111111" not in ix.by_number and ix.by_number["+420602222222"] == {3}
    assert ix.by_name["ann lee"] == {3} and not ix.open_numbers and not ix.open_emails
    ix.apply(deleted(3, 30))
    assert ix.get(3) is None and not ix.by_number and not ix.by_name
    assert ix.counts() == {"complete": 0, "incomplete": 0}


# -- deciding ---------------------------------------------------------------------------------


def test_a_number_the_index_knows_is_a_hit_without_asking():
    ix = index_of(full(5, "John", ["+421905111111"]), full(9, "John B", ["+421905111111"]))
    d = decide(ix, "phone", ["+421905111111"], [], "X", fresh=False)
    assert (d.kind, d.contact_id) == ("hit", "5"), "the oldest contact holding it, fresh or not"


def test_an_unknown_number_is_a_miss_only_when_complete_and_fresh():
    ix = index_of(full(5, "John", ["+421905111111"]))
    assert decide(ix, "phone", ["+421905000000"], [], "Y", fresh=True).kind == "miss"
    stale = decide(ix, "phone", ["+421905000000"], [], "Y", fresh=False)
    assert (stale.kind, stale.stale) == ("ask", True), "refresh first, then decide"


def test_a_number_an_incomplete_contact_could_hold_as_its_second_is_asked():
    ix = index_of(entry_from_item(item(4, "Old", "+421905444444"), 50), full(8, "New", ["+421905111111"]))
    d = decide(ix, "phone", ["+421905000000"], [], "Y", fresh=True)
    assert (d.kind, d.probe, d.stale) == ("ask", ("phone", "+421905000000"), False)
    # a hit older than every incomplete contact is decided; a younger one is asked
    older = index_of(full(2, "A", ["+421905100002"]), entry_from_item(item(4, "B", "+421905100004"), 5))
    assert decide(older, "phone", ["+421905100002"], [], None, fresh=True).contact_id == "2"
    d = decide(ix, "phone", ["+421905111111"], [], "Y", fresh=True)
    assert d.kind == "ask", "contact 4 (older) could hold it as its second number"
    # once asked, the index is exact for that number
    asked = {("phone", "+421905000000")}
    assert decide(ix, "phone", ["+421905000000"], [], "Y", fresh=True, asked=asked).kind == "miss"


def test_names_come_from_every_listed_contact_and_phones_come_first():
    ix = index_of(entry_from_item(item(4, "Ann  Lee", None), 50), full(8, "Bob", ["+420601111111"]))
    d = decide(ix, "phone_or_name", ["+420602222222"], [], "ann lee", fresh=True)
    assert (d.kind, d.contact_id, d.probe) == ("hit", "4", ("name", "ann lee"))
    d = decide(ix, "phone_or_name", ["+420601111111"], [], "ann lee", fresh=True)
    assert d.contact_id == "8", "a phone match comes before a name match"
    assert decide(ix, "phone_or_name", ["+420603333333"], [], "Nobody", fresh=True).kind == "miss"
    assert decide(ix, "phone", ["+420603333333"], [], "ann lee", fresh=True).kind == "miss", "phone only"


def test_email_and_phone_and_email_keys():
    ix = index_of(full(5, "A", ["+421905111111"], ["a@example.org"]), full(6, "B", ["+421905111111"], ["b@x.org"]))
    assert decide(ix, "email", ["+421900000000"], ["B@X.org"], None, fresh=True).contact_id == "6"
    assert decide(ix, "email", [], ["c@x.org"], None, fresh=True).kind == "miss"
    assert decide(ix, "phone_and_email", ["+421905111111"], ["b@x.org"], None, fresh=True).contact_id == "6"
    assert decide(ix, "phone_and_email", ["+421905111111"], ["c@x.org"], None, fresh=True).kind == "miss"
    assert decide(ix, "phone_and_email", ["+421905111111"], [], None, fresh=False).kind == "miss", "no e-mail"
    assert decide(ix, "none", ["+421905111111"], [], None, fresh=False).kind == "miss"


# -- freshness --------------------------------------------------------------------------------


def test_the_freshness_rule():
    ix = index_of(full(5, "A", ["+1"]))
    now, mono = time.time(), time.monotonic()
    kw = {"now": now, "now_mono": mono, "refresh_s": 3600.0, "tail_s": 30.0}
    assert is_fresh(ix, mono - 10, **kw)
    assert not is_fresh(ix, mono - 31, **kw), "the tail was read too long ago"
    assert not is_fresh(ix, None, **kw), "this process never read the tail"
    ix.paged_at = now - 3601
    assert not is_fresh(ix, mono, **kw), "the last full listing is too old"
    assert not is_fresh(ContactIndex(), mono, **kw), "never listed"
    assert tail_page(0) == 1 and tail_page(999) == 1 and tail_page(1000) == 2 and tail_page(2500, 1000) == 3


class FakeCloudTalk:
    """CloudTalk's contacts as the sink uses them: ascending ids, a listing with the first number
    and e-mail, keyword substring search, shows, adds, edits; every request counted."""

    def __init__(self) -> None:
        self.contacts: dict[int, dict[str, Any]] = {}
        self.next_id = 100
        self.requests: list[str] = []

    def create(self, name: str, numbers: list[str], emails: list[str] = ()) -> int:
        self.next_id += 1
        self.contacts[self.next_id] = {"name": name, "numbers": list(numbers), "emails": list(emails)}
        return self.next_id

    async def list_contacts(self, *, keyword: str | None = None, page: int = 1, limit: int | None = 1000):
        self.requests.append(f"index keyword={keyword} page={page}")
        rows = [
            (cid, c)
            for cid, c in sorted(self.contacts.items())
            if not keyword or any(keyword.lower() in str(v).lower() for v in [c["name"], *c["numbers"], *c["emails"]])
        ]
        limit = limit or 30
        chunk = rows[(page - 1) * limit : page * limit]
        return {
            "itemsCount": len(rows),
            "pageCount": max(1, -(-len(rows) // limit)),
            "pageNumber": page,
            "limit": limit,
            "data": [item(cid, c["name"], (c["numbers"] or [None])[0], (c["emails"] or [None])[0]) for cid, c in chunk],
        }

    async def get_contact(self, contact_id):
        self.requests.append(f"show {contact_id}")
        c = self.contacts.get(int(contact_id))
        if c is None:
            return None
        return {
            "Contact": {
                "id": str(contact_id),
                "name": c["name"],
                "contact_numbers": c["numbers"],
                "contact_emails": c["emails"],
                "tags": [],
            },
            "ExternalUrl": [],
        }

    async def add_contact(self, body):
        self.requests.append("add")
        return str(
            self.create(
                body["name"],
                [x["public_number"] for x in body.get("ContactNumber") or []],
                [x["email"] for x in body.get("ContactEmail") or []],
            )
        )

    async def edit_contact(self, contact_id, body):
        self.requests.append(f"edit {contact_id}")
        c = self.contacts[int(contact_id)]
        if "name" in body:
            c["name"] = body["name"]
        if "ContactNumber" in body:
            c["numbers"] = [x["public_number"] for x in body["ContactNumber"]]
        return True

    async def iter_agents(self):
        yield {"data": []}

    async def list_countries(self):
        return []


def store(ct: FakeCloudTalk, tail_s: float = 30.0, page_limit: int = 1000) -> ContactIndexStore:
    s = ContactIndexStore("unused:9092", "idx", "raw", tail_s=tail_s)
    s.page_limit = page_limit
    s._started = True  # no Kafka in unit tests: facts are applied in memory, writes are skipped
    return s


async def test_a_contact_created_after_the_listing_is_found_by_the_tail_in_one_request():
    ct = FakeCloudTalk()
    for n in range(25):
        ct.create(f"P{n}", [f"+4219051000{n:02d}"])
    s = store(ct, page_limit=10)
    assert await s.refresh(ct) and s.view.counts()["incomplete"] == 25
    assert len(ct.requests) == 3, ct.requests  # 25 contacts, pages of 10
    # people create a contact and delete an old one; the tail is due
    new = ct.create("Walk-in", ["+421905999999", "+421905888888"])
    del ct.contacts[101]
    s.tail_at = time.monotonic() - 60
    assert not s.fresh()
    ct.requests.clear()
    assert await s.refresh(ct) and s.fresh()
    assert ct.requests == ["index keyword=None page=3", f"show {new}"], "the tail page, and a show of the new one"
    assert s.view.get(new)["complete"] and s.view.by_number["+421905888888"] == {new}
    # a contact deleted unseen shifts the listing: the tail reads the page before too
    for n in range(8):
        del ct.contacts[102 + n]
    newer = ct.create("Later", ["+421905777777"])
    s.tail_at = None
    ct.requests.clear()
    assert await s.refresh(ct)
    assert ct.requests[:2] == ["index keyword=None page=3", "index keyword=None page=2"], ct.requests
    assert s.view.get(newer) is not None


async def test_a_listing_out_of_id_order_is_not_trusted():
    ct = FakeCloudTalk()
    ct.create("A", ["+421905100001"])
    s = store(ct)
    assert await s.refresh(ct)
    original = ct.list_contacts

    async def shuffled(**kw):
        page = await original(**kw)
        return {**page, "data": [*page["data"], item(99, "Z", None)]}

    ct.list_contacts = shuffled  # type: ignore[method-assign]
    s.tail_at = None
    assert not await s.refresh(ct)


# -- the import with and without the index ----------------------------------------------------


class NoKustomer:
    async def own_user_id(self):
        return None

    async def get_company(self, company_id):
        return None

    async def get_user(self, user_id):
        return None


def command(n: int, name: str, phones: list[str], merge_key: str = "phone_or_name") -> dict[str, Any]:
    cid = f"{n:024x}"
    return {
        "command_id": f"support|kustomer:customer:{cid}:1",
        "type": "cloudtalk.upsert_contact",
        "integration": "support",
        "event_id": f"kustomer:customer:{cid}:1",
        "occurred_at": "2026-03-01T10:00:00Z",
        "customer_id": cid,
        "version": {"rev": 1, "updated_at": "2026-03-01T10:00:00Z"},
        "merge_key": merge_key,
        "contact": {
            "name": name,
            "phones": phones,
            "emails": [],
            "external_url": {"name": "Kustomer", "url": f"https://acme.kustomerapp.com/app/customers/{cid}"},
        },
    }


async def run_import(with_index: bool, people: int = 30, seen_in_full: bool = False) -> FakeCloudTalk:
    ct = FakeCloudTalk()
    existing = ct.create("Existing Person", ["+421905000001", "+421905000002"])
    ct.create("Ann Lee", ["+420601000000"])
    s = store(ct) if with_index else None
    if s is not None and seen_in_full:  # as the contacts poller's first pass (full contact events) teaches it
        for cid in list(ct.contacts):
            s.view.apply(entry_from_show(await ct.get_contact(cid), time.time()))
        ct.requests.clear()
    effects = CloudTalkEffects(ct, {"support": NoKustomer()}, index=s)
    ledger_index: dict[str, Any] = {}
    outcomes = []
    for n in range(people):
        done = await effects.perform(command(n, f"Customer {n}", [f"+4219052{n:05d}"]), None, ledger_index)
        ledger_index.update(done.index)
        outcomes.append(done.outcome)
    # a second number of an existing contact, a name of one, and a contact a person made just now
    for n, (name, phones) in enumerate(
        [("Someone", ["+421905000002"]), ("ann lee", ["+420609999999"]), ("New Person", ["+421905777777"])],
        start=people,
    ):
        if name == "New Person":
            ct.create("Made In CloudTalk", ["+421905111000", "+421905777777"])
            if s is not None:
                s.tail_at = time.monotonic() - 60  # the tail is due
        done = await effects.perform(command(n, name, phones), None, ledger_index)
        ledger_index.update(done.index)
        outcomes.append(done.outcome)
    assert outcomes[:people] == ["created"] * people
    assert outcomes[people:] == ["merged", "merged", "merged"], outcomes[people:]
    assert str(existing) in {ledger_index[k]["contact_id"] for k in ledger_index if "|customer|" in k}
    return ct


@pytest.mark.parametrize("seen_in_full", [False, True])
async def test_the_import_asks_cloudtalk_far_less_with_the_index(seen_in_full):
    before = await run_import(with_index=False)
    after = await run_import(with_index=True, seen_in_full=seen_in_full)
    assert len(before.contacts) == len(after.contacts) == 33, "the same contacts either way"
    print(f"\nrequests without the index: {len(before.requests)}, with it: {len(after.requests)}")
    # contacts known only from the listing (first number only) leave each new number to a search
    # (but no name search and no shows); contacts seen in full leave nothing to ask
    ratio = 0.5 if seen_in_full else 0.75
    assert len(after.requests) < len(before.requests) * ratio, (len(before.requests), len(after.requests))


async def test_with_a_complete_index_a_new_customer_costs_only_the_add():
    ct = FakeCloudTalk()
    s = store(ct)
    effects = CloudTalkEffects(ct, {"support": NoKustomer()}, index=s)
    await effects.perform(command(1, "First", ["+421905200001"]), None, {})
    ct.requests.clear()
    done = await effects.perform(command(2, "Second", ["+421905200002"]), None, {})
    assert done.outcome == "created" and ct.requests == ["add"]


async def test_a_crashed_command_is_reconciled_by_asking_cloudtalk_for_its_link_not_the_index():
    ct = FakeCloudTalk()
    s = store(ct)
    effects = CloudTalkEffects(ct, {"support": NoKustomer()}, index=s)
    cmd = command(1, "First", ["+421905200001"])
    cid = ct.create("First", ["+421905200001"])  # the crashed instance's add, never recorded
    shown_with_link = await ct.get_contact(cid)
    original = ct.get_contact

    async def with_link(contact_id):
        shown = await original(contact_id)
        if shown is not None and int(contact_id) == cid:
            shown["ExternalUrl"] = [{"name": "Kustomer", "url": cmd["contact"]["external_url"]["url"]}]
        return shown

    ct.get_contact = with_link  # type: ignore[method-assign]
    assert shown_with_link is not None
    prior = LedgerEntry(cmd["command_id"], STARTED)
    done = await effects.perform(cmd, prior, {})
    assert done.steps["contact_id"] == str(cid) and len(ct.contacts) == 1
    assert any(r.startswith("index keyword=+421905200001") for r in ct.requests), "searched, as before"


@pytest.mark.parametrize("stale_number", [True, False])
async def test_an_index_that_is_behind_is_corrected_by_the_show_before_merging(stale_number):
    ct = FakeCloudTalk()
    s = store(ct)
    effects = CloudTalkEffects(ct, {"support": NoKustomer()}, index=s)
    cid = ct.create("Moved", ["+421905300001"])
    assert await s.refresh(ct)
    if stale_number:  # a person moved the number to another contact; no event arrived
        ct.contacts[cid]["numbers"] = ["+421905300009"]
        await s.learn([entry_from_show(await ct.get_contact(cid), 1.0)])  # an old show: ignored
    done = await effects.perform(command(1, "Customer", ["+421905300001"], merge_key="phone"), None, {})
    assert done.outcome == ("created" if stale_number else "merged")


async def test_an_index_that_cannot_be_loaded_leaves_the_import_to_search_and_is_tried_again_later(
    monkeypatch: pytest.MonkeyPatch,
):
    """The index topic missing (or the broker away for it): the import decides as without the
    index — by asking CloudTalk — and the load is not tried again for every command."""
    ct = FakeCloudTalk()
    s = ContactIndexStore("unused:9092", "idx", "raw")
    loads = 0

    async def failing_start() -> None:
        nonlocal loads
        loads += 1
        raise RuntimeError("topic idx does not exist (pipeline topics ensure)")

    monkeypatch.setattr(s, "start", failing_start)
    effects = CloudTalkEffects(ct, {"support": NoKustomer()}, index=s)
    outcomes = []
    for n in range(3):
        done = await effects.perform(command(n, f"Customer {n}", [f"+4219053{n:05d}"]), None, {})
        outcomes.append(done.outcome)
    assert outcomes == ["created"] * 3 and len(ct.contacts) == 3
    assert any(r.startswith("index keyword=+4219053") for r in ct.requests), "searched, as without the index"
    assert loads == 1, "one load attempt until the retry time has passed"
    effects._index_retry_at = 0.0  # noqa: SLF001 - the retry time has passed
    await effects.perform(command(9, "Customer 9", ["+421905399999"]), None, {})
    assert loads == 2
