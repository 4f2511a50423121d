"""HTTP outcome classes, pacing and retries shared by every client of a target API.

Every response is classified into one :class:`Outcome`:

* ``SUCCESS``      2xx                                   → the effect is done
* ``CONFLICT``     409 ("already exists")                → caller resolves it by a lookup
* ``NOT_FOUND``    404                                   → caller decides (a lookup miss is normal)
* ``RATE_LIMITED`` 429                                   → wait until the announced reset; costs no retry
* ``RETRY``        408, 5xx, timeouts, connection errors → capped exponential backoff with jitter
* ``REJECT``       any other 4xx                         → the target will never accept it: dead letter

What a failed create means (the target offers no idempotency keys): a 429 and the statuses in
``RetryPolicy.unprocessed_statuses`` (503: the target says it did not handle the request) are
known non-effects and the create is simply sent again; any other 5xx, a timeout or a connection
lost after sending leaves the outcome unknown (:class:`AmbiguousOutcomeError`), and
:func:`create_or_find` looks the object up before creating it again.

Requests are paced from the target's rate-limit headers, which describe an org- or company-wide
window shared by every replica: above the low-water mark requests go out at once; below it the
remaining budget is spread over the time left in the window; at the reserve the executor waits
for the reset.

Isolation: each account's :class:`RateWindow` also holds the account — until the reset a 429
announced, or for a growing backoff once several requests in a row failed transiently (an
outage) — so the account's other requests wait instead of spending the target's answers. Every
wait (pacing, a hold, a 429, backoff, a per-customer limit, the settle time of an ambiguous
create) goes through :func:`pause`: inside a :func:`wait_budget` (a sink's batch) a wait that
would outlast the budget raises :class:`DeferredError` instead of sleeping — nothing is in flight
then — and a wait that fits gives the caller's concurrency slot to others while it sleeps.

Live traffic first: inside :func:`leave_reserve` (a bulk command: an initial import, a
reconciliation) a request may only go while the account's window has more than that many requests
left; at the reserve it waits — or, in a sink's batch, defers (reason ``reserve``) — until the
window resets, so the requests left stay for live work (a person's edit, a call's unknown number).
"""

from __future__ import annotations

import asyncio
import enum
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import aiohttp
import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from pipeline.core.observability import get_logger, metrics
from pipeline.core.settings import SettingsError, env_float, env_int

log = get_logger(__name__)
T = TypeVar("T")


class Outcome(enum.Enum):
    SUCCESS = "success"
    CONFLICT = "conflict"
    NOT_FOUND = "not_found"
    RATE_LIMITED = "rate_limited"
    RETRY = "retry"
    REJECT = "reject"


def classify(status: int) -> Outcome:
    if 200 <= status < 300:
        return Outcome.SUCCESS
    if status == 409:
        return Outcome.CONFLICT
    if status == 404:
        return Outcome.NOT_FOUND
    if status == 429:
        return Outcome.RATE_LIMITED
    if status == 408 or status >= 500:
        return Outcome.RETRY
    return Outcome.REJECT


@dataclass(frozen=True, slots=True)
class ApiResponse:
    status: int
    headers: Mapping[str, str]
    body: Any  # parsed JSON, or None when the body was empty / not JSON
    text: str
    sent_at: float = 0.0  # time.monotonic() when the request left (for ambiguous outcomes)

    @property
    def outcome(self) -> Outcome:
        return classify(self.status)


class ApiError(Exception):
    """Base of every error a client raises for a target response."""

    def __init__(self, target: str, op: str, status: int | None, message: str, body: Any = None) -> None:
        super().__init__(f"{target} {op}: {status if status is not None else 'no response'}: {message}")
        self.target, self.op, self.status, self.body = target, op, status, body


class RejectedError(ApiError):
    """A 4xx the target will never accept (dead letter)."""


class RetryExhaustedError(ApiError):
    """Transient failures (408/5xx/timeouts/connection errors) lasted past the retry deadline."""


class AmbiguousOutcomeError(ApiError):
    """A create was sent but failed in a way that does not say whether it happened (timeout,
    connection lost, 5xx). It is not retried blindly: see :func:`create_or_find`."""

    def __init__(self, target: str, op: str, status: int | None, message: str, sent_at: float) -> None:
        super().__init__(target, op, status, message)
        self.sent_at = sent_at  # time.monotonic() when the request left


class DeferredError(Exception):
    """Waiting for the target would outlast the caller's :func:`wait_budget`, so the request was
    not sent (again): nothing of it is in flight — it was never sent, or its answer said it did
    not happen (429, an unprocessed 503). ``until`` (Unix seconds) is the earliest time worth
    trying again; ``reason`` says what is waited for: ``rate_limited`` (the account's window, a
    429), ``resource_limited`` (a narrower limit the target announced, e.g. one customer's),
    ``customer_limit`` (the local per-customer limiter), ``held`` (the account is held: a 429 or
    an outage), ``reserve`` (bulk work at the live reserve, :func:`leave_reserve`), ``pacing``,
    ``backoff`` (a transient failure), ``settle`` (an ambiguous create).

    ``unsettled``: a create whose outcome is unknown was not resolved yet, so the effect must be
    looked up before it is created again. ``steps``: the command's progress, set by the effects
    that know it (the ids written so far)."""

    def __init__(self, reason: str, until: float, *, unsettled: bool = False) -> None:
        super().__init__(f"{reason}: deferred for {max(0.0, until - time.time()):.1f}s")
        self.reason, self.until, self.unsettled = reason, until, unsettled
        self.steps: dict[str, Any] | None = None


class Slot(Protocol):
    """A concurrency slot a waiting task gives back while it sleeps (a sink lane's)."""

    def release(self) -> None: ...

    async def acquire(self) -> None: ...


@dataclass(slots=True)
class WaitBudget:
    deadline: float  # time.monotonic(): no wait may end later than this
    slot: Slot | None = None


_BUDGET: ContextVar[WaitBudget | None] = ContextVar("pipeline_wait_budget", default=None)
_RESERVE: ContextVar[int] = ContextVar("pipeline_live_reserve", default=0)


@contextmanager
def leave_reserve(requests: int) -> Iterator[None]:
    """Within this block (bulk work) every request leaves ``requests`` of its account's window to
    others: at that many left it waits for the window's reset (:meth:`RateWindow.acquire`)."""
    token = _RESERVE.set(max(0, requests))
    try:
        yield
    finally:
        _RESERVE.reset(token)


@contextmanager
def wait_budget(deadline: float, slot: Slot | None = None) -> Iterator[WaitBudget]:
    """Within this block (this task and the tasks it starts) every :func:`pause` that would end
    after ``deadline`` (``time.monotonic()``) raises :class:`DeferredError`, and one that fits
    releases ``slot`` while it sleeps."""
    budget = WaitBudget(deadline, slot)
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


def deferral(seconds: float, reason: str) -> DeferredError | None:
    """The :class:`DeferredError` a wait of ``seconds`` would raise now, or None when it fits."""
    budget = _BUDGET.get()
    if budget is not None and seconds > 0 and time.monotonic() + seconds > budget.deadline:
        return DeferredError(reason, time.time() + seconds)
    return None


async def _sleep(seconds: float) -> None:
    budget = _BUDGET.get()
    slot = budget.slot if budget is not None else None
    if slot is None:
        await asyncio.sleep(seconds)
        return
    slot.release()
    await asyncio.sleep(seconds)  # a cancellation leaves the slot released; its holder knows
    await slot.acquire()


async def pause(seconds: float, reason: str) -> None:
    """Wait ``seconds`` for a target — or raise :class:`DeferredError` when that would outlast the
    current :func:`wait_budget`. Every wait of this module goes through here."""
    if seconds <= 0:
        return
    exc = deferral(seconds, reason)
    if exc is not None:
        raise exc
    await _sleep(seconds)


class _Transient(Exception):
    def __init__(self, status: int | None, message: str, sent: bool = True, sent_at: float = 0.0) -> None:
        super().__init__(message)
        self.status, self.sent, self.sent_at = status, sent, sent_at


@dataclass(frozen=True, slots=True)
class RateLimitHeaders:
    """Header names a target uses for its window; ``reset`` is a Unix timestamp in seconds.

    ``resource_limits``: the target also limits single resources (Kustomer: conversation and note
    creates per customer), so a 429 that leaves the account's window with requests to spare
    (``remaining`` > 0) limits that resource only and does not hold the account."""

    limit: str
    remaining: str
    reset: str
    resource_limits: bool = False


KUSTOMER_RATE_HEADERS = RateLimitHeaders(
    "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", resource_limits=True
)
CLOUDTALK_RATE_HEADERS = RateLimitHeaders(
    "X-CloudTalkAPI-Limit", "X-CloudTalkAPI-Remaining", "X-CloudTalkAPI-ResetTime"
)


@dataclass(slots=True, frozen=True)
class _Call:
    """One request as the executor's steps pass it on: what to send, which statuses to accept
    besides 2xx, and the operations it takes from the account's window."""

    method: str
    url: str
    op: str
    body: Any
    params: Mapping[str, Any] | None
    accept: tuple[int, ...]
    cost: int = 1


@dataclass
class RateWindow:
    """Pacing and health of one account (a Kustomer org, the CloudTalk company), fed by responses.

    ``reserve`` requests are left for other clients of the same account (pollers, other
    replicas); ``low_water`` is the fraction of the limit below which requests are spread out.
    ``fallback_per_minute`` paces requests when the target sends no headers.

    The account is *held* until ``hold_until`` (Unix seconds): the reset a 429 announced, or —
    once ``outage_after`` requests in a row failed transiently (5xx, timeouts, no connection) — a
    backoff that grows with every further failure; any other answer ends the run of failures.
    The window lives as long as the client, so a hold outlasts the batch that saw it.
    """

    reserve: int = 0
    low_water: float = 0.1
    fallback_per_minute: int | None = None
    max_wait_s: float = 65.0
    outage_after: int = 3
    limit: int | None = None
    remaining: int | None = None
    reset_at: float | None = None
    hold_until: float = 0.0
    failures: int = 0
    _last_sent: float = 0.0

    def update(self, headers: Mapping[str, str], names: RateLimitHeaders) -> None:
        try:
            if (v := headers.get(names.limit)) is not None:
                self.limit = int(float(v))
            if (v := headers.get(names.remaining)) is not None:
                self.remaining = int(float(v))
            if (v := headers.get(names.reset)) is not None:
                self.reset_at = float(v)
        except ValueError:
            pass  # a malformed header never stops a request; the fallback pace applies

    def seconds_to_reset(self, now: float | None = None) -> float:
        now = time.time() if now is None else now
        if self.reset_at is None:
            return 1.0
        return min(max(self.reset_at - now, 0.05), self.max_wait_s)

    def hold(self, until: float) -> None:
        """No request to this account before ``until`` (Unix seconds)."""
        self.hold_until = max(self.hold_until, until)

    def note_answer(self) -> None:
        """The account answered (anything but 408/5xx/429): a run of failures is over."""
        self.failures = 0

    def note_failure(self, initial_s: float, max_s: float, now: float | None = None) -> None:
        """A transient failure (408/5xx, timeout, no connection). From the ``outage_after``-th in a
        row on, the account is held for a backoff that doubles each time (full jitter's upper half,
        capped at ``max_s``)."""
        self.failures += 1
        if self.failures >= self.outage_after:
            now = time.time() if now is None else now
            step = min(self.failures - self.outage_after, 16)
            self.hold(now + min(max_s, max(initial_s, 0.05) * 2**step) * random.uniform(0.5, 1.0))

    def ready_at(self, now: float | None = None, leave: int = 0) -> float:
        """When the next request may go at the earliest (Unix seconds), or 0 when it may go now:
        the account is held, or only the reserve (at least ``leave``: a bulk command's live
        reserve) is left until the window resets."""
        now = time.time() if now is None else now
        at = self.hold_until if self.hold_until > now else 0.0
        if self.spare(now, leave) == 0:
            at = max(at, now + self.seconds_to_reset(now))
        return at

    def spare(self, now: float | None = None, leave: int = 0) -> int | None:
        """Requests left in the current window above the reserve (at least ``leave``): once the
        window has reset since the last answer, the whole limit; None when nothing is known yet."""
        now = time.time() if now is None else now
        if self.remaining is None or self.reset_at is None:
            return None
        if self.reset_at <= now:
            if self.limit is None:
                return None
            return max(0, self.limit - max(self.reserve, leave))
        return max(0, self.remaining - max(self.reserve, leave))

    def delay_before_next(self, now: float | None = None) -> float:
        """How long to wait before the next request (0 = send now)."""
        now = time.time() if now is None else now
        if self.hold_until > now:
            return self.hold_until - now + random.uniform(0.0, 0.05)
        if self.remaining is None or self.limit is None or self.reset_at is None or now >= self.reset_at:
            if self.fallback_per_minute:
                gap = 60.0 / self.fallback_per_minute
                return max(0.0, self._last_sent + gap - now)
            return 0.0
        left = self.remaining - self.reserve
        if left <= 0:
            return self.seconds_to_reset(now) + random.uniform(0.0, 0.05)
        if self.remaining > self.limit * self.low_water:
            return 0.0
        gap = (self.reset_at - now) / left
        return max(0.0, self._last_sent + gap - now)

    async def acquire(self, cost: int = 1) -> None:
        """Take the next send time of this window (and wait for it): concurrent callers get
        successive times. ``cost``: the operations the request takes from the window (a bulk
        request read as one per item); one the window can no longer take waits for its reset
        rather than being refused as a whole. Raises :class:`DeferredError` — having taken
        nothing — when the wait would outlast the caller's budget."""
        now = time.time()
        leave = _RESERVE.get()
        spare = self.spare(now, leave) if (leave or cost > 1) else None
        if spare is not None and spare < cost:  # bulk work: the rest of the window is live traffic's
            await pause(self.seconds_to_reset(now) + random.uniform(0.0, 0.05), "reserve" if leave else "pacing")
            now = time.time()
        delay = self.delay_before_next(now)
        if delay > 0:
            reason = "held" if self.hold_until > now else "pacing"
            exc = deferral(delay, reason)
            if exc is not None:
                raise exc
        self._last_sent = now + delay  # no await since the delay was computed: the time is ours
        if self.remaining is not None:
            self.remaining -= cost  # optimistic; the response header corrects it
        if delay > 0:
            await _sleep(delay)


class KeyedLimiter:
    """A local sliding window per key (e.g. Kustomer's 120 notes per minute per customer)."""

    def __init__(self, limit: int, window_s: float = 60.0) -> None:
        self.limit, self.window_s = limit, window_s
        self._hits: dict[str, deque[float]] = {}

    def delay(self, key: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        hits = self._hits.setdefault(key, deque())
        while hits and hits[0] <= now - self.window_s:
            hits.popleft()
        if len(hits) < self.limit:
            return 0.0
        return hits[0] + self.window_s - now

    async def acquire(self, key: str) -> None:
        """Wait for a free place in ``key``'s window (:func:`pause`: may raise
        :class:`DeferredError`, reason ``customer_limit``) and take it."""
        while (d := self.delay(key)) > 0:
            await pause(d, "customer_limit")
        self._hits[key].append(time.monotonic())
        if len(self._hits) > 10_000:  # forget idle keys
            cutoff = time.monotonic() - self.window_s
            for k in [k for k, v in self._hits.items() if not v or v[-1] <= cutoff]:
                del self._hits[k]


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for RETRY outcomes: full jitter, capped; the deadline bounds one request.

    ``unprocessed_statuses``: answers that say the target did not handle the request (503), so a
    create that got one is sent again like a read; any other 5xx leaves a create ambiguous."""

    initial_s: float = 0.2
    max_backoff_s: float = 10.0
    max_attempts: int = 12
    deadline_s: float = 120.0
    timeout_s: float = 10.0
    unprocessed_statuses: frozenset[int] = frozenset({503})


class HttpExecutor:
    """Sends one logical request to a target, applying pacing, 429 waits and backoff.

    Returns an :class:`ApiResponse` for 2xx and for the statuses listed in ``accept``
    (typically 404 for lookups, 409 for creates); raises :class:`RejectedError` for any other
    4xx and :class:`RetryExhaustedError` when transient failures outlast the policy.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        target: str,
        account: str,
        rate_headers: RateLimitHeaders,
        window: RateWindow | None = None,
        policy: RetryPolicy | None = None,
        basic_auth: tuple[str, str] | None = None,
        default_headers: Mapping[str, str] | None = None,
    ) -> None:
        self.session, self.target, self.account = session, target, account
        self.rate_headers = rate_headers
        self.window = window or RateWindow()
        self.policy = policy or RetryPolicy()
        self.default_headers = dict(default_headers or {})
        if basic_auth is not None:
            self.default_headers["Authorization"] = aiohttp.encode_basic_auth(*basic_auth)
        # the retry policy, built once for every request (each keeps its own attempt state: request)
        self._retrying = AsyncRetrying(
            retry=retry_if_exception_type(_Transient),
            wait=wait_random_exponential(multiplier=self.policy.initial_s, max=self.policy.max_backoff_s),
            stop=stop_after_attempt(self.policy.max_attempts) | stop_after_delay(self.policy.deadline_s),
            before_sleep=self._before_sleep,
            sleep=self._backoff,
        )
        m = metrics()
        self._remaining_gauge = m.ratelimit_remaining.labels(target, account)
        self._retry_rate = m.http_retries.labels(target, "rate_limited")
        self._retry_transient = m.http_retries.labels(target, "transient")
        self.requests_sent = 0
        self.rate_limited = 0

    async def request(
        self,
        method: str,
        url: str,
        op: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        accept: tuple[int, ...] = (),
        idempotent: bool = True,
        cost: int = 1,
    ) -> ApiResponse:
        """``cost``: the operations the request takes from the account's window (a bulk request
        read as one per item, :meth:`RateWindow.acquire`). ``idempotent=False`` (creates): a
        failure after the request was sent raises :class:`AmbiguousOutcomeError` instead of being
        retried — unless the target answered a status of ``policy.unprocessed_statuses``; failures
        before it was sent (no connection) and 429s are retried as usual. Inside a
        :func:`wait_budget` any wait that would outlast it raises :class:`DeferredError` (nothing
        in flight)."""
        # The policy's steps after a transient failure, as tenacity takes them: the wait, the stop
        # check (attempts, time since the first attempt), the retry log line, the backoff. The
        # attempt state is this request's own (lanes share the executor), and it is only made
        # once an attempt failed: a request answered at once costs one call.
        policy = self._retrying
        started = time.monotonic()
        state: RetryCallState | None = None
        call = _Call(method, url, op, json, params, accept, cost)
        while True:
            try:
                return await self._attempt(call, idempotent)
            except _Transient as exc:
                failure = exc
            if state is None:
                state = RetryCallState(policy, None, (), {})
                state.start_time = started
            state.set_exception((type(failure), failure, failure.__traceback__))
            state.upcoming_sleep = policy.wait(state)
            if policy.stop(state):
                raise RetryExhaustedError(
                    self.target, op, failure.status, f"gave up after retries: {failure}"
                ) from None
            state.idle_for += state.upcoming_sleep
            self._before_sleep(state)
            state.prepare_for_next_attempt()
            await self._backoff(state.upcoming_sleep)

    async def _attempt(self, call: _Call, idempotent: bool) -> ApiResponse:
        """One attempt (its 429 waits included); a transient failure of a create that may have
        been performed is ambiguous, not retried."""
        try:
            return await self._until_not_rate_limited(call)
        except _Transient as exc:
            if not idempotent and exc.sent and exc.status not in self.policy.unprocessed_statuses:
                raise AmbiguousOutcomeError(self.target, call.op, exc.status, str(exc), exc.sent_at) from None
            raise

    def _before_sleep(self, state: Any) -> None:
        self._retry_transient.inc()
        exc = state.outcome.exception() if state.outcome else None
        log.warning("http_retry", target=self.target, attempt=state.attempt_number, error=str(exc))

    async def _backoff(self, seconds: float) -> None:
        """The wait before a retry: the backoff, or the account's hold when that is longer."""
        held = self.window.hold_until - time.time()
        if held > seconds:
            await pause(held, "held")
        else:
            await pause(seconds, "backoff")

    async def _until_not_rate_limited(self, call: _Call) -> ApiResponse:
        # A 429 waits for the reset the headers announce and is not a retry attempt.
        op = call.op
        while True:
            response = await self._send_once(call)
            outcome = response.outcome
            if outcome is Outcome.RATE_LIMITED:
                self.rate_limited += 1
                self._retry_rate.inc()
                wait = self.window.seconds_to_reset() + random.uniform(0.0, 0.1)
                remaining = self.window.remaining
                if self.rate_headers.resource_limits and remaining is not None and remaining > 0:
                    reason = "resource_limited"  # a narrower limit (one customer's): the account is fine
                else:
                    reason = "rate_limited"
                    self.window.hold(time.time() + wait)
                log.info("rate_limited", target=self.target, op=op, wait_s=round(wait, 2), scope=reason)
                await pause(wait, reason)
                continue
            if outcome is Outcome.SUCCESS or response.status in call.accept:
                return response
            if outcome is Outcome.RETRY:
                raise _Transient(response.status, f"HTTP {response.status}", True, response.sent_at)
            raise RejectedError(self.target, op, response.status, _error_message(response), response.body)

    async def _send_once(self, call: _Call) -> ApiResponse:
        method, url, op, body, params = call.method, call.url, call.op, call.body, call.params
        await self.window.acquire(call.cost)
        headers = dict(self.default_headers)
        data = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = "application/json"
        started = time.perf_counter()
        sent_at = time.monotonic()  # per request: concurrent lanes share this executor
        status_label = "error"
        try:
            async with self.session.request(
                method,
                url,
                data=data,
                params=params,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.policy.timeout_s),
            ) as resp:
                raw = await resp.read()
                self.requests_sent += 1
                status_label = str(resp.status)
                self.window.update(resp.headers, self.rate_headers)
                if classify(resp.status) is Outcome.RETRY:
                    self.window.note_failure(self.policy.initial_s, self.policy.max_backoff_s)
                elif resp.status != 429:
                    self.window.note_answer()
                if self.window.remaining is not None:
                    self._remaining_gauge.set(self.window.remaining)
                text = raw.decode("utf-8", "replace")
                try:
                    parsed = orjson.loads(raw) if raw else None
                except orjson.JSONDecodeError:
                    parsed = None
                return ApiResponse(resp.status, resp.headers, parsed, text, sent_at)
        except aiohttp.ClientConnectorError as exc:  # never reached the target
            self.window.note_failure(self.policy.initial_s, self.policy.max_backoff_s)
            raise _Transient(None, f"{type(exc).__name__}: {exc}", False) from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.window.note_failure(self.policy.initial_s, self.policy.max_backoff_s)
            raise _Transient(None, f"{type(exc).__name__}: {exc}", True, sent_at) from exc
        finally:
            metrics().http_seconds.labels(self.target, op, status_label).observe(time.perf_counter() - started)


def _error_message(response: ApiResponse) -> str:
    body = response.body
    if isinstance(body, dict):
        errors = body.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            first = errors[0]
            return str(first.get("detail") or first.get("message") or first.get("title") or first)
        rd = body.get("responseData")
        if isinstance(rd, dict) and "message" in rd:
            data = rd.get("data")
            return f"{rd['message']} {data}" if data else str(rd["message"])
        if "message" in body:
            return str(body["message"])
    return response.text[:300]


class ApiClient:
    """A typed client's plumbing: one target's base URL and executor; ``_call`` drops empty query
    parameters and lets a client translate a target's rejections (``_rejected``)."""

    def __init__(self, executor: HttpExecutor, base_url: str) -> None:
        self.executor = executor
        self.base_url = base_url.rstrip("/")

    async def _call(
        self,
        method: str,
        path: str,
        op: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        accept: tuple[int, ...] = (),
        idempotent: bool = True,
        cost: int = 1,
    ) -> ApiResponse:
        query = {k: str(v) for k, v in (params or {}).items() if v is not None}
        try:
            return await self.executor.request(
                method,
                f"{self.base_url}{path}",
                op,
                json=json,
                params=query or None,
                accept=accept,
                idempotent=idempotent,
                cost=cost,
            )
        except RejectedError as exc:
            raise self._rejected(exc) from None

    def _rejected(self, exc: RejectedError) -> RejectedError:
        """The error to raise for a rejection (a client may return a more specific one)."""
        return exc


async def create_or_find(
    create: Callable[[], Awaitable[T]],
    find: Callable[[], Awaitable[T | None]],
    *,
    settle_s: float,
    deadline_s: float = 300.0,
) -> tuple[T, bool]:
    """Make a resource exist exactly once without idempotency keys.

    ``create`` is attempted; when its outcome is ambiguous (the request was sent, then a timeout,
    a lost connection or a 5xx), the target may still finish it. So: wait until ``settle_s`` after
    the request was sent, ``find`` it by its deterministic key, and create again only when it is
    absent. Returns ``(resource, found)``. A request the target keeps working on for longer than
    ``settle_s`` is the one case this cannot see.

    A :class:`DeferredError` (a wait that outlasts the caller's budget) after an ambiguous attempt
    is marked ``unsettled``: whoever resumes must look the object up before creating it.
    """
    started = time.monotonic()
    delay = 0.5
    ambiguous = False
    try:
        while True:
            try:
                return await create(), False
            except AmbiguousOutcomeError as exc:
                ambiguous = True
                wait = exc.sent_at + settle_s - time.monotonic()
                log.warning(
                    "create_outcome_unknown",
                    target=exc.target,
                    op=exc.op,
                    error=str(exc),
                    settle_s=round(max(wait, 0.0), 1),
                )
                await pause(wait, "settle")
                found = await find()
                if found is not None:
                    return found, True
                if time.monotonic() - started > deadline_s:
                    raise RetryExhaustedError(exc.target, exc.op, exc.status, "create kept failing") from None
                await pause(delay * random.uniform(0.5, 1.0), "backoff")
                delay = min(delay * 2, 10.0)
    except DeferredError as exc:
        exc.unsettled = exc.unsettled or ambiguous
        raise


def statuses_from_env(env: Mapping[str, str], name: str, default: str) -> frozenset[int]:
    """A comma-separated list of HTTP statuses; set but empty: none."""
    raw = env.get(name)
    raw = default if raw is None else raw
    try:
        statuses = frozenset(int(part) for part in raw.replace(" ", "").split(",") if part)
    except ValueError:
        raise SettingsError(f"{name}: expected HTTP statuses separated by commas, got {raw!r}") from None
    if any(not 500 <= s <= 599 for s in statuses):
        raise SettingsError(f"{name}: only 5xx statuses can be declared unprocessed, got {raw!r}")
    return statuses


def retry_policy_from_env() -> RetryPolicy:
    env = os.environ
    return RetryPolicy(
        initial_s=env_float(env, "SINK_RETRY_INITIAL_S", 0.2, minimum=0.0),
        max_backoff_s=env_float(env, "SINK_RETRY_MAX_BACKOFF_S", 10.0, minimum=0.0),
        max_attempts=env_int(env, "SINK_RETRY_MAX_ATTEMPTS", 12, minimum=1),
        deadline_s=env_float(env, "SINK_RETRY_DEADLINE_S", 120.0, minimum=0.1),
        timeout_s=env_float(env, "SINK_HTTP_TIMEOUT_S", 10.0, minimum=0.1),
        unprocessed_statuses=statuses_from_env(env, "SINK_UNPROCESSED_STATUSES", "503"),
    )


def settle_from_env() -> float:
    """How long after an ambiguous create (or a crash) to wait before looking the effect up."""
    env = os.environ
    timeout = env_float(env, "SINK_HTTP_TIMEOUT_S", 10.0, minimum=0.1)
    return env_float(env, "SINK_RECONCILE_SETTLE_S", 2 * timeout, minimum=0.0)
