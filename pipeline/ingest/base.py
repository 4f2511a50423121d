"""What every ingest endpoint shares: webhook requests stored in Kafka before they are answered.

Every endpoint follows the same steps (:meth:`IngestApp.accept`):

1. authenticate (per-integration secret, compared in constant time; unknown integration 404,
   bad secret 401);
2. size-limit the body (256 KiB, 413) and parse it (400 naming the problem);
3. wrap it in the envelope with its deterministic id and schema-check it (400 naming the field
   and rule; nothing is published);
4. produce to the raw topic (``acks=all``, idempotent) and answer 202 **only after the broker
   acknowledged**. When the broker does not acknowledge in time: 503 with ``Retry-After`` —
   never a 2xx for an event that is not stored.

Routes: see :mod:`pipeline.ingest.cloudtalk` and :mod:`pipeline.ingest.kustomer`; plus
``/metrics``, ``/healthz``, ``/readyz``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from pipeline.core.config import PipelineConfig
from pipeline.core.envelope import Envelope
from pipeline.core.observability import get_logger, metrics
from pipeline.core.schemas import SchemaError
from pipeline.kafka.clients import durable_producer

log = get_logger(__name__)

MAX_BODY = 256 * 1024
CONFIG_KEY = web.AppKey("config", PipelineConfig)
INGEST_KEY = web.AppKey("ingest", object)


class BrokerUnavailable(Exception):
    pass


def problem(status: int, message: str, **extra: Any) -> web.Response:
    """A JSON error answer: ``{"error": message, ...extra}``."""
    return web.Response(status=status, content_type="application/json", body=orjson.dumps({"error": message, **extra}))


class Publisher:
    """The durable producer; started in the background so the service answers 503 (not
    connection refused) while the broker is unreachable."""

    def __init__(self, bootstrap: str, client_id: str, ack_timeout_s: float, retry_after_s: int) -> None:
        self.bootstrap, self.client_id = bootstrap, client_id
        self.ack_timeout_s, self.retry_after_s = ack_timeout_s, retry_after_s
        self.producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self.last_ack = 0.0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._connect())

    async def _connect(self) -> None:
        delay = 0.5
        while True:
            producer = durable_producer(self.bootstrap, self.client_id)
            try:
                await producer.start()
                self.producer = producer
                log.info("broker_connected", bootstrap=self.bootstrap)
                return
            except Exception as exc:  # noqa: BLE001 - retried until the broker answers
                log.warning("broker_unreachable", bootstrap=self.bootstrap, error=str(exc), retry_in_s=delay)
                try:
                    await producer.stop()
                except Exception:  # noqa: BLE001
                    pass
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    @property
    def connected(self) -> bool:
        return self.producer is not None

    async def publish(self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        """Return only once the broker acknowledged the record; else raise BrokerUnavailable."""
        if self.producer is None:
            raise BrokerUnavailable("not connected to the broker yet")
        try:
            future = await asyncio.wait_for(
                self.producer.send(topic, value=value, key=key, headers=headers), self.ack_timeout_s
            )
            await asyncio.wait_for(asyncio.shield(future), self.ack_timeout_s)
        except (TimeoutError, KafkaError) as exc:
            raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from None
        self.last_ack = time.monotonic()

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.producer is not None:
            await self.producer.stop()


class IngestApp:
    def __init__(self, config: PipelineConfig, publisher: Publisher, secrets: dict[str, str]) -> None:
        self.config, self.publisher, self.secrets = config, publisher, secrets
        m = metrics()
        self._requests = m.ingest_requests
        self._events_in = m.events_in
        self._ack = m.ingest_ack_seconds

    def count(self, endpoint: str, status: int) -> None:
        self._requests.labels(endpoint, str(status)).inc()

    async def read_json(self, request: web.Request, endpoint: str) -> Any:
        """The parsed body, or an HTTP error response raised as an exception."""
        if request.content_length is not None and request.content_length > MAX_BODY:
            self.count(endpoint, 413)
            raise web.HTTPRequestEntityTooLarge(
                max_size=MAX_BODY,
                actual_size=request.content_length,
                text=orjson.dumps({"error": f"body larger than {MAX_BODY} bytes"}).decode(),
                content_type="application/json",
            )
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self.count(endpoint, 413)
            raise
        try:
            return raw, orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            self.count(endpoint, 400)
            raise web.HTTPBadRequest(
                text=orjson.dumps({"error": f"body is not valid JSON: {exc}"}).decode(), content_type="application/json"
            ) from None

    async def accept(self, endpoint: str, topic: str, build: Callable[[], Envelope]) -> web.Response:
        """Steps 3 and 4: envelope + schema check, then publish and answer after the ack."""
        try:
            env = build()  # validates the payload against its schema
            data = env.to_dict()
            Envelope.from_dict(data, check=True, payload=False)
        except SchemaError as exc:
            self.count(endpoint, 400)
            return problem(400, str(exc), field=exc.field, rule=exc.rule)
        except (KeyError, TypeError, ValueError) as exc:
            self.count(endpoint, 400)
            return problem(400, f"cannot read the event: {exc}")
        started = time.perf_counter()
        try:
            await self.publisher.publish(
                topic, env.id.encode(), orjson.dumps(data), [("event_id", env.id.encode()), ("type", env.type.encode())]
            )
        except BrokerUnavailable as exc:
            self.count(endpoint, 503)
            log.warning("event_not_stored", endpoint=endpoint, event_id=env.id, error=str(exc))
            return web.Response(
                status=503,
                content_type="application/json",
                body=orjson.dumps({"error": "event not stored: the broker is unavailable"}),
                headers={"Retry-After": str(self.publisher.retry_after_s)},
            )
        self._ack.labels(endpoint).observe(time.perf_counter() - started)
        self._events_in.labels(env.source, env.type, env.via).inc()
        self.count(endpoint, 202)
        log.info("event_stored", endpoint=endpoint, event_id=env.id, integration=env.integration)
        return web.json_response({"accepted": env.id}, status=202)
