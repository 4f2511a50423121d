"""Phone numbers to E.164 with libphonenumber (phonenumbers), cached.

CloudTalk variables deliver numbers as JSON integers without '+' (``447700900123``); Kustomer and
the CloudTalk contacts API use ``+E.164`` strings; WhatsApp values carry a ``whatsapp:`` prefix.
A parse costs tens of microseconds, so results are cached.

* :func:`normalize_e164` — a *possible* number in E.164, else None (calls and SMS: a real call
  came from a real line, even in a range libphonenumber does not list as assigned);
* :func:`is_valid_e164` — the strict check (valid country, area and local codes), used where the
  reference demands it (contact export, rule 5).
"""

from __future__ import annotations

from functools import lru_cache

import phonenumbers

_STRIP = str.maketrans("", "", " -().\u00a0/")


def _candidate(value: int | str) -> str | None:
    if isinstance(value, bool):
        return None
    text = str(value).strip()
    if text.lower().startswith("whatsapp:"):
        text = text[len("whatsapp:") :]
    text = text.translate(_STRIP)
    if not text:
        return None
    if text.startswith("00"):
        text = "+" + text[2:]
    elif not text.startswith("+"):
        text = "+" + text
    return text if text[1:].isdigit() else None


@lru_cache(maxsize=131_072)
def _parse(text: str) -> phonenumbers.PhoneNumber | None:
    try:
        return phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException:
        return None


@lru_cache(maxsize=131_072)
def _normalize(text: str) -> str | None:
    parsed = _parse(text)
    if parsed is None or not phonenumbers.is_possible_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


@lru_cache(maxsize=131_072, typed=True)  # typed: True is not the number 1
def normalize_e164(value: int | str | None) -> str | None:
    """``447700900123`` / ``"+44 7700 900123"`` / ``"whatsapp:+44…"`` → ``"+447700900123"``; None if impossible.

    Cached by the value as given: a call names its CloudTalk line and, mostly, a caller seen before.
    """
    if value is None:
        return None
    text = _candidate(value)
    return _normalize(text) if text else None


@lru_cache(maxsize=131_072)
def is_valid_e164(e164: str) -> bool:
    parsed = _parse(e164)
    return parsed is not None and phonenumbers.is_valid_number(parsed)
