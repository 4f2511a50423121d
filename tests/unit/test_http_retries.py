"""The retry policy of one request, without a network: transient failures are retried with capped
exponential backoff until the attempts or the deadline run out, a create that may have been
performed is not retried, and requests sharing an executor keep their own attempts."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from pipeline.clients.http import (
    KUSTOMER_RATE_HEADERS,
    AmbiguousOutcomeError,
    ApiResponse,
    HttpExecutor,
    RejectedError,
    RetryExhaustedError,
    RetryPolicy,
    _Transient,
)


class Scripted(HttpExecutor):
    """An executor whose attempts follow a script per URL: a status to fail with transiently
    (``None``: no connection), or ``"ok"``; the backoffs are recorded, not slept."""

    def __init__(self, session: aiohttp.ClientSession, policy: RetryPolicy, script: dict[str, list[Any]]) -> None:
        super().__init__(session, "kustomer", "acct", KUSTOMER_RATE_HEADERS, policy=policy)
        self.script = script
        self.attempts: dict[str, int] = {}
        self.backoffs: list[float] = []

    async def _until_not_rate_limited(self, call: Any) -> ApiResponse:
        url, op = call.url, call.op
        self.attempts[url] = self.attempts.get(url, 0) + 1
        await asyncio.sleep(0)  # let concurrent requests interleave
        step = self.script[url].pop(0) if self.script[url] else 500
        if step == "ok":
            return ApiResponse(200, {}, {"url": url}, "", 0.0)
        if step == "reject":
            raise RejectedError(self.target, op, 400, "bad")
        raise _Transient(step, f"HTTP {step}", step is not None, 1.0)

    async def _backoff(self, seconds: float) -> None:
        self.backoffs.append(seconds)


POLICY = RetryPolicy(initial_s=0.2, max_backoff_s=1.0, max_attempts=6, deadline_s=60.0)


async def test_transient_failures_are_retried_with_capped_jittered_backoff() -> None:
    async with aiohttp.ClientSession() as session:
        ex = Scripted(session, POLICY, {"u": [500, None, 502, 503, 408, "ok"]})
        answer = await ex.request("GET", "u", "lookup")
    assert answer.body == {"url": "u"}
    assert ex.attempts == {"u": 6}
    caps = [0.2, 0.4, 0.8, 1.0, 1.0]  # initial * 2^(n-1), capped
    assert len(ex.backoffs) == 5
    assert all(0.0 <= wait <= cap for wait, cap in zip(ex.backoffs, caps, strict=True))


async def test_the_attempts_run_out() -> None:
    async with aiohttp.ClientSession() as session:
        ex = Scripted(session, POLICY, {"u": [500] * 5 + [503]})
        with pytest.raises(RetryExhaustedError) as caught:
            await ex.request("GET", "u", "lookup")
    assert ex.attempts == {"u": 6} and len(ex.backoffs) == 5
    assert caught.value.status == 503
    assert "gave up after retries: HTTP 503" in str(caught.value)


async def test_the_deadline_runs_out() -> None:
    async with aiohttp.ClientSession() as session:
        ex = Scripted(session, RetryPolicy(max_attempts=10, deadline_s=0.0), {"u": [500, "ok"]})
        with pytest.raises(RetryExhaustedError):
            await ex.request("GET", "u", "lookup")
    assert ex.attempts == {"u": 1} and ex.backoffs == []


async def test_a_rejection_is_not_retried() -> None:
    async with aiohttp.ClientSession() as session:
        ex = Scripted(session, POLICY, {"u": ["reject", "ok"]})
        with pytest.raises(RejectedError):
            await ex.request("POST", "u", "create")
    assert ex.attempts == {"u": 1}


async def test_a_create_that_may_have_been_performed_is_ambiguous_not_retried() -> None:
    async with aiohttp.ClientSession() as session:
        ex = Scripted(session, POLICY, {"sent": [500, "ok"], "unsent": [None, "ok"], "unprocessed": [503, "ok"]})
        with pytest.raises(AmbiguousOutcomeError):
            await ex.request("POST", "sent", "create", idempotent=False)
        assert (await ex.request("POST", "unsent", "create", idempotent=False)).status == 200
        assert (await ex.request("POST", "unprocessed", "create", idempotent=False)).status == 200
    assert ex.attempts == {"sent": 1, "unsent": 2, "unprocessed": 2}


async def test_concurrent_requests_keep_their_own_attempts() -> None:
    async with aiohttp.ClientSession() as session:
        ex = Scripted(
            session,
            RetryPolicy(initial_s=0.01, max_backoff_s=0.01, max_attempts=3),
            {"a": [500, 500, "ok"], "b": [500, 500, 500, "ok"], "c": ["ok"]},
        )
        a, b, c = await asyncio.gather(
            ex.request("GET", "a", "lookup"),
            ex.request("GET", "b", "lookup"),
            ex.request("GET", "c", "lookup"),
            return_exceptions=True,
        )
    assert isinstance(a, ApiResponse) and isinstance(c, ApiResponse)
    assert isinstance(b, RetryExhaustedError)
    assert ex.attempts == {"a": 3, "b": 3, "c": 1}
