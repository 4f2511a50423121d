"""``pipeline lag GROUP ...``: consumer-group lag in records, per group and partition."""

from __future__ import annotations

import argparse
import asyncio

from pipeline.core.settings import KafkaSettings
from pipeline.kafka.lag import group_lag


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lag", help="consumer-group lag in records (correct for transactional topics)")
    p.add_argument("groups", nargs="+", help="consumer group ids")
    p.add_argument("--bootstrap", help="broker (env KAFKA_BOOTSTRAP)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    bootstrap = args.bootstrap or KafkaSettings.from_env().bootstrap

    async def main() -> None:
        for group in args.groups:
            lag = await group_lag(bootstrap, group)
            total = sum(lag.values())
            print(f"{group}: {total} record(s) behind")
            for tp in sorted(lag, key=lambda t: (t.topic, t.partition)):
                print(f"  {tp.topic}:{tp.partition}  {lag[tp]}")

    asyncio.run(main())
    return 0
