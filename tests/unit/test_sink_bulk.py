"""Bulk writes in the sink stage (pipeline.sink.base, ``BulkEffects``): bulk work of a lane is
prepared one command at a time and written up to ``bulk_max`` commands per request; a command that
reads what a waiting write changes is decided only once that write is made; every write of a bulk
answer settles on its own (done, dead letter, parked, unfinished) with the usual bookkeeping.

The stage is driven as in tests/unit/test_sink_stage.py (hand-made records, a fake lane, the real
ledger without Kafka); the effects are a fake whose bulk answers are scripted per command.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.clients.http import DeferredError, RejectedError
from pipeline.sink.base import BULK, Done, SinkStage, Write, is_bulk
from pipeline.sink.ledger import DONE, FAILED, PARKED, STARTED, LedgerEntry
from tests.unit.test_live_reserve import rec, upsert
from tests.unit.test_sink_stage import (
    AUDIT_TOPIC,
    PARTITION,
    STAGE,
    FakeLane,
    MemoryLedger,
    commit,
    ledger_entries,
)


class BulkFake:
    """Bulk-capable effects: ``prepare`` decides a write touching the command's phone (and the
    contact ``targets`` names for it), ``write`` answers each write as ``answers`` says (default
    done), ``perform`` is the single path (live work). Every call is noted in ``events``."""

    target = "cloudtalk"
    command_schemas: Mapping[str, str] = {"cloudtalk.upsert_contact": "command.cloudtalk.upsert_contact"}

    def __init__(self, bulk_max: int = 10) -> None:
        self.bulk_max = bulk_max
        self.events: list[tuple[str, Any]] = []
        self.answers: dict[str, Done | Exception] = {}
        self.targets: dict[str, str] = {}  # command id -> the contact its write edits
        self.spare = 1000  # requests the window has left (room)
        self.delay = 0.0  # seconds a bulk request takes

    def ready_at(self, command: dict[str, Any]) -> float:
        return 0.0

    def wants_bulk(self, command: dict[str, Any], prior: LedgerEntry | None) -> bool:
        return is_bulk(command) and prior is None

    def depends_on(self, command: dict[str, Any]) -> frozenset[str]:
        return frozenset(f"phone:{p}" for p in command["contact"]["phones"])

    def room(self, waiting: int) -> bool:
        return self.spare > waiting + 1

    async def prepare(
        self, command: dict[str, Any], prior: LedgerEntry | None, index: Mapping[str, Any]
    ) -> Done | Write:
        cid = command["command_id"]
        self.events.append(("prepare", cid))
        touches = set(self.depends_on(command))
        if cid in self.targets:
            touches.add(f"contact:{self.targets[cid]}")
        return Write(cid, {"command_id": cid}, frozenset(touches))

    async def write(self, writes: Sequence[Write]) -> list[Done | Exception]:
        self.events.append(("write", [w.command_id for w in writes]))
        await asyncio.sleep(self.delay)
        return [self.answers.get(w.command_id, Done({"contact_id": f"ct-{w.command_id}"}, "created")) for w in writes]

    async def perform(self, command: dict[str, Any], prior: LedgerEntry | None, index: Mapping[str, Any]) -> Done:
        self.events.append(("perform", command["command_id"]))
        return Done({"contact_id": "ct-live"}, "updated")

    def writes(self) -> list[list[str]]:
        return [e[1] for e in self.events if e[0] == "write"]


class BulkSink:
    def __init__(self, effects: BulkFake) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.effects = effects
        self.ledger = MemoryLedger(self.events)
        self.lane = FakeLane(self.events)
        self.stage = SinkStage(STAGE, effects, self.ledger, AUDIT_TOPIC, concurrency=1, budget_s=2.0)

    async def run(self, records: list[Any]) -> tuple[Any, int]:
        result = await self.stage.handle(self.lane, records)  # type: ignore[arg-type]
        return result, commit(self.stage, self.lane, records, result).upto

    def state(self, cid: str) -> str | None:
        entry = self.ledger.get(PARTITION, cid)
        return entry.state if entry is not None else None


def bulk(n: int, phone: str | None = None) -> dict[str, Any]:
    c = upsert(f"b{n}", BULK, n)
    if phone is not None:
        c["contact"]["phones"] = [phone]
    return c


def batch(commands: list[dict[str, Any]]) -> list[Any]:
    return [rec(i, c) for i, c in enumerate(commands)]


async def test_bulk_work_goes_in_requests_of_at_most_bulk_max_and_every_command_is_done_once() -> None:
    effects = BulkFake(bulk_max=10)
    sink = BulkSink(effects)
    result, upto = await sink.run(batch([bulk(n) for n in range(23)]))
    assert [len(w) for w in effects.writes()] == [10, 10, 3]
    assert sum(effects.writes(), []) == [f"cmd-b{n}" for n in range(23)], "in record order, each once"
    assert all(sink.state(f"cmd-b{n}") == DONE for n in range(23)) and upto == 23
    published = [c for e in sink.events if e[0] == "publish" for c in e[1]]
    assert [c[1] for c in published] == [STARTED] * 23, "every intent is durable before the first write"
    # a replay of the batch writes nothing
    await sink.run(batch([bulk(n) for n in range(23)]))
    assert len(effects.writes()) == 3


async def test_a_command_reading_what_a_waiting_write_changes_is_decided_after_that_write() -> None:
    effects = BulkFake()
    sink = BulkSink(effects)
    same = "+421905100001"
    await sink.run(batch([bulk(1, same), bulk(2), bulk(3, same), bulk(4)]))
    # b3 shares b1's number: b1 (and b2 with it) is written before b3 is even prepared
    assert effects.events == [
        ("prepare", "cmd-b1"),
        ("prepare", "cmd-b2"),
        ("write", ["cmd-b1", "cmd-b2"]),
        ("prepare", "cmd-b3"),
        ("prepare", "cmd-b4"),
        ("write", ["cmd-b3", "cmd-b4"]),
    ]


async def test_a_write_to_a_contact_a_waiting_write_edits_is_decided_again_after_it() -> None:
    effects = BulkFake()
    effects.targets = {"cmd-b1": "77", "cmd-b2": "77"}  # both merge into contact 77 (found by other values)
    sink = BulkSink(effects)
    await sink.run(batch([bulk(1), bulk(2), bulk(3)]))
    assert effects.events == [
        ("prepare", "cmd-b1"),
        ("prepare", "cmd-b2"),
        ("write", ["cmd-b1"]),
        ("prepare", "cmd-b2"),  # decided again, seeing b1's edit
        ("prepare", "cmd-b3"),
        ("write", ["cmd-b2", "cmd-b3"]),
    ]


async def test_each_write_of_a_bulk_answer_settles_on_its_own() -> None:
    effects = BulkFake()
    effects.answers = {
        "cmd-b1": RejectedError("cloudtalk", "contacts.bulk.add_contact", 406, "Invalid input data."),
        "cmd-b2": DeferredError("retry", time.time() + 2.0),
        "cmd-b3": Done({"contact_id": "ct-3"}, "created"),
    }
    sink = BulkSink(effects)
    result, upto = await sink.run(batch([bulk(0), bulk(1), bulk(2), bulk(3)]))
    assert effects.writes() == [["cmd-b0", "cmd-b1", "cmd-b2", "cmd-b3"]]
    assert {e.command_id: e.state for e in ledger_entries(result)} == {
        "cmd-b0": DONE,
        "cmd-b1": FAILED,
        "cmd-b2": PARKED,
        "cmd-b3": DONE,
    }
    assert [r.record.offset for r in result.rejections] == [1], "the refused one is dead-lettered, alone"
    assert upto == 4, "done, dead-lettered and parked: the offsets move past all four"
    assert [e.command_id for e in sink.ledger.pending(PARTITION)] == ["cmd-b2"]


async def test_an_unfinished_write_stops_the_offsets_and_its_lane_and_keeps_the_others_done() -> None:
    effects = BulkFake(bulk_max=3)
    effects.answers = {"cmd-b1": RuntimeError("the answer was unreadable")}
    sink = BulkSink(effects)
    result, upto = await sink.run(batch([bulk(n) for n in range(5)]))
    assert effects.writes() == [["cmd-b0", "cmd-b1", "cmd-b2"]], "the lane stops behind the unfinished write"
    states = {e.command_id: e.state for e in ledger_entries(result)}
    assert states == {"cmd-b0": DONE, "cmd-b2": DONE}
    assert upto == 1, "the offsets stop at the unfinished command"
    assert sink.state("cmd-b1") == STARTED, "its intent stays: it is reconciled when fetched again"


async def test_live_work_is_written_at_once_after_the_bulk_writes_before_it() -> None:
    effects = BulkFake()
    sink = BulkSink(effects)
    live = upsert("live", "live", 50)
    await sink.run(batch([bulk(1), bulk(2), live, bulk(3)]))
    assert effects.events == [
        ("prepare", "cmd-b1"),
        ("prepare", "cmd-b2"),
        ("write", ["cmd-b1", "cmd-b2"]),
        ("perform", "cmd-live"),
        ("prepare", "cmd-b3"),
        ("write", ["cmd-b3"]),
    ]


async def test_the_group_is_sent_before_the_window_runs_out_under_it() -> None:
    effects = BulkFake()
    effects.spare = 3  # room for a group of two
    sink = BulkSink(effects)
    await sink.run(batch([bulk(n) for n in range(5)]))
    assert [len(w) for w in effects.writes()] == [2, 2, 1]


async def test_a_command_found_started_settles_from_the_takeover_not_from_its_intent() -> None:
    """A batch's intents are all written before its first request, and its (bulk) requests leave
    one after another: the last may have left long after its intent. Whoever sent it had stopped
    when this instance took the partition over, so the settle time counts from then."""
    from datetime import UTC, datetime, timedelta

    from aiokafka import TopicPartition

    from tests.unit.test_sink_stage import TOPIC

    effects = BulkFake()
    sink = BulkSink(effects)
    long_ago = (datetime.now(UTC) - timedelta(seconds=100)).isoformat()
    sink.ledger.apply(PARTITION, [LedgerEntry("cmd-b1", STARTED, at=long_ago)])
    await sink.stage.on_assigned({TopicPartition(TOPIC, PARTITION): sink.lane})  # type: ignore[dict-item]
    took_over = time.time()
    decoded, _ = sink.stage.decode(batch([bulk(1)]))
    (planned,) = sink.stage.plan(PARTITION, decoded)
    assert planned.park is not None and planned.park.reason == "settle"
    assert abs(planned.park.not_before - (took_over + sink.stage.settle_s)) < 1.0, "not 100 s ago + settle"


async def test_an_unfinished_command_settles_from_the_end_of_its_own_attempt() -> None:
    effects = BulkFake(bulk_max=2)
    effects.answers = {"cmd-b1": RuntimeError("no answer")}
    effects.delay = 2.0  # the request left right after the intents and took 2 s
    sink = BulkSink(effects)
    await sink.run(batch([bulk(0), bulk(1)]))
    ended = time.time()
    decoded, _ = sink.stage.decode(batch([bulk(1)]))
    (planned,) = sink.stage.plan(PARTITION, decoded)
    assert planned.prior is not None and planned.prior.state == STARTED
    assert planned.park is not None and planned.park.reason == "settle"
    assert abs(planned.park.not_before - (ended + sink.stage.settle_s)) < 0.5, "from the attempt's end, not its intent"
