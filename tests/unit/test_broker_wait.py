"""Waiting for a broker that cannot be reached yet (pure asyncio, no broker): capped backoff, one
line per state change, a stop ends the wait; aiokafka's retry chatter is thinned."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from aiokafka.errors import KafkaConnectionError
from structlog.testing import capture_logs

from pipeline.core.settings import SettingsError
from pipeline.kafka import clients
from pipeline.kafka.clients import connect_backoff_from_env, start_when_reachable


class Flaky:
    """Fails ``failures`` times as an unreachable broker does, then returns a client."""

    def __init__(self, failures: int, error: BaseException | None = None) -> None:
        self.failures, self.error = failures, error or KafkaConnectionError("Unable to bootstrap from [...]")
        self.calls: list[float] = []

    async def __call__(self) -> str:
        self.calls.append(time.monotonic())
        if len(self.calls) <= self.failures:
            raise self.error
        return "client"


async def test_retries_with_capped_backoff_and_logs_once_per_state_change():
    attempt = Flaky(failures=6)
    with capture_logs() as logs:
        client = await start_when_reachable(attempt, bootstrap="b:9092", what="test", backoff_max_s=0.05)
    assert client == "client" and len(attempt.calls) == 7
    gaps = [b - a for a, b in zip(attempt.calls, attempt.calls[1:], strict=False)]
    assert max(gaps) < 0.5, f"the backoff is capped: {gaps}"
    assert [e["event"] for e in logs] == ["broker_unreachable", "broker_reachable"]
    assert logs[1]["attempts"] == 7


async def test_a_broker_there_at_once_logs_nothing():
    with capture_logs() as logs:
        assert await start_when_reachable(Flaky(0), bootstrap="b", what="test") == "client"
    assert logs == []


async def test_a_stop_ends_the_wait_between_attempts_and_during_one():
    stop = asyncio.Event()
    waiting = asyncio.create_task(
        start_when_reachable(Flaky(10**6), bootstrap="b", what="test", stopping=stop, backoff_max_s=30)
    )
    await asyncio.sleep(1.0)  # the second wait is ~1 s: the stop comes while it sleeps
    started = time.monotonic()
    stop.set()
    assert await asyncio.wait_for(waiting, 2) is None
    assert time.monotonic() - started < 0.5

    cancelled = asyncio.Event()

    async def hangs() -> str:
        try:
            await asyncio.sleep(3600)
        finally:
            cancelled.set()
        return "never"

    stop = asyncio.Event()
    waiting = asyncio.create_task(start_when_reachable(hangs, bootstrap="b", what="test", stopping=stop))
    await asyncio.sleep(0.1)
    stop.set()
    assert await asyncio.wait_for(waiting, 2) is None
    assert cancelled.is_set(), "the attempt in flight is cancelled (its client stops itself)"


async def test_errors_other_than_an_unreachable_broker_are_raised():
    with pytest.raises(ValueError):
        await start_when_reachable(Flaky(1, ValueError("bad setting")), bootstrap="b", what="test")


def test_backoff_setting():
    assert connect_backoff_from_env({}) == 10.0
    assert connect_backoff_from_env({"KAFKA_CONNECT_BACKOFF_MAX_S": "2.5"}) == 2.5
    with pytest.raises(SettingsError, match="KAFKA_CONNECT_BACKOFF_MAX_S"):
        connect_backoff_from_env({"KAFKA_CONNECT_BACKOFF_MAX_S": "soon"})


def test_aiokafka_retry_chatter_passes_once_per_kind_a_minute(monkeypatch: pytest.MonkeyPatch):
    chatter = clients._BrokerChatter()
    now = [1000.0]
    monkeypatch.setattr(clients.time, "monotonic", lambda: now[0])

    def record(msg: str, name: str = "aiokafka") -> logging.LogRecord:
        return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, ("1", "refused"), None)

    lost = "Unable connect to node with id %s: %s"
    assert chatter.filter(record(lost))
    assert not any(chatter.filter(record(lost)) for _ in range(500))
    assert chatter.filter(record("Unable to update metadata from %s")), "another kind passes once too"
    assert chatter.filter(record(lost, "aiokafka.conn")), "per logger"
    assert chatter.filter(record("Something else entirely %s")), "other lines are never held back"
    now[0] += 61
    assert chatter.filter(record(lost)), "a minute later one more"
    chatter.waiting = 1
    now[0] += 61
    assert not chatter.filter(record(lost)), "none while a start waits: its own line says it"
