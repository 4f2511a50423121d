"""The details of a call that can change after it ended: tags, agent notes, rating, recording,
and conversation intelligence (summary, smart notes, transcription link).

CloudTalk reports them in the call-ended body, later in Call Modified and Recording Uploaded, and
in the call history (which the calls poller reads again). A body *states* the fields it carries:
an empty list or a null clears a value, an absent field says nothing. :func:`details_of` maps a
canonical body to :data:`FIELDS`; :func:`changed` is what a later statement adds to what the
call's Kustomer note already says.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# details field -> the canonical body's field
SOURCE_FIELDS: dict[str, str] = {
    "tags": "call_tags",
    "notes": "call_notes",
    "rating": "rating",
    "recording": "recording_url",
    "summary": "summary",
    "smart_notes": "smart_notes",
    "transcription": "transcription_url",
}
FIELDS = tuple(SOURCE_FIELDS)
LISTS = frozenset({"tags", "notes", "smart_notes"})
ONCE = frozenset({"recording", "transcription"})  # links to one thing: only their arrival is news
INTELLIGENCE = frozenset({"summary", "smart_notes", "transcription"})  # conversation intelligence


def details_of(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The details a canonical call body states (lists as lists, empty values as None / [])."""
    out: dict[str, Any] = {}
    for name, source in SOURCE_FIELDS.items():
        if source not in payload:
            continue
        value = payload[source]
        if name in LISTS:
            if isinstance(value, str):
                value = [value]
            out[name] = [str(v) for v in value or [] if v not in (None, "")]
        else:
            out[name] = value if value not in ("", []) else None
    return out


def changed(stated: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of ``now`` whose value differs from what was ``stated`` (a field never stated
    counts as empty, so stating it empty is no change).

    A recording is uploaded once: only its arrival is a change. CloudTalk shows one recording
    under different links (the workflow's download link, the call history's player link), and a
    recording that expired is no news for the conversation."""
    out = {}
    for name, value in now.items():
        before = stated.get(name, [] if name in LISTS else None)
        if name in ONCE and (before or not value):
            continue
        if value != before:
            out[name] = value
    return out
