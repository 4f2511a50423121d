"""Re-publishing a time window of a raw topic (``pipeline replay raw``, ``pipeline backfill sms``).

The records stored in [start, end) (by their Kafka timestamp) go back into the same topic with
their key and headers, marked ``via: replay`` — and, for one integration, ``meta.for_integration``
so that only it evaluates them. Processors evaluate them against the current integrations file
and the sinks' ledgers make them a no-op for everything already written.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

import orjson
from aiokafka import TopicPartition

from pipeline.core.config import load_config
from pipeline.core.progress import Progress
from pipeline.core.settings import KafkaSettings, ServiceSettings, SettingsError
from pipeline.kafka.clients import committed_reader, durable_producer
from pipeline.kafka.reading import read_to_end

FETCH_WAIT_MS = 50


def known_integration(name: str, config_path: str | None) -> None:
    """``--integration``: one line naming the integrations there are, when ``name`` is none of them."""
    config = load_config(config_path or ServiceSettings.from_env().config_path)
    if config.get(name) is None:
        names = ", ".join(i.name for i in config.integrations)
        raise SettingsError(f"--integration: {name!r} is not in {config.source}; there are: {names}")


async def republish_window(
    kafka: KafkaSettings,
    topic: str,
    start: datetime,
    end: datetime,
    *,
    for_integration: str | None = None,
    dry_run: bool = False,
) -> int:
    """The number of records of ``topic`` stored in [start, end), sent again unless ``dry_run``;
    progress with rate and ETA on stderr."""
    consumer = committed_reader(kafka.bootstrap, fetch_max_wait_ms=FETCH_WAIT_MS)
    producer = durable_producer(kafka.bootstrap, f"{kafka.client_id}-replay")
    await consumer.start()
    await producer.start()
    n = 0
    try:
        await consumer._client.force_metadata_update()  # noqa: SLF001
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not tps:
            raise SettingsError(f"--topic: {topic} does not exist")
        consumer.assign(tps)
        starts = await consumer.offsets_for_times({tp: int(start.timestamp() * 1000) for tp in tps})
        stops = await consumer.offsets_for_times({tp: int(end.timestamp() * 1000) for tp in tps})
        ends = await consumer.end_offsets(tps)
        limits = {tp: (stops[tp].offset if stops[tp] else ends[tp]) for tp in tps}
        for tp in tps:
            if starts[tp] is None:
                consumer.seek(tp, ends[tp])
            else:
                consumer.seek(tp, starts[tp].offset)
        futures = []
        first = {tp: (starts[tp].offset if starts[tp] else ends[tp]) for tp in tps}
        reached = dict(first)
        span = sum(max(0, limits[tp] - first[tp]) for tp in tps)
        progress = Progress(f"replay {topic}", unit="offsets", items_unit="events")
        async for r in read_to_end(consumer, tps, limits):
            env = orjson.loads(r.value)
            env["via"] = "replay"
            if for_integration:
                env["meta"] = {**(env.get("meta") or {}), "for_integration": for_integration}
            n += 1
            if not dry_run:
                futures.append(
                    await producer.send(topic, key=r.key, value=orjson.dumps(env), headers=list(r.headers or ()))
                )
                if len(futures) >= 10_000:
                    await asyncio.gather(*futures)
                    futures.clear()
            reached[TopicPartition(r.topic, r.partition)] = r.offset + 1
            progress.update(sum(reached[tp] - first[tp] for tp in tps), total=span, items=n)
        await asyncio.gather(*futures)
        if n:
            progress.update(span, total=span, items=n)
            progress.close()
    finally:
        await producer.stop()
        await consumer.stop()
    return n
