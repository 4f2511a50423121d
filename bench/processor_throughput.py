"""Calls processor throughput vs a raw aiokafka transactional copy of the same records.

    python bench/processor_throughput.py [--events 100000] [--rounds 3] [--integrations 2]

Uses ``KAFKA_BOOTSTRAP`` when set, otherwise starts a local broker. The input is ``call.ended``
envelopes of every call type (as ingest stores them). Each round runs, alternating order:

* baseline: the raw aiokafka transactional copy of ``loop_throughput.py`` (no decoding);
* processor: ``pipeline process calls`` logic in the transactional loop — decode and validate
  each envelope, evaluate every integration's rules, build the command with its note, audit
  records, all committed with the offsets.

Prints events/s and the median ratio processor/baseline. The processor runs in this one Python
process, so its events/s is per core (the broker uses the other one). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from bench.common import kafka  # noqa: E402
from bench.loop_throughput import baseline_copy, create  # noqa: E402
from pipeline.core.config import parse_config  # noqa: E402
from pipeline.core.envelope import Envelope, call_event_id  # noqa: E402
from pipeline.kafka.clients import new_producer  # noqa: E402
from pipeline.kafka.loop import LoopSettings, TransactionalLoop, TransformStage  # noqa: E402
from pipeline.kafka.topics import Topics, ensure_topics  # noqa: E402
from pipeline.process.runner import FLOWS, decisions_transform  # noqa: E402

LINES = [442012345678, 14155550123, 442079460000]


def config(n: int):
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
                    "connected_numbers": [f"+{LINES[i % 2]}"],
                },
            }
        )
    return parse_config(
        {
            "cloudtalk": {"base_url": "http://127.0.0.1:9/api", "key_id": {"env": "X"}, "key_secret": {"env": "X"}},
            "integrations": integrations,
        }
    )


def call_envelope(i: int, rng: random.Random) -> Envelope:
    direction = rng.choice(["incoming", "incoming", "outgoing"])
    answered = rng.random() < 0.7
    body = {
        "event": "call.ended",
        "call_id": 1_000_000_000 + i,
        "call_uuid": str(uuid.UUID(int=i)),
        "direction": direction,
        "status": "answered" if answered else "missed",
        "internal_number": rng.choice(LINES),
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


async def produce_events(bootstrap: str, topic: str, n: int) -> None:
    rng = random.Random(7)
    producer = new_producer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=512 * 1024)
    await producer.start()
    try:
        futures = []
        for i in range(n):
            env = call_envelope(i, rng)
            futures.append(await producer.send(topic, key=env.id.encode(), value=env.to_json()))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def processor_run(bootstrap: str, topics: Topics, src: str, cfg, n: int, batch: int) -> float:
    loop = TransactionalLoop(
        LoopSettings(
            bootstrap=bootstrap,
            group_id=f"bench-proc-{uuid.uuid4().hex[:8]}",
            input_topics=(src,),
            deadletter_topic=topics.deadletter,
            max_batch=batch,
            poll_timeout_ms=200,
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
    args = ap.parse_args()
    async with kafka() as (bootstrap, _):
        base_ratios, rates, bases = [], [], []
        for i in range(args.rounds):
            topics = Topics(f"bench{uuid.uuid4().hex[:6]}-")
            await ensure_topics(bootstrap, topics.specs())
            await produce_events(bootstrap, topics.raw_calls, args.events)
            copy_dst = await create(bootstrap, f"{topics.prefix}copy", 6)
            order = ("baseline", "processor") if i % 2 == 0 else ("processor", "baseline")
            result = {}
            for which in order:
                if which == "baseline":
                    result[which] = await baseline_copy(bootstrap, topics.raw_calls, copy_dst, args.events, args.batch)
                else:
                    result[which] = await processor_run(
                        bootstrap, topics, topics.raw_calls, config(args.integrations), args.events, args.batch
                    )
                print(f"round {i + 1} {which:9} {result[which]:10,.0f} events/s", flush=True)
            rates.append(result["processor"])
            bases.append(result["baseline"])
            base_ratios.append(result["processor"] / result["baseline"])
        print(f"events: {args.events} call.ended, {args.integrations} integrations, batch {args.batch}")
        print(
            f"baseline median {statistics.median(bases):,.0f} events/s; processor median "
            f"{statistics.median(rates):,.0f} events/s (one process = one core)"
        )
        print(
            f"ratio processor/baseline: median {statistics.median(base_ratios):.2f} "
            f"(rounds: {', '.join(f'{r:.2f}' for r in base_ratios)})"
        )


if __name__ == "__main__":
    asyncio.run(main())
