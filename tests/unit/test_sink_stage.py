"""The sink's exactly-once bookkeeping (pipeline.sink.base.SinkStage), without HTTP and without Kafka.

The stage is driven with hand-made ConsumerRecords, a fake effects object, a fake lane (its
``publish`` is where intents become durable) and an in-memory stand-in for the ledger. ``commit``
below does what the transactional loop does with a stage's result once its transaction commits
(pipeline/kafka/loop.py, steps 4–7): dead letters built from the rejections, offsets up to
``commit_upto``, then ``after_commit``. Every fake appends to one shared ``events`` list, so the
order of intents, effects and ledger updates can be asserted.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from pipeline.clients.http import RejectedError, RetryExhaustedError
from pipeline.core.envelope import utc_now_iso
from pipeline.kafka.records import (
    DLQ_ERROR_CLASS,
    DLQ_ERROR_MESSAGE,
    DLQ_SOURCE_OFFSET,
    DLQ_SOURCE_PARTITION,
    DLQ_SOURCE_TOPIC,
    DLQ_STAGE,
    BatchResult,
    OutRecord,
    dead_letter,
)
from pipeline.sink.base import REPLAYED_HEADER, Done, SinkStage, SinkSteps
from pipeline.sink.ledger import DONE, FAILED, INDEX_PREFIX, STARTED, Ledger, LedgerEntry

TOPIC, PARTITION = "kustomer-commands", 3
LEDGER_TOPIC, AUDIT_TOPIC, DEADLETTER_TOPIC = "kustomer-ledger", "audit", "deadletter"
STAGE = "sink-test"


# --------------------------------------------------------------------------------------------
# Fakes
# --------------------------------------------------------------------------------------------


class MemoryLedger(Ledger):
    """The real ledger with its Kafka reads left out: ``load`` finds nothing stored, and every
    ``apply`` is noted in ``events`` so tests can see the order of intents and effects."""

    def __init__(self, events: list[tuple[Any, ...]], topic: str = LEDGER_TOPIC) -> None:
        super().__init__("127.0.0.1:1", topic)
        self.events = events
        self.loaded: list[list[int]] = []

    async def load(self, partitions: list[int]) -> dict[int, int]:
        self.loaded.append(list(partitions))
        return {p: len(self.partitions.setdefault(p, {})) for p in partitions}

    def apply(self, partition: int, entries: list[LedgerEntry]) -> None:
        self.events.append(("apply", [(e.command_id, e.state) for e in entries]))
        super().apply(partition, entries)


class FakeLane:
    """The lane as the stage uses it: its partition, and ``publish`` (intents in a transaction of
    their own). ``fail`` makes the publish raise, as an aborted transaction would."""

    def __init__(self, events: list[tuple[Any, ...]]) -> None:
        self.tp = TopicPartition(TOPIC, PARTITION)
        self.events = events
        self.fail: Exception | None = None
        self.published: list[list[OutRecord]] = []

    async def publish(self, records: Sequence[OutRecord]) -> None:
        if self.fail is not None:
            raise self.fail
        self.published.append(list(records))
        self.events.append(
            ("publish", [(e.command_id, e.state, e.attempt) for e in map(_entry, records)], time.monotonic())
        )


@dataclass
class Call:
    command_id: str
    prior: LedgerEntry | None
    index: dict[str, Any]


class FakeEffects:
    """Effects whose outcome per command id is scripted: a Done, an exception to raise, or (by
    default) ``Done({"note_id": ...}, "created")``."""

    target = "fake"
    command_schemas: Mapping[str, str] = {"kustomer.log_conversation": "command.kustomer.log_conversation"}

    def __init__(self, events: list[tuple[Any, ...]], script: dict[str, Done | Exception] | None = None) -> None:
        self.events = events
        self.script = script or {}
        self.calls: list[Call] = []
        self.holds: dict[str, float] = {}  # integration -> Unix seconds its account is held until

    def ready_at(self, command: dict[str, Any]) -> float:
        return self.holds.get(command["integration"], 0.0)

    async def perform(self, command: dict[str, Any], prior: LedgerEntry | None, index: Mapping[str, Any]) -> Done:
        cid = command["command_id"]
        self.events.append(("perform", cid, time.monotonic()))
        self.calls.append(Call(cid, prior, dict(index)))
        outcome = self.script.get(cid)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome if outcome is not None else Done({"note_id": f"note-{cid}"}, "created")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def command(cid: str, phone: str = "+421905123456") -> dict[str, Any]:
    return {
        "command_id": cid,
        "type": "kustomer.log_conversation",
        "integration": "acme",
        "event_id": f"event-{cid}",
        "occurred_at": "2026-03-01T10:00:00.000Z",
        "flow": "call",
        "customer": {"phone": phone, "name": None, "create": True},
        "conversation": {"name": "Call", "status": "done", "direction": "in", "externalId": f"cloudtalk-{cid}"},
        "note": {"body": f"CloudTalk call {cid}\nhello", "marker": f"CloudTalk call {cid}"},
    }


def record(
    offset: int, value: dict[str, Any] | bytes, key: bytes | None = None, headers: Sequence[tuple[str, bytes]] = ()
) -> ConsumerRecord:
    raw = value if isinstance(value, bytes) else orjson.dumps(value)
    if key is None and isinstance(value, dict):
        key = value["customer"]["phone"].encode()  # the process stage keys commands by number
    return ConsumerRecord(
        topic=TOPIC,
        partition=PARTITION,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=raw,
        checksum=None,
        serialized_key_size=len(key or b""),
        serialized_value_size=len(raw),
        headers=tuple(headers),
    )


def _entry(out: OutRecord) -> LedgerEntry:
    assert out.topic == LEDGER_TOPIC and out.partition == PARTITION and out.value is not None
    entry = LedgerEntry.from_json(out.value)
    assert out.key == entry.command_id.encode()
    return entry


def ledger_entries(result: BatchResult) -> list[LedgerEntry]:
    return [
        _entry(o)
        for o in result.outputs
        if o.topic == LEDGER_TOPIC and not (o.key or b"").startswith(INDEX_PREFIX.encode())
    ]


def audits(result: BatchResult) -> list[dict[str, Any]]:
    return [orjson.loads(o.value or b"") for o in result.outputs if o.topic == AUDIT_TOPIC]


@dataclass
class Committed:
    upto: int  # the offset the group's position moves to
    dead_letters: list[OutRecord]


def commit(stage: SinkStage, lane: FakeLane, records: list[ConsumerRecord], result: BatchResult) -> Committed:
    """What the transactional loop does with a result whose transaction commits (loop steps 4–7)."""
    first, end = records[0].offset, records[-1].offset + 1
    upto = end if result.commit_upto is None else min(max(result.commit_upto, first), end)
    dead = [dead_letter(r, stage.name, DEADLETTER_TOPIC) for r in result.rejections]
    stage.after_commit(lane, result)  # type: ignore[arg-type]
    return Committed(upto, dead)


class Sink:
    def __init__(self, script: dict[str, Done | Exception] | None = None, settle_s: float = 20.0) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.ledger = MemoryLedger(self.events)
        self.effects = FakeEffects(self.events, script)
        self.lane = FakeLane(self.events)
        self.stage = SinkStage(STAGE, self.effects, self.ledger, AUDIT_TOPIC, concurrency=4, settle_s=settle_s)

    async def handle(self, records: list[ConsumerRecord]) -> BatchResult:
        return await self.stage.handle(self.lane, records)  # type: ignore[arg-type]

    def kinds(self) -> list[tuple[Any, ...]]:
        """The events without their timestamps."""
        return [e[:2] for e in self.events]


def state(ledger: MemoryLedger, command_id: str) -> str | None:
    entry = ledger.get(PARTITION, command_id)
    return entry.state if entry is not None else None


def headers_of(out: OutRecord) -> dict[str, str]:
    return {k: v.decode() for k, v in out.headers}


# --------------------------------------------------------------------------------------------
# The bookkeeping
# --------------------------------------------------------------------------------------------


async def test_new_command_writes_started_before_the_effect_and_done_after() -> None:
    sink = Sink()
    records = [record(40, command("cmd-1"))]

    result = await sink.handle(records)

    # the intent is committed (and applied locally) before the effect is performed
    assert sink.kinds() == [("publish", [("cmd-1", STARTED, 1)]), ("apply", [("cmd-1", STARTED)]), ("perform", "cmd-1")]
    assert sink.effects.calls[0].prior is None
    # 'done' travels with the offsets: audit record, then the ledger entry
    assert [o.topic for o in result.outputs] == [AUDIT_TOPIC, LEDGER_TOPIC]
    [done] = ledger_entries(result)
    assert (done.command_id, done.state, done.attempt, done.outcome) == ("cmd-1", DONE, 1, "created")
    assert done.steps == {"note_id": "note-cmd-1"}
    [audit] = audits(result)
    assert audit["event_id"] == "event-cmd-1" and audit["stage"] == STAGE
    assert audit["decisions"] == [
        {
            "integration": "acme",
            "decision": "done",
            "rule": "created",
            "detail": '{"note_id":"note-cmd-1"}',
            "command_id": "cmd-1",
        }
    ]
    assert result.rejections == [] and result.commit_upto is None
    # locally 'done' only once the transaction committed
    assert state(sink.ledger, "cmd-1") == STARTED
    committed = commit(sink.stage, sink.lane, records, result)
    assert committed.upto == 41 and committed.dead_letters == []
    assert state(sink.ledger, "cmd-1") == DONE
    assert sink.stage.stats["done"] == 1


async def test_command_done_in_the_ledger_is_skipped_without_effect() -> None:
    sink = Sink()
    sink.ledger.partitions[PARTITION] = {"cmd-1": LedgerEntry("cmd-1", DONE, steps={"note_id": "n1"})}
    records = [record(7, command("cmd-1")), record(8, command("cmd-2")), record(9, command("cmd-2"))]

    result = await sink.handle(records)

    assert [c.command_id for c in sink.effects.calls] == ["cmd-2"], "done: skipped; a duplicate in the batch: once"
    assert [[(e.command_id, e.state) for e in map(_entry, p)] for p in sink.lane.published] == [[("cmd-2", STARTED)]]
    assert [(e.command_id, e.state) for e in ledger_entries(result)] == [("cmd-2", DONE)]
    assert sink.stage.stats["skipped_duplicate"] == 2
    assert commit(sink.stage, sink.lane, records, result).upto == 10


async def test_batch_of_only_done_commands_publishes_nothing_and_advances() -> None:
    sink = Sink()
    sink.ledger.partitions[PARTITION] = {"cmd-1": LedgerEntry("cmd-1", DONE)}
    records = [record(7, command("cmd-1"))]

    result = await sink.handle(records)

    assert sink.events == [], "no intent, no effect"
    assert result.outputs == [] and result.rejections == [] and result.commit_upto is None
    assert commit(sink.stage, sink.lane, records, result).upto == 8, "the offsets still move past it"


async def test_started_command_is_reconciled_with_its_prior_entry() -> None:
    sink = Sink(script={"cmd-1": Done({"customer_id": "c1", "note_id": "n1"}, "reconciled")})
    prior = LedgerEntry("cmd-1", STARTED, at="2026-01-01T00:00:00.000Z", attempt=2, steps={"customer_id": "c1"})
    sink.ledger.partitions[PARTITION] = {"cmd-1": prior}
    records = [record(5, command("cmd-1"))]

    result = await sink.handle(records)

    assert sink.lane.published == [], "already started: no second intent"
    [call] = sink.effects.calls
    assert call.prior is prior, "perform gets the entry from before the crash"
    [done] = ledger_entries(result)
    assert (done.state, done.attempt, done.outcome) == (DONE, 2, "reconciled"), "a reconcile is the same attempt"
    assert sink.stage.stats["reconciled"] == 1


async def test_reconcile_waits_the_settle_time_after_the_intent() -> None:
    sink = Sink(settle_s=0.3)
    sink.ledger.partitions[PARTITION] = {"cmd-1": LedgerEntry("cmd-1", STARTED, at=utc_now_iso())}
    records = [record(5, command("cmd-1")), record(6, command("cmd-2", phone="+421905999999"))]

    await sink.handle(records)

    publish = next(e for e in sink.events if e[0] == "publish")
    performs = {e[1]: e for e in sink.events if e[0] == "perform"}
    assert publish[1] == [("cmd-2", STARTED, 1)], "only the new command gets an intent"
    assert sink.events.index(publish) < min(sink.events.index(e) for e in performs.values()), "intents first"
    assert performs["cmd-1"][2] - publish[2] >= 0.2, "no effect of the crashed command before the settle time"
    assert performs["cmd-2"][2] < performs["cmd-1"][2], "another lane does not wait for that settle time"


async def test_rejected_effect_becomes_a_dead_letter_with_error_headers_and_an_audit_record() -> None:
    error = RejectedError("kustomer", "customers.create", 422, "phone is invalid")
    sink = Sink(script={"cmd-1": error})
    records = [record(12, command("cmd-1"), headers=[("traceparent", b"00-abc")])]

    result = await sink.handle(records)

    [rejection] = result.rejections
    assert (rejection.record, rejection.error_class, rejection.message) == (records[0], "TargetRejected", str(error))
    [failed] = ledger_entries(result)
    assert (failed.command_id, failed.state, failed.outcome, failed.steps) == ("cmd-1", FAILED, "rejected:422", {})
    [audit] = audits(result)
    assert audit["decisions"] == [
        {
            "integration": "acme",
            "decision": "dead_lettered",
            "rule": "http_422",
            "detail": str(error),
            "command_id": "cmd-1",
        }
    ]
    assert result.commit_upto is None, "a rejection does not hold the offsets"

    committed = commit(sink.stage, sink.lane, records, result)
    assert committed.upto == 13
    [dead] = committed.dead_letters
    assert (dead.topic, dead.key, dead.value) == (DEADLETTER_TOPIC, records[0].key, records[0].value)
    h = headers_of(dead)
    assert h["traceparent"] == "00-abc", "the original headers are kept"
    assert (h[DLQ_STAGE], h[DLQ_ERROR_CLASS], h[DLQ_ERROR_MESSAGE]) == (STAGE, "TargetRejected", str(error))
    assert (h[DLQ_SOURCE_TOPIC], h[DLQ_SOURCE_PARTITION], h[DLQ_SOURCE_OFFSET]) == (TOPIC, str(PARTITION), "12")
    assert state(sink.ledger, "cmd-1") == FAILED

    # a redelivery is skipped; a replay from the dead-letter topic is tried again (attempt 2)
    again = await sink.handle([record(13, command("cmd-1"))])
    assert len(sink.effects.calls) == 1 and again.outputs == [] and again.rejections == []
    sink.effects.script.clear()
    replay = await sink.handle([record(14, command("cmd-1"), headers=[(REPLAYED_HEADER, b"7")])])
    assert sink.effects.calls[-1].prior is not None and sink.effects.calls[-1].prior.state == FAILED
    assert [(e.state, e.attempt) for e in map(_entry, sink.lane.published[-1])] == [(STARTED, 2)]
    assert [(e.state, e.attempt) for e in ledger_entries(replay)] == [(DONE, 2)]


async def test_schema_errors_are_rejected_without_stopping_the_batch() -> None:
    sink = Sink()
    wrong_type = {**command("cmd-9"), "type": "kustomer.nope"}
    missing = {k: v for k, v in command("cmd-8").items() if k != "note"}
    type_is_a_list = {**command("cmd-7"), "type": ["kustomer.log_conversation"]}
    records = [
        record(1, b"not json", key=b"k"),
        record(2, wrong_type),
        record(3, missing),
        record(4, command("cmd-1")),
        record(5, type_is_a_list),
        record(6, b"[1, 2]"),
    ]

    result = await sink.handle(records)

    assert [(r.record.offset, r.error_class) for r in result.rejections] == [
        (1, "SchemaError"),
        (2, "SchemaError"),
        (3, "SchemaError"),
        (5, "SchemaError"),
        (6, "SchemaError"),
    ]
    assert "unknown command type 'kustomer.nope'" in result.rejections[1].message
    assert [c.command_id for c in sink.effects.calls] == ["cmd-1"]
    assert result.commit_upto is None


async def test_retryable_failure_keeps_the_offsets_before_the_failing_command() -> None:
    a, b, c, d = "+421905000001", "+421905000002", "+421905000003", "+421905000004"
    sink = Sink(
        script={
            "cmd-b1": RetryExhaustedError("kustomer", "conversations.create", 503, "kept failing"),
            "cmd-d": RejectedError("kustomer", "customers.create", 400, "bad"),
        }
    )
    records = [
        record(9, b"{}", key=b"x"),  # schema error before the stop: dead-lettered now
        record(10, command("cmd-a", a)),
        record(11, command("cmd-b1", b)),  # unfinished: the offsets stop here
        record(12, command("cmd-b2", b)),  # same lane: waits for cmd-b1
        record(13, command("cmd-c", c)),  # another lane: done now
        record(14, b"not json", key=b"y"),  # schema error after the stop: left to the refetch
        record(15, command("cmd-d", d)),
    ]  # rejected after the stop: dead-lettered now

    result = await sink.handle(records)

    [publish] = [e for e in sink.events if e[0] == "publish"]
    assert publish[1] == [(cid, STARTED, 1) for cid in ("cmd-a", "cmd-b1", "cmd-b2", "cmd-c", "cmd-d")]
    assert sink.events.index(publish) < min(i for i, e in enumerate(sink.events) if e[0] == "perform")
    assert sorted(call.command_id for call in sink.effects.calls) == ["cmd-a", "cmd-b1", "cmd-c", "cmd-d"]
    assert result.commit_upto == 11
    assert [(e.command_id, e.state) for e in ledger_entries(result)] == [
        ("cmd-a", DONE),
        ("cmd-c", DONE),
        ("cmd-d", FAILED),
    ], "no entry for what did not finish"
    assert [(r.record.offset, r.error_class) for r in result.rejections] == [(9, "SchemaError"), (15, "TargetRejected")]
    assert sink.stage.stats["unfinished"] == 2

    committed = commit(sink.stage, sink.lane, records, result)
    assert committed.upto == 11, "offsets advance only up to the failing command"
    assert {cid: e.state for cid, e in sink.ledger.partitions[PARTITION].items()} == {
        "cmd-a": DONE,
        "cmd-b1": STARTED,
        "cmd-b2": STARTED,
        "cmd-c": DONE,
        "cmd-d": FAILED,
    }

    # the rest is fetched again: the unfinished commands are reconciled, finished work is skipped
    sink.effects.script.clear()
    sink.stage.settle_s = 0.0
    calls_before = len(sink.effects.calls)
    rest = records[2:]
    again = await sink.handle(rest)
    retried = sink.effects.calls[calls_before:]
    assert [call.command_id for call in retried] == ["cmd-b1", "cmd-b2"]
    assert all(call.prior is not None and call.prior.state == STARTED for call in retried)
    assert [(e.command_id, e.state, e.attempt) for e in ledger_entries(again)] == [
        ("cmd-b1", DONE, 1),
        ("cmd-b2", DONE, 1),
    ]
    assert [(r.record.offset, r.error_class) for r in again.rejections] == [(14, "SchemaError")]
    assert again.commit_upto is None and commit(sink.stage, sink.lane, rest, again).upto == 16


async def test_failed_intent_publish_performs_nothing() -> None:
    sink = Sink()
    sink.lane.fail = RuntimeError("transaction aborted")

    with pytest.raises(RuntimeError):
        await sink.handle([record(3, command("cmd-1"))])

    assert sink.effects.calls == [] and sink.ledger.get(PARTITION, "cmd-1") is None


async def test_index_updates_are_seen_by_later_commands_and_written_after_the_entries() -> None:
    sink = Sink(script={"cmd-1": Done({"customer_id": "c1"}, "created", {"k|acme|phone": "c1"})})
    sink.ledger.indexes[PARTITION] = {"k|acme|old": "c0"}
    records = [record(1, command("cmd-1")), record(2, command("cmd-2"))]  # one number: one lane, in order

    result = await sink.handle(records)

    assert sink.effects.calls[0].index == {"k|acme|old": "c0"}
    assert sink.effects.calls[1].index == {"k|acme|old": "c0", "k|acme|phone": "c1"}
    assert [(o.topic, o.key) for o in result.outputs] == [
        (AUDIT_TOPIC, b"event-cmd-1"),
        (LEDGER_TOPIC, b"cmd-1"),
        (AUDIT_TOPIC, b"event-cmd-2"),
        (LEDGER_TOPIC, b"cmd-2"),
        (LEDGER_TOPIC, b"index|k|acme|phone"),
    ]
    assert sink.ledger.index(PARTITION) == {"k|acme|old": "c0"}, "visible only after the commit"
    commit(sink.stage, sink.lane, records, result)
    assert sink.ledger.index(PARTITION) == {"k|acme|old": "c0", "k|acme|phone": "c1"}


async def test_assignment_loads_and_revocation_drops_the_ledger_partitions() -> None:
    sink = Sink()
    await sink.stage.on_assigned({TopicPartition(TOPIC, 4): object(), TopicPartition(TOPIC, 1): object()})  # type: ignore[dict-item]
    assert sink.ledger.loaded == [[1, 4]]
    await sink.stage.on_revoked({TopicPartition(TOPIC, 4)})
    assert set(sink.ledger.partitions) == {1}


# --------------------------------------------------------------------------------------------
# The stand-ins stay honest
# --------------------------------------------------------------------------------------------


def test_the_stage_implements_its_numbered_steps() -> None:
    steps = ["decode", "plan", "record_intents", "settle", "perform_effects", "record_outcomes", "report"]
    assert [name for name in SinkSteps.__dict__ if name in steps] == steps
    for name in steps:
        assert callable(getattr(SinkStage, name)) and getattr(SinkStage, name).__doc__
