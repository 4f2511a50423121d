"""What a processor decides for one event and one integration: a command, or a drop with its rule."""

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
