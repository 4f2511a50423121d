"""A small, realistic day in the topics, written with the formats the stages write, for the
operator commands' tests (trace, deadletters, status, replay).

* raw: call 1002409191 (webhook of "support", then again from the call-history poller), SMS
  88231977 (webhook), and an SMS record no processor can read;
* processors: the real decide functions of ``process calls`` and ``process sms`` over the raw
  records read back, committed like the loop commits them (outputs, dead letters and the group's
  offsets in one transaction per partition): commands, audit records with every integration's
  decision ("sales" drops the call by ``number_not_connected`` and the SMS by ``sms_disabled``),
  and a ``SchemaError`` dead letter;
* sink kustomer: the call's command ``started`` then ``done`` in the ledger with the ids written
  and a ``done`` audit record; the SMS's command refused by Kustomer (400): ledger ``failed``,
  audit ``dead_lettered``, a ``TargetRejected`` dead letter; the sink group's offsets after both.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass

import orjson
from aiokafka import AIOKafkaProducer, TopicPartition

from pipeline.core.decisions import decision
from pipeline.core.envelope import utc_now_iso
from pipeline.ingest.cloudtalk import cloudtalk_envelope
from pipeline.kafka.clients import durable_producer, transactional_producer
from pipeline.kafka.reading import read_topic
from pipeline.kafka.records import OutRecord, Rejection, audit_record, dead_letter
from pipeline.kafka.topics import Topics
from pipeline.process.runner import FLOWS, decisions_transform
from pipeline.sink.ledger import DONE, FAILED, STARTED, LedgerEntry
from tests.unit.test_call_sms_rules import config, integration
from tests.unit.test_envelope_schemas import CALL

CALL_ID = 1002409191
SMS_ID = 88231977
PHONE = "+447700900123"
CUSTOMER = "65f1c0ffee00000000000001"
CONVERSATION = "65f1c0ffee000000000000c1"
NOTE = "65f1c0ffee000000000000n1"
SMS = {
    "event": "sms.received",
    "sms_id": SMS_ID,
    "direction": "incoming",
    "internal_number": 442012345678,
    "external_number": 447700900123,
    "text": "Hi, is my refund processed yet?",
    "created_at": "2026-03-02T10:01:22Z",
}
CALL_EVENT = f"cloudtalk:call:{CALL_ID}"
SMS_EVENT = f"cloudtalk:sms:{SMS_ID}"
BAD_SMS_EVENT = "cloudtalk:sms:5"


@dataclass
class Seeded:
    call_command: str
    sms_command: str
    deadletters: int = 2


def pipeline_config():
    return config(
        integration("support"),
        integration("sales", calls={"connected_numbers": ["+441000000000"]}, sms={"enabled": False}),
    )


async def _commit(bootstrap: str, tid: str, records: list[OutRecord], offsets: dict[TopicPartition, int], group: str):
    producer = transactional_producer(bootstrap, tid, client_id=tid, transaction_timeout_ms=30_000)
    await producer.start()
    try:
        await producer.begin_transaction()
        futures = [
            await producer.send(r.topic, r.value, r.key, partition=r.partition, headers=list(r.headers))
            for r in records
        ]
        for f in futures:
            await f
        if offsets:
            await producer.send_offsets_to_transaction(offsets, group)
        await producer.commit_transaction()
    finally:
        await producer.stop()


async def _send(producer: AIOKafkaProducer, topic: str, key: str, value: bytes, headers: list[tuple[str, bytes]]):
    await (await producer.send(topic, value, key.encode(), headers=headers))


async def seed(bootstrap: str, topics: Topics) -> Seeded:
    cfg = pipeline_config()
    prefix = topics.prefix
    # raw records, as ingest and the poller write them
    producer = durable_producer(bootstrap, "seed-ingest")
    await producer.start()
    try:
        call = cloudtalk_envelope(copy.deepcopy(CALL), "support", "webhook")
        polled = cloudtalk_envelope(copy.deepcopy(CALL), "*", "poller")
        sms = cloudtalk_envelope(copy.deepcopy(SMS), "support", "webhook")
        for topic, env in ((topics.raw_calls, call), (topics.raw_calls, polled), (topics.raw_sms, sms)):
            await _send(
                producer, topic, env.id, env.to_json(), [("event_id", env.id.encode()), ("type", env.type.encode())]
            )
        await _send(producer, topics.raw_sms, BAD_SMS_EVENT, b'{"id": "cloudtalk:sms:5", "oops": true}', [])
    finally:
        await producer.stop()

    # the processors: real decisions, committed as the loop commits them
    for flow_name, topic in (("calls", topics.raw_calls), ("sms", topics.raw_sms)):
        stage = f"process-{flow_name}"
        transform = decisions_transform(FLOWS[flow_name], cfg, topics)
        by_partition = defaultdict(list)
        for r in await read_topic(bootstrap, topic):
            by_partition[r.partition].append(r)
        for partition, records in by_partition.items():
            result = transform(records)
            dead = [dead_letter(j, stage, topics.deadletter) for j in result.rejections]
            tp = TopicPartition(topic, partition)
            await _commit(
                bootstrap,
                f"{prefix}{stage}.{topic}.{partition}",
                [*result.outputs, *dead],
                {tp: records[-1].offset + 1},
                f"{prefix}{stage}",
            )

    # the Kustomer sink: the call written, the SMS refused
    commands = await read_topic(bootstrap, topics.kustomer_commands)
    by_id = {dict(r.headers)["command_id"].decode(): r for r in commands}
    call_cid, sms_cid = f"support|{CALL_EVENT}", f"support|{SMS_EVENT}"
    assert set(by_id) == {call_cid, sms_cid}, sorted(by_id)
    ledger = topics.kustomer_ledger

    def entry(partition: int, e: LedgerEntry) -> OutRecord:
        return OutRecord(ledger, e.to_json(), e.command_id.encode(), partition=partition)

    call_rec, sms_rec = by_id[call_cid], by_id[sms_cid]
    steps = {"customer_id": CUSTOMER, "conversation_id": CONVERSATION, "note_id": NOTE}
    for rec, cid in ((call_rec, call_cid), (sms_rec, sms_cid)):
        await _commit(
            bootstrap,
            f"{prefix}sink-kustomer.intent.{rec.partition}",
            [entry(rec.partition, LedgerEntry(cid, STARTED))],
            {},
            "",
        )
    at = utc_now_iso()
    sink = "sink-kustomer"
    done = [
        entry(call_rec.partition, LedgerEntry(call_cid, DONE, steps=steps, outcome="created")),
        audit_record(
            topics.audit,
            event_id=CALL_EVENT,
            stage=sink,
            at=at,
            decisions=[decision("support", "done", "created", orjson.dumps(steps).decode(), call_cid)],
        ),
    ]
    refused = [
        entry(sms_rec.partition, LedgerEntry(sms_cid, FAILED, outcome="rejected:400")),
        audit_record(
            topics.audit,
            event_id=SMS_EVENT,
            stage=sink,
            at=at,
            decisions=[decision("support", "dead_lettered", "http_400", "kustomer conversations.create 400", sms_cid)],
        ),
        dead_letter(
            Rejection(sms_rec, "TargetRejected", "kustomer conversations.create: 400 Bad Request: channel is invalid"),
            sink,
            topics.deadletter,
        ),
    ]
    offsets: dict[TopicPartition, int] = {}
    for rec, records in ((call_rec, done), (sms_rec, refused)):
        tp = TopicPartition(rec.topic, rec.partition)
        offsets[tp] = max(offsets.get(tp, 0), rec.offset + 1)
        await _commit(bootstrap, f"{prefix}sink-kustomer.{rec.topic}.{rec.partition}", records, {}, "")
    await _commit(bootstrap, f"{prefix}sink-kustomer.offsets", [], offsets, f"{prefix}{sink}")
    return Seeded(call_cid, sms_cid)
