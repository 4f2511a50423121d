"""Note templates: a list of lines with ``{placeholders}``; the markers that identify the source
event, the default templates (one per flow), the placeholders each flow knows, which of them are
free text (the only values cut when a note is too long), and the check of a custom template (used
by the integrations file's validation). Rendering lives with the processors.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

CALL_MARKER = "CloudTalk call {call_id}"
SMS_MARKER = "CloudTalk SMS {sms_id}"

DEFAULT_CALL_TEMPLATE: tuple[str, ...] = (
    CALL_MARKER,
    "Direction: {direction}",
    "Status: {status}",
    "Started: {started}",
    "Answered: {answered}",
    "Ended: {ended}",
    "Duration: {duration} s",
    "Talking time: {talking_time} s",
    "Waiting time: {waiting_time} s",
    "Wrap-up time: {wrapup_time} s",
    "Agent: {agent}",
    "CloudTalk number: {cloudtalk_number}",
    "Customer number: {customer_number}",
    "Tags: {tags}",
    "Notes: {notes}",
    "Rating: {rating}/5",
    "Recording: {recording}",
)

DETAILS_MARKER = "CloudTalk call {call_id} · details updated ({version})"

# a change of a call's details after it was logged: what the event states (not configurable)
DETAILS_TEMPLATE: tuple[str, ...] = (
    DETAILS_MARKER,
    "Tags: {tags}",
    "Notes: {notes}",
    "Rating: {rating}/5",
    "Recording: {recording}",
    "Summary: {summary}",
    "Smart notes: {smart_notes}",
    "Transcription: {transcription}",
)

DEFAULT_SMS_TEMPLATE: tuple[str, ...] = (
    SMS_MARKER,
    "Direction: {direction}",
    "From: {sender}",
    "To: {recipient}",
    "CloudTalk number: {cloudtalk_number}",
    "Agent: {agent}",
    "Date: {sent}",
    "Message:",
    "{text}",
)

CALL_FIELDS = frozenset(
    {
        "call_id",
        "call_uuid",
        "direction",
        "status",
        "call_type",
        "started",
        "answered",
        "ended",
        "duration",
        "talking_time",
        "waiting_time",
        "wrapup_time",
        "agent",
        "agent_name",
        "agent_email",
        "cloudtalk_number",
        "cloudtalk_number_name",
        "customer_number",
        "tags",
        "notes",
        "rating",
        "recording",
        "contact_id",
    }
)
SMS_FIELDS = frozenset(
    {
        "sms_id",
        "direction",
        "sender",
        "recipient",
        "cloudtalk_number",
        "customer_number",
        "agent",
        "sent",
        "text",
        "contact_id",
    }
)

# Free text: what people wrote. When a note is over Kustomer's limit only these values are cut
# (pipeline/process/notes.py); every other placeholder is a fact of the call or SMS and is kept.
# "summary" is reserved for a call summary placeholder.
FREE_TEXT = frozenset({"notes", "text", "summary", "smart_notes"})

_FORMATTER = string.Formatter()


def placeholders(line: str) -> list[str]:
    return [name for _, name, _, _ in _FORMATTER.parse(line) if name is not None]


def template_fields_problems(lines: Sequence[str], flow: str) -> list[str]:
    """Problems of a custom template, each as ``[i]: message`` (for config errors)."""
    allowed = CALL_FIELDS if flow == "calls" else SMS_FIELDS
    problems = []
    for i, line in enumerate(lines):
        try:
            names = placeholders(line)
        except ValueError as exc:
            problems.append(f"[{i}]: {exc} (rule: template)")
            continue
        for name in names:
            if name not in allowed:
                problems.append(
                    f"[{i}]: unknown placeholder {{{name}}}; known: {', '.join(sorted(allowed))} (rule: template)"
                )
    return problems
