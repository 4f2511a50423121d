"""``pipeline copy``: copy one topic into another exactly once through the transactional loop.

Keys, values and headers are kept. ``--reject-matching`` sends records whose value matches a
regular expression to the dead-letter topic instead (with the error headers), which is how an
operator quarantines known-bad records while moving a topic.
"""

from __future__ import annotations

import argparse
import asyncio
import re

from aiokafka.structs import ConsumerRecord

from pipeline.core.decisions import Reject
from pipeline.core.settings import ServiceSettings
from pipeline.kafka.loop import LoopSettings, TransactionalLoop, TransformStage
from pipeline.kafka.records import OutRecord, map_records
from pipeline.kafka.service import run_loop_service, start_logging
from pipeline.kafka.topics import Topics


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("copy", help="copy a topic into another exactly once (keys, values, headers kept)")
    p.add_argument("source")
    p.add_argument("destination")
    p.add_argument("--group", required=True, help="consumer group (its committed offsets say where to resume)")
    p.add_argument(
        "--reject-matching",
        metavar="REGEX",
        help="dead-letter records whose value matches REGEX instead of copying them",
    )
    p.add_argument("--deadletter", help="dead-letter topic (default: the catalogue's deadletter)")
    p.set_defaults(func=run)


def copy_transform(destination: str, reject: re.Pattern[bytes] | None):
    def one(record: ConsumerRecord):
        if reject is not None and record.value is not None and reject.search(record.value):
            raise Reject("RejectedByPattern", f"value matches {reject.pattern.decode()!r}")
        return (OutRecord(destination, record.value, record.key, tuple(record.headers or ())),)

    return map_records(one)


def run(args: argparse.Namespace) -> int:
    settings = ServiceSettings.from_env()
    start_logging("copy", settings)
    reject = re.compile(args.reject_matching.encode()) if args.reject_matching else None
    deadletter = args.deadletter or Topics(settings.kafka.topic_prefix).deadletter
    loop = TransactionalLoop(
        LoopSettings.of(
            settings.kafka,
            group_id=args.group,
            input_topics=(args.source,),
            deadletter_topic=deadletter,
        ),
        TransformStage("copy", copy_transform(args.destination, reject)),
    )
    asyncio.run(run_loop_service("copy", loop, settings))
    return 0
