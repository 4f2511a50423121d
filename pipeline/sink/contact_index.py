"""The CloudTalk contacts index: what the CloudTalk sink knows of the company's contacts, so the
contacts import decides merges and "already exists" without asking CloudTalk each time.

Why: CloudTalk takes 60 requests a minute per company, shared by everything. Finding a customer's
contact by asking (a keyword search per phone, a show per candidate, a name search) cost about
three requests per imported customer; with the index an import costs about one (the add), plus
one request every ``CLOUDTALK_INDEX_TAIL_S`` to read the newest contacts.

**What an entry is.** One per CloudTalk contact: ``{id, name, company, numbers (E.164), emails
(lowercase), complete, seen_at, v, src}``. ``complete`` says every number and e-mail is known:
true for a contact shown (``GET /contacts/show``), a full contact event, or a contact the sink
itself wrote; false for an index page item, which carries only the *first* number and e-mail.
``v`` is the entry's version (Unix seconds): CloudTalk's ``modified`` for a show or an event, the
time the sink's request returned for its own write, the fetch time for an index item. A deleted
contact is ``{id, deleted: true, v}`` in memory.

**Sources, and who writes them** (one writer per fact):

* (a) the sink's own adds and edits (complete), and every contact it shows — written by the sink
  to the compacted topic ``cloudtalk.contacts.index`` (key: contact id, value: the entry; a
  tombstone when a listing no longer shows the contact);
* (b) contact events (``cloudtalk.contacts.raw``: created, updated, deleted; full contacts) —
  written by ingest and ``poll contacts``; the sink *reads* that topic, from its start and then
  following it, and writes none of it back except at a full listing (below);
* (c) CloudTalk's contact index (``GET /contacts/index.json?limit=1000``), paged in full when the
  index was never listed or its last full listing is older than ``CLOUDTALK_INDEX_REFRESH_S``
  (items incomplete), and its *tail* before decisions that need freshness (below).

A record ``meta`` in the index topic holds ``listed_upto`` (the highest contact id a listing
showed) and ``paged_at`` (when the last full listing started), so restarts and replicas share them.

**Writes are at-least-once, with a plain idempotent producer**, not in the sink's transaction:
the index caches CloudTalk's state, which changes when CloudTalk answers, not when the sink's
ledger commits. A transaction would drop true facts (a contact added just before a crash) and
would bind a one-partition topic shared by every lane to each lane's transaction. A lost or
repeated record is harmless: entries combine by version (:func:`combine`), in any order, and a
missing fact is found again by the tail, the next full listing, an event or a show. Because the
topic is compacted, what is written for a contact is the *combined* entry, never a partial fact
that would shadow a complete one. At each full listing every entry whose combined state differs
from what the topic holds is written, so what events taught survives their topic's retention.

**Combining** (:func:`combine`, pure): the entry with the higher version wins; a deleted marker
is an entry like any other. An incomplete index item that *agrees* with a complete entry (same
name and company, its first number and e-mail among the entry's) keeps the entry's lists and
completeness, whichever is newer — so paging never makes a known contact unknown.

**Deciding** (:func:`decide`, pure) follows the import's merge rules in their order (each phone;
then each e-mail for ``email``; then the name for ``phone_or_name``), one *probe* at a time:

* a phone found in the index → that contact (the oldest holding it), unless an incomplete contact
  with a lower id could hold the number as a second one (then ask); likewise e-mails;
* a name found → the oldest contact with that name (index items carry every name);
* a phone or e-mail not found → decided "absent" only when no incomplete contact could hide it
  (none has a number, resp. an e-mail, we do not know in full) *and* the index is fresh; a name
  not found → "absent" when the index is fresh;
* otherwise the probe is *asked*: CloudTalk's keyword search for that value, and a show of each
  candidate the index does not already know in full with that exact value (the shows complete
  the index). After that the probe is decided from the index.

A contact the index names is shown before it is merged into (the edit needs its current lists
anyway); a show that no longer holds the probe's value updates the index and the decision is
made again.

**Freshness rule.** The index is *fresh* when (1) a full listing started less than
``CLOUDTALK_INDEX_REFRESH_S`` ago (default a day), and (2) this process read the *tail* less
than ``CLOUDTALK_INDEX_TAIL_S`` ago (default 30 s). The tail is every contact with an id above
``listed_upto``: CloudTalk lists contacts by ascending id and gives new contacts higher ids, so
they sit at the end of the listing — the page holding position ``known + 1`` (``known``: contacts
indexed with ids up to ``listed_upto``), one request; a page that starts above ``listed_upto``
(contacts were deleted unseen) makes it read the page before, a full page ending above it the
page after. New contacts the index does not know in full are shown (at most
``TAIL_SHOWS`` per read). If the listing is not in id order the tail is not trusted and the
decision asks. So a contact created in CloudTalk more than ``CLOUDTALK_INDEX_TAIL_S`` before the
sink decides to create is always found; one created later is found once its contact event
arrives. A decision that needs no absence (a hit) needs no freshness: an unseen contact has a
higher id, so it is never the oldest holder.

**Not covered** (known limits): a number or e-mail a person *adds* to a contact the index knows
in full is seen once that contact's event arrives (the workflow, or the poller's next pass); a
number a person removed is forgotten at the next event or show, and until then a customer with it
merges into that contact. A crashed command (ledger ``started``), an ambiguous create and a
replayed one are always reconciled by asking CloudTalk (a contact carrying the customer's link),
never from the index: the index does not record links.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from pipeline.core.envelope import parse_time, utc_now_iso
from pipeline.core.observability import get_logger, metrics
from pipeline.core.phones import normalize_e164
from pipeline.kafka.clients import committed_reader, durable_producer
from pipeline.kafka.reading import partitions_of, read_to_end, stop_consumer
from pipeline.sink.merge import name_key

log = get_logger(__name__)

META_KEY = "meta"
PAGE_LIMIT = 1000
TAIL_SHOWS = 20  # new contacts shown per tail read, at most

Entry = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Entries (pure)
# --------------------------------------------------------------------------------------------


def _epoch(value: Any, default: float) -> float:
    try:
        return parse_time(str(value)).timestamp() if value else default
    except (ValueError, TypeError):
        return default


def _numbers(values: Iterable[Any]) -> list[str]:
    return list(dict.fromkeys(n for n in (normalize_e164(v) for v in values if v not in (None, "")) if n))


def _emails(values: Iterable[Any]) -> list[str]:
    return list(dict.fromkeys(str(e).strip().lower() for e in values if e))


def make_entry(
    contact_id: int | str,
    name: str | None,
    company: str | None,
    numbers: Iterable[Any],
    emails: Iterable[Any],
    *,
    complete: bool,
    v: float,
    src: str,
) -> Entry:
    return {
        "id": int(contact_id),
        "name": name or "",
        "company": company or "",
        "numbers": _numbers(numbers),
        "emails": _emails(emails),
        "complete": complete,
        "seen_at": utc_now_iso(),
        "v": round(v, 3),
        "src": src,
    }


def entry_from_item(item: Mapping[str, Any], fetched_at: float) -> Entry:
    """An index page item: name, company, first number and first e-mail (incomplete)."""
    c = item.get("Contact") or {}
    n = (item.get("ContactNumber") or {}).get("public_number")
    e = (item.get("ContactEmail") or {}).get("email")
    return make_entry(c["id"], c.get("name"), c.get("company"), [n], [e], complete=False, v=fetched_at, src="index")


def entry_from_show(shown: Mapping[str, Any], fetched_at: float) -> Entry:
    c = shown.get("Contact") or {}
    return make_entry(
        c["id"],
        c.get("name"),
        c.get("company"),
        c.get("contact_numbers") or [],
        c.get("contact_emails") or [],
        complete=True,
        v=_epoch(c.get("modified") or c.get("created"), fetched_at),
        src="show",
    )


def entry_from_event(envelope: Mapping[str, Any]) -> Entry | None:
    """A contact event's envelope (``cloudtalk.contacts.raw``): a full contact, or a deletion."""
    payload = envelope.get("payload") or {}
    if "contact_id" not in payload:
        return None
    v = _epoch(payload.get("modified_at"), 0.0)
    if payload.get("event") == "contact.deleted" or envelope.get("type") == "contact.deleted":
        return deleted(payload["contact_id"], v)
    return make_entry(
        payload["contact_id"],
        payload.get("name"),
        payload.get("company"),
        payload.get("contact_numbers") or [],
        payload.get("contact_emails") or [],
        complete=True,
        v=v,
        src="event",
    )


def deleted(contact_id: int | str, v: float) -> Entry:
    return {"id": int(contact_id), "deleted": True, "v": round(v, 3)}


def _agrees(item: Entry, full: Entry) -> bool:
    """An incomplete entry shows nothing the complete one contradicts."""
    return (
        name_key(item["name"]) == name_key(full["name"])
        and (item.get("company") or "") == (full.get("company") or "")
        and (not item["numbers"] or item["numbers"][0] in full["numbers"])
        and (bool(item["numbers"]) or not full["numbers"])
        and (not item["emails"] or item["emails"][0] in full["emails"])
        and (bool(item["emails"]) or not full["emails"])
    )


def combine(old: Entry | None, new: Entry) -> Entry:
    """Two facts about one contact → what the index holds (pure; the order of arrival does not
    matter): the newer wins (ties: ``new``); an incomplete one that agrees with a complete one
    keeps the complete lists."""
    if old is None:
        return new
    newer, older = (new, old) if new["v"] >= old["v"] else (old, new)
    if newer.get("deleted") or older.get("deleted"):
        return newer
    if not newer["complete"] and older["complete"] and _agrees(newer, older):
        return {**newer, "numbers": older["numbers"], "emails": older["emails"], "complete": True, "src": older["src"]}
    return newer


def signature(entry: Entry | None) -> tuple[Any, ...] | None:
    """What a write of ``entry`` would change (its version alone is not worth a record)."""
    if entry is None or entry.get("deleted"):
        return None
    return (entry["name"], entry["company"], tuple(entry["numbers"]), tuple(entry["emails"]), entry["complete"])


# --------------------------------------------------------------------------------------------
# The maps and the lookups (pure)
# --------------------------------------------------------------------------------------------


class ContactIndex:
    """Entries by id, and the maps number → ids, e-mail → ids, name key → ids; which contacts
    could hide numbers or e-mails (incomplete ones with at least one); ``listed_upto`` and
    ``paged_at`` (see the module docstring)."""

    def __init__(self) -> None:
        self.entries: dict[int, Entry] = {}
        self.by_number: dict[str, set[int]] = {}
        self.by_email: dict[str, set[int]] = {}
        self.by_name: dict[str, set[int]] = {}
        self.open_numbers: set[int] = set()
        self.open_emails: set[int] = set()
        self.listed_upto = 0
        self.paged_at: float | None = None

    # -- changes ---------------------------------------------------------------------------------
    def apply(self, fact: Entry) -> Entry:
        """Combine ``fact`` into the index; returns the entry now held."""
        cid = int(fact["id"])
        old = self.entries.get(cid)
        new = combine(old, fact)
        if new is old:
            return new
        if old is not None:
            self._unmap(cid, old)
        self.entries[cid] = new
        self._map(cid, new)
        return new

    def apply_meta(self, meta: Mapping[str, Any]) -> None:
        self.listed_upto = max(self.listed_upto, int(meta.get("listed_upto") or 0))
        if meta.get("paged_at") is not None:
            self.paged_at = max(self.paged_at or 0.0, float(meta["paged_at"]))

    def _map(self, cid: int, e: Entry) -> None:
        if e.get("deleted"):
            return
        for n in e["numbers"]:
            self.by_number.setdefault(n, set()).add(cid)
        for m in e["emails"]:
            self.by_email.setdefault(m, set()).add(cid)
        if e["name"]:
            self.by_name.setdefault(name_key(e["name"]), set()).add(cid)
        if not e["complete"]:
            if e["numbers"]:
                self.open_numbers.add(cid)
            if e["emails"]:
                self.open_emails.add(cid)

    def _unmap(self, cid: int, e: Entry) -> None:
        if e.get("deleted"):
            return
        for table, keys in (
            (self.by_number, e["numbers"]),
            (self.by_email, e["emails"]),
            (self.by_name, [name_key(e["name"])] if e["name"] else []),
        ):
            for k in keys:
                ids = table.get(k)
                if ids is not None:
                    ids.discard(cid)
                    if not ids:
                        del table[k]
        self.open_numbers.discard(cid)
        self.open_emails.discard(cid)

    # -- reads -----------------------------------------------------------------------------------
    def get(self, contact_id: int | str) -> Entry | None:
        e = self.entries.get(int(contact_id))
        return None if e is None or e.get("deleted") else e

    def alive(self) -> list[Entry]:
        return [e for e in self.entries.values() if not e.get("deleted")]

    def count_upto(self, contact_id: int) -> int:
        return sum(1 for cid, e in self.entries.items() if cid <= contact_id and not e.get("deleted"))

    def counts(self) -> dict[str, int]:
        alive = self.alive()
        complete = sum(1 for e in alive if e["complete"])
        return {"complete": complete, "incomplete": len(alive) - complete}


@dataclass(frozen=True, slots=True)
class Decision:
    """``hit`` (``contact_id``, found by ``probe``), ``miss`` (no contact matches: create), or
    ``ask`` (CloudTalk must be asked about ``probe``; ``stale``: only because the index is not
    fresh — a fresh index would decide it)."""

    kind: str
    contact_id: str | None = None
    probe: tuple[str, str] | None = None
    stale: bool = False


def decide(
    index: ContactIndex,
    merge_key: str,
    phones: Sequence[str],
    emails: Sequence[str],
    name: str | None,
    *,
    fresh: bool,
    asked: frozenset[tuple[str, str]] | set[tuple[str, str]] = frozenset(),
) -> Decision:
    """Which CloudTalk contact a customer merges into, by ``merge_key``, from the index alone —
    or which probe CloudTalk must be asked about first (see the module docstring). ``asked``: the
    probes CloudTalk was asked about; the index is exact for them now."""
    emails = [e.lower() for e in emails]
    open_n = min(index.open_numbers) if index.open_numbers else None
    open_e = min(index.open_emails) if index.open_emails else None

    def oldest(ids: set[int] | None) -> int | None:
        return min(ids) if ids else None

    def hit(cid: int, probe: tuple[str, str]) -> Decision:
        return Decision("hit", str(cid), probe)

    if merge_key in ("phone", "phone_or_name", "phone_and_email"):
        if merge_key == "phone_and_email" and not emails:
            return Decision("miss")
        for phone in phones:
            probe = ("phone", phone)
            known = probe in asked
            ids = index.by_number.get(phone) or set()
            first = oldest(ids)
            shut = known or open_n is None or (first is not None and first < open_n)  # nobody older hides it
            if merge_key == "phone_and_email":
                if not (known or open_n is None):
                    return Decision("ask", probe=probe)  # an incomplete contact could hold it
                holders = sorted(ids)
                if not known and any(not index.entries[i]["complete"] for i in holders):
                    return Decision("ask", probe=probe)
                both = [i for i in holders if set(index.entries[i]["emails"]) & set(emails)]
                if both:
                    return hit(both[0], probe)
                if known or fresh:
                    continue
                return Decision("ask", probe=probe, stale=True)
            if first is not None and shut:
                return hit(first, probe)
            if known or (open_n is None and fresh):
                continue  # absent
            return Decision("ask", probe=probe, stale=open_n is None)
    if merge_key == "email":
        for email in emails:
            probe = ("email", email)
            known = probe in asked
            first = oldest(index.by_email.get(email))
            if first is not None and (known or open_e is None or first < open_e):
                return hit(first, probe)
            if known or (open_e is None and fresh):
                continue
            return Decision("ask", probe=probe, stale=open_e is None)
    if merge_key == "phone_or_name" and name:
        probe = ("name", name)
        first = oldest(index.by_name.get(name_key(name)))
        if first is not None:
            return hit(first, probe)
        if probe not in asked and not fresh:
            return Decision("ask", probe=probe, stale=True)
    return Decision("miss")


def holds(entry: Entry | None, probe: tuple[str, str]) -> bool:
    """Whether a contact's entry holds the probe's exact value (pure)."""
    if entry is None or entry.get("deleted"):
        return False
    kind, value = probe
    if kind == "phone":
        return value in entry["numbers"]
    if kind == "email":
        return value.lower() in entry["emails"]
    return name_key(entry["name"]) == name_key(value)


def tail_page(known: int, limit: int = PAGE_LIMIT) -> int:
    """The listing page (1-based) holding position ``known + 1``: the first contact after the
    ``known`` ones the index holds up to ``listed_upto`` (pure)."""
    return known // limit + 1


def is_fresh(
    index: ContactIndex, tail_at: float | None, *, now: float, now_mono: float, refresh_s: float, tail_s: float
) -> bool:
    """The freshness rule (pure): a full listing younger than ``refresh_s`` and a tail read by this
    process younger than ``tail_s``."""
    return (
        index.paged_at is not None
        and now - index.paged_at <= refresh_s
        and tail_at is not None
        and now_mono - tail_at <= tail_s
    )


# --------------------------------------------------------------------------------------------
# The store: loading, following and writing the topics; reading CloudTalk's listing
# --------------------------------------------------------------------------------------------


class ContactIndexStore:
    """The index of one CloudTalk company, kept in ``topic`` (compacted) and fed by ``raw_topic``.

    :meth:`start` reads both topics to their end (read_committed) and keeps following them in the
    background; :meth:`learn` applies facts the sink found and writes the combined entries;
    :meth:`refresh` pages CloudTalk's listing (all of it, or its tail) through the sink's client.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        raw_topic: str,
        *,
        client_id: str = "pipeline",
        refresh_s: float = 86_400.0,
        tail_s: float = 30.0,
    ) -> None:
        self.bootstrap, self.topic, self.raw_topic, self.client_id = bootstrap, topic, raw_topic, client_id
        self.refresh_s, self.tail_s = refresh_s, tail_s
        self.page_limit = PAGE_LIMIT
        self.view = ContactIndex()
        self.tail_at: float | None = None  # time.monotonic() of this process's last tail read
        self._persisted: dict[int, tuple[Any, ...] | None] = {}  # what the topic holds per contact
        self._paging: dict[str, Any] | None = None  # a full listing in progress (resumable)
        self._lock = asyncio.Lock()
        self._started = False
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        m = metrics()
        self._gauge = m.cloudtalk_index_contacts
        self.decisions = m.cloudtalk_index_decisions

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load both topics to their end, then follow them (idempotent)."""
        if self._started:
            return
        async with self._lock:
            if self._started:
                return
            consumer = committed_reader(self.bootstrap, auto_offset_reset="earliest")
            await consumer.start()
            try:
                tps = [TopicPartition(self.topic, p) for p in sorted(await partitions_of(consumer, self.topic))]
                tps += [
                    TopicPartition(self.raw_topic, p) for p in sorted(await partitions_of(consumer, self.raw_topic))
                ]
                if not any(tp.topic == self.topic for tp in tps):
                    raise RuntimeError(f"topic {self.topic} does not exist (pipeline topics ensure)")
                consumer.assign(tps)
                await consumer.seek_to_beginning(*tps)
                n = 0
                async for r in read_to_end(consumer, tps):
                    self._apply_record(r)
                    n += 1
            except BaseException:
                await stop_consumer(consumer)
                raise
            producer = durable_producer(self.bootstrap, f"{self.client_id}-contact-index")
            await producer.start()
            self._consumer, self._producer = consumer, producer
            self._task = asyncio.create_task(self._follow(), name="contact-index-follow")
            self._started = True
            self._count()
            log.info(
                "contact_index_loaded",
                records=n,
                **self.view.counts(),
                listed_upto=self.view.listed_upto,
                paged_at=self.view.paged_at,
            )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping
                pass
        if self._consumer is not None:
            await stop_consumer(self._consumer)
        if self._producer is not None:
            await self._producer.stop()
        self._started = False

    async def _follow(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=500, max_records=5000)
                for records in batch.values():
                    for r in records:
                        self._apply_record(r)
                if batch:
                    self._count()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the index is a cache: keep following
                log.warning("contact_index_follow_failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1.0)

    def _apply_record(self, r: ConsumerRecord) -> None:
        try:
            if r.topic == self.topic:
                key = (r.key or b"").decode()
                if key == META_KEY:
                    if r.value is not None:
                        self.view.apply_meta(orjson.loads(r.value))
                    return
                if not key.isdigit():
                    return
                if r.value is None:  # a tombstone: deleted as of the record's time
                    held = self.view.apply(deleted(key, r.timestamp / 1000.0))
                else:
                    held = self.view.apply(orjson.loads(r.value))
                self._persisted[int(key)] = signature(held)
            elif r.value is not None:
                fact = entry_from_event(orjson.loads(r.value))
                if fact is not None:
                    self.view.apply(fact)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("contact_index_record_skipped", topic=r.topic, offset=r.offset, error=str(exc))

    def _count(self) -> None:
        for state, n in self.view.counts().items():
            self._gauge.labels(state).set(n)

    # -- writing ---------------------------------------------------------------------------------
    async def learn(self, facts: Iterable[Entry]) -> None:
        """Apply facts the sink found (its own writes, shows, listing items) and write the entries
        they changed (at-least-once)."""
        changed: list[Entry] = []
        for fact in facts:
            held = self.view.apply(fact)
            if self._unsaved(held):
                changed.append(held)
        await self._write(changed)

    def _unsaved(self, e: Entry) -> bool:
        """The topic does not hold ``e`` yet (for a deleted one: it holds a live record)."""
        if e.get("deleted"):
            return self._persisted.get(int(e["id"])) is not None
        return signature(e) != self._persisted.get(int(e["id"]), ())

    async def _write(self, entries: Sequence[Entry], meta: Mapping[str, Any] | None = None) -> None:
        if self._producer is None:
            return
        futures = []
        try:
            for e in entries:
                value = None if e.get("deleted") else orjson.dumps(e)
                futures.append(await self._producer.send(self.topic, value, key=str(e["id"]).encode(), partition=0))
                self._persisted[int(e["id"])] = signature(e)
            if meta is not None:
                futures.append(
                    await self._producer.send(self.topic, orjson.dumps(meta), key=META_KEY.encode(), partition=0)
                )
            if futures:
                await asyncio.gather(*futures)
        except Exception as exc:  # noqa: BLE001 - a cache write: the fact is found again (tail, listing, event)
            for e in entries:
                self._persisted.pop(int(e["id"]), None)
            log.warning("contact_index_write_failed", records=len(entries), error=f"{type(exc).__name__}: {exc}")
        self._count()

    async def _write_meta(self) -> None:
        await self._write([], {"listed_upto": self.view.listed_upto, "paged_at": self.view.paged_at})

    # -- freshness -------------------------------------------------------------------------------
    def fresh(self) -> bool:
        return is_fresh(
            self.view,
            self.tail_at,
            now=time.time(),
            now_mono=time.monotonic(),
            refresh_s=self.refresh_s,
            tail_s=self.tail_s,
        )

    async def refresh(self, ct: Any) -> bool:
        """Make the index fresh: a full listing when it is due, else the tail. Returns whether the
        index is fresh now (False: the listing is not in id order, so the tail cannot be read)."""
        paged = self.view.paged_at
        if self._paging is not None or paged is None or time.time() - paged > self.refresh_s:
            await self._page_all(ct)
            return self.fresh()
        return await self._read_tail(ct) and self.fresh()

    async def _page_all(self, ct: Any) -> None:
        """Page the whole listing (resumable: a wait that parks the command keeps the progress)."""
        p = self._paging
        if p is None:
            p = self._paging = {"page": 1, "started": time.time(), "seen": set(), "max": 0}
        while True:
            t, t_mono = time.time(), time.monotonic()
            page = await ct.list_contacts(page=p["page"], limit=self.page_limit)
            items = page.get("data") or []
            await self.learn(entry_from_item(item, t) for item in items)
            ids = [int(item["Contact"]["id"]) for item in items]
            p["seen"].update(ids)
            p["max"] = max([p["max"], *ids])
            if not items or p["page"] >= int(page.get("pageCount") or 1):
                break
            p["page"] += 1
        # contacts the listing no longer shows (deleted, their event lost) are forgotten
        gone = [
            deleted(cid, time.time())
            for cid, e in list(self.view.entries.items())
            if not e.get("deleted") and cid <= p["max"] and cid not in p["seen"] and e["v"] < p["started"]
        ]
        for g in gone:
            self.view.apply(g)
        # what events taught, and anything else the topic does not hold yet
        unsaved = [e for e in self.view.entries.values() if self._unsaved(e)]
        self.view.listed_upto = max(self.view.listed_upto, p["max"])
        self.view.paged_at = p["started"]
        await self._write(unsaved)
        await self._write_meta()
        self.tail_at = t_mono
        self._paging = None
        log.info("contact_index_paged", pages=p["page"], contacts=len(p["seen"]), forgotten=len(gone))

    async def _read_tail(self, ct: Any) -> bool:
        """Read every contact with an id above ``listed_upto`` (usually one request)."""
        t, t_mono = time.time(), time.monotonic()
        upto = self.view.listed_upto
        first = tail_page(self.view.count_upto(upto), self.page_limit)
        pages: dict[int, list[Any]] = {}
        counts: dict[int, int] = {}

        async def fetch(n: int) -> list[int] | None:
            page = await ct.list_contacts(page=n, limit=self.page_limit)
            items = page.get("data") or []
            pages[n] = items
            counts[n] = int(page.get("pageCount") or 1)
            ids = [int(i["Contact"]["id"]) for i in items]
            return ids if ids == sorted(ids) else None

        n = first
        while True:  # back while the page starts above what was listed (unseen deletions)
            ids = await fetch(n)
            if ids is None:
                log.warning("contact_index_order_unexpected", page=n)
                return False
            if n > 1 and (not ids or ids[0] > upto):
                n -= 1
                continue
            break
        n = first
        while len(pages[n]) >= self.page_limit and n < counts[n]:  # forward while pages are full
            n += 1
            if n not in pages and await fetch(n) is None:
                return False
        newer = [item for items in pages.values() for item in items if int(item["Contact"]["id"]) > upto]
        await self.learn(entry_from_item(item, t) for item in newer)
        unknown = [int(i["Contact"]["id"]) for i in newer]
        unknown = [cid for cid in unknown if not (self.view.get(cid) or {}).get("complete")]
        for cid in unknown[:TAIL_SHOWS]:
            shown = await ct.get_contact(cid)
            if shown is None:
                await self.learn([deleted(cid, time.time())])
            else:
                await self.learn([entry_from_show(shown, time.time())])
        if newer:
            self.view.listed_upto = max(upto, *(int(i["Contact"]["id"]) for i in newer))
            await self._write_meta()
        self.tail_at = t_mono
        return True
