"""Note bodies for calls and SMS from line templates.

A template is a list of lines with ``{placeholders}``; a line is left out when any placeholder
in it has no value, so empty items never show. The first line of every note is the marker
(``CloudTalk call 1002409191`` / ``CloudTalk SMS 88231977``) that identifies the source event; a
custom template without it gets it prepended. Defaults follow the reference (1.7 and 1.8).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from pipeline.core.envelope import parse_time
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
