"""Consumer-group lag in records, for topics written by transactions.

Each transaction commit writes a control marker, so ``end offset - committed offset`` of a topic
written transactionally never reaches 0 even when everything is processed. This counts what a
person means by lag: data records after the group's committed offset, found by reading the tail
of each partition ``read_committed``.

``pipeline lag [GROUP ...]`` prints it per group and partition.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from pipeline.settings import KafkaSettings


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


async def _data_records(consumer: AIOKafkaConsumer, tp: TopicPartition, start: int, end: int,
                        deadline_s: float = 10.0) -> int:
    """Data records in [start, end) read ``read_committed``: control markers and aborted records
    do not count. A very long range is estimated by its offsets."""
    if end <= start:
        return 0
    if end - start > 200_000:
        return end - start
    consumer.seek(tp, start)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline_s
    n = 0
    while await consumer.position(tp) < end and loop.time() < give_up:
        batch = await consumer.getmany(tp, timeout_ms=500, max_records=10_000)
        n += sum(1 for r in batch.get(tp, []) if r.offset < end)
    return n


async def group_lag(bootstrap: str, group: str, topics: Iterable[str] | None = None) -> dict[TopicPartition, int]:
    """Data records after ``group``'s committed offsets, per partition it has offsets for."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
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
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                isolation_level="read_committed")
    await consumer.start()
    lag: dict[TopicPartition, int] = {}
    try:
        if wanted:
            # partitions the group has never committed count in full
            for topic in wanted:
                for p in consumer.partitions_for_topic(topic) or await _partitions(consumer, topic):
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


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer._client.force_metadata_update()  # noqa: SLF001
    return consumer.partitions_for_topic(topic) or set()


async def read_topic(bootstrap: str, topic: str, idle_s: float = 1.0) -> list:
    """Every committed record of ``topic`` from the beginning (for summaries and inspection)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                isolation_level="read_committed", auto_offset_reset="earliest")
    await consumer.start()
    out: list = []
    try:
        parts = consumer.partitions_for_topic(topic) or await _partitions(consumer, topic)
        tps = [TopicPartition(topic, p) for p in parts]
        ends = await consumer.end_offsets(tps)
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            batch = await consumer.getmany(timeout_ms=300, max_records=10_000)
            for records in batch.values():
                out.extend(records)
            if batch:
                last = loop.time()
            positions = [await consumer.position(tp) for tp in tps] if consumer.assignment() else []
            if positions and all(pos >= ends[tp] for pos, tp in zip(positions, tps, strict=True)):
                break
            if loop.time() - last > idle_s * 5:
                break
    finally:
        await stop_consumer(consumer)
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lag", help="consumer-group lag in records (correct for transactional topics)")
    p.add_argument("groups", nargs="+", help="consumer group ids")
    p.add_argument("--bootstrap", help="broker (env KAFKA_BOOTSTRAP)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    bootstrap = args.bootstrap or KafkaSettings.from_env().bootstrap

    async def main() -> None:
        for group in args.groups:
            lag = await group_lag(bootstrap, group)
            total = sum(lag.values())
            print(f"{group}: {total} record(s) behind")
            for tp in sorted(lag, key=lambda t: (t.topic, t.partition)):
                print(f"  {tp.topic}:{tp.partition}  {lag[tp]}")

    asyncio.run(main())
    return 0
