"""What the inspection commands (``trace``, ``deadletters``, ``status``) share: time windows,
bounded reads of topics, and what each kind of record says.

Every read is ``read_committed`` and bounded: from the offsets of ``since`` (``offsets_for_times``)
to the end offsets when the read starts (or the offsets of ``until``), so a command finishes even
while the pipeline keeps writing.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from pipeline.core.envelope import parse_time
from pipeline.core.settings import SettingsError
from pipeline.kafka.clients import committed_reader, started
from pipeline.kafka.reading import partitions_of, read_to_end, stop_consumer
from pipeline.kafka.records import (
    DLQ_ERROR_CLASS,
    DLQ_ERROR_MESSAGE,
    DLQ_FAILED_AT,
    DLQ_SOURCE_OFFSET,
    DLQ_SOURCE_PARTITION,
    DLQ_SOURCE_TOPIC,
    DLQ_STAGE,
    REPLAYED_HEADER,
)
from pipeline.kafka.topics import Topics

# --------------------------------------------------------------------------------------------
# Times
# --------------------------------------------------------------------------------------------

_DURATION = re.compile(r"(?i)^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)\s*$")
_UNIT_S = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, option: str, now: datetime | None = None) -> datetime:
    """``7d``, ``12h``, ``30m``, ``90s``, ``2w`` (that long before now) or an ISO-8601 time (UTC
    when it has no offset). A bad value raises :class:`SettingsError` naming ``option``."""
    now = now or datetime.now(UTC)
    m = _DURATION.match(text)
    if m:
        return now - timedelta(seconds=float(m.group(1)) * _UNIT_S[m.group(2).lower()])
    try:
        return parse_time(text)
    except ValueError:
        raise SettingsError(
            f"{option}: {text!r} is neither a duration (7d, 12h, 30m, 90s) nor an ISO-8601 time"
        ) from None


def iso_ms(timestamp_ms: int | None) -> str:
    """A Kafka record timestamp as ISO-8601 UTC with milliseconds."""
    if timestamp_ms is None or timestamp_ms < 0:
        return "?"
    dt = datetime.fromtimestamp(timestamp_ms / 1000, UTC)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ago(then: datetime | None, now: datetime | None = None) -> str:
    if then is None:
        return "—"
    s = ((now or datetime.now(UTC)) - then).total_seconds()
    if s < 0:
        return "in the future"
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 90 * 60:
        return f"{s / 60:.0f} min ago"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.1f} d ago"


# --------------------------------------------------------------------------------------------
# Bounded reads
# --------------------------------------------------------------------------------------------


# The broker answers a consumer's requests on one connection in order, so an offsets request waits
# behind a fetch the broker holds for up to fetch.max.wait.ms (default 500 ms) when there is
# nothing new: a bounded read asks for short waits.
FETCH_WAIT_MS = 50


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


@dataclass
class Window:
    """Where a read starts and stops, per partition; what is missing."""

    starts: dict[TopicPartition, int] = field(default_factory=dict)
    ends: dict[TopicPartition, int] = field(default_factory=dict)
    missing_topics: list[str] = field(default_factory=list)

    @property
    def span(self) -> int:
        """Offsets to read (records plus transaction markers)."""
        return sum(max(0, self.ends[tp] - self.starts[tp]) for tp in self.ends)


async def read_window(
    bootstrap: str,
    topics: Sequence[str],
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    tail: int | None = None,
    window: Window | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> AsyncIterator[ConsumerRecord]:
    """The committed records of ``topics`` written in [since, until) — by their Kafka timestamp,
    located with ``offsets_for_times`` — or only the last ``tail`` offsets of each partition.
    A topic that does not exist is skipped and listed in ``window.missing_topics``.
    ``progress(offsets_done, offsets_total)`` is called as the read goes on."""
    window = window if window is not None else Window()
    consumer = await started(committed_reader(bootstrap, fetch_max_wait_ms=FETCH_WAIT_MS))
    try:
        tps: list[TopicPartition] = []
        for topic in topics:
            parts = await partitions_of(consumer, topic)
            if not parts:
                window.missing_topics.append(topic)
            tps += [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return
        consumer.assign(tps)
        firsts = await consumer.beginning_offsets(tps)
        lasts = await consumer.end_offsets(tps)
        starts = dict(firsts)
        ends = dict(lasts)
        if since is not None:
            found = await consumer.offsets_for_times({tp: _ms(since) for tp in tps})
            starts = {tp: (found[tp].offset if found.get(tp) else lasts[tp]) for tp in tps}
        if until is not None:
            found = await consumer.offsets_for_times({tp: _ms(until) for tp in tps})
            ends = {tp: (found[tp].offset if found.get(tp) else lasts[tp]) for tp in tps}
        if tail is not None:
            starts = {tp: max(starts[tp], ends[tp] - tail) for tp in tps}
        window.starts, window.ends = starts, ends
        todo = [tp for tp in tps if starts[tp] < ends[tp]]
        for tp in todo:
            consumer.seek(tp, starts[tp])
        total, reached = window.span, dict(starts)
        async for r in read_to_end(consumer, todo, ends):
            if progress is not None:
                tp = TopicPartition(r.topic, r.partition)
                reached[tp] = r.offset + 1
                progress(sum(reached[t] - starts[t] for t in todo), total)
            yield r
    finally:
        await stop_consumer(consumer)


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


def headers_of(record: ConsumerRecord) -> dict[str, str]:
    return {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)) for k, v in record.headers or ()}


def text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", "replace")


def json_or_text(raw: bytes | None) -> Any:
    """A record value decoded as JSON, else as text (a dead letter may hold anything)."""
    if raw is None:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")


def event_id_of_command_id(command_id: str) -> str:
    """``{integration}|{event id}[|{op}]`` → the event id."""
    parts = command_id.split("|")
    return parts[1] if len(parts) > 1 else command_id


@dataclass
class TopicKinds:
    """Which kind of record each topic of the catalogue holds."""

    topics: Topics

    def __post_init__(self) -> None:
        t = self.topics
        self.raw = (t.raw_calls, t.raw_sms, t.raw_contacts, t.raw_customers)
        self.commands = (t.kustomer_commands, t.cloudtalk_commands)
        self.ledgers = (t.kustomer_ledger, t.cloudtalk_ledger)
        self.audit, self.deadletter = t.audit, t.deadletter
        self.target = {
            t.kustomer_commands: "kustomer",
            t.kustomer_ledger: "kustomer",
            t.cloudtalk_commands: "cloudtalk",
            t.cloudtalk_ledger: "cloudtalk",
        }

    def kind(self, topic: str) -> str:
        if topic in self.raw:
            return "raw"
        if topic in self.commands:
            return "command"
        if topic in self.ledgers:
            return "ledger"
        if topic == self.audit:
            return "audit"
        if topic == self.deadletter:
            return "deadletter"
        return "other"

    def all(self) -> list[str]:
        return [*self.raw, self.audit, *self.commands, *self.ledgers, self.deadletter]

    def short(self, topic: str) -> str:
        """The topic's catalogue name (without the prefix)."""
        prefix = self.topics.prefix
        return topic[len(prefix) :] if prefix and topic.startswith(prefix) else topic


@dataclass
class DeadLetter:
    """A record of the dead-letter topic: the original key, value and headers and why it failed."""

    offset: int
    timestamp: int
    key: str | None
    value: Any
    headers: dict[str, str]  # the original headers (``dlq.*`` left out)
    stage: str
    error_class: str
    message: str
    source_topic: str
    source_partition: int | None
    source_offset: int | None
    failed_at: str
    event_id: str | None
    command_id: str | None
    integration: str | None

    @classmethod
    def from_record(cls, r: ConsumerRecord) -> DeadLetter:
        h = headers_of(r)
        value = json_or_text(r.value)
        key = text(r.key)
        body = value if isinstance(value, dict) else {}
        command_id = h.get("command_id") or body.get("command_id")
        event_id = h.get("event_id") or body.get("event_id")
        if event_id is None and command_id:
            event_id = event_id_of_command_id(command_id)
        if event_id is None and isinstance(body.get("id"), str) and ":" in body["id"]:
            event_id = body["id"]  # an envelope
        integration = body.get("integration") if isinstance(body.get("integration"), str) else None

        def number(name: str) -> int | None:
            v = h.get(name)
            return int(v) if v is not None and v.lstrip("-").isdigit() else None

        return cls(
            offset=r.offset,
            timestamp=r.timestamp,
            key=key,
            value=value,
            headers={k: v for k, v in h.items() if not k.startswith("dlq.")},
            stage=h.get(DLQ_STAGE, "?"),
            error_class=h.get(DLQ_ERROR_CLASS, "?"),
            message=h.get(DLQ_ERROR_MESSAGE, ""),
            source_topic=h.get(DLQ_SOURCE_TOPIC, "?"),
            source_partition=number(DLQ_SOURCE_PARTITION),
            source_offset=number(DLQ_SOURCE_OFFSET),
            failed_at=h.get(DLQ_FAILED_AT) or iso_ms(r.timestamp),
            event_id=event_id,
            command_id=command_id,
            integration=None if integration == "*" else integration,
        )

    @property
    def replayed_from(self) -> str | None:
        """A dead letter of a record that was itself replayed from the dead-letter topic."""
        return self.headers.get(REPLAYED_HEADER)

    def matches(
        self, stage: str | None = None, reason: str | None = None, topic: str | None = None, prefix: str = ""
    ) -> bool:
        """Filters; ``topic`` matches the source topic with or without the prefix."""
        if stage and self.stage != stage:
            return False
        if reason and self.error_class != reason:
            return False
        return not topic or self.source_topic in (topic, prefix + topic)

    def to_dict(self, full: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "offset": self.offset,
            "failed_at": self.failed_at,
            "stage": self.stage,
            "reason": self.error_class,
            "message": self.message,
            "source": {"topic": self.source_topic, "partition": self.source_partition, "offset": self.source_offset},
            "key": self.key,
            "event_id": self.event_id,
            "command_id": self.command_id,
            "integration": self.integration,
        }
        if full:
            out["headers"] = self.headers
            out["value"] = self.value
        return out


def one_line(text: str, width: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> list[str]:
    """Left-aligned columns, two spaces apart; the last column is not padded."""
    all_rows = [list(header)] if header else []
    all_rows += [list(r) for r in rows]
    if not all_rows:
        return []
    widths = [max(len(r[i]) for r in all_rows if i < len(r)) for i in range(max(len(r) for r in all_rows))]
    out = []
    for r in all_rows:
        cells = [c.ljust(widths[i]) if i < len(r) - 1 else c for i, c in enumerate(r)]
        out.append("  ".join(cells).rstrip())
    return out


def dumps(data: Mapping[str, Any] | list[Any]) -> str:
    return orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()
