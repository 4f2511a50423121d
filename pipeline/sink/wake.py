"""Wake-up records: a partition whose only work is parked commands is handled again when it is due.

The transactional loop calls a stage only with records. A sink that parked commands (their target
account was rate limited or out of service) has moved its offsets past them, so when no new
command arrives in that partition nothing would ever hand it to the stage again. :class:`Waker`
writes one small record — no command, header ``sink.wake`` — into the command partition when its
earliest parked command is due; the stage skips the record itself and performs what is due.

A wake-up record is an ordinary, non-transactional record (idempotent producer, ``acks=all``).
Whoever owns the partition when it arrives handles it; a stale one costs a fetch and an offset
commit. At most one wake-up per partition is pending: the earliest asked for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from aiokafka import AIOKafkaProducer, TopicPartition

from pipeline.core.observability import get_logger
from pipeline.kafka.clients import durable_producer

log = get_logger(__name__)

WAKE_HEADER = "sink.wake"
WAKE_KEY = b"sink.wake"
RETRY_S = 1.0  # after a failed send


class Waker:
    """Schedules wake-up records per command partition (``schedule``), sends them from one
    background task, and stops with :meth:`close`."""

    def __init__(self, bootstrap: str, client_id: str) -> None:
        self.bootstrap, self.client_id = bootstrap, client_id
        self.due: dict[TopicPartition, float] = {}  # partition -> Unix seconds
        self.sent = 0
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._producer: AIOKafkaProducer | None = None
        self._closing = False

    def schedule(self, tp: TopicPartition, at: float) -> None:
        """Wake ``tp`` at ``at`` (Unix seconds), unless an earlier wake-up is already pending."""
        if self._closing:
            return
        current = self.due.get(tp)
        if current is not None and current <= at:
            return
        self.due[tp] = at
        self._changed.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="sink-waker")

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        """Partitions this member no longer owns: their next owner schedules its own."""
        for tp in tps:
            self.due.pop(tp, None)

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._producer is not None:
            try:
                await self._producer.stop()
            except Exception as exc:  # noqa: BLE001 - shutting down anyway
                log.warning("waker_stop_failed", error=str(exc))
            self._producer = None

    async def _run(self) -> None:
        while not self._closing:
            now = time.time()
            ready = [tp for tp, at in self.due.items() if at <= now]
            if ready:
                for tp in ready:
                    self.due.pop(tp, None)
                await self._send(ready)
                continue
            self._changed.clear()
            timeout = min(self.due.values()) - now if self.due else None
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                pass

    async def _send(self, tps: list[TopicPartition]) -> None:
        try:
            if self._producer is None:
                producer = durable_producer(self.bootstrap, f"{self.client_id}-waker", linger_ms=0)
                try:
                    await producer.start()
                except BaseException:
                    await producer.stop()
                    raise
                self._producer = producer
            await asyncio.gather(
                *(
                    self._producer.send_and_wait(
                        tp.topic, b"", key=WAKE_KEY, partition=tp.partition, headers=[(WAKE_HEADER, b"1")]
                    )
                    for tp in tps
                )
            )
            self.sent += len(tps)
        except Exception as exc:  # noqa: BLE001 - the broker may be away: try again soon
            log.warning("wake_failed", partitions=[f"{tp.topic}:{tp.partition}" for tp in tps], error=str(exc))
            later = time.time() + RETRY_S
            for tp in tps:
                self.due[tp] = min(self.due.get(tp, later), later)
