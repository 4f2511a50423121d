"""`pipeline lag` counts records, not offsets: correct for never-committed groups and transactional topics."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.kafka.lag import group_lag
from pipeline.kafka.loop import LoopSettings, TransactionalLoop, TransformStage
from pipeline.ops.copy import copy_transform
from tests.conftest import KafkaIO

pytestmark = pytest.mark.kafka


async def _copy_all(kafka: KafkaIO, group: str, src: str, dst: str, dlq: str, n: int) -> None:
    loop = TransactionalLoop(
        LoopSettings(
            bootstrap=kafka.bootstrap,
            group_id=group,
            input_topics=(src,),
            deadletter_topic=dlq,
            poll_timeout_ms=100,
            max_batch=2,
        ),
        TransformStage("copy", copy_transform(dst, None)),
    )
    await loop.start()
    task = asyncio.create_task(loop.run())
    while loop.stats["out"] < n:
        await asyncio.sleep(0.1)
    loop.request_stop()
    await task
    await loop.stop()


async def test_lag_counts_records_for_new_groups_and_ignores_transaction_markers(kafka: KafkaIO, topic_prefix: str):
    src = await kafka.create_topic(f"{topic_prefix}src", 3)
    mid = await kafka.create_topic(f"{topic_prefix}mid", 3)
    out = await kafka.create_topic(f"{topic_prefix}out", 3)
    dlq = await kafka.create_topic(f"{topic_prefix}dlq")
    await kafka.produce(src, [(f"k{i}".encode(), b"v") for i in range(7)])
    assert sum((await group_lag(kafka.bootstrap, f"{topic_prefix}a", [src])).values()) == 7, "never committed"
    await _copy_all(kafka, f"{topic_prefix}a", src, mid, dlq, 7)
    assert sum((await group_lag(kafka.bootstrap, f"{topic_prefix}a", [src])).values()) == 0
    # mid was written by transactions (a marker after each): its end offset is past the data
    ends = await kafka.end_offsets(mid)
    assert sum(ends.values()) > 7
    assert sum((await group_lag(kafka.bootstrap, f"{topic_prefix}b", [mid])).values()) == 7
    await _copy_all(kafka, f"{topic_prefix}b", mid, out, dlq, 7)
    assert sum((await group_lag(kafka.bootstrap, f"{topic_prefix}b", [mid])).values()) == 0
