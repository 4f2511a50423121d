"""``pipeline replay raw|deadletter``: send records through the pipeline again.

* ``replay raw --topic calls --from T --to T`` re-publishes the raw events stored in a time
  window (by their Kafka timestamp) into the same raw topic, marked ``via: replay``. Processors
  evaluate them against the *current* integrations — a newly added integration gets its
  backfill — and the sinks' ledgers make them a no-op for everything already written.
* ``replay deadletter`` sends dead letters back to the topic they came from, with their original
  key, value and headers and a ``dlq.replayed`` header (a sink retries a command it marked
  failed only then). A cursor in ``poller.cursors`` remembers how far the last replay went, so a
  second run does not resend; ``--all`` starts from the beginning. Filters: ``--stage``,
  ``--error-class``, ``--source-topic``; ``--dry-run`` only lists.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import datetime

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.core.envelope import parse_time
from pipeline.core.settings import KafkaSettings, SettingsError
from pipeline.kafka.clients import durable_producer
from pipeline.kafka.cursors import CursorStore
from pipeline.kafka.reading import read_to_end
from pipeline.kafka.records import REPLAYED_HEADER
from pipeline.kafka.topics import Topics

RAW = {"calls": "raw_calls", "sms": "raw_sms", "contacts": "raw_contacts", "customers": "raw_customers"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="re-publish a raw-topic window, or dead letters to their source")
    what = p.add_subparsers(dest="what", metavar="<raw|deadletter>", required=True)
    raw = what.add_parser("raw", help="re-publish raw events of a time window")
    raw.add_argument("--topic", choices=sorted(RAW), required=True)
    raw.add_argument("--from", dest="date_from", required=True, help="ISO-8601 start (UTC when no offset)")
    raw.add_argument("--to", dest="date_to", required=True, help="ISO-8601 end (exclusive)")
    raw.add_argument("--dry-run", action="store_true")
    raw.set_defaults(func=run_raw)
    dl = what.add_parser("deadletter", help="send dead letters back to their source topic")
    dl.add_argument("--stage", help="only dead letters of this stage (dlq.stage)")
    dl.add_argument("--error-class", help="only this error class (dlq.error.class)")
    dl.add_argument("--source-topic", help="only dead letters from this topic")
    dl.add_argument("--all", action="store_true", help="from the beginning, not from the last replay")
    dl.add_argument("--dry-run", action="store_true")
    dl.set_defaults(func=run_deadletter)


def run_raw(args: argparse.Namespace) -> int:
    try:
        start, end = parse_time(args.date_from), parse_time(args.date_to)
    except ValueError as exc:
        raise SettingsError(f"--from/--to: not an ISO-8601 time ({exc})") from None
    if end <= start:
        raise SettingsError("--to must be after --from")
    kafka = KafkaSettings.from_env()
    topic = getattr(Topics(kafka.topic_prefix), RAW[args.topic])

    async def main() -> int:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka.bootstrap, group_id=None, enable_auto_commit=False, isolation_level="read_committed"
        )
        producer = durable_producer(kafka.bootstrap, f"{kafka.client_id}-replay")
        await consumer.start()
        await producer.start()
        n = 0
        try:
            await consumer._client.force_metadata_update()  # noqa: SLF001
            tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
            if not tps:
                raise SettingsError(f"--topic: {topic} does not exist")
            consumer.assign(tps)
            starts = await consumer.offsets_for_times({tp: int(start.timestamp() * 1000) for tp in tps})
            stops = await consumer.offsets_for_times({tp: int(end.timestamp() * 1000) for tp in tps})
            ends = await consumer.end_offsets(tps)
            limits = {tp: (stops[tp].offset if stops[tp] else ends[tp]) for tp in tps}
            for tp in tps:
                if starts[tp] is None:
                    consumer.seek(tp, ends[tp])
                else:
                    consumer.seek(tp, starts[tp].offset)
            futures = []
            async for r in read_to_end(consumer, tps, limits):
                env = orjson.loads(r.value)
                env["via"] = "replay"
                n += 1
                if not args.dry_run:
                    futures.append(
                        await producer.send(topic, key=r.key, value=orjson.dumps(env), headers=list(r.headers or ()))
                    )
                if n % 1000 == 0:
                    print(f"  {n} events …", file=sys.stderr, flush=True)
            await asyncio.gather(*futures)
        finally:
            await producer.stop()
            await consumer.stop()
        print(
            f"{'would replay' if args.dry_run else 'replayed'} {n} event(s) of {topic} "
            f"from {start.isoformat()} to {end.isoformat()}"
        )
        return 0

    return asyncio.run(main())


def run_deadletter(args: argparse.Namespace) -> int:
    kafka = KafkaSettings.from_env()
    topics = Topics(kafka.topic_prefix)

    async def main() -> int:
        cursors = CursorStore(kafka.bootstrap, topics.cursors)
        cursor = None if args.all else await cursors.read("replay.deadletter")
        consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka.bootstrap, group_id=None, enable_auto_commit=False, isolation_level="read_committed"
        )
        producer = durable_producer(kafka.bootstrap, f"{kafka.client_id}-replay")
        await consumer.start()
        await producer.start()
        sent, skipped = 0, 0
        counts: dict[str, int] = {}
        try:
            tp = TopicPartition(topics.deadletter, 0)
            consumer.assign([tp])
            start = int((cursor or {}).get("next_offset", 0))
            consumer.seek(tp, start)
            end = (await consumer.end_offsets([tp]))[tp]
            futures = []
            async for r in read_to_end(consumer, [tp], {tp: end}):
                h = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in r.headers or ()}
                if (
                    (args.stage and h.get("dlq.stage") != args.stage)
                    or (args.error_class and h.get("dlq.error.class") != args.error_class)
                    or (args.source_topic and h.get("dlq.source.topic") != args.source_topic)
                ):
                    skipped += 1
                    continue
                source = h.get("dlq.source.topic")
                if not source:
                    skipped += 1
                    continue
                counts[source] = counts.get(source, 0) + 1
                sent += 1
                if not args.dry_run:
                    headers = [(k, v) for k, v in r.headers or () if not k.startswith("dlq.")]
                    headers.append((REPLAYED_HEADER, str(r.offset).encode()))
                    futures.append(await producer.send(source, key=r.key, value=r.value, headers=headers))
            await asyncio.gather(*futures)
            if not args.dry_run:
                await cursors.write(
                    producer, "replay.deadletter", {"next_offset": end, "at": datetime.now().astimezone().isoformat()}
                )
        finally:
            await producer.stop()
            await consumer.stop()
        verb = "would send" if args.dry_run else "sent"
        print(f"{verb} {sent} dead letter(s) back ({counts or 'none'}); {skipped} left out by filters")
        return 0

    return asyncio.run(main())
