"""Note bodies for calls and SMS from line templates.

A template is a list of lines with ``{placeholders}``; a line is left out when any placeholder
in it has no value, so empty items never show. The first line of every note is the marker
(``CloudTalk call 1002409191`` / ``CloudTalk SMS 88231977``) that identifies the source event (the
Kustomer sink finds a note by it): a custom template without it gets it prepended, one with it
elsewhere gets it moved to the top.

A note fits Kustomer's limit (10,240 characters) by cutting free text only — agent notes, SMS
text (:data:`~pipeline.core.templates.FREE_TEXT`) — so every fact of the call (direction, numbers,
agent, duration, status, rating, tags, recording link) stays. Several free-text values share the
room fairly: short ones stay whole, the long ones get equal parts, each ending in
``… [cut: 12,345 characters]``. Only when the facts alone are too long (a custom template of
many long lines) is the body cut at its end, the marker line still first.

:func:`log_conversation` builds the command both flows send to the Kustomer sink.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from pipeline.core import limits
from pipeline.core.decisions import Command
from pipeline.core.envelope import Envelope, command_id, parse_time
from pipeline.core.templates import FREE_TEXT, placeholders

NOTE_LIMIT = limits.KUSTOMER_NOTE_BODY  # Kustomer's note body limit, in characters

Lines = Sequence[tuple[str, tuple[str, ...]]]


_EMPTY: tuple[Any, ...] = (None, "", [])  # a placeholder with one of these values leaves its line out
_BODY_FORMATS = 256  # body format strings kept per template (one per set of lines left out)


class _ParsedTemplate:
    """A template parsed once: its lines (the marker first) with the placeholders each needs, the
    lines each placeholder is in (as bits: line ``i`` is ``1 << i``), and the format string of the
    whole body for each set of lines left out — a note is then one ``format_map``."""

    __slots__ = ("_bodies", "lines", "lines_of")

    def __init__(self, template: tuple[str, ...], marker: str) -> None:
        lines = [line for line in template if line != marker]
        lines.insert(0, marker)
        self.lines = tuple((line, tuple(placeholders(line))) for line in lines)
        lines_of: dict[str, int] = {}
        for i, (_, names) in enumerate(self.lines):
            for name in names:
                lines_of[name] = lines_of.get(name, 0) | 1 << i
        self.lines_of = tuple(lines_of.items())
        self._bodies: dict[int, str] = {}

    def kept(self, left_out: int) -> Lines:
        return [line for i, line in enumerate(self.lines) if not left_out >> i & 1]

    def body_format(self, left_out: int) -> str:
        """The lines not in ``left_out`` joined into one format string; a line without
        placeholders is text as it stands (its braces escaped), as :func:`_join` writes it."""
        body = self._bodies.get(left_out)
        if body is None:
            body = "\n".join(
                line if names else line.replace("{", "{{").replace("}", "}}") for line, names in self.kept(left_out)
            )
            if len(self._bodies) < _BODY_FORMATS:
                self._bodies[left_out] = body
        return body


@lru_cache(maxsize=256)
def _compiled(template: tuple[str, ...], marker: str) -> _ParsedTemplate:
    """The template parsed, once per template and marker."""
    return _ParsedTemplate(template, marker)


def _join(lines: Lines, values: Mapping[str, Any]) -> str:
    return "\n".join(line.format_map(values) if names else line for line, names in lines)


def fair_shares(lengths: Mapping[str, int], uses: Mapping[str, int], budget: int) -> dict[str, int]:
    """The room each free-text value gets when together they may take ``budget`` (a value used
    ``uses[name]`` times costs that many times its length): values shorter than an equal share
    keep their length, the rest share what is left equally (pure)."""
    shares: dict[str, int] = {}
    left, count = budget, sum(uses[n] for n in lengths)
    order = sorted(lengths, key=lambda n: lengths[n])
    for i, name in enumerate(order):
        share = max(0, left) // count
        if lengths[name] <= share:
            shares[name] = lengths[name]
            left -= lengths[name] * uses[name]
            count -= uses[name]
            continue
        rest = order[i:]
        shares.update(dict.fromkeys(rest, share))
        spare = left - share * count  # what integer division left over goes to the longest values
        for other in reversed(rest):
            if uses[other] <= spare:
                shares[other] += 1
                spare -= uses[other]
        break
    return shares


def _fit_free_text(lines: Lines, values: Mapping[str, Any], limit: int) -> str | None:
    """The body with only free-text values cut so that it fits ``limit``; None when the other
    lines alone leave no room for them."""
    free = {n: str(values[n]) for _, names in lines for n in names if n in FREE_TEXT}
    if not free:
        return None
    uses = Counter(n for _, names in lines for n in names if n in free)
    fixed = limits.text_length(_join(lines, {**values, **dict.fromkeys(free, "")}))
    budget = limit - fixed
    for _ in range(3):  # a format spec ({notes!r}, {text:>80}) can change lengths: measure, retry
        shares = fair_shares({n: limits.text_length(v) for n, v in free.items()}, uses, budget)
        fitted = {n: limits.cut(v, shares[n]) for n, v in free.items()}
        if any(v is None for v in fitted.values()):
            return None
        body = _join(lines, {**values, **fitted})
        over = limits.text_length(body) - limit
        if over <= 0:
            return body
        budget -= over
    return None


def fit_at_end(body: str, limit: int) -> str:
    """The last resort: ``body`` cut at its end, with the cut mark (the marker line, first and
    short, stays)."""
    return limits.cut(body, limit) or limits.prefix(body, limit)


def render(template: Sequence[str], values: Mapping[str, Any], marker: str, limit: int = NOTE_LIMIT) -> str:
    """The note body of ``template`` with ``values``, at most ``limit`` long (see the module)."""
    parsed = _compiled(tuple(template), marker)
    left_out = 0  # a line with a placeholder without value is left out
    get = values.get
    for name, lines_of_name in parsed.lines_of:
        value = get(name)
        if not value and value in _EMPTY:  # (0 and False are values)
            left_out |= lines_of_name
    body = parsed.body_format(left_out).format_map(values)
    if limits.fits(body, limit):
        return body
    lines = parsed.kept(left_out)
    fitted = _fit_free_text(lines, values, limit)
    if fitted is not None:
        return fitted
    # the facts alone are too long: free text reduced to its mark, then the body cut at its end
    marks = {n: limits.cut_mark(len(str(values[n]))) for _, names in lines for n in names if n in FREE_TEXT}
    return fit_at_end(_join(lines, {**values, **marks}), limit)


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
    new conversation, and the note (``marker`` is its first line; :func:`render` made ``body``
    fit). Keyed by integration and number, so the events of one number share a lane at the sink.
    Names are fitted to Kustomer's limits."""
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
            "customer": {
                "phone": external,
                "name": limits.clip(customer_name, limits.KUSTOMER_CUSTOMER_NAME),
                "create": True,
            },
            "conversation": {
                **conversation,
                "name": limits.clip(conversation["name"], limits.KUSTOMER_CONVERSATION_NAME),
            },
            "note": {"body": fit_at_end(body, NOTE_LIMIT), "marker": marker},
        },
    )
