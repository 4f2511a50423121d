"""HTTP outcome classes, pacing and retries shared by every client of a target API.

Every response is classified into one :class:`Outcome`:

* ``SUCCESS``      2xx                                   → the effect is done
* ``CONFLICT``     409 ("already exists")                → caller resolves it by a lookup
* ``NOT_FOUND``    404                                   → caller decides (a lookup miss is normal)
* ``RATE_LIMITED`` 429                                   → wait until the announced reset; costs no retry
* ``RETRY``        408, 5xx, timeouts, connection errors → capped exponential backoff with jitter
* ``REJECT``       any other 4xx                         → the target will never accept it: dead letter

Requests are paced from the target's rate-limit headers, which describe an org- or company-wide
window shared by every replica: above the low-water mark requests go out at once; below it the
remaining budget is spread over the time left in the window; at the reserve the executor waits
for the reset.
"""

from __future__ import annotations

import asyncio
import enum
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import orjson
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from pipeline.core.observability import get_logger, metrics
from pipeline.core.settings import env_float, env_int

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


class _Transient(Exception):
    def __init__(self, status: int | None, message: str, sent: bool = True, sent_at: float = 0.0) -> None:
        super().__init__(message)
        self.status, self.sent, self.sent_at = status, sent, sent_at


@dataclass(frozen=True, slots=True)
class RateLimitHeaders:
    """Header names a target uses for its window; ``reset`` is a Unix timestamp in seconds."""

    limit: str
    remaining: str
    reset: str


KUSTOMER_RATE_HEADERS = RateLimitHeaders("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")
CLOUDTALK_RATE_HEADERS = RateLimitHeaders(
    "X-CloudTalkAPI-Limit", "X-CloudTalkAPI-Remaining", "X-CloudTalkAPI-ResetTime"
)


@dataclass
class RateWindow:
    """Pacing state for one account's window, fed by response headers.

    ``reserve`` requests are left for other clients of the same account (pollers, other
    replicas); ``low_water`` is the fraction of the limit below which requests are spread out.
    ``fallback_per_minute`` paces requests when the target sends no headers.
    """

    reserve: int = 0
    low_water: float = 0.1
    fallback_per_minute: int | None = None
    max_wait_s: float = 65.0
    limit: int | None = None
    remaining: int | None = None
    reset_at: float | None = None
    _last_sent: float = 0.0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

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

    def delay_before_next(self, now: float | None = None) -> float:
        """How long to wait before the next request (0 = send now)."""
        now = time.time() if now is None else now
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

    async def acquire(self) -> None:
        async with self._lock:
            delay = self.delay_before_next()
            if delay > 0:
                await asyncio.sleep(delay)
            self._last_sent = time.time()
            if self.remaining is not None:
                self.remaining -= 1  # optimistic; the response header corrects it


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
        while (d := self.delay(key)) > 0:
            await asyncio.sleep(d)
        self._hits[key].append(time.monotonic())
        if len(self._hits) > 10_000:  # forget idle keys
            cutoff = time.monotonic() - self.window_s
            for k in [k for k, v in self._hits.items() if not v or v[-1] <= cutoff]:
                del self._hits[k]


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for RETRY outcomes: full jitter, capped; the deadline bounds one request."""

    initial_s: float = 0.2
    max_backoff_s: float = 10.0
    max_attempts: int = 12
    deadline_s: float = 120.0
    timeout_s: float = 10.0


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
    ) -> ApiResponse:
        """``idempotent=False`` (creates): a failure after the request was sent raises
        :class:`AmbiguousOutcomeError` instead of being retried; failures before it was sent (no
        connection) and 429s are retried as usual."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_Transient),
            wait=wait_random_exponential(multiplier=self.policy.initial_s, max=self.policy.max_backoff_s),
            stop=stop_after_attempt(self.policy.max_attempts) | stop_after_delay(self.policy.deadline_s),
            before_sleep=self._before_sleep,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    try:
                        return await self._until_not_rate_limited(method, url, op, json, params, accept)
                    except _Transient as exc:
                        if not idempotent and exc.sent:
                            raise AmbiguousOutcomeError(self.target, op, exc.status, str(exc), exc.sent_at) from None
                        raise
        except RetryError as exc:
            last = exc.last_attempt.exception()
            status = last.status if isinstance(last, _Transient) else None
            raise RetryExhaustedError(self.target, op, status, f"gave up after retries: {last}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _before_sleep(self, state: Any) -> None:
        self._retry_transient.inc()
        exc = state.outcome.exception() if state.outcome else None
        log.warning("http_retry", target=self.target, attempt=state.attempt_number, error=str(exc))

    async def _until_not_rate_limited(
        self, method: str, url: str, op: str, body: Any, params: Mapping[str, Any] | None, accept: tuple[int, ...]
    ) -> ApiResponse:
        # A 429 waits for the reset the headers announce and is not a retry attempt.
        while True:
            response = await self._send_once(method, url, op, body, params)
            outcome = response.outcome
            if outcome is Outcome.RATE_LIMITED:
                self.rate_limited += 1
                self._retry_rate.inc()
                wait = self.window.seconds_to_reset() + random.uniform(0.0, 0.1)
                log.info("rate_limited", target=self.target, op=op, wait_s=round(wait, 2))
                await asyncio.sleep(wait)
                continue
            if outcome is Outcome.SUCCESS or response.status in accept:
                return response
            if outcome is Outcome.RETRY:
                raise _Transient(response.status, f"HTTP {response.status}", True, response.sent_at)
            raise RejectedError(self.target, op, response.status, _error_message(response), response.body)

    async def _send_once(
        self, method: str, url: str, op: str, body: Any, params: Mapping[str, Any] | None
    ) -> ApiResponse:
        await self.window.acquire()
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
                if self.window.remaining is not None:
                    self._remaining_gauge.set(self.window.remaining)
                text = raw.decode("utf-8", "replace")
                try:
                    parsed = orjson.loads(raw) if raw else None
                except orjson.JSONDecodeError:
                    parsed = None
                return ApiResponse(resp.status, resp.headers, parsed, text, sent_at)
        except aiohttp.ClientConnectorError as exc:  # never reached the target
            raise _Transient(None, f"{type(exc).__name__}: {exc}", False) from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
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
    """
    started = time.monotonic()
    delay = 0.5
    while True:
        try:
            return await create(), False
        except AmbiguousOutcomeError as exc:
            wait = exc.sent_at + settle_s - time.monotonic()
            log.warning(
                "create_outcome_unknown",
                target=exc.target,
                op=exc.op,
                error=str(exc),
                settle_s=round(max(wait, 0.0), 1),
            )
            if wait > 0:
                await asyncio.sleep(wait)
            found = await find()
            if found is not None:
                return found, True
            if time.monotonic() - started > deadline_s:
                raise RetryExhaustedError(exc.target, exc.op, exc.status, "create kept failing") from None
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 10.0)


def retry_policy_from_env() -> RetryPolicy:
    env = os.environ
    return RetryPolicy(
        initial_s=env_float(env, "SINK_RETRY_INITIAL_S", 0.2, minimum=0.0),
        max_backoff_s=env_float(env, "SINK_RETRY_MAX_BACKOFF_S", 10.0, minimum=0.0),
        max_attempts=env_int(env, "SINK_RETRY_MAX_ATTEMPTS", 12, minimum=1),
        deadline_s=env_float(env, "SINK_RETRY_DEADLINE_S", 120.0, minimum=0.1),
        timeout_s=env_float(env, "SINK_HTTP_TIMEOUT_S", 10.0, minimum=0.1),
    )


def settle_from_env() -> float:
    """How long after an ambiguous create (or a crash) to wait before looking the effect up."""
    env = os.environ
    timeout = env_float(env, "SINK_HTTP_TIMEOUT_S", 10.0, minimum=0.1)
    return env_float(env, "SINK_RECONCILE_SETTLE_S", 2 * timeout, minimum=0.0)
