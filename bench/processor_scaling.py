"""Calls processor scaling: 1, 2 and 3 replicas (processes) over the same pre-filled raw topic,
and the cost per event with many integrations configured.

    python bench/processor_scaling.py [--events 60000] [--replicas 1,2,3] [--integrations 2]
                                      [--many-integrations 50]

Uses ``KAFKA_BOOTSTRAP`` when set, otherwise starts a local broker. For each run, on topics of its
own: ``--events`` ``call.ended`` envelopes (incoming calls of unknown numbers on the first
integration's line, so each yields exactly one ``kustomer.log_conversation`` command) are produced
to the raw calls topic (6 partitions), then N replicas of ``pipeline process calls`` start as
separate processes in one consumer group and drain it.

The replicas join one after the other, and each join is a rebalance, so the rate is taken over the
window from the moment every replica holds partitions (``pipeline_assigned_partitions`` on each
replica's ``/metrics``) until the group's committed offsets reach the end of the input (the raw
topic is written without transactions, so its offsets count records): events in that window /
its seconds. Also printed: the whole drain from the first replica's start, and the replicas' CPU
per event over the same window (``/proc``: start-up is not counted). The baseline of every
replica count is 1 replica in the same run.

Then every input must have produced exactly one command: the command topic is read and the
``event_id`` headers counted (distinct ids = inputs = commands), and one audit record each.

``--many-integrations``: one more 1-replica run with that many integrations configured (the
extra ones have lines of their own that no event uses, so each event still yields one command);
its CPU per event against the 1-replica run with ``--integrations`` is what every further
integration costs.

On a machine with 2 cores that also runs the broker, a third replica has no core of its own: it
cannot beat 2 replicas, and the output says so. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient  # noqa: E402
from aiokafka.errors import KafkaError  # noqa: E402

from bench.common import Row, cpu_seconds, kafka, metric_sum, print_summary, ratio  # noqa: E402
from bench.processor_throughput import LINES, call_envelope, config_data, produce_events  # noqa: E402
from devkit.stack import Stack  # noqa: E402
from pipeline.kafka.clients import new_admin  # noqa: E402
from pipeline.kafka.reading import read_topic  # noqa: E402
from pipeline.kafka.topics import Topics, ensure_topics  # noqa: E402


@dataclass
class Drain:
    replicas: int
    integrations: int
    rate: float  # events/s once every replica held partitions
    window_events: int  # events committed in that window
    whole_s: float  # from the first replica's start to the end of the input
    cpu_us: float  # the replicas' CPU per event in that window
    commands: int
    distinct_events: int
    audits: int
    distinct_audits: int

    @property
    def exact(self) -> bool:
        return self.commands == self.distinct_events == self.audits == self.distinct_audits


async def committed_records(admin: AIOKafkaAdminClient, group: str, topic: str) -> int:
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    except KafkaError:  # the group's coordinator is not there yet: nothing committed
        return 0
    return sum(max(meta.offset, 0) for tp, meta in offsets.items() if tp.topic == topic)


async def drain(bootstrap: str, args: argparse.Namespace, replicas: int, integrations: int) -> Drain:
    work = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    topics = Topics(f"bench{uuid.uuid4().hex[:6]}-")
    await ensure_topics(bootstrap, topics.specs())
    rng = random.Random(7)
    events = [call_envelope(i, rng, lines=LINES[:1], incoming_only=True) for i in range(args.events)]
    await produce_events(bootstrap, topics.raw_calls, args.events, events)
    config = work / "integrations.yaml"
    config.write_bytes(orjson.dumps(config_data(integrations)))  # JSON is YAML
    stack = Stack(
        work,
        {
            "KAFKA_BOOTSTRAP": bootstrap,
            "TOPIC_PREFIX": topics.prefix,
            "PIPELINE_CONFIG": str(config),
            "LOG_LEVEL": args.log_level,
            "X": "unused",
        },
    )
    group = f"{topics.prefix}process-calls"
    admin = new_admin(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        started = time.perf_counter()
        for i in range(replicas):
            stack.add(f"process-calls-{i + 1}", ["process", "calls"])
        services = list(stack.services.values())
        urls = [f"http://127.0.0.1:{svc.metrics_port}/metrics" for svc in services]
        window: tuple[float, int, float] | None = None  # when every replica held partitions: time, done, CPU
        done = 0
        deadline = time.monotonic() + args.timeout
        while True:
            for svc in services:
                if not svc.running:
                    raise SystemExit(f"{svc.name} exited; see {svc.log_path}\n{stack.tail(svc.name)}")
            done = await committed_records(admin, group, topics.raw_calls)
            now = time.perf_counter()
            if done >= args.events:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{replicas} replica(s): {done:,} of {args.events:,} events in {args.timeout:.0f} s")
            if window is None:
                held = [await metric_sum(url, "pipeline_assigned_partitions") for url in urls]
                if all(h > 0 for h in held) and sum(held) == 6:
                    window = (now, done, sum(cpu_seconds(svc.proc.pid) for svc in services))
            await asyncio.sleep(0.1)
        cpu_end = sum(cpu_seconds(svc.proc.pid) for svc in services)
    finally:
        await admin.close()
        stack.stop_all()
    if window is None or args.events - window[1] < args.events // 10:
        print(
            f"  {replicas} replica(s): the input was (nearly) drained before every replica held partitions; "
            "no rate — use more --events",
            flush=True,
        )
        rate = cpu_us = math.nan
        in_window = 0
    else:
        in_window = args.events - window[1]
        rate = in_window / (now - window[0])
        cpu_us = (cpu_end - window[2]) / in_window * 1e6
    commands = await read_topic(bootstrap, topics.kustomer_commands)
    event_ids = Counter(dict(r.headers).get("event_id", b"") for r in commands)
    audits = await read_topic(bootstrap, topics.audit)
    result = Drain(
        replicas,
        integrations,
        rate,
        in_window,
        now - started,
        cpu_us,
        len(commands),
        len(event_ids),
        len(audits),
        len({orjson.loads(r.value).get("event_id") for r in audits}),
    )
    print(
        f"{replicas} replica(s), {integrations:2} integrations: {result.rate:8,.0f} events/s "
        f"({result.window_events:,} events once all held partitions); whole drain {result.whole_s:.1f} s "
        f"from the first start; replicas' CPU {cpu_us:.0f} µs/event in the window; commands {result.commands:,} for "
        f"{result.distinct_events:,} distinct events, audit {result.audits:,} "
        f"{'(exactly one each)' if result.exact and result.commands == args.events else '(NOT one each)'}",
        flush=True,
    )
    return result


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=60_000)
    ap.add_argument("--replicas", default="1,2,3", help="comma-separated replica counts (1 comes first)")
    ap.add_argument("--integrations", type=int, default=2)
    ap.add_argument("--many-integrations", type=int, default=50, help="a 1-replica run with this many (0: skip)")
    ap.add_argument("--log-level", default="INFO", help="the replicas' LOG_LEVEL (the product's default: INFO)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds a drain may take")
    args = ap.parse_args()
    counts = sorted({1, *(int(n) for n in args.replicas.split(","))})
    cores = os.cpu_count() or 1
    print(f"{args.events:,} call.ended events, 6 partitions, replicas {counts}; {cores} cores here", flush=True)
    async with kafka() as (bootstrap, _):
        runs = [await drain(bootstrap, args, n, args.integrations) for n in counts]
        many = await drain(bootstrap, args, 1, args.many_integrations) if args.many_integrations else None
    one = runs[0]
    if max(counts) > cores:
        print(
            f"note: this machine has {cores} cores, shared with the broker and this process: {cores + 1} or more "
            f"replicas cannot beat {cores}, and even {cores} share them with the broker — the ratios show the cost "
            "of sharing the cores, not how the processor scales where each replica has a core of its own"
        )
    rows = [
        Row(
            f"calls processor, {r.replicas} replicas vs 1",
            f"{r.rate:,.0f} events/s",
            f"{one.rate:,.0f} events/s",
            ratio(r.rate, one.rate),
            "—" if r.replicas > cores else f"~{r.replicas} with {r.replicas} free cores",
            None,
        )
        for r in runs[1:]
    ]
    rows.insert(
        0,
        Row(
            "calls processor, 1 replica",
            f"{one.rate:,.0f} events/s",
            "—",
            "—",
            "—",
            None,
        ),
    )
    if many is not None:
        rows.append(
            Row(
                f"CPU per event, {many.integrations} vs {one.integrations} integrations (1 replica)",
                f"{many.cpu_us:.0f} µs/event",
                f"{one.cpu_us:.0f} µs/event",
                ratio(many.cpu_us, one.cpu_us),
                "—",
                None,
            )
        )
    every = [*runs, *([many] if many else [])]
    rows.append(
        Row(
            "every input exactly one command and one audit record",
            ", ".join(f"{r.replicas}r/{r.integrations}i: {r.distinct_events:,}/{r.commands:,}" for r in every),
            f"{args.events:,} inputs",
            "—",
            "all runs",
            all(r.exact and r.commands == args.events for r in every),
        )
    )
    print_summary("calls processor scaling", rows)


if __name__ == "__main__":
    asyncio.run(main())
