"""Kafka clients built in one place, and waiting for a broker that is not there yet.

:func:`start_when_reachable` is how every service starts its Kafka clients: while the broker
cannot be reached it retries with capped exponential backoff (``KAFKA_CONNECT_BACKOFF_MAX_S``),
logs one line when the broker is unreachable and one when it is back — not one per attempt — and
gives up at once when the service is asked to stop. aiokafka's own lines about a broker it cannot
reach (each client retries every ~100 ms and logs every failure) are let through once per kind a
minute.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError, NodeNotReadyError

from pipeline.core.observability import get_logger
from pipeline.core.settings import env_float

log = get_logger(__name__)

T = TypeVar("T")

CONNECT_BACKOFF_MAX_S = 10.0
CONNECT_BACKOFF_FIRST_S = 0.5

# What "the broker cannot be reached (yet)" looks like when a client starts; anything else
# (a bad setting, an authorisation error) is a real error and is raised at once.
UNREACHABLE: tuple[type[BaseException], ...] = (
    KafkaConnectionError,
    KafkaTimeoutError,
    NodeNotReadyError,
    OSError,
    TimeoutError,
)


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


def connect_backoff_from_env(env: Mapping[str, str] | None = None) -> float:
    """``KAFKA_CONNECT_BACKOFF_MAX_S``: the longest wait between two attempts to reach the broker."""
    return env_float(os.environ if env is None else env, "KAFKA_CONNECT_BACKOFF_MAX_S", CONNECT_BACKOFF_MAX_S, 0.1)


async def stop_quietly(client: Any) -> None:
    """Stop a client that may never have started; errors (and aiokafka's own cancelled tasks) are
    swallowed, a cancellation of the calling task is passed on."""
    try:
        await client.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
    except Exception:  # noqa: BLE001 - a client that failed to start may fail to stop
        pass


async def started(client: T) -> T:
    """``await client.start()``; a client that failed to start is stopped again (no leaked tasks)."""
    try:
        await client.start()  # type: ignore[attr-defined]
    except BaseException:
        await stop_quietly(client)
        raise
    return client


def _describe(exc: BaseException) -> str:
    text, name = str(exc), type(exc).__name__
    return text if text.startswith(name) else f"{name}: {text}"


# aiokafka's lines about a broker it cannot reach, by how they begin (the format string)
_BROKER_TROUBLE = (
    "Unable connect to",
    "Unable to update metadata",
    "Unable to request metadata",
    "Failed fetch messages from",
    "Failed fetch offsets from",
    "Group Coordinator Request failed",
    "Got error produce response",
    "Heartbeat failed",
    "Heartbeat send request failed",
    "Error sending HeartbeatRequest",
    "Marking the coordinator dead",
)
_AIOKAFKA_LOGGERS = (
    "aiokafka",  # aiokafka.client logs under this name
    "aiokafka.conn",
    "aiokafka.consumer.fetcher",
    "aiokafka.consumer.group_coordinator",
    "aiokafka.producer.sender",
)


class _BrokerChatter(logging.Filter):
    """aiokafka retries a broker it lost about every 100 ms in every client (a processor with six
    lanes has seven) and logs each failure: thousands of lines a minute while the broker is away.
    The first line of each kind passes, then one a minute. While a service waits for the broker
    (:func:`start_when_reachable`) none passes: the wait says it in one line."""

    every_s = 60.0

    def __init__(self) -> None:
        super().__init__()
        self.waiting = 0
        self._last: dict[tuple[str, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        kind = next((k for k in _BROKER_TROUBLE if msg.startswith(k)), None)
        if kind is None:
            return True
        if self.waiting:
            return False
        now, key = time.monotonic(), (record.name, kind)
        last = self._last.get(key)
        if last is not None and now - last < self.every_s:
            return False
        self._last[key] = now
        return True


_CHATTER = _BrokerChatter()
for _name in _AIOKAFKA_LOGGERS:
    logging.getLogger(_name).addFilter(_CHATTER)


async def start_when_reachable(
    attempt: Callable[[], Awaitable[T]],
    *,
    bootstrap: str,
    what: str,
    stopping: asyncio.Event | None = None,
    backoff_max_s: float = CONNECT_BACKOFF_MAX_S,
) -> T | None:
    """Run ``attempt`` (build and start a client, e.g. ``lambda: started(consumer_factory())``)
    until the broker answers; None when ``stopping`` is set first.

    Between attempts: 0.5 s doubling up to ``backoff_max_s``, with jitter. One ``broker_unreachable``
    line when the first attempt fails, one ``broker_reachable`` line when an attempt succeeds after
    that; nothing per attempt. An error that is not about reaching the broker is raised.
    """
    stop = stopping or asyncio.Event()
    delay = min(CONNECT_BACKOFF_FIRST_S, backoff_max_s)
    attempts = 0
    since: float | None = None
    _CHATTER.waiting += 1
    try:
        while not stop.is_set():
            attempts += 1
            task = asyncio.ensure_future(attempt())
            stopper = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
            if not task.done():  # asked to stop in the middle of an attempt
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                break
            try:
                client = task.result()
            except UNREACHABLE as exc:
                if since is None:
                    since = time.monotonic()
                    log.warning(
                        "broker_unreachable",
                        bootstrap=bootstrap,
                        waiting=what,
                        error=_describe(exc),
                        backoff_max_s=backoff_max_s,
                    )
                try:
                    await asyncio.wait_for(stop.wait(), delay * random.uniform(0.8, 1.0))
                except TimeoutError:
                    pass
                delay = min(delay * 2, backoff_max_s)
                continue
            if since is not None:
                log.info(
                    "broker_reachable",
                    bootstrap=bootstrap,
                    waiting=what,
                    waited_s=round(time.monotonic() - since, 1),
                    attempts=attempts,
                )
            return client
        if since is not None:
            log.info("broker_wait_stopped", bootstrap=bootstrap, waiting=what, attempts=attempts)
        return None
    finally:
        _CHATTER.waiting -= 1
