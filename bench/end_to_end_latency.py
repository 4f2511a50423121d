"""End-to-end latency: a call ends in CloudTalk → its note is created in Kustomer, at 200 calls/s.

    python bench/end_to_end_latency.py [--rate 200] [--seconds 20] [--numbers 2000]

Uses ``KAFKA_BOOTSTRAP`` when set, otherwise starts a local broker. Everything runs as in
production, each a separate process: the CloudTalk simulator (its workflow automation posts
call-ended to ingest, no wrap-up delay), ingest, the calls processor, the Kustomer sink and the
Kustomer simulator (no added latency, a budget high enough never to throttle). Calls are ended
through the simulator at ``--rate`` per second from ``--numbers`` customer numbers (unknown
numbers, so the first call of a number also creates its customer). A call's latency is the time
from ending it to the arrival of its note at the Kustomer simulator (same clock).

Baseline, same run: one Kafka hop — produce with ``acks=all``, consume ``read_committed`` — at the
same rate. The pipeline makes three such hops (ingest → raw, processor → commands in a
transaction, sink → ledger and offsets in a transaction) plus the HTTP calls. Prints p50/p99/max,
the ratio of p99s, and that every call has exactly one note. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import sys
import tempfile
import textwrap
import time
import uuid
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import orjson  # noqa: E402

from bench.common import kafka, percentile_ms  # noqa: E402
from devkit.net import free_port
from devkit.stack import Stack  # noqa: E402
from pipeline.kafka.clients import new_consumer, new_producer  # noqa: E402
from pipeline.kafka.lag import group_lag  # noqa: E402
from pipeline.kafka.topics import Topics, TopicSpec, ensure_topics  # noqa: E402

LINE = "+442012345678"
SECRETS = {
    "B_CT_ID": "bench-id",
    "B_CT_SECRET": "bench-secret",
    "B_K_KEY": "bench-kustomer-key",
    "B_HOOK": "bench-hook-secret",
}
MARKER = re.compile(r"CloudTalk call (\d+)")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


pct = percentile_ms


def describe(name: str, lat: list[float]) -> str:
    return (
        f"{name:9} n={len(lat):,}  p50 {pct(lat, 50):7.1f} ms  p99 {pct(lat, 99):7.1f} ms  "
        f"max {max(lat) * 1000:7.1f} ms"
    )


async def kafka_hop(bootstrap: str, rate: float, seconds: float) -> list[float]:
    topic = f"bench-hop-{uuid.uuid4().hex[:6]}"
    await ensure_topics(bootstrap, [TopicSpec(topic, 6, {}, "latency baseline")])
    consumer = new_consumer(
        topic,
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        group_id=None,
    )
    producer = new_producer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await consumer.start()
    await producer.start()
    out: list[float] = []
    n = int(rate * seconds)

    async def consume() -> None:
        while len(out) < n:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                now = time.time()
                out.extend(now - orjson.loads(r.value)["t"] for r in records)

    reader = asyncio.create_task(consume())
    await asyncio.sleep(1.0)
    t0 = time.perf_counter()
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await producer.send(topic, orjson.dumps({"t": time.time(), "i": i}), key=str(i).encode())
    await asyncio.wait_for(reader, 60)
    await producer.stop()
    await consumer.stop()
    return out


async def pipeline_run(
    bootstrap: str, args: argparse.Namespace, broker_pid: int | None
) -> tuple[list[float], Counter, int, dict[str, float]]:
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    topics = Topics(f"bench{uuid.uuid4().hex[:6]}-")
    await ensure_topics(bootstrap, topics.specs())
    ports = {n: free_port() for n in ("ct", "k", "ingest")}
    ct, k, ingest = (f"http://127.0.0.1:{ports[n]}" for n in ("ct", "k", "ingest"))
    config = work / "integrations.yaml"
    config.write_text(
        textwrap.dedent(f"""
        cloudtalk: {{base_url: "{ct}/api", key_id: {{env: B_CT_ID}}, key_secret: {{env: B_CT_SECRET}}}}
        integrations:
          - name: support
            active: true
            kustomer: {{base_url: "{k}", org_name: acme, api_key: {{env: B_K_KEY}}}}
            cloudtalk_webhook_secret: {{env: B_HOOK}}
            calls: {{create_customers_for_unknown_numbers: true, connected_numbers: ["{LINE}"]}}
    """)
    )
    stack = Stack(
        work,
        {
            "KAFKA_BOOTSTRAP": bootstrap,
            "TOPIC_PREFIX": topics.prefix,
            "PIPELINE_CONFIG": str(config),
            "LOG_LEVEL": "WARNING",
            **SECRETS,
        },
    )
    try:
        stack.add(
            "sim-cloudtalk",
            [
                "sim",
                "cloudtalk",
                "--port",
                str(ports["ct"]),
                "--key-id",
                SECRETS["B_CT_ID"],
                "--key-secret",
                SECRETS["B_CT_SECRET"],
                "--rate-limit",
                "1000000",
                "--log-level",
                "WARNING",
            ],
            health=f"{ct}/_sim/settings",
        )
        stack.add(
            "sim-kustomer",
            [
                "sim",
                "kustomer",
                "--port",
                str(ports["k"]),
                "--api-key",
                SECRETS["B_K_KEY"],
                "--rate-limit",
                "10000000",
                "--per-customer-limit",
                "100000",
                "--search-limit",
                "10000000",
                "--log-level",
                "WARNING",
            ],
            health=f"{k}/_sim/settings",
        )
        stack.add("ingest", ["ingest", "--port", str(ports["ingest"])], health=f"{ingest}/readyz")
        stack.add("process-calls", ["process", "calls"])
        stack.add("sink-kustomer", ["sink", "kustomer"])
        await stack.wait_ready(timeout=90)
        rng = random.Random(11)
        numbers = [f"+4474009{n:05d}" for n in rng.sample(range(10_000, 99_999), args.numbers)]
        ended: dict[str, float] = {}
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{ct}/_sim/workflows",
                data=orjson.dumps(
                    [
                        {
                            "trigger": "call.ended",
                            "url": f"{ingest}/ingest/cloudtalk/support/call-ended",
                            "headers": {"X-Pipeline-Secret": SECRETS["B_HOOK"]},
                        }
                    ]
                ),
            ) as r:
                assert r.status < 300, await r.text()

            async def end_call() -> None:
                spec = {
                    "direction": "incoming",
                    "status": "answered",
                    "internal_number": LINE,
                    "external_number": rng.choice(numbers),
                    "talking_time": 60,
                }
                t = time.time()
                async with http.post(f"{ct}/_sim/calls", data=orjson.dumps(spec)) as r:
                    call = await r.json()
                ended[str(call.get("call_id") or call.get("id"))] = t

            n = int(args.rate * args.seconds)
            tasks = []
            pids = {name: svc.proc.pid for name, svc in stack.services.items()} | {"load generator": os.getpid()}
            if broker_pid:
                pids["kafka broker"] = broker_pid
            cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
            t0 = time.perf_counter()
            for i in range(n):
                delay = t0 + i / args.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(end_call()))
                if i and i % int(args.rate * 5) == 0:
                    print(f"  {i:,}/{n:,} calls ended", flush=True)
            await asyncio.gather(*tasks)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                lag = sum(
                    (await group_lag(bootstrap, f"{topics.prefix}sink-kustomer", [topics.kustomer_commands])).values()
                )
                raw = sum((await group_lag(bootstrap, f"{topics.prefix}process-calls", [topics.raw_calls])).values())
                if not lag and not raw:
                    break
                await asyncio.sleep(1.0)
            cpu = {name: (cpu_seconds(pid) - cpu0[name]) / n * 1000 for name, pid in pids.items()}
            async with http.get(f"{k}/_sim/requests") as r:
                log = (await r.json())["requests"]
        notes: dict[str, float] = {}
        per_call = Counter()
        for entry in log:
            if entry.get("effect", "") and str(entry["effect"]).startswith("note.create"):
                match = MARKER.search(orjson.dumps(entry.get("body")).decode())
                if match:
                    per_call[match.group(1)] += 1
                    notes.setdefault(match.group(1), entry["at"])
        latencies = [notes[c] - t for c, t in ended.items() if c in notes]
        return latencies, per_call, len(ended), cpu
    finally:
        stack.stop_all()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--numbers", type=int, default=2000)
    args = ap.parse_args()
    async with kafka() as (bootstrap, broker_pid):
        print(f"{args.rate:.0f} calls/s for {args.seconds:.0f} s from {args.numbers:,} numbers", flush=True)
        hop = await kafka_hop(bootstrap, args.rate, args.seconds)
        print(describe("kafka hop", hop), flush=True)
        lat, per_call, sent, cpu = await pipeline_run(bootstrap, args, broker_pid)
        print(describe("pipeline", lat))
        print(
            "CPU ms per call: "
            + ", ".join(f"{name} {ms:.1f}" for name, ms in sorted(cpu.items(), key=lambda kv: -kv[1]))
            + f"; total {sum(cpu.values()):.1f} → this machine's {os.cpu_count()} cores are saturated near "
            f"{os.cpu_count() * 1000 / max(sum(cpu.values()), 0.001):.0f} calls/s"
            + ("" if broker_pid else " (a KAFKA_BOOTSTRAP broker is not counted)")
        )
        dup = sum(1 for v in per_call.values() if v > 1)
        print(f"calls ended {sent:,}; with a note {len(lat):,}; with more than one note {dup}")
        print(f"ratio of p99 pipeline/kafka hop: {pct(lat, 99) / pct(hop, 99):.1f}")


if __name__ == "__main__":
    asyncio.run(main())
