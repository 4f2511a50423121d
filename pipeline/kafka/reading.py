"""Reading a bounded range of partitions: from where the consumer stands to a given end offset.

Used by every reader that needs "everything up to now" — the ledger on assignment, the poller
cursors, lag counting, replay and inspection. Records are read ``read_committed`` by the
consumers that call this, so control markers and aborted records never show; an end offset is
reached when the consumer's *position* passes it (a position can jump over markers).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from pipeline.kafka.clients import committed_reader


async def read_to_end(
    consumer: AIOKafkaConsumer,
    tps: Sequence[TopicPartition],
    ends: Mapping[TopicPartition, int] | None = None,
    *,
    max_records: int = 10_000,
    deadline_s: float | None = None,
) -> AsyncIterator[ConsumerRecord]:
    """Yield the records of ``tps`` below ``ends`` (default: the end offsets now), from each
    partition's current position, until every position reached its end or ``deadline_s`` passed."""
    if ends is None:
        ends = await consumer.end_offsets(list(tps))
    loop = asyncio.get_running_loop()
    give_up = None if deadline_s is None else loop.time() + deadline_s
    pending = [tp for tp in tps if await consumer.position(tp) < ends[tp]]
    while pending and (give_up is None or loop.time() < give_up):
        batch = await consumer.getmany(*pending, timeout_ms=500, max_records=max_records)
        for tp, records in batch.items():
            end = ends[tp]
            for r in records:
                if r.offset < end:
                    yield r
        pending = [tp for tp in pending if await consumer.position(tp) < ends[tp]]


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """Stop a short-lived consumer. aiokafka awaits its own cancelled offset task on stop and
    lets that CancelledError out when the consumer stops right after starting; only a
    cancellation of the calling task itself is passed on."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    """The topic's partitions, asking the broker when the consumer's metadata does not know it."""
    known = consumer.partitions_for_topic(topic)
    if known:
        return set(known)
    await consumer._client.force_metadata_update()  # noqa: SLF001
    return set(consumer.partitions_for_topic(topic) or ())


async def read_topic(bootstrap: str, topic: str) -> list[ConsumerRecord]:
    """Every committed record of ``topic`` from the beginning up to its end now."""
    consumer = committed_reader(bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(await partitions_of(consumer, topic))]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        return [r async for r in read_to_end(consumer, tps)]
    finally:
        await stop_consumer(consumer)
