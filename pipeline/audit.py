"""Audit records: why an event went where it went (topic ``audit``, keyed by event id).

One record per event and stage: ``{"event_id", "stage", "at", "decisions": [...]}`` where each
decision names the integration, what happened (``emitted``, ``dropped``, ``done``, ``skipped``,
``dead_lettered``), the rule or outcome, and the command id.
"""

from __future__ import annotations

from typing import Any

import orjson

from pipeline.kafka import OutRecord


def decision(integration: str, what: str, rule: str | None = None, detail: str | None = None,
             command_id: str | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"integration": integration, "decision": what}
    if rule:
        d["rule"] = rule
    if detail:
        d["detail"] = detail
    if command_id:
        d["command_id"] = command_id
    return d


def audit_record(topic: str, *, event_id: str, stage: str, at: str, decisions: list[dict[str, Any]]) -> OutRecord:
    value = {"event_id": event_id, "stage": stage, "at": at, "decisions": decisions}
    return OutRecord(topic, orjson.dumps(value), event_id.encode(), (("stage", stage.encode()),))
