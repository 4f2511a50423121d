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

from pipeline.settings import KafkaSettings


async def _last_data_offset(consumer: AIOKafkaConsumer, tp: TopicPartition, end: int, committed: int) -> int:
    """Offset after the last committed data record in [committed, end); ``committed`` if none."""
    if end <= committed:
        return committed
    back = 16
    while True:
        start = max(committed, end - back)
        consumer.seek(tp, start)
        last = None
        while True:
            batch = await consumer.getmany(tp, timeout_ms=300, max_records=5000)
            records = batch.get(tp, [])
            if records:
                last = records[-1].offset
            if await consumer.position(tp) >= end or not records:
                break
        if last is not None:
            return last + 1
        if start == committed:
            return committed
        back *= 8


async def group_lag(bootstrap: str, group: str, topics: Iterable[str] | None = None) -> dict[TopicPartition, int]:
    """Data records after ``group``'s committed offsets, per partition it has offsets for."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    wanted = set(topics) if topics is not None else None
    tps = {tp: meta.offset for tp, meta in committed.items() if wanted is None or tp.topic in wanted}
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
            start = max(offset, 0)
            if ends[tp] <= start:
                lag[tp] = 0
                continue
            last = await _last_data_offset(consumer, tp, ends[tp], start)
            if last <= start:
                lag[tp] = 0
                continue
            # count data records in [start, last)
            consumer.seek(tp, start)
            n = 0
            while await consumer.position(tp) < last:
                batch = await consumer.getmany(tp, timeout_ms=300, max_records=10_000)
                records = batch.get(tp, [])
                if not records:
                    break
                n += sum(1 for r in records if r.offset < last)
            lag[tp] = n
    finally:
        await consumer.stop()
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
        await consumer.stop()
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
