"""What a stage decides for one event and one integration: a command, or a drop with its rule;
the decision entries of audit records; :class:`Reject` for a record that cannot be processed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Rules that drop an event for an integration (audit records and metrics name them).
RULE_INACTIVE = "integration_inactive"
RULE_INTERNAL_CALL = "internal_call"
RULE_NOT_CONNECTED = "number_not_connected"
RULE_CALL_TYPE_DISABLED = "call_type_disabled"
RULE_SMS_DISABLED = "sms_disabled"
RULE_SMS_TYPE_DISABLED = "sms_type_disabled"
RULE_UNKNOWN_NUMBER = "unknown_number"
RULE_DETAILS_OFF = "call_details_off"
RULE_INTELLIGENCE_OFF = "conversation_intelligence_off"


@dataclass(frozen=True, slots=True)
class Dropped:
    integration: str
    rule: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Command:
    """A command for a sink: ``key`` picks its partition (its ordering lane)."""

    integration: str
    command_id: str
    key: str
    body: dict[str, Any]


Decision = Command | Dropped


class Reject(Exception):
    """Raised by a per-record function to reject a record with a named error class."""

    def __init__(self, error_class: str, message: str) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.message = message


def decision(
    integration: str,
    what: str,
    rule: str | None = None,
    detail: str | None = None,
    command_id: str | None = None,
    priority: str | None = None,
) -> dict[str, Any]:
    """One entry of an audit record: the integration, what happened (``emitted``, ``dropped``,
    ``done``, ``skipped``, ``dead_lettered``), the rule or outcome, the command id, and — for bulk
    work (an initial import, a reconciliation) — the command's ``priority`` (``pipeline status``
    counts an import's progress by it)."""
    d: dict[str, Any] = {"integration": integration, "decision": what}
    if rule:
        d["rule"] = rule
    if detail:
        d["detail"] = detail
    if command_id:
        d["command_id"] = command_id
    if priority:
        d["priority"] = priority
    return d
