"""Kafka clients built in one place."""

from __future__ import annotations

from aiokafka import AIOKafkaProducer


def durable_producer(bootstrap: str, client_id: str, linger_ms: int = 2) -> AIOKafkaProducer:
    """acks=all + idempotence: a send that resolves is stored on the broker."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        client_id=client_id,
        acks="all",
        enable_idempotence=True,
        linger_ms=linger_ms,
        request_timeout_ms=15_000,
        max_batch_size=256 * 1024,
    )
