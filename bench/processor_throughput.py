"""Calls processor throughput vs a raw aiokafka transactional copy of the same records, and the
processor's own floor: its transform alone, without Kafka.

    python bench/processor_throughput.py [--events 100000] [--rounds 3] [--integrations 2]
                                         [--many-integrations 50] [--floor-events 20000]

Uses ``KAFKA_BOOTSTRAP`` when set, otherwise starts a local broker. The input is ``call.ended``
envelopes of every call type (as ingest stores them). Each round runs, alternating order:

* baseline: the raw aiokafka transactional copy of ``loop_throughput.py`` (no decoding);
* processor: ``pipeline process calls`` logic in the transactional loop — decode and validate
  each envelope, evaluate every integration's rules, build the command with its note, audit
  records, all committed with the offsets.

Then, in this process and without Kafka, the transform floor: the same envelopes as consumer
records handed to the processor's transform (decode, rules, note, encode, command and audit
records) in batches of ``--batch``, best of three passes, in µs per event — next to its own
baseline, a bare ``orjson`` decode + encode of each record. The floor is measured with
``--integrations`` and with ``--many-integrations`` configured (the extra integrations have lines
of their own that no event uses: each event still yields the same commands, so the difference is
what every further integration costs an event).

Prints events/s and the median ratio processor/baseline, the processor as a share of its floor,
and a summary table. The processor runs in this one Python process, so its events/s is per core
(the broker uses the other one). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


import orjson  # noqa: E402
from aiokafka.structs import ConsumerRecord  # noqa: E402

from bench.common import Row, kafka, print_summary, ratio  # noqa: E402
from bench.loop_throughput import baseline_copy, create  # noqa: E402
from pipeline.core.config import parse_config  # noqa: E402
from pipeline.core.envelope import Envelope, call_event_id  # noqa: E402
from pipeline.kafka.clients import new_producer  # noqa: E402
from pipeline.kafka.loop import LoopSettings, TransactionalLoop, TransformStage  # noqa: E402
from pipeline.kafka.topics import Topics, ensure_topics  # noqa: E402
from pipeline.process.runner import FLOWS, decisions_transform  # noqa: E402

LINES = [442012345678, 14155550123, 442079460000]


def integration_line(i: int) -> int:
    """The connected line of integration ``i``: the first two share the events' first two lines
    (as before); every further one has a line of its own that no event uses."""
    return LINES[i] if i < 2 else 442070000000 + i


def config_data(n: int) -> dict:
    """An integrations file with ``n`` integrations (see :func:`integration_line`)."""
    integrations = []
    for i in range(n):
        integrations.append(
            {
                "name": f"team{i}",
                "active": True,
                "contact_tag": f"team{i}",
                "kustomer": {"base_url": "http://127.0.0.1:9", "org_name": f"org{i}", "api_key": {"env": "X"}},
                "cloudtalk_webhook_secret": {"env": "X"},
                "calls": {
                    "create_customers_for_unknown_numbers": i % 2 == 0,
                    "connected_numbers": [f"+{integration_line(i)}"],
                },
            }
        )
    return {
        "cloudtalk": {"base_url": "http://127.0.0.1:9/api", "key_id": {"env": "X"}, "key_secret": {"env": "X"}},
        "integrations": integrations,
    }


def config(n: int):
    return parse_config(config_data(n))


def call_envelope(i: int, rng: random.Random, *, lines: list[int] = LINES, incoming_only: bool = False) -> Envelope:
    """A ``call.ended`` envelope as ingest stores it; the same ``rng`` state gives the same call."""
    direction = rng.choice(["incoming", "incoming", "outgoing"])
    if incoming_only:
        direction = "incoming"
    answered = rng.random() < 0.7
    body = {
        "event": "call.ended",
        "call_id": 1_000_000_000 + i,
        "call_uuid": str(uuid.UUID(int=i)),
        "direction": direction,
        "status": "answered" if answered else "missed",
        "internal_number": rng.choice(lines),
        "internal_number_name": "Line",
        "external_number": 447700900000 + rng.randint(0, 9999),
        "contact_id": rng.choice([None, 1451646073]),
        "agent_id": 493933,
        "agent_first_name": "Max",
        "agent_last_name": "Yellow",
        "agent_email": "max@example.com",
        "started_at": "2026-03-02T09:14:05.000Z",
        "answered_at": "2026-03-02T09:14:17.000Z" if answered else None,
        "ended_at": "2026-03-02T09:18:40.000Z",
        "waiting_time": 12,
        "talking_time": 263 if answered else 0,
        "wrapup_time": 30,
        "is_voicemail": not answered and rng.random() < 0.3,
        "recording_url": "https://my.cloudtalk.io/pub/r/x.wav" if answered else None,
        "call_tags": ["Billing"],
        "call_notes": [],
        "rating": None,
    }
    return Envelope(
        id=call_event_id(body["call_id"]),
        integration="team0",
        source="cloudtalk",
        type="call.ended",
        occurred_at=body["ended_at"],
        received_at=body["ended_at"],
        payload=body,
    )


def envelopes(n: int) -> list[Envelope]:
    rng = random.Random(7)
    return [call_envelope(i, rng) for i in range(n)]


async def produce_events(bootstrap: str, topic: str, n: int, events: list[Envelope] | None = None) -> None:
    producer = new_producer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=512 * 1024)
    await producer.start()
    try:
        futures = []
        for env in events if events is not None else envelopes(n):
            futures.append(await producer.send(topic, key=env.id.encode(), value=env.to_json()))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def consumer_records(topic: str, events: list[Envelope]) -> list[ConsumerRecord]:
    """The envelopes as the processor's consumer hands them over (6 partitions)."""
    out = []
    for i, env in enumerate(events):
        key, value = env.id.encode(), env.to_json()
        out.append(ConsumerRecord(topic, i % 6, i // 6, 0, 0, key, value, None, len(key), len(value), ()))
    return out


def transform_floor_us(cfg, topics: Topics, records: list[ConsumerRecord], batch: int, passes: int = 3) -> float:
    """µs per event of the calls processor's transform alone (decode, rules, note, encode, command
    and audit records), in batches of ``batch``: the best of ``passes`` passes."""
    transform = decisions_transform(FLOWS["calls"], cfg, topics)
    best = math.inf
    for _ in range(passes):
        started = time.perf_counter()
        for i in range(0, len(records), batch):
            result = transform(records[i : i + batch])
            assert not result.rejections, result.rejections[0]
        best = min(best, (time.perf_counter() - started) / len(records))
    return best * 1e6


def json_floor_us(records: list[ConsumerRecord], passes: int = 3) -> float:
    """µs per event of a bare ``orjson`` decode + encode of each record: the floor's baseline."""
    best = math.inf
    for _ in range(passes):
        started = time.perf_counter()
        for r in records:
            orjson.dumps(orjson.loads(r.value))
        best = min(best, (time.perf_counter() - started) / len(records))
    return best * 1e6


async def processor_run(
    bootstrap: str, topics: Topics, src: str, cfg, n: int, batch: int, producers: str = "process"
) -> float:
    loop = TransactionalLoop(
        LoopSettings(
            bootstrap=bootstrap,
            group_id=f"bench-proc-{uuid.uuid4().hex[:8]}",
            input_topics=(src,),
            deadletter_topic=topics.deadletter,
            max_batch=batch,
            poll_timeout_ms=200,
            producers=producers,
        ),
        TransformStage("process-calls", decisions_transform(FLOWS["calls"], cfg, topics)),
    )
    await loop.start()
    task = asyncio.create_task(loop.run())
    started = None
    try:
        while loop.stats["in"] < n:
            if started is None and loop.stats["in"] > 0:
                started = time.perf_counter()
            if task.done():
                task.result()
            await asyncio.sleep(0.005)
        return n / (time.perf_counter() - (started or time.perf_counter()))
    finally:
        loop.request_stop()
        await task
        await loop.stop()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--integrations", type=int, default=2)
    ap.add_argument("--many-integrations", type=int, default=50, help="the floor again with this many (0: skip)")
    ap.add_argument("--producers", default="process", choices=("partition", "process"), help="LOOP_PRODUCERS")
    ap.add_argument("--floor-events", type=int, default=20_000, help="events per pass of the transform floor")
    args = ap.parse_args()
    events = envelopes(args.events)
    floor_records = consumer_records("bench-floor", events[: min(args.floor_events, args.events)])
    async with kafka() as (bootstrap, _):
        base_ratios, rates, bases, floors, json_floors = [], [], [], [], []
        for i in range(args.rounds):
            topics = Topics(f"bench{uuid.uuid4().hex[:6]}-")
            await ensure_topics(bootstrap, topics.specs())
            await produce_events(bootstrap, topics.raw_calls, args.events, events)
            copy_dst = await create(bootstrap, f"{topics.prefix}copy", 6)
            order = ("baseline", "processor") if i % 2 == 0 else ("processor", "baseline")
            result = {}
            for which in order:
                if which == "baseline":
                    result[which] = await baseline_copy(bootstrap, topics.raw_calls, copy_dst, args.events, args.batch)
                else:
                    result[which] = await processor_run(
                        bootstrap,
                        topics,
                        topics.raw_calls,
                        config(args.integrations),
                        args.events,
                        args.batch,
                        args.producers,
                    )
                print(f"round {i + 1} {which:9} {result[which]:10,.0f} events/s", flush=True)
            floors.append(transform_floor_us(config(args.integrations), topics, floor_records, args.batch))
            json_floors.append(json_floor_us(floor_records))
            print(
                f"round {i + 1} floor     {floors[-1]:10.1f} µs/event = {1e6 / floors[-1]:,.0f} events/s "
                f"(orjson decode + encode {json_floors[-1]:.1f} µs/event)",
                flush=True,
            )
            rates.append(result["processor"])
            bases.append(result["baseline"])
            base_ratios.append(result["processor"] / result["baseline"])
        many_us = math.nan
        if args.many_integrations:
            topics = Topics("bench-floor-")
            many_us = transform_floor_us(config(args.many_integrations), topics, floor_records, args.batch)
            print(f"floor with {args.many_integrations} integrations {many_us:.1f} µs/event", flush=True)

    floor_us, json_us = min(floors), min(json_floors)
    processor, baseline = statistics.median(rates), statistics.median(bases)
    share = processor / (1e6 / floor_us)
    print(
        f"events: {args.events} call.ended, {args.integrations} integrations, batch {args.batch}, "
        f"a transactional producer per {args.producers}"
    )
    print(
        f"baseline median {baseline:,.0f} events/s; processor median {processor:,.0f} events/s "
        f"(one process = one core); transform floor {floor_us:.1f} µs/event = {1e6 / floor_us:,.0f} events/s"
    )
    print(
        f"ratio processor/baseline: median {statistics.median(base_ratios):.2f} "
        f"(rounds: {', '.join(f'{r:.2f}' for r in base_ratios)}); processor = {share:.0%} of its own floor"
    )
    rows = [
        Row(
            "calls processor vs raw aiokafka transactional copy",
            f"{processor:,.0f} events/s",
            f"{baseline:,.0f} events/s",
            f"{statistics.median(base_ratios):.2f}",
            ">= 0.75",
            statistics.median(base_ratios) >= 0.75,
        ),
        Row(
            "calls processor as share of its transform floor",
            f"{processor:,.0f} events/s",
            f"{1e6 / floor_us:,.0f} events/s (floor)",
            f"{share:.2f}",
            ">= 0.80",
            share >= 0.80,
        ),
        Row(
            f"transform floor, {args.integrations} integrations (decode, rules, note, encode, records)",
            f"{floor_us:.1f} µs/event",
            f"{json_us:.1f} µs/event (orjson decode + encode)",
            ratio(floor_us, json_us),
            "<= 25 µs/event",
            floor_us <= 25,
        ),
    ]
    if args.many_integrations:
        rows.append(
            Row(
                f"transform floor, {args.many_integrations} vs {args.integrations} integrations",
                f"{many_us:.1f} µs/event",
                f"{floor_us:.1f} µs/event",
                ratio(many_us, floor_us),
                "—",
                None,
            )
        )
    print_summary("calls processor throughput", rows)


if __name__ == "__main__":
    asyncio.run(main())
