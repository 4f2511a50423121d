"""Test harness: one real Apache Kafka broker per test session, own topics per test.

* ``kafka_bootstrap``: uses ``KAFKA_BOOTSTRAP`` when set, otherwise starts a local broker
  (pipeline.localkafka) on free ports in a temporary directory and stops it at the end.
* ``topics``: a :class:`~pipeline.topics.Topics` with a prefix unique to the test; every
  catalogue topic exists on the broker.
* ``kafka``: small async helpers to produce records and read topics back ``read_committed``
  (clients from :mod:`pipeline.kafka.clients`, so ``KAFKA_SECURITY_PROTOCOL`` & co. apply).
No Kafka mocks anywhere: every test that needs Kafka talks to the real broker.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import NewTopic

from devkit.localkafka import LocalKafka
from pipeline.core.settings import KafkaSecurity
from pipeline.kafka.clients import new_admin, new_consumer, new_producer
from pipeline.kafka.topics import Topics, ensure_topics

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory):
    given = os.environ.get("KAFKA_BOOTSTRAP")
    if given:
        yield given
        return
    broker = LocalKafka.ephemeral(tmp_path_factory.mktemp("kafka"))
    try:
        broker.up(quiet=True)
    except Exception as exc:  # the broker log says why
        pytest.exit(f"could not start the local Kafka broker: {exc}", returncode=3)
    print(f"\nlocal Kafka broker at {broker.bootstrap} (log {broker.log_file})", file=sys.stderr)
    yield broker.bootstrap
    broker.down(quiet=True)


@pytest.fixture
def topic_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}-"


@pytest.fixture
async def topics(kafka_bootstrap: str, topic_prefix: str) -> Topics:
    t = Topics(topic_prefix)
    await ensure_topics(kafka_bootstrap, t.specs())
    return t


class KafkaIO:
    """Produce and read back; reads are ``read_committed`` unless asked otherwise."""

    def __init__(self, bootstrap: str, security: KafkaSecurity | None = None) -> None:
        self.bootstrap, self.security = bootstrap, security  # security None: from the environment

    async def create_topic(self, name: str, partitions: int = 1, config: dict[str, str] | None = None) -> str:
        admin = new_admin(bootstrap_servers=self.bootstrap, security=self.security)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(name, partitions, 1, topic_configs=config or {})])
        finally:
            await admin.close()
        return name

    async def produce(
        self,
        topic: str,
        records: Iterable[tuple[bytes | None, bytes | None]],
        headers: list[tuple[str, bytes]] | None = None,
    ) -> int:
        producer = new_producer(
            bootstrap_servers=self.bootstrap,
            security=self.security,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            max_batch_size=256 * 1024,
        )
        await producer.start()
        n = 0
        try:
            futures = []
            for key, value in records:
                futures.append(await producer.send(topic, value=value, key=key, headers=headers))
                n += 1
            await asyncio.gather(*futures)
        finally:
            await producer.stop()
        return n

    async def end_offsets(self, topic: str) -> dict[int, int]:
        consumer = new_consumer(
            bootstrap_servers=self.bootstrap, security=self.security, isolation_level="read_committed"
        )
        await consumer.start()
        try:
            parts = consumer.partitions_for_topic(topic) or set()
            if not parts:
                await consumer._client.force_metadata_update()  # noqa: SLF001
                parts = consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in parts]
            ends = await consumer.end_offsets(tps)
            return {tp.partition: off for tp, off in ends.items()}
        finally:
            await consumer.stop()

    async def read_all(
        self,
        topic: str,
        *,
        expect: int | None = None,
        timeout: float = 30.0,
        isolation: str = "read_committed",
        idle: float = 1.0,
    ) -> list:
        """Every record from the beginning. With ``expect``, waits until that many arrived (or
        the timeout); without, reads until the topic is idle for ``idle`` seconds."""
        consumer = new_consumer(
            topic,
            bootstrap_servers=self.bootstrap,
            security=self.security,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            isolation_level=isolation,
        )
        await consumer.start()
        out: list = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last_data = loop.time()
        try:
            while loop.time() < deadline:
                batch = await consumer.getmany(timeout_ms=200, max_records=5000)
                for records in batch.values():
                    out.extend(records)
                if batch:
                    last_data = loop.time()
                if expect is not None and len(out) >= expect:
                    # keep reading briefly: more than expected would be a duplicate
                    extra = await consumer.getmany(timeout_ms=500)
                    for records in extra.values():
                        out.extend(records)
                    break
                if expect is None and loop.time() - last_data > idle:
                    break
        finally:
            await consumer.stop()
        return out


@pytest.fixture
def kafka(kafka_bootstrap: str) -> KafkaIO:
    return KafkaIO(kafka_bootstrap)


def pipeline_env(kafka_bootstrap: str, topic_prefix: str, **extra: str) -> dict[str, str]:
    """Environment for a service started as a separate process."""
    env = dict(os.environ)
    env.update(
        {"KAFKA_BOOTSTRAP": kafka_bootstrap, "TOPIC_PREFIX": topic_prefix, "LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"}
    )
    env.update(extra)
    return env
