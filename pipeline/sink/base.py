"""The sink contract and the stage that runs it with exactly-once bookkeeping.

The contract, in the spirit of Kafka Connect's ``SinkTask`` (``put`` / ``flush`` / ``preCommit``):

* a target implements :class:`Effects`: ``perform(command, prior, index)`` makes the command's
  effects exist at the target and returns :class:`Done` with the ids it wrote (Connect's ``put``,
  one command at a time). ``prior`` is the ledger entry when the command was started before (a
  crash between an HTTP call and the commit): the effects must then be *reconciled* — looked up
  before anything is written again. A target that takes several writes in one request
  implements :class:`BulkEffects` too: ``prepare`` a command up to its write, ``write`` a group;
* :class:`SinkStage` does the bookkeeping around it — which commands to perform, durable intents
  before any effect, durable outcomes committed with the offsets, and how far the offsets may
  advance (Connect's ``preCommit``; the loop's transaction is the ``flush``). Its steps are
  :class:`SinkSteps`, numbered below.

The effects reach their targets through the Protocols of :mod:`pipeline.sink.ports`
(``KustomerApi``, ``KustomerLookups``, ``CloudTalkApi``); the stage keeps its bookkeeping in a
:class:`~pipeline.sink.ports.SinkLedger` (the compacted ledger topic, :mod:`pipeline.sink.ledger`)
and makes intents durable through an :class:`~pipeline.sink.ports.IntentLog` (the lane).

Protocol for one batch of one command partition (:meth:`SinkStage.handle`; the whole of it is
step 1 of the loop's commit protocol, :mod:`pipeline.kafka.loop`). The batch has a time budget
(``budget_s``): no wait on a target may end later than that, so one slow or throttled account
never holds the batch — nor, through the loop, the other partitions — for longer.

1. ``decode`` — parse and schema-check each command. A bad one becomes a rejection
   (``SchemaError``, a dead letter); it never stops the batch. Wake-up records
   (:mod:`pipeline.sink.wake`) are skipped.
2. ``plan`` — first the partition's *pending* commands (parked earlier, :meth:`SinkLedger.pending`)
   that are due, then the batch: skip commands the ledger knows as done (redeliveries, replays,
   backfills), failed (unless replayed from the dead-letter topic: header ``dlq.replayed``) or
   pending, and duplicates inside the batch. A command found ``started`` (its instance died
   mid-command) is planned with that entry as ``prior``: it will be reconciled. A command that
   cannot start now — its target account is held (:meth:`Effects.ready_at`: a 429's reset, an
   outage; for bulk work also the live reserve), or it was parked until later — or whose lane
   waits behind such a command, is *parked* at once: nothing is sent, no intent is written, and
   nothing waits for it (a waiting batch would hold the loop's other partitions too). So is a
   command found ``started`` whose settle time ends after the budget. No I/O.
3. ``record_intents`` — commit ``started`` ledger entries for the planned commands that will run
   and are not started yet, in a transaction of their own on the lane's producer, *before* any
   effect — so a crash later is always detectable — then make them visible in the local ledger.
   Abort path A (the loop's): the publish fails → its transaction is aborted, ``handle`` raises,
   the loop seeks back to the batch start and retries; no effect has happened yet. (A commit
   whose outcome is unknown only means the same intents are written again.)
4. ``settle`` — in its lane, a command found ``started`` waits until ``settle_s`` after its
   intent, so a request the dead instance still had in flight has landed before anything is
   looked up. The lane gives its concurrency slot to others meanwhile.
5. ``perform_effects`` — :meth:`Effects.perform` per command: in order within a lane (the record
   key: one customer number, one integration), lanes concurrently (at most ``concurrency``
   performing at a time; a lane that waits holds no slot); each sees the ledger index plus what
   earlier commands of the batch added. A ``RejectedError`` (the target refused for good) is that
   command's result. A ``DeferredError`` (a wait on the target would outlast the budget: nothing
   in flight) parks the command with its progress, and the rest of its lane behind it — only the
   rest of its bulk work when it is bulk work with nothing unknown (``priority: bulk``, e.g. at
   the live reserve, :func:`blocks_only_bulk`): live commands of the lane go on. Any other
   exception leaves the command *unfinished* (the target kept failing past the retry deadline)
   and stops its lane: later commands of the same key wait for it.
   *In bulk* (effects that are :class:`BulkEffects`, e.g. CloudTalk's import): a lane's bulk work
   is prepared one command at a time (every decision and read, no write) and its writes wait in a
   group, sent as one request once ``bulk_max`` wait, a live command comes (it is performed at
   once, after the group), the account's window would not take more (``room``) or the lane ends.
   A command whose decisions read what a waiting write changes (``depends_on`` against the
   writes' ``touches``) is prepared only after the group is sent; one whose write touches what a
   waiting write touches is prepared again after it. Each write of the answer settles on its own,
   as a performed command does; an unfinished one stops the lane (the group's other commands keep
   their outcomes). The intents of step 3 cover the whole batch, so a crash between a bulk request
   and the commit reconciles each of its commands on its own.
   No exception of ``perform`` leaves ``handle``; only a cancellation does (the task is cancelled):
   nothing is produced with the offsets, and as the intents are durable, whatever ran is
   reconciled when the batch is handled again (here, or by the partition's next owner).
6. ``record_outcomes`` — done → a ``done`` entry, an audit record (``done``/``skipped``) and the
   index records; rejected → a ``failed`` entry, a ``TargetRejected`` dead letter and an audit
   record ``dead_lettered``; parked → a ``parked`` entry carrying the command, its record's key
   and headers, ``not_before``, its progress, and whether it must be reconciled; unfinished →
   nothing: its entry stays ``started``.
7. ``report`` (Connect's ``preCommit``) — hand it all to the loop as one
   :class:`~pipeline.kafka.records.BatchResult`: outputs and dead letters are committed with the
   offsets in one transaction. Parked commands live in the ledger now, so the offsets move past
   them; they stop only at the first unfinished command of the batch (``commit_upto``); done,
   rejected and parked work after it commits now (the ledger skips it when the rest is fetched
   again); schema rejections at or after it are left to that refetch, so nothing is
   dead-lettered twice.
   Abort paths B and C (the loop's): the transaction aborts, or the producer was fenced →
   ``after_commit`` is not called; the ledger still says ``started`` for every command that ran,
   so the retry (here, or at the partition's next owner, which loads the ledger) reconciles them.

``after_commit`` then makes the committed entries and index updates visible in the local ledger,
and asks the :class:`~pipeline.sink.wake.Waker` to wake the partition when its earliest pending
command is due (the loop only calls ``handle`` with records). On assignment the ledger
partitions are loaded (``on_assigned``), on revocation dropped (``on_revoked``).

Exactly once: a command is parked only when nothing of it is in flight — nothing was sent, or the
target's answer says it did not happen (429; a 503, ``RetryPolicy.unprocessed_statuses``) — so a
parked command resumes from its ``steps`` without looking anything up; after an ambiguous create
(``DeferredError.unsettled``) or a crash it is parked with ``reconcile`` and looks its effects up
first, as a ``started`` command does.
"""

from __future__ import annotations

import asyncio
import time
from collections import ChainMap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import orjson
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from pipeline.clients.http import DeferredError, RejectedError, pause, wait_budget
from pipeline.core.decisions import decision
from pipeline.core.envelope import parse_time, utc_now_iso
from pipeline.core.observability import get_logger, metrics
from pipeline.core.schemas import SchemaError, validate
from pipeline.kafka.loop import Lane
from pipeline.kafka.records import BatchResult, OutRecord, Rejection, audit_record, header
from pipeline.sink.ledger import (
    DONE,
    FAILED,
    PARKED,
    STARTED,
    LedgerEntry,
    must_reconcile,
    record_key,
    record_of,
    source_of,
)
from pipeline.sink.ports import IntentLog, SinkLedger
from pipeline.sink.wake import WAKE_HEADER, Waker

log = get_logger(__name__)

REPLAYED_HEADER = "dlq.replayed"
SCHEMA_ERROR = "SchemaError"  # error class of a command that fails step 1
TARGET_REJECTED = "TargetRejected"  # error class of a command the target refused (step 6)


# --------------------------------------------------------------------------------------------
# The contract
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Done:
    steps: dict[str, Any]
    outcome: str = "created"  # created | reconciled | updated | skipped:<reason>
    index: dict[str, Any] = field(default_factory=dict)


class Effects(Protocol):
    """A target: what a command does there. ``target`` names it in metrics; ``command_schemas``
    maps each command type it performs to its schema (anything else is a ``SchemaError``)."""

    target: str
    command_schemas: Mapping[str, str]  # command type -> schema name

    async def perform(self, command: dict[str, Any], prior: LedgerEntry | None, index: Mapping[str, Any]) -> Done: ...

    # ``prior``: the command's ledger entry from before this batch (``started``: reconcile;
    # ``failed``: a replay from the dead-letter topic; ``parked``: resume from its steps, and
    # reconcile when it says so — ``must_reconcile(prior)``), None for a new command.
    # ``index``: the partition's ledger index as of this command (committed entries plus the
    # updates of the commands before it in this batch). ``Done.index`` adds to it.
    # Raise ``RejectedError`` when the target refuses the command for good (dead letter); let a
    # ``DeferredError`` through (with the progress in its ``steps``) when the target makes it wait
    # past the batch's budget (parked); any other exception leaves the command unfinished
    # (retried from the ledger).

    def ready_at(self, command: dict[str, Any]) -> float:
        """When the command's target account takes requests again (Unix seconds; 0 = now)."""
        ...


@dataclass(slots=True)
class Write:
    """One command's write, made ready by :meth:`BulkEffects.prepare` to share one bulk request
    with the writes of the commands after it. ``item``: the request's entry for it, in the
    target's format; ``touches``: what the write changes at the target (a contact id, its numbers,
    e-mails, name), so a later command whose decisions read any of it is prepared only once the
    write is made; ``context``: what the effects need to finish the command from its answer."""

    command_id: str
    item: dict[str, Any]
    touches: frozenset[str]
    context: Any = None


class BulkEffects(Effects, Protocol):
    """A target that writes several commands in one request (CloudTalk's bulk endpoint).

    The stage asks it, per command of a lane: :meth:`wants_bulk` — may this command's write wait
    for others?; :meth:`depends_on` — what its decisions read (compared with what the writes
    waiting in the group touch); :meth:`prepare` — everything but the write: a :class:`Done`
    when nothing needs writing, else a :class:`Write`; :meth:`room` — may one more write be
    prepared before the group is sent (the account's window still takes the request)?;
    :meth:`write` — one request for up to ``bulk_max`` writes, a result per write in their
    order, each settled on its own: a :class:`Done`, a ``RejectedError`` (dead letter), a
    ``DeferredError`` (parked; ``unsettled`` when the write may have happened) or another
    exception (unfinished: the command's intent stays ``started`` and is reconciled).
    ``prepare`` raises as :meth:`Effects.perform` does."""

    bulk_max: int  # writes per request (≤ 1: every command is performed on its own)

    def wants_bulk(self, command: dict[str, Any], prior: LedgerEntry | None) -> bool: ...

    def depends_on(self, command: dict[str, Any]) -> frozenset[str]: ...

    def room(self, waiting: int) -> bool: ...

    async def prepare(
        self, command: dict[str, Any], prior: LedgerEntry | None, index: Mapping[str, Any]
    ) -> Done | Write: ...

    async def write(self, writes: Sequence[Write]) -> list[Done | Exception]: ...


@dataclass(slots=True)
class Decoded:
    """A command that passed step 1, with its record."""

    record: ConsumerRecord
    command: dict[str, Any]


@dataclass(slots=True)
class Parked:
    """A command that waits for its target, with nothing in flight: performed again once
    ``not_before`` (Unix seconds) has passed, from ``steps``; ``reconcile``: look the effects up
    first."""

    not_before: float
    reason: str
    steps: dict[str, Any]
    reconcile: bool


@dataclass(slots=True)
class Planned:
    """A command step 2 decided to perform (or to park at once: ``park``). ``prior`` is its ledger
    entry from before this batch (never this batch's intent); ``attempt`` counts replays (a
    reconcile is the same attempt); ``start_at`` (Unix seconds, 0 = now) is when it may start;
    ``pending``: the ledger holds the command (parked before), not a record of this batch."""

    record: ConsumerRecord
    command: dict[str, Any]
    prior: LedgerEntry | None
    attempt: int
    start_at: float = 0.0
    pending: bool = False
    park: Parked | None = None


Result = Done | Parked | Exception  # of one planned command: done, parked, RejectedError, or unfinished


@dataclass(slots=True)
class Outcomes:
    """What step 6 makes of the results, in the order it goes to Kafka."""

    outputs: list[OutRecord] = field(default_factory=list)  # audit and ledger records, then index
    entries: list[LedgerEntry] = field(default_factory=list)  # done/failed, applied after commit
    index_updates: dict[str, Any] = field(default_factory=dict)
    rejections: list[Rejection] = field(default_factory=list)  # TargetRejected
    first_unfinished: int | None = None  # offset of the first command that could not finish


class SinkSteps(Protocol):
    """The stage's own steps, in the order of the protocol in this module's docstring."""

    def decode(self, records: Sequence[ConsumerRecord]) -> tuple[list[Decoded], list[Rejection]]: ...

    def plan(self, partition: int, decoded: Sequence[Decoded], deadline: float | None = None) -> list[Planned]: ...

    async def record_intents(
        self, intents: IntentLog, partition: int, planned: Sequence[Planned]
    ) -> list[LedgerEntry]: ...

    async def settle(self, planned: Planned) -> float: ...

    async def perform_effects(
        self, partition: int, planned: Sequence[Planned], deadline: float | None = None
    ) -> dict[int, Result]: ...

    def record_outcomes(
        self, partition: int, planned: Sequence[Planned], results: Mapping[int, Result]
    ) -> Outcomes: ...

    def report(self, rejections: Sequence[Rejection], outcomes: Outcomes) -> BatchResult: ...


LIVE, BULK = "live", "bulk"  # a command's ``priority``: whose work it is (absent: live)


def is_bulk(command: Mapping[str, Any]) -> bool:
    """Bulk work (an initial import, a reconciliation): it uses what live work leaves."""
    return command.get("priority") == BULK


def blocks_only_bulk(command: Mapping[str, Any], reconcile: bool) -> bool:
    """Whether a parked command holds back only the bulk commands behind it in its lane: it is
    bulk work with nothing unknown (nothing of it in flight, nothing to look up first). A live
    command may then go first: versions of one customer still apply in order (the sink skips an
    older one), and the lane's commands still run one at a time, so merges stay safe."""
    return is_bulk(command) and not reconcile


class _LaneStopped(Exception):
    """A write sent in bulk is unfinished: the lane stops behind it (step 5)."""


def _epoch(iso: str) -> float:
    try:
        return parse_time(iso).timestamp()
    except (ValueError, TypeError):
        return 0.0


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


class _Slot:
    """A lane's place among the ``concurrency`` performing lanes; given back while it waits."""

    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self._semaphore, self.held = semaphore, False

    async def acquire(self) -> None:
        await self._semaphore.acquire()
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._semaphore.release()


class SinkStage:
    """A :class:`~pipeline.kafka.loop.Stage` that performs commands through :class:`Effects`,
    exactly once, with the ledger's bookkeeping (see the module docstring)."""

    def __init__(
        self,
        name: str,
        effects: Effects,
        ledger: SinkLedger,
        audit_topic: str,
        concurrency: int = 16,
        settle_s: float = 20.0,
        budget_s: float = 0.5,
        waker: Waker | None = None,
    ) -> None:
        self.name, self.effects, self.ledger, self.audit_topic = name, effects, ledger, audit_topic
        self.concurrency = concurrency
        self.settle_s = settle_s
        self.budget_s = budget_s
        self.waker = waker
        self.stats = {
            "done": 0,
            "skipped_duplicate": 0,
            "failed": 0,
            "unfinished": 0,
            "reconciled": 0,
            "parked": 0,
        }
        m = metrics()
        self._commands = m.commands
        self._imports = m.import_commands
        self._e2e = m.end_to_end_seconds
        self._lanes: dict[int, TopicPartition] = {}
        # for the settle time of commands found ``started`` (:meth:`_start_at`): when this instance
        # took each partition over, and when its own unfinished attempts ended (Unix seconds)
        self._assigned_at: dict[int, float] = {}
        self._attempted_at: dict[str, float] = {}
        # the effects write several commands per request (BulkEffects with bulk_max > 1), or not
        self._bulk: BulkEffects | None = (
            cast(BulkEffects, effects) if int(getattr(effects, "bulk_max", 0) or 0) > 1 else None
        )

    # -- partitions --------------------------------------------------------------------------
    async def on_assigned(self, lanes: Mapping[TopicPartition, Lane]) -> None:
        await self.ledger.load(sorted(tp.partition for tp in lanes))
        now = time.time()
        for tp in lanes:
            self._assigned_at[tp.partition] = now
            self._lanes[tp.partition] = tp
            self._wake(tp.partition)

    async def on_revoked(self, partitions: set[TopicPartition]) -> None:
        self.ledger.drop({tp.partition for tp in partitions})
        for tp in partitions:
            self._lanes.pop(tp.partition, None)
            self._assigned_at.pop(tp.partition, None)
        if self.waker is not None:
            self.waker.forget(partitions)

    def after_commit(self, lane: Lane, result: BatchResult) -> None:
        """The batch's transaction committed: its ledger entries and index updates are durable."""
        if result.context:
            entries, index_updates = result.context
            for entry in entries:
                self._attempted_at.pop(entry.command_id, None)
            self.ledger.apply(lane.tp.partition, entries)
            self.ledger.apply_index(lane.tp.partition, index_updates)
        self._lanes.setdefault(lane.tp.partition, lane.tp)
        self._wake(lane.tp.partition)

    def _wake(self, partition: int) -> None:
        """Ask the waker to hand this partition to the stage again when its earliest pending
        command is due."""
        tp = self._lanes.get(partition)
        if self.waker is None or tp is None:
            return
        due = self.next_due(partition)
        if due is not None:
            self.waker.schedule(tp, due)

    def next_due(self, partition: int) -> float | None:
        """When the partition's next pending command can start (Unix seconds), or None when none
        is pending: the earliest start of a lane's first pending command (the later ones of a lane
        wait for it)."""
        heads: dict[tuple[str | None, bool], float] = {}  # (lane, blocks bulk commands only)
        now = time.time()
        for entry in self.ledger.pending(partition):
            key = (entry.source or {}).get("key")
            only_bulk = blocks_only_bulk(entry.command or {}, must_reconcile(entry))
            if (key, False) in heads or (only_bulk and (key, True) in heads):
                continue  # behind the lane's head
            heads[(key, only_bulk)] = max(self._start_at(entry.command or {}, entry, now, partition)[0], now)
        return min(heads.values()) if heads else None

    # -- one batch ---------------------------------------------------------------------------
    async def handle(self, lane: Lane, records: list[ConsumerRecord]) -> BatchResult:
        """One batch of one command partition: the steps of the module docstring, in order."""
        partition = lane.tp.partition
        self._lanes.setdefault(partition, lane.tp)
        deadline = time.monotonic() + self.budget_s
        decoded, rejections = self.decode(records)  # 1
        planned = self.plan(partition, decoded, deadline)  # 2
        await self.record_intents(lane, partition, planned)  # 3 (abort path A)
        results = await self.perform_effects(partition, planned, deadline)  # 4 and 5
        outcomes = self.record_outcomes(partition, planned, results)  # 6
        return self.report(rejections, outcomes)  # 7

    def decode(self, records: Sequence[ConsumerRecord]) -> tuple[list[Decoded], list[Rejection]]:
        """Step 1: parse each record's JSON and check it against the schema of its command type.

        Returns the commands in record order, and a ``SchemaError`` rejection for each record
        that is not JSON, has a type these effects do not perform, or fails its schema. Wake-up
        records carry no command and are skipped.
        """
        decoded: list[Decoded] = []
        rejections: list[Rejection] = []
        for record in records:
            if header(record, WAKE_HEADER) is not None:
                continue
            try:
                command = orjson.loads(record.value or b"")
                ctype: Any = command.get("type") if isinstance(command, dict) else None
                schema = self.effects.command_schemas.get(ctype) if isinstance(ctype, str) else None
                if schema is None:
                    raise SchemaError(f"type: unknown command type {ctype!r}", "type", "enum")
                validate(schema, command)
            except (orjson.JSONDecodeError, SchemaError) as exc:
                rejections.append(Rejection(record, SCHEMA_ERROR, str(exc)))
                continue
            decoded.append(Decoded(record, command))
        return decoded, rejections

    def _start_at(
        self, command: dict[str, Any], prior: LedgerEntry | None, now: float, partition: int
    ) -> tuple[float, bool]:
        """When a command may start (Unix seconds; 0 = now) — its account's hold, a parked
        command's ``not_before``, a ``started`` one's settle time — and whether only the settle
        time stands in the way (a wait a batch may take; the others are never waited for).

        The settle time counts from the last moment a request of the command can have been sent:
        its intent, or — as a batch's intents are all written before its first effect, and its
        requests leave one after another — when this instance took the partition over (whoever
        sent it had stopped by then), or when this instance's own attempt ended."""
        held = self.effects.ready_at(command) if command else 0.0
        if prior is not None and prior.state == PARKED:
            held = max(held, prior.not_before or 0.0)
        settled = 0.0
        if prior is not None and prior.state == STARTED:
            sent_by = max(
                _epoch(prior.at),
                self._assigned_at.get(partition, 0.0),
                self._attempted_at.get(prior.command_id, 0.0),
            )
            settled = sent_by + self.settle_s
        start = max(held, settled)
        return (start, held <= now) if start > now else (0.0, True)

    def _held_reason(self, command: dict[str, Any], now: float) -> str:
        """Why a command that may not start now is held: ``reserve`` when it is bulk work and a
        live command would go now (only the live reserve is left), else ``held``."""
        if is_bulk(command) and self.effects.ready_at({**command, "priority": LIVE}) <= now:
            return "reserve"
        return "held"

    def plan(self, partition: int, decoded: Sequence[Decoded], deadline: float | None = None) -> list[Planned]:
        """Step 2: the commands to perform, each with its ledger entry from before this batch.

        First the partition's pending (parked) commands that are due, in record order; then the
        batch. Skipped: a second occurrence of a command id in the batch; a command the ledger
        knows as ``done`` or pending; one it knows as ``failed`` unless the record carries
        ``dlq.replayed`` (a replay from the dead-letter topic: attempt + 1). A ``started`` one is
        planned with that entry (reconciled, same attempt).

        A command that cannot start now (:meth:`_start_at`: its account is held, or it was parked
        until later) — or whose lane waits behind such a command — is planned with ``park`` set:
        it will not run in this batch, and nothing waits for it. Only a reconcile's settle time is
        waited for in the batch (step 4), when it ends before ``deadline`` (``time.monotonic()``;
        default: the budget from now).
        """
        now = time.time()
        horizon = now + (self.budget_s if deadline is None else deadline - time.monotonic())
        planned: list[Planned] = []
        seen: set[str] = set()
        # lanes waiting behind a command that is not due: until when, and whether only bulk
        # commands wait (the one ahead is bulk work with nothing unknown: live ones pass it)
        blocked: dict[bytes | None, tuple[float, bool]] = {}

        def waits(start: float, settling_only: bool) -> bool:
            return start > (horizon if settling_only else now)

        def ahead(key: bytes | None, command: dict[str, Any]) -> float | None:
            """When the command's lane is free for it, or None when nothing stands in its way."""
            b = blocked.get(key)
            return None if b is None or (b[1] and not is_bulk(command)) else b[0]

        def block(key: bytes | None, until: float, command: dict[str, Any], reconcile: bool) -> None:
            before = blocked.get(key)
            only_bulk = blocks_only_bulk(command, reconcile)
            if before is not None:
                until, only_bulk = max(before[0], until), before[1] and only_bulk
            blocked[key] = (until, only_bulk)

        for entry in self.ledger.pending(partition):
            seen.add(entry.command_id)
            key = record_key(entry)
            start, settling_only = self._start_at(entry.command or {}, entry, now, partition)
            if ahead(key, entry.command or {}) is not None or waits(start, settling_only):
                block(key, start, entry.command or {}, must_reconcile(entry))
                continue
            planned.append(Planned(record_of(entry), entry.command or {}, entry, entry.attempt, start, pending=True))
        for d in decoded:
            record, command = d.record, d.command
            cid = command["command_id"]
            if cid in seen:
                self.stats["skipped_duplicate"] += 1
                continue
            seen.add(cid)
            prior = self.ledger.get(partition, cid)
            if prior is not None and (
                prior.state == DONE or (prior.state == FAILED and header(record, REPLAYED_HEADER) is None)
            ):
                self.stats["skipped_duplicate"] += 1
                self._commands.labels(self.effects.target, command["type"], "duplicate").inc()
                continue
            attempt = prior.attempt + (0 if prior.state in (STARTED, PARKED) else 1) if prior else 1
            start, settling_only = self._start_at(command, prior, now, partition)
            p = Planned(record, command, prior, attempt, start)
            lane_free_at = ahead(record.key, command)
            if lane_free_at is not None or waits(start, settling_only):
                not_before = max(start, lane_free_at or 0.0)
                if not waits(start, settling_only):
                    reason = "lane"
                else:
                    reason = "settle" if settling_only else self._held_reason(command, now)
                p.park = self._parked(p, reason, not_before)
                block(record.key, not_before, command, p.park.reconcile)
            planned.append(p)
        return planned

    def _parked(
        self, p: Planned, reason: str, not_before: float, steps: dict[str, Any] | None = None, unsettled: bool = False
    ) -> Parked:
        prior_steps = dict(p.prior.steps) if p.prior else {}
        return Parked(not_before, reason, prior_steps if steps is None else steps, unsettled or must_reconcile(p.prior))

    async def record_intents(self, intents: IntentLog, partition: int, planned: Sequence[Planned]) -> list[LedgerEntry]:
        """Step 3: make a ``started`` entry durable for every planned command that will run and is
        not started yet.

        One transaction of their own on the lane's producer (``intents.publish``), committed before
        any effect; then applied to the local ledger. Commands already ``started`` keep their
        entry; a pending command's intent keeps the command (the ledger still owns it). Raises
        when the publish fails (abort path A: nothing has been performed).
        """
        entries = [
            LedgerEntry(
                p.command["command_id"],
                STARTED,
                attempt=p.attempt,
                steps=dict(p.prior.steps) if p.prior else {},
                command=p.command if p.pending else None,
                source=source_of(p.record) if p.pending else None,
            )
            for p in planned
            if p.park is None and (p.prior is None or p.prior.state != STARTED)
        ]
        if entries:
            await intents.publish([self.ledger.record(partition, e) for e in entries])
            self.ledger.apply(partition, entries)
        return entries

    async def settle(self, planned: Planned) -> float:
        """Step 4, in the command's lane: a command found ``started`` waits until ``settle_s``
        after its intent (its ``start_at``), so a request the dead instance had in flight has
        landed before anything is looked up. The lane gives its slot to others meanwhile; a wait
        past the batch's budget raises :class:`~pipeline.clients.http.DeferredError` (step 2
        parks what it can foresee).

        Returns the seconds waited.
        """
        wait = planned.start_at - time.time()
        if wait <= 0:
            return 0.0
        log.info("reconcile_settle", command_id=planned.command["command_id"], wait_s=round(wait, 1))
        await pause(wait, "settle")
        return wait

    async def perform_effects(
        self, partition: int, planned: Sequence[Planned], deadline: float | None = None
    ) -> dict[int, Result]:
        """Steps 4 and 5: settle and ``effects.perform`` each planned command; results by position in
        ``planned``.

        Commands with the same record key form a lane and run in order; lanes run concurrently,
        at most ``concurrency`` performing at a time (a lane that waits gives its slot up). Each
        command sees the partition's index plus the ``Done.index`` of the commands that finished
        before it. A ``RejectedError`` is recorded and the lane goes on. A ``DeferredError`` (no
        wait may end after ``deadline``, ``time.monotonic()``) parks the command and every later
        command of its lane. Any other exception is recorded and stops the lane (the commands
        after it get no result: unfinished too). With :class:`BulkEffects`, bulk work is prepared
        and written in groups (module docstring, step 5); its outcomes follow the same rules.
        """
        deadline = time.monotonic() + self.budget_s if deadline is None else deadline
        results: dict[int, Result] = {}
        overlay: dict[str, Any] = {}
        index_view = ChainMap(overlay, self.ledger.index(partition))
        lanes: dict[bytes | None, list[int]] = {}
        for i, p in enumerate(planned):
            lanes.setdefault(p.record.key, []).append(i)
        slots = asyncio.Semaphore(self.concurrency)
        bulk = self._bulk

        async def run_lane(indexes: list[int]) -> None:
            slot = _Slot(slots)
            await slot.acquire()
            try:
                with wait_budget(deadline, slot):
                    await perform_lane(indexes)
            finally:
                slot.release()

        async def perform_lane(indexes: list[int]) -> None:
            waiting: Parked | None = None  # the lane waits behind this
            bulk_waiting: Parked | None = None  # the lane's bulk commands wait behind this
            group: list[tuple[int, Write]] = []  # prepared writes waiting for one bulk request
            touched: set[str] = set()  # what the group's commands read and its writes change

            def hold_lane(parked: Parked, command: dict[str, Any]) -> None:
                nonlocal waiting, bulk_waiting
                if blocks_only_bulk(command, parked.reconcile):
                    bulk_waiting = parked
                else:
                    waiting = parked

            def settle_result(i: int, outcome: Done | Exception) -> bool:
                """Record one command's outcome; False: it is unfinished and stops the lane."""
                p = planned[i]
                if isinstance(outcome, Done):
                    results[i] = outcome
                    overlay.update(outcome.index)
                elif isinstance(outcome, RejectedError):
                    results[i] = outcome
                elif isinstance(outcome, DeferredError):
                    results[i] = parked = self._parked(
                        p, outcome.reason, outcome.until, outcome.steps, outcome.unsettled
                    )
                    hold_lane(parked, p.command)
                else:  # unfinished: retried from the ledger
                    results[i] = outcome
                    log.warning(
                        "command_unfinished",
                        command_id=p.command["command_id"],
                        error=f"{type(outcome).__name__}: {outcome}",
                    )
                    return False
                return True

            async def flush() -> bool:
                """Send the group's writes in one request and settle each; False: one of them is
                unfinished, so the lane stops (the others keep their own outcomes)."""
                nonlocal touched
                if not group or bulk is None:
                    return True
                writes = list(group)
                group.clear()
                touched = set()
                try:
                    outcomes = await bulk.write([w for _, w in writes])
                except Exception as exc:  # noqa: BLE001 - the effects settle each write; a surprise leaves all unfinished
                    outcomes = [exc] * len(writes)
                go_on = True
                for (i, _), outcome in zip(writes, outcomes, strict=True):
                    go_on = settle_result(i, outcome) and go_on
                return go_on

            async def perform_one(i: int) -> Done | None:
                """Perform command ``i`` now, or add its write to the group (None)."""
                nonlocal touched
                p = planned[i]
                if bulk is None or not bulk.wants_bulk(p.command, p.prior):
                    if not await flush():
                        raise _LaneStopped
                    return await self.effects.perform(p.command, p.prior, index_view)
                reads = bulk.depends_on(p.command)
                if (touched & reads or not bulk.room(len(group))) and not await flush():
                    raise _LaneStopped
                prepared = await bulk.prepare(p.command, p.prior, index_view)
                if isinstance(prepared, Write) and touched & prepared.touches:
                    # it writes what a waiting write changes: make those first, then decide again
                    if not await flush():
                        raise _LaneStopped
                    prepared = await bulk.prepare(p.command, p.prior, index_view)
                if isinstance(prepared, Done):
                    return prepared
                group.append((i, prepared))
                touched |= reads | prepared.touches
                if len(group) >= bulk.bulk_max and not await flush():
                    raise _LaneStopped
                return None

            for i in indexes:
                p = planned[i]
                if p.park is not None:
                    results[i] = p.park
                    hold_lane(p.park, p.command)
                    continue
                before = waiting or (bulk_waiting if is_bulk(p.command) else None)
                if before is not None:
                    results[i] = self._parked(p, "lane", before.not_before)
                    continue
                try:
                    await self.settle(p)  # 4
                    # prior: the entry from before this batch (not this batch's intent)
                    done = await perform_one(i)
                except _LaneStopped:
                    return  # a write of the group is unfinished: later commands wait for it
                except Exception as exc:  # noqa: BLE001 - RejectedError, DeferredError or unfinished
                    if not settle_result(i, exc):
                        await flush()
                        return  # later commands of this lane wait for it
                    continue
                if done is not None:
                    settle_result(i, done)
            await flush()

        await asyncio.gather(*(run_lane(ix) for ix in lanes.values()))
        ended = time.time()
        for i, result in results.items():  # unfinished: a request of it may still be on its way
            if isinstance(result, Exception) and not isinstance(result, RejectedError):
                self._attempted_at[planned[i].command["command_id"]] = ended
        return results

    def record_outcomes(self, partition: int, planned: Sequence[Planned], results: Mapping[int, Result]) -> Outcomes:
        """Step 6: the records that make the results durable, in planned order.

        * done → audit record (``done``, or ``skipped`` for a ``skipped:*`` outcome), ``done``
          ledger entry; its index updates are collected and written after all entries;
        * ``RejectedError`` → audit record ``dead_lettered``, ``failed`` ledger entry (the prior
          steps kept), and a ``TargetRejected`` rejection (the loop dead-letters it);
        * :class:`Parked` → ``parked`` ledger entry with the command and its record's key and
          headers (the offsets move past it);
        * anything else, or no result → unfinished: no record; a command of this batch stops the
          offsets there, a pending one stays pending (``started``: reconciled when due).
        """
        out = Outcomes()
        now = time.time()
        at = utc_now_iso()
        for i, p in enumerate(planned):
            cid, ctype = p.command["command_id"], p.command["type"]
            result = results.get(i)
            event_id, integration = p.command.get("event_id", cid), p.command.get("integration", "")
            bulk = BULK if is_bulk(p.command) else None

            def audit(entry: dict[str, Any], event_id: str = event_id, bulk: str | None = bulk) -> OutRecord:
                if bulk:
                    entry["priority"] = bulk
                return audit_record(self.audit_topic, event_id=event_id, stage=self.name, at=at, decisions=[entry])

            def count_import(outcome: str, bulk: str | None = bulk, integration: str = integration) -> None:
                if bulk:
                    self._imports.labels(integration, outcome).inc()

            if isinstance(result, Done):
                entry = LedgerEntry(cid, DONE, attempt=p.attempt, steps=result.steps, outcome=result.outcome)
                out.index_updates.update(result.index)
                self.stats["done"] += 1
                if result.outcome == "reconciled":
                    self.stats["reconciled"] += 1
                self._commands.labels(self.effects.target, ctype, result.outcome.split(":")[0]).inc()
                what = "skipped" if result.outcome.startswith("skipped") else "done"
                count_import(what)
                out.outputs.append(
                    audit(decision(integration, what, result.outcome, orjson.dumps(result.steps).decode(), cid))
                )
                try:
                    flow = p.command.get("flow") or ctype
                    self._e2e.labels(flow).observe(max(0.0, now - parse_time(p.command["occurred_at"]).timestamp()))
                except (KeyError, ValueError):
                    pass
            elif isinstance(result, RejectedError):
                entry = LedgerEntry(
                    cid,
                    FAILED,
                    attempt=p.attempt,
                    steps=dict(p.prior.steps) if p.prior else {},
                    outcome=f"rejected:{result.status}",
                )
                self.stats["failed"] += 1
                self._commands.labels(self.effects.target, ctype, "rejected").inc()
                count_import("dead_lettered")
                out.rejections.append(Rejection(p.record, TARGET_REJECTED, str(result)))
                out.outputs.append(
                    audit(decision(integration, "dead_lettered", f"http_{result.status}", str(result)[:500], cid))
                )
            elif isinstance(result, Parked):
                entry = LedgerEntry(
                    cid,
                    PARKED,
                    attempt=p.attempt,
                    steps=result.steps,
                    outcome=result.reason,
                    command=p.command,
                    source=source_of(p.record),
                    not_before=round(result.not_before, 3),
                    reconcile=result.reconcile,
                )
                self.stats["parked"] += 1
                self._commands.labels(self.effects.target, ctype, "parked").inc()
                count_import("parked")
                log.info(
                    "command_parked",
                    command_id=cid,
                    reason=result.reason,
                    wait_s=round(max(0.0, result.not_before - now), 1),
                    reconcile=result.reconcile,
                )
            else:
                self.stats["unfinished"] += 1
                if not p.pending and (out.first_unfinished is None or p.record.offset < out.first_unfinished):
                    out.first_unfinished = p.record.offset
                continue
            out.entries.append(entry)
            out.outputs.append(self.ledger.record(partition, entry))
        out.outputs.extend(self.ledger.index_record(partition, k, v) for k, v in out.index_updates.items())
        return out

    def report(self, rejections: Sequence[Rejection], outcomes: Outcomes) -> BatchResult:
        """Step 7 (Connect's ``preCommit``): the batch's result for the loop's transaction.

        ``rejections`` are step 1's; the target's rejections follow them. With an unfinished
        command the offsets stop at it (``commit_upto``), and the schema rejections at or after
        it are dropped: those records are fetched, and rejected, again. ``context`` carries the
        entries and index updates to :meth:`after_commit`.
        """
        kept = [*rejections, *outcomes.rejections]
        stop = outcomes.first_unfinished
        if stop is not None:
            # records at or after the stop are fetched again: reject them then, not twice
            kept = [r for r in kept if r.record.offset < stop or r.error_class == TARGET_REJECTED]
        return BatchResult(
            outputs=outcomes.outputs,
            rejections=kept,
            commit_upto=stop,
            context=(outcomes.entries, outcomes.index_updates),
        )
