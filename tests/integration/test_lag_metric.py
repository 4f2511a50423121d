"""``pipeline_consumer_lag`` counts records, not transaction markers, and has series only for the
partitions a member owns."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import TopicPartition

from pipeline.core.observability import metrics
from pipeline.kafka.clients import transactional_producer
from pipeline.kafka.loop import LoopSettings, TransactionalLoop, TransformStage
from pipeline.ops.copy import copy_transform
from tests.conftest import KafkaIO

pytestmark = pytest.mark.kafka


def lag_series(group: str) -> dict[tuple[str, str], float]:
    out = {}
    for family in metrics().registry.collect():
        if family.name == "pipeline_consumer_lag":
            for s in family.samples:
                if s.labels["group"] == group:
                    out[(s.labels["topic"], s.labels["partition"])] = s.value
    return out


async def until(check, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def test_a_caught_up_member_shows_zero_lag_and_no_series_for_partitions_it_gave_up(
    kafka: KafkaIO, topic_prefix: str
):
    src = await kafka.create_topic(f"{topic_prefix}src", 3)
    dst = await kafka.create_topic(f"{topic_prefix}dst", 3)
    dlq = await kafka.create_topic(f"{topic_prefix}dlq")
    # the input is written by transactions, as every topic between stages is: a marker after each
    producer = transactional_producer(
        kafka.bootstrap, f"{topic_prefix}writer", client_id="w", transaction_timeout_ms=30_000
    )
    await producer.start()
    try:
        for t in range(4):
            await producer.begin_transaction()
            for p in range(3):
                await producer.send(src, b"v", f"k{t}{p}".encode(), partition=p)
            await producer.commit_transaction()
    finally:
        await producer.stop()
    ends = await kafka.end_offsets(src)
    assert sum(ends.values()) == 12 + 12, "4 records and 4 commit markers per partition"

    group = f"{topic_prefix}g"
    loop = TransactionalLoop(
        LoopSettings(
            bootstrap=kafka.bootstrap, group_id=group, input_topics=(src,), deadletter_topic=dlq, poll_timeout_ms=100
        ),
        TransformStage("copy", copy_transform(dst, None)),
    )
    await loop.start()
    task = asyncio.create_task(loop.run())
    try:
        await until(lambda: loop.stats["out"] >= 12)
        # caught up: 0 per partition (high watermark − committed offset would say 1: the last marker)
        await until(lambda: len(lag_series(group)) == 3 and set(lag_series(group).values()) == {0.0})
        assert loop.total_lag() == 0
        # a revoked partition's series goes with it
        gone = TopicPartition(src, 1)
        await loop._on_revoked({gone})  # noqa: SLF001 - what the rebalance listener calls
        assert set(lag_series(group)) == {(src, "0"), (src, "2")}
    finally:
        loop.request_stop()
        await task
        await loop.stop()
    assert lag_series(group) == {}, "a stopped member exports no lag"
