"""The customers the Kustomer sink remembers per number (ledger index ``k|{integration}|customer|{e164}``).

A known number costs a conversation and a note; a remembered customer Kustomer refuses (deleted,
merged away) is looked up again within the command. The effects run against a small in-memory
Kustomer that answers as the simulator does (400 for a conversation of an unknown customer, 404
for its conversation list).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

import pytest

from pipeline.clients.http import RejectedError
from pipeline.sink.kustomer import (
    CUSTOMER_RECHECK_S,
    KustomerEffects,
    call_key,
    customer_key,
    forget,
    remembered_customer,
)
from pipeline.sink.ledger import STARTED, Ledger, LedgerEntry
from pipeline.sink.ports import KustomerApi

PHONE = "+447946050001"
KEY = customer_key("acme", PHONE)


class Kustomer:
    """Customers, conversations and notes; every request is noted in ``requests``."""

    def __init__(self) -> None:
        self.customers: dict[str, str] = {}  # id -> phone
        self.conversations: dict[str, dict[str, Any]] = {}
        self.notes: dict[str, dict[str, Any]] = {}
        self.requests: list[str] = []
        self._ids = iter(range(1, 10_000))

    def add_customer(self, phone: str) -> str:
        cid = f"cus{next(self._ids)}"
        self.customers[cid] = phone
        return cid

    async def find_customer_by_phone(self, phone: str) -> dict[str, Any] | None:
        self.requests.append("customer.by_phone")
        cid = next((c for c, p in self.customers.items() if p == phone), None)
        return {"id": cid} if cid else None

    async def find_customer_by_email(self, email: str) -> dict[str, Any] | None:
        raise AssertionError("not used")

    async def find_customer_by_external_id(self, external_id: str) -> dict[str, Any] | None:
        raise AssertionError("not used")

    async def create_customer(self, attributes: Mapping[str, Any]) -> dict[str, Any]:
        self.requests.append("customer.create")
        return {"id": self.add_customer(attributes["phones"][0]["phone"])}

    async def update_customer(self, customer_id: str, attributes: Mapping[str, Any]) -> dict[str, Any]:
        raise AssertionError("not used")

    async def create_conversation(self, attributes: Mapping[str, Any]) -> dict[str, Any]:
        self.requests.append("conversation.create")
        if attributes["customer"] not in self.customers:
            raise RejectedError("kustomer", "conversations.create", 400, "customer does not exist")
        cid = f"conv{next(self._ids)}"
        self.conversations[cid] = {"customer": attributes["customer"], "externalId": attributes["externalId"]}
        return {"id": cid}

    async def iter_customer_conversations(self, customer_id: str) -> AsyncIterator[list[dict[str, Any]]]:
        self.requests.append("conversation.by_customer")
        if customer_id not in self.customers:
            raise RejectedError("kustomer", "conversations.by_customer", 404, "Customer not found.")
        yield [
            {"id": k, "attributes": {"externalId": v["externalId"]}}
            for k, v in self.conversations.items()
            if v["customer"] == customer_id
        ]

    async def create_note(self, conversation_id: str, body: str) -> dict[str, Any]:
        self.requests.append("note.create")
        nid = f"note{next(self._ids)}"
        self.notes[nid] = {"conversation": conversation_id, "body": body}
        return {"id": nid}

    async def iter_conversation_notes(self, conversation_id: str) -> AsyncIterator[list[dict[str, Any]]]:
        self.requests.append("note.by_conversation")
        yield [
            {"id": k, "attributes": {"body": v["body"]}}
            for k, v in self.notes.items()
            if v["conversation"] == conversation_id
        ]


def call(n: int, create: bool = True, phone: str = PHONE) -> dict[str, Any]:
    return {
        "command_id": f"acme|cloudtalk:call:{n}",
        "type": "kustomer.log_conversation",
        "integration": "acme",
        "event_id": f"cloudtalk:call:{n}",
        "occurred_at": "2026-03-01T10:00:00.000Z",
        "flow": "call",
        "customer": {"phone": phone, "name": None, "create": create},
        "conversation": {"name": "Call", "status": "done", "direction": "in", "externalId": f"cloudtalk-call-{n}"},
        "note": {"body": f"CloudTalk call {n}\nhello", "marker": f"CloudTalk call {n}"},
        "details": {"tags": ["a"]},
    }


def details(n: int) -> dict[str, Any]:
    return {
        "command_id": f"acme|cloudtalk:call:{n}:details",
        "type": "kustomer.update_call_details",
        "integration": "acme",
        "event_id": f"cloudtalk:call.modified:{n}",
        "occurred_at": "2026-03-01T10:05:00.000Z",
        "call_id": n,
        "customer": {"phone": PHONE},
        "conversation": {"externalId": f"cloudtalk-call-{n}"},
        "details": {"tags": ["a", "b"]},
        "note": {"body": f"CloudTalk call {n} · details updated (v2)\ntags", "marker": f"CloudTalk call {n} · v2"},
    }


def effects(kustomer: Kustomer) -> KustomerEffects:
    return KustomerEffects({"acme": cast(KustomerApi, kustomer)}, settle_s=0.0)


def remembered(customer_id: str, age_s: float = 0.0) -> dict[str, Any]:
    return {KEY: {"id": customer_id, "at": time.time() - age_s}}


# -- the rule -------------------------------------------------------------------------------------


def test_a_customer_is_remembered_until_it_is_due_for_a_look_up() -> None:
    now = 1_000_000.0
    assert customer_key("acme", PHONE) == "k|acme|customer|+447946050001"
    assert remembered_customer({KEY: {"id": "c1", "at": now - 10}}, KEY, now, 3600) == "c1"
    assert remembered_customer({KEY: {"id": "c1", "at": now - 3600}}, KEY, now, 3600) is None, "due"
    assert remembered_customer({}, KEY, now, 3600) is None
    assert remembered_customer({KEY: None}, KEY, now, 3600) is None, "forgotten"
    assert remembered_customer({KEY: {"id": "c1"}}, KEY, now, 3600) is None, "no time: looked up"
    assert remembered_customer({KEY: "c1"}, KEY, now, 3600) is None


def test_forgetting_writes_a_tombstone_only_for_a_remembered_number() -> None:
    assert forget({KEY: {"id": "c1", "at": 1.0}}, KEY) == {KEY: None}
    assert forget({}, KEY) == {}


def test_a_forgotten_index_key_is_a_tombstone_and_leaves_the_local_index() -> None:
    ledger = Ledger("127.0.0.1:1", "kustomer.ledger")
    ledger.apply_index(0, {KEY: {"id": "c1", "at": 1.0}, "k|acme|call|x": {"customer_id": "c1"}})
    record = ledger.index_record(0, KEY, None)
    assert record.key == f"index|{KEY}".encode() and record.value is None
    ledger.apply_index(0, {KEY: None})
    assert ledger.index(0) == {"k|acme|call|x": {"customer_id": "c1"}}


# -- log_conversation -----------------------------------------------------------------------------


async def test_the_first_call_of_a_number_looks_it_up_and_the_index_remembers_it() -> None:
    k = Kustomer()
    cid = k.add_customer(PHONE)
    done = await effects(k).perform(call(1), None, {})
    assert k.requests == ["customer.by_phone", "conversation.create", "note.create"]
    assert done.outcome == "created"
    assert done.index[KEY]["id"] == cid and abs(done.index[KEY]["at"] - time.time()) < 5
    assert done.index[call_key("acme", "cloudtalk-call-1")]["customer_id"] == cid


async def test_a_remembered_number_costs_a_conversation_and_a_note() -> None:
    k = Kustomer()
    cid = k.add_customer(PHONE)
    done = await effects(k).perform(call(1), None, remembered(cid))
    assert k.requests == ["conversation.create", "note.create"]
    assert KEY not in done.index, "nothing to write: the index holds it"
    assert [c["customer"] for c in k.conversations.values()] == [cid]


async def test_a_customer_created_for_an_unknown_number_is_remembered() -> None:
    k = Kustomer()
    done = await effects(k).perform(call(1), None, {})
    assert k.requests == ["customer.by_phone", "customer.create", "conversation.create", "note.create"]
    assert done.index[KEY]["id"] == done.steps["customer_id"] and done.steps["customer_created"] is True


async def test_a_remembered_customer_that_is_due_is_looked_up_again() -> None:
    k = Kustomer()
    old = k.add_customer("+440000000000")
    moved = k.add_customer(PHONE)  # an agent moved the number to another customer
    done = await effects(k).perform(call(1), None, remembered(old, age_s=CUSTOMER_RECHECK_S + 1))
    assert k.requests == ["customer.by_phone", "conversation.create", "note.create"]
    assert done.index[KEY]["id"] == moved and done.steps["customer_id"] == moved


@pytest.mark.parametrize("merged", [False, True], ids=["deleted", "merged"])
async def test_a_refused_remembered_customer_is_looked_up_again_and_the_call_logged_once(merged: bool) -> None:
    k = Kustomer()
    gone = "cus-gone"  # deleted, or merged into the customer that holds the number now
    survivor = k.add_customer(PHONE) if merged else None
    done = await effects(k).perform(call(1), None, remembered(gone))
    wanted = ["conversation.create", "customer.by_phone"]
    wanted += (
        ["conversation.create", "note.create"] if merged else ["customer.create", "conversation.create", "note.create"]
    )
    assert k.requests == wanted
    now = done.steps["customer_id"]
    assert now != gone and (now == survivor if merged else now in k.customers)
    assert [c["customer"] for c in k.conversations.values()] == [now], "one conversation"
    assert len(k.notes) == 1
    assert done.index[KEY]["id"] == now
    assert done.index[call_key("acme", "cloudtalk-call-1")]["customer_id"] == now


async def test_a_refused_remembered_customer_without_a_successor_is_forgotten() -> None:
    k = Kustomer()
    done = await effects(k).perform(call(1, create=False), None, remembered("cus-gone"))
    assert done.outcome == "skipped:customer_not_found"
    assert done.index == {KEY: None}
    assert not k.conversations


async def test_a_refusal_that_is_not_about_the_customer_stands() -> None:
    k = Kustomer()
    cid = k.add_customer(PHONE)

    async def refuse(attributes: Mapping[str, Any]) -> dict[str, Any]:
        k.requests.append("conversation.create")
        raise RejectedError("kustomer", "conversations.create", 400, "name is too long")

    k.create_conversation = refuse  # type: ignore[method-assign]
    with pytest.raises(RejectedError):
        await effects(k).perform(call(1), None, remembered(cid))
    assert k.requests == ["conversation.create", "customer.by_phone"], "looked up once, then rejected"


async def test_a_customer_just_looked_up_is_not_looked_up_again_on_a_refusal() -> None:
    k = Kustomer()
    k.add_customer(PHONE)

    async def refuse(attributes: Mapping[str, Any]) -> dict[str, Any]:
        raise RejectedError("kustomer", "conversations.create", 400, "bad")

    k.create_conversation = refuse  # type: ignore[method-assign]
    with pytest.raises(RejectedError):
        await effects(k).perform(call(1), None, {})
    assert k.requests == ["customer.by_phone"]


async def test_a_resumed_command_whose_customer_is_gone_looks_the_number_up() -> None:
    k = Kustomer()
    survivor = k.add_customer(PHONE)
    parked = LedgerEntry(call(1)["command_id"], "parked", steps={"customer_id": "cus-gone"}, command=call(1))
    done = await effects(k).perform(call(1), parked, {})
    assert k.requests == ["conversation.create", "customer.by_phone", "conversation.create", "note.create"]
    assert done.steps["customer_id"] == survivor and done.index[KEY]["id"] == survivor


async def test_a_reconciled_command_whose_remembered_customer_is_gone_searches_the_new_one() -> None:
    k = Kustomer()
    survivor = k.add_customer(PHONE)
    started = LedgerEntry(call(1)["command_id"], STARTED)
    done = await effects(k).perform(call(1), started, remembered("cus-gone"))
    assert k.requests == [
        "conversation.by_customer",  # 404: the remembered customer is gone
        "customer.by_phone",
        "conversation.by_customer",
        "conversation.create",
        "note.create",
    ]
    assert done.steps["customer_id"] == survivor and len(k.conversations) == 1


# -- update_call_details --------------------------------------------------------------------------


async def test_details_of_a_call_logged_before_the_index_knew_it_use_the_remembered_customer() -> None:
    k = Kustomer()
    cid = k.add_customer(PHONE)
    k.conversations["conv-1"] = {"customer": cid, "externalId": "cloudtalk-call-1"}
    done = await effects(k).perform(details(1), None, remembered(cid))
    assert k.requests == ["conversation.by_customer", "note.create"], "no look-up by phone"
    assert done.outcome == "updated" and KEY not in done.index


async def test_details_whose_remembered_customer_is_gone_look_the_number_up() -> None:
    k = Kustomer()
    survivor = k.add_customer(PHONE)
    k.conversations["conv-1"] = {"customer": survivor, "externalId": "cloudtalk-call-1"}
    done = await effects(k).perform(details(1), None, remembered("cus-gone"))
    assert k.requests == ["conversation.by_customer", "customer.by_phone", "conversation.by_customer", "note.create"]
    assert done.steps["conversation_id"] == "conv-1" and done.index[KEY]["id"] == survivor


async def test_details_of_a_known_call_need_no_customer() -> None:
    k = Kustomer()
    cid = k.add_customer(PHONE)
    known = {call_key("acme", "cloudtalk-call-1"): {"customer_id": cid, "conversation_id": "conv-1", "details": {}}}
    done = await effects(k).perform(details(1), None, known)
    assert k.requests == ["note.create"] and done.outcome == "updated"
