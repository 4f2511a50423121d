"""Audit records: why an event went where it went (topic ``audit``, keyed by event id)."""

from __future__ import annotations

import orjson

from pipeline.envelope import utc_now_iso
from pipeline.kafka import OutRecord


def audit_record(topic: str, *, event_id: str, integration: str, stage: str, decision: str,
                 rule: str | None = None, detail: str | None = None, command_id: str | None = None) -> OutRecord:
    value = {"event_id": event_id, "integration": integration, "stage": stage, "decision": decision,
             "rule": rule, "detail": detail, "command_id": command_id, "at": utc_now_iso()}
    return OutRecord(topic, orjson.dumps(value), event_id.encode(),
                     (("decision", decision.encode()), ("integration", integration.encode())))
