"""Cursors in Kafka: the latest value per name (a poller, a replay) in the compacted cursor topic,
so pollers keep no local state and any replica or restart continues where the last one stopped."""

from __future__ import annotations

from typing import Any

import orjson
from aiokafka import AIOKafkaProducer, TopicPartition

from pipeline.kafka.clients import committed_reader, started
from pipeline.kafka.reading import read_to_end, stop_consumer


class CursorStore:
    """Latest value per poller name in the compacted cursor topic (one partition)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap, self.topic = bootstrap, topic

    async def read(self, name: str) -> dict[str, Any] | None:
        consumer = committed_reader(self.bootstrap, auto_offset_reset="earliest")
        await started(consumer)  # one that cannot reach the broker is closed again, not leaked
        latest = None
        try:
            tp = TopicPartition(self.topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            async for r in read_to_end(consumer, [tp]):
                if r.key == name.encode():
                    latest = orjson.loads(r.value) if r.value else None
        finally:
            await stop_consumer(consumer)
        return latest

    async def write(self, producer: AIOKafkaProducer, name: str, value: dict[str, Any]) -> None:
        await (await producer.send(self.topic, key=name.encode(), value=orjson.dumps(value), partition=0))
