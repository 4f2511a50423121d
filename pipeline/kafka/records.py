"""Records in and out of a stage: what a stage produces, rejects, and how a rejection becomes a
dead letter (the original key, value and headers plus ``dlq.*`` error headers); audit records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka.structs import ConsumerRecord

from pipeline.core.decisions import Reject

Headers = tuple[tuple[str, bytes], ...]


# --------------------------------------------------------------------------------------------
# Records in and out
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutRecord:
    topic: str
    value: bytes | None
    key: bytes | None = None
    headers: Headers = ()
    partition: int | None = None


@dataclass(frozen=True, slots=True)
class Rejection:
    """A record that cannot be processed; it goes to the dead-letter topic."""

    record: ConsumerRecord
    error_class: str
    message: str


@dataclass(slots=True)
class BatchResult:
    outputs: list[OutRecord] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    # Offset of the next record to read once this batch commits; None = after the last record.
    commit_upto: int | None = None
    # Whatever the stage wants back in ``after_commit`` (e.g. ledger entries to make visible).
    context: Any = None


Transform = Callable[[Sequence[ConsumerRecord]], BatchResult]


def map_records(fn: Callable[[ConsumerRecord], Iterable[OutRecord]]) -> Transform:
    """A batch transform from a per-record function; exceptions become rejections."""

    def transform(records: Sequence[ConsumerRecord]) -> BatchResult:
        result = BatchResult()
        for record in records:
            try:
                result.outputs.extend(fn(record))
            except Reject as exc:
                result.rejections.append(Rejection(record, exc.error_class, exc.message))
            except Exception as exc:  # noqa: BLE001 - a bad record never stops the stream
                result.rejections.append(Rejection(record, type(exc).__name__, str(exc)))
        return result

    return transform


DLQ_STAGE = "dlq.stage"
DLQ_ERROR_CLASS = "dlq.error.class"
DLQ_ERROR_MESSAGE = "dlq.error.message"
DLQ_SOURCE_TOPIC = "dlq.source.topic"
DLQ_SOURCE_PARTITION = "dlq.source.partition"
DLQ_SOURCE_OFFSET = "dlq.source.offset"
DLQ_FAILED_AT = "dlq.failed.at"
DLQ_HEADERS = (
    DLQ_STAGE,
    DLQ_ERROR_CLASS,
    DLQ_ERROR_MESSAGE,
    DLQ_SOURCE_TOPIC,
    DLQ_SOURCE_PARTITION,
    DLQ_SOURCE_OFFSET,
    DLQ_FAILED_AT,
)


def dead_letter(rejection: Rejection, stage: str, topic: str) -> OutRecord:
    """The original key, value and headers, plus error headers (stage, class, message, source)."""
    rec = rejection.record
    original = tuple((k, v) for k, v in (rec.headers or ()) if not k.startswith("dlq."))
    error_headers = (
        (DLQ_STAGE, stage.encode()),
        (DLQ_ERROR_CLASS, rejection.error_class.encode()),
        (DLQ_ERROR_MESSAGE, rejection.message[:2000].encode()),
        (DLQ_SOURCE_TOPIC, rec.topic.encode()),
        (DLQ_SOURCE_PARTITION, str(rec.partition).encode()),
        (DLQ_SOURCE_OFFSET, str(rec.offset).encode()),
        (DLQ_FAILED_AT, datetime.now(UTC).isoformat().encode()),
    )
    return OutRecord(topic=topic, key=rec.key, value=rec.value, headers=original + error_headers)


def header(record: ConsumerRecord, name: str) -> str | None:
    for k, v in record.headers or ():
        if k == name:
            return v.decode() if isinstance(v, bytes) else v
    return None


REPLAYED_HEADER = "dlq.replayed"  # set by ``pipeline replay deadletter`` (the dead letter's offset)


def audit_record(
    topic: str, *, event_id: str, stage: str, at: str, decisions: list[dict[str, Any]], config: str | None = None
) -> OutRecord:
    """Why an event went where it went: one record per event and stage on the audit topic, keyed by
    event id. ``decisions`` come from :func:`pipeline.core.decisions.decision`; ``config`` is the
    version of the integrations file that decided them."""
    value: dict[str, Any] = {"event_id": event_id, "stage": stage, "at": at, "decisions": decisions}
    if config:
        value["config"] = config
    return OutRecord(topic, orjson.dumps(value), event_id.encode(), (("stage", stage.encode()),))
