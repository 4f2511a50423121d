"""Kustomer effects: conversations with their notes, and customers (export).

``kustomer.log_conversation`` (calls and SMS) — for a call, the details its note states are kept
in the ledger's index (:func:`call_key`):

1. customer — the ledger's id, else the one the index remembers for the number
   (:func:`customer_key`), else ``GET /v1/customers/phone={phone}``, else create it (when the
   command allows); a 409 (someone else created it meanwhile) is resolved by the lookup.
   Commands for one number share a lane (and a ledger partition), so several events for a new
   number create it once, and a known number costs no lookup: a logged call is a conversation and
   a note. A remembered customer Kustomer refuses (the conversation's create or search answers 400
   or 404: deleted, merged into another) is looked up again within the command, and the index
   follows; one remembered longer than ``customer_recheck_s`` is looked up again too (a number
   moved to another customer).
2. conversation — externalId ``cloudtalk-call-{id}`` / ``cloudtalk-sms-{id}``. When the command
   was started before, the customer's conversations are searched for that externalId first.
3. note — the marker line (``CloudTalk call {id}``) identifies it; when the conversation was
   found rather than created, its notes are searched for the marker first.

Creates of conversations and notes are paced to Kustomer's 120 per minute per customer. A create
whose outcome is unknown (timeout, lost connection, a 5xx other than 503) is never repeated
blindly: after a settle time the resource is looked up by the same key, and created again only
when it is absent. A 429 or a 503 says the create did not happen: it is simply sent again.

``kustomer.update_call_details`` (a call's tags, notes, rating, recording or conversation
intelligence changed after it was logged): what differs from what the call's notes state (the
index) gets one note, marked ``CloudTalk call {id} · details updated ({version})`` — the version
is the event id's, so a redelivery, a replay or the poller seeing the same details again adds
nothing. A call logged before the index knew it is looked up (customer by phone, conversation by
externalId) and every stated detail counts as new; a call not logged (yet) is skipped
(``skipped:call_not_logged``: the details reach its note when the call-ended event carries them, or
the calls poller's next snapshot).

When Kustomer makes a command wait longer than the sink's batch budget (the org's window is
spent, the org is out of service, the customer's limit is reached) the command is parked with the
ids written so far (``DeferredError.steps``) and resumes from there; the org's
:class:`~pipeline.clients.http.RateWindow` holds the org meanwhile (:meth:`KustomerEffects.ready_at`),
so commands of other orgs — and of other customers — go on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from pipeline.clients.http import ApiClient, DeferredError, KeyedLimiter, RejectedError, create_or_find
from pipeline.clients.kustomer import ConflictError
from pipeline.core.call_details import changed
from pipeline.core.observability import get_logger, metrics
from pipeline.core.phones import normalize_e164
from pipeline.sink.base import Done
from pipeline.sink.ledger import LedgerEntry, must_reconcile
from pipeline.sink.ports import KustomerApi

log = get_logger(__name__)

# A remembered customer is looked up again after this long: a number an agent moved to another
# customer (or a merge Kustomer still answers for) follows within a day.
CUSTOMER_RECHECK_S = 24 * 3600.0
# What Kustomer answers a conversation create or search for a customer it no longer has (the
# simulator: 400 "customer … does not exist" on a create, 404 on a search)
CUSTOMER_GONE_STATUSES = frozenset({400, 404})


class KustomerEffects:
    target = "kustomer"
    command_schemas: Mapping[str, str] = {
        "kustomer.log_conversation": "command.kustomer.log_conversation",
        "kustomer.upsert_customer": "command.kustomer.upsert_customer",
        "kustomer.update_call_details": "command.kustomer.update_call_details",
    }

    def __init__(
        self,
        clients: Mapping[str, KustomerApi],
        per_customer_per_minute: int = 120,
        settle_s: float = 20.0,
        reread_secrets: Callable[[], bool] | None = None,
        customer_recheck_s: float = CUSTOMER_RECHECK_S,
    ) -> None:
        self.clients = clients  # may change between commands (a reloaded integrations file)
        self.settle_s = settle_s
        self.customer_recheck_s = customer_recheck_s
        found = metrics().kustomer_customers  # how a number's customer was found, by result
        self._customers = {r: found.labels(r) for r in ("remembered", "looked_up", "refused")}
        # a 401: read the integrations file and its secrets again (a rotated key rebuilds the client)
        self.reread_secrets = reread_secrets
        self.conversation_limit = KeyedLimiter(per_customer_per_minute, 60.0)
        self.note_limit = KeyedLimiter(per_customer_per_minute, 60.0)

    def client(self, command: dict[str, Any]) -> KustomerApi:
        client = self.clients.get(command["integration"])
        if client is None:
            raise RejectedError(
                "kustomer",
                command["type"],
                None,
                f"integration {command['integration']!r} is not configured in this sink",
            )
        return client

    def ready_at(self, command: dict[str, Any]) -> float:
        """When the command's Kustomer org takes requests again (Unix seconds; 0 = now)."""
        client = self.clients.get(command.get("integration", ""))
        return client.executor.window.ready_at() if isinstance(client, ApiClient) else 0.0

    async def perform(self, command: dict[str, Any], prior: LedgerEntry | None, index: Mapping[str, Any]) -> Done:
        """A 401 (the key was rotated, say) reads the secrets again once: with a new key the
        command goes on from where it stopped (a 401 is a request that did not happen); otherwise
        it is dead-lettered as before."""
        steps: dict[str, Any] = dict(prior.steps) if prior else {}
        used = self.clients.get(command["integration"])
        try:
            return await self._perform(command, prior, index, steps)
        except RejectedError as exc:
            if exc.status != 401 or self.reread_secrets is None:
                raise
            self.reread_secrets()
            if self.clients.get(command["integration"]) is used:  # no new key (or the file's watch had it)
                raise
        return await self._perform(command, prior, index, steps)

    async def _perform(
        self, command: dict[str, Any], prior: LedgerEntry | None, index: Mapping[str, Any], steps: dict[str, Any]
    ) -> Done:
        if command["type"] in ("kustomer.log_conversation", "kustomer.update_call_details"):
            try:
                if command["type"] == "kustomer.log_conversation":
                    return await self.log_conversation(command, prior, steps, index)
                return await self.update_call_details(command, prior, index, steps)
            except DeferredError as exc:
                exc.steps = steps  # parked with what was written so far
                raise
        return await export_customer(self.client(command), command, prior, index, self.settle_s)

    # -- calls and SMS -------------------------------------------------------------------------
    async def log_conversation(
        self,
        command: dict[str, Any],
        prior: LedgerEntry | None,
        steps: dict[str, Any] | None = None,
        index: Mapping[str, Any] | None = None,
    ) -> Done:
        """``steps`` (the prior's by default) is filled in as effects are written; ``index`` is the
        ledger's (the customers remembered per number, the calls logged)."""
        client = self.client(command)
        steps = (dict(prior.steps) if prior else {}) if steps is None else steps
        index = {} if index is None else index
        reconcile = must_reconcile(prior)
        outcome = "created"
        integration = command["integration"]
        wanted = command["customer"]
        ckey = customer_key(integration, wanted["phone"])

        # 1. customer
        customer_id = steps.get("customer_id")
        looked_up = False  # in this attempt: a refusal of it is not a stale memory
        if not customer_id:
            customer_id = remembered_customer(index, ckey, time.time(), self.customer_recheck_s)
            if customer_id:
                self._customers["remembered"].inc()
            else:
                customer_id, looked_up = await self._find_or_create_customer(client, wanted, steps), True
                self._customers["looked_up"].inc()
            if not customer_id:
                return Done(steps, "skipped:customer_not_found", forget(index, ckey))
            steps["customer_id"] = customer_id

        # 2. conversation
        conv = command["conversation"]
        conversation_id = steps.get("conversation_id")
        # a conversation known from the steps may have its note already when the command must be
        # reconciled (it was started again, or parked after a note create with an unknown outcome)
        look_for_note = bool(conversation_id) and reconcile
        found_existing = False
        if not conversation_id:
            try:
                conversation_id, found_existing = await self._conversation(
                    client, integration, customer_id, conv, reconcile
                )
            except RejectedError as exc:
                if looked_up or exc.status not in CUSTOMER_GONE_STATUSES:
                    raise
                # the customer the index (or an earlier attempt) gave may be gone: deleted, or merged
                # into another. The refused request did not happen; the number is looked up again.
                stale = customer_id
                self._customers["refused"].inc()
                del steps["customer_id"]
                customer_id = await self._find_or_create_customer(client, wanted, steps)
                log.info(
                    "kustomer_customer_refused",
                    integration=integration,
                    customer_id=stale,
                    status=exc.status,
                    now=customer_id,
                )
                if not customer_id:
                    return Done(steps, "skipped:customer_not_found", forget(index, ckey))
                if customer_id == stale:  # the customer is there: the refusal stands
                    raise
                steps["customer_id"] = customer_id
                conversation_id, found_existing = await self._conversation(
                    client, integration, customer_id, conv, reconcile
                )
        steps["conversation_id"] = conversation_id
        if found_existing:
            steps["conversation_found"] = True  # kept if the note parks the command: still reconciled

        # 3. note
        note_id = steps.get("note_id")
        if found_existing or note_id or steps.get("conversation_found"):
            outcome = "reconciled"
        if not note_id:
            note_id, found_note = await self._note(
                client, integration, customer_id, conversation_id, command["note"], found_existing or look_for_note
            )
            if found_note:
                outcome = "reconciled"
        steps["note_id"] = note_id
        updates = self._remember(index, ckey, customer_id)
        if "details" not in command:
            return Done(steps, outcome, updates)
        # a call: what its note states, for the changes that come later
        known = {"customer_id": customer_id, "conversation_id": conversation_id, "details": command["details"]}
        return Done(steps, outcome, {**updates, call_key(integration, conv["externalId"]): known})

    def _remember(self, index: Mapping[str, Any], key: str, customer_id: str) -> dict[str, Any]:
        """The index update that makes ``customer_id`` the number's remembered customer; none when
        the index holds it already (and it is not due for a look-up)."""
        if remembered_customer(index, key, time.time(), self.customer_recheck_s) == customer_id:
            return {}
        return {key: {"id": customer_id, "at": round(time.time(), 3)}}

    async def _find_or_create_customer(
        self, client: KustomerApi, wanted: dict[str, Any], steps: dict[str, Any]
    ) -> str | None:
        """The number's customer: looked up, else created when the command allows it (None when
        it does not)."""
        found = await client.find_customer_by_phone(wanted["phone"])
        if found is not None:
            return found["id"]
        if not wanted["create"]:
            return None
        attributes = {
            "name": wanted.get("name") or wanted["phone"],
            "phones": [{"type": "mobile", "phone": wanted["phone"]}],
        }
        try:
            customer, found_it = await create_or_find(
                lambda: client.create_customer(attributes),
                lambda: client.find_customer_by_phone(wanted["phone"]),
                settle_s=self.settle_s,
            )
            steps["customer_created"] = not found_it
            return customer["id"]
        except ConflictError:
            found = await client.find_customer_by_phone(wanted["phone"])
            if found is None:
                raise
            return found["id"]

    async def _conversation(
        self, client: KustomerApi, integration: str, customer_id: str, conv: dict[str, Any], reconcile: bool
    ) -> tuple[str, bool]:
        """The customer's conversation with ``conv["externalId"]``: looked up first when the command
        must be reconciled, else created (paced, an unknown outcome looked up rather than
        repeated). Returns its id and whether it was found rather than created."""
        if reconcile:
            found = await self._find_conversation(client, customer_id, conv["externalId"])
            if found:
                return found, True
        await self.conversation_limit.acquire(f"{integration}|{customer_id}")
        body = {
            "customer": customer_id,
            "name": conv["name"],
            "status": conv["status"],
            "direction": conv["direction"],
            "externalId": conv["externalId"],
        }

        async def find_conversation() -> dict[str, Any] | None:
            cid = await self._find_conversation(client, customer_id, conv["externalId"])
            return {"id": cid} if cid else None

        created, found_it = await create_or_find(
            lambda: client.create_conversation(body), find_conversation, settle_s=self.settle_s
        )
        return created["id"], found_it

    async def update_call_details(
        self, command: dict[str, Any], prior: LedgerEntry | None, index: Mapping[str, Any], steps: dict[str, Any]
    ) -> Done:
        """A "details updated" note on the call's conversation when the details differ from what
        its notes state (the index, kept per call); nothing otherwise."""
        client = self.client(command)
        integration, external_id = command["integration"], command["conversation"]["externalId"]
        key = call_key(integration, external_id)
        known = index.get(key)
        updates: dict[str, Any] = {}
        if known is not None:
            customer_id, conversation_id, stated = known["customer_id"], known["conversation_id"], known["details"]
        else:
            # logged before its details were followed (or not yet): the conversation is looked up
            customer_id = steps.get("customer_id")
            conversation_id = steps.get("conversation_id")
            if not conversation_id:
                customer_id, conversation_id, updates = await self._find_call(
                    client, integration, command["customer"]["phone"], external_id, index
                )
            if not conversation_id:
                return Done({}, "skipped:call_not_logged", updates)
            steps["customer_id"], steps["conversation_id"] = customer_id, conversation_id
            stated = {}
        differs = changed(stated, command["details"])
        if not differs:
            return Done({"conversation_id": conversation_id}, "skipped:unchanged", updates)
        steps["conversation_id"] = conversation_id
        note_id = steps.get("note_id")
        outcome = "updated"
        if not note_id:
            note_id, found_note = await self._note(
                client, integration, customer_id, conversation_id, command["note"], must_reconcile(prior)
            )
            outcome = "reconciled" if found_note else outcome
        steps["note_id"] = note_id
        steps["changed"] = sorted(differs)
        now = {"customer_id": customer_id, "conversation_id": conversation_id, "details": {**stated, **differs}}
        return Done(steps, outcome, {**updates, key: now})

    async def _find_call(
        self, client: KustomerApi, integration: str, phone: str, external_id: str, index: Mapping[str, Any]
    ) -> tuple[str | None, str | None, dict[str, Any]]:
        """A logged call's customer and conversation, by the number's customer (the remembered one
        first, then a lookup when that is gone or does not have it), with the index updates."""
        ckey = customer_key(integration, phone)
        remembered = remembered_customer(index, ckey, time.time(), self.customer_recheck_s)
        if remembered:
            try:
                conversation_id = await self._find_conversation(client, remembered, external_id)
            except RejectedError as exc:
                if exc.status not in CUSTOMER_GONE_STATUSES:
                    raise
                conversation_id = None
            if conversation_id:
                return remembered, conversation_id, {}
        customer = await client.find_customer_by_phone(phone)
        if customer is None:
            return None, None, forget(index, ckey)
        updates = self._remember(index, ckey, customer["id"])
        if customer["id"] == remembered:  # searched already
            return remembered, None, updates
        return customer["id"], await self._find_conversation(client, customer["id"], external_id), updates

    async def _note(
        self,
        client: KustomerApi,
        integration: str,
        customer_id: str,
        conversation_id: str,
        note: dict[str, Any],
        look_first: bool,
    ) -> tuple[str, bool]:
        """The conversation's note whose first line is ``note["marker"]``: looked up first when
        ``look_first`` (the command may have written it before), else created — paced to the
        customer's limit, and a create with an unknown outcome looked up rather than repeated.
        Returns its id and whether it was found rather than created."""
        if look_first:
            found = await self._find_note(client, conversation_id, note["marker"])
            if found:
                return found, True
        await self.note_limit.acquire(f"{integration}|{customer_id}")

        async def find_note() -> dict[str, Any] | None:
            nid = await self._find_note(client, conversation_id, note["marker"])
            return {"id": nid} if nid else None

        created, found_it = await create_or_find(
            lambda: client.create_note(conversation_id, note["body"]), find_note, settle_s=self.settle_s
        )
        return created["id"], found_it

    @staticmethod
    async def _find_conversation(client: KustomerApi, customer_id: str, external_id: str) -> str | None:
        async for page in client.iter_customer_conversations(customer_id):
            for conversation in page:
                if (conversation.get("attributes") or {}).get("externalId") == external_id:
                    return conversation["id"]
        return None

    @staticmethod
    async def _find_note(client: KustomerApi, conversation_id: str, marker: str) -> str | None:
        async for page in client.iter_conversation_notes(conversation_id):
            for note in page:
                body = (note.get("attributes") or {}).get("body") or ""
                if body.split("\n", 1)[0] == marker:
                    return note["id"]
        return None


def call_key(integration: str, external_id: str) -> str:
    """The index key of a logged call: its customer, conversation and the details its notes state."""
    return f"k|{integration}|call|{external_id}"


def customer_key(integration: str, phone: str) -> str:
    """The index key of the customer a number (E.164) was found or created as:
    ``{"id": customer id, "at": Unix seconds it was found}``."""
    return f"k|{integration}|customer|{phone}"


def remembered_customer(index: Mapping[str, Any], key: str, now: float, recheck_s: float) -> str | None:
    """The customer id the index remembers at ``key``, unless it is older than ``recheck_s``
    (then it is looked up again) or forgotten."""
    entry = index.get(key)
    if not isinstance(entry, dict) or not entry.get("id"):
        return None
    at = entry.get("at")
    if not isinstance(at, int | float) or now - at >= recheck_s:
        return None
    return str(entry["id"])


def forget(index: Mapping[str, Any], key: str) -> dict[str, Any]:
    """The index update that forgets a number's customer (a tombstone), when it holds one."""
    return {key: None} if index.get(key) is not None else {}


# --------------------------------------------------------------------------------------------
# The contacts export: customers from CloudTalk contacts
# --------------------------------------------------------------------------------------------


def _values(items: Any, field: str) -> list[str]:
    return [str(x.get(field)) for x in items or [] if isinstance(x, dict) and x.get(field)]


async def export_customer(
    client: KustomerApi,
    command: dict[str, Any],
    prior: LedgerEntry | None,
    index: Mapping[str, Any],
    settle_s: float = 20.0,
) -> Done:
    integration, contact_id = command["integration"], command["contact_id"]
    key = f"k|{integration}|contact|{contact_id}"
    known = index.get(key)
    if known and command["version"] <= known["version"]:
        return Done({"customer_id": known.get("customer_id")}, "skipped:stale_version")
    desired = command["customer"]
    phones = _values(desired["phones"], "phone")
    emails = _values(desired["emails"], "email")
    existing = await client.find_customer_by_external_id(contact_id)
    if existing is not None:
        attrs = existing.get("attributes") or {}
        have_phones = {normalize_e164(p) for p in _values(attrs.get("phones"), "phone")}
        have_emails = {e.lower() for e in _values(attrs.get("emails"), "email")}
        new_phones: list[str] = []
        new_emails: list[str] = []
        taken: list[str] = []
        for p in phones:
            if p not in have_phones:
                owner = await client.find_customer_by_phone(p)
                (taken if owner is not None else new_phones).append(p)
        for e in emails:
            if e.lower() not in have_emails:
                owner = await client.find_customer_by_email(e)
                (taken if owner is not None else new_emails).append(e)
        changes: dict[str, Any] = {}
        if desired.get("name") and desired["name"] != attrs.get("name"):
            changes["name"] = desired["name"]
        if new_phones:
            changes["phones"] = list(attrs.get("phones") or []) + [{"type": "work", "phone": p} for p in new_phones]
        if new_emails:
            changes["emails"] = list(attrs.get("emails") or []) + [{"type": "work", "email": e} for e in new_emails]
        update = {key: {"customer_id": existing["id"], "version": command["version"]}}
        if not changes:
            # No version of this contact was exported before (the index has none), yet its customer
            # exists: it is this command's own create, which landed although its answer was lost
            # (a time-out, a kill) — reconciled, not a customer that was already there.
            outcome = "reconciled" if known is None else "skipped:unchanged"
            return Done({"customer_id": existing["id"], "taken": taken}, outcome, update)
        await client.update_customer(existing["id"], changes)
        return Done({"customer_id": existing["id"], "changed": sorted(changes), "taken": taken}, "updated", update)
    # rule 4: a phone or e-mail that already belongs to a customer skips the contact
    for p in phones:
        owner = await client.find_customer_by_phone(p)
        if owner is not None:
            return Done({"owner": owner["id"]}, "skipped:phone_exists")
    for e in emails:
        owner = await client.find_customer_by_email(e)
        if owner is not None:
            return Done({"owner": owner["id"]}, "skipped:email_exists")
    body = {
        "name": desired.get("name") or (phones[0] if phones else emails[0] if emails else contact_id),
        "externalId": contact_id,
        "phones": desired["phones"],
        "emails": desired["emails"],
    }
    try:
        created, found = await create_or_find(
            lambda: client.create_customer(body),
            lambda: client.find_customer_by_external_id(contact_id),
            settle_s=settle_s,
        )
        if found:
            return Done(
                {"customer_id": created["id"]},
                "reconciled",
                {key: {"customer_id": created["id"], "version": command["version"]}},
            )
    except ConflictError:
        again = await client.find_customer_by_external_id(contact_id)
        if again is None:  # a phone or e-mail was taken meanwhile
            return Done({}, "skipped:phone_or_email_exists")
        return Done(
            {"customer_id": again["id"]},
            "reconciled",
            {key: {"customer_id": again["id"], "version": command["version"]}},
        )
    return Done(
        {"customer_id": created["id"]}, "created", {key: {"customer_id": created["id"], "version": command["version"]}}
    )
