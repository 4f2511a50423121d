"""The ingest app without a broker: the real :class:`Publisher` over a fake producer that records
what the broker would have stored, and acknowledges now, later, never, or fails."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka.errors import KafkaConnectionError

from pipeline.ingest.app import build_app
from pipeline.ingest.base import IngestLimits, Publisher
from tests.unit.test_call_sms_rules import config, integration

SECRET = "shared-secret-for-tests"
TOKEN = "kustomer-webhook-token"
SECRETS = {"support": SECRET, "sales": "other-secret"}
TOKENS = {"support": TOKEN}
KUSTOMER_EVENT = {
    "id": "65f1d0c4e4b0a1b2c3d4e9aa",
    "name": "kustomer.customer.update",
    "createdAt": "2026-03-02T11:00:03.230Z",
    "data": {
        "type": "customer",
        "id": "65f1c0a2e4b0a1b2c3d4e5f6",
        "attributes": {
            "name": "Jana",
            "rev": 8,
            "updatedAt": "2026-03-02T11:00:03.207Z",
            "phones": [{"type": "mobile", "phone": "+421905123456"}],
        },
    },
}


def signature(raw: bytes, token: str = TOKEN) -> str:
    return hmac.new(token.encode(), raw, hashlib.sha256).hexdigest()


@dataclass
class Broker:
    """What the fake producers share: ``mode`` decides each send's fate — ``ack`` (stored now),
    ``hold`` (waits for :meth:`ack_held` / :meth:`fail_held`), ``fail`` (raises ``failure``);
    ``reachable`` False makes producers fail to start."""

    mode: str = "ack"
    failure: type[Exception] | None = None
    reachable: bool = True
    stored: list[tuple[str, bytes, bytes]] = field(default_factory=list)  # (topic, key, value)
    held: list[tuple[asyncio.Future[Any], tuple[str, bytes, bytes]]] = field(default_factory=list)
    producers: list[FakeProducer] = field(default_factory=list)

    def factory(self) -> FakeProducer:
        producer = FakeProducer(self)
        self.producers.append(producer)
        return producer

    def ack_held(self) -> None:
        for future, record in self.held:
            if not future.done():
                future.set_result(None)
                self.stored.append(record)
        self.held.clear()

    def keys(self) -> list[bytes]:
        return [key for _, key, _ in self.stored]


class FakeProducer:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.started = self.stopped = False

    async def start(self) -> None:
        if not self.broker.reachable:
            raise KafkaConnectionError("broker unreachable (fake)")
        self.started = True

    async def send(self, topic: str, value: bytes, key: bytes, headers: Any = None) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        record = (topic, key, value)
        if self.broker.mode == "ack":
            future.set_result(None)
            self.broker.stored.append(record)
        elif self.broker.mode == "fail":
            assert self.broker.failure is not None
            future.set_exception(self.broker.failure())
        else:
            self.broker.held.append((future, record))
        return future

    async def flush(self) -> None:
        await asyncio.gather(*(f for f, _ in self.broker.held), return_exceptions=True)

    async def stop(self) -> None:
        self.stopped = True


async def start_publisher(broker: Broker, **kw: Any) -> Publisher:
    kw.setdefault("ack_timeout_s", 0.5)
    kw.setdefault("retry_after_s", 7)
    kw.setdefault("reconnect_backoff_s", 0.1)
    publisher = Publisher("fake:9092", "test-ingest", factory=broker.factory, **kw)
    await publisher.start()
    for _ in range(100):
        if publisher.ready or not broker.reachable:
            break
        await asyncio.sleep(0.01)
    return publisher


def ingest_app(publisher: Publisher, limits: IngestLimits | None = None, guard: Any = None) -> Any:
    cfg = config(integration("support"), integration("sales"))
    return build_app(cfg, publisher, "t-", dict(SECRETS), dict(TOKENS), limits, guard)


def call_body(call_id: int = 1002409191, **over: Any) -> bytes:
    from tests.unit.test_envelope_schemas import CALL

    return orjson.dumps({**CALL, "call_id": call_id, **over})
