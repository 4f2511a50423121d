"""The seams of the sinks, as Protocols: what the effects need of the target APIs, and what the
stage needs of its ledger and of its lane.

The real implementations satisfy them structurally (no inheritance, no registration):

* :class:`~pipeline.clients.kustomer.KustomerClient` — :class:`KustomerApi` (the Kustomer sink
  and the contacts export) and :class:`KustomerLookups` (what the CloudTalk sink asks Kustomer);
* :class:`~pipeline.clients.cloudtalk.CloudTalkClient` — :class:`CloudTalkApi`;
* :class:`~pipeline.sink.ledger.Ledger` — :class:`SinkLedger`;
* :class:`~pipeline.kafka.loop.Lane` — :class:`IntentLog`.

Each Protocol lists only the members its consumer calls, with the clients' own signatures and
shapes, so a test can pass a small fake and a type checker verifies the real ones. Keyword-only
parameters the real clients add (page sizes, filters) are left out: callers here never pass them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol

from pipeline.clients.cloudtalk import (
    AgentItem,
    BulkCommand,
    BulkResult,
    ContactBody,
    ContactIndexItem,
    ContactShow,
    Country,
    Page,
)
from pipeline.clients.kustomer import Resource
from pipeline.kafka.records import OutRecord
from pipeline.sink.ledger import LedgerEntry

# --------------------------------------------------------------------------------------------
# Target APIs (what the effects call)
# --------------------------------------------------------------------------------------------


class KustomerApi(Protocol):
    """Kustomer as the Kustomer sink sees it: ``kustomer.log_conversation`` (customer →
    conversation → note, with the lookups that reconcile each create) and the contacts export
    (``kustomer.upsert_customer``: customers by external id, phone and e-mail).

    Lookups return ``None`` when nothing matches; ``create_customer`` and ``update_customer``
    raise :class:`~pipeline.clients.kustomer.ConflictError` on a 409.
    """

    async def find_customer_by_phone(self, phone: str) -> Resource | None: ...

    async def find_customer_by_email(self, email: str) -> Resource | None: ...

    async def find_customer_by_external_id(self, external_id: str) -> Resource | None: ...

    async def create_customer(self, attributes: Mapping[str, Any]) -> Resource: ...

    async def update_customer(self, customer_id: str, attributes: Mapping[str, Any]) -> Resource: ...

    async def create_conversation(self, attributes: Mapping[str, Any]) -> Resource: ...

    def iter_customer_conversations(self, customer_id: str) -> AsyncIterator[list[Resource]]:
        """Every page of the customer's conversations (an async generator)."""
        ...

    async def create_note(self, conversation_id: str, body: str) -> Resource: ...

    def iter_conversation_notes(self, conversation_id: str) -> AsyncIterator[list[Resource]]:
        """Every page of the conversation's notes (an async generator)."""
        ...


class KustomerLookups(Protocol):
    """What the CloudTalk sink reads from an integration's Kustomer org: the API key's own user
    (to recognise the echo of an export), companies and users (company name, favorite agent)."""

    async def own_user_id(self) -> str | None: ...

    async def get_company(self, company_id: str) -> Resource | None: ...

    async def get_user(self, user_id: str) -> Resource | None: ...


class CloudTalkApi(Protocol):
    """CloudTalk as the CloudTalk sink sees it: contacts listed (a page of the listing, for the
    contacts index) or found by keyword and shown in full, added or edited (one at a time, or up
    to ten in a bulk request); agents and countries
    to resolve a favorite agent and a country id."""

    async def list_contacts(
        self, *, keyword: str | None = ..., page: int = ..., limit: int | None = ...
    ) -> Page[ContactIndexItem]: ...

    async def get_contact(self, contact_id: int | str) -> ContactShow | None: ...

    async def add_contact(self, body: ContactBody) -> str: ...

    async def edit_contact(self, contact_id: int | str, body: ContactBody) -> bool: ...

    async def bulk_contacts(self, commands: Sequence[BulkCommand], *, cost: int = ...) -> list[BulkResult]: ...

    def iter_agents(self) -> AsyncIterator[Page[AgentItem]]:
        """Every page of the agents (an async generator)."""
        ...

    async def list_countries(self) -> list[Country]: ...


# --------------------------------------------------------------------------------------------
# What the stage needs of its bookkeeping
# --------------------------------------------------------------------------------------------


class SinkLedger(Protocol):
    """The part of :class:`~pipeline.sink.ledger.Ledger` the stage uses: entries and index of the
    owned partitions in memory, and the records that make them durable. ``apply``/``apply_index``
    are called only once the records' transaction has committed."""

    async def load(self, partitions: list[int]) -> dict[int, int]: ...

    def drop(self, partitions: set[int]) -> None: ...

    def get(self, partition: int, command_id: str) -> LedgerEntry | None: ...

    def pending(self, partition: int) -> list[LedgerEntry]: ...

    def record(self, partition: int, entry: LedgerEntry) -> OutRecord: ...

    def apply(self, partition: int, entries: list[LedgerEntry]) -> None: ...

    def index(self, partition: int) -> dict[str, Any]: ...

    def index_record(self, partition: int, key: str, value: Any) -> OutRecord: ...

    def apply_index(self, partition: int, updates: dict[str, Any]) -> None: ...


class IntentLog(Protocol):
    """Where the stage makes its intents durable before any effect: the lane's producer, in a
    transaction of its own (:meth:`pipeline.kafka.loop.Lane.publish`)."""

    async def publish(self, records: Sequence[OutRecord]) -> None: ...
