"""``pipeline topics ensure|list``: the topic catalogue on the broker."""

from __future__ import annotations

import argparse
import asyncio

from pipeline.core.settings import KafkaSettings
from pipeline.kafka.topics import Topics, ensure_topics


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("topics", help="create missing topics, report drift (never changes existing topics)")
    p.add_argument(
        "action",
        choices=["ensure", "list"],
        help="ensure: create missing topics and report any whose settings differ (exit 1 on drift); "
        "list: print the catalogue",
    )
    p.add_argument("--bootstrap", help="broker (env KAFKA_BOOTSTRAP)")
    p.add_argument("--prefix", help="topic name prefix (env TOPIC_PREFIX)")
    p.add_argument("--replication-factor", type=int, default=1)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    kafka = KafkaSettings.from_env()
    topics = Topics(args.prefix if args.prefix is not None else kafka.topic_prefix)
    if args.action == "list":
        for spec in topics.specs():
            policy = spec.config.get("cleanup.policy", "delete")
            print(f"{spec.name:40} partitions={spec.partitions:<3} cleanup={policy:8} {spec.doc}")
        return 0
    report = asyncio.run(ensure_topics(args.bootstrap or kafka.bootstrap, topics.specs(), args.replication_factor))
    for line in report.lines():
        print(line)
    print(f"{len(report.created)} created, {len(report.unchanged)} unchanged, {len(report.differs)} differ")
    return 0 if report.ok else 1
