"""The length limits of the values the pipeline writes into Kustomer and CloudTalk, and how a value
is cut to fit them (docs/platforms.md, "Length limits").

Lengths are counted in UTF-16 code units, as JavaScript's ``String.length`` counts. That is the
number of characters except for characters beyond U+FFFF (most emoji), which count twice, so it
is never less than the number of characters: a value that fits by this count fits whether a
platform counts characters or UTF-16 code units. Bytes never matter.

Two marks say that something was cut:

* free text (agent notes, SMS text) ends in ``… [cut: 12,345 characters]`` — :func:`cut`;
* short fields (names, company, address) end in ``…`` — :func:`clip`.
"""

from __future__ import annotations

# Kustomer
KUSTOMER_NOTE_BODY = 10_240  # note body, 1 to 10,240 characters
KUSTOMER_CONVERSATION_NAME = 255  # conversation name (ours: the simulator does not check it)
KUSTOMER_CUSTOMER_NAME = 255  # customer name (ours)

# CloudTalk contact fields (the simulator's limits)
CLOUDTALK_CONTACT_FIELDS = {
    "name": 150,
    "company": 100,
    "website": 100,
    "address": 255,
    "city": 255,
    "zip": 15,
    "state": 255,
}
CLOUDTALK_LINK_NAME = 30  # external URL (link) name
CLOUDTALK_EMAIL = 255  # each e-mail address

ELLIPSIS = "…"


def text_length(text: str) -> int:
    """Length in UTF-16 code units: characters, with each character beyond U+FFFF counted twice."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-16-le")) // 2


def fits(text: str, limit: int) -> bool:
    """``text_length(text) <= limit``, without counting when the text is short enough anyway."""
    return 2 * len(text) <= limit or text_length(text) <= limit


def prefix(text: str, units: int) -> str:
    """The longest start of ``text`` whose :func:`text_length` is at most ``units``."""
    if units <= 0:
        return ""
    head = text[:units]
    over = text_length(head) - units
    while over > 0:  # characters beyond U+FFFF count twice: drop characters from the end
        over -= 2 if ord(head[-1]) > 0xFFFF else 1
        head = head[:-1]
    return head


def cut_mark(removed: int) -> str:
    """What ends cut free text: ``… [cut: 12,345 characters]`` (characters, as a person counts)."""
    return f"{ELLIPSIS} [cut: {removed:,} characters]"


def cut(text: str, limit: int) -> str | None:
    """``text`` itself when it fits in ``limit``; else its start followed by :func:`cut_mark`,
    together at most ``limit`` long; None when not even the mark fits."""
    if fits(text, limit):
        return text
    # room for the start: the mark is longest when everything is cut
    room = limit - text_length(cut_mark(len(text)))
    if room < 0:
        return None
    head = prefix(text, room)
    while len(head) < len(text):  # a shorter count in the mark may leave room for a character more
        longer = text[: len(head) + 1]
        if text_length(longer) + text_length(cut_mark(len(text) - len(longer))) > limit:
            break
        head = longer
    return head + cut_mark(len(text) - len(head))


def clip(value: str | None, limit: int) -> str | None:
    """A short field (a name, a company, an address line) fitted to ``limit``: itself when it fits,
    else its start and ``…``; None stays None."""
    if value is None or fits(value, limit):
        return value
    return prefix(value, limit - len(ELLIPSIS)).rstrip() + ELLIPSIS
