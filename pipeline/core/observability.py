"""Logs, metrics and health endpoints shared by every service.

* Logs are structlog JSON lines. Before rendering, every event passes :func:`mask_event`:
  values under secret-looking keys are replaced, phone numbers and e-mail addresses are masked
  wherever they appear (keys that name a number, and free text).
* :class:`Metrics` is the one metric catalogue of the product (documented in the README).
* :class:`HealthServer` serves ``/metrics``, ``/healthz`` and ``/readyz`` for a service.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import orjson
import structlog
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# --------------------------------------------------------------------------------------------
# Masking
# --------------------------------------------------------------------------------------------

_SECRET_KEY = re.compile(r"(secret|token|password|passwd|api[_-]?key|authorization|signature)", re.I)
_PHONE_KEY = re.compile(r"(phone|number|sender|recipient|msisdn|e164|caller|callee)", re.I)
_EMAIL = re.compile(r"([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*@([A-Za-z0-9.-]+\.[A-Za-z]{2,})")
_PLUS_PHONE = re.compile(r"(?<![\w+])\+\d[\d \-]{5,18}\d")
_DIGITS = re.compile(r"\d")
REDACTED = "[redacted]"


def mask_phone(value: str | int) -> str:
    """Keep the first three characters and the last two digits: ``+44*******23``."""
    text = str(value)
    digits = [i for i, ch in enumerate(text) if ch.isdigit()]
    if len(digits) < 5:
        return text
    keep = set(digits[:2] + digits[-2:])
    return "".join(ch if (not ch.isdigit() or i in keep) else "*" for i, ch in enumerate(text))


def mask_email(value: str) -> str:
    return _EMAIL.sub(lambda m: f"{m.group(1)}***@{m.group(2)}", value)


def mask_text(value: str) -> str:
    """Mask e-mails and ``+``-prefixed phone numbers inside free text."""
    if "@" in value:
        value = mask_email(value)
    if "+" in value:
        value = _PLUS_PHONE.sub(lambda m: mask_phone(m.group(0)), value)
    return value


def _mask_value(key: str | None, value: Any) -> Any:
    if key is not None and _SECRET_KEY.search(key):
        return REDACTED
    if isinstance(value, Mapping):
        return {k: _mask_value(str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mask_value(key, v) for v in value]
    if key is not None and _PHONE_KEY.search(key) and isinstance(value, (str, int)) and not isinstance(value, bool):
        return mask_phone(value) if len(_DIGITS.findall(str(value))) >= 7 else value
    if isinstance(value, str):
        return mask_text(value)
    return value


def mask_event(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: redact secrets, mask phones and e-mails everywhere."""
    return {k: _mask_value(k, v) for k, v in event_dict.items()}


def _orjson_dumps(obj: Any, default: Any = None) -> str:
    """Render a log event; logging never raises into the code that logs."""
    try:
        return orjson.dumps(obj, default=default or str, option=orjson.OPT_NON_STR_KEYS).decode()
    except (TypeError, orjson.JSONEncodeError) as exc:
        return orjson.dumps(
            {
                "event": str(obj.get("event", "?")) if isinstance(obj, dict) else "?",
                "log_error": f"unrenderable event: {exc}",
            }
        ).decode()


def configure_logging(service: str, level: str = "INFO", stream: Any = None) -> None:
    """JSON lines on stderr (or ``stream``), one per event, masked."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO), stream=stream or sys.stderr, format="%(message)s"
    )
    # Library chatter (aiokafka, aiohttp access logs) stays at WARNING unless asked for.
    for noisy in ("aiokafka", "aiohttp.access", "kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING if level.upper() != "DEBUG" else logging.DEBUG)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            mask_event,
            structlog.processors.JSONRenderer(serializer=_orjson_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(service=service)


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name) if name else structlog.get_logger()


# --------------------------------------------------------------------------------------------
# Metric catalogue
# --------------------------------------------------------------------------------------------

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)


class Metrics:
    """Every metric the product exports. One instance per process (see :func:`metrics`).

    Hot paths pre-bind label children (``.labels(...)`` once, then ``.inc()``).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry(auto_describe=True)
        # ingest
        self.events_in = Counter(
            "pipeline_events_in_total",
            "Raw events accepted and stored in Kafka",
            ["source", "type", "path"],
            registry=r,
        )
        self.ingest_requests = Counter(
            "pipeline_ingest_requests_total",
            "Webhook requests by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=r,
        )
        self.ingest_ack_seconds = Histogram(
            "pipeline_ingest_ack_seconds",
            "Webhook receipt to broker acknowledgement",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.poller_pages = Counter("pipeline_poller_pages_total", "Pages fetched by pollers", ["poller"], registry=r)
        # processors
        self.events_filtered = Counter(
            "pipeline_events_filtered_total",
            "Events an integration dropped, by rule",
            ["integration", "rule"],
            registry=r,
        )
        self.commands_out = Counter(
            "pipeline_commands_emitted_total", "Commands emitted by processors", ["target", "op"], registry=r
        )
        # sinks
        self.commands = Counter(
            "pipeline_commands_total", "Commands finished by sinks, by outcome", ["target", "op", "outcome"], registry=r
        )
        self.http_seconds = Histogram(
            "pipeline_http_request_seconds",
            "Target API request latency",
            ["target", "op", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.http_retries = Counter(
            "pipeline_http_retries_total", "Target API retries by reason", ["target", "reason"], registry=r
        )
        self.ratelimit_remaining = Gauge(
            "pipeline_ratelimit_remaining",
            "Requests left in the target's current window",
            ["target", "account"],
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "pipeline_end_to_end_seconds",
            "occurred_at of the event to effect done",
            ["flow"],
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.ledger_entries = Gauge(
            "pipeline_ledger_entries", "Ledger entries held for assigned partitions", ["topic"], registry=r
        )
        # every stage
        self.deadletters = Counter(
            "pipeline_deadletters_total", "Records sent to the dead-letter topic", ["stage", "reason"], registry=r
        )
        self.loop_records = Counter(
            "pipeline_loop_records_total", "Records through the transactional loop", ["stage", "outcome"], registry=r
        )
        self.loop_transactions = Counter(
            "pipeline_loop_transactions_total", "Kafka transactions by outcome", ["stage", "outcome"], registry=r
        )
        self.loop_batch_seconds = Histogram(
            "pipeline_loop_batch_seconds", "Batch handle + commit time", ["stage"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.consumer_lag = Gauge(
            "pipeline_consumer_lag",
            "High watermark minus position, per partition",
            ["group", "topic", "partition"],
            registry=r,
        )
        self.assigned_partitions = Gauge(
            "pipeline_assigned_partitions", "Partitions assigned to this member", ["group"], registry=r
        )


_METRICS: Metrics | None = None


def metrics() -> Metrics:
    global _METRICS
    if _METRICS is None:
        _METRICS = Metrics()
    return _METRICS


# --------------------------------------------------------------------------------------------
# Health server
# --------------------------------------------------------------------------------------------

ReadyCheck = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]


def add_health_routes(
    app: web.Application, ready: ReadyCheck | None = None, registry: CollectorRegistry | None = None
) -> None:
    """Mount /metrics, /healthz and /readyz on an existing aiohttp app."""

    async def metrics_view(_request: web.Request) -> web.Response:
        body = generate_latest(registry or metrics().registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_request: web.Request) -> web.Response:
        ok, detail = (True, {}) if ready is None else await ready()
        return web.Response(
            status=200 if ok else 503,
            content_type="application/json",
            body=orjson.dumps({"ready": ok, **detail}, default=str),
        )

    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


class HealthServer:
    """A small aiohttp server with only the health routes (for services that serve no API)."""

    def __init__(self, host: str, port: int, ready: ReadyCheck | None = None) -> None:
        self.host, self.port = host, port
        self.app = web.Application()
        add_health_routes(self.app, ready)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:  # report the port actually bound
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
