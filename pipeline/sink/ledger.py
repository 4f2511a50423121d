"""The sinks' exactly-once bookkeeping: a compacted topic keyed by command id.

The ledger topic has as many partitions as its command topic and an entry for a command lives in
the same partition number as the command (co-partitioning), so a sink that owns command
partition *p* owns ledger partition *p* and loads only that on assignment.

States of a :class:`LedgerEntry`:

* ``started`` — written (and committed) *before* any HTTP effect of the command; if a sink finds
  this state on assignment, the command may be half done and is reconciled against the target
  before anything is written again;
* ``done`` — every effect exists; ``steps`` holds the ids written (customer, conversation, note,
  contact); a redelivery, replay or backfill of the command is skipped;
* ``failed`` — the target refused it for good (4xx); the command went to the dead-letter topic.
  Only a command replayed from the dead-letter topic is tried again;
* ``parked`` — the command waits for its target account (rate limited, out of service, a
  customer's limit) and nothing of it is in flight. The entry carries the command itself
  (``command``, ``source``) because the partition's offsets have moved past its record; it is
  performed once ``not_before`` (Unix seconds) has passed, resuming from ``steps`` — after looking
  its effects up first when ``reconcile`` is set (a create whose outcome is unknown, or a command
  found ``started`` after a crash). A ``started`` entry that carries the command is a parked
  command being performed again.

Entries that carry their command are the partition's *pending* commands (:meth:`Ledger.pending`):
the sink owns them until they are ``done`` or ``failed``.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from pipeline.core.envelope import utc_now_iso
from pipeline.core.observability import get_logger, metrics
from pipeline.kafka.clients import new_consumer
from pipeline.kafka.reading import read_to_end
from pipeline.kafka.records import OutRecord

log = get_logger(__name__)

STARTED, DONE, FAILED, PARKED = "started", "done", "failed", "parked"


@dataclass(slots=True)
class LedgerEntry:
    command_id: str
    state: str
    at: str = field(default_factory=utc_now_iso)
    attempt: int = 1
    steps: dict[str, Any] = field(default_factory=dict)
    outcome: str | None = None
    index: dict[str, Any] = field(default_factory=dict)
    # a pending command (parked, or started again after being parked): the command and its record
    command: dict[str, Any] | None = None
    source: dict[str, Any] | None = None  # topic, partition, offset, key and headers (base64)
    not_before: float | None = None  # parked: Unix seconds
    reconcile: bool = False  # parked: look the effects up before writing anything

    def to_json(self) -> bytes:
        data: dict[str, Any] = {
            "command_id": self.command_id,
            "state": self.state,
            "at": self.at,
            "attempt": self.attempt,
            "steps": self.steps,
            "outcome": self.outcome,
        }
        if self.index:
            data["index"] = self.index
        if self.command is not None:
            data["command"] = self.command
            data["source"] = self.source
        if self.not_before is not None:
            data["not_before"] = self.not_before
        if self.reconcile:
            data["reconcile"] = True
        return orjson.dumps(data)

    @classmethod
    def from_json(cls, raw: bytes) -> LedgerEntry:
        d = orjson.loads(raw)
        return cls(
            command_id=d["command_id"],
            state=d["state"],
            at=d.get("at", ""),
            attempt=d.get("attempt", 1),
            steps=d.get("steps") or {},
            outcome=d.get("outcome"),
            index=d.get("index") or {},
            command=d.get("command"),
            source=d.get("source"),
            not_before=d.get("not_before"),
            reconcile=bool(d.get("reconcile", False)),
        )

    @property
    def pending(self) -> bool:
        """The sink owns this command: its record is behind the committed offset."""
        return self.command is not None and self.state in (PARKED, STARTED)


def must_reconcile(prior: LedgerEntry | None) -> bool:
    """Whether a command's effects must be looked up before anything is written: it ran before
    (found ``started``, or a replay of a ``failed`` one) — unless it was parked with nothing
    unknown (every effect it made is in ``steps``)."""
    if prior is None:
        return False
    return prior.reconcile if prior.state == PARKED else True


def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode()


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def source_of(record: ConsumerRecord) -> dict[str, Any]:
    """What a pending entry keeps of its command's record (for lanes, dead letters, order)."""
    return {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "key": _b64(record.key),
        "headers": [[k, _b64(v)] for k, v in record.headers or ()],
    }


def record_key(entry: LedgerEntry) -> bytes | None:
    """The key of a pending entry's record: its lane."""
    return _unb64((entry.source or {}).get("key"))


def record_of(entry: LedgerEntry) -> ConsumerRecord:
    """The record of a pending entry's command again (its value re-encoded from ``command``)."""
    src = entry.source or {}
    key = _unb64(src.get("key"))
    value = orjson.dumps(entry.command)
    headers = tuple((k, _unb64(v) or b"") for k, v in src.get("headers") or ())
    return ConsumerRecord(
        topic=src.get("topic", ""),
        partition=int(src.get("partition", -1)),
        offset=int(src.get("offset", -1)),
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=len(key or b""),
        serialized_value_size=len(value),
        headers=headers,
    )


INDEX_PREFIX = "index|"


class Ledger:
    """Entries of the partitions this member owns, loaded from the compacted topic.

    Besides one entry per command, a partition holds *index* records (key ``index|…``): what a
    sink needs to find its earlier effects — e.g. which CloudTalk contact a Kustomer customer
    became, which contact holds a phone, the version last applied. They are written in the same
    transactions as the command entries. An update to ``None`` removes a key (a tombstone).
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.partitions: dict[int, dict[str, LedgerEntry]] = {}
        self.indexes: dict[int, dict[str, Any]] = {}
        self.owned: dict[int, dict[str, LedgerEntry]] = {}  # pending entries per partition
        self._gauge = metrics().ledger_entries.labels(topic)

    def pending(self, partition: int) -> list[LedgerEntry]:
        """The partition's pending commands (parked, or started again after being parked), in the
        order of their records."""
        owned = self.owned.get(partition)
        if not owned:
            return []
        return sorted(owned.values(), key=lambda e: int((e.source or {}).get("offset", -1)))

    def _own(self, partition: int, entry: LedgerEntry) -> None:
        if entry.pending:
            self.owned.setdefault(partition, {})[entry.command_id] = entry
        else:
            owned = self.owned.get(partition)
            if owned:
                owned.pop(entry.command_id, None)

    def index(self, partition: int) -> dict[str, Any]:
        return self.indexes.setdefault(partition, {})

    def index_record(self, partition: int, key: str, value: Any) -> OutRecord:
        """The record of an index update; ``None`` forgets the key (a tombstone: compacted away)."""
        raw = None if value is None else orjson.dumps(value)
        return OutRecord(self.topic, raw, (INDEX_PREFIX + key).encode(), partition=partition)

    def apply_index(self, partition: int, updates: dict[str, Any]) -> None:
        index = self.index(partition)
        for key, value in updates.items():
            if value is None:
                index.pop(key, None)
            else:
                index[key] = value

    def get(self, partition: int, command_id: str) -> LedgerEntry | None:
        return self.partitions.get(partition, {}).get(command_id)

    def entries(self, partition: int) -> dict[str, LedgerEntry]:
        return self.partitions.setdefault(partition, {})

    def record(self, partition: int, entry: LedgerEntry) -> OutRecord:
        """The ledger record for ``entry`` (same partition number as its command)."""
        return OutRecord(self.topic, entry.to_json(), entry.command_id.encode(), partition=partition)

    def apply(self, partition: int, entries: list[LedgerEntry]) -> None:
        """Make committed entries visible locally (call only after their transaction committed)."""
        part = self.partitions.setdefault(partition, {})
        for e in entries:
            part[e.command_id] = e
            self._own(partition, e)
        self._gauge.set(sum(len(p) for p in self.partitions.values()))

    def drop(self, partitions: set[int]) -> None:
        for p in partitions:
            self.partitions.pop(p, None)
            self.indexes.pop(p, None)
            self.owned.pop(p, None)
        self._gauge.set(sum(len(p) for p in self.partitions.values()))

    async def load(self, partitions: list[int]) -> dict[int, int]:
        """Read each partition from the beginning to its last stable offset (read_committed)."""
        if not partitions:
            return {}
        consumer = new_consumer(
            bootstrap_servers=self.bootstrap,
            isolation_level="read_committed",
            enable_auto_commit=False,
            group_id=None,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        await consumer.start()
        counts: dict[int, int] = {}
        try:
            tps = [TopicPartition(self.topic, p) for p in partitions]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            loaded: dict[int, dict[str, LedgerEntry]] = {p: {} for p in partitions}
            indexes: dict[int, dict[str, Any]] = {p: {} for p in partitions}
            async for r in read_to_end(consumer, tps, ends):
                part, idx = loaded[r.partition], indexes[r.partition]
                key = r.key.decode() if r.key else ""
                if key.startswith(INDEX_PREFIX):
                    if r.value is None:
                        idx.pop(key[len(INDEX_PREFIX) :], None)
                    else:
                        idx[key[len(INDEX_PREFIX) :]] = orjson.loads(r.value)
                    continue
                if r.value is None:  # tombstone
                    part.pop(key, None)
                    continue
                entry = LedgerEntry.from_json(r.value)
                part[entry.command_id] = entry
            for p, part in loaded.items():
                self.partitions[p] = part
                self.indexes[p] = indexes[p]
                self.owned[p] = {cid: e for cid, e in part.items() if e.pending}
                counts[p] = len(part)
        finally:
            await consumer.stop()
        self._gauge.set(sum(len(p) for p in self.partitions.values()))
        log.info(
            "ledger_loaded",
            topic=self.topic,
            entries={str(p): n for p, n in counts.items()},
            pending={str(p): len(self.owned.get(p) or {}) for p in counts},
        )
        return counts
