"""The sink contract and the stage that runs it with exactly-once bookkeeping.

A target implements :class:`Effects`: ``perform(command, prior)`` makes the command's effects
exist at the target and returns :class:`Done` with the ids it wrote. ``prior`` is the ledger
entry when the command was started before (a crash between an HTTP call and the commit): the
effects must then be *reconciled* — looked up before anything is written again.

:class:`SinkStage` runs inside the transactional loop. For one batch of one command partition:

1. decode and schema-check each command (bad ones → dead letter);
2. skip commands the ledger knows as done (redeliveries, replays, backfills) or failed (unless
   replayed from the dead-letter topic), and duplicates inside the batch;
3. commit ``started`` ledger entries for the commands about to run, in a transaction of their
   own, *before* any HTTP effect — so a crash later is always detectable; commands found
   ``started`` (their instance died) wait a settle time after that intent, so a request still in
   flight at the target has landed before they are reconciled;
4. perform the effects: in order within a lane (the command key: one customer number, one
   integration), lanes concurrently;
5. hand back to the loop: ``done``/``failed`` ledger entries, audit records and dead letters,
   committed with the offsets in one transaction. A command that could not finish (the target
   kept failing past the retry deadline) stops the offsets there; done work after it is in the
   ledger and is skipped when the rest is fetched again.
"""

from __future__ import annotations

import asyncio
import time
from collections import ChainMap
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from pipeline.clients.http import RejectedError
from pipeline.core.decisions import decision
from pipeline.core.envelope import parse_time, utc_now_iso
from pipeline.core.observability import get_logger, metrics
from pipeline.core.schemas import SchemaError, validate
from pipeline.kafka.loop import Lane
from pipeline.kafka.records import BatchResult, OutRecord, Rejection, audit_record, header
from pipeline.sink.ledger import DONE, FAILED, STARTED, Ledger, LedgerEntry

log = get_logger(__name__)

REPLAYED_HEADER = "dlq.replayed"


@dataclass(slots=True)
class Done:
    steps: dict[str, Any]
    outcome: str = "created"  # created | reconciled | updated | skipped:<reason>
    index: dict[str, Any] = field(default_factory=dict)


class Effects(Protocol):
    target: str
    command_schemas: Mapping[str, str]  # command type -> schema name

    async def perform(self, command: dict[str, Any], prior: LedgerEntry | None,
                      index: Mapping[str, Any]) -> Done: ...
    # ``index``: the partition's ledger index as of this command (committed entries plus the
    # updates of the commands before it in this batch). ``Done.index`` adds to it.


def _epoch(iso: str) -> float:
    try:
        return parse_time(iso).timestamp()
    except (ValueError, TypeError):
        return 0.0


@dataclass(slots=True)
class _Planned:
    record: ConsumerRecord
    command: dict[str, Any]
    prior: LedgerEntry | None
    attempt: int


class SinkStage:
    def __init__(self, name: str, effects: Effects, ledger: Ledger, audit_topic: str, concurrency: int = 16,
                 settle_s: float = 20.0) -> None:
        self.name, self.effects, self.ledger, self.audit_topic = name, effects, ledger, audit_topic
        self.concurrency = concurrency
        self.settle_s = settle_s
        self.stats = {"done": 0, "skipped_duplicate": 0, "failed": 0, "unfinished": 0, "reconciled": 0}
        m = metrics()
        self._commands = m.commands
        self._e2e = m.end_to_end_seconds

    async def on_assigned(self, lanes: Mapping[TopicPartition, Lane]) -> None:
        await self.ledger.load(sorted(tp.partition for tp in lanes))

    async def on_revoked(self, partitions: set[TopicPartition]) -> None:
        self.ledger.drop({tp.partition for tp in partitions})

    def after_commit(self, lane: Lane, result: BatchResult) -> None:
        if result.context:
            entries, index_updates = result.context
            self.ledger.apply(lane.tp.partition, entries)
            self.ledger.apply_index(lane.tp.partition, index_updates)

    async def handle(self, lane: Lane, records: list[ConsumerRecord]) -> BatchResult:
        partition = lane.tp.partition
        rejections: list[Rejection] = []
        planned: list[_Planned] = []
        seen: set[str] = set()

        # 1–2. decode, check, skip what the ledger already knows
        for record in records:
            try:
                command = orjson.loads(record.value or b"")
                schema = self.effects.command_schemas.get(command.get("type")) if isinstance(command, dict) else None
                if schema is None:
                    raise SchemaError(f"type: unknown command type {command.get('type') if isinstance(command, dict) else None!r}",
                                      "type", "enum")
                validate(schema, command)
            except (orjson.JSONDecodeError, SchemaError) as exc:
                rejections.append(Rejection(record, "SchemaError", str(exc)))
                continue
            cid = command["command_id"]
            if cid in seen:
                self.stats["skipped_duplicate"] += 1
                continue
            seen.add(cid)
            prior = self.ledger.get(partition, cid)
            if prior is not None and (prior.state == DONE or
                                      (prior.state == FAILED and header(record, REPLAYED_HEADER) is None)):
                self.stats["skipped_duplicate"] += 1
                self._commands.labels(self.effects.target, command["type"], "duplicate").inc()
                continue
            attempt = prior.attempt + (0 if prior.state == STARTED else 1) if prior else 1
            planned.append(_Planned(record, command, prior, attempt))

        # 3. durable intents before any effect
        intents = [LedgerEntry(p.command["command_id"], STARTED, attempt=p.attempt,
                               steps=dict(p.prior.steps) if p.prior else {})
                   for p in planned if p.prior is None or p.prior.state != STARTED]
        if intents:
            await lane.publish([self.ledger.record(partition, e) for e in intents])
            self.ledger.apply(partition, intents)

        # A command another instance started before it died may still have a request in flight at
        # the target: wait until the settle time after its intent before looking anything up.
        crashed = [p.prior for p in planned if p.prior is not None and p.prior.state == STARTED]
        if crashed:
            newest = max(_epoch(e.at) for e in crashed)
            wait = newest + self.settle_s - time.time()
            if wait > 0:
                log.info("reconcile_settle", partition=partition, commands=len(crashed), wait_s=round(wait, 1))
                await asyncio.sleep(wait)

        # 4. effects: ordered per lane, lanes concurrently; each sees the index so far
        results: dict[int, Done | Exception] = {}
        overlay: dict[str, Any] = {}
        index_view = ChainMap(overlay, self.ledger.index(partition))
        lanes: dict[bytes | None, list[int]] = {}
        for i, p in enumerate(planned):
            lanes.setdefault(p.record.key, []).append(i)
        slots = asyncio.Semaphore(self.concurrency)

        async def run_lane(indexes: list[int]) -> None:
            async with slots:
                for i in indexes:
                    p = planned[i]
                    try:
                        # prior: the entry from before this batch (not this batch's intent)
                        done = results[i] = await self.effects.perform(p.command, p.prior, index_view)
                        overlay.update(done.index)
                    except RejectedError as exc:
                        results[i] = exc
                    except Exception as exc:  # noqa: BLE001 - unfinished: retried from the ledger
                        results[i] = exc
                        log.warning("command_unfinished", command_id=p.command["command_id"],
                                    error=f"{type(exc).__name__}: {exc}")
                        return  # later commands of this lane wait for it

        await asyncio.gather(*(run_lane(ix) for ix in lanes.values()))

        # 5. ledger entries, audit, dead letters; offsets stop at the first unfinished command
        outputs: list[OutRecord] = []
        entries: list[LedgerEntry] = []
        index_updates: dict[str, Any] = {}
        first_unfinished: int | None = None
        now = time.time()
        at = utc_now_iso()
        for i, p in enumerate(planned):
            cid, ctype = p.command["command_id"], p.command["type"]
            result = results.get(i)
            event_id, integration = p.command.get("event_id", cid), p.command.get("integration", "")
            if isinstance(result, Done):
                entry = LedgerEntry(cid, DONE, attempt=p.attempt, steps=result.steps, outcome=result.outcome)
                index_updates.update(result.index)
                self.stats["done"] += 1
                if result.outcome == "reconciled":
                    self.stats["reconciled"] += 1
                self._commands.labels(self.effects.target, ctype, result.outcome.split(":")[0]).inc()
                what = "skipped" if result.outcome.startswith("skipped") else "done"
                outputs.append(audit_record(self.audit_topic, event_id=event_id, stage=self.name, at=at, decisions=[
                    decision(integration, what, result.outcome, orjson.dumps(result.steps).decode(), cid)]))
                try:
                    flow = p.command.get("flow") or ctype
                    self._e2e.labels(flow).observe(max(0.0, now - parse_time(p.command["occurred_at"]).timestamp()))
                except (KeyError, ValueError):
                    pass
            elif isinstance(result, RejectedError):
                entry = LedgerEntry(cid, FAILED, attempt=p.attempt, steps=dict(p.prior.steps) if p.prior else {},
                                    outcome=f"rejected:{result.status}")
                self.stats["failed"] += 1
                self._commands.labels(self.effects.target, ctype, "rejected").inc()
                rejections.append(Rejection(p.record, "TargetRejected", str(result)))
                outputs.append(audit_record(self.audit_topic, event_id=event_id, stage=self.name, at=at, decisions=[
                    decision(integration, "dead_lettered", f"http_{result.status}", str(result)[:500], cid)]))
            else:
                self.stats["unfinished"] += 1
                if first_unfinished is None or p.record.offset < first_unfinished:
                    first_unfinished = p.record.offset
                continue
            entries.append(entry)
            outputs.append(self.ledger.record(partition, entry))
        outputs.extend(self.ledger.index_record(partition, k, v) for k, v in index_updates.items())
        if first_unfinished is not None:
            # records at or after the stop are fetched again: reject them then, not twice
            rejections = [r for r in rejections if r.record.offset < first_unfinished
                          or r.error_class == "TargetRejected"]
        return BatchResult(outputs=outputs, rejections=rejections, commit_upto=first_unfinished,
                           context=(entries, index_updates))
