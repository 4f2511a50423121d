"""The transactional loop with one producer per process (``LOOP_PRODUCERS=process``) on the real broker.

Its transactional id names the process, not a partition, so it fences nothing when partitions move:
the group does, by the generation each offset commit carries (KIP-447). These tests are what that
adds to tests/integration/test_loop.py (which runs its kill -9 and rebalance tests both ways): all
due partitions share a transaction, and a member the group has moved on from can neither commit a
batch nor make a sink's intents durable.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from pipeline.kafka.fencing import MembershipFenced
from pipeline.kafka.loop import LoopSettings, TransactionalLoop, TransformStage
from pipeline.kafka.records import OutRecord
from pipeline.ops.copy import copy_transform
from tests.conftest import KafkaIO

pytestmark = pytest.mark.kafka


def _settings(bootstrap: str, group: str, src: str, dlq: str, instance: str, **kw) -> LoopSettings:
    return LoopSettings(
        bootstrap=bootstrap,
        group_id=group,
        input_topics=(src,),
        deadletter_topic=dlq,
        poll_timeout_ms=100,
        producers="process",
        instance_id=instance,
        **kw,
    )


async def _wait(condition, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.1)


async def test_a_stop_commits_every_partition_in_one_transaction(kafka: KafkaIO, topic_prefix: str):
    """Six partitions gathered for a long interval: one transaction carries all of them (one
    producer per partition would take six), each record once."""
    src = await kafka.create_topic(f"{topic_prefix}src", partitions=6)
    dst = await kafka.create_topic(f"{topic_prefix}dst", partitions=6)
    dlq = await kafka.create_topic(f"{topic_prefix}dlq")
    await kafka.produce(src, ((f"r{i}".encode(), f"r{i}".encode()) for i in range(120)))
    loop = TransactionalLoop(
        _settings(kafka.bootstrap, f"{topic_prefix}g", src, dlq, "one", commit_interval_ms=600_000),
        TransformStage("copy", copy_transform(dst, None)),
    )
    await loop.start()
    task = asyncio.create_task(loop.run())
    try:
        await _wait(lambda: sum(map(len, loop._pending.values())) >= 120, 60, "all 120 gathered")  # noqa: SLF001
        assert len(loop._pending) == 6  # noqa: SLF001 - every partition holds records
    finally:
        loop.request_stop()
        await task
        await loop.stop()
    assert loop.stats["committed"] == 1, loop.stats
    got = await kafka.read_all(dst, expect=120, timeout=30)
    assert len({r.value for r in got}) == len(got) == 120


class _PublishesAnIntent(TransformStage):
    """Copies, and first makes one intent per batch durable the way a sink does (``lane.publish``)."""

    def __init__(self, dst: str, intents: str) -> None:
        super().__init__("intents", copy_transform(dst, None))
        self.intents = intents

    async def handle(self, lane, records):
        await lane.publish([OutRecord(self.intents, f"intent-{lane.tp.partition}".encode(), b"k")])
        return await super().handle(lane, records)


async def test_intents_of_partitions_handled_together_share_transactions(kafka: KafkaIO, topic_prefix: str):
    """Six partitions handled together, each publishing its intent first: the intents go in at
    most two transactions (the first caller's, then everyone who asked meanwhile) and the six
    batches in one — where a producer per partition takes twelve."""
    src = await kafka.create_topic(f"{topic_prefix}src", partitions=6)
    dst = await kafka.create_topic(f"{topic_prefix}dst", partitions=6)
    dlq = await kafka.create_topic(f"{topic_prefix}dlq")
    intents = await kafka.create_topic(f"{topic_prefix}intents")
    await kafka.produce(src, ((f"r{i}".encode(), f"r{i}".encode()) for i in range(120)))
    loop = TransactionalLoop(
        _settings(kafka.bootstrap, f"{topic_prefix}g", src, dlq, "one", commit_interval_ms=600_000),
        _PublishesAnIntent(dst, intents),
    )
    await loop.start()
    task = asyncio.create_task(loop.run())
    try:
        await _wait(lambda: sum(map(len, loop._pending.values())) >= 120, 60, "all 120 gathered")  # noqa: SLF001
    finally:
        loop.request_stop()
        await task
        await loop.stop()
    assert 2 <= loop.stats["committed"] <= 3, loop.stats
    assert sorted(r.value for r in await kafka.read_all(intents, expect=6, timeout=30)) == [
        f"intent-{p}".encode() for p in range(6)
    ]
    got = await kafka.read_all(dst, expect=120, timeout=30)
    assert len({r.value for r in got}) == len(got) == 120


class _StallsOnce(TransformStage):
    """Copies; its first batch waits (holding the member's poll) until ``resume`` is set, then
    tries to make an intent durable the way a sink does (``lane.publish``) and returns the copy."""

    def __init__(self, dst: str, intents: str) -> None:
        super().__init__("zombie", copy_transform(dst, None))
        self.intents = intents
        self.stalling = asyncio.Event()
        self.resume = asyncio.Event()
        self.publish_refused: BaseException | None = None
        self.stalled = False

    async def handle(self, lane, records):
        if not self.stalled:
            self.stalled = True
            self.stalling.set()
            await asyncio.wait_for(self.resume.wait(), 60)
            try:
                await lane.publish([OutRecord(self.intents, b"zombie-intent", b"k")])
            except MembershipFenced as exc:
                self.publish_refused = exc
        return await super().handle(lane, records)


async def test_a_member_the_group_moved_on_from_commits_nothing(kafka: KafkaIO, topic_prefix: str):
    """Member A stalls in its first batch past ``max_poll_interval_ms``; the group gives B every
    partition and B copies everything. When A wakes up, both its intent and its batch are refused
    by the group (its generation is over), and nothing it wrote becomes visible."""
    src = await kafka.create_topic(f"{topic_prefix}src", partitions=2)
    dst = await kafka.create_topic(f"{topic_prefix}dst", partitions=2)
    dlq = await kafka.create_topic(f"{topic_prefix}dlq")
    intents = await kafka.create_topic(f"{topic_prefix}intents")
    values = [f"z{i:03d}".encode() for i in range(100)]
    await kafka.produce(src, ((v, v) for v in values))
    group = f"{topic_prefix}g"
    timing = {"max_poll_interval_ms": 4000, "session_timeout_ms": 6000, "heartbeat_interval_ms": 300}
    zombie_stage = _StallsOnce(dst, intents)
    a = TransactionalLoop(_settings(kafka.bootstrap, group, src, dlq, "a", **timing), zombie_stage)
    b = TransactionalLoop(
        _settings(kafka.bootstrap, group, src, dlq, "b", **timing), TransformStage("copy", copy_transform(dst, None))
    )
    await a.start()
    a_task = asyncio.create_task(a.run())
    b_task = None
    try:
        await asyncio.wait_for(zombie_stage.stalling.wait(), 60)
        await b.start()
        b_task = asyncio.create_task(b.run())
        await _wait(lambda: b.stats["out"] >= len(values), 90, "B copied everything")
        zombie_stage.resume.set()
        await _wait(lambda: a.stats["aborted"] >= 1, 30, "A's batch ended")
    finally:
        zombie_stage.resume.set()
        for loop, task in ((a, a_task), (b, b_task)):
            loop.request_stop()
            if task is not None:
                await task
            await loop.stop()
    refused = zombie_stage.publish_refused
    assert isinstance(refused, MembershipFenced), refused
    assert refused.reason in ("ILLEGAL_GENERATION", "UNKNOWN_MEMBER_ID"), refused  # the broker said no
    assert a.stats["committed"] == 0 and a.stats["aborted"] >= 1, a.stats
    got = await kafka.read_all(dst, expect=len(values), timeout=30)
    counts = Counter(r.value for r in got)
    assert set(counts) == set(values) and max(counts.values()) == 1, "each record visible once"
    # A really wrote its copies, and they were aborted
    uncommitted = await kafka.read_all(dst, isolation="read_uncommitted", expect=len(values) + 1, timeout=30)
    assert len(uncommitted) > len(values)
    assert await kafka.read_all(intents, timeout=3, idle=1.0) == [], "the zombie's intent is not visible"
