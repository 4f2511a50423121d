"""Throughput of the transactional loop vs a raw aiokafka transactional copy, same run.

    python bench/loop_throughput.py [--records 200000] [--size 300] [--rounds 3]

Uses ``KAFKA_BOOTSTRAP`` when set, otherwise starts a local broker for the run. Each round
copies the same pre-produced input topic twice, alternating which goes first:

* baseline: the smallest correct exactly-once copy with aiokafka alone — one read_committed
  consumer, one transactional producer, getmany → send → send_offsets_to_transaction → commit;
* loop: ``pipeline.kafka.TransactionalLoop`` with the copy transform (dead-letter handling, metrics,
  rebalance safety), once per ``--producers`` scope: a transactional producer per input partition
  and one per process (the default; offsets fenced by the group generation).

Prints records/s per round, the median ratio loop/baseline and a summary table. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiokafka.admin import NewTopic  # noqa: E402

from bench.common import Row, kafka, print_summary  # noqa: E402
from pipeline.kafka.clients import new_admin, new_consumer, new_producer  # noqa: E402
from pipeline.kafka.loop import LoopSettings, TransactionalLoop, TransformStage  # noqa: E402
from pipeline.ops.copy import copy_transform  # noqa: E402


async def create(bootstrap: str, name: str, partitions: int) -> str:
    admin = new_admin(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()
    return name


async def produce_input(bootstrap: str, topic: str, n: int, size: int) -> None:
    producer = new_producer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=512 * 1024)
    await producer.start()
    pad = b"x" * max(0, size - 12)
    try:
        futures = [
            await producer.send(topic, key=f"k{i % 5000}".encode(), value=f"{i:010d}".encode() + pad) for i in range(n)
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def count(bootstrap: str, topic: str, expect: int) -> int:
    """Records readable read_committed (end offsets would also count transaction markers)."""
    c = new_consumer(
        topic,
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await c.start()
    n, idle = 0, 0
    try:
        while n < expect and idle < 10:
            got = await c.getmany(timeout_ms=500, max_records=10_000)
            idle = 0 if got else idle + 1
            n += sum(len(v) for v in got.values())
        extra = await c.getmany(timeout_ms=300)
        return n + sum(len(v) for v in extra.values())
    finally:
        await c.stop()


async def baseline_copy(bootstrap: str, src: str, dst: str, n: int, batch: int) -> float:
    group = f"base-{uuid.uuid4().hex[:8]}"
    consumer = new_consumer(
        src,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        max_poll_records=batch,
        fetch_max_bytes=16 * 1024 * 1024,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    producer = new_producer(
        bootstrap_servers=bootstrap,
        transactional_id=group,
        enable_idempotence=True,
        max_batch_size=512 * 1024,
        max_request_size=1024 * 1024,
    )
    await consumer.start()
    await producer.start()
    done = 0
    started = None
    try:
        while done < n:
            batches = await consumer.getmany(timeout_ms=200, max_records=batch)
            if not batches:
                continue
            if started is None:
                started = time.perf_counter()
            async with producer.transaction():
                futures = []
                offsets = {}
                for tp, records in batches.items():
                    for r in records:
                        futures.append(await producer.send(dst, value=r.value, key=r.key))
                    offsets[tp] = records[-1].offset + 1
                    done += len(records)
                await asyncio.gather(*futures)
                await producer.send_offsets_to_transaction(offsets, group)
        return done / (time.perf_counter() - started)
    finally:
        await consumer.stop()
        await producer.stop()


async def loop_copy(bootstrap: str, src: str, dst: str, dlq: str, n: int, batch: int, producers: str) -> float:
    loop = TransactionalLoop(
        LoopSettings(
            bootstrap=bootstrap,
            group_id=f"loop-{uuid.uuid4().hex[:8]}",
            input_topics=(src,),
            deadletter_topic=dlq,
            max_batch=batch,
            poll_timeout_ms=200,
            producers=producers,
        ),
        TransformStage("copy", copy_transform(dst, None)),
    )
    await loop.start()
    task = asyncio.create_task(loop.run())
    started = None
    try:
        while loop.stats["out"] < n:
            if started is None and loop.stats["in"] > 0:
                started = time.perf_counter()
            if task.done():
                task.result()
            await asyncio.sleep(0.005)
        return n / (time.perf_counter() - (started or time.perf_counter()))
    finally:
        loop.request_stop()
        await task
        await loop.stop()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--size", type=int, default=300, help="value bytes")
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--producers", default="partition,process", help="loop variants: partition, process")
    args = ap.parse_args()
    scopes = [p.strip() for p in args.producers.split(",") if p.strip()]

    async with kafka() as (bootstrap, _):
        run = uuid.uuid4().hex[:6]
        src = await create(bootstrap, f"bench-{run}-in", args.partitions)
        dlq = await create(bootstrap, f"bench-{run}-dlq", 1)
        await produce_input(bootstrap, src, args.records, args.size)
        print(f"input: {args.records} records x {args.size} B, {args.partitions} partitions; batch {args.batch}")
        rates: dict[str, list[float]] = {w: [] for w in ["baseline", *scopes]}
        for i in range(args.rounds):
            order = list(rates)
            order = order[i % len(order) :] + order[: i % len(order)]  # who goes first rotates
            for which in order:
                dst = await create(bootstrap, f"bench-{run}-{which}-{i}", args.partitions)
                if which == "baseline":
                    rate = await baseline_copy(bootstrap, src, dst, args.records, args.batch)
                else:
                    rate = await loop_copy(bootstrap, src, dst, dlq, args.records, args.batch, which)
                rates[which].append(rate)
                copied = await count(bootstrap, dst, args.records)
                assert copied == args.records, f"{which} copied {copied} of {args.records}"
                print(f"round {i + 1} {which:9} {rate:10,.0f} records/s")
        base = rates["baseline"]
        rows = []
        for scope in scopes:
            ratios = [o / b for o, b in zip(rates[scope], base, strict=True)]
            print(
                f"loop ({scope} producers) median {statistics.median(rates[scope]):,.0f} records/s, "
                f"baseline {statistics.median(base):,.0f}; ratio median {statistics.median(ratios):.2f} "
                f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})"
            )
            rows.append(
                Row(
                    f"transactional loop (copy), a producer per {scope}, vs raw aiokafka transactional copy",
                    f"{statistics.median(rates[scope]):,.0f} records/s",
                    f"{statistics.median(base):,.0f} records/s",
                    f"{statistics.median(ratios):.2f}",
                    "—",
                    None,
                )
            )
    print_summary("transactional loop throughput", rows)


if __name__ == "__main__":
    asyncio.run(main())
