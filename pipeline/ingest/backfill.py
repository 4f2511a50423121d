"""``pipeline backfill calls --from T --to T``: publish a time window of CloudTalk's call history
into the raw topic. The events carry the same ids as the live ones, so whatever was already
effected is recognised downstream and only what is missing is written.

``--integration NAME`` evaluates the window for that integration alone (a newly added one): the
others see nothing. ``backfill sms`` replays the raw SMS topic instead (CloudTalk's API keeps no
SMS history), as ``pipeline replay raw --topic sms`` does."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import datetime

import aiohttp
import orjson

from pipeline.core.config import load_config
from pipeline.core.envelope import parse_time
from pipeline.core.settings import KafkaSettings, ServiceSettings, SettingsError
from pipeline.ingest.pollers import CallHistoryPoller, cloudtalk_poller_client
from pipeline.kafka.clients import connect_backoff_from_env, durable_producer, start_when_reachable, started
from pipeline.kafka.cursors import CursorStore
from pipeline.kafka.republish import known_integration, republish_window
from pipeline.kafka.service import start_logging
from pipeline.kafka.topics import Topics


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backfill", help="publish a time window of a source API into its raw topic")
    p.add_argument("source", choices=["calls", "sms"])
    p.add_argument("--from", dest="date_from", required=True, help="start, ISO-8601 (UTC when no offset)")
    p.add_argument("--to", dest="date_to", required=True, help="end, ISO-8601 (inclusive)")
    p.add_argument("--config", help="integrations file (env PIPELINE_CONFIG)")
    p.add_argument("--integration", help="for this integration alone (a newly added one): the others see nothing")
    p.set_defaults(func=run_backfill)


def _window(args: argparse.Namespace) -> tuple[datetime, datetime]:
    try:
        start, end = parse_time(args.date_from), parse_time(args.date_to)
    except ValueError as exc:
        raise SettingsError(f"--from/--to: not an ISO-8601 time ({exc})") from None
    if end <= start:
        raise SettingsError(f"--to ({end.isoformat()}) must be after --from ({start.isoformat()})")
    return start, end


def run_backfill(args: argparse.Namespace) -> int:
    start, end = _window(args)
    if args.source == "sms":
        # CloudTalk's API has no SMS history: the SMS stored in the raw topic are evaluated again
        if args.integration:
            known_integration(args.integration, args.config)
        kafka = KafkaSettings.from_env()
        topic = Topics(kafka.topic_prefix).raw_sms
        print("backfill sms: CloudTalk keeps no SMS history; the raw SMS topic is replayed", file=sys.stderr)
        n = asyncio.run(republish_window(kafka, topic, start, end, for_integration=args.integration))
        print(orjson.dumps({"replayed": n, "topic": topic, "integration": args.integration}).decode())
        return 0
    settings = ServiceSettings.from_env()
    start_logging("backfill", settings)
    config = load_config(args.config or settings.config_path)
    if args.integration:
        known_integration(args.integration, args.config)
    topics = Topics(settings.kafka.topic_prefix)

    backoff_max_s = connect_backoff_from_env()

    async def main() -> dict[str, int]:
        # a broker that cannot be reached yet is waited for (one log line, capped backoff); Ctrl-C ends it
        producer = await start_when_reachable(
            lambda: started(durable_producer(settings.kafka.bootstrap, f"{settings.kafka.client_id}-backfill")),
            bootstrap=settings.kafka.bootstrap,
            what="backfill",
            backoff_max_s=backoff_max_s,
        )
        assert producer is not None  # no stop event: the wait ends only when the broker answers
        async with aiohttp.ClientSession() as session:
            try:
                poller = CallHistoryPoller(
                    cloudtalk_poller_client(session, config),
                    producer,
                    topics,
                    CursorStore(settings.kafka.bootstrap, topics.cursors),
                    lag_s=0,
                )
                print(f"backfill calls {start.isoformat()} .. {end.isoformat()}", file=sys.stderr, flush=True)
                return await poller.publish_window(
                    start, end, "backfill", progress=True, for_integration=args.integration
                )
            finally:
                await producer.stop()

    counts = asyncio.run(main())
    print(orjson.dumps(counts).decode())
    return 0
