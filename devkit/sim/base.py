"""What both platform simulators share.

* :class:`RequestLog`   every request the simulator served (method, path, status, body, effect;
                        ``items`` for bulk requests: one result per item with its own effect)
                        so tests count requests and distinct effects.
* :class:`FaultPlan`    per-endpoint faults by probability or script: HTTP statuses (500, 503,
                        429 bursts), added latency, timeouts (never answers in time), connection
                        resets; ``item`` faults fail single items of a bulk request.
* :class:`FixedWindow`  a fixed per-window request budget with the platform's header semantics.
* :func:`inspection_routes` the ``/_sim/`` routes every simulator has: faults, requests, reset.
* :class:`SimServer`    runs an aiohttp app on a port (CLI and in-process pytest fixtures).
* :func:`configure_logging` / :func:`get_logger` JSON log lines of the simulators' own.
* :func:`phone_key`     the simulators' own phone comparison key (E.164 where it parses).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import re
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import phonenumbers
import structlog
from aiohttp import web

SIM_PREFIX = "/_sim/"


def configure_logging(name: str, level: str = "INFO") -> None:
    """JSON lines on stderr, one per event, tagged with the simulator's name."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.EventRenamer("msg"),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=name)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


def phone_key(value: str | int) -> str:
    """A phone number as the platforms compare it: E.164 when it parses (``00`` and missing ``+``
    read as international), else its digits; a ``whatsapp:`` prefix is ignored."""
    text = str(value).strip()
    if text.lower().startswith("whatsapp:"):
        text = text[9:]
    digits = re.sub(r"[^\d+]", "", text)
    if digits.startswith("00"):
        digits = "+" + digits[2:]
    elif not digits.startswith("+"):
        digits = "+" + digits
    try:
        parsed = phonenumbers.parse(digits, None)
    except phonenumbers.NumberParseException:
        return digits
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def now_iso_ms(ts: float | None = None) -> str:
    """ISO-8601 UTC with milliseconds: ``2025-03-21T20:10:26.481Z``."""
    dt = datetime.fromtimestamp(time.time() if ts is None else ts, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, headers=headers, content_type="application/json")


# --------------------------------------------------------------------------------------------
# Request log
# --------------------------------------------------------------------------------------------


@dataclass
class LoggedRequest:
    seq: int
    at: float
    method: str
    path: str
    query: str
    status: int
    body: Any = None
    effect: str | None = None  # e.g. "conversation.create 65f1...", set by handlers that change state
    fault: str | None = None
    items: list[dict[str, Any]] | None = None  # bulk requests: one result per item, each with its "effect"

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "status": self.status,
            "body": self.body,
            "effect": self.effect,
            "fault": self.fault,
            "items": self.items,
        }


class RequestLog:
    def __init__(self, keep: int = 200_000) -> None:
        self.keep = keep
        self.entries: list[LoggedRequest] = []
        self._seq = itertools.count(1)

    def add(self, entry: LoggedRequest) -> None:
        self.entries.append(entry)
        if len(self.entries) > self.keep:
            del self.entries[: len(self.entries) - self.keep]

    def next_seq(self) -> int:
        return next(self._seq)

    def clear(self) -> None:
        self.entries.clear()


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------

FAULT_KINDS = ("status", "latency", "timeout", "reset", "item")
REQUEST_FAULT_KINDS = ("status", "latency", "timeout", "reset")


@dataclass
class FaultRule:
    """One fault on the requests whose ``METHOD path`` matches ``match`` (a regex).

    ``kind``: ``status`` (answer ``status`` without touching state), ``latency`` (delay the
    real answer by ``latency_ms``), ``timeout`` (hold the request ``latency_ms``, default 30 s,
    then drop the connection), ``reset`` (drop the connection at once), ``item`` (bulk requests
    only: one item is answered with ``status`` and not applied, the others are; the rule is
    consulted once per item, so ``probability`` is the failing fraction and ``script`` goes item
    by item).
    Fires with ``probability``, or, when ``script`` is given, follows it request by request
    (``true`` = fault, ``false`` = pass) and then stops. ``times`` caps how often it fires.
    """

    match: str
    kind: str = "status"
    status: int = 500
    probability: float = 1.0
    latency_ms: int = 0
    script: list[bool] | None = None
    times: int | None = None
    fired: int = 0
    seen: int = 0
    _regex: re.Pattern[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {FAULT_KINDS}, got {self.kind!r}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError("fault probability must be between 0 and 1")
        self._regex = re.compile(self.match)

    def applies(self, method: str, path: str, rng: random.Random) -> bool:
        if not self._regex.search(f"{method} {path}"):
            return False
        if self.times is not None and self.fired >= self.times:
            return False
        self.seen += 1
        if self.script is not None:
            idx = self.seen - 1
            hit = idx < len(self.script) and bool(self.script[idx])
        else:
            hit = rng.random() < self.probability
        if hit:
            self.fired += 1
        return hit

    def as_dict(self) -> dict[str, Any]:
        return {
            "match": self.match,
            "kind": self.kind,
            "status": self.status,
            "probability": self.probability,
            "latency_ms": self.latency_ms,
            "script": self.script,
            "times": self.times,
            "fired": self.fired,
            "seen": self.seen,
        }


class FaultPlan:
    def __init__(self, seed: int | None = None) -> None:
        self.rules: list[FaultRule] = []
        self.rng = random.Random(seed)

    def add(self, **spec: Any) -> FaultRule:
        allowed = {"match", "kind", "status", "probability", "latency_ms", "script", "times"}
        unknown = set(spec) - allowed
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        rule = FaultRule(**spec)
        self.rules.append(rule)
        return rule

    def pick(self, method: str, path: str) -> FaultRule | None:
        """The request-level fault for this request, if one fires (``item`` rules are skipped)."""
        for rule in self.rules:
            if rule.kind in REQUEST_FAULT_KINDS and rule.applies(method, path, self.rng):
                return rule
        return None

    def pick_item(self, method: str, path: str) -> FaultRule | None:
        """The ``item`` fault for one item of a bulk request, if one fires."""
        for rule in self.rules:
            if rule.kind == "item" and rule.applies(method, path, self.rng):
                return rule
        return None

    def clear(self) -> None:
        self.rules.clear()


# --------------------------------------------------------------------------------------------
# Rate windows
# --------------------------------------------------------------------------------------------


@dataclass
class WindowState:
    limit: int
    remaining: int
    reset_at: float  # Unix seconds


class FixedWindow:
    """A fixed window of ``limit`` requests per ``window_s`` seconds, per key.

    ``take`` consumes ``cost`` requests (default one) and says whether they were allowed: all of
    them or none, a refused take consumes nothing; ``peek`` reports the state for headers
    without consuming.
    """

    def __init__(self, limit: int, window_s: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self._windows: dict[str, tuple[float, int]] = {}  # key -> (window start, used)

    def _current(self, key: str) -> tuple[float, int]:
        now = self.clock()
        start, used = self._windows.get(key, (now, 0))
        if now >= start + self.window_s:
            start, used = now, 0
        return start, used

    def take(self, key: str = "", cost: int = 1) -> tuple[bool, WindowState]:
        start, used = self._current(key)
        allowed = used + cost <= self.limit
        if allowed:
            used += cost
        self._windows[key] = (start, used)
        return allowed, WindowState(self.limit, max(self.limit - used, 0), start + self.window_s)

    def peek(self, key: str = "") -> WindowState:
        start, used = self._current(key)
        return WindowState(self.limit, max(self.limit - used, 0), start + self.window_s)

    def reset(self) -> None:
        self._windows.clear()


# --------------------------------------------------------------------------------------------
# Middleware and inspection routes
# --------------------------------------------------------------------------------------------

EFFECT = web.RequestKey("sim_effect", str)
ITEMS = web.RequestKey("sim_items", list)


def set_effect(request: web.Request, effect: str) -> None:
    """Handlers call this when a request changed state, so the log shows distinct effects."""
    request[EFFECT] = effect


def set_items(request: web.Request, items: list[dict[str, Any]]) -> None:
    """Bulk handlers call this with one result dict per item (each with its own ``effect``); the
    log keeps the same list, so results filled in later (asynchronous bulks) show there too."""
    request[ITEMS] = items


def make_middleware(log: RequestLog, faults: FaultPlan) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        path = request.path
        if path.startswith(SIM_PREFIX):
            return await handler(request)
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw.decode("utf-8", "replace")[:2000]
        entry = LoggedRequest(
            seq=log.next_seq(),
            at=time.time(),
            method=request.method,
            path=path,
            query=request.query_string,
            status=0,
            body=body,
        )
        rule = faults.pick(request.method, path)
        try:
            if rule is not None:
                entry.fault = rule.kind
                if rule.kind == "status":
                    entry.status = rule.status
                    log.add(entry)
                    return await _fault_response(request, rule.status)
                if rule.kind == "reset":
                    entry.status = -1
                    log.add(entry)
                    _drop(request)
                    return web.Response(status=499)
                if rule.kind == "timeout":
                    entry.status = -1
                    log.add(entry)
                    await asyncio.sleep((rule.latency_ms or 30_000) / 1000)
                    _drop(request)
                    return web.Response(status=499)
                if rule.kind == "latency":
                    await asyncio.sleep(rule.latency_ms / 1000)
            response = await handler(request)
            entry.status = response.status
        except web.HTTPException as exc:
            entry.status = exc.status
            entry.effect = request.get(EFFECT)
            entry.items = request.get(ITEMS)
            log.add(entry)
            raise
        entry.effect = request.get(EFFECT)
        entry.items = request.get(ITEMS)
        log.add(entry)
        return response

    async def _fault_response(request: web.Request, status: int) -> web.StreamResponse:
        fault_handler = request.app.get(FAULT_RESPONDER)
        if fault_handler is not None:
            return await fault_handler(request, status)
        return json_response({"message": f"simulated fault {status}"}, status=status)

    return middleware


FAULT_RESPONDER = web.AppKey("sim_fault_responder", object)


def _drop(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def inspection_routes(app: web.Application, log: RequestLog, faults: FaultPlan, reset: Callable[[], None]) -> None:
    """``/_sim/requests`` (GET, DELETE), ``/_sim/faults`` (GET, POST, DELETE), ``/_sim/reset``."""

    async def get_requests(request: web.Request) -> web.Response:
        since = int(request.query.get("since", "0"))
        method = request.query.get("method")
        path = request.query.get("path")  # regex
        rx = re.compile(path) if path else None
        rows = [
            e.as_dict()
            for e in log.entries
            if e.seq > since and (method is None or e.method == method) and (rx is None or rx.search(e.path))
        ]
        return json_response({"requests": rows, "count": len(rows)})

    async def delete_requests(_request: web.Request) -> web.Response:
        log.clear()
        return json_response({"cleared": True})

    async def get_faults(_request: web.Request) -> web.Response:
        return json_response({"faults": [r.as_dict() for r in faults.rules]})

    async def post_faults(request: web.Request) -> web.Response:
        try:
            spec = await request.json(loads=orjson.loads)
            specs = spec if isinstance(spec, list) else [spec]
            rules = [faults.add(**s) for s in specs]
        except (ValueError, TypeError, re.error) as exc:
            return json_response({"error": str(exc)}, status=400)
        return json_response({"faults": [r.as_dict() for r in rules]}, status=201)

    async def delete_faults(_request: web.Request) -> web.Response:
        faults.clear()
        return json_response({"cleared": True})

    async def post_reset(_request: web.Request) -> web.Response:
        reset()
        faults.clear()
        log.clear()
        return json_response({"reset": True})

    app.router.add_get(SIM_PREFIX + "requests", get_requests)
    app.router.add_delete(SIM_PREFIX + "requests", delete_requests)
    app.router.add_get(SIM_PREFIX + "faults", get_faults)
    app.router.add_post(SIM_PREFIX + "faults", post_faults)
    app.router.add_delete(SIM_PREFIX + "faults", delete_faults)
    app.router.add_post(SIM_PREFIX + "reset", post_reset)


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


class SimServer:
    """Runs an app on ``host:port`` (port 0 = any free port); ``base_url`` once started."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app, self.host, self.port = app, host, port
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> SimServer:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SimServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
