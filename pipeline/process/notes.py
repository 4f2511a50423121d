"""Note bodies for calls and SMS from line templates.

A template is a list of lines with ``{placeholders}``; a line is left out when any placeholder
in it has no value, so empty items never show. The first line of every note is the marker
(``CloudTalk call 1002409191`` / ``CloudTalk SMS 88231977``) that identifies the source event; a
custom template without it gets it prepended.

:func:`log_conversation` builds the command both flows send to the Kustomer sink.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from pipeline.core.decisions import Command
from pipeline.core.envelope import Envelope, command_id, parse_time
from pipeline.core.templates import placeholders


@lru_cache(maxsize=256)
def _compiled(template: tuple[str, ...], marker: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Each line with the placeholders it needs, parsed once per template."""
    lines = list(template)
    if marker not in lines:
        lines.insert(0, marker)
    return tuple((line, tuple(placeholders(line))) for line in lines)


def render(template: Sequence[str], values: Mapping[str, Any], marker: str) -> str:
    out = []
    for line, names in _compiled(tuple(template), marker):
        if any(values.get(n) in (None, "", []) for n in names):
            continue
        out.append(line.format_map(values) if names else line)
    return "\n".join(out)


def human_time(value: str | None) -> str | None:
    """``2026-03-02T09:14:05.000Z`` → ``2026-03-02 09:14:05 UTC``."""
    if not value:
        return None
    if len(value) == 24 and value[10] == "T" and value[-1] == "Z":  # the usual form, without parsing
        return f"{value[:10]} {value[11:19]} UTC"
    try:
        return parse_time(value).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return value


def seconds_between(start: str | None, end: str | None) -> int | None:
    if not start or not end:
        return None
    try:
        return max(0, int((parse_time(end) - parse_time(start)).total_seconds()))
    except ValueError:
        return None


NOTE_LIMIT = 10_240  # Kustomer's note body limit, in characters


def log_conversation(
    integration: str,
    env: Envelope,
    flow: str,
    external: str,
    customer_name: str | None,
    conversation: Mapping[str, Any],
    body: str,
    marker: str,
) -> Command:
    """A ``kustomer.log_conversation`` command: find or create the customer of ``external``, a
    new conversation, and the note (``marker`` is its first line). Keyed by integration and
    number, so the events of one number share a lane at the sink."""
    cid = command_id(integration, env.id)
    return Command(
        integration,
        cid,
        f"{integration}|{external}",
        {
            "command_id": cid,
            "type": "kustomer.log_conversation",
            "integration": integration,
            "event_id": env.id,
            "occurred_at": env.occurred_at,
            "flow": flow,
            "customer": {"phone": external, "name": customer_name, "create": True},
            "conversation": dict(conversation),
            "note": {"body": body[:NOTE_LIMIT], "marker": marker},
        },
    )
