"""Consumer-group lag in records, for topics written by transactions.

Each transaction commit writes a control marker, so ``end offset - committed offset`` of a topic
written transactionally never reaches 0 even when everything is processed. This counts what a
person means by lag: data records after the group's committed offset, found by reading the tail
of each partition ``read_committed``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from pipeline.kafka.clients import committed_reader, new_admin
from pipeline.kafka.reading import partitions_of, read_to_end, stop_consumer


async def _data_records(
    consumer: AIOKafkaConsumer, tp: TopicPartition, start: int, end: int, deadline_s: float = 10.0
) -> int:
    """Data records in [start, end) read ``read_committed``: control markers and aborted records
    do not count. A very long range is estimated by its offsets."""
    if end <= start:
        return 0
    if end - start > 200_000:
        return end - start
    consumer.seek(tp, start)
    n = 0
    async for _ in read_to_end(consumer, [tp], {tp: end}, deadline_s=deadline_s):
        n += 1
    return n


async def group_lag(bootstrap: str, group: str, topics: Iterable[str] | None = None) -> dict[TopicPartition, int]:
    """Data records after ``group``'s committed offsets, per partition it has offsets for."""
    admin = new_admin(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        for attempt in range(40):  # a fresh broker elects the group coordinator on first use
            try:
                committed = await admin.list_consumer_group_offsets(group)
                break
            except KafkaError as exc:
                if not exc.retriable or attempt == 39:
                    raise
                await asyncio.sleep(0.25)
    finally:
        await admin.close()
    wanted = set(topics) if topics is not None else None
    tps = {tp: meta.offset for tp, meta in committed.items() if wanted is None or tp.topic in wanted}
    if not tps and not wanted:
        return {}
    consumer = committed_reader(bootstrap)
    await consumer.start()
    lag: dict[TopicPartition, int] = {}
    try:
        if wanted:
            # partitions the group has never committed count in full
            for topic in wanted:
                for p in await partitions_of(consumer, topic):
                    tps.setdefault(TopicPartition(topic, p), 0)
        if not tps:
            return {}
        consumer.assign(list(tps))
        ends = await consumer.end_offsets(list(tps))
        for tp, offset in tps.items():
            lag[tp] = await _data_records(consumer, tp, max(offset, 0), ends[tp])
    finally:
        await stop_consumer(consumer)
    return lag
