"""What every ingest endpoint shares: webhook requests stored in Kafka before they are answered.

Every endpoint follows the same steps:

1. **authenticate** on the raw bytes, before anything of the request is parsed: the CloudTalk
   secret header, or the Kustomer HMAC signature over the raw body. An unknown integration and a
   wrong secret get the same 401 with the same body, so integration names cannot be probed;
2. **limit** — requests in flight (503 + ``Retry-After``), the integration's request rate (429 +
   ``Retry-After``), the body's size (413) and the time to receive it (408);
3. **parse** the body strictly (:func:`parse_json`): valid UTF-8 JSON, nested at most
   :data:`MAX_DEPTH` levels, every number inside the signed 64-bit range (orjson would read a
   larger integer as a float, and two ids would become one) — else 400 naming the field;
4. wrap it in the envelope with its deterministic id and **schema-check** it (400 naming the field
   and rule; nothing is published);
5. **publish** to the raw topic (``acks=all``, idempotent) and answer 202 **only after the broker
   acknowledged**. While it cannot store: 503 with ``Retry-After`` — never a 2xx for an event that
   is not stored. A copy of an event whose earlier send is still waiting for its acknowledgement
   waits for that send instead of publishing again, and an event whose acknowledgement came after
   its sender was answered 503 is answered 202 without publishing again.

The producer (:class:`Publisher`) is rebuilt when it can no longer deliver — a send failed
(OutOfOrderSequenceNumber, UnknownProducerId, ProducerFenced, an expired batch: after any failed
batch the idempotent producer's sequence numbers have a gap and every later batch would fail), or
nothing was acknowledged for :data:`STALLED_AFTER_S` while records were waiting. ``/readyz`` is 503
from a failed or timed-out publish until the next acknowledgement or reconnection.

Routes: see :mod:`pipeline.ingest.cloudtalk` and :mod:`pipeline.ingest.kustomer`; plus
``/metrics``, ``/healthz``, ``/readyz``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiokafka import AIOKafkaProducer

from pipeline.core.config import PipelineConfig
from pipeline.core.envelope import Envelope, record_key
from pipeline.core.observability import get_logger, metrics
from pipeline.core.schemas import SchemaError
from pipeline.core.settings import env_float, env_int
from pipeline.kafka.clients import durable_producer, start_when_reachable, started, stop_quietly

log = get_logger(__name__)

MAX_BODY = 256 * 1024
MAX_DEPTH = 32  # nesting of a webhook body (the real ones need about 5)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_RECORD = 900 * 1024  # an envelope larger than this is refused (the producer and broker take up to 1 MiB)
STALLED_AFTER_S = 30.0  # records waiting and no acknowledgement for this long: replace the producer
RETIRE_S = 120.0  # how long a replaced producer may take to deliver or fail what it holds
CONFIG_KEY = web.AppKey("config", PipelineConfig)
INGEST_KEY = web.AppKey("ingest", object)


class BrokerUnavailable(Exception):
    pass


class BadRequest(Exception):
    """The request is refused with a 4xx that names what is wrong (``field``, ``rule``)."""

    def __init__(self, status: int, message: str, field: str = "", rule: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.rule = status, message, field, rule


class RateLimited(Exception):
    """429: the integration sends faster than ``INGEST_RATE_PER_S``."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"too many requests; retry after {retry_after_s} s")
        self.retry_after_s = max(1, retry_after_s)


def problem(status: int, message: str, *, headers: Mapping[str, str] | None = None, **extra: Any) -> web.Response:
    """A JSON error answer: ``{"error": message, ...extra}``."""
    body = {"error": message, **extra}
    try:
        raw = orjson.dumps(body)
    except orjson.JSONEncodeError:  # text from the request that is not valid Unicode
        raw = json.dumps(body, ensure_ascii=True, default=str).encode()
    return web.Response(status=status, content_type="application/json", body=raw, headers=headers)


def shown(value: Any, limit: int = 60) -> str:
    """A value from a request, for an error message: its repr (escaped), cut to ``limit``."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def refusal(exc: BadRequest) -> web.Response:
    if exc.field:
        return problem(exc.status, exc.message, field=exc.field, rule=exc.rule)
    return problem(exc.status, exc.message)


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IngestLimits:
    """What one ingest process accepts; each value is an environment variable (README)."""

    max_body: int = MAX_BODY  # INGEST_MAX_BODY_BYTES: larger bodies get 413
    max_in_flight: int = 256  # INGEST_MAX_IN_FLIGHT: requests being handled; beyond it 503
    max_connections: int = 1024  # INGEST_MAX_CONNECTIONS: open connections; beyond it closed at once
    header_timeout_s: float = 10.0  # INGEST_HEADER_TIMEOUT_S: to receive a request's head
    body_timeout_s: float = 10.0  # INGEST_BODY_TIMEOUT_S: to receive the body once the head is in; 408
    keepalive_timeout_s: float = 75.0  # INGEST_KEEPALIVE_TIMEOUT_S: idle connection between requests
    rate_per_s: float = 1000.0  # INGEST_RATE_PER_S: per integration; 0 = no limit; beyond it 429
    rate_burst: int = 2000  # INGEST_RATE_BURST: requests an integration may send at once
    max_depth: int = MAX_DEPTH  # JSON nesting; deeper bodies get 400

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> IngestLimits:
        env = os.environ if env is None else env
        return cls(
            max_body=env_int(env, "INGEST_MAX_BODY_BYTES", cls.max_body, minimum=1024),
            max_in_flight=env_int(env, "INGEST_MAX_IN_FLIGHT", cls.max_in_flight, minimum=1),
            max_connections=env_int(env, "INGEST_MAX_CONNECTIONS", cls.max_connections, minimum=1),
            header_timeout_s=env_float(env, "INGEST_HEADER_TIMEOUT_S", cls.header_timeout_s, minimum=0.1),
            body_timeout_s=env_float(env, "INGEST_BODY_TIMEOUT_S", cls.body_timeout_s, minimum=0.1),
            keepalive_timeout_s=env_float(env, "INGEST_KEEPALIVE_TIMEOUT_S", cls.keepalive_timeout_s, minimum=0.1),
            rate_per_s=env_float(env, "INGEST_RATE_PER_S", cls.rate_per_s, minimum=0),
            rate_burst=env_int(env, "INGEST_RATE_BURST", cls.rate_burst, minimum=1),
        )


# --------------------------------------------------------------------------------------------
# Strict JSON
# --------------------------------------------------------------------------------------------


Path = tuple[Any, str | int] | None  # (parent path, key): built into a field name only on error


def _field(path: Path) -> str:
    keys: list[str] = []
    while path is not None:
        path, key = path
        keys.append(str(key))
    return ".".join(["payload", *reversed(keys)])


def _refuse(path: Path, problem: str, rule: str) -> BadRequest:
    field = _field(path)
    return BadRequest(400, f"{field}: {problem} (rule: {rule})", field, rule)


def parse_json(raw: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """The body as JSON, or :class:`BadRequest` (400) naming the field: not UTF-8 JSON, nested
    deeper than ``max_depth``, or a number outside the signed 64-bit range. orjson reads an integer
    beyond 64 bits as a float (10^30 and 10^30+1 become the same float), so such numbers are refused
    here, before any id is derived from them; a float literal that large is refused too."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(400, f"body is not valid JSON: {exc}", "payload", "json") from None
    containers = (dict, list)
    numbers = (int, float)
    # iterative (no recursion to exhaust); only containers and numbers need a look
    stack: list[tuple[Any, int, Path]] = [(data, 1, None)]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, containers):
            if depth > max_depth:
                raise _refuse(path, f"nested deeper than {max_depth} levels", "depth")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend(
                (v, depth + 1, (path, k)) for k, v in items if isinstance(v, containers) or isinstance(v, numbers)
            )
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int):
            if not INT64_MIN <= value <= INT64_MAX:
                raise _refuse(path, "integer outside the signed 64-bit range", "int64")
        elif isinstance(value, float) and not (math.isfinite(value) and -(2.0**63) < value < 2.0**63):
            # an integer literal beyond 64 bits arrives here as a float
            raise _refuse(path, "number outside the signed 64-bit range", "int64")
    return data


def json_object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise BadRequest(400, "payload: must be a JSON object (rule: type)", "payload", "type")
    return data


# --------------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------------


class RateLimiter:
    """A token bucket per key (an integration's name): ``rate`` requests per second on average,
    ``burst`` at once. Only configured integrations get a bucket, so its memory is bounded."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str) -> float:
        """0 when the request may go ahead, else the seconds until it could."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate


class RecentKeys:
    """A bounded set that forgets the oldest key first."""

    def __init__(self, size: int) -> None:
        self.size, self._keys = size, OrderedDict[str, None]()

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def add(self, key: str) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)
        if len(self._keys) > self.size:
            self._keys.popitem(last=False)


def header_bytes(request: web.BaseRequest, name: str) -> bytes | None:
    """A header's raw bytes as they came (None when absent, or given more than once): secrets and
    signatures are compared as bytes, so no header text is ever decoded to check them."""
    wanted = name.lower().encode()
    found = [value for key, value in request.raw_headers if key.lower() == wanted]
    return found[0] if len(found) == 1 else None


# --------------------------------------------------------------------------------------------
# The producer
# --------------------------------------------------------------------------------------------


class Publisher:
    """The durable producer, connected in the background so the service answers 503 (not
    connection refused) while the broker is unreachable, and replaced when it can no longer
    deliver (module docstring). ``ready`` is what ``/readyz`` says."""

    def __init__(
        self,
        bootstrap: str,
        client_id: str,
        ack_timeout_s: float,
        retry_after_s: int,
        *,
        max_pending: int = 256,
        reconnect_backoff_s: float = 2.0,
        stalled_after_s: float = STALLED_AFTER_S,
        factory: Callable[[], AIOKafkaProducer] | None = None,
    ) -> None:
        self.bootstrap, self.client_id = bootstrap, client_id
        self.ack_timeout_s, self.retry_after_s = ack_timeout_s, retry_after_s
        self.max_pending, self.reconnect_backoff_s, self.stalled_after_s = (
            max_pending,
            reconnect_backoff_s,
            stalled_after_s,
        )
        self.factory = factory or (lambda: durable_producer(bootstrap, client_id))
        self.producer: AIOKafkaProducer | None = None
        self.healthy = False  # the last send was acknowledged (or the producer just connected)
        self.problem = "connecting to the broker"
        self.pending = 0  # records sent and not yet acknowledged or failed
        self.rebuilds = 0
        self.last_ack = 0.0
        # an error that is not an outage (the broker refused the login or the certificate): the
        # service stops with it instead of answering 503 for ever
        self.fatal: Exception | None = None
        self.failed = asyncio.Event()
        self._progress = time.monotonic()  # last acknowledgement, or when records started waiting
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Future[Any]] = set()
        self._retiring: set[asyncio.Future[Any]] = set()
        self._waiting: dict[AIOKafkaProducer, set[asyncio.Future[None]]] = {}  # our futures per producer

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._spawn(self._connect())
        self._spawn(self._watch())

    def _spawn(self, coro: Awaitable[Any], retiring: bool = False) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if retiring:
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _connect(self) -> None:
        try:
            producer = await start_when_reachable(
                lambda: started(self.factory()),
                bootstrap=self.bootstrap,
                what="ingest producer",
                stopping=self._stopping,
                backoff_max_s=self.reconnect_backoff_s,
            )
        except Exception as exc:  # noqa: BLE001 - not an outage (start_when_reachable waits those out)
            self.fatal, self.problem = exc, f"{type(exc).__name__}: {exc}"
            log.error("broker_refused", bootstrap=self.bootstrap, error=self.problem)
            self.failed.set()
            return
        if producer is None:  # asked to stop first
            return
        self.producer, self.healthy, self.problem = producer, True, ""
        self._progress = time.monotonic()
        log.info("broker_connected", bootstrap=self.bootstrap, rebuilds=self.rebuilds)

    async def _watch(self) -> None:
        """Replace a producer that holds records and has had no acknowledgement for too long."""
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), 1.0)
            except TimeoutError:
                pass
            producer = self.producer
            waiting = self._waiting.get(producer) if producer is not None else None
            if producer is not None and waiting and time.monotonic() - self._progress > self.stalled_after_s:
                self._replace(producer, f"no acknowledgement for {self.stalled_after_s:g} s")

    def _replace(self, producer: AIOKafkaProducer, reason: str) -> None:
        """Stop using ``producer`` (if it is still the current one) and connect a new one."""
        if producer is not self.producer or self._stopping.is_set():
            return
        self.producer, self.healthy, self.problem = None, False, reason
        self.rebuilds += 1
        log.warning("producer_replaced", reason=reason, rebuilds=self.rebuilds)
        self._spawn(self._retire(producer, reason), retiring=True)
        self._spawn(self._connect())

    async def _retire(self, producer: AIOKafkaProducer, reason: str) -> None:
        """Close a replaced producer. aiokafka's ``stop`` first delivers or fails what it still
        holds, which needs the broker: a record it delivers when the broker is back still counts
        (a copy sent meanwhile waits for it, see IngestApp.accept), so nothing is stored twice.
        What is still waiting after ``RETIRE_S`` fails, and its senders send it again."""
        try:
            await asyncio.wait_for(stop_quietly(producer), RETIRE_S)
        except TimeoutError:
            log.warning("producer_stop_timed_out", after_s=RETIRE_S)
        finally:
            for waiting in list(self._waiting.pop(producer, ())):
                self._resolve(waiting, BrokerUnavailable(f"the producer was replaced: {reason}"))

    async def stop(self) -> None:
        """Give the records in flight ``ack_timeout_s`` to be acknowledged, then close — without
        waiting for a broker that is away."""
        self._stopping.set()
        for task in list(self._retiring):
            task.cancel()
        producer, self.producer = self.producer, None
        if producer is not None:
            try:
                await asyncio.wait_for(producer.flush(), self.ack_timeout_s)
            except Exception:  # noqa: BLE001 - TimeoutError, or the producer failed
                pass
            try:
                await asyncio.wait_for(stop_quietly(producer), self.ack_timeout_s)
            except TimeoutError:
                log.warning("producer_stop_timed_out", after_s=self.ack_timeout_s)
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- state -------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self.producer is not None

    @property
    def ready(self) -> bool:
        return self.producer is not None and self.healthy

    def readiness(self) -> dict[str, Any]:
        state = "ready" if self.ready else "reconnecting" if self.producer is None else "failing"
        return {"broker": state, "problem": self.problem or None, "pending": self.pending, "rebuilds": self.rebuilds}

    # -- sending -----------------------------------------------------------------------------
    async def send(self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> asyncio.Future[Any]:
        """Hand a record to the producer; the future resolves when the broker acknowledged it.
        Raises BrokerUnavailable when it cannot be handed over now."""
        producer = self.producer
        if producer is None:
            raise BrokerUnavailable(self.problem or "not connected to the broker")
        if self.pending >= self.max_pending:
            raise BrokerUnavailable(f"{self.pending} records are waiting for the broker's acknowledgement")
        try:
            record = await asyncio.wait_for(
                producer.send(topic, value=value, key=key, headers=headers), self.ack_timeout_s
            )
        except Exception as exc:  # noqa: BLE001 - TimeoutError (no metadata), KafkaError, closed producer
            reason = f"{type(exc).__name__}: {exc}"
            self._replace(producer, reason)
            raise BrokerUnavailable(reason) from None
        waiting = self._waiting.setdefault(producer, set())
        if not waiting:
            self._progress = time.monotonic()
        ours: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting.add(ours)
        self.pending += 1
        record.add_done_callback(lambda f: self._settled(producer, ours, f))
        return ours

    def _resolve(self, ours: asyncio.Future[None], exc: BaseException | None) -> bool:
        """Settle one of our futures once; False when it was settled already."""
        if ours.done():
            return False
        if exc is None:
            ours.set_result(None)
        else:
            ours.set_exception(exc)
        self.pending -= 1
        return True

    def _settled(self, producer: AIOKafkaProducer, ours: asyncio.Future[None], record: asyncio.Future[Any]) -> None:
        exc = BrokerUnavailable("the send was cancelled") if record.cancelled() else record.exception()
        self._waiting.get(producer, set()).discard(ours)
        if not self._resolve(ours, exc) or producer is not self.producer:
            return  # a replaced producer's outcomes say nothing about the current one
        if exc is None:
            self.healthy, self.problem = True, ""
            self._progress = self.last_ack = time.monotonic()
            return
        # a failed batch leaves a gap in the idempotent producer's sequence numbers: every later
        # batch would fail with OutOfOrderSequenceNumber, so the producer is replaced
        self._replace(producer, f"{type(exc).__name__}: {exc}")

    async def wait(self, future: asyncio.Future[Any]) -> None:
        """Return once ``future`` (a send, or a task around one) is acknowledged; else raise
        BrokerUnavailable — after at most the ack timeout."""
        try:
            await asyncio.wait_for(asyncio.shield(future), self.ack_timeout_s)
        except TimeoutError:
            if self.producer is not None:
                self.healthy = False
                self.problem = f"no acknowledgement within {self.ack_timeout_s:g} s"
            raise BrokerUnavailable(f"no acknowledgement within {self.ack_timeout_s:g} s") from None
        except BrokerUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - KafkaError and what a replaced producer fails with
            raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from None

    async def publish(self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        """Return only once the broker acknowledged the record; else raise BrokerUnavailable."""
        await self.wait(await self.send(topic, key, value, headers))


# --------------------------------------------------------------------------------------------
# The endpoints' common steps
# --------------------------------------------------------------------------------------------


class IngestApp:
    def __init__(
        self,
        config: PipelineConfig,
        publisher: Publisher,
        secrets: dict[str, str],
        limits: IngestLimits | None = None,
    ) -> None:
        self.config, self.publisher, self.secrets = config, publisher, secrets
        self.limits = limits or IngestLimits()
        self.rate = RateLimiter(self.limits.rate_per_s, self.limits.rate_burst)
        self.in_flight = 0
        self._sending: dict[str, asyncio.Future[Any]] = {}  # dedup key -> its send, until acknowledged or failed
        self._in_doubt: set[str] = set()  # keys of sends whose request was answered 503 while they waited
        self._stored_late = RecentKeys(10_000)  # keys acknowledged after their request was answered 503
        m = metrics()
        self._requests = m.ingest_requests
        self._events_in = m.events_in
        self._ack = m.ingest_ack_seconds

    def count(self, endpoint: str, status: int) -> None:
        self._requests.labels(endpoint, str(status)).inc()

    def unavailable(self, endpoint: str, message: str) -> web.Response:
        self.count(endpoint, 503)
        return problem(503, message, headers={"Retry-After": str(self.publisher.retry_after_s)})

    def check_rate(self, integration: str) -> None:
        """429 with Retry-After when the (authenticated) integration sends faster than allowed."""
        wait = self.rate.take(integration)
        if wait > 0:
            raise RateLimited(math.ceil(wait))

    async def read_body(self, request: web.Request) -> bytes:
        """The raw body within the size and time limits, or BadRequest (413, 408, 400)."""
        limit = self.limits.max_body
        if request.content_length is not None and request.content_length > limit:
            raise BadRequest(413, f"body larger than {limit} bytes")
        try:
            return await asyncio.wait_for(request.read(), self.limits.body_timeout_s)
        except web.HTTPRequestEntityTooLarge:
            raise BadRequest(413, f"body larger than {limit} bytes") from None
        except TimeoutError:
            raise BadRequest(408, f"body not received within {self.limits.body_timeout_s:g} s") from None
        except web.HTTPException:
            raise
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - a body aiohttp cannot decode (bad chunking, gzip)
            raise BadRequest(400, f"body could not be read: {type(exc).__name__}", "body", "encoding") from None

    async def accept(self, endpoint: str, topic: str, build: Callable[[], Envelope]) -> web.Response:
        """Envelope + schema check, then publish and answer after the ack."""
        try:
            env = build()  # validates the payload against its schema
            data = env.to_dict()
            Envelope.from_dict(data, check=True, payload=False)
            value = orjson.dumps(data)
        except SchemaError as exc:
            self.count(endpoint, 400)
            return problem(400, str(exc), field=exc.field, rule=exc.rule)
        except (KeyError, TypeError, ValueError) as exc:  # orjson.JSONEncodeError is a TypeError
            self.count(endpoint, 400)
            return problem(400, f"cannot read the event: {type(exc).__name__}: {exc}")
        if len(value) > MAX_RECORD:  # numbers can grow when written back (1e15 -> 1000000000000000.0)
            self.count(endpoint, 413)
            return problem(413, f"the event is larger than {MAX_RECORD} bytes as a record")
        key = f"{topic}\0{env.integration}\0{env.id}"
        if key in self._stored_late:
            return self._stored(endpoint, env, 0.0, again=True)
        started = time.perf_counter()
        future = self._sending.get(key)
        if future is None:  # else: an earlier copy's send is still waiting; wait for it too
            future = asyncio.ensure_future(self._store(topic, env, value))
            self._sending[key] = future
            future.add_done_callback(lambda f: self._sent(key, f))
        try:
            await self.publisher.wait(future)
        except BrokerUnavailable as exc:
            if not future.done():
                self._in_doubt.add(key)
            log.warning("event_not_stored", endpoint=endpoint, event_id=env.id, error=str(exc))
            return self.unavailable(endpoint, "event not stored: the broker is unavailable")
        return self._stored(endpoint, env, time.perf_counter() - started)

    async def _store(self, topic: str, env: Envelope, value: bytes) -> None:
        ack = await self.publisher.send(
            topic, record_key(env.id), value, [("event_id", env.id.encode()), ("type", env.type.encode())]
        )
        await ack

    def _sent(self, key: str, future: asyncio.Future[Any]) -> None:
        if self._sending.get(key) is future:
            del self._sending[key]
        stored = not future.cancelled() and future.exception() is None  # (retrieves the exception)
        if key in self._in_doubt:
            self._in_doubt.discard(key)
            if stored:
                self._stored_late.add(key)  # its sender was told 503 and will send it again

    def _stored(self, endpoint: str, env: Envelope, ack_s: float, again: bool = False) -> web.Response:
        if not again:
            self._ack.labels(endpoint).observe(ack_s)
            self._events_in.labels(env.source, env.type, env.via).inc()
        self.count(endpoint, 202)
        # per event at DEBUG only: pipeline_events_in_total{source,type,path} counts what was
        # stored, pipeline_ingest_requests_total{endpoint,status} every answer
        log.debug("event_stored", endpoint=endpoint, event_id=env.id, integration=env.integration, again=again)
        return web.json_response({"accepted": env.id}, status=202)
