"""Ingest without a broker (the real app and Publisher over a fake producer): authentication first
and on raw bytes, strict JSON, the limits, and the producer replaced when it can no longer deliver."""

from __future__ import annotations

import asyncio
import copy
import time

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.errors import KafkaTimeoutError, OutOfOrderSequenceNumber, ProducerFenced, UnknownProducerId

from pipeline.core.envelope import call_event_id, exact_id
from pipeline.core.schemas import SchemaError
from pipeline.ingest.app import ConnectionGuard, IngestServer
from pipeline.ingest.base import BadRequest, IngestLimits, RateLimiter, parse_json
from tests.unit.ingest_fakes import (
    KUSTOMER_EVENT,
    SECRET,
    Broker,
    call_body,
    ingest_app,
    signature,
    start_publisher,
)

CALL_PATH = "/ingest/cloudtalk/support/call-ended"
GOOD = {"X-Pipeline-Secret": SECRET, "Content-Type": "application/json"}


@pytest.fixture
async def broker():
    return Broker()


async def client_for(broker: Broker, limits: IngestLimits | None = None, **publisher_kw) -> TestClient:
    publisher = await start_publisher(broker, **publisher_kw)
    client = TestClient(TestServer(ingest_app(publisher, limits)))
    await client.start_server()
    client.publisher = publisher  # type: ignore[attr-defined]
    return client


async def close(client: TestClient) -> None:
    await client.close()
    await client.publisher.stop()  # type: ignore[attr-defined]


async def raw_http(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes as they are (headers aiohttp's client would refuse) and read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def post_bytes(path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    head = [b"POST " + path.encode() + b" HTTP/1.1", b"Host: ingest", b"Connection: close"]
    head += [k + b": " + v for k, v in headers]
    head.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(head) + b"\r\n\r\n" + body


# --- strict JSON and exact ids ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "field", "rule"),
    [
        (b'{"call_id": 1000000000000000000000000000000}', "payload.call_id", "int64"),
        (b'{"call_id": 9223372036854775808}', "payload.call_id", "int64"),
        (b'{"a": [1, -9223372036854775809]}', "payload.a.1", "int64"),
        (b'{"a": {"b": 1e300}}', "payload.a.b", "int64"),
        (b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}", "payload.a." + ".".join(["0"] * 31), "depth"),
        (b"[" * 5000 + b"]" * 5000, "payload", "json"),  # orjson's own recursion limit
        (b'{"a": "\\ud800"}', "payload", "json"),  # a lone surrogate
        (b"\xff\xfe{}", "payload", "json"),
        (b"", "payload", "json"),
    ],
)
def test_parse_json_refuses_what_cannot_be_stored_exactly_and_names_the_field(raw, field, rule):
    with pytest.raises(BadRequest) as err:
        parse_json(raw)
    assert (err.value.status, err.value.field, err.value.rule) == (400, field, rule), err.value.message


def test_parse_json_keeps_every_64_bit_integer_exact():
    raw = b'{"max": 9223372036854775807, "min": -9223372036854775808, "f": 1.5, "deep": ' + b"[" * 31 + b"]" * 31 + b"}"
    data = parse_json(raw)
    assert data["max"] == 2**63 - 1 and data["min"] == -(2**63) and isinstance(data["max"], int)


@pytest.mark.parametrize("value", [1.0, 1e30, True, "12a", "１２", "-1", 2**63, None, [1]])
def test_exact_id_refuses_anything_but_an_integer_or_ascii_digits(value):
    with pytest.raises(SchemaError) as err:
        exact_id(value, "payload.call_id")
    assert err.value.field == "payload.call_id"


def test_ids_of_different_large_calls_never_collide():
    assert call_event_id(2**63 - 1) != call_event_id(2**63 - 2)
    with pytest.raises(SchemaError):
        call_event_id(10**30)


# --- authentication first, on raw bytes -------------------------------------------------------


async def test_unknown_integration_and_wrong_secret_get_the_same_401(broker):
    client = await client_for(broker)
    try:
        answers = []
        for path, headers in [
            (CALL_PATH, {"X-Pipeline-Secret": "wrong"}),
            (CALL_PATH, {}),
            ("/ingest/cloudtalk/nobody/call-ended", {"X-Pipeline-Secret": SECRET}),
            ("/ingest/cloudtalk/nobody/call-ended", {}),
        ]:
            r = await client.post(path, data=call_body(), headers=headers)
            answers.append((r.status, await r.read()))
        assert len(set(answers)) == 1 and answers[0][0] == 401, answers
        raw = orjson.dumps(KUSTOMER_EVENT)
        kustomer = []
        for path, sig in [
            ("/ingest/kustomer/support", "0" * 64),
            ("/ingest/kustomer/sales", signature(raw)),  # no webhook token configured
            ("/ingest/kustomer/nobody", signature(raw)),
            ("/ingest/kustomer/support", None),
        ]:
            headers = {"X-Kustomer-Webhook-Signature": sig} if sig else {}
            r = await client.post(path, data=raw, headers=headers)
            kustomer.append((r.status, await r.read()))
        assert len(set(kustomer)) == 1 and kustomer[0][0] == 401, kustomer
        assert broker.stored == []
    finally:
        await close(client)


async def test_the_kustomer_signature_is_checked_before_the_body_is_parsed(broker):
    client = await client_for(broker)
    try:
        junk = b'{"name": ["not", "json"'
        r = await client.post("/ingest/kustomer/support", data=junk, headers={"X-Kustomer-Webhook-Signature": "0" * 64})
        assert r.status == 401  # not 400: nothing of an unauthenticated body is looked at
        r = await client.post(
            "/ingest/kustomer/support", data=junk, headers={"X-Kustomer-Webhook-Signature": signature(junk)}
        )
        assert r.status == 400 and (await r.json())["rule"] == "json"
        raw = orjson.dumps(KUSTOMER_EVENT)
        upper = signature(raw).upper()
        r = await client.post("/ingest/kustomer/support", data=raw, headers={"X-Kustomer-Webhook-Signature": upper})
        assert r.status == 202
        assert broker.keys() == [b"kustomer:customer:65f1c0a2e4b0a1b2c3d4e5f6:8"]
    finally:
        await close(client)


async def test_header_bytes_that_are_not_utf8_are_refused_never_a_500(broker):
    client = await client_for(broker)
    port = client.server.port
    try:
        for name in (b"X-Pipeline-Secret", b"X-Kustomer-Webhook-Signature"):
            for value in (b"\xff\xfe\xfd", SECRET.encode() + b"\xc3", b"\xed\xa0\x80", b"\x80" * 64):
                for path in (CALL_PATH, "/ingest/kustomer/support", "/ingest/cloudtalk/nobody/sms"):
                    answer = await raw_http(port, post_bytes(path, [(name, value)], call_body()))
                    assert status_of(answer) == 401, answer
        raw = orjson.dumps({k: v for k, v in KUSTOMER_EVENT.items() if k != "name"})
        answer = await raw_http(
            port,
            post_bytes(
                "/ingest/kustomer/support",
                [
                    (b"X-Kustomer-Webhook-Signature", signature(raw).encode()),
                    (b"X-Kustomer-Webhook-Event", b"\xffcustomer"),
                ],
                raw,
            ),
        )
        assert status_of(answer) == 400 and b"X-Kustomer-Webhook-Event" in answer, answer
        assert broker.stored == []
    finally:
        await close(client)


# --- malformed bodies and types -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (CALL_PATH, b"{}", "payload.event"),
        (CALL_PATH, b'{"event": []}', "payload.event"),
        ("/ingest/cloudtalk/support/sms", b'{"event": {}}', "payload.event"),
        ("/ingest/cloudtalk/support/contact", b"[]", "payload"),
        (CALL_PATH, b"null", "payload"),
        (
            CALL_PATH,
            call_body(call_id=1).replace(b'"call_id":1', b'"call_id":1000000000000000000000000000000'),
            "payload.call_id",
        ),
        (
            CALL_PATH,
            call_body(call_id=1).replace(b'"call_id":1', b'"call_id":1000000000000000000000000000001'),
            "payload.call_id",
        ),
        (CALL_PATH, call_body(call_id=1).replace(b'"call_id":1', b'"call_id":1.0'), "payload.call_id"),
        (
            CALL_PATH,
            call_body(call_notes=[[[[["x"]]]]] * 2).replace(b'["x"]', b"[" * 300 + b"]" * 300),
            "payload.call_notes",
        ),
    ],
)
async def test_malformed_cloudtalk_bodies_are_a_400_naming_the_field(broker, path, body, field):
    client = await client_for(broker)
    try:
        r = await client.post(path, data=body, headers=GOOD)
        answer = await r.json()
        assert r.status == 400, answer
        assert answer["field"].startswith(field), answer
        assert broker.stored == []
    finally:
        await close(client)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": ["kustomer.customer.update"]}, "payload.name"),
        ({"name": {"x": 1}}, "payload.name"),
        ({"id": ["a"]}, "payload.id"),
        ({"createdAt": {"a": 1}}, "payload.createdAt"),
        ({"data": {"type": "customer", "id": ["65f1c0a2e4b0a1b2c3d4e5f6"], "attributes": {}}}, "payload.data.id"),
        (
            {"data": {"type": "customer", "id": "65f1c0a2e4b0a1b2c3d4e5f6", "attributes": {"rev": 8.0}}},
            "payload.data.attributes.rev",
        ),
        ({"data": {"type": "customer", "id": "65f1c0a2e4b0a1b2c3d4e5f6", "attributes": []}}, "payload.data.attributes"),
    ],
)
async def test_a_signed_kustomer_body_with_a_wrong_type_is_a_400_naming_the_field(broker, change, field):
    client = await client_for(broker)
    try:
        raw = orjson.dumps({**KUSTOMER_EVENT, **change})
        r = await client.post(
            "/ingest/kustomer/support", data=raw, headers={"X-Kustomer-Webhook-Signature": signature(raw)}
        )
        answer = await r.json()
        assert r.status == 400 and answer["field"] == field, answer
        assert broker.stored == []
    finally:
        await close(client)


# --- limits --------------------------------------------------------------------------------------


def test_rate_limiter_allows_a_burst_then_the_rate():
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)
    assert limiter.take("b") == 0.0  # per integration
    now[0] = 0.5
    assert limiter.take("a") == 0.0 and limiter.take("a") > 0


async def test_an_integration_over_its_rate_gets_429_with_retry_after_and_others_go_on(broker):
    client = await client_for(broker, IngestLimits(rate_per_s=0.5, rate_burst=3))
    try:
        for _ in range(5):  # unauthenticated requests spend nothing of the integration's budget
            assert (await client.post(CALL_PATH, data=call_body(), headers={"X-Pipeline-Secret": "x"})).status == 401
        statuses = [(await client.post(CALL_PATH, data=call_body(i), headers=GOOD)).status for i in range(1, 5)]
        assert statuses == [202, 202, 202, 429]
        r = await client.post(CALL_PATH, data=call_body(9), headers=GOOD)
        assert (
            r.status == 429 and int(r.headers["Retry-After"]) >= 1 and "too many requests" in (await r.json())["error"]
        )
        other = await client.post(
            "/ingest/cloudtalk/sales/call-ended", data=call_body(10), headers={"X-Pipeline-Secret": "other-secret"}
        )
        assert other.status == 202
        assert len(broker.stored) == 4
    finally:
        await close(client)


async def test_requests_beyond_the_in_flight_limit_get_503_at_once(broker):
    broker.mode = "hold"
    client = await client_for(broker, IngestLimits(max_in_flight=2), ack_timeout_s=5.0)
    try:
        first = [asyncio.create_task(client.post(CALL_PATH, data=call_body(i), headers=GOOD)) for i in (1, 2)]
        while len(broker.held) < 2:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        r = await client.post(CALL_PATH, data=call_body(3), headers=GOOD)
        assert r.status == 503 and r.headers["Retry-After"] == "7" and time.monotonic() - started < 1
        assert "in flight" in (await r.json())["error"]
        health = await client.get("/healthz")
        assert health.status == 200  # health is never counted
        broker.ack_held()
        assert [(await t).status for t in first] == [202, 202]
        assert len(broker.stored) == 2
    finally:
        await close(client)


async def test_a_body_that_arrives_too_slowly_gets_408(broker):
    client = await client_for(broker, IngestLimits(body_timeout_s=0.5))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
        body = call_body()
        head = post_bytes(CALL_PATH, [(b"X-Pipeline-Secret", SECRET.encode())], body)[: -len(body)]
        writer.write(head + body[:10])
        await writer.drain()
        started = time.monotonic()
        answer = await asyncio.wait_for(reader.readuntil(b"}"), 5)
        writer.close()
        assert status_of(answer) == 408 and b"not received within" in answer
        assert 0.4 < time.monotonic() - started < 3
        assert broker.stored == []
    finally:
        await close(client)


async def test_a_body_over_the_size_limit_is_a_413_declared_or_chunked(broker):
    client = await client_for(broker, IngestLimits(max_body=4096))
    try:
        big = call_body(call_notes=["x" * 5000])
        r = await client.post(CALL_PATH, data=big, headers=GOOD)
        assert r.status == 413 and "larger than 4096" in (await r.json())["error"]

        async def chunks():
            yield big[:3000]
            yield big[3000:]

        r = await client.post(CALL_PATH, data=chunks(), headers=GOOD)
        assert r.status == 413
        assert broker.stored == []
    finally:
        await close(client)


async def test_a_body_that_grows_past_the_record_limit_when_stored_is_a_413(broker):
    """Numbers are written back in orjson's form: ``1e15`` (4 bytes) becomes ``1000000000000000.0``."""
    client = await client_for(broker)
    try:
        event = copy.deepcopy(KUSTOMER_EVENT)
        event["data"]["attributes"]["custom"] = "@"
        raw = orjson.dumps(event).replace(b'"@"', b"[" + b",".join([b"1e15"] * 50_000) + b"]")
        assert len(raw) < 256 * 1024
        r = await client.post(
            "/ingest/kustomer/support", data=raw, headers={"X-Kustomer-Webhook-Signature": signature(raw)}
        )
        assert r.status == 413 and "as a record" in (await r.json())["error"]
        assert broker.stored == [] and client.publisher.ready  # type: ignore[attr-defined] - the producer is untouched
    finally:
        await close(client)


async def test_connections_are_limited_and_a_late_head_closes_its_connection(broker):
    limits = IngestLimits(max_connections=3, header_timeout_s=0.5, keepalive_timeout_s=1.0)
    publisher = await start_publisher(broker)
    guard = ConnectionGuard(limits)
    server = IngestServer(ingest_app(publisher, limits, guard), limits, guard)
    await server.start("127.0.0.1", 0)
    try:
        loop = asyncio.get_running_loop()
        idle = await asyncio.open_connection("127.0.0.1", server.port)  # sends nothing
        slow = await asyncio.open_connection("127.0.0.1", server.port)  # a head one byte at a time
        kept = await asyncio.open_connection("127.0.0.1", server.port)  # a request, then idle
        body = call_body()
        kept[1].write(
            post_bytes(CALL_PATH, [(b"X-Pipeline-Secret", SECRET.encode())], body).replace(
                b"Connection: close", b"Connection: keep-alive"
            )
        )
        first = await asyncio.wait_for(kept[0].readuntil(b'"}'), 5)
        assert status_of(first) == 202
        while guard.open < 3:
            await asyncio.sleep(0.01)
        extra = await asyncio.open_connection("127.0.0.1", server.port)
        assert await asyncio.wait_for(extra[0].read(), 2) == b""  # over the limit: closed at once
        assert guard.refused == 1
        started = loop.time()
        for byte in b"POST /ingest/cloudtalk/support/call-ended HTTP/1.1\r\nHost: x\r\n":
            slow[1].write(bytes([byte]))
            if slow[1].is_closing() or slow[0].at_eof():
                break
            await asyncio.sleep(0.05)
            if loop.time() - started > 3:
                break
        assert await asyncio.wait_for(idle[0].read(), 3) == b""
        assert await asyncio.wait_for(slow[0].read(), 3) == b""
        assert loop.time() - started < 2.5
        assert await asyncio.wait_for(kept[0].read(), 3) == b""  # closed after the keep-alive timeout
        assert guard.timed_out >= 2
        while guard.open:
            await asyncio.sleep(0.01)
        for _, writer in (idle, slow, kept, extra):
            writer.close()
    finally:
        await server.stop()
        await publisher.stop()


# --- the producer -----------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", [OutOfOrderSequenceNumber, UnknownProducerId, ProducerFenced, KafkaTimeoutError])
async def test_a_failed_send_replaces_the_producer_and_readyz_follows(broker, failure):
    client = await client_for(broker)
    try:
        assert (await client.post(CALL_PATH, data=call_body(1), headers=GOOD)).status == 202
        broker.mode, broker.failure, broker.reachable = "fail", failure, False
        r = await client.post(CALL_PATH, data=call_body(2), headers=GOOD)
        assert r.status == 503 and r.headers["Retry-After"] == "7"
        ready = await client.get("/readyz")
        assert ready.status == 503 and (await ready.json())["broker"] == "reconnecting"
        r = await client.post(CALL_PATH, data=call_body(2), headers=GOOD)
        assert r.status == 503  # no producer: answered at once
        broker.mode, broker.reachable = "ack", True
        for _ in range(100):
            if (await client.get("/readyz")).status == 200:
                break
            await asyncio.sleep(0.05)
        assert (await client.get("/readyz")).status == 200
        assert (await client.post(CALL_PATH, data=call_body(2), headers=GOOD)).status == 202
        started = [p for p in broker.producers if p.started]
        assert len(started) == 2 and started[0].stopped and not started[1].stopped
        assert broker.keys() == [b"cloudtalk:call:1", b"cloudtalk:call:2"]
    finally:
        await close(client)


async def test_a_late_acknowledgement_is_not_stored_twice_when_the_sender_retries(broker):
    broker.mode = "hold"
    client = await client_for(broker, ack_timeout_s=0.3)
    try:
        r = await client.post(CALL_PATH, data=call_body(1), headers=GOOD)
        assert r.status == 503
        assert (await client.get("/readyz")).status == 503  # not acknowledged: not ready
        # sent again while the first send still waits: it waits for that send, nothing new is sent
        assert (await client.post(CALL_PATH, data=call_body(1), headers=GOOD)).status == 503
        assert len(broker.held) == 1
        broker.ack_held()  # the broker acknowledges the first send after all
        await asyncio.sleep(0)
        assert (await client.get("/readyz")).status == 200
        r = await client.post(CALL_PATH, data=call_body(1), headers=GOOD)
        assert r.status == 202 and (await r.json()) == {"accepted": "cloudtalk:call:1"}
        assert broker.keys() == [b"cloudtalk:call:1"]  # once
        broker.mode = "ack"
        assert (await client.post(CALL_PATH, data=call_body(2), headers=GOOD)).status == 202
    finally:
        await close(client)


async def test_a_producer_that_acknowledges_nothing_for_too_long_is_replaced(broker):
    broker.mode = "hold"
    client = await client_for(broker, ack_timeout_s=0.2, stalled_after_s=0.3)
    try:
        assert (await client.post(CALL_PATH, data=call_body(1), headers=GOOD)).status == 503
        for _ in range(60):
            if len(broker.producers) == 2:
                break
            await asyncio.sleep(0.05)
        assert len(broker.producers) == 2 and broker.producers[0].stopped
        assert client.publisher.pending == 0  # type: ignore[attr-defined] - the held record was failed
        broker.mode = "ack"
        assert (await client.post(CALL_PATH, data=call_body(1), headers=GOOD)).status == 202
        assert broker.keys() == [b"cloudtalk:call:1"]
    finally:
        await close(client)


async def test_stopping_does_not_wait_forever_for_a_broker_that_is_gone(broker):
    broker.mode = "hold"
    publisher = await start_publisher(broker, ack_timeout_s=0.3)
    await publisher.send("t", b"k", b"v", [])
    started = time.monotonic()
    await publisher.stop()
    assert time.monotonic() - started < 2 and broker.producers[0].stopped
