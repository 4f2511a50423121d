"""``pipeline deadletters list|show``: what is in the dead-letter topic, and why.

* ``list`` — one line per dead letter: its offset, when it failed, the stage, the reason (the
  error class), the source record (topic, partition, offset), the event, the message. Filters:
  ``--stage``, ``--reason``, ``--topic`` (the source topic, with or without the prefix),
  ``--since``/``--until`` (when it was dead-lettered). ``--json`` prints a JSON array.
* ``show OFFSET…`` — everything of the dead letters at these offsets: the message in full, the
  original headers, key and value (JSON pretty-printed).

After a fix, ``pipeline replay deadletter`` (same filters) sends them back to their source topic.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import orjson

from pipeline.core.envelope import parse_time
from pipeline.core.settings import KafkaSettings, SettingsError
from pipeline.kafka.topics import Topics
from pipeline.ops.inspect import DeadLetter, dumps, one_line, parse_when, read_window, table

REPLAY_CURSOR = "replay.deadletter"  # where ``replay deadletter`` keeps how far it went


def add_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", help="only dead letters of this stage (process-calls, sink-kustomer, …)")
    p.add_argument("--reason", "--error-class", dest="reason", help="only this error class (SchemaError, …)")
    p.add_argument("--topic", "--source-topic", dest="topic", help="only dead letters from this source topic")
    p.add_argument("--since", help="dead-lettered at or after: 7d, 12h, 30m or an ISO time (default: all kept)")
    p.add_argument("--until", help="dead-lettered before: a duration ago or an ISO time")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deadletters", help="list and inspect dead letters")
    what = p.add_subparsers(dest="action", metavar="<list|show>", required=True)
    ls = what.add_parser("list", help="one line per dead letter, with filters")
    add_filters(ls)
    ls.add_argument("--json", action="store_true", help="a JSON array")
    ls.add_argument("--bootstrap", help="broker (env KAFKA_BOOTSTRAP)")
    ls.add_argument("--prefix", help="topic name prefix (env TOPIC_PREFIX)")
    ls.set_defaults(func=run_list)
    show = what.add_parser("show", help="everything of the dead letters at these offsets")
    show.add_argument("offsets", nargs="+", type=int, metavar="OFFSET", help="offsets in the dead-letter topic")
    show.add_argument("--json", action="store_true", help="a JSON array")
    show.add_argument("--bootstrap", help="broker (env KAFKA_BOOTSTRAP)")
    show.add_argument("--prefix", help="topic name prefix (env TOPIC_PREFIX)")
    show.set_defaults(func=run_show)


def window_of(args: argparse.Namespace) -> tuple[datetime | None, datetime | None]:
    since = parse_when(args.since, "--since") if getattr(args, "since", None) else None
    until = parse_when(args.until, "--until") if getattr(args, "until", None) else None
    if since and until and until <= since:
        raise SettingsError("--until must be after --since")
    return since, until


async def read_deadletters(
    bootstrap: str, topics: Topics, since: datetime | None = None, until: datetime | None = None
) -> list[DeadLetter]:
    return [DeadLetter.from_record(r) async for r in read_window(bootstrap, [topics.deadletter], since, until)]


async def replay_cursor(bootstrap: str, topics: Topics) -> dict[str, Any] | None:
    """Where the last ``replay deadletter`` without filters stopped (what :class:`CursorStore` reads)."""
    latest = None
    async for r in read_window(bootstrap, [topics.cursors]):
        if r.key == REPLAY_CURSOR.encode():
            latest = orjson.loads(r.value) if r.value else None
    return latest


def short_time(value: str) -> str:
    """An ISO time to the second, in UTC: ``2026-03-02T09:18:41Z``."""
    try:
        return parse_time(value).astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    except ValueError:
        return value


def _settings(args: argparse.Namespace) -> tuple[str, Topics]:
    kafka = KafkaSettings.from_env()
    return args.bootstrap or kafka.bootstrap, Topics(args.prefix if args.prefix is not None else kafka.topic_prefix)


def list_lines(letters: list[DeadLetter], topics: Topics, cursor: dict[str, Any] | None, total: int) -> list[str]:
    prefix = topics.prefix

    def short(topic: str) -> str:
        return topic[len(prefix) :] if prefix and topic.startswith(prefix) else topic

    rows = [
        [
            str(d.offset),
            short_time(d.failed_at),
            d.stage,
            d.error_class,
            f"{short(d.source_topic)}[{d.source_partition}]@{d.source_offset}",
            d.event_id or d.key or "",
            one_line(d.message, 100),
        ]
        for d in letters
    ]
    out = table(rows, ["offset", "failed at", "stage", "reason", "source", "event", "message"])
    shown = f"{len(letters)} dead letter(s)"
    if len(letters) != total:
        shown += f" of {total} match the filters"
    if letters:
        by = Counter(f"{d.stage} {d.error_class}" for d in letters)
        shown += " — " + ", ".join(f"{k}: {n}" for k, n in sorted(by.items()))
    out.append(shown)
    if cursor:
        out.append(
            f"the last replay (without filters) went up to offset {cursor.get('next_offset')} at {cursor.get('at')}"
        )
    if letters:
        out.append("`pipeline deadletters show OFFSET` shows one in full; `pipeline replay deadletter` sends them back")
    return out


def run_list(args: argparse.Namespace) -> int:
    bootstrap, topics = _settings(args)
    since, until = window_of(args)

    async def main() -> tuple[list[DeadLetter], int, dict[str, Any] | None]:
        letters = await read_deadletters(bootstrap, topics, since, until)
        cursor = await replay_cursor(bootstrap, topics)
        chosen = [d for d in letters if d.matches(args.stage, args.reason, args.topic, topics.prefix)]
        return chosen, len(letters), cursor

    chosen, total, cursor = asyncio.run(main())
    if args.json:
        print(dumps([d.to_dict(full=False) for d in chosen]))
    else:
        print("\n".join(list_lines(chosen, topics, cursor, total)))
    return 0


def show_lines(d: DeadLetter) -> list[str]:
    out = [
        f"dead letter at offset {d.offset}",
        f"  failed at    {d.failed_at}",
        f"  stage        {d.stage}",
        f"  reason       {d.error_class}",
        f"  source       {d.source_topic} partition {d.source_partition} offset {d.source_offset}",
        f"  event        {d.event_id or '—'}",
    ]
    if d.command_id:
        out.append(f"  command      {d.command_id}")
    if d.integration:
        out.append(f"  integration  {d.integration}")
    out.append(f"  key          {d.key}")
    out.append("  message")
    out += [f"    {line}" for line in (d.message or "").splitlines() or [""]]
    out.append("  headers")
    out += [f"    {k}: {v}" for k, v in d.headers.items()] or ["    (none)"]
    out.append("  value")
    value = d.value if isinstance(d.value, str) else dumps(d.value)
    out += [f"    {line}" for line in str(value).splitlines()]
    return out


def run_show(args: argparse.Namespace) -> int:
    bootstrap, topics = _settings(args)
    letters = {d.offset: d for d in asyncio.run(read_deadletters(bootstrap, topics))}
    missing = [o for o in args.offsets if o not in letters]
    found = [letters[o] for o in args.offsets if o in letters]
    if args.json:
        print(dumps([d.to_dict() for d in found]))
    else:
        blocks = ["\n".join(show_lines(d)) for d in found]
        if blocks:
            print("\n\n".join(blocks))
    if missing:
        print(
            f"no dead letter at offset(s) {', '.join(map(str, missing))} of {topics.deadletter} "
            "(`pipeline deadletters list` shows which there are)",
            file=sys.stderr,
        )
        return 1
    return 0
