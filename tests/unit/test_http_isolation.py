"""The HTTP policy's isolation parts, without a network: waits inside a budget, account holds, and
what a create's failure means (pipeline.clients.http)."""

from __future__ import annotations

import asyncio
import time

import pytest

from pipeline.clients.http import (
    AmbiguousOutcomeError,
    DeferredError,
    KeyedLimiter,
    RateWindow,
    create_or_find,
    pause,
    retry_policy_from_env,
    statuses_from_env,
    wait_budget,
)
from pipeline.core.settings import SettingsError


class CountingSlot:
    def __init__(self) -> None:
        self.events: list[str] = []

    def release(self) -> None:
        self.events.append("release")

    async def acquire(self) -> None:
        self.events.append("acquire")


async def test_a_wait_that_fits_the_budget_is_slept_without_the_slot() -> None:
    slot = CountingSlot()
    with wait_budget(time.monotonic() + 1.0, slot):
        started = time.monotonic()
        await pause(0.1, "pacing")
    assert time.monotonic() - started >= 0.1
    assert slot.events == ["release", "acquire"]


async def test_a_wait_that_outlasts_the_budget_raises_at_once() -> None:
    slot = CountingSlot()
    with wait_budget(time.monotonic() + 0.5, slot):
        started = time.monotonic()
        with pytest.raises(DeferredError) as info:
            await pause(30.0, "rate_limited")
    assert time.monotonic() - started < 0.5 and slot.events == []
    assert info.value.reason == "rate_limited" and 29 < info.value.until - time.time() <= 30
    assert not info.value.unsettled and info.value.steps is None


async def test_without_a_budget_a_wait_is_just_slept() -> None:
    started = time.monotonic()
    await pause(0.05, "backoff")
    assert time.monotonic() - started >= 0.05


async def test_the_budget_belongs_to_the_task_that_set_it() -> None:
    async def other() -> None:
        await pause(0.05, "pacing")  # no budget here

    with wait_budget(time.monotonic() + 0.01):
        task = asyncio.create_task(other())  # copies the context: the budget applies
        with pytest.raises(DeferredError):
            await task
    await other()  # outside: slept


def test_a_run_of_transient_failures_holds_the_account_and_an_answer_ends_it() -> None:
    w = RateWindow(outage_after=3)
    w.note_failure(0.2, 10.0, now=1000.0)
    w.note_failure(0.2, 10.0, now=1000.0)
    assert w.hold_until == 0.0 and w.ready_at(now=1000.0) == 0.0, "two failures are not an outage"
    w.note_failure(0.2, 10.0, now=1000.0)
    assert 1000.1 <= w.hold_until <= 1000.2
    for _ in range(10):
        w.note_failure(0.2, 10.0, now=1000.0)
    assert 1005.0 <= w.hold_until <= 1010.0, "the hold doubles and is capped"
    assert w.ready_at(now=1001.0) == w.hold_until
    assert w.delay_before_next(now=1001.0) >= w.hold_until - 1001.0
    w.note_answer()
    assert w.failures == 0
    assert w.ready_at(now=w.hold_until + 0.01) == 0.0


def test_a_spent_window_is_not_ready_until_its_reset() -> None:
    w = RateWindow(reserve=2)
    w.limit, w.remaining, w.reset_at = 100, 2, 1030.0
    assert w.ready_at(now=1000.0) == pytest.approx(1030.0)
    w.remaining = 3
    assert w.ready_at(now=1000.0) == 0.0


async def test_a_held_account_defers_at_acquire_and_takes_nothing() -> None:
    w = RateWindow()
    w.limit, w.remaining, w.reset_at = 100, 50, time.time() + 60
    w.hold(time.time() + 20)
    last = w._last_sent
    with wait_budget(time.monotonic() + 1.0):
        with pytest.raises(DeferredError) as info:
            await w.acquire()
    assert info.value.reason == "held" and w.remaining == 50 and w._last_sent == last


async def test_concurrent_acquires_are_spread_over_the_window() -> None:
    w = RateWindow(fallback_per_minute=600)  # one request per 0.1 s without headers
    started = time.monotonic()
    await asyncio.gather(*(w.acquire() for _ in range(4)))
    assert time.monotonic() - started >= 0.29, "each caller took the next free send time"


async def test_the_per_customer_limiter_defers_only_that_customer() -> None:
    limiter = KeyedLimiter(limit=1, window_s=60)
    with wait_budget(time.monotonic() + 1.0):
        await limiter.acquire("acme|cust-1")
        with pytest.raises(DeferredError) as info:
            await limiter.acquire("acme|cust-1")
        await limiter.acquire("acme|cust-2")
    assert info.value.reason == "customer_limit" and 59 < info.value.until - time.time() <= 60


async def test_a_deferral_after_an_ambiguous_create_is_unsettled() -> None:
    sent: list[int] = []

    async def create() -> dict:
        sent.append(1)
        raise AmbiguousOutcomeError("kustomer", "notes.create", None, "timeout", time.monotonic())

    async def find() -> dict | None:
        raise AssertionError("not before the settle time")

    with wait_budget(time.monotonic() + 0.5):
        with pytest.raises(DeferredError) as info:
            await create_or_find(create, find, settle_s=20.0)
    assert info.value.reason == "settle" and info.value.unsettled and sent == [1]


async def test_a_deferral_before_anything_ambiguous_is_settled() -> None:
    async def create() -> dict:
        await pause(60.0, "rate_limited")
        return {}

    async def find() -> dict | None:
        return None

    with wait_budget(time.monotonic() + 0.5):
        with pytest.raises(DeferredError) as info:
            await create_or_find(create, find, settle_s=20.0)
    assert not info.value.unsettled


def test_unprocessed_statuses_setting() -> None:
    assert statuses_from_env({}, "X", "503") == frozenset({503})
    assert statuses_from_env({"X": ""}, "X", "503") == frozenset(), "set but empty: every 5xx is ambiguous"
    assert statuses_from_env({"X": "502, 503"}, "X", "503") == frozenset({502, 503})
    with pytest.raises(SettingsError, match="X"):
        statuses_from_env({"X": "503,abc"}, "X", "503")
    with pytest.raises(SettingsError, match="only 5xx"):
        statuses_from_env({"X": "429"}, "X", "503")


def test_the_sink_policy_treats_503_as_unprocessed_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SINK_UNPROCESSED_STATUSES", raising=False)
    assert retry_policy_from_env().unprocessed_statuses == frozenset({503})
