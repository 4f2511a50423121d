"""Group-fenced transactional offset commits (TxnOffsetCommit v3) and stable offset fetches
(OffsetFetch v7 ``require_stable``) on the real broker.

Every member here has ONE transactional producer whose transactional id has nothing to do with the
partitions it processes, so only the group generation can fence a member that lost its partitions.
A "zombie" is a member that began a transaction, produced its outputs and lost its partitions
before it committed: it stalled past ``max_poll_interval_ms`` (aiokafka then leaves the group by
itself), it was rebalanced into a newer generation, or a new process took its static instance id.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Iterable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.client import CoordinationType
from aiokafka.structs import OffsetAndMetadata

from pipeline.kafka.clients import new_consumer, new_producer, transactional_producer
from pipeline.kafka.fencing import (
    NO_GENERATION,
    GroupMembership,
    MembershipFenced,
    TxnOffsetCommitRequestV3,
    committed_stable,
    fetch_offsets,
    membership,
    send_offsets_fenced,
)
from tests.conftest import KafkaIO

pytestmark = pytest.mark.kafka

N = 5  # input records per partition
PARTITIONS = (0, 1)


class Fixture:
    def __init__(self, bootstrap: str, kafka: KafkaIO, prefix: str) -> None:
        self.bootstrap, self.kafka = bootstrap, kafka
        self.src, self.out = f"{prefix}in", f"{prefix}out"
        self.group = f"{prefix}group"
        self.tps = [TopicPartition(self.src, p) for p in PARTITIONS]
        self.closers: list = []

    async def setup(self) -> None:
        await self.kafka.create_topic(self.src, len(PARTITIONS))
        await self.kafka.create_topic(self.out, len(PARTITIONS))
        producer = new_producer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True)
        await producer.start()
        try:
            sends = [
                await producer.send(self.src, value=f"p{p}-{i}".encode(), partition=p)
                for p in PARTITIONS
                for i in range(N)
            ]
            await asyncio.gather(*sends)
        finally:
            await producer.stop()

    async def member(self, listener: ConsumerRebalanceListener | None = None, **options) -> AIOKafkaConsumer:
        consumer = new_consumer(
            *([] if listener else [self.src]),
            bootstrap_servers=self.bootstrap,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            session_timeout_ms=options.pop("session_timeout_ms", 10_000),
            heartbeat_interval_ms=options.pop("heartbeat_interval_ms", 300),
            **options,
        )
        await consumer.start()
        self.closers.append(consumer.stop)
        if listener:
            consumer.subscribe([self.src], listener=listener)
        return consumer

    async def producer(
        self, name: str, transaction_timeout_ms: int = 60_000, transactional_id: str | None = None
    ) -> AIOKafkaProducer:
        # one producer per process: its transactional id names the process, not a partition
        producer = transactional_producer(
            self.bootstrap,
            transactional_id or f"{self.group}.{name}.{uuid.uuid4().hex[:6]}",
            client_id=name,
            transaction_timeout_ms=transaction_timeout_ms,
        )
        await producer.start()
        self.closers.append(producer.stop)
        return producer

    async def close(self) -> None:
        for close in reversed(self.closers):
            with contextlib.suppress(Exception):
                await close()

    async def output(self, isolation: str = "read_committed") -> list[bytes]:
        return [r.value for r in await self.kafka.read_all(self.out, isolation=isolation, idle=1.5)]


@pytest.fixture
async def fx(kafka_bootstrap: str, kafka: KafkaIO, topic_prefix: str):
    f = Fixture(kafka_bootstrap, kafka, topic_prefix)
    await f.setup()
    yield f
    await f.close()


async def wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.05)


def owns(consumer: AIOKafkaConsumer, tps: Iterable[TopicPartition]) -> bool:
    return consumer.assignment() == set(tps)


async def fetch(consumer: AIOKafkaConsumer, count: int, timeout: float = 20.0) -> list:
    """``count`` records from the consumer's assignment (fails on fewer)."""
    records: list = []
    deadline = time.monotonic() + timeout
    while len(records) < count and time.monotonic() < deadline:
        for batch in (await consumer.getmany(timeout_ms=200)).values():
            records.extend(batch)
    assert len(records) == count, f"expected {count} records, got {len(records)}"
    return records


async def begin_and_produce(producer: AIOKafkaProducer, out: str, records: list) -> dict[TopicPartition, int]:
    """Open a transaction, produce one output per input record (same partition); the offsets to commit."""
    await producer.begin_transaction()
    sends = [await producer.send(out, value=r.value, partition=r.partition) for r in records]
    await asyncio.gather(*sends)
    offsets: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
    return offsets


async def process(consumer: AIOKafkaConsumer, producer: AIOKafkaProducer, out: str, count: int) -> None:
    """A live member's whole batch: fetch, produce, commit offsets fenced by its generation, commit."""
    member = membership(consumer)
    records = await fetch(consumer, count)
    offsets = await begin_and_produce(producer, out, records)
    await send_offsets_fenced(producer, offsets, member)
    await producer.commit_transaction()


def all_inputs() -> Counter:
    return Counter(f"p{p}-{i}".encode() for p in PARTITIONS for i in range(N))


# --------------------------------------------------------------------------------------------


async def test_commit_with_current_generation_becomes_visible(fx: Fixture) -> None:
    a = await fx.member()
    producer = await fx.producer("a")
    await wait_for(lambda: owns(a, fx.tps), what="assignment")
    member = membership(a)
    assert member.valid and member.generation_id >= 1

    await process(a, producer, fx.out, N * len(PARTITIONS))

    assert Counter(await fx.output()) == all_inputs()
    assert await committed_stable(a, fx.tps) == dict.fromkeys(fx.tps, N)
    assert {tp: await a.committed(tp) for tp in fx.tps} == dict.fromkeys(fx.tps, N)  # aiokafka's own fetch agrees


async def test_stalled_member_commit_is_refused_unknown_member(fx: Fixture) -> None:
    # A stops polling past max_poll_interval_ms: aiokafka leaves the group for it (the broker would
    # remove it at the session timeout anyway). B takes both partitions in a newer generation.
    a = await fx.member(max_poll_interval_ms=2_000)
    a_producer = await fx.producer("a")
    await wait_for(lambda: owns(a, fx.tps), what="A's assignment")
    a_member = membership(a)  # taken with the batch's records
    offsets = await begin_and_produce(a_producer, fx.out, await fetch(a, N * len(PARTITIONS)))

    b = await fx.member()
    b_producer = await fx.producer("b")
    await wait_for(lambda: owns(b, fx.tps), what="B's assignment")
    b_member = membership(b)
    assert b_member.generation_id > a_member.generation_id

    # the zombie's commit with the generation of its batch: refused
    with pytest.raises(MembershipFenced) as refused:
        await send_offsets_fenced(a_producer, offsets, a_member)
    assert refused.value.reason == "UNKNOWN_MEMBER_ID"
    # the transaction can only abort now; even a commit attempt does not publish it
    with pytest.raises(MembershipFenced):
        await a_producer.commit_transaction()
    await a_producer.abort_transaction()
    # its consumer has forgotten the membership by now: refused before any request
    assert membership(a).generation_id == NO_GENERATION
    await a_producer.begin_transaction()
    with pytest.raises(MembershipFenced, match="not a member"):
        await send_offsets_fenced(a_producer, offsets, membership(a))
    await a_producer.abort_transaction()

    await process(b, b_producer, fx.out, N * len(PARTITIONS))

    assert Counter(await fx.output()) == all_inputs()  # every input exactly once, all from B
    uncommitted = Counter(await fx.output(isolation="read_uncommitted"))
    assert uncommitted == all_inputs() + all_inputs()  # A's outputs were written, and aborted
    assert await committed_stable(b, fx.tps) == dict.fromkeys(fx.tps, N)


async def test_rebalanced_member_commit_with_old_generation_is_refused_illegal_generation(fx: Fixture) -> None:
    # B joins while A is in a transaction; A rejoins at once (its heartbeat learns of the
    # rebalance) and keeps one partition in the new generation. Its batch was of the old one.
    a = await fx.member()
    a_producer = await fx.producer("a")
    await wait_for(lambda: owns(a, fx.tps), what="A's assignment")
    old = membership(a)
    offsets = await begin_and_produce(a_producer, fx.out, await fetch(a, N * len(PARTITIONS)))

    b = await fx.member()
    b_producer = await fx.producer("b")
    await wait_for(lambda: len(a.assignment()) == 1 and len(b.assignment()) == 1, what="the split")
    new = membership(a)
    assert new.member_id == old.member_id and new.generation_id > old.generation_id

    with pytest.raises(MembershipFenced) as refused:
        await send_offsets_fenced(a_producer, offsets, old)
    assert refused.value.reason == "ILLEGAL_GENERATION"
    await a_producer.abort_transaction()

    # each member processes its own partition in the new generation: every input exactly once
    await process(a, a_producer, fx.out, N)
    await process(b, b_producer, fx.out, N)
    assert Counter(await fx.output()) == all_inputs()
    assert await committed_stable(b, fx.tps) == dict.fromkeys(fx.tps, N)


class CommitOnRevoke(ConsumerRebalanceListener):
    """Ends the transaction in flight when the partitions are revoked, before the member rejoins."""

    def __init__(self) -> None:
        self.in_flight: tuple[AIOKafkaProducer, dict[TopicPartition, int], GroupMembership] | None = None
        self.outcome: str | None = None

    async def on_partitions_revoked(self, revoked) -> None:
        if self.in_flight is None:
            return
        producer, offsets, member = self.in_flight
        self.in_flight = None
        try:
            await send_offsets_fenced(producer, offsets, member)
            await producer.commit_transaction()
            self.outcome = "committed"
        except MembershipFenced as exc:
            await producer.abort_transaction()
            self.outcome = exc.reason

    async def on_partitions_assigned(self, assigned) -> None:
        pass


async def test_commit_on_revoke_with_the_ending_generation_is_accepted(fx: Fixture) -> None:
    # B joins while A is in a transaction; aiokafka calls A's on_partitions_revoked before A rejoins:
    # the group is preparing the rebalance and A's generation is still the current one.
    listener = CommitOnRevoke()
    a = await fx.member(listener=listener)
    a_producer = await fx.producer("a")
    await wait_for(lambda: owns(a, fx.tps), what="A's assignment")
    member = membership(a)
    offsets = await begin_and_produce(a_producer, fx.out, await fetch(a, N * len(PARTITIONS)))
    listener.in_flight = (a_producer, offsets, member)

    b = await fx.member()
    await wait_for(lambda: len(a.assignment()) == 1 and len(b.assignment()) == 1, what="the split")
    assert listener.outcome == "committed"
    assert membership(a).generation_id > member.generation_id
    assert await committed_stable(b, fx.tps) == dict.fromkeys(fx.tps, N)
    assert Counter(await fx.output()) == all_inputs()


async def test_replaced_static_member_commit_is_refused_fenced_instance_id(fx: Fixture) -> None:
    # A static member (group instance id) is replaced by a new process with the same instance id:
    # the broker swaps the member id and keeps the generation; the old process is a zombie.
    a = await fx.member(group_instance_id="worker-1", session_timeout_ms=30_000)
    a_producer = await fx.producer("a")
    await wait_for(lambda: owns(a, fx.tps), what="A's assignment")
    old = membership(a)
    offsets = await begin_and_produce(a_producer, fx.out, await fetch(a, N * len(PARTITIONS)))

    a2 = await fx.member(group_instance_id="worker-1", session_timeout_ms=30_000)
    a2_producer = await fx.producer("a2")
    await wait_for(lambda: owns(a2, fx.tps), what="the new process's assignment")
    new = membership(a2)
    assert new.member_id != old.member_id
    assert new.generation_id == old.generation_id  # only the instance id tells the zombie apart

    with pytest.raises(MembershipFenced) as refused:
        await send_offsets_fenced(a_producer, offsets, old)
    assert refused.value.reason == "FENCED_INSTANCE_ID"
    await a_producer.abort_transaction()

    await process(a2, a2_producer, fx.out, N * len(PARTITIONS))
    assert Counter(await fx.output()) == all_inputs()


async def test_commit_without_generation_is_not_fenced_by_the_broker(fx: Fixture) -> None:
    # What aiokafka's send_offsets_to_transaction sends (v0: no generation) and a v3 commit without
    # generation and member id are both accepted from a process that is not in the group at all.
    b = await fx.member()
    await wait_for(lambda: owns(b, fx.tps), what="B's assignment")
    outsider = await fx.producer("outsider")
    offsets = {tp: OffsetAndMetadata(1, "") for tp in fx.tps}

    await outsider.begin_transaction()
    await outsider.send_offsets_to_transaction(offsets, fx.group)  # v0: accepted
    await outsider.abort_transaction()

    await outsider.begin_transaction()
    no_generation = GroupMembership(fx.group, NO_GENERATION, "")
    txn = outsider._txn_manager  # noqa: SLF001
    await outsider.send_offsets_to_transaction({fx.tps[0]: 0}, fx.group)  # adds the group to the transaction
    request = TxnOffsetCommitRequestV3(
        txn.transactional_id, txn.producer_id, txn.producer_epoch, no_generation, offsets
    )
    node = await outsider._sender._find_coordinator(CoordinationType.GROUP, fx.group)  # noqa: SLF001
    response = await outsider.client.send(node, request)
    assert {code for _t, parts, _g in response.topics for _p, code, _tags in parts} == {0}  # accepted
    await outsider.abort_transaction()
    # which is why send_offsets_fenced refuses such a membership itself
    await outsider.begin_transaction()
    with pytest.raises(MembershipFenced):
        await send_offsets_fenced(outsider, offsets, no_generation)
    await outsider.abort_transaction()
    assert await committed_stable(b, fx.tps) == dict.fromkeys(fx.tps, None)


@pytest.mark.parametrize("zombie_ends", ["commit", "abort"])
async def test_offsets_sent_before_the_rebalance_hold_the_new_owner_until_the_transaction_ends(
    fx: Fixture, zombie_ends: str
) -> None:
    # A commits its offsets in the transaction while its generation is current, then stalls and
    # loses the partitions before it ends the transaction.
    a = await fx.member(max_poll_interval_ms=2_000)
    a_producer = await fx.producer("a")
    await wait_for(lambda: owns(a, fx.tps), what="A's assignment")
    a_member = membership(a)
    offsets = await begin_and_produce(a_producer, fx.out, await fetch(a, N * len(PARTITIONS)))
    await send_offsets_fenced(a_producer, offsets, a_member)  # accepted: pending in A's transaction

    b = await fx.member()
    b_producer = await fx.producer("b")
    await wait_for(lambda: owns(b, fx.tps), what="B's assignment")
    assert membership(b).generation_id > a_member.generation_id

    # without require_stable the new owner reads the offset from before A's transaction ...
    assert {tp: await b.committed(tp) for tp in fx.tps} == dict.fromkeys(fx.tps, None)  # aiokafka: OffsetFetch v3
    plain = await fetch_offsets(b, fx.tps, require_stable=False)
    assert plain.offsets == dict.fromkeys(fx.tps, None) and not plain.unstable
    # ... with it, the coordinator says the offsets are unstable while A's transaction is open
    stable = await fetch_offsets(b, fx.tps, require_stable=True)
    assert stable.unstable == set(fx.tps)

    # the group does not fence the end of A's transaction: it commits (or aborts) after the rebalance
    if zombie_ends == "commit":
        await a_producer.commit_transaction()
    else:
        await a_producer.abort_transaction()

    start = await committed_stable(b, fx.tps)
    if zombie_ends == "commit":
        assert start == dict.fromkeys(fx.tps, N)  # B starts after A's outputs
        assert Counter(await fx.output()) == all_inputs()
    else:
        assert start == dict.fromkeys(fx.tps, None)
        for tp in fx.tps:
            b.seek(tp, 0)
        await process(b, b_producer, fx.out, N * len(PARTITIONS))
        assert Counter(await fx.output()) == all_inputs()
    assert await committed_stable(b, fx.tps) == dict.fromkeys(fx.tps, N)


@pytest.mark.parametrize("restart", ["new-transactional-id", "same-transactional-id"])
async def test_abandoned_transaction_blocks_readers_and_the_next_owner_until_its_timeout(
    fx: Fixture, restart: str
) -> None:
    # A process dies in a transaction (its producer never ends it). Restarted with a transactional
    # id of its own (new-transactional-id), nothing ends that transaction but the broker, after
    # transaction.timeout.ms plus up to one abort sweep: until then read_committed readers stop at
    # it and the group's offsets are unstable. Restarted with the same transactional id, its first
    # producer id request aborts it at once.
    timeout_ms = 3_000
    a = await fx.member(max_poll_interval_ms=2_000)
    dead = await fx.producer("dead", transaction_timeout_ms=timeout_ms)
    await wait_for(lambda: owns(a, fx.tps), what="A's assignment")
    offsets = await begin_and_produce(dead, fx.out, await fetch(a, N * len(PARTITIONS)))
    await send_offsets_fenced(dead, offsets, membership(a))
    died = time.monotonic()
    dead._sender._sender_task.cancel()  # noqa: SLF001 - the process is gone: no EndTxn, no heartbeat
    await a.stop()
    if restart == "same-transactional-id":
        await fx.producer("restarted", transactional_id=dead._txn_manager.transactional_id)  # noqa: SLF001

    b = await fx.member()
    b_producer = await fx.producer("b")
    await wait_for(lambda: owns(b, fx.tps), what="B's assignment")
    # a record committed after the abandoned transaction's records is invisible while it hangs
    await b_producer.begin_transaction()
    await (await b_producer.send(fx.out, value=b"after", partition=0))
    await b_producer.commit_transaction()

    async def timed(awaitable):
        result = await awaitable
        return result, time.monotonic() - died

    (start, offsets_after), (records, visible_after) = await asyncio.gather(
        timed(committed_stable(b, fx.tps, timeout_s=60)),
        timed(fx.kafka.read_all(fx.out, expect=1, timeout=60)),
    )
    assert start == dict.fromkeys(fx.tps, None) and [r.value for r in records] == [b"after"]
    print(
        f"\nabandoned transaction (transaction.timeout.ms={timeout_ms}, restart with {restart}): offsets stable after "
        f"{offsets_after:.1f}s, later output visible after {visible_after:.1f}s"
    )
    if restart == "same-transactional-id":
        assert offsets_after < timeout_ms / 1000 and visible_after < timeout_ms / 1000
    else:  # the abort sweep runs every transaction.abort.timed.out.transaction.cleanup.interval.ms (10 s)
        assert timeout_ms / 1000 <= offsets_after <= timeout_ms / 1000 + 12
        assert timeout_ms / 1000 <= visible_after <= timeout_ms / 1000 + 12
