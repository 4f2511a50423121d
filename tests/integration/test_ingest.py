"""The ingest endpoints on the real broker: auth, limits, schema errors, ack-before-2xx, 503."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import TopicPartition

from devkit.net import free_port
from pipeline.ingest.app import Publisher, build_app
from pipeline.ingest.base import BrokerUnavailable
from pipeline.kafka.topics import Topics
from tests.conftest import KafkaIO
from tests.unit.ingest_fakes import KUSTOMER_EVENT
from tests.unit.test_call_sms_rules import SMS, config, integration
from tests.unit.test_envelope_schemas import CALL

pytestmark = pytest.mark.kafka

SECRET = "shared-secret-for-tests"
TOKEN = "kustomer-webhook-token"


@pytest.fixture
async def ingest(kafka_bootstrap: str, topics: Topics):
    cfg = config(integration("support"), integration("sales"))
    publisher = Publisher(kafka_bootstrap, "test-ingest", ack_timeout_s=5.0, retry_after_s=7)
    await publisher.start()
    for _ in range(100):
        if publisher.connected:
            break
        await asyncio.sleep(0.1)
    app = build_app(cfg, publisher, topics.prefix, {"support": SECRET, "sales": "other"}, {"support": TOKEN})
    client = TestClient(TestServer(app))
    await client.start_server()
    yield client
    await client.close()
    await publisher.stop()


async def post(client, path, body, headers=None):
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return await client.post(path, data=raw, headers={"Content-Type": "application/json", **(headers or {})})


async def test_call_webhook_is_stored_before_the_202(ingest, kafka: KafkaIO, topics: Topics):
    resp = await post(ingest, "/ingest/cloudtalk/support/call-ended", CALL, {"X-Pipeline-Secret": SECRET})
    assert resp.status == 202
    assert (await resp.json()) == {"accepted": "cloudtalk:call:1002409191"}
    records = await kafka.read_all(topics.raw_calls, expect=1, timeout=10)
    assert len(records) == 1
    env = orjson.loads(records[0].value)
    assert env["id"] == "cloudtalk:call:1002409191" and records[0].key == b"cloudtalk:call:1002409191"
    assert env["integration"] == "support" and env["via"] == "webhook" and env["payload"] == CALL
    assert env["occurred_at"] == CALL["ended_at"]


async def test_sms_goes_to_its_own_topic(ingest, kafka: KafkaIO, topics: Topics):
    resp = await post(ingest, "/ingest/cloudtalk/support/sms", SMS, {"X-Pipeline-Secret": SECRET})
    assert resp.status == 202
    records = await kafka.read_all(topics.raw_sms, expect=1, timeout=10)
    assert orjson.loads(records[0].value)["type"] == "sms.received"


@pytest.mark.parametrize(
    ("path", "headers", "body", "status", "says"),
    [
        ("/ingest/cloudtalk/nobody/call-ended", {"X-Pipeline-Secret": SECRET}, CALL, 401, "X-Pipeline-Secret"),
        ("/ingest/cloudtalk/support/call-ended", {}, CALL, 401, "X-Pipeline-Secret"),
        ("/ingest/cloudtalk/support/call-ended", {"X-Pipeline-Secret": "other"}, CALL, 401, "X-Pipeline-Secret"),
        ("/ingest/cloudtalk/support/call-ended", {"X-Pipeline-Secret": SECRET}, b"{not json", 400, "not valid JSON"),
        (
            "/ingest/cloudtalk/support/call-ended",
            {"X-Pipeline-Secret": SECRET},
            {**CALL, "call_id": "x"},
            400,
            "payload.call_id: must be integer (rule: type)",
        ),
        (
            "/ingest/cloudtalk/support/call-ended",
            {"X-Pipeline-Secret": SECRET},
            {**CALL, "event": "sms.received"},
            400,
            "payload.event",
        ),
        (
            "/ingest/cloudtalk/support/sms",
            {"X-Pipeline-Secret": SECRET},
            {k: v for k, v in SMS.items() if k != "sms_id"},
            400,
            "sms_id",
        ),
        ("/ingest/cloudtalk/support/call-ended", {"X-Pipeline-Secret": SECRET}, [1, 2], 400, "must be a JSON object"),
        ("/ingest/cloudtalk/support/fax", {"X-Pipeline-Secret": SECRET}, CALL, 404, "unknown endpoint"),
    ],
)
async def test_bad_requests_get_a_clear_4xx_and_nothing_is_published(
    ingest, kafka: KafkaIO, topics: Topics, path, headers, body, status, says
):
    resp = await post(ingest, path, body, headers)
    assert resp.status == status
    text = await resp.text()
    assert says in text, text
    for topic in (topics.raw_calls, topics.raw_sms):
        assert await kafka.read_all(topic, timeout=1.5, idle=0.5) == []


async def test_oversized_body_is_413_and_nothing_is_published(ingest, kafka: KafkaIO, topics: Topics):
    big = copy.deepcopy(CALL)
    big["call_notes"] = ["x" * 9000] * 40  # ~360 KiB
    resp = await post(ingest, "/ingest/cloudtalk/support/call-ended", big, {"X-Pipeline-Secret": SECRET})
    assert resp.status == 413
    assert await kafka.read_all(topics.raw_calls, timeout=1.5, idle=0.5) == []


async def test_kustomer_webhook_signature_is_checked(ingest, kafka: KafkaIO, topics: Topics):
    event = KUSTOMER_EVENT
    raw = orjson.dumps(event)
    good = hmac.new(TOKEN.encode(), raw, hashlib.sha256).hexdigest()
    bad = await post(ingest, "/ingest/kustomer/support", raw, {"X-Kustomer-Webhook-Signature": "0" * 64})
    assert bad.status == 401
    assert await kafka.read_all(topics.raw_customers, timeout=1.5, idle=0.5) == []
    resp = await post(
        ingest,
        "/ingest/kustomer/support",
        raw,
        {"X-Kustomer-Webhook-Signature": good, "X-Kustomer-Webhook-Event": event["name"]},
    )
    assert resp.status == 202
    again = await post(ingest, "/ingest/kustomer/support", raw, {"X-Kustomer-Webhook-Signature": good})
    assert again.status == 200 and (await again.json()) == {"duplicate": event["id"]}
    records = await kafka.read_all(topics.raw_customers, expect=1, timeout=10)
    assert len(records) == 1
    assert orjson.loads(records[0].value)["id"] == "kustomer:customer:65f1c0a2e4b0a1b2c3d4e5f6:8"
    no_token = await post(ingest, "/ingest/kustomer/sales", raw, {"X-Kustomer-Webhook-Signature": good})
    unknown = await post(ingest, "/ingest/kustomer/nobody", raw, {"X-Kustomer-Webhook-Signature": good})
    # no token and an unknown integration look exactly like a wrong signature
    assert no_token.status == unknown.status == bad.status == 401
    assert await no_token.read() == await unknown.read() == await bad.read()


async def test_broker_unavailable_answers_503_with_retry_after(topics: Topics):
    dead = f"127.0.0.1:{free_port()}"
    publisher = Publisher(dead, "test-ingest", ack_timeout_s=0.5, retry_after_s=7)
    await publisher.start()
    app = build_app(config(), publisher, topics.prefix, {"support": SECRET}, {})
    async with TestClient(TestServer(app)) as client:
        resp = await post(client, "/ingest/cloudtalk/support/call-ended", CALL, {"X-Pipeline-Secret": SECRET})
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "7"
        assert "not stored" in (await resp.json())["error"]
        ready = await client.get("/readyz")
        assert ready.status == 503
    await publisher.stop()


async def test_a_producer_with_a_sequence_gap_is_replaced_and_publishing_goes_on(kafka_bootstrap, kafka: KafkaIO):
    """The state a broker restart can leave the idempotent producer in — a batch lost after it got
    its sequence number — made on purpose: the broker answers OutOfOrderSequenceNumber to every
    later batch of that producer, so ingest must replace it rather than fail forever."""
    topic = await kafka.create_topic(f"gap-{free_port()}", partitions=1)
    publisher = Publisher(kafka_bootstrap, "test-gap", ack_timeout_s=5.0, retry_after_s=1, reconnect_backoff_s=0.2)
    await publisher.start()
    try:
        for _ in range(100):
            if publisher.ready:
                break
            await asyncio.sleep(0.1)
        await publisher.publish(topic, b"k1", b"v1", [])
        first = publisher.producer
        first._txn_manager.increment_sequence_number(TopicPartition(topic, 0), 3)  # noqa: SLF001 - 3 records "lost"
        with pytest.raises(BrokerUnavailable, match="OutOfOrderSequenceNumber"):
            await publisher.publish(topic, b"k2", b"v2", [])
        assert not publisher.ready
        for _ in range(100):
            if publisher.ready:
                break
            await asyncio.sleep(0.1)
        assert publisher.ready and publisher.producer is not first and publisher.rebuilds == 1
        await publisher.publish(topic, b"k2", b"v2", [])
        records = await kafka.read_all(topic, expect=2, timeout=10)
        assert [r.key for r in records] == [b"k1", b"k2"]
    finally:
        await publisher.stop()
