"""Kafka clients and the consume → transform → produce loop, written once.

A :class:`Stage` turns a batch of records from one input partition into a :class:`BatchResult`
(output records, rejections, how far the offsets may advance). :class:`TransactionalLoop` runs
any stage with exactly-once semantics inside Kafka:

* ``read_committed`` consumer in a group, manual offsets;
* each assigned input partition is a :class:`Lane`. Its transactional producer is, by
  ``producers``:

  - ``"partition"``: its own, with transactional id ``{group}.{topic}.{partition}``.
    aiokafka sends no group generation with ``send_offsets_to_transaction`` (no KIP-447), so the
    id fences zombies: the next owner's first producer-id request ends the old owner's transaction;
  - ``"process"`` (the default): the process's one producer (:class:`SharedProducer`, id
    ``{group}.{instance}``),
    shared by every lane. The offsets it commits carry the member's generation
    (:mod:`pipeline.kafka.fencing`), so the group refuses a zombie's commit; a new owner reads
    the committed offsets stably (it waits while a transaction holds newer ones);

* outputs, dead letters and the input offsets of a batch are committed in one transaction (with a
  shared producer: the batches of every partition that is due, in one transaction);
* a batch is what a partition gathered over several polls: it is handed to the stage once it holds
  ``commit_max_records`` records or its first record has waited ``commit_interval_ms``, whichever
  comes first (Kafka Streams' commit interval). Every transaction costs the broker and the
  producer the same few round trips however many records it carries, so at low rates this trades
  up to one interval of latency per stage for several times fewer transactions.

Gathering (``run``): records a poll returns join their partition's pending batch (never below
the committed position or the pending batch's end: records fetched before a seek are stale). A
pending batch is not handed to the stage yet, so dropping it costs nothing: a rebalance drops the
pending batches of the partitions it revokes or assigns anew (the next owner, or this member after
its seek, fetches them again from the committed offset). On stop, the pending batches are
processed before the lanes close. With a shared producer, once one partition is due every
partition's pending batch goes too: they share the transaction, so waiting would only add one.

Commit protocol for one batch of one partition (``_process_batch``):

1. The stage handles the records and returns outputs + rejections (+ ``commit_upto``).
   Abort path A: the stage raises → nothing was produced; seek back to the batch start,
   back off, fetch again.
2. When there is nothing to produce and the offsets would not move, stop: no empty
   transaction is ever started.
3. Begin a transaction on the partition's producer.
4. Send the outputs, then the dead letters (original key, value and headers plus ``dlq.*``
   error headers), and wait until every send is acknowledged.
5. Add the input offsets (``commit_upto``) to the transaction for the group.
6. Commit. Abort path B: any error in 3–6 → abort the transaction, seek back to the batch
   start, back off, retry. Abort path C: the producer was fenced (another member owns the
   partition now) → close the lane and stop fetching the partition; the rebalance that
   follows settles ownership. With a shared producer, path C is the group refusing the
   generation (``MembershipFenced``): abort, close the lanes of the transaction, stop fetching
   them; a shared producer fenced by its own transactional id means another process runs with
   this one's instance id: the loop stops with that error.
7. If the stage asked to stop early (``commit_upto`` below the batch end), seek there so the
   rest is fetched again.

Rebalances: ``on_partitions_revoked`` waits for the batch in flight (a lock) and closes the
lanes of revoked partitions, so no transaction outlives its partition. A lane never processes a
record below its committed position, and no fetched batch is ever dropped (the consumer's
position has already moved past it): this keeps batches that race a rebalance exact. ``on_partitions_assigned``
starts a lane per partition — its first producer id request fences any zombie and completes
its open transaction — then re-reads the committed offset and seeks there, because aiokafka
may have fetched it before the zombie's transaction was settled.

Start: a broker that cannot be reached yet is waited for (:func:`pipeline.kafka.clients.start_when_reachable`:
capped backoff, one line when it is unreachable and one when it is back, a stop ends the wait).
While the broker is away later, the consumer retries by itself, a failed transaction takes abort
path B, and a producer left in a fatal state is replaced once the broker answers again.

Shutdown (SIGTERM): the batch in flight finishes (its transaction commits or aborts), then the
consumer leaves the group and the producers close.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import ProducerFenced
from aiokafka.producer.transaction_manager import TransactionState
from aiokafka.structs import ConsumerRecord

from pipeline.core.observability import get_logger, metrics
from pipeline.core.settings import KafkaSettings
from pipeline.kafka.clients import (
    CONNECT_BACKOFF_MAX_S,
    new_consumer,
    start_when_reachable,
    started,
    stop_quietly,
    transactional_producer,
)
from pipeline.kafka.fencing import (
    NO_GENERATION,
    GroupMembership,
    MembershipFenced,
    committed_stable,
    membership,
    send_offsets_fenced,
)
from pipeline.kafka.partitioner import partitioner
from pipeline.kafka.reading import stop_consumer
from pipeline.kafka.records import BatchResult, OutRecord, Transform, dead_letter

log = get_logger(__name__)


# --------------------------------------------------------------------------------------------
# Stages and lanes
# --------------------------------------------------------------------------------------------


class Lane:
    """One assigned input partition and the transactional producer that commits its batches: the
    process's, shared by every lane (:class:`SharedProducer`), or its own (``producers="partition"``)."""

    def __init__(
        self,
        tp: TopicPartition,
        producer: AIOKafkaProducer | None,
        transactional_id: str,
        shared: SharedProducer | None = None,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self.tp, self._producer, self.transactional_id, self.shared = tp, producer, transactional_id, shared
        self.on_commit = on_commit  # counts a committed transaction of its own (publish)
        self.next_offset: int | None = None  # committed position
        self.closed = False

    @property
    def producer(self) -> AIOKafkaProducer:
        if self.shared is not None:
            return self.shared.producer
        assert self._producer is not None
        return self._producer

    async def publish(self, records: Sequence[OutRecord]) -> None:
        """Commit ``records`` in a transaction of their own, without moving the offsets.

        For stages that must make something durable before they act on it (a sink's intents).
        """
        if not records:
            return
        if self.shared is not None:  # counts its transactions itself
            await self.shared.publish(self, records)
            return
        producer = self.producer
        await producer.begin_transaction()
        try:
            await _send_all(producer, records)
            await producer.commit_transaction()
        except BaseException:
            await _abort_quietly(producer)
            raise
        if self.on_commit is not None:
            self.on_commit()


class SharedProducer:
    """The process's one transactional producer (``producers="process"``), id
    ``{group}.{instance}``: every lane's batches and intents, one transaction at a time (``lock``).

    Its transactions commit offsets fenced by the member's group generation (KIP-447, see
    :mod:`pipeline.kafka.fencing`), taken when partitions are assigned, so a member the group moved
    on from cannot commit, whatever its transactional id. Intents carry their lane's committed
    offset, unchanged, for the same reason: without it nothing would fence them.

    Intents of lanes that ask while a transaction is under way share the next one (a group
    commit): each caller waits for the transaction that carried its records.
    """

    def __init__(self, producer: AIOKafkaProducer, transactional_id: str, on_commit: Callable[[], None]) -> None:
        self.producer, self.transactional_id, self.on_commit = producer, transactional_id, on_commit
        self.lock = asyncio.Lock()
        self.member = GroupMembership("", NO_GENERATION, "")  # none until the first assignment
        self._asking: list[tuple[Lane, Sequence[OutRecord], asyncio.Future[None]]] = []

    async def publish(self, lane: Lane, records: Sequence[OutRecord]) -> None:
        assert lane.next_offset is not None, "a lane publishes once its position is known"
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._asking.append((lane, records, done))
        async with self.lock:
            if not done.done():  # no transaction has carried these records yet: this one will
                asking, self._asking = self._asking, []
                await self._commit_intents(asking)
        await done

    async def _commit_intents(self, asking: list[tuple[Lane, Sequence[OutRecord], asyncio.Future[None]]]) -> None:
        producer = self.producer
        try:
            await producer.begin_transaction()
            await _send_all(producer, [r for _lane, records, _done in asking for r in records])
            offsets = {lane.tp: lane.next_offset for lane, _records, _done in asking if lane.next_offset is not None}
            await send_offsets_fenced(producer, offsets, self.member)
            await producer.commit_transaction()
        except asyncio.CancelledError:
            await _abort_quietly(producer)
            for _lane, _records, done in asking:
                done.cancel()
            raise
        except Exception as exc:  # every caller of this transaction sees its failure
            await _abort_quietly(producer)
            for _lane, _records, done in asking:
                if not done.done():
                    done.set_exception(exc)
            return
        self.on_commit()
        for _lane, _records, done in asking:
            if not done.done():
                done.set_result(None)


class Stage(Protocol):
    name: str

    async def on_assigned(self, lanes: Mapping[TopicPartition, Lane]) -> None: ...

    async def on_revoked(self, partitions: set[TopicPartition]) -> None: ...

    async def handle(self, lane: Lane, records: list[ConsumerRecord]) -> BatchResult: ...

    # optional: ``after_commit(lane, result)`` runs once the batch's transaction committed


class TransformStage:
    """A pure batch transform as a stage."""

    def __init__(self, name: str, transform: Transform) -> None:
        self.name, self.transform = name, transform

    async def on_assigned(self, lanes: Mapping[TopicPartition, Lane]) -> None:
        return None

    async def on_revoked(self, partitions: set[TopicPartition]) -> None:
        return None

    async def handle(self, lane: Lane, records: list[ConsumerRecord]) -> BatchResult:
        return self.transform(records)


async def _send_all(producer: AIOKafkaProducer, records: Sequence[OutRecord]) -> None:
    """Send records as one batch per partition and wait until every batch is acknowledged.

    Building batches directly (instead of one ``send`` and one future per record) keeps the
    per-record cost low; keyed records go where the Java client would put them (murmur2).
    """
    if not records:
        return
    partitions: dict[str, list[int]] = {}
    builders: dict[tuple[str, int], Any] = {}
    futures = []
    for r in records:
        partition = r.partition
        if partition is None:
            parts = partitions.get(r.topic)
            if parts is None:
                parts = partitions[r.topic] = sorted(await producer.partitions_for(r.topic))
            partition = partitioner(r.key, parts, parts)
        slot = (r.topic, partition)
        builder = builders.get(slot)
        if builder is None:
            builder = builders[slot] = producer.create_batch()
        headers = list(r.headers)
        if builder.append(timestamp=None, key=r.key, value=r.value, headers=headers) is None:
            futures.append(await producer.send_batch(builder, r.topic, partition=partition))
            builder = builders[slot] = producer.create_batch()
            if builder.append(timestamp=None, key=r.key, value=r.value, headers=headers) is None:
                raise ValueError(f"a record for {r.topic} is larger than the producer's batch size")
    for (topic, partition), builder in builders.items():
        if builder.record_count():
            futures.append(await producer.send_batch(builder, topic, partition=partition))
    await asyncio.gather(*futures)


_ABORTABLE = (TransactionState.IN_TRANSACTION, TransactionState.ABORTABLE_ERROR)


async def _abort_quietly(producer: AIOKafkaProducer) -> None:
    """End an open transaction, or one an error left able only to abort."""
    try:
        txn = producer._txn_manager  # noqa: SLF001 - aiokafka exposes no public state query
        if txn is not None and txn.state in _ABORTABLE:
            await producer.abort_transaction()
    except Exception as exc:  # noqa: BLE001
        log.warning("abort_failed", error=str(exc))


async def _stop_producer(producer: AIOKafkaProducer) -> None:
    await _abort_quietly(producer)
    try:
        await producer.stop()
    except Exception as exc:  # noqa: BLE001
        log.warning("producer_stop_failed", error=str(exc))


def _is_fatal(producer: AIOKafkaProducer) -> bool:
    txn = producer._txn_manager  # noqa: SLF001
    return txn is not None and txn.is_fatal_error()


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Handled:
    """A batch of one partition the stage has handled (steps 1–2), waiting for its transaction."""

    lane: Lane
    first: int  # offset of its first record
    end: int  # one past its last record
    upto: int  # where its offsets may advance to (commit_upto)
    result: BatchResult
    dead: list[OutRecord]
    started: float


@dataclass(frozen=True)
class LoopSettings:
    bootstrap: str
    group_id: str
    input_topics: tuple[str, ...]
    deadletter_topic: str
    client_id: str = "ctk-pipeline"
    max_batch: int = 1000  # records per poll
    poll_timeout_ms: int = 200
    commit_max_records: int = 1000  # a partition's pending batch is processed at this size ...
    commit_interval_ms: int = 200  # ... or once its first record has waited this long
    transaction_timeout_ms: int = 60_000
    max_poll_interval_ms: int = 300_000
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    producer_linger_ms: int = 0
    producer_batch_bytes: int = 512 * 1024
    fetch_max_bytes: int = 16 * 1024 * 1024
    max_partition_fetch_bytes: int = 4 * 1024 * 1024
    retry_backoff_max_s: float = 10.0
    assign_attempts: int = 5  # tries of the stage's preparation of new partitions (e.g. ledger load)
    producers: str = "process"  # one transactional producer per "process", or one per input "partition"
    instance_id: str = ""  # producers="process": the transactional id's own part; "": {host}-{pid}

    @classmethod
    def of(
        cls,
        kafka: KafkaSettings,
        *,
        group_id: str,
        input_topics: tuple[str, ...],
        deadletter_topic: str,
        **overrides: Any,
    ) -> LoopSettings:
        """The loop's settings from the services' Kafka settings (``LOOP_*``, ``KAFKA_*``)."""
        return cls(
            bootstrap=kafka.bootstrap,
            group_id=group_id,
            input_topics=input_topics,
            deadletter_topic=deadletter_topic,
            **{
                "client_id": kafka.client_id,
                "max_batch": kafka.max_batch,
                "poll_timeout_ms": kafka.poll_timeout_ms,
                "commit_interval_ms": kafka.commit_interval_ms,
                "commit_max_records": kafka.commit_max_records,
                "transaction_timeout_ms": kafka.transaction_timeout_ms,
                "producers": kafka.producers,
                "instance_id": kafka.instance_id,
                **overrides,
            },
        )

    @property
    def process_transactional_id(self) -> str:
        instance = self.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        return f"{self.group_id}.{instance}"


class TransactionalLoop:
    def __init__(self, settings: LoopSettings, stage: Stage) -> None:
        self.settings, self.stage = settings, stage
        self.lanes: dict[TopicPartition, Lane] = {}
        self._lock = asyncio.Lock()
        self._consumer: AIOKafkaConsumer | None = None
        self._stopping = asyncio.Event()
        self.fatal: Exception | None = None
        self._closing = False
        self._joined = False
        self._last_poll = 0.0
        self._failures: dict[TopicPartition, int] = {}
        self._fenced: set[TopicPartition] = set()
        self._shared: SharedProducer | None = None  # producers="process": opened on the first assignment
        # records gathered for a partition's next transaction, and when its first one arrived
        self._pending: dict[TopicPartition, list[ConsumerRecord]] = {}
        self._pending_since: dict[TopicPartition, float] = {}
        m = metrics()
        s = stage.name
        self._m_in = m.loop_records.labels(s, "in")
        self._m_out = m.loop_records.labels(s, "out")
        self._m_rejected = m.loop_records.labels(s, "rejected")
        self._m_commit = m.loop_transactions.labels(s, "committed")
        self._m_abort = m.loop_transactions.labels(s, "aborted")
        self._m_batch = m.loop_batch_seconds.labels(s)
        self._m_assigned = m.assigned_partitions.labels(settings.group_id)
        self._m_deadletters: dict[str, Any] = {}
        self.stats = {"in": 0, "out": 0, "rejected": 0, "committed": 0, "aborted": 0}

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self, connect_backoff_max_s: float = CONNECT_BACKOFF_MAX_S) -> bool:
        """Join the group; False when :meth:`request_stop` came before the broker could be reached.

        A broker that cannot be reached yet is waited for (capped exponential backoff, one log line
        when it is unreachable and one when it is back); :meth:`ready` says not ready meanwhile.
        """
        s = self.settings
        consumer = await start_when_reachable(
            lambda: started(self._new_consumer()),
            bootstrap=s.bootstrap,
            what=f"consumer group {s.group_id}",
            stopping=self._stopping,
            backoff_max_s=connect_backoff_max_s,
        )
        if consumer is None:
            return False
        self._consumer = consumer
        consumer.subscribe(list(s.input_topics), listener=_Listener(self))
        log.info("loop_started", stage=self.stage.name, group=s.group_id, topics=list(s.input_topics))
        return True

    def _new_consumer(self) -> AIOKafkaConsumer:
        s = self.settings
        return new_consumer(
            bootstrap_servers=s.bootstrap,
            group_id=s.group_id,
            client_id=f"{s.client_id}-{s.group_id}",
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            max_poll_records=s.max_batch,
            max_poll_interval_ms=s.max_poll_interval_ms,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            rebalance_timeout_ms=s.max_poll_interval_ms,
            fetch_max_bytes=s.fetch_max_bytes,
            max_partition_fetch_bytes=s.max_partition_fetch_bytes,
        )

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Fetch, gather and commit batches until :meth:`request_stop`; then commit what is pending."""
        assert self._consumer is not None, "start() first"
        consumer = self._consumer
        s = self.settings
        interval = s.commit_interval_ms / 1000
        while not self._stopping.is_set():
            timeout_ms = s.poll_timeout_ms
            if self._pending_since:  # wake up when the oldest pending batch is due
                due_in = min(self._pending_since.values()) + interval - time.monotonic()
                timeout_ms = max(0, min(timeout_ms, int(due_in * 1000) + 1))
            batches = await consumer.getmany(timeout_ms=timeout_ms, max_records=s.max_batch)
            now = self._last_poll = time.monotonic()
            if not batches and not self._pending:
                self._update_lag()
                continue
            async with self._lock:
                for tp, records in batches.items():
                    self._gather(tp, records, now)
                due = [
                    tp
                    for tp, held in self._pending.items()
                    if len(held) >= s.commit_max_records or now - self._pending_since[tp] >= interval
                ]
                if due and self._shared is not None:  # one transaction carries every partition anyway
                    due = list(self._pending)
                await self._process_pending(due)
            self._update_lag()
        async with self._lock:  # a stop: what was gathered is committed before the lanes close
            await self._process_pending(list(self._pending))

    def _gather(self, tp: TopicPartition, records: list[ConsumerRecord], now: float) -> None:
        """Add fetched records to the partition's pending batch.

        A batch fetched before a rebalance is never dropped (the consumer's position has already
        moved past it): its records below the committed position (or below the pending batch's
        end) are filtered out, the rest are exactly the next records of the partition. Gaps above
        it are normal (transaction markers).
        """
        lane = self.lanes.get(tp)
        if lane is None or lane.closed or not records:
            return
        held = self._pending.get(tp)
        floor = held[-1].offset + 1 if held else lane.next_offset
        if floor is not None and records[0].offset < floor:
            records = [r for r in records if r.offset >= floor]
            if not records:
                return
        if held is None:
            self._pending[tp] = records
            self._pending_since[tp] = now
        else:
            held.extend(records)

    def _drop_pending(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self._pending.pop(tp, None)
            self._pending_since.pop(tp, None)

    async def _process_pending(self, due: list[TopicPartition]) -> None:
        """Process the pending batches of ``due`` (under the lock), one transaction each, together."""
        work = []
        for tp in due:
            records = self._pending.pop(tp)
            self._pending_since.pop(tp, None)
            lane = self.lanes.get(tp)
            if lane is not None and not lane.closed:
                work.append((lane, records))
        if not work:
            return
        if self._shared is None:
            await asyncio.gather(*(self._process_batch(lane, records) for lane, records in work))
        else:  # one transaction for all of them, once every stage call is done
            handled = await asyncio.gather(*(self._handle(lane, records) for lane, records in work))
            await self._commit_shared([h for h in handled if h is not None])

    async def stop(self) -> None:
        """Finish the batch in flight, close every lane, leave the group."""
        self._stopping.set()
        async with self._lock:  # the batch in flight commits or aborts first
            self._closing = True
            if self.lanes:
                await self.stage.on_revoked(set(self.lanes))
            for lane in list(self.lanes.values()):
                await self._close_lane(lane)
            self._forget_lag(self.lanes)
            self.lanes.clear()
            if self._shared is not None:
                await _stop_producer(self._shared.producer)
        # Not under the lock: leaving may wait for a rebalance whose callbacks take the lock.
        if self._consumer is not None:
            # with the broker away aiokafka lets a fetch task's CancelledError out of stop()
            await stop_consumer(self._consumer)
            self._consumer = None
        log.info("loop_stopped", stage=self.stage.name, **self.stats)

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        fresh = time.monotonic() - self._last_poll < max(30.0, self.settings.poll_timeout_ms / 1000 * 10)
        ok = self._consumer is not None and self._joined and fresh
        return ok, {
            "stage": self.stage.name,
            "assigned": sorted(f"{tp.topic}:{tp.partition}" for tp in self.lanes),
            "lag": self.total_lag(),
        }

    def total_lag(self) -> int:
        return sum(n for n in (self._lag(tp, lane) for tp, lane in list(self.lanes.items())) if n is not None)

    def _lag(self, tp: TopicPartition, lane: Lane) -> int | None:
        """Records of ``tp`` not processed yet: last stable offset − the consumer's position.

        Not ``lso − committed offset``: a topic written by transactions ends with a commit marker
        after its last record, so a caught-up member would show 1 for every partition. The
        position moves over markers (and aborted records) as the consumer reads them, so it is
        ``lso`` exactly when everything is processed. While a member is behind, markers in the
        part not read yet still count (one per upstream transaction): an upper bound, which
        ``pipeline lag`` replaces by a count of the records themselves.
        """
        consumer = self._consumer
        if consumer is None or lane.next_offset is None:
            return None
        try:
            end = consumer.last_stable_offset(tp)
            state = consumer._subscription.subscription.assignment.state_value(tp)  # noqa: SLF001 - sync position
        except (AssertionError, AttributeError):  # no longer assigned (a rebalance under way)
            return None
        if end is None or end < 0:
            return None
        position = state.position if state is not None and state.has_valid_position else None
        # records below the committed offset are done, whatever the consumer fetched
        return max(0, end - max(lane.next_offset, position or 0))

    # -- one batch -----------------------------------------------------------------------------
    async def _process_batch(self, lane: Lane, records: list[ConsumerRecord]) -> None:
        """Steps 1–7 for one batch, in a transaction of the lane's own producer."""
        handled = await self._handle(lane, records)
        if handled is not None:
            await self._commit_lane(handled)

    async def _handle(self, lane: Lane, records: list[ConsumerRecord]) -> _Handled | None:
        """Steps 1–2: the stage's outputs for the batch, or None when there is nothing to commit."""
        tp = lane.tp
        first, end = records[0].offset, records[-1].offset + 1
        started = time.perf_counter()
        self._m_in.inc(len(records))
        self.stats["in"] += len(records)

        # 1. the stage handles the batch
        try:
            result = await self.stage.handle(lane, records)
        except Exception as exc:  # abort path A: nothing produced yet
            log.exception(
                "stage_failed",
                stage=self.stage.name,
                partition=f"{tp.topic}:{tp.partition}",
                offset=first,
                error=str(exc),
            )
            await self._retry_later(tp, first)
            return None
        upto = end if result.commit_upto is None else min(max(result.commit_upto, first), end)

        # 2. nothing to produce and nothing to commit: no transaction at all
        if upto == first and not result.outputs and not result.rejections:
            await self._retry_later(tp, first)
            return None
        dead = [dead_letter(r, self.stage.name, self.settings.deadletter_topic) for r in result.rejections]
        return _Handled(lane, first, end, upto, result, dead, started)

    async def _commit_lane(self, h: _Handled) -> None:
        """Steps 3–6 on the lane's own producer, then the bookkeeping."""
        consumer = self._consumer
        assert consumer is not None
        lane, tp = h.lane, h.lane.tp
        producer = lane.producer
        try:
            # 3. begin
            await producer.begin_transaction()
            # 4. outputs, then dead letters; every send acknowledged
            await _send_all(producer, [*h.result.outputs, *h.dead])
            # 5. the input offsets join the transaction
            if h.upto > h.first:
                await producer.send_offsets_to_transaction({tp: h.upto}, self.settings.group_id)
            # 6. commit
            await producer.commit_transaction()
        except ProducerFenced:  # abort path C: another member owns this partition now
            log.warning("producer_fenced", stage=self.stage.name, transactional_id=lane.transactional_id)
            self._aborted()
            self._fenced.add(tp)
            consumer.pause(tp)
            await self._close_lane(lane)
            return
        except Exception as exc:  # abort path B: abort, seek back, retry
            self._aborted(exc, [h])
            await _abort_quietly(producer)
            if _is_fatal(lane.producer):
                await self._restart_producer(lane)
            await self._retry_later(tp, h.first)
            return
        self._transaction_committed()
        self._committed(h)

    async def _commit_shared(self, batches: list[_Handled]) -> None:
        """Steps 3–6 for the batches of every due partition in one transaction of the process's
        producer, offsets fenced by the member's generation; then the bookkeeping."""
        consumer, shared = self._consumer, self._shared
        assert consumer is not None and shared is not None
        if not batches:
            return
        async with shared.lock:  # a stage's intents (Lane.publish) commit before or after, never inside
            producer = shared.producer
            try:
                # 3. begin
                await producer.begin_transaction()
                # 4. outputs, then dead letters, of every batch; every send acknowledged
                await _send_all(producer, [r for h in batches for r in (*h.result.outputs, *h.dead)])
                # 5. the input offsets join the transaction, with the member's generation
                offsets = {h.lane.tp: h.upto for h in batches if h.upto > h.first}
                if offsets:
                    await send_offsets_fenced(producer, offsets, shared.member)
                # 6. commit
                await producer.commit_transaction()
            except MembershipFenced as exc:  # abort path C: the group has moved on from this member
                log.warning("membership_fenced", stage=self.stage.name, member=str(shared.member), error=str(exc))
                self._aborted()
                await _abort_quietly(producer)
                for h in batches:
                    self._fenced.add(h.lane.tp)
                    consumer.pause(h.lane.tp)
                    h.lane.closed = True
                return
            except ProducerFenced:  # a newer producer took this process's transactional id
                self._aborted()
                for h in batches:
                    consumer.seek(h.lane.tp, h.first)
                if self.fatal is None:
                    self.fatal = RuntimeError(
                        f"the transactional id {shared.transactional_id!r} was fenced: another process uses it "
                        "(give each replica its own LOOP_INSTANCE_ID), or a transaction outlived "
                        "KAFKA_TRANSACTION_TIMEOUT_MS"
                    )
                    log.error("producer_fenced", stage=self.stage.name, transactional_id=shared.transactional_id)
                self.request_stop()
                return
            except Exception as exc:  # abort path B: abort, seek every batch back, retry
                self._aborted(exc, batches)
                await _abort_quietly(producer)
                if _is_fatal(producer):
                    await self._restart_producer(None)
                failed = True
            else:
                failed = False
        if failed:
            await asyncio.gather(*(self._retry_later(h.lane.tp, h.first) for h in batches))
            return
        self._transaction_committed()
        for h in batches:
            self._committed(h)

    def _transaction_committed(self) -> None:
        self._m_commit.inc()
        self.stats["committed"] += 1

    def _aborted(self, exc: Exception | None = None, batches: Sequence[_Handled] = ()) -> None:
        self._m_abort.inc()
        self.stats["aborted"] += 1
        if exc is not None:
            log.warning(
                "transaction_aborted",
                stage=self.stage.name,
                partitions=[f"{h.lane.tp.topic}:{h.lane.tp.partition}@{h.first}" for h in batches],
                error=f"{type(exc).__name__}: {exc}",
            )

    def _committed(self, h: _Handled) -> None:
        """After the commit: the stage's hook, the committed position, counts, step 7."""
        assert self._consumer is not None
        lane, result = h.lane, h.result
        after_commit = getattr(self.stage, "after_commit", None)
        if after_commit is not None:
            after_commit(lane, result)
        self._failures.pop(lane.tp, None)
        lane.next_offset = h.upto
        self._m_out.inc(len(result.outputs))
        self.stats["out"] += len(result.outputs)
        if h.dead:
            self._m_rejected.inc(len(h.dead))
            self.stats["rejected"] += len(h.dead)
            for r in result.rejections:
                self._deadletter_counter(r.error_class).inc()
                log.warning(
                    "dead_lettered",
                    stage=self.stage.name,
                    error_class=r.error_class,
                    error=r.message,
                    source=f"{r.record.topic}:{r.record.partition}:{r.record.offset}",
                )
        # 7. the stage stopped early: fetch the rest again
        if h.upto < h.end:
            self._consumer.seek(lane.tp, h.upto)
        self._m_batch.observe(time.perf_counter() - h.started)

    def _deadletter_counter(self, reason: str) -> Any:
        c = self._m_deadletters.get(reason)
        if c is None:
            c = self._m_deadletters[reason] = metrics().deadletters.labels(self.stage.name, reason)
        return c

    async def _retry_later(self, tp: TopicPartition, offset: int) -> None:
        if self._consumer is None:
            return
        self._consumer.seek(tp, offset)
        n = self._failures[tp] = self._failures.get(tp, 0) + 1
        delay = min(self.settings.retry_backoff_max_s, 0.1 * 2 ** min(n, 10)) * random.uniform(0.5, 1.0)
        await asyncio.sleep(delay)

    # -- lanes ---------------------------------------------------------------------------------
    def _transactional_id(self, tp: TopicPartition) -> str:
        return f"{self.settings.group_id}.{tp.topic}.{tp.partition}"

    async def _start_producer(self, transactional_id: str) -> AIOKafkaProducer:
        """A started transactional producer. Its first producer-id request fences an older producer
        with this id and settles that one's open transaction; an empty begin/abort waits for it
        without a broker-side transaction."""
        s = self.settings
        producer = transactional_producer(
            s.bootstrap,
            transactional_id,
            client_id=f"{s.client_id}-{transactional_id}",
            transaction_timeout_ms=s.transaction_timeout_ms,
            linger_ms=s.producer_linger_ms,
            max_batch_size=s.producer_batch_bytes,
            max_request_size=max(s.producer_batch_bytes, 1024 * 1024),
        )

        async def fence() -> None:
            await producer.start()
            await producer.begin_transaction()
            await producer.abort_transaction()

        try:
            # bounded: with the broker gone the producer-id request would be retried for ever
            await asyncio.wait_for(fence(), s.transaction_timeout_ms / 1000)
        except BaseException:
            await stop_quietly(producer)
            raise
        return producer

    async def _open_lane(self, tp: TopicPartition) -> Lane:
        if self._shared is not None:
            return Lane(tp, None, self._shared.transactional_id, self._shared)
        tid = self._transactional_id(tp)
        return Lane(tp, await self._start_producer(tid), tid, None, self._transaction_committed)

    async def _close_lane(self, lane: Lane) -> None:
        if lane.closed:
            return
        lane.closed = True
        if lane.shared is None:  # the shared producer has no transaction open outside the loop's lock
            await _stop_producer(lane.producer)

    async def _restart_producer(self, lane: Lane | None) -> None:
        """Replace a producer in a fatal state: a lane's own, or the shared one (``lane`` None).
        While the broker is away this waits for it (capped backoff, one line when the first
        attempt fails, one when it worked); a stop ends the wait and leaves the lane closed."""
        shared = self._shared if lane is None else None
        if lane is not None:
            tid = lane.transactional_id
            await self._close_lane(lane)
        else:
            assert shared is not None
            tid = shared.transactional_id
            await _stop_producer(shared.producer)
        failures = 0
        while not self._stopping.is_set():
            try:
                producer = await self._start_producer(tid)
            except Exception as exc:  # noqa: BLE001 - retried until the broker is back or a stop
                failures += 1
                if failures == 1:
                    log.warning(
                        "lane_restart_failed",
                        stage=self.stage.name,
                        transactional_id=tid,
                        error=f"{type(exc).__name__}: {exc}",
                    )
                delay = min(self.settings.retry_backoff_max_s, 0.5 * 2 ** min(failures, 10))
                try:
                    await asyncio.wait_for(self._stopping.wait(), delay * random.uniform(0.8, 1.0))
                except TimeoutError:
                    pass
                continue
            if shared is not None:
                shared.producer = producer
            else:
                assert lane is not None
                fresh = Lane(lane.tp, producer, tid, None, self._transaction_committed)
                fresh.next_offset = lane.next_offset
                self.lanes[lane.tp] = fresh
            if failures:
                log.info("lane_restarted", stage=self.stage.name, transactional_id=tid, failures=failures)
            return

    async def _prepare_partitions(self, consumer: AIOKafkaConsumer, new: list[TopicPartition]) -> None:
        """Lanes, positions and the stage's state for newly assigned partitions. Repeatable: a lane
        opened by an earlier try is kept."""
        s = self.settings
        if s.producers == "process":
            if self._shared is None:
                tid = s.process_transactional_id
                self._shared = SharedProducer(await self._start_producer(tid), tid, self._transaction_committed)
                log.info("shared_producer_started", stage=self.stage.name, transactional_id=tid)
            # the generation these partitions were assigned in: every commit from now on carries it
            self._shared.member = membership(consumer)
        missing = [tp for tp in new if tp not in self.lanes or self.lanes[tp].closed]
        opened = await asyncio.gather(*(self._open_lane(tp) for tp in missing), return_exceptions=True)
        failed: BaseException | None = None
        for tp, lane in zip(missing, opened, strict=True):
            if isinstance(lane, BaseException):
                failed = failed or lane
            else:
                self.lanes[tp] = lane
        if failed is not None:
            raise failed
        if new:
            committed: Sequence[int | None]
            if self._shared is not None:
                # No lane fences the previous owner here: wait until no transaction holds a newer
                # offset for these partitions (a killed owner's: up to the transaction timeout).
                stable = await committed_stable(consumer, new, timeout_s=s.transaction_timeout_ms / 1000 + 30)
                committed = [stable.get(tp) for tp in new]
            else:  # positions from a fresh offset fetch, now that zombies are fenced
                committed = await asyncio.gather(*(consumer.committed(tp) for tp in new))
            for tp, offset in zip(new, committed, strict=True):
                if offset is None:
                    await consumer.seek_to_beginning(tp)
                    self.lanes[tp].next_offset = await consumer.position(tp)
                else:
                    consumer.seek(tp, offset)
                    self.lanes[tp].next_offset = offset
        await self.stage.on_assigned({tp: self.lanes[tp] for tp in new})

    # -- rebalance callbacks (called by the consumer's coordinator task) -------------------------
    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self._lock:  # waits for the batch in flight
            if self._closing:
                return
            self._drop_pending(revoked)  # not handed to the stage: the next owner fetches them again
            gone = [tp for tp in revoked if tp in self.lanes]
            if gone:
                try:
                    await self.stage.on_revoked(set(gone))
                finally:
                    for tp in gone:
                        await self._close_lane(self.lanes.pop(tp))
                    self._forget_lag(gone)
            log.info(
                "partitions_revoked", stage=self.stage.name, partitions=sorted(f"{t.topic}:{t.partition}" for t in gone)
            )
            self._m_assigned.set(len(self.lanes))

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        consumer = self._consumer
        async with self._lock:
            if self._closing or consumer is None:
                return
            new = [tp for tp in assigned if tp not in self.lanes or self.lanes[tp].closed]
            self._drop_pending(new)  # the seek to the committed offset below fetches them again
            # Lanes, positions and the stage's own preparation (a sink loads its ledger) must all
            # succeed before any record of these partitions is handled; aiokafka would only log an
            # exception raised here, and the partitions' records would go by unhandled.
            attempts = self.settings.assign_attempts
            for attempt in range(1, attempts + 1):
                try:
                    await self._prepare_partitions(consumer, new)
                    break
                except Exception as exc:  # noqa: BLE001
                    log.error(
                        "assignment_preparation_failed",
                        stage=self.stage.name,
                        attempt=attempt,
                        error=f"{type(exc).__name__}: {exc}",
                    )
                    if attempt == attempts:
                        # never handle records without the stage's state: stop, exit non-zero
                        for tp in new:
                            lane = self.lanes.pop(tp, None)
                            if lane is not None:
                                await self._close_lane(lane)
                        self._forget_lag(new)
                        self.fatal = exc
                        self.request_stop()
                        return
                    await asyncio.sleep(min(10.0, 0.5 * 2**attempt))
            for tp in list(self._fenced):
                if tp in assigned:
                    consumer.resume(tp)
                self._fenced.discard(tp)
            self._joined = True  # ready: assigned, lanes open, positions set
            self._m_assigned.set(len(self.lanes))
            log.info(
                "partitions_assigned", stage=self.stage.name, partitions=sorted(f"{t.topic}:{t.partition}" for t in new)
            )

    def _update_lag(self) -> None:
        gauge = metrics().consumer_lag
        for tp, lane in list(self.lanes.items()):
            lag = self._lag(tp, lane)
            if lag is not None:
                gauge.labels(self.settings.group_id, tp.topic, str(tp.partition)).set(lag)

    def _forget_lag(self, tps: Iterable[TopicPartition]) -> None:
        """Partitions this member no longer owns have no lag series here (their new owner sets it)."""
        gauge = metrics().consumer_lag
        for tp in tps:
            gauge.remove(self.settings.group_id, tp.topic, str(tp.partition))


class _Listener(ConsumerRebalanceListener):
    def __init__(self, loop: TransactionalLoop) -> None:
        self.loop = loop

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.loop._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.loop._on_assigned(set(assigned))
