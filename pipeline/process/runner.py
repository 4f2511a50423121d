"""The processors as services: a pure decide function inside the transactional loop.

``decide(envelope, config) -> [Command | Dropped]`` is pure; :func:`decisions_transform` turns
it into a batch transform: each record is decoded and validated (a bad record is rejected to the
dead-letter topic), each command goes to its command topic keyed by its lane, and every
decision — emitted or dropped, with its rule — leaves an audit record.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka.structs import ConsumerRecord

from pipeline.core.config import PipelineConfig
from pipeline.core.decisions import Command, Decision, Reject, decision
from pipeline.core.envelope import Envelope, utc_now_iso
from pipeline.core.live_config import LiveConfig
from pipeline.core.observability import metrics
from pipeline.core.schemas import SchemaError
from pipeline.core.settings import ServiceSettings, env_int
from pipeline.kafka.loop import LoopSettings, TransactionalLoop, TransformStage
from pipeline.kafka.records import BatchResult, OutRecord, Rejection, Transform, audit_record
from pipeline.kafka.service import run_loop_service, start_logging
from pipeline.kafka.topics import Topics
from pipeline.process.calls import process_call
from pipeline.process.contacts_export import process_contact
from pipeline.process.contacts_import import process_customer
from pipeline.process.sms import process_sms

Decide = Callable[[Envelope, PipelineConfig], list[Decision]]


@dataclass(frozen=True)
class Flow:
    name: str
    input_base: str  # attribute of Topics
    output_base: str
    decide: Decide
    target: str


FLOWS: dict[str, Flow] = {
    "calls": Flow("calls", "raw_calls", "kustomer_commands", process_call, "kustomer"),
    "sms": Flow("sms", "raw_sms", "kustomer_commands", process_sms, "kustomer"),
    "contacts-import": Flow("contacts-import", "raw_customers", "cloudtalk_commands", process_customer, "cloudtalk"),
    "contacts-export": Flow("contacts-export", "raw_contacts", "kustomer_commands", process_contact, "kustomer"),
}


def decisions_transform(flow: Flow, config: PipelineConfig | LiveConfig, topics: Topics) -> Transform:
    """A batch transform: per record, the flow's decisions as commands plus one audit record.

    With a :class:`LiveConfig` each batch is decided by the configuration current at its start
    (and its audit records name that version). An event whose envelope names one integration
    (``meta.for_integration``: a backfill or replay for one integration) is decided for that
    integration alone; one that is not configured is rejected."""
    stage = f"process-{flow.name}"
    output = getattr(topics, flow.output_base)
    audit = topics.audit
    m = metrics()
    filtered: dict[tuple[str, str], Any] = {}
    emitted: dict[str, Any] = {}
    # counted per batch, added to the metrics once per batch
    emitted_n: Counter[str] = Counter()
    filtered_n: Counter[tuple[str, str]] = Counter()
    imports_n: Counter[str] = Counter()  # bulk commands (an import, a reconciliation) per integration

    def one(record: ConsumerRecord, at: str, out: list[OutRecord], config: PipelineConfig, version: str | None) -> None:
        try:
            # the envelope is checked here; payloads were checked at the edge that wrote the raw
            # topic (ingest, pollers, backfill — the only writers), which halves the cost per event.
            # A payload the rules cannot read still fails below and is dead-lettered.
            env = Envelope.from_json(record.value, payload=False)
        except SchemaError as exc:
            raise Reject("SchemaError", str(exc)) from None
        trail = []
        only = env.meta.get("for_integration")
        if only:
            narrowed = config.only(str(only))
            if narrowed is None:
                raise Reject("UnknownIntegration", f"meta.for_integration: {only!r} is not configured")
            config = narrowed
        for d in flow.decide(env, config):
            if isinstance(d, Command):
                ctype = d.body["type"]
                out.append(
                    OutRecord(
                        output,
                        orjson.dumps(d.body),
                        d.key.encode(),
                        (
                            ("command_id", d.command_id.encode()),
                            ("event_id", env.id.encode()),
                            ("type", ctype.encode()),
                        ),
                    )
                )
                bulk = d.body.get("priority") == "bulk"
                trail.append(
                    decision(d.integration, "emitted", command_id=d.command_id, priority="bulk" if bulk else None)
                )
                emitted_n[ctype] += 1
                if bulk:
                    imports_n[d.integration] += 1
            else:
                trail.append(decision(d.integration, "dropped", d.rule, d.detail or None))
                filtered_n[(d.integration, d.rule)] += 1
        out.append(audit_record(audit, event_id=env.id, stage=stage, at=at, decisions=trail, config=version))

    def transform(records: Sequence[ConsumerRecord]) -> BatchResult:
        result = BatchResult()
        at = utc_now_iso()
        # the whole batch by one configuration: the one current at its start
        if isinstance(config, LiveConfig):
            current, version = config.current, config.version
        else:
            current, version = config, None
        for record in records:
            out: list[OutRecord] = []
            try:
                one(record, at, out, current, version)
            except Reject as exc:
                result.rejections.append(Rejection(record, exc.error_class, exc.message))
                continue
            except Exception as exc:  # noqa: BLE001 - a bad record never stops the stream
                result.rejections.append(Rejection(record, type(exc).__name__, str(exc)))
                continue
            result.outputs.extend(out)
        count_decisions()
        return result

    def count_decisions() -> None:
        for ctype, n in emitted_n.items():
            c = emitted.get(ctype)
            if c is None:
                c = emitted[ctype] = m.commands_out.labels(flow.target, ctype)
            c.inc(n)
        for key, n in filtered_n.items():
            c = filtered.get(key)
            if c is None:
                c = filtered[key] = m.events_filtered.labels(*key)
            c.inc(n)
        for integration, n in imports_n.items():
            m.import_commands.labels(integration, "emitted").inc(n)
        emitted_n.clear()
        filtered_n.clear()
        imports_n.clear()

    return transform


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("process", help="run a processor (stateless, transactional, scales by replicas)")
    p.add_argument("flow", choices=sorted(FLOWS), help="which raw events to process")
    p.add_argument("--config", help="integrations file (env PIPELINE_CONFIG)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = ServiceSettings.from_env()
    start_logging(f"process-{args.flow}", settings)
    live = LiveConfig(args.config or settings.config_path)  # a processor reads no secret
    flow = FLOWS[args.flow]
    topics = Topics(settings.kafka.topic_prefix)
    loop = TransactionalLoop(
        LoopSettings.of(
            settings.kafka,
            group_id=f"{settings.kafka.topic_prefix}process-{flow.name}",
            input_topics=(getattr(topics, flow.input_base),),
            deadletter_topic=topics.deadletter,
            session_timeout_ms=env_int(os.environ, "KAFKA_SESSION_TIMEOUT_MS", 10_000, minimum=1000),
        ),
        TransformStage(f"process-{flow.name}", decisions_transform(flow, live, topics)),
    )
    asyncio.run(run_loop_service(f"process-{flow.name}", loop, settings, live=live))
    return 0
