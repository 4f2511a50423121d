"""The per-record work of the stages, without a broker: microseconds per call.

    python bench/micro_records.py [--records 20000] [--repeat 5] [--only NAME ...]

Each item runs over ``--records`` varied inputs (``call.ended`` envelopes of every call type, as
``processor_throughput.py`` produces them, with notes, tags and names of varied lengths), the best
of ``--repeat`` runs in CPU time of this process (the least disturbed by the rest of the machine):

* ``partitioner``: the partition of a record key — aiokafka's ``DefaultPartitioner`` and ours
  (:mod:`pipeline.kafka.partitioner`), for command keys (integration and number: they repeat) and
  raw/audit keys (event ids: each new);
* ``note``: a call note (:func:`pipeline.process.notes.render`, the default template), an SMS note
  and a custom template's note over Kustomer's limit (free text cut);
* ``envelope``: a raw record decoded and checked as the processors do (``from_json``), and the
  envelope an ingest endpoint builds, checks and serialises;
* ``process``: the calls processor's whole transform per record (decode, rules, note, command,
  audit record) for two integrations;
* ``http``: one request through :class:`pipeline.clients.http.HttpExecutor` answered at once
  (the retry policy's own cost);
* ``ingest``: the bookkeeping of one stored webhook (:meth:`IngestApp._stored`: metrics, the
  answer, the log line) at the default log level.

Nothing is asserted; compare the numbers before and after a change.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402
from aiokafka.partitioner import DefaultPartitioner  # noqa: E402
from aiokafka.structs import ConsumerRecord  # noqa: E402

from bench.processor_throughput import call_envelope, config  # noqa: E402
from pipeline.core import templates  # noqa: E402
from pipeline.core.envelope import Envelope  # noqa: E402
from pipeline.core.observability import configure_logging  # noqa: E402
from pipeline.kafka.topics import Topics  # noqa: E402
from pipeline.process import calls, notes  # noqa: E402
from pipeline.process.runner import FLOWS, decisions_transform  # noqa: E402

WORDS = "the customer asked about the invoice and wants a call back tomorrow morning".split()


def best_us(run: Callable[[], Any], count: int, repeat: int) -> float:
    """Microseconds per item of ``run`` (which handles ``count`` items), best of ``repeat``."""
    run()  # warm up (caches, lazily compiled schemas)
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        run()
        best = min(best, time.process_time() - started)
    return best / count * 1e6


def envelopes(n: int) -> list[Envelope]:
    rng = random.Random(7)
    out = []
    for i in range(n):
        env = call_envelope(i, rng)
        payload = env.payload
        payload["call_notes"] = [" ".join(rng.choices(WORDS, k=rng.randint(1, 30))) for _ in range(rng.randint(0, 3))]
        payload["call_tags"] = rng.sample(["Billing", "Sales", "VIP", "Support"], rng.randint(0, 3))
        payload["rating"] = rng.choice([None, 1, 3, 5])
        payload["agent_first_name"] = rng.choice(["Max", "", "Zoë"])
        payload["contact_name"] = rng.choice([None, "Jane Doe", "Ñandú Ltd."])
        out.append(env)
    return out


def call_values(envs: list[Envelope]) -> list[dict[str, Any]]:
    out = []
    for env in envs:
        ctype = calls.call_type(env.payload) or "incoming_answered"
        out.append(calls.note_values(env.payload, "+447700900123", "+442012345678", ctype))
    return out


def sms_values(n: int) -> list[dict[str, Any]]:
    rng = random.Random(11)
    return [
        {
            "sms_id": 88_231_977 + i,
            "direction": rng.choice(["Incoming", "Outgoing"]),
            "sender": "+447700900123",
            "recipient": "+442012345678",
            "cloudtalk_number": rng.choice([None, "Line (+442012345678)"]),
            "agent": rng.choice([None, "Max Yellow <max@example.com>"]),
            "sent": "2026-03-02 09:14:05 UTC",
            "text": " ".join(rng.choices(WORDS, k=rng.randint(0, 40))),
        }
        for i in range(n)
    ]


def bench_partitioner(n: int, repeat: int) -> None:
    from pipeline.kafka.partitioner import partition_index, partitioner

    reference = DefaultPartitioner()
    commands = [f"team{i % 2}|+4477009{i % 500:05d}".encode() for i in range(n)]
    events = [f"cloudtalk:call:{1_002_409_191 + i}".encode() for i in range(n)]
    parts = list(range(6))
    for label, keys in (("command keys (repeating)", commands), ("event ids (each new)", events)):
        before = best_us(lambda keys=keys: [reference(k, parts, parts) for k in keys], n, repeat)

        def ours(keys: list[bytes] = keys) -> None:
            if keys is events:
                partition_index.cache_clear()
            for k in keys:
                partitioner(k, parts, parts)

        after = best_us(ours, n, repeat)
        print(f"partitioner  {label:34} aiokafka {before:7.2f} µs   ours {after:7.2f} µs")


def bench_note(n: int, repeat: int) -> None:
    values = call_values(envelopes(n))
    us = best_us(
        lambda: [notes.render(templates.DEFAULT_CALL_TEMPLATE, v, templates.CALL_MARKER) for v in values],
        n,
        repeat,
    )
    print(f"note         call note (default template)          {us:7.2f} µs")
    sms = sms_values(n)
    us = best_us(
        lambda: [notes.render(templates.DEFAULT_SMS_TEMPLATE, v, templates.SMS_MARKER) for v in sms], n, repeat
    )
    print(f"note         SMS note (default template)           {us:7.2f} µs")
    custom = ("Notes: {notes}", "Agent: {agent}", templates.CALL_MARKER, "Again: {notes}", "Tags: {tags}")
    long = [{**v, "notes": "x" * 6000 + str(i)} for i, v in enumerate(values[: max(1, n // 10)])]
    us = best_us(lambda: [notes.render(custom, v, templates.CALL_MARKER) for v in long], len(long), repeat)
    print(f"note         custom note over the limit (cut)      {us:7.2f} µs")


def bench_envelope(n: int, repeat: int) -> None:
    envs = envelopes(n)
    raws = [env.to_json() for env in envs]
    us = best_us(lambda: [Envelope.from_json(raw, payload=False) for raw in raws], n, repeat)
    print(f"envelope     decode + check a raw record           {us:7.2f} µs")

    def ingest_side() -> None:
        for env in envs:
            data = env.to_dict()
            Envelope.from_dict(data, check=True, payload=False)
            orjson.dumps(data)

    us = best_us(ingest_side, n, repeat)
    print(f"envelope     ingest: to_dict + check + serialise   {us:7.2f} µs")


def bench_process(n: int, repeat: int) -> None:
    envs = envelopes(n)
    records = [ConsumerRecord("raw", 0, i, 0, 0, None, env.to_json(), None, 0, 0, ()) for i, env in enumerate(envs)]
    transform = decisions_transform(FLOWS["calls"], config(2), Topics("bench-"))

    def run() -> None:
        for i in range(0, len(records), 1000):
            transform(records[i : i + 1000])

    us = best_us(run, n, repeat)
    print(f"process      calls transform per record (2 integ.) {us:7.2f} µs")


def bench_http(n: int, repeat: int) -> None:
    import aiohttp

    from pipeline.clients.http import KUSTOMER_RATE_HEADERS, ApiResponse, HttpExecutor

    class Answered(HttpExecutor):
        """Answers every request at once: what is left is the executor's own work."""

        async def _until_not_rate_limited(self, *args: Any) -> ApiResponse:
            return ApiResponse(200, {}, None, "", 0.0)

    async def main() -> float:
        async with aiohttp.ClientSession() as session:
            executor = Answered(session, "kustomer", "bench", KUSTOMER_RATE_HEADERS)

            async def requests() -> None:
                for _ in range(n):
                    await executor.request("GET", "http://127.0.0.1:9/x", "lookup")

            best = float("inf")
            for _ in range(repeat + 1):
                started = time.process_time()
                await requests()
                best = min(best, time.process_time() - started)
            return best / n * 1e6

    print(f"http         one request answered at once          {asyncio.run(main()):7.2f} µs")


def bench_ingest(n: int, repeat: int) -> None:
    from pipeline.ingest.base import IngestApp

    configure_logging("bench", "INFO", stream=io.StringIO())
    app = IngestApp(config(2), None, {})  # type: ignore[arg-type]  # no publisher: nothing is sent
    envs = envelopes(min(n, 2000))
    us = best_us(lambda: [app._stored("cloudtalk/team0", env, 0.001) for env in envs], len(envs), repeat)
    print(f"ingest       a stored webhook's bookkeeping (INFO) {us:7.2f} µs")


ITEMS = {
    "partitioner": bench_partitioner,
    "note": bench_note,
    "envelope": bench_envelope,
    "process": bench_process,
    "http": bench_http,
    "ingest": bench_ingest,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", nargs="*", choices=sorted(ITEMS), default=sorted(ITEMS, key=list(ITEMS).index))
    args = ap.parse_args()
    for name in args.only:
        ITEMS[name](args.records, args.repeat)


if __name__ == "__main__":
    main()
