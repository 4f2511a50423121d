"""``pipeline replay raw|deadletter``: send records through the pipeline again.

* ``replay raw --topic calls --from T --to T`` re-publishes the raw events stored in a time
  window (by their Kafka timestamp) into the same raw topic, marked ``via: replay``. Processors
  evaluate them against the *current* integrations — a newly added integration gets its
  backfill — and the sinks' ledgers make them a no-op for everything already written. With
  ``--integration NAME`` they are evaluated for that integration alone (``meta.for_integration``):
  the others see nothing, not even an audit record.
* ``replay deadletter`` sends dead letters back to the topic they came from, with their original
  key, value and headers and a ``dlq.replayed`` header (a sink retries a command it marked
  failed only then). A cursor in ``poller.cursors`` remembers how far the last replay without
  filters went, so a second run does not resend; ``--all`` starts from the beginning. Filters:
  ``--stage``, ``--reason`` (``--error-class``), ``--topic`` (``--source-topic``), ``--since``,
  ``--until`` — a filtered replay leaves the cursor where it was, so what it left out is still
  sent by the next run without filters (a replay is harmless twice: the ledgers skip what is
  done). ``--dry-run`` only lists. On a terminal it asks before sending; elsewhere it needs
  ``--yes``.

Both show progress with rate and ETA on stderr (a line rewritten in place on a terminal, a plain
line every 10 s otherwise); the result is one line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from datetime import datetime

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from pipeline.core.envelope import parse_time
from pipeline.core.progress import Progress
from pipeline.core.settings import KafkaSettings, SettingsError
from pipeline.kafka.clients import committed_reader, durable_producer
from pipeline.kafka.cursors import CursorStore
from pipeline.kafka.reading import partitions_of, read_to_end, stop_consumer
from pipeline.kafka.records import REPLAYED_HEADER
from pipeline.kafka.republish import known_integration, republish_window
from pipeline.kafka.topics import Topics
from pipeline.ops.deadletters import REPLAY_CURSOR, add_filters, window_of
from pipeline.ops.inspect import FETCH_WAIT_MS, DeadLetter

RAW = {"calls": "raw_calls", "sms": "raw_sms", "contacts": "raw_contacts", "customers": "raw_customers"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="re-publish a raw-topic window, or dead letters to their source")
    what = p.add_subparsers(dest="what", metavar="<raw|deadletter>", required=True)
    raw = what.add_parser("raw", help="re-publish raw events of a time window")
    raw.add_argument("--topic", choices=sorted(RAW), required=True)
    raw.add_argument("--from", dest="date_from", required=True, help="ISO-8601 start (UTC when no offset)")
    raw.add_argument("--to", dest="date_to", required=True, help="ISO-8601 end (exclusive)")
    raw.add_argument("--dry-run", action="store_true")
    raw.add_argument("--integration", help="evaluate the events for this integration alone (the others see nothing)")
    raw.add_argument("--config", help="integrations file (env PIPELINE_CONFIG), to check --integration")
    raw.set_defaults(func=run_raw)
    dl = what.add_parser("deadletter", help="send dead letters back to their source topic")
    add_filters(dl)
    dl.add_argument("--all", action="store_true", help="from the beginning, not from the last replay")
    dl.add_argument("--dry-run", action="store_true", help="list what would be sent, send nothing")
    dl.add_argument("--yes", "-y", action="store_true", help="do not ask (needed when not on a terminal)")
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
    only = getattr(args, "integration", None)
    if only:
        known_integration(only, getattr(args, "config", None))
    n = asyncio.run(republish_window(kafka, topic, start, end, for_integration=only, dry_run=args.dry_run))
    print(
        f"{'would replay' if args.dry_run else 'replayed'} {n} event(s) of {topic} "
        f"from {start.isoformat()} to {end.isoformat()}" + (f" for integration {only}" if only else "")
    )
    return 0


def run_deadletter(args: argparse.Namespace) -> int:
    kafka = KafkaSettings.from_env()
    topics = Topics(kafka.topic_prefix)
    since, until = window_of(args)
    filtered = bool(args.stage or args.reason or args.topic or since or until)
    interactive = sys.stdin.isatty() and sys.stderr.isatty()
    if not (args.dry_run or args.yes or interactive):
        print(
            "pipeline replay deadletter: not on a terminal, so it cannot ask: add --yes to send, --dry-run to list",
            file=sys.stderr,
        )
        return 2

    async def main() -> int:
        cursors = CursorStore(kafka.bootstrap, topics.cursors)
        cursor = None if args.all else await cursors.read(REPLAY_CURSOR)
        consumer = committed_reader(kafka.bootstrap, fetch_max_wait_ms=FETCH_WAIT_MS)
        await consumer.start()
        chosen: list[tuple[ConsumerRecord, DeadLetter]] = []
        skipped = 0
        try:
            tp = TopicPartition(topics.deadletter, 0)
            if not await partitions_of(consumer, topics.deadletter):
                raise SettingsError(f"{topics.deadletter}: the topic does not exist (`pipeline topics ensure`)")
            consumer.assign([tp])
            start = int((cursor or {}).get("next_offset", 0))
            consumer.seek(tp, start)
            end = (await consumer.end_offsets([tp]))[tp]
            async for r in read_to_end(consumer, [tp], {tp: end}):
                d = DeadLetter.from_record(r)
                failed = _time_or_none(d.failed_at)
                in_window = (since is None or (failed is not None and failed >= since)) and (
                    until is None or (failed is not None and failed < until)
                )
                if not (d.matches(args.stage, args.reason, args.topic, topics.prefix) and in_window):
                    skipped += 1
                    continue
                if d.source_topic == "?":
                    skipped += 1
                    continue
                chosen.append((r, d))
        finally:
            await stop_consumer(consumer)
        counts = Counter(d.source_topic for _, d in chosen)
        where = ", ".join(f"{t} ({n})" for t, n in sorted(counts.items())) or "nothing"
        since_text = f" after offset {start}" if start else ""
        if args.dry_run or not chosen:
            for _, d in chosen:
                print(
                    f"  {d.offset}  {d.stage}  {d.error_class}  {d.source_topic}[{d.source_partition}]"
                    f"@{d.source_offset}  {d.event_id or d.key or ''}"
                )
            verb = "would send" if args.dry_run else "sent"
            print(f"{verb} {len(chosen)} dead letter(s) back{since_text} ({where}); {skipped} left out by filters")
            return 0
        if not args.yes:
            print(
                f"send {len(chosen)} dead letter(s){since_text} back to {where}? [y/N] ",
                end="",
                file=sys.stderr,
                flush=True,
            )
            answer = (await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)).strip().lower()
            if answer not in ("y", "yes"):
                print("nothing sent")
                return 1
        producer = durable_producer(kafka.bootstrap, f"{kafka.client_id}-replay")
        await producer.start()
        progress = Progress("replay deadletter", unit="dead letters")
        try:
            futures = []
            for i, (r, d) in enumerate(chosen, 1):
                headers = [(k, v) for k, v in r.headers or () if not k.startswith("dlq.")]
                headers.append((REPLAYED_HEADER, str(r.offset).encode()))
                futures.append(await producer.send(d.source_topic, key=r.key, value=r.value, headers=headers))
                progress.update(i, total=len(chosen))
            await asyncio.gather(*futures)
            progress.close()
            if not filtered:
                await cursors.write(
                    producer, REPLAY_CURSOR, {"next_offset": end, "at": datetime.now().astimezone().isoformat()}
                )
        finally:
            await producer.stop()
        print(f"sent {len(chosen)} dead letter(s) back{since_text} ({where}); {skipped} left out by filters")
        return 0

    return asyncio.run(main())


def _time_or_none(value: str) -> datetime | None:
    try:
        return parse_time(value)
    except ValueError:
        return None
