"""``pipeline trace ID``: the whole path of an event through the pipeline, as a timeline.

ID is any of:

* an event id — ``cloudtalk:call:1002409191``, ``cloudtalk:sms:88231977``,
  ``cloudtalk:contact:12:2026-03-02T10:00:00Z``, ``kustomer:customer:65f…:3``; a shorter prefix
  (``cloudtalk:contact:12``, ``kustomer:customer:65f…``) takes every version;
* a command id — ``support|cloudtalk:call:1002409191``;
* a CloudTalk call or SMS id — digits (``1002409191``; also a CloudTalk contact id);
* a Kustomer customer id (``65f1c0ffee00000000000001``): its own events, and every command whose
  effects touched it (the ids written, in the ledger and the audit records);
* a phone number — ``+447700900123`` (or ``00…``, or with spaces): every event that mentions it.

``call:``, ``sms:``, ``contact:``, ``customer:`` and ``phone:`` in front say which one it is.

For each event it shows, in time order: the raw record(s) (every delivery: webhook, poller,
backfill, replay), each stage's decision per integration with its rule (audit topic), the
command(s) (command topics), the ledger steps of the sink and the ids written at the target, and
any dead letter. ``--json`` prints the same as one JSON document.

The topics are read from ``--since`` (default 7 days ago, located with ``offsets_for_times``) to
their end now. An ID that is not an event id needs two reads: one to find the events that
mention it, one to collect their records.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiokafka.structs import ConsumerRecord

from pipeline.core.phones import normalize_e164
from pipeline.core.settings import KafkaSettings, SettingsError
from pipeline.kafka.topics import Topics
from pipeline.ops.inspect import (
    DeadLetter,
    TopicKinds,
    Window,
    event_id_of_command_id,
    headers_of,
    iso_ms,
    json_or_text,
    one_line,
    parse_when,
    read_window,
    table,
)
from pipeline.ops.inspect import (
    dumps as json_dumps,
)

DEFAULT_SINCE = "7d"

# --------------------------------------------------------------------------------------------
# What is asked
# --------------------------------------------------------------------------------------------

_KUSTOMER_ID = re.compile(r"^[0-9a-fA-F]{24}$")
_PHONE_CHARS = re.compile(r"^\+?[\d\s().\-/]{7,}$")


@dataclass
class Query:
    """Which events an ID stands for: exact ids, id prefixes, and text that records mention."""

    text: str
    kind: str
    event_ids: set[str] = field(default_factory=set)
    prefixes: tuple[str, ...] = ()
    needle: re.Pattern[bytes] | None = None  # searched in keys, values and headers

    def wants(self, event_id: str) -> bool:
        return event_id in self.event_ids or any(event_id.startswith(p) for p in self.prefixes)

    def describe(self) -> str:
        return f"{self.kind} {self.text}"


def _digits_needle(digits: str) -> re.Pattern[bytes]:
    return re.compile(rb"(?<![0-9])" + digits.encode() + rb"(?![0-9])")


def parse_query(raw: str) -> Query:
    """What ``raw`` is (module docstring); :class:`SettingsError` for something it cannot be."""
    value = raw.strip()
    if not value:
        raise SettingsError("ID: empty")
    kind, _, rest = value.partition(":")
    explicit = kind.lower() if rest and kind.lower() in ("call", "sms", "contact", "customer", "phone") else None
    if explicit:
        value = rest.strip()
    if explicit == "phone" or (explicit is None and value.startswith(("+", "00")) and _PHONE_CHARS.match(value)):
        e164 = normalize_e164(value)
        if e164 is None:
            raise SettingsError(f"ID: {raw!r} is not a possible phone number")
        return Query(value, "phone number", needle=_digits_needle(e164[1:]))
    if explicit in ("call", "sms", "contact"):
        if not value.isdigit():
            raise SettingsError(f"ID: a CloudTalk {explicit} id is digits, got {value!r}")
        if explicit == "contact":
            return Query(value, "CloudTalk contact", prefixes=(f"cloudtalk:contact:{value}:",))
        details = (f"cloudtalk:call:{value}#",) if explicit == "call" else ()  # its details' versions
        return Query(value, f"CloudTalk {explicit}", event_ids={f"cloudtalk:{explicit}:{value}"}, prefixes=details)
    if explicit == "customer" or (explicit is None and _KUSTOMER_ID.match(value)):
        return Query(
            value,
            "Kustomer customer",
            prefixes=(f"kustomer:customer:{value}:",),
            needle=re.compile(rb"(?<![0-9A-Za-z])" + re.escape(value.encode()) + rb"(?![0-9A-Za-z])"),
        )
    if value.isdigit():
        return Query(
            value,
            "CloudTalk call, SMS or contact",
            event_ids={f"cloudtalk:call:{value}", f"cloudtalk:sms:{value}"},
            prefixes=(f"cloudtalk:contact:{value}:", f"cloudtalk:call:{value}#"),
        )
    if "|" in value:
        return Query(value, "command", event_ids={event_id_of_command_id(value)})
    if value.startswith(("cloudtalk:", "kustomer:")):
        parts = value.split(":")
        full = (parts[1] in ("call", "sms") and len(parts) == 3) or len(parts) >= 4
        if full:
            more = (f"{value}#",) if parts[1] == "call" and len(parts) == 3 else ()  # a call: with its details
            return Query(value, "event", event_ids={value}, prefixes=more)
        return Query(value, "events", prefixes=(value.rstrip(":") + ":",))
    if _PHONE_CHARS.match(value) and normalize_e164(value):
        return Query(value, "phone number", needle=_digits_needle(normalize_e164(value)[1:]))  # type: ignore[index]
    raise SettingsError(
        f"ID: {raw!r} is not an event id (cloudtalk:call:123), a command id, a call/SMS id (digits), "
        "a Kustomer customer id (24 hex digits) or a phone number (+447700900123)"
    )


# --------------------------------------------------------------------------------------------
# What each record says
# --------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One line of an event's timeline."""

    event_id: str
    timestamp: int  # Kafka record timestamp, ms
    kind: str  # raw, decision, command, ledger, effect, deadletter
    where: str  # topic[partition]@offset
    summary: str
    integration: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": iso_ms(self.timestamp),
            "kind": self.kind,
            "where": self.where,
            "integration": self.integration,
            "summary": self.summary,
            **self.data,
        }


_KIND_ORDER = {"raw": 0, "decision": 1, "command": 2, "ledger": 3, "effect": 4, "deadletter": 5}


def _raw_summary(env: dict[str, Any]) -> str:
    payload = env.get("payload")
    p: dict[str, Any] = payload if isinstance(payload, dict) else {}
    bits = [f"{env.get('type', '?')} via {env.get('via', '?')}"]
    if env.get("integration") and env.get("integration") != "*":
        bits.append(f"(integration {env['integration']})")
    if p.get("direction"):
        bits.append(str(p["direction"]))
    if p.get("status"):
        bits.append(str(p["status"]))
    if env.get("occurred_at"):
        bits.append(f"occurred {env['occurred_at']}")
    return " ".join(bits)


def _steps_text(steps: Any) -> str:
    if not isinstance(steps, dict) or not steps:
        return ""
    return ", ".join(f"{k}={v}" for k, v in steps.items() if not isinstance(v, (dict, list)) and v is not None)


def steps_of(record: ConsumerRecord, kinds: TopicKinds) -> list[Step]:
    """What ``record`` says about which events (usually one)."""
    kind = kinds.kind(record.topic)
    where = f"{kinds.short(record.topic)}[{record.partition}]@{record.offset}"
    ts = record.timestamp
    if kind == "raw":
        env = json_or_text(record.value)
        event_id = (env.get("id") if isinstance(env, dict) else None) or (record.key or b"").decode()
        if not isinstance(env, dict):
            return [Step(event_id, ts, "raw", where, "unreadable raw record")]
        return [
            Step(
                event_id,
                ts,
                "raw",
                where,
                _raw_summary(env),
                None,
                {"via": env.get("via"), "type": env.get("type"), "received_at": env.get("received_at")},
            )
        ]
    if kind == "audit":
        audit = json_or_text(record.value)
        if not isinstance(audit, dict) or "event_id" not in audit:
            return []
        stage = str(audit.get("stage", "?"))
        texts, decisions = [], []
        for d in audit.get("decisions") or []:
            what = d.get("decision", "?")
            rule = d.get("rule")
            text = f"{d.get('integration', '?')} {what}" + (f" ({rule})" if rule else "")
            if d.get("command_id") and what == "emitted":
                text += f" → {d['command_id']}"
            detail = d.get("detail")
            entry = {k: d.get(k) for k in ("integration", "decision", "rule", "command_id", "detail")}
            if detail and what in ("done", "skipped"):
                parsed = json_or_text(str(detail).encode())
                if isinstance(parsed, dict):
                    entry["written"] = parsed
                    detail = _steps_text(parsed)
            if detail:
                text += f": {one_line(str(detail), 200)}"
            texts.append(text)
            decisions.append(entry)
        if not decisions:
            return []
        integrations = {d["integration"] for d in decisions}
        step_kind = "effect" if stage.startswith("sink") else "decision"
        return [
            Step(
                audit["event_id"],
                ts,
                step_kind,
                where,
                f"{stage}: " + "; ".join(texts),
                integrations.pop() if len(integrations) == 1 else None,
                {"stage": stage, "decisions": decisions},
            )
        ]
    if kind == "command":
        h = headers_of(record)
        body = json_or_text(record.value)
        body = body if isinstance(body, dict) else {}
        cid = h.get("command_id") or body.get("command_id") or "?"
        event_id = h.get("event_id") or body.get("event_id") or event_id_of_command_id(cid)
        ctype = h.get("type") or body.get("type") or "?"
        key = (record.key or b"").decode("utf-8", "replace")
        text = f"{ctype} {cid} (lane {key})"
        if record.headers and any(k == "dlq.replayed" for k, _ in record.headers):
            text += " — replayed from the dead-letter topic"
        return [Step(event_id, ts, "command", where, text, body.get("integration"), {"command_id": cid, "type": ctype})]
    if kind == "ledger":
        key = (record.key or b"").decode("utf-8", "replace")
        if key.startswith("index|") or record.value is None:
            return []
        entry = json_or_text(record.value)
        if not isinstance(entry, dict):
            return []
        cid = entry.get("command_id", key)
        state = entry.get("state", "?")
        text = f"{kinds.target.get(record.topic, '?')} {state}"
        if entry.get("outcome"):
            text += f" ({entry['outcome']})"
        text += f", attempt {entry.get('attempt', 1)}"
        steps = entry.get("steps") or {}
        if _steps_text(steps):
            text += f": {_steps_text(steps)}"
        if state == "parked" and entry.get("not_before"):
            text += f"; waits until {iso_ms(int(float(entry['not_before']) * 1000))}"
        return [
            Step(
                event_id_of_command_id(cid),
                ts,
                "ledger",
                where,
                text,
                cid.split("|")[0] if "|" in cid else None,
                {"command_id": cid, "state": state, "outcome": entry.get("outcome"), "steps": steps},
            )
        ]
    if kind == "deadletter":
        dl = DeadLetter.from_record(record)
        if dl.event_id is None:
            return []
        text = (
            f"{dl.stage}: {dl.error_class} — {one_line(dl.message, 200)} "
            f"(from {kinds.short(dl.source_topic)}[{dl.source_partition}]@{dl.source_offset})"
        )
        return [
            Step(dl.event_id, ts, "deadletter", where, text, dl.integration, {"deadletter": dl.to_dict(full=False)})
        ]
    return []


def _mentions(record: ConsumerRecord, needle: re.Pattern[bytes]) -> bool:
    if record.key and needle.search(record.key):
        return True
    if record.value and needle.search(record.value):
        return True
    return any(isinstance(v, bytes) and needle.search(v) for _, v in record.headers or ())


# --------------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------------


@dataclass
class Trace:
    query: Query
    since: datetime
    events: dict[str, list[Step]] = field(default_factory=dict)
    more: int = 0  # events left out by the limit
    missing_topics: list[str] = field(default_factory=list)

    def written(self, event_id: str) -> dict[str, dict[str, Any]]:
        """The ids written at the targets per command: the last ``done`` ledger entry's steps."""
        out: dict[str, dict[str, Any]] = {}
        for s in self.events.get(event_id, []):
            if s.kind == "ledger" and s.data.get("state") == "done" and s.data.get("steps"):
                out[s.data["command_id"]] = s.data["steps"]
            elif s.kind == "effect":
                for d in s.data.get("decisions", []):
                    if d.get("written") and d.get("command_id") and d["command_id"] not in out:
                        out[d["command_id"]] = d["written"]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": {"id": self.query.text, "kind": self.query.kind},
            "since": self.since.isoformat().replace("+00:00", "Z"),
            "events": [
                {
                    "event_id": eid,
                    "timeline": [s.to_dict() for s in steps],
                    "written": self.written(eid),
                    "dead_letters": [s.data["deadletter"] for s in steps if s.kind == "deadletter"],
                }
                for eid, steps in self.events.items()
            ],
            "more_events": self.more,
            "missing_topics": self.missing_topics,
        }

    def lines(self) -> list[str]:
        since = self.since.isoformat(timespec="seconds").replace("+00:00", "Z")
        missing = [f"(topics not found: {', '.join(self.missing_topics)})"] if self.missing_topics else []
        if not self.events:
            return [f"no record of {self.query.describe()} since {since}", *missing]
        out = [f"{self.query.describe()}: {len(self.events)} event(s) since {since}"]
        for eid, steps in self.events.items():
            out.append("")
            out.append(eid)
            out += ["  " + line for line in table([[iso_ms(s.timestamp), s.kind, s.where, s.summary] for s in steps])]
            written = self.written(eid)
            for cid, steps_written in written.items():
                out.append(f"  written by {cid}: {_steps_text(steps_written) or '(nothing)'}")
            if not any(s.kind == "raw" for s in steps):
                out.append("  (no raw record in the window: it is older than --since, or came in before retention)")
            dead = [s for s in steps if s.kind == "deadletter"]
            if dead:
                out.append(f"  {len(dead)} dead letter(s): `pipeline deadletters show OFFSET` for the record")
        if self.more:
            out.append("")
            out.append(f"… and {self.more} more event(s): narrow --since or raise --limit")
        return out + missing


async def trace(
    bootstrap: str,
    kinds: TopicKinds,
    query: Query,
    since: datetime,
    limit: int = 20,
    progress: Callable[[str], None] | None = None,
) -> Trace:
    result = Trace(query, since)
    topics = kinds.all()
    wanted: Callable[[str], bool] = query.wants
    if query.needle is not None:
        # first read: the events that mention the ID
        found: dict[str, int] = {}
        if progress:
            progress("finding the events that mention it")
        window = Window()
        async for r in read_window(bootstrap, topics, since, window=window):
            if _mentions(r, query.needle):
                for s in steps_of(r, kinds):
                    found[s.event_id] = max(found.get(s.event_id, 0), s.timestamp)
        result.missing_topics = window.missing_topics
        newest = sorted(found, key=lambda e: found[e], reverse=True)
        chosen = set(newest[:limit])
        result.more = max(0, len(newest) - limit)
        wanted = chosen.__contains__
        if not chosen:
            return result
    if progress:
        progress("collecting their records")
    window = Window()
    events: dict[str, list[Step]] = {}
    async for r in read_window(bootstrap, topics, since, window=window):
        for s in steps_of(r, kinds):
            if wanted(s.event_id):
                events.setdefault(s.event_id, []).append(s)
    result.missing_topics = window.missing_topics
    if query.needle is None and len(events) > limit:
        newest = sorted(events, key=lambda e: max(s.timestamp for s in events[e]), reverse=True)
        result.more = len(newest) - limit
        events = {e: events[e] for e in newest[:limit]}
    for eid in sorted(events, key=lambda e: min(s.timestamp for s in events[e])):
        result.events[eid] = in_order(events[eid])
    return result


SAME_MOMENT_MS = 50


def in_order(steps: list[Step]) -> list[Step]:
    """By time; records written within ``SAME_MOMENT_MS`` of each other (one transaction puts a
    command, its audit record and dead letters on the broker a few milliseconds apart, in any
    order) in the order of the path: raw, decision, command, ledger, effect, dead letter."""
    out: list[Step] = []
    group: list[Step] = []
    for s in sorted(steps, key=lambda s: s.timestamp):
        if group and s.timestamp - group[0].timestamp > SAME_MOMENT_MS:
            out += sorted(group, key=lambda g: _KIND_ORDER.get(g.kind, 9))
            group = []
        group.append(s)
    return out + sorted(group, key=lambda g: _KIND_ORDER.get(g.kind, 9))


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "trace",
        help="the whole path of an event: raw records, decisions, commands, ledger, ids written, dead letters",
        description="The whole path of an event through the pipeline, as a timeline: raw records, each stage's "
        "decision per integration with its rule, commands, ledger steps and the ids written, dead letters. "
        "Reads the topics from --since to their end now.",
    )
    p.add_argument(
        "id",
        metavar="ID",
        help="event id (cloudtalk:call:123), command id, CloudTalk call/SMS id, Kustomer customer id or phone "
        "number; call:, sms:, contact:, customer:, phone: in front say which",
    )
    p.add_argument("--since", default=DEFAULT_SINCE, help="how far back to read: 7d, 12h, 30m or an ISO time (7d)")
    p.add_argument("--limit", type=int, default=20, help="at most this many events, the newest (20)")
    p.add_argument("--json", action="store_true", help="one JSON document instead of the timeline")
    p.add_argument("--bootstrap", help="broker (env KAFKA_BOOTSTRAP)")
    p.add_argument("--prefix", help="topic name prefix (env TOPIC_PREFIX)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    kafka = KafkaSettings.from_env()
    try:
        query = parse_query(args.id)
    except SettingsError as exc:  # what was typed, not a setting
        print(f"pipeline trace: {exc}", file=sys.stderr)
        return 2
    since = parse_when(args.since, "--since")
    if args.limit < 1:
        raise SettingsError("--limit: must be at least 1")
    kinds = TopicKinds(Topics(args.prefix if args.prefix is not None else kafka.topic_prefix))
    say = None if args.json or not sys.stderr.isatty() else (lambda m: print(f"… {m}", file=sys.stderr, flush=True))
    result = asyncio.run(trace(args.bootstrap or kafka.bootstrap, kinds, query, since, args.limit, say))
    if args.json:
        print(json_dumps(result.to_dict()))
    else:
        print("\n".join(result.lines()))
    return 0 if result.events else 1
