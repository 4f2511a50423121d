"""Ingest: CloudTalk call-ended webhooks per second with a durable ack, and latency at 1,000/s, at
the default log level (INFO) and at WARNING.

    python bench/ingest_webhooks.py [--requests 20000] [--concurrency 64] [--rate 1000] [--seconds 10]

Uses ``KAFKA_BOOTSTRAP`` when set, otherwise starts a local broker. Three servers, each a
separate process (so each uses at most one core), measured the same way in the same run:

* baseline: a bare aiohttp app that reads the body and answers 202 — the HTTP floor;
* ingest: ``pipeline ingest`` — shared-secret check, 256 KiB limit, JSON and schema check,
  envelope, publish with ``acks=all`` and answer 202 only after the broker acknowledged — once
  at the default log level (``LOG_LEVEL=INFO``) and once at ``WARNING``.

Two measurements per server: (1) throughput — ``--requests`` POSTs over ``--concurrency``
connections; (2) latency — an open loop at ``--rate`` requests/s for ``--seconds`` (each latency
counted from the request's scheduled time, so a stall is not hidden). The load generator runs in
this process and the broker on the same machine: on 2 cores the three share the CPU, so the
absolute numbers are a floor. Ends with a summary table. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import random
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

from bench.common import Row, kafka, percentile_ms, print_summary, ratio  # noqa: E402
from bench.processor_throughput import call_envelope  # noqa: E402
from devkit.net import free_port  # noqa: E402
from devkit.stack import Stack  # noqa: E402
from pipeline.kafka.reading import read_topic  # noqa: E402
from pipeline.kafka.topics import Topics, ensure_topics  # noqa: E402

SECRET = "bench-webhook-secret"
BASELINE_APP = textwrap.dedent("""
    import sys
    from aiohttp import web
    async def hook(request):
        await request.read()
        return web.Response(status=202, text='{"stored":true}', content_type="application/json")
    app = web.Application(client_max_size=256 * 1024)
    app.router.add_post("/ingest/cloudtalk/{integration}/call-ended", hook)
    app.router.add_get("/readyz", lambda r: web.Response(text="ok"))
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
""")


def bodies(n: int, offset: int) -> list[bytes]:
    rng = random.Random(offset)
    return [orjson.dumps(call_envelope(offset + i, rng).payload) for i in range(n)]


async def throughput(url: str, payloads: list[bytes], concurrency: int, answers: Counter[int]) -> float:
    """Webhooks/s; every answer's status is counted in ``answers``."""
    headers = {"Content-Type": "application/json", "X-Pipeline-Secret": SECRET}
    queue = iter(payloads)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:

        async def worker() -> None:
            for body in queue:
                async with http.post(url, data=body, headers=headers) as r:
                    await r.read()
                    answers[r.status] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(payloads) / (time.perf_counter() - started)


async def latency(url: str, payloads: list[bytes], rate: float, answers: Counter[int]) -> list[float]:
    headers = {"Content-Type": "application/json", "X-Pipeline-Secret": SECRET}
    out: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512)) as http:

        async def one(body: bytes, due: float) -> None:
            async with http.post(url, data=body, headers=headers) as r:
                await r.read()
                answers[r.status] += 1
            out.append(time.perf_counter() - due)

        t0 = time.perf_counter() + 0.05
        tasks = []
        for i, body in enumerate(payloads):
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(body, due)))
        await asyncio.gather(*tasks)
    return out


pct = percentile_ms


async def measure(name: str, url: str, args: argparse.Namespace, offset: int) -> dict[str, float]:
    answers: Counter[int] = Counter()
    await throughput(url, bodies(500, offset), args.concurrency, answers)
    rps = await throughput(url, bodies(args.requests, offset + 1_000_000), args.concurrency, answers)
    lat = await latency(url, bodies(int(args.rate * args.seconds), offset + 2_000_000), args.rate, answers)
    failed = sum(n for status, n in answers.items() if status != 202)
    result = {"rps": rps, "p50": pct(lat, 50), "p99": pct(lat, 99), "failed": failed, "acknowledged": answers[202]}
    others = ", ".join(f"{n} x {status}" for status, n in sorted(answers.items()) if status != 202)
    others = f" ({others})" if others else ""
    print(
        f"{name:15} {rps:8,.0f} webhooks/s (x{args.concurrency} connections)   at {args.rate:,.0f}/s: "
        f"p50 {result['p50']:6.1f} ms  p99 {result['p99']:6.1f} ms   non-202: {failed}{others}",
        flush=True,
    )
    return result


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    async with kafka() as (bootstrap, _):
        await run(bootstrap, args)


async def run(bootstrap: str, args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    topics = Topics(f"bench{uuid.uuid4().hex[:6]}-")
    await ensure_topics(bootstrap, topics.specs())
    config = work / "integrations.yaml"
    config.write_text(
        textwrap.dedent("""
        cloudtalk: {base_url: "http://127.0.0.1:9/api", key_id: {env: BENCH_SECRET}, key_secret: {env: BENCH_SECRET}}
        integrations:
          - name: support
            active: true
            kustomer: {base_url: "http://127.0.0.1:9", api_key: {env: BENCH_SECRET}}
            cloudtalk_webhook_secret: {env: BENCH_SECRET}
    """)
    )
    stack = Stack(
        work,
        {
            "KAFKA_BOOTSTRAP": bootstrap,
            "TOPIC_PREFIX": topics.prefix,
            "PIPELINE_CONFIG": str(config),
            "BENCH_SECRET": SECRET,
            "LOG_LEVEL": "WARNING",
            "INGEST_RATE_PER_S": "0",  # the benchmark measures throughput, not the rate limit
        },
    )
    ports = {"baseline": free_port(), "INFO": free_port(), "WARNING": free_port()}
    baseline_script = work / "baseline_app.py"
    baseline_script.write_text(BASELINE_APP)
    try:
        for level in ("INFO", "WARNING"):
            stack.add(
                f"ingest-{level}",
                ["ingest", "--port", str(ports[level])],
                {"LOG_LEVEL": level},
                health=f"http://127.0.0.1:{ports[level]}/readyz",
            )
        await stack.wait_ready(timeout=60)
        baseline = await asyncio.create_subprocess_exec(sys.executable, str(baseline_script), str(ports["baseline"]))
        await asyncio.sleep(1.5)
        print(
            f"{args.requests:,} POSTs over {args.concurrency} connections, then {args.rate:,.0f}/s for "
            f"{args.seconds:.0f} s; call-ended bodies of ~{len(bodies(1, 0)[0])} bytes",
            flush=True,
        )
        path = "/ingest/cloudtalk/support/call-ended"
        base = await measure("baseline", f"http://127.0.0.1:{ports['baseline']}{path}", args, 0)
        info = await measure("ingest INFO", f"http://127.0.0.1:{ports['INFO']}{path}", args, 10_000_000)
        warning = await measure("ingest WARNING", f"http://127.0.0.1:{ports['WARNING']}{path}", args, 20_000_000)
        stored = len(await read_topic(bootstrap, topics.raw_calls))
        sent = info["acknowledged"] + warning["acknowledged"]
        print(f"stored in {topics.raw_calls}: {stored:,} of {sent:,} acknowledged (202) webhooks")
        print(
            f"ratio ingest/baseline: throughput at INFO {info['rps'] / base['rps']:.2f}, at WARNING "
            f"{warning['rps'] / base['rps']:.2f}; p99 at {args.rate:,.0f}/s {info['p99']:.1f} ms (INFO) vs "
            f"{base['p99']:.1f} ms"
        )
        baseline.terminate()
        await baseline.wait()
    finally:
        stack.stop_all()
    failed = info["failed"] + warning["failed"]
    print_summary(
        "ingest webhooks",
        [
            Row(
                "ingest webhooks/s at INFO (default)",
                f"{info['rps']:,.0f}/s",
                f"{base['rps']:,.0f}/s (bare aiohttp)",
                ratio(info["rps"], base["rps"]),
                ">= 5k/s",
                info["rps"] >= 5000,
            ),
            Row(
                "ingest webhooks/s at WARNING",
                f"{warning['rps']:,.0f}/s",
                f"{base['rps']:,.0f}/s (bare aiohttp)",
                ratio(warning["rps"], base["rps"]),
                "—",
                None,
            ),
            Row(
                "ingest at INFO vs at WARNING",
                f"{info['rps']:,.0f}/s",
                f"{warning['rps']:,.0f}/s",
                ratio(info["rps"], warning["rps"]),
                "—",
                None,
            ),
            Row(
                f"ingest p99 at {args.rate:,.0f}/s, INFO",
                f"{info['p99']:.1f} ms",
                f"{base['p99']:.1f} ms",
                ratio(info["p99"], base["p99"]),
                "<= 50 ms",
                info["p99"] <= 50,
            ),
            Row(
                "acknowledged (202) webhooks stored",
                f"{stored:,} of {sent:,} ({failed} answered non-202)",
                "—",
                "—",
                "every acknowledged one stored",
                stored == sent,
            ),
        ],
    )


if __name__ == "__main__":
    asyncio.run(main())
