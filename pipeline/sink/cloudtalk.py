"""CloudTalk effects: Kustomer customers into CloudTalk contacts (the contacts import).

**Import** (``cloudtalk.upsert_contact``, the CloudTalk sink; one lane per integration):

1. a customer version written by this integration's own Kustomer API key (``modifiedBy`` is the
   key's machine user) *and* exported from a CloudTalk contact (its ``externalId`` is the contact
   id) is the echo of an export: skipped (``own_write``). A customer the calls or SMS flow created
   for an unknown number carries no ``externalId``: it is imported like any other, so the caller
   has a name in CloudTalk next time;
2. a version not newer than the one applied for this customer (``rev``, else ``updatedAt``) is
   skipped (``stale_version``) — an older update never overwrites a newer one;
3. the target contact: the one this customer became before (ledger index); else the contact the
   customer was exported from (its ``externalId``; such a contact gets no Kustomer link or tag — it
   stays a CloudTalk contact whose own edits keep exporting); else a contact of an earlier import that
   matches the integration's merge key (ledger index); else a CloudTalk contact found by keyword
   lookup + exact match — one carrying this customer's link (left by a crash before the ledger
   commit), then one matching the merge key. With the contacts index
   (:mod:`pipeline.sink.contact_index`) a command that is not reconciled decides that last step
   from the index: a contact it names is shown (the edit needs its lists) and merged into; a
   customer it knows nobody holds is created without a search; only a value it cannot decide
   (a number an incomplete contact could hold as a second one; an index that is not fresh and
   cannot be refreshed) is searched for. A reconciled command (found ``started``, parked with
   ``reconcile``, replayed) and an ambiguous create always search, as before: the index does not
   record links. Every show and every write of the sink teaches the index;
4. the contact's content: every source customer's phones and e-mails (union, with what the
   contact already has — CloudTalk's edit replaces whole lists, so nothing is ever dropped), and
   the newest source's value of every other field; company name, favorite agent
   ("Created by" user → CloudTalk agent with the same e-mail) and country id are resolved once;
5. add the contact, or edit only the keys that differ; nothing differs → no request. Bulk work
   (``priority: bulk``) is written through ``POST /bulk/contacts.json``,
   up to ``bulk_max`` commands per request with the ledger's command ids as ``command_id``
   (:class:`~pipeline.sink.base.BulkEffects`: :meth:`CloudTalkEffects.prepare` is steps 1–4,
   :meth:`CloudTalkEffects.write` the request, each command settled on its own).

**Live first**: a bulk command (``priority: bulk`` — an initial import, a reconciliation) may only
take a request while the company's window has more than ``live_reserve`` requests left
(``CLOUDTALK_LIVE_RESERVE``): :meth:`CloudTalkEffects.ready_at` says so before it starts, and
every request it makes leaves the reserve (:func:`~pipeline.clients.http.leave_reserve`); at the
reserve it is parked until the window resets (reason ``reserve``), and live commands — a person's
edit, a customer the calls or SMS flow created — take what is left within seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import aiohttp

from pipeline.clients.cloudtalk import (
    BULK_MAX,
    BulkCommand,
    BulkResult,
    CloudTalkClient,
    ContactBody,
    ContactShow,
    ValidationError,
)
from pipeline.clients.http import (
    AmbiguousOutcomeError,
    ApiClient,
    DeferredError,
    RateWindow,
    RejectedError,
    RetryPolicy,
    create_or_find,
    leave_reserve,
)
from pipeline.core import limits
from pipeline.core.config import PipelineConfig
from pipeline.core.observability import get_logger, metrics
from pipeline.core.phones import normalize_e164
from pipeline.sink.base import Done, Write, is_bulk
from pipeline.sink.contact_index import (
    ContactIndexStore,
    Entry,
    decide,
    deleted,
    entry_from_item,
    entry_from_show,
    holds,
    make_entry,
)
from pipeline.sink.ledger import LedgerEntry, must_reconcile
from pipeline.sink.merge import (
    contact_body,
    ikey,
    is_newer,
    match_in_index,
    merge_sources,
    name_key,
)
from pipeline.sink.ports import CloudTalkApi, KustomerLookups

log = get_logger(__name__)

INDEX_RETRY_S = 60.0  # a contacts index that could not be loaded is tried again after this long
ITEM_RETRY_S = 2.0  # a bulk command that failed on its own is written again after this long


@dataclass(slots=True)
class ContactWrite:
    """What a command is to write (steps 1–4 decided): an add (``current`` None) or an edit of
    ``target`` with ``body``; the rest is what its result records in the ledger index."""

    integration: str
    customer_id: str
    version: Mapping[str, Any]
    target: str | None
    how: str
    current: ContactShow | None
    body: dict[str, Any]
    sources: dict[str, Any]
    merged: dict[str, Any]
    link: str | None
    contact: Mapping[str, Any]


def is_exported(command: Mapping[str, Any]) -> bool:
    """The customer was exported from a CloudTalk contact: the export writes the contact id, all
    digits, as its ``externalId`` (the calls and SMS flows write none)."""
    return str(command.get("external_id") or "").isdigit()


class CloudTalkEffects:
    target = "cloudtalk"
    command_schemas: Mapping[str, str] = {"cloudtalk.upsert_contact": "command.cloudtalk.upsert_contact"}

    def __init__(
        self,
        cloudtalk: CloudTalkApi,
        kustomer: Mapping[str, KustomerLookups],
        refresh_s: float = 600.0,
        settle_s: float = 20.0,
        index: ContactIndexStore | None = None,
        live_reserve: int = 10,
        bulk_max: int = BULK_MAX,
        bulk_counts_per_item: bool = True,
        complete_max: int = 1000,
    ) -> None:
        self.ct, self.kustomer = cloudtalk, kustomer
        # bulk work writes up to ``bulk_max`` contacts per request (≤ 1: one request per write);
        # a bulk request takes one operation per command from the window (the cautious reading)
        # or one in all
        self.bulk_max = max(1, min(bulk_max, BULK_MAX))
        self.bulk_counts_per_item = bulk_counts_per_item
        self._bulk_items = metrics().bulk_commands
        self.live_reserve = live_reserve  # requests of each window bulk commands leave to live ones
        self.index = index
        self.complete_max = complete_max  # see _completes
        self._asks = 0  # values asked about since the sink started
        self._index_retry_at = 0.0  # after a failed load: when to try loading the index again
        self.settle_s = settle_s
        self.refresh_s = refresh_s
        self._own_users: dict[str, str | None] = {}
        self._companies: dict[tuple[str, str], str | None] = {}
        self._users: dict[tuple[str, str], str | None] = {}
        self._agents: dict[str, int] | None = None
        self._agents_at = 0.0
        self._countries: dict[str, int] | None = None

    def ready_at(self, command: dict[str, Any]) -> float:
        """When the CloudTalk company's window takes the command's requests again (Unix seconds;
        0 = now): held, or spent — for a bulk command, down to the live reserve. A Kustomer org
        that is held makes only the commands that need it wait (when they ask)."""
        if not isinstance(self.ct, ApiClient):
            return 0.0
        return self.ct.executor.window.ready_at(leave=self.live_reserve if is_bulk(command) else 0)

    def forget(self, integration: str) -> None:
        """Drop what is cached about ``integration``'s Kustomer org (its client was rebuilt)."""
        self._own_users.pop(integration, None)
        for cache in (self._companies, self._users):
            for key in [k for k in cache if k[0] == integration]:
                del cache[key]

    # -- lookups (cached) ------------------------------------------------------------------------
    async def own_user(self, integration: str) -> str | None:
        if integration not in self._own_users:
            client = self.kustomer.get(integration)
            self._own_users[integration] = await client.own_user_id() if client is not None else None
        return self._own_users[integration]

    async def company_name(self, integration: str, company_id: str) -> str | None:
        key = (integration, company_id)
        if key not in self._companies:
            company = await self.kustomer[integration].get_company(company_id)
            self._companies[key] = ((company or {}).get("attributes") or {}).get("name")
        return self._companies[key]

    async def favorite_agent(self, integration: str, user_id: str) -> int | None:
        key = (integration, user_id)
        if key not in self._users:
            user = await self.kustomer[integration].get_user(user_id)
            self._users[key] = (((user or {}).get("attributes") or {}).get("email") or "").lower() or None
        email = self._users[key]
        if not email:
            return None
        if self._agents is None or time.monotonic() - self._agents_at > self.refresh_s:
            agents: dict[str, int] = {}
            async for page in self.ct.iter_agents():
                for item in page.get("data") or []:
                    a: Mapping[str, Any] = item.get("Agent") or item
                    if a.get("email"):
                        agents[a["email"].lower()] = int(a["id"])
            self._agents, self._agents_at = agents, time.monotonic()
        return self._agents.get(email)

    async def country_id(self, country: Mapping[str, Any] | None) -> int | None:
        if not country:
            return None
        if self._countries is None:
            table: dict[str, int] = {}
            for c in await self.ct.list_countries():
                for k in (c.get("country_code"), c.get("iso3"), c.get("name")):
                    if k:
                        table[str(k).casefold()] = int(c["id"])
            self._countries = table
        for wanted in (country.get("code"), country.get("name")):
            if wanted and str(wanted).casefold() in self._countries:
                return self._countries[str(wanted).casefold()]
        return None

    async def resolve(self, integration: str, contact: Mapping[str, Any]) -> dict[str, Any]:
        """The command's contact with company, favorite agent and country resolved."""
        company = contact.get("company")
        if not company and contact.get("company_ref"):
            company = await self.company_name(integration, contact["company_ref"])
        agent = (
            await self.favorite_agent(integration, contact["created_by_ref"]) if contact.get("created_by_ref") else None
        )
        return {
            "name": contact["name"],
            "company": limits.clip(company or None, limits.CLOUDTALK_CONTACT_FIELDS["company"]),
            "website": contact.get("website"),
            "address": contact.get("address"),
            "city": contact.get("city"),
            "zip": contact.get("zip"),
            "state": contact.get("state"),
            "country_id": await self.country_id(contact.get("country")),
            "favorite_agent": agent,
            "phones": list(contact["phones"]),
            "emails": list(contact["emails"]),
            "link": contact.get("external_url"),
        }

    # -- finding the contact -----------------------------------------------------------------------
    async def _learn(self, contact_id: int | str, shown: ContactShow | None) -> None:
        """Teach the contacts index what a show said (the contact, or that it is gone)."""
        if self.index is not None:
            fact = deleted(contact_id, time.time()) if shown is None else entry_from_show(shown, time.time())
            await self.index.learn([fact])

    async def _candidates(self, keyword: str, accept: Callable[..., bool]) -> list[ContactShow]:
        """Contacts found by ``keyword`` whose show ``responseData`` passes ``accept`` (oldest first)."""
        page = await self.ct.list_contacts(keyword=keyword, limit=100)
        out: list[ContactShow] = []
        for item in sorted(page.get("data") or [], key=lambda x: int(x["Contact"]["id"])):
            shown = await self.ct.get_contact(item["Contact"]["id"])
            await self._learn(item["Contact"]["id"], shown)
            if shown is not None and accept(shown):
                out.append(shown)
        return out

    async def _index_ready(self) -> bool:
        """The contacts index is loaded (the first call loads it); False: decide as without it.
        A load that failed is tried again after ``INDEX_RETRY_S``, not for every command."""
        if self.index is None or time.monotonic() < self._index_retry_at:
            return False
        try:
            await self.index.start()
        except Exception as exc:  # noqa: BLE001 - without the index the sink asks CloudTalk, as before
            self._index_retry_at = time.monotonic() + INDEX_RETRY_S
            log.warning("contact_index_unavailable", error=f"{type(exc).__name__}: {exc}", retry_in_s=INDEX_RETRY_S)
            return False
        return True

    async def _ask(self, probe: tuple[str, str], need_complete: bool) -> None:
        """Search CloudTalk for one value the index cannot decide; show every candidate the index
        does not know to hold that exact value (``need_complete``: known in full), so the index
        is exact for it afterwards."""
        assert self.index is not None
        fetched = time.time()
        page = await self.ct.list_contacts(keyword=probe[1], limit=100)
        items = sorted(page.get("data") or [], key=lambda x: int(x["Contact"]["id"]))
        await self.index.learn(entry_from_item(item, fetched) for item in items)
        for item in items:
            cid = item["Contact"]["id"]
            entry = self.index.view.get(cid)
            if holds(entry, probe) and (not need_complete or (entry or {}).get("complete")):
                continue
            await self._learn(cid, await self.ct.get_contact(cid))

    def _completes(self, kind: str) -> bool:
        """Whether bulk work should show every contact the index knows only in part (that could
        hide a ``kind`` value) instead of asking CloudTalk about one value: there are at most
        ``complete_max`` of them, or no more than the values asked about so far. Each ask costs a
        request per new value, a completion one per such contact once, so the sink never spends
        more than about twice the cheaper of the two."""
        assert self.index is not None
        view = self.index.view
        n = len(view.open_numbers if kind == "phone" else view.open_emails)
        return 0 < n <= max(self.complete_max, self._asks)

    async def _complete(self, kind: str) -> None:
        """Show every contact the index knows only in part that could hide a ``kind`` value (oldest
        first; each show teaches the index at once, so a completion cut short by the window goes on
        where it stopped)."""
        assert self.index is not None
        view = self.index.view
        ids = sorted(view.open_numbers if kind == "phone" else view.open_emails)
        log.info("contact_index_completing", contacts=len(ids), values=kind, asked_before=self._asks)
        for cid in ids:
            if cid in view.open_numbers or cid in view.open_emails:  # not completed meanwhile
                await self._learn(cid, await self.ct.get_contact(cid))
                self.index.decisions.labels("completed").inc()

    async def find_by_index(
        self, merge_key: str, contact: Mapping[str, Any], bulk: bool = False
    ) -> tuple[str | None, str, ContactShow | None]:
        """The contact a customer merges into, decided from the contacts index (asking CloudTalk
        only what it cannot decide): ``(id, "merged", its show)`` or ``(None, "created", None)``.
        ``bulk``: the command is bulk work, which completes the index rather than ask when that
        is cheaper (:meth:`_completes`)."""
        assert self.index is not None
        index = self.index
        phones = list(contact["phones"])
        emails = [e.lower() for e in contact["emails"]]
        name = contact.get("name")
        asked: set[tuple[str, str]] = set()
        refreshed = False
        for _ in range(2 * (len(phones) + len(emails)) + 6):
            d = decide(index.view, merge_key, phones, emails, name, fresh=index.fresh(), asked=asked)
            if d.kind == "miss":
                index.decisions.labels("miss").inc()
                return None, "created", None
            if d.kind == "hit" and d.contact_id is not None and d.probe is not None:
                shown = await self.ct.get_contact(d.contact_id)
                await self._learn(d.contact_id, shown)
                if shown is not None and holds(entry_from_show(shown, 0.0), d.probe):
                    index.decisions.labels("hit").inc()
                    return d.contact_id, "merged", shown
                continue  # the index was behind: decide again with what the show said
            assert d.probe is not None
            if d.stale and not refreshed:
                refreshed = True
                index.decisions.labels("refreshed").inc()
                if await index.refresh(self.ct):
                    continue
            if bulk and not d.stale and d.probe[0] in ("phone", "email") and self._completes(d.probe[0]):
                await self._complete(d.probe[0])
                continue
            index.decisions.labels("asked").inc()
            self._asks += 1
            await self._ask(d.probe, need_complete=merge_key == "phone_and_email")
            asked.add(d.probe)
        target, how = await self.find_in_cloudtalk(merge_key, contact, None)
        return target, how, None

    async def find_in_cloudtalk(
        self, merge_key: str, contact: Mapping[str, Any], link: str | None
    ) -> tuple[str | None, str]:
        phones = list(contact["phones"])
        emails = [e.lower() for e in contact["emails"]]

        def numbers(shown: Mapping[str, Any]) -> set[str]:
            return {n for n in (normalize_e164(x) for x in shown["Contact"].get("contact_numbers") or []) if n}

        def has_link(shown: Mapping[str, Any]) -> bool:
            return bool(link) and any(x.get("url") == link for x in shown.get("ExternalUrl") or [])

        for phone in phones:  # a contact of ours a crash left unrecorded, or one holding the number
            found = await self._candidates(phone, lambda s, p=phone: p in numbers(s))
            mine = [s for s in found if has_link(s)]
            if mine:
                return mine[0]["Contact"]["id"], "reconciled"
            if merge_key in ("phone", "phone_or_name") and found:
                return found[0]["Contact"]["id"], "merged"
            if merge_key == "phone_and_email" and emails:
                both = [s for s in found if {e.lower() for e in s["Contact"].get("contact_emails") or []} & set(emails)]
                if both:
                    return both[0]["Contact"]["id"], "merged"
        if merge_key == "email":
            for email in emails:
                found = await self._candidates(
                    email, lambda s, e=email: e in {x.lower() for x in s["Contact"].get("contact_emails") or []}
                )
                if found:
                    return found[0]["Contact"]["id"], "merged"
        if merge_key == "phone_or_name" and contact.get("name"):
            wanted = name_key(contact["name"])
            found = await self._candidates(
                contact["name"], lambda s: name_key(s["Contact"].get("name") or "") == wanted
            )
            if found:
                return found[0]["Contact"]["id"], "merged"
        return None, "created"

    # -- the effect ----------------------------------------------------------------------------
    async def perform(self, command: dict[str, Any], prior: LedgerEntry | None, index: Mapping[str, Any]) -> Done:
        if not is_bulk(command):
            return await self._perform(command, prior, index)
        with leave_reserve(self.live_reserve):  # at the reserve: DeferredError("reserve"), parked
            return await self._perform(command, prior, index)

    async def _perform(self, command: dict[str, Any], prior: LedgerEntry | None, index: Mapping[str, Any]) -> Done:
        planned = await self._plan(command, prior, index)
        if isinstance(planned, Done):
            return planned
        body, link, contact = planned.body, planned.link, planned.contact
        # 5. write only what differs
        if planned.current is None:

            async def find_ours() -> str | None:
                found_id, how_found = await self.find_in_cloudtalk("none", contact, link)
                return found_id if how_found == "reconciled" else None

            new_id, found = await create_or_find(
                lambda: self.ct.add_contact(cast(ContactBody, body)), find_ours, settle_s=self.settle_s
            )
            if not found:
                await self._learn_write(str(new_id), body, None)
            return self._done(planned, str(new_id), "reconciled" if found else "created")
        target = cast(str, planned.target)  # a contact was shown, so it has an id
        if not await self.ct.edit_contact(target, cast(ContactBody, body)):
            raise RejectedError("cloudtalk", "contacts.edit", 404, f"contact {target} disappeared")
        await self._learn_write(target, body, planned.current)
        return self._done(planned, target, planned.how or "updated")

    async def _plan(
        self, command: dict[str, Any], prior: LedgerEntry | None, index: Mapping[str, Any]
    ) -> Done | ContactWrite:
        """Steps 1–4 and the choice of 5: a :class:`Done` when nothing is to be written, else the
        write to make (an add when ``current`` is None, else an edit of ``target``)."""
        integration, customer_id = command["integration"], command["customer_id"]
        version, contact = command["version"], command["contact"]
        if integration not in self.kustomer:
            raise RejectedError("cloudtalk", command["type"], None, f"integration {integration!r} is not configured")
        # 1. the echo of our own export to Kustomer (not a customer the calls flow created)
        if (
            is_exported(command)
            and command.get("modified_by")
            and command["modified_by"] == await self.own_user(integration)
        ):
            return Done({}, "skipped:own_write")
        # 2. versions apply in order
        known = index.get(ikey(integration, "customer", customer_id))
        if known and not is_newer(version, known):
            return Done({"contact_id": known["contact_id"]}, "skipped:stale_version")
        # 3. the target contact
        target, how = (known["contact_id"], "updated") if known else (None, "")
        current = None
        # a customer exported from a CloudTalk contact carries the contact id as its externalId:
        # that contact is updated, and stays a CloudTalk contact (no Kustomer link, no tag), so
        # its own later edits keep exporting
        exported = is_exported(command)
        if not target and exported:
            current = await self.ct.get_contact(command["external_id"])
            if current is not None:
                target, how = command["external_id"], "updated"
        if exported and target == command.get("external_id"):
            contact = {**contact, "external_url": None, "tag": None}
        if not target:
            target = match_in_index(index, integration, command["merge_key"], contact)
            how = "merged" if target else ""
        link = (contact.get("external_url") or {}).get("url")
        if not target:
            if not must_reconcile(prior) and await self._index_ready():
                target, how, current = await self.find_by_index(command["merge_key"], contact, is_bulk(command))
            else:  # a command that may have run before: look for a contact carrying its link
                target, how = await self.find_in_cloudtalk(command["merge_key"], contact, link)
        if target and current is None:
            current = await self.ct.get_contact(target)
            await self._learn(target, current)
            if current is None:  # deleted in CloudTalk meanwhile: create it again
                target, how = None, "created"
        # 4. content
        fields = await self.resolve(integration, contact)
        sources = dict((index.get(ikey(integration, "contact", target)) or {}).get("sources") or {}) if target else {}
        sources[customer_id] = {"rev": version.get("rev"), "updated_at": version["updated_at"], "fields": fields}
        merged = merge_sources(sources)
        body = contact_body(merged, current, contact.get("tag"))
        planned = ContactWrite(
            integration, customer_id, version, target, how, current, body, sources, merged, link, contact
        )
        if current is not None and not body:  # nothing differs: no request
            return self._done(planned, cast(str, target), "skipped:unchanged" if how != "reconciled" else "reconciled")
        return planned

    def _done(self, w: ContactWrite, target: str, outcome: str, **steps: Any) -> Done:
        """The command's result once its contact is ``target``: the ledger index learns which
        contact the customer, its values and its sources map to."""
        updates: dict[str, Any] = {
            ikey(w.integration, "customer", w.customer_id): {
                "contact_id": target,
                "rev": w.version.get("rev"),
                "updated_at": w.version["updated_at"],
            },
            ikey(w.integration, "contact", target): {"sources": w.sources},
            **{ikey(w.integration, "phone", p): target for p in w.merged["phones"]},
            **{ikey(w.integration, "email", e.lower()): target for e in w.merged["emails"]},
        }
        if w.merged.get("name"):
            updates[ikey(w.integration, "name", name_key(w.merged["name"]))] = target
        return Done(
            {"contact_id": target, "customers": sorted(w.sources), "sent": sorted(w.body), **steps}, outcome, updates
        )

    # -- writing in bulk (imports and reconciliations; see pipeline.sink.base.BulkEffects) ------
    def wants_bulk(self, command: dict[str, Any], prior: LedgerEntry | None) -> bool:
        """Bulk work goes through the bulk endpoint — also when it is reconciled after a crash:
        its lookups are made while it is prepared, before its write joins the group. A person's
        edit and a customer the calls flow created are written at once."""
        return self.bulk_max > 1 and is_bulk(command)

    def depends_on(self, command: dict[str, Any]) -> frozenset[str]:
        """What the command's decisions read: its customer, numbers, e-mails and name (the merge
        keys), and the contact it was exported from."""
        contact = command.get("contact") or {}
        keys = {f"customer:{command.get('integration')}:{command.get('customer_id')}"}
        keys.update(f"phone:{p}" for p in contact.get("phones") or [])
        keys.update(f"email:{str(e).lower()}" for e in contact.get("emails") or [])
        if contact.get("name"):
            keys.add(f"name:{name_key(contact['name'])}")
        if is_exported(command):
            keys.add(f"contact:{command['external_id']}")
        return frozenset(keys)

    def room(self, waiting: int) -> bool:
        """One more write may be prepared while ``waiting`` wait: the company's window (above
        the live reserve) still takes the bulk request it makes and a read or two of preparing
        it. Otherwise the group is sent first, so prepared writes are not parked (and their
        reads repeated) because the window ran out under them."""
        if not isinstance(self.ct, ApiClient):
            return True
        spare = self.ct.executor.window.spare(leave=self.live_reserve)
        return spare is None or spare >= self._cost(waiting + 1) + 2

    def _cost(self, writes: int) -> int:
        return writes if self.bulk_counts_per_item else 1

    async def prepare(
        self, command: dict[str, Any], prior: LedgerEntry | None, index: Mapping[str, Any]
    ) -> Done | Write:
        with leave_reserve(self.live_reserve):
            planned = await self._plan(command, prior, index)
        if isinstance(planned, Done):
            return planned
        cid = command["command_id"]
        if planned.current is None:
            item: dict[str, Any] = {"action": "add_contact", "command_id": cid, "data": dict(planned.body)}
        else:
            item = {"action": "edit_contact", "command_id": cid, "data": {"id": planned.target, **planned.body}}
        touches = {f"phone:{p}" for p in planned.merged["phones"]}
        touches.update(f"email:{e.lower()}" for e in planned.merged["emails"])
        if planned.merged.get("name"):
            touches.add(f"name:{name_key(planned.merged['name'])}")
        if planned.target:
            touches.add(f"contact:{planned.target}")
        return Write(cid, item, frozenset(touches), planned)

    async def write(self, writes: Sequence[Write]) -> list[Done | Exception]:
        """One ``POST /bulk/contacts.json`` for ``writes`` (command ids as ``command_id``), each
        settled on its own: added or edited → done; 404 on an edit → rejected (the contact is
        gone), 406 → rejected with CloudTalk's reasons; 429 → parked (not applied); another
        failure → parked to be written again, an add after looking for it first. A request whose
        outcome is unknown (a timeout, a lost answer) parks every write ``unsettled``: each looks
        its contact up by its link before anything is written again — as a crash between the
        request and the commit does through the ledger."""
        items = cast(list[BulkCommand], [w.item for w in writes])
        try:
            with leave_reserve(self.live_reserve):
                answers = await self.ct.bulk_contacts(items, cost=self._cost(len(items)))
        except AmbiguousOutcomeError as exc:
            until = time.time() + max(0.0, exc.sent_at + self.settle_s - time.monotonic())
            log.warning(
                "bulk_outcome_unknown", commands=len(items), error=str(exc), settle_s=round(until - time.time(), 1)
            )
            self._bulk_items.labels(self.target, "unknown").inc(len(items))
            return [DeferredError("unsettled", until, unsettled=True) for _ in writes]
        except (DeferredError, RejectedError) as exc:
            self._bulk_items.labels(self.target, "deferred" if isinstance(exc, DeferredError) else "rejected").inc(
                len(items)
            )
            return [exc for _ in writes]
        learned: list[Entry] = []  # what the index learns: one write for the request
        results = [self._settle_item(w, answer, len(items), learned) for w, answer in zip(writes, answers, strict=True)]
        if learned and self.index is not None:
            await self.index.learn(learned)
        return results

    def _settle_item(self, w: Write, answer: BulkResult, size: int, learned: list[Entry]) -> Done | Exception:
        planned: ContactWrite = w.context
        action, status = w.item["action"], int(answer.get("status") or 0)
        op = f"contacts.bulk.{action}"
        if status in (200, 201):
            self._bulk_items.labels(self.target, "done").inc()
            if action == "add_contact":
                new_id = str((answer.get("data") or {}).get("id") or "")
                if not new_id.isdigit():  # applied, id unknown: look it up by its link
                    return DeferredError("unsettled", time.time(), unsettled=True)
                learned.append(written_entry(new_id, planned.body, None))
                return self._done(planned, new_id, "created", bulk=size)
            target = cast(str, planned.target)
            learned.append(written_entry(target, planned.body, planned.current))
            return self._done(planned, target, planned.how or "updated", bulk=size)
        message = str(answer.get("message") or f"HTTP {status}")
        if status == 404 and action == "edit_contact":
            self._bulk_items.labels(self.target, "rejected").inc()
            return RejectedError("cloudtalk", op, 404, f"contact {planned.target} disappeared")
        if 400 <= status < 500 and status != 429:  # 406 and the like: refused for good
            self._bulk_items.labels(self.target, "rejected").inc()
            fields = answer.get("data") if isinstance(answer.get("data"), dict) else {}
            return ValidationError(
                "cloudtalk", op, status, f"{message} {fields}" if fields else message, answer, fields
            )
        # 429 or a failure of this command alone: written again later (an add looks for itself first)
        self._bulk_items.labels(self.target, "retry").inc()
        log.info("bulk_command_retry", command_id=w.command_id, action=action, status=status)
        return DeferredError(
            "rate_limited" if status == 429 else "retry",
            time.time() + ITEM_RETRY_S,
            unsettled=action == "add_contact" and status != 429,
        )

    async def _learn_write(self, target: str, body: Mapping[str, Any], current: ContactShow | None) -> None:
        """Teach the contacts index what the sink wrote (:func:`written_entry`)."""
        if self.index is not None:
            await self.index.learn([written_entry(target, body, current)])


def written_entry(target: str, body: Mapping[str, Any], current: ContactShow | None) -> Entry:
    """The index entry of a contact the sink wrote: the add's body, or the contact as shown with
    the edit applied (an edit sends whole lists), complete either way."""
    cur: Mapping[str, Any] = cast(Mapping[str, Any], current["Contact"]) if current else {}
    numbers = (
        [x["public_number"] for x in body["ContactNumber"]]
        if "ContactNumber" in body
        else list(cur.get("contact_numbers") or [])
    )
    emails = [x["email"] for x in body["ContactEmail"]] if "ContactEmail" in body else cur.get("contact_emails")
    return make_entry(
        target,
        body.get("name") or cur.get("name"),
        body.get("company") or cur.get("company"),
        numbers,
        list(emails or []),
        complete=True,
        v=time.time(),
        src="write",
    )


def cloudtalk_sink_client(
    session: aiohttp.ClientSession, config: PipelineConfig, policy: RetryPolicy, window: RateWindow | None = None
) -> CloudTalkClient:
    ct = config.cloudtalk
    window = window or RateWindow(reserve=0, fallback_per_minute=ct.rate_limit_per_minute)
    return CloudTalkClient.from_credentials(
        session, ct.base_url, ct.key_id.value(), ct.key_secret.value(), window=window, policy=policy
    )
