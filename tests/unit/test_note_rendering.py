"""Note bodies are exactly what the template rule says: every line formatted on its own, a line
left out when any of its placeholders has no value, the marker first — for varied templates and
values, including the ones cut to Kustomer's limit."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from pipeline.core import templates
from pipeline.core.templates import placeholders
from pipeline.process import notes


def by_the_rule(template: Sequence[str], values: Mapping[str, Any], marker: str, limit: int = notes.NOTE_LIMIT) -> str:
    """The rule spelled out line by line (the reference the rendering is compared with)."""
    ordered = [marker, *(line for line in template if line != marker)]
    lines = [
        (line, tuple(placeholders(line)))
        for line in ordered
        if not any(values.get(n) in (None, "", []) for n in placeholders(line))
    ]
    body = "\n".join(line.format_map(values) if names else line for line, names in lines)
    if len(body.encode("utf-16-le")) // 2 <= limit:
        return body
    fitted = notes._fit_free_text(lines, values, limit)
    if fitted is not None:
        return fitted
    marks = {
        n: notes.limits.cut_mark(len(str(values[n]))) for _, names in lines for n in names if n in templates.FREE_TEXT
    }
    return notes.fit_at_end(notes._join(lines, {**values, **marks}), limit)


EXTRA_LINES = (
    "Literal {{braces}} and }} stay as written",
    "No placeholders at all",
    "Rating {rating:>3} of 5",
    "Notes again: {notes!r}",
    "{agent} / {tags}",
    "Waited {waiting_time} s, talked {talking_time} s",
    "",
)
SAMPLE_VALUES: tuple[Any, ...] = (None, "", [], 0, False, 5, 2.5, "Billing, VIP", "Zoë 😀 漢字", "{not a field}")


def random_values(rng: random.Random, names: Sequence[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in names:
        if rng.random() < 0.1:
            continue  # not given at all
        if name in templates.FREE_TEXT and rng.random() < 0.3:
            values[name] = rng.choice(["x", "word ", "😀", "é"]) * rng.choice([10, 3000, 6000, 12_000])
        else:
            values[name] = rng.choice(SAMPLE_VALUES)
    return values


@pytest.mark.parametrize("seed", range(4))
def test_rendering_is_the_rule_for_varied_templates_and_values(seed):
    rng = random.Random(seed)
    names = sorted(templates.CALL_FIELDS | templates.SMS_FIELDS | templates.FREE_TEXT)
    bases = (
        (templates.DEFAULT_CALL_TEMPLATE, templates.CALL_MARKER),
        (templates.DEFAULT_SMS_TEMPLATE, templates.SMS_MARKER),
        (templates.DETAILS_TEMPLATE, templates.DETAILS_MARKER),
    )
    for _ in range(300):
        template, marker = rng.choice(bases)
        if rng.random() < 0.5:  # a custom template: lines dropped, shuffled, added
            lines = [line for line in template if rng.random() < 0.8]
            lines += rng.sample(EXTRA_LINES, rng.randint(0, 3))
            rng.shuffle(lines)
            template = tuple(lines)
        values = random_values(rng, names)
        limit = rng.choice([notes.NOTE_LIMIT, notes.NOTE_LIMIT, 400])
        expected = by_the_rule(template, values, marker, limit)
        assert notes.render(template, values, marker, limit) == expected
        assert notes.render(list(template), values, marker, limit) == expected, "a list template too"


def test_the_same_template_with_other_values_leaves_out_other_lines():
    template = ("Agent: {agent}", "Tags: {tags}", "Notes: {notes}")
    marker = templates.CALL_MARKER
    for values in (
        {"call_id": 1, "agent": "Max", "tags": "", "notes": None},
        {"call_id": 2, "agent": None, "tags": "VIP", "notes": "call back"},
        {"call_id": 3, "agent": "Max", "tags": "VIP", "notes": "call back"},
        {"call_id": 4, "agent": "Max", "tags": "", "notes": None},
        {"call_id": 0, "agent": 0, "tags": False, "notes": []},
        {"call_id": None, "agent": "Max"},
    ):
        assert notes.render(template, values, marker) == by_the_rule(template, values, marker)


def test_a_bad_format_spec_fails_as_before():
    values = {"call_id": 1, "rating": "five"}
    with pytest.raises(ValueError, match="Unknown format code 'd'"):
        notes.render(("Rating: {rating:d}",), values, templates.CALL_MARKER)
