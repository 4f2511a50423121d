"""End-to-end latency: a call ends in CloudTalk → its note is created in Kustomer, at 200 calls/s.

    python bench/end_to_end_latency.py [--rate 200] [--seconds 20] [--numbers 2000] [--known 0.9]

Uses ``KAFKA_BOOTSTRAP`` when set, otherwise starts a local broker. Everything runs as in
production, each a separate process: the CloudTalk simulator (its workflow automation posts
call-ended to ingest, no wrap-up delay), ingest, the calls processor, the Kustomer sink and the
Kustomer simulator (no added latency, a budget high enough never to throttle). Calls are ended
through the simulator at ``--rate`` per second from ``--numbers`` customer numbers; ``--known`` of
them belong to customers the Kustomer simulator holds from the start, the others are unknown (the
first call of such a number also creates its customer). A call's latency is the time from ending
it to the arrival of its note at the Kustomer simulator (same clock).

Baseline, same run: one Kafka hop — produce with ``acks=all``, consume ``read_committed`` — at the
same rate. The pipeline makes three such hops (ingest → raw, processor → commands in a
transaction, sink → ledger and offsets in a transaction) plus the HTTP calls. Prints p50/p99/max,
the ratio of p99s, and that every call has exactly one note. Also, over the load (from before the
first call to the end of the drain):

* CPU per call of every process (``/proc``), and of the pipeline's own stages (ingest + calls
  processor + Kustomer sink) apart from the simulators, the load generator and the broker, next to
  the CPU one Kafka hop costs this process per message (producer + consumer, measured above);
* Kafka transactions per call: ``pipeline_loop_transactions_total`` (committed) from the
  processor's and the sink's ``/metrics`` (the sink's count includes its intents), and, as a
  check, the commit markers on the ledger topic (markers = end offsets − committed records; an
  aborted transaction's records count too, the aborts are printed). With a producer per partition
  the sink's lane for command partition *p* writes only ledger partition *p*, so markers equal the
  sink's transactions; a process's producer writes one marker per ledger partition a transaction
  touched, so there they are more;
* Kustomer requests per logged call, from the simulator's request log: each request is tied to a
  call (a conversation by its externalId, a note by its marker, a customer lookup or create by its
  phone number to the next call of that number), overall, for calls of known customers, and for
  calls of known customers whose customer was already used once in the run (the steady state; the
  floor is 2: the conversation and the note).

Ends with a summary table (the aims apply at 50 and 200 calls/s). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import os
import random
import re
import sys
import tempfile
import textwrap
import time
import urllib.parse
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import orjson  # noqa: E402
from aiokafka import TopicPartition  # noqa: E402

from bench.common import Row, cpu_seconds, kafka, metric_sum, percentile_ms, print_summary, ratio  # noqa: E402
from devkit.net import free_port  # noqa: E402
from devkit.stack import Stack  # noqa: E402
from pipeline.kafka.clients import committed_reader, new_consumer, new_producer  # noqa: E402
from pipeline.kafka.lag import group_lag  # noqa: E402
from pipeline.kafka.reading import partitions_of, read_topic, stop_consumer  # noqa: E402
from pipeline.kafka.topics import Topics, TopicSpec, ensure_topics  # noqa: E402

LINE = "+442012345678"
SECRETS = {
    "B_CT_ID": "bench-id",
    "B_CT_SECRET": "bench-secret",
    "B_K_KEY": "bench-kustomer-key",
    "B_HOOK": "bench-hook-secret",
}
MARKER = re.compile(r"CloudTalk call (\d+)")
EXTERNAL_ID = re.compile(r"cloudtalk-call-(\d+)")
STAGES = ("ingest", "process-calls", "sink-kustomer")  # the pipeline's own processes
TRANSACTIONS = "pipeline_loop_transactions_total"

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


async def commit_markers(bootstrap: str, topic: str) -> int:
    """Offsets of ``topic`` that hold no committed record: one commit marker per transaction that
    wrote to a partition (plus the records of aborted transactions)."""
    consumer = committed_reader(bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await partitions_of(consumer, topic)]
        consumer.assign(tps)
        ends = sum((await consumer.end_offsets(tps)).values())
    finally:
        await stop_consumer(consumer)
    return ends - len(await read_topic(bootstrap, topic))


def requests_per_call(
    log: list[dict], call_number: dict[str, str], customer_phone: dict[str, str]
) -> tuple[Counter, int]:
    """Kustomer API requests per call id, and the requests tied to no call (the sink's start-up).

    A conversation create names its call (externalId), a note create its call (marker) and its
    conversation; a customer lookup or create names a phone number, a customer's conversations its
    customer: those go to the next call of that number whose conversation was created after them
    (the sink handles one number's commands in order), else to its last one."""
    conversation_call: dict[str, str] = {}
    tied: list[tuple[int, str | None, str | None]] = []  # seq, call, phone
    for e in sorted(log, key=lambda e: e["seq"]):
        path, body, effect = e["path"], e.get("body") or {}, str(e.get("effect") or "")
        if not path.startswith("/v1/"):
            continue
        call = phone = None
        parts = path.split("/")
        if path.startswith("/v1/customers/phone="):
            phone = urllib.parse.unquote(path.split("=", 1)[1])
        elif path == "/v1/customers" and e["method"] == "POST":
            phones = body.get("phones") or [{}]
            phone = phones[0].get("phone")
            if effect.startswith("customer.create "):
                customer_phone[effect.split()[1]] = phone
        elif len(parts) == 5 and parts[2] == "customers" and parts[4] == "conversations":
            phone = customer_phone.get(parts[3])
        elif path == "/v1/conversations" and e["method"] == "POST":
            m = EXTERNAL_ID.search(str(body.get("externalId", "")))
            call = m.group(1) if m else None
            if call and effect.startswith("conversation.create "):
                conversation_call[effect.split()[1]] = call
        elif path.startswith("/v1/notes") or (len(parts) == 5 and parts[2] == "conversations"):
            m = MARKER.search(orjson.dumps(body).decode())
            call = m.group(1) if m else conversation_call.get(str(body.get("conversation") or parts[3]))
        tied.append((e["seq"], call, phone))
    firsts: dict[str, list[tuple[int, str]]] = {}  # phone -> (seq of the call's first own request, call)
    seen: set[str] = set()
    for seq, call, _ in tied:
        if call and call not in seen:
            seen.add(call)
            if call in call_number:
                firsts.setdefault(call_number[call], []).append((seq, call))
    counts: Counter = Counter()
    untied = 0
    for seq, call, phone in tied:
        if call is None and phone in firsts:
            calls = firsts[phone]
            i = bisect.bisect_left(calls, (seq, ""))
            call = calls[min(i, len(calls) - 1)][1]
        if call is None:
            untied += 1
        else:
            counts[call] += 1
    return counts, untied


@dataclass
class Run:
    latencies: list[float]
    notes_per_call: Counter
    ended: int
    cpu_ms: dict[str, float]  # per call, by process
    transactions: dict[str, float]  # committed (and aborted) over the load, by what counted them
    requests: Counter  # Kustomer requests per call id
    untied_requests: int
    known_calls: set[str]  # calls from numbers of customers Kustomer held from the start
    repeat_calls: set[str]  # calls whose number had a call before in the run


async def pipeline_run(bootstrap: str, args: argparse.Namespace, broker_pid: int | None) -> Run:
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
        metrics_urls = {
            name: f"http://127.0.0.1:{stack.services[name].metrics_port}/metrics"
            for name in ("process-calls", "sink-kustomer")
        }
        rng = random.Random(11)
        numbers = [f"+4474009{n:05d}" for n in rng.sample(range(10_000, 99_999), args.numbers)]
        known_numbers = set(numbers[: round(len(numbers) * args.known)])
        ended: dict[str, float] = {}
        call_number: dict[str, str] = {}
        async with aiohttp.ClientSession() as http:
            seed = [{"name": f"Customer {n[-5:]}", "phones": [{"type": "mobile", "phone": n}]} for n in known_numbers]
            async with http.post(f"{k}/_sim/seed", data=orjson.dumps({"customers": seed})) as r:
                assert r.status < 300, await r.text()
                customer_phone = dict(zip((await r.json())["customers"], known_numbers, strict=True))
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
                number = rng.choice(numbers)
                spec = {
                    "direction": "incoming",
                    "status": "answered",
                    "internal_number": LINE,
                    "external_number": number,
                    "talking_time": 60,
                }
                t = time.time()
                async with http.post(f"{ct}/_sim/calls", data=orjson.dumps(spec)) as r:
                    call = await r.json()
                call_id = str(call.get("call_id") or call.get("id"))
                ended[call_id] = t
                call_number[call_id] = number

            n = int(args.rate * args.seconds)
            tasks = []
            pids = {name: svc.proc.pid for name, svc in stack.services.items()} | {"load generator": os.getpid()}
            if broker_pid:
                pids["kafka broker"] = broker_pid
            markers0 = await commit_markers(bootstrap, topics.kustomer_ledger)
            count0 = {
                (name, outcome): await metric_sum(url, TRANSACTIONS, outcome=outcome)
                for name, url in metrics_urls.items()
                for outcome in ("committed", "aborted")
            }
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
            count1 = {key: await metric_sum(metrics_urls[key[0]], TRANSACTIONS, outcome=key[1]) for key in count0}
            transactions = {
                f"{name} {outcome}": count1[name, outcome] - count0[name, outcome] for name, outcome in count0
            }
            transactions["sink-kustomer ledger markers"] = (
                await commit_markers(bootstrap, topics.kustomer_ledger) - markers0
            )
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
        requests, untied = requests_per_call(log, call_number, customer_phone)
        used: set[str] = set()
        repeat = set()
        for call in sorted(ended, key=ended.__getitem__):
            if call_number[call] in used:
                repeat.add(call)
            used.add(call_number[call])
        known = {c for c, number in call_number.items() if number in known_numbers}
        return Run(latencies, per_call, len(ended), cpu, transactions, requests, untied, known, repeat)
    finally:
        stack.stop_all()


def summary_rows(args: argparse.Namespace, run: Run, hop: list[float], hop_cpu_ms: float) -> list[Row]:
    rate = args.rate
    logged = set(run.notes_per_call)
    t = run.transactions
    processor = t["process-calls committed"]
    sink_all = t["sink-kustomer committed"]  # its batches and its intents
    per_call = (processor + sink_all) / run.ended
    tx_aim = {50.0: 1.2, 200.0: 0.3}.get(rate)
    stages_ms = sum(run.cpu_ms.get(name, 0.0) for name in STAGES)

    def requests(calls: set[str]) -> float:
        calls = calls & logged
        return sum(run.requests[c] for c in calls) / len(calls) if calls else float("nan")

    steady = requests(run.known_calls & run.repeat_calls)
    p99 = pct(run.latencies, 99)
    at_200 = rate == 200.0
    dup = sum(1 for v in run.notes_per_call.values() if v > 1)
    return [
        Row(
            f"Kafka transactions per call at {rate:.0f} calls/s (processor + sink incl. intents)",
            f"{per_call:.2f} ({processor:.0f} + {sink_all:.0f} for {run.ended:,} calls)",
            "3.00 (one per step, unbatched)",
            f"{per_call / 3:.2f}",
            f"<= {tx_aim}" if tx_aim else "<= 1.2 at 50/s, <= 0.3 at 200/s",
            per_call <= tx_aim if tx_aim else None,
        ),
        Row(
            f"CPU per call of ingest + processor + sink at {rate:.0f} calls/s",
            f"{stages_ms:.2f} ms",
            f"{hop_cpu_ms:.2f} ms (one Kafka hop)",
            ratio(stages_ms, hop_cpu_ms),
            "<= 2 ms at 200/s",
            stages_ms <= 2 if at_200 else None,
        ),
        Row(
            f"end-to-end p99, call ended -> note, {rate:.0f} calls/s, all on {os.cpu_count()} cores",
            f"{p99:.0f} ms",
            f"{pct(hop, 99):.0f} ms (one Kafka hop)",
            ratio(p99, pct(hop, 99)),
            "<= 1000 ms at 200/s",
            p99 <= 1000 if at_200 else None,
        ),
        Row(
            "Kustomer requests per logged call, known customer used before (steady state)",
            f"{steady:.2f} ({len(run.known_calls & run.repeat_calls & logged):,} calls)",
            "2 (floor: conversation + note)",
            f"{steady / 2:.2f}",
            "<= 2.05",
            steady <= 2.05,
        ),
        Row(
            "Kustomer requests per logged call, all calls",
            f"{requests(set(run.notes_per_call)):.2f} ({len(logged):,} calls)",
            "2 (floor: conversation + note)",
            f"{requests(set(run.notes_per_call)) / 2:.2f}",
            "—",
            None,
        ),
        Row(
            "calls with exactly one note",
            f"{len(logged) - dup:,} of {run.ended:,}",
            "—",
            "—",
            "all",
            len(logged) - dup == run.ended,
        ),
    ]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--numbers", type=int, default=2000)
    ap.add_argument("--known", type=float, default=0.9, help="share of the numbers whose customer Kustomer holds")
    args = ap.parse_args()
    async with kafka() as (bootstrap, broker_pid):
        print(
            f"{args.rate:.0f} calls/s for {args.seconds:.0f} s from {args.numbers:,} numbers "
            f"({args.known:.0%} of them known customers); LOOP_PRODUCERS="
            f"{os.environ.get('LOOP_PRODUCERS') or 'process'}, LOOP_COMMIT_INTERVAL_MS="
            f"{os.environ.get('LOOP_COMMIT_INTERVAL_MS') or 'default'}",
            flush=True,
        )
        cpu0 = time.process_time()
        hop = await kafka_hop(bootstrap, args.rate, args.seconds)
        hop_cpu_ms = (time.process_time() - cpu0) / max(len(hop), 1) * 1000
        print(describe("kafka hop", hop) + f"  CPU {hop_cpu_ms:.2f} ms per message (producer + consumer)", flush=True)
        run = await pipeline_run(bootstrap, args, broker_pid)
    cpu = run.cpu_ms
    print(describe("pipeline", run.latencies))
    print(
        "CPU ms per call: "
        + ", ".join(f"{name} {ms:.2f}" for name, ms in sorted(cpu.items(), key=lambda kv: -kv[1]))
        + f"; total {sum(cpu.values()):.1f} → this machine's {os.cpu_count()} cores are saturated near "
        f"{os.cpu_count() * 1000 / max(sum(cpu.values()), 0.001):.0f} calls/s"
        + ("" if broker_pid else " (a KAFKA_BOOTSTRAP broker is not counted)")
    )
    print(
        f"CPU ms per call of the pipeline's own stages ({' + '.join(STAGES)}): "
        f"{sum(cpu.get(name, 0.0) for name in STAGES):.2f}"
    )
    print(
        "Kafka transactions over the load: "
        + ", ".join(f"{what} {n:.0f}" for what, n in run.transactions.items())
        + f" (per call: {', '.join(f'{what} {n / run.ended:.2f}' for what, n in run.transactions.items())})"
    )
    logged = set(run.notes_per_call)
    groups = {
        "all": logged,
        "known customer": run.known_calls & logged,
        "known customer, used before": run.known_calls & run.repeat_calls & logged,
        "known customer, first call": (run.known_calls - run.repeat_calls) & logged,
        "unknown number, first call": (logged - run.known_calls) - run.repeat_calls,
    }
    print(
        "Kustomer requests per logged call: "
        + "; ".join(
            f"{name} {sum(run.requests[c] for c in calls) / len(calls):.2f} ({len(calls):,})"
            for name, calls in groups.items()
            if calls
        )
        + f"; requests tied to no call {run.untied_requests}"
    )
    dup = sum(1 for v in run.notes_per_call.values() if v > 1)
    print(f"calls ended {run.ended:,}; with a note {len(run.latencies):,}; with more than one note {dup}")
    print(f"ratio of p99 pipeline/kafka hop: {pct(run.latencies, 99) / pct(hop, 99):.1f}")
    print_summary(f"end to end at {args.rate:.0f} calls/s", summary_rows(args, run, hop, hop_cpu_ms))


if __name__ == "__main__":
    asyncio.run(main())
