"""Isolation in the sink's bookkeeping: commands whose target account makes them wait are parked in
the ledger, the rest of the batch goes on, and parked commands resume exactly once.

Driven like tests/unit/test_sink_stage.py (fake effects, fake lane, the real ledger without Kafka);
``commit`` there is what the loop does once a batch's transaction commits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiokafka import TopicPartition

from pipeline.clients.http import DeferredError, pause
from pipeline.core.envelope import utc_now_iso
from pipeline.sink.base import Done, SinkStage
from pipeline.sink.ledger import DONE, PARKED, STARTED, LedgerEntry, must_reconcile, record_of, source_of
from pipeline.sink.wake import WAKE_HEADER
from tests.unit.test_sink_stage import (
    AUDIT_TOPIC,
    PARTITION,
    STAGE,
    TOPIC,
    Call,
    FakeEffects,
    FakeLane,
    MemoryLedger,
    _entry,
    command,
    commit,
    ledger_entries,
    record,
)

A, B = "+421905000001", "+421905000002"
Perform = Callable[[dict[str, Any]], Awaitable[Done]]


class ScriptedEffects(FakeEffects):
    """FakeEffects whose script may also hold a coroutine function, run as the command's effect."""

    def __init__(self, events: list[tuple[Any, ...]]) -> None:
        super().__init__(events)
        self.actions: dict[str, Perform] = {}

    async def perform(self, command: dict[str, Any], prior: LedgerEntry | None, index: Mapping[str, Any]) -> Done:
        action = self.actions.get(command["command_id"])
        if action is None:
            return await super().perform(command, prior, index)
        self.events.append(("perform", command["command_id"], time.monotonic()))
        self.calls.append(Call(command["command_id"], prior, dict(index)))
        return await action(command)


class FakeWaker:
    def __init__(self) -> None:
        self.scheduled: list[tuple[TopicPartition, float]] = []
        self.forgotten: list[TopicPartition] = []

    def schedule(self, tp: TopicPartition, at: float) -> None:
        self.scheduled.append((tp, at))

    def forget(self, tps: Any) -> None:
        self.forgotten.extend(tps)


class Sink:
    def __init__(self, concurrency: int = 4, budget_s: float = 2.0, settle_s: float = 20.0) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.ledger = MemoryLedger(self.events)
        self.effects = ScriptedEffects(self.events)
        self.lane = FakeLane(self.events)
        self.waker = FakeWaker()
        self.stage = SinkStage(
            STAGE,
            self.effects,
            self.ledger,
            AUDIT_TOPIC,
            concurrency=concurrency,
            settle_s=settle_s,
            budget_s=budget_s,
            waker=self.waker,  # type: ignore[arg-type]
        )

    async def run(self, records: list[Any]) -> Any:
        """Handle a batch and commit it (as the loop does); returns (result, committed offset)."""
        result = await self.stage.handle(self.lane, records)  # type: ignore[arg-type]
        return result, commit(self.stage, self.lane, records, result).upto

    def performed(self) -> list[str]:
        return [e[1] for e in self.events if e[0] == "perform"]

    def intents(self) -> list[tuple[str, str, int]]:
        return [c for e in self.events if e[0] == "publish" for c in e[1]]


def cmd(cid: str, phone: str = A, integration: str = "acme") -> dict[str, Any]:
    return {**command(cid, phone), "integration": integration}


def wake(offset: int) -> Any:
    return record(offset, b"", key=b"sink.wake", headers=[(WAKE_HEADER, b"1")])


def due(sink: Sink, cid: str) -> None:
    """Let a parked command's time come (as if its hold had passed)."""
    entry = sink.ledger.get(PARTITION, cid)
    assert entry is not None and entry.state == PARKED
    entry.not_before = time.time() - 1


# --------------------------------------------------------------------------------------------


async def test_a_held_account_parks_its_commands_without_an_intent_and_the_offsets_move_past_them() -> None:
    sink = Sink()
    hold = time.time() + 30
    sink.effects.holds["acme"] = hold
    records = [record(10, cmd("cmd-a1", A)), record(11, cmd("cmd-b1", B, "other"))]

    result, upto = await sink.run(records)

    assert sink.performed() == ["cmd-b1"], "nothing is sent to the held account"
    assert sink.intents() == [("cmd-b1", STARTED, 1)], "no intent for a parked command: nothing of it can be in flight"
    assert result.commit_upto is None and upto == 12, "the parked command lives in the ledger now"
    parked, done = ledger_entries(result)
    assert (parked.command_id, parked.state, parked.outcome, parked.reconcile) == ("cmd-a1", PARKED, "held", False)
    assert parked.command == cmd("cmd-a1", A) and parked.not_before is not None and abs(parked.not_before - hold) < 0.01
    assert parked.source is not None and parked.source["offset"] == 10 and record_of(parked).key == A.encode()
    assert (done.command_id, done.state) == ("cmd-b1", DONE)
    assert [e.command_id for e in sink.ledger.pending(PARTITION)] == ["cmd-a1"]
    woken, at = sink.waker.scheduled[-1]
    assert woken == TopicPartition(TOPIC, PARTITION) and abs(at - hold) < 0.01, "woken when the hold ends"
    assert sink.stage.stats["parked"] == 1


async def test_a_parked_command_resumes_once_when_due_and_its_redelivery_is_skipped() -> None:
    sink = Sink()
    sink.effects.holds["acme"] = time.time() + 30
    await sink.run([record(10, cmd("cmd-a1", A))])
    # a redelivery while it is parked: the parked one is the command
    _, upto = await sink.run([record(11, cmd("cmd-a1", A))])
    assert sink.performed() == [] and upto == 12
    del sink.effects.holds["acme"]
    due(sink, "cmd-a1")

    result, upto = await sink.run([wake(12)])

    assert sink.performed() == ["cmd-a1"] and upto == 13, "the wake-up record itself is no command"
    [intent] = [_entry(r) for r in sink.lane.published[-1]]
    assert (intent.state, intent.command, intent.source) == (
        STARTED,
        cmd("cmd-a1", A),
        source_of(record(10, cmd("cmd-a1", A))),
    )
    assert sink.effects.calls[-1].prior is not None and sink.effects.calls[-1].prior.state == PARKED
    [done] = ledger_entries(result)
    assert (done.state, done.command) == (DONE, None)
    assert sink.ledger.pending(PARTITION) == [] and result.rejections == []
    await sink.run([record(13, cmd("cmd-a1", A))])
    assert sink.performed() == ["cmd-a1"], "done: never again"


async def test_a_deferral_mid_command_parks_it_with_its_progress_and_its_lane_behind_it() -> None:
    sink = Sink()

    async def throttled(command: dict[str, Any]) -> Done:
        exc = DeferredError("rate_limited", time.time() + 40)
        exc.steps = {"customer_id": "c1", "conversation_id": "v1"}
        raise exc

    sink.effects.actions["cmd-a1"] = throttled
    records = [record(20, cmd("cmd-a1", A)), record(21, cmd("cmd-a2", A)), record(22, cmd("cmd-b1", B))]

    result, upto = await sink.run(records)

    assert sink.performed() == ["cmd-a1", "cmd-b1"], "a2 waits behind a1 in its lane; b1's lane goes on"
    assert upto == 23 and result.commit_upto is None
    entries = {e.command_id: e for e in ledger_entries(result)}
    assert entries["cmd-a1"].state == PARKED and entries["cmd-a1"].steps == {
        "customer_id": "c1",
        "conversation_id": "v1",
    }
    assert entries["cmd-a1"].reconcile is False, "a 429 says nothing happened: resume from the steps, no lookups"
    assert (entries["cmd-a2"].state, entries["cmd-a2"].outcome, entries["cmd-a2"].steps) == (PARKED, "lane", {})
    assert entries["cmd-a2"].not_before == entries["cmd-a1"].not_before
    assert entries["cmd-b1"].state == DONE

    sink.effects.actions.clear()
    due(sink, "cmd-a1")
    due(sink, "cmd-a2")
    await sink.run([wake(23)])
    resumed = sink.effects.calls[-2:]
    assert [c.command_id for c in resumed] == ["cmd-a1", "cmd-a2"], "resumed in the order of their records"
    assert resumed[0].prior is not None and resumed[0].prior.steps == {"customer_id": "c1", "conversation_id": "v1"}
    assert not must_reconcile(resumed[0].prior)
    assert sink.ledger.pending(PARTITION) == []


async def test_a_deferral_after_an_ambiguous_create_parks_it_to_be_reconciled() -> None:
    sink = Sink()

    async def unknown(command: dict[str, Any]) -> Done:
        raise DeferredError("settle", time.time() + 20, unsettled=True)

    sink.effects.actions["cmd-a1"] = unknown
    result, _ = await sink.run([record(5, cmd("cmd-a1"))])

    [parked] = ledger_entries(result)
    assert (parked.state, parked.outcome, parked.reconcile) == (PARKED, "settle", True)
    assert must_reconcile(parked), "the effects look up what may exist before writing again"


async def test_a_new_command_waits_behind_its_parked_lane_even_when_its_account_is_free() -> None:
    sink = Sink()
    sink.effects.holds["acme"] = time.time() + 30
    await sink.run([record(1, cmd("cmd-a1", A))])
    sink.effects.holds.clear()
    x_parked = sink.ledger.get(PARTITION, "cmd-a1")
    assert x_parked is not None and x_parked.not_before is not None and x_parked.not_before > time.time()

    result, upto = await sink.run([record(2, cmd("cmd-a2", A)), record(3, cmd("cmd-b1", B))])

    assert sink.performed() == ["cmd-b1"] and upto == 4
    a2 = next(e for e in ledger_entries(result) if e.command_id == "cmd-a2")
    assert (a2.state, a2.outcome, a2.not_before) == (PARKED, "lane", x_parked.not_before)
    assert [e.command_id for e in sink.ledger.pending(PARTITION)] == ["cmd-a1", "cmd-a2"]


async def test_a_lane_that_waits_gives_its_concurrency_slot_to_other_lanes() -> None:
    sink = Sink(concurrency=1)

    async def slow_window(command: dict[str, Any]) -> Done:
        await pause(1.0, "pacing")  # within the budget: waited, without the slot
        return Done({"note_id": "n"}, "created")

    sink.effects.actions["cmd-a1"] = slow_window
    started = time.monotonic()

    await sink.run([record(1, cmd("cmd-a1", A)), record(2, cmd("cmd-b1", B))])

    performed = {e[1]: e[2] for e in sink.events if e[0] == "perform"}
    assert performed["cmd-b1"] - started < 0.8, "b1 ran while a1 waited, although only one lane may perform"
    assert time.monotonic() - started >= 1.0


async def test_a_wait_past_the_budget_is_not_slept_but_parked() -> None:
    sink = Sink(budget_s=0.3)

    async def long_reset(command: dict[str, Any]) -> Done:
        await pause(45.0, "rate_limited")
        raise AssertionError("not reached")

    sink.effects.actions["cmd-a1"] = long_reset
    started = time.monotonic()

    result, upto = await sink.run([record(7, cmd("cmd-a1"))])

    assert time.monotonic() - started < 1.0, "nothing is slept when the wait cannot fit"
    [parked] = ledger_entries(result)
    assert parked.state == PARKED and parked.not_before is not None
    assert 44 < parked.not_before - time.time() < 46 and upto == 8


async def test_a_crashed_command_whose_settle_time_outlasts_the_budget_is_parked_to_be_reconciled() -> None:
    sink = Sink(budget_s=0.2, settle_s=30.0)
    sink.ledger.partitions[PARTITION] = {
        "cmd-a1": LedgerEntry("cmd-a1", STARTED, at=utc_now_iso(), steps={"customer_id": "c"})
    }
    started = time.monotonic()

    result, upto = await sink.run([record(3, cmd("cmd-a1", A)), record(4, cmd("cmd-b1", B))])

    assert time.monotonic() - started < 1.0, "the batch does not sleep the settle time"
    assert sink.performed() == ["cmd-b1"] and upto == 5
    a1 = next(e for e in ledger_entries(result) if e.command_id == "cmd-a1")
    assert (a1.state, a1.outcome, a1.reconcile, a1.steps) == (PARKED, "settle", True, {"customer_id": "c"})
    assert a1.not_before is not None and a1.not_before > time.time() + 29


async def test_a_pending_command_that_fails_stays_pending_and_does_not_hold_the_offsets() -> None:
    sink = Sink()
    sink.effects.holds["acme"] = time.time() + 30
    await sink.run([record(1, cmd("cmd-a1", A))])
    sink.effects.holds.clear()
    due(sink, "cmd-a1")
    sink.effects.script["cmd-a1"] = RuntimeError("target kept failing")

    result, upto = await sink.run([record(2, cmd("cmd-b1", B))])

    assert upto == 3 and result.commit_upto is None, "b1's record commits; a1 is the ledger's, not the batch's"
    [pending] = sink.ledger.pending(PARTITION)
    assert (pending.command_id, pending.state) == ("cmd-a1", STARTED), "its intent (with the command) stays"
    assert must_reconcile(pending)


async def test_wake_up_records_are_skipped_not_rejected() -> None:
    sink = Sink()
    result, upto = await sink.run([wake(0), wake(1)])
    assert result.outputs == [] and result.rejections == [] and upto == 2
    assert sink.performed() == [] and sink.intents() == []


async def test_revocation_forgets_the_wake_ups_and_assignment_schedules_the_loaded_pending_ones() -> None:
    sink = Sink()
    entry = LedgerEntry(
        "cmd-a1",
        PARKED,
        command=cmd("cmd-a1"),
        source=source_of(record(9, cmd("cmd-a1"))),
        not_before=time.time() + 5,
    )
    sink.ledger.partitions[PARTITION] = {"cmd-a1": entry}
    sink.ledger.owned[PARTITION] = {"cmd-a1": entry}
    tp = TopicPartition(TOPIC, PARTITION)
    await sink.stage.on_assigned({tp: object()})  # type: ignore[dict-item]
    assert sink.waker.scheduled == [(tp, entry.not_before)]
    await sink.stage.on_revoked({tp})
    assert sink.waker.forgotten == [tp]


def test_a_parked_entry_survives_the_ledger_topic() -> None:
    rec = record(42, cmd("cmd-a1"), headers=[("traceparent", b"00-abc")])
    entry = LedgerEntry(
        "cmd-a1",
        PARKED,
        steps={"customer_id": "c1"},
        outcome="held",
        command=cmd("cmd-a1"),
        source=source_of(rec),
        not_before=1234.5,
        reconcile=True,
    )
    again = LedgerEntry.from_json(entry.to_json())
    assert again == entry and again.pending
    back = record_of(again)
    assert (back.topic, back.partition, back.offset, back.key, back.headers) == (
        TOPIC,
        PARTITION,
        42,
        A.encode(),
        (("traceparent", b"00-abc"),),
    )
    plain = LedgerEntry("cmd-x", DONE)
    assert not plain.pending and b'"command":' not in plain.to_json(), "only pending entries carry their command"


async def test_a_cancelled_batch_leaves_its_intents_for_the_retry_to_reconcile() -> None:
    sink = Sink(concurrency=1)
    gate = asyncio.Event()

    async def stuck(command: dict[str, Any]) -> Done:
        await gate.wait()
        return Done({}, "created")

    sink.effects.actions["cmd-a1"] = stuck
    task = asyncio.create_task(sink.stage.handle(sink.lane, [record(1, cmd("cmd-a1"))]))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    assert sink.ledger.get(PARTITION, "cmd-a1") is not None, "its intent is durable: a retry reconciles it"
