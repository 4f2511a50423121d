"""Notes and names that fit the platforms' length limits: only free text is cut, and it says so."""

from __future__ import annotations

import re

import pytest

from pipeline.core import limits
from pipeline.core.schemas import validate
from pipeline.core.templates import DEFAULT_SMS_TEMPLATE
from pipeline.process import calls, contacts_import, notes, sms
from tests.unit.test_call_sms_rules import call_env, config, integration, only, sms_env
from tests.unit.test_contact_rules import customer_env, one

LIMIT = 10_240
CUT = re.compile(r"… \[cut: ([0-9,]+) characters\]$")


def note_of(decision) -> str:
    validate("command.kustomer.log_conversation", decision.body)
    return decision.body["note"]["body"]


def removed(line: str) -> int:
    match = CUT.search(line)
    assert match, f"no cut mark at the end of {line[-60:]!r}"
    return int(match.group(1).replace(",", ""))


# -- the helpers -------------------------------------------------------------------------------


def test_lengths_are_characters_with_emoji_counted_twice_never_bytes():
    assert limits.text_length("abc") == 3
    assert limits.text_length("Nováková 漢字") == 11, "a multi-byte character is one character"
    assert limits.text_length("ok 😀") == 5, "a character beyond U+FFFF is two UTF-16 code units"
    assert limits.prefix("ab😀cd", 3) == "ab", "an emoji is never split, and never over the count"
    assert limits.prefix("ab😀cd", 4) == "ab😀"


def test_cut_keeps_the_start_and_says_how_much_was_cut():
    text = "word " * 3000
    out = limits.cut(text, 1000)
    assert out is not None and limits.text_length(out) == 1000
    head = CUT.sub("", out)
    assert text.startswith(head) and removed(out) == len(text) - len(head)
    assert limits.cut("short", 10) == "short"
    assert limits.cut("x" * 100, 10) is None, "not even the mark fits"


def test_clip_ends_short_fields_in_an_ellipsis():
    assert limits.clip("Jane Cooper", 150) == "Jane Cooper"
    assert limits.clip(None, 10) is None
    assert limits.clip("Acme International Holdings", 10) == "Acme Inte…"
    assert limits.clip("ž" * 200, 150) == "ž" * 149 + "…"


@pytest.mark.parametrize(
    ("lengths", "uses", "budget", "shares"),
    [
        ({"a": 100, "b": 8000, "c": 20000}, {"a": 1, "b": 1, "c": 1}, 10000, {"a": 100, "b": 4950, "c": 4950}),
        ({"a": 100, "b": 8000, "c": 20000}, {"a": 1, "b": 1, "c": 1}, 9001, {"a": 100, "b": 4450, "c": 4451}),
        ({"a": 6000, "b": 6000}, {"a": 2, "b": 1}, 9000, {"a": 3000, "b": 3000}),
        ({"a": 10, "b": 20}, {"a": 1, "b": 1}, 1000, {"a": 10, "b": 20}),
        ({"a": 10}, {"a": 1}, -5, {"a": 0}),
    ],
)
def test_fair_shares_keep_short_values_and_split_the_rest_equally(lengths, uses, budget, shares):
    got = notes.fair_shares(lengths, uses, budget)
    assert got == shares
    assert sum(got[n] * uses[n] for n in got) <= max(budget, 0)


# -- call notes ------------------------------------------------------------------------------------


FACTS = {
    "Direction: Incoming",
    "Status: Answered",
    "Duration: 275 s",
    "Agent: Max Yellow <max.yellow@example.com>",
    "CloudTalk number: UK Support (+442012345678)",
    "Customer number: +447700900123",
    "Tags: Billing, VIP",
    "Rating: 4/5",
    "Recording: https://recordings.example/1002409191.mp3",
}


def long_call(**over):
    payload = {
        "call_tags": ["Billing", "VIP"],
        "rating": 4,
        "recording_url": "https://recordings.example/1002409191.mp3",
        **over,
    }
    return call_env(**payload)


def test_a_short_note_is_not_touched():
    body = note_of(only(calls.process_call(long_call(call_notes=["Asked about the refund"]), config())))
    assert "Notes: Asked about the refund" in body.splitlines() and "cut:" not in body


def test_long_agent_notes_are_cut_and_every_call_fact_stays():
    agent_notes = ["Customer explained the whole history. " * 260, "Follow-up: " + "x" * 9000]
    full = "; ".join(agent_notes)
    short = note_of(only(calls.process_call(long_call(call_notes=["n"]), config())))
    body = note_of(only(calls.process_call(long_call(call_notes=agent_notes), config())))
    assert len(body) == LIMIT
    lines = body.splitlines()
    assert lines[0] == "CloudTalk call 1002409191"
    assert FACTS <= set(lines)
    assert lines[-2:] == ["Rating: 4/5", "Recording: https://recordings.example/1002409191.mp3"]
    # the same lines as a short note, only the notes line differs
    assert [x for x in lines if not x.startswith("Notes: ")] == [x for x in short.splitlines() if x != "Notes: n"]
    notes_line = next(x for x in lines if x.startswith("Notes: "))
    head = CUT.sub("", notes_line.removeprefix("Notes: "))
    assert full.startswith(head) and removed(notes_line) == len(full) - len(head)


def test_multi_byte_notes_are_counted_in_characters_not_bytes():
    call = long_call(call_notes=["Zákazníčka žiada vrátenie peňazí. " * 400])
    body = note_of(only(calls.process_call(call, config())))
    assert len(body) == LIMIT and len(body.encode()) > LIMIT, "cut by characters: the bytes are many more"
    assert FACTS <= set(body.splitlines())


def test_emoji_notes_fit_even_when_counted_as_javascript_does():
    body = note_of(only(calls.process_call(long_call(call_notes=["Happy customer 😀🎉 " * 700]), config())))
    assert limits.text_length(body) <= LIMIT and len(body) <= LIMIT
    assert FACTS <= set(body.splitlines())
    assert removed(next(x for x in body.splitlines() if x.startswith("Notes: "))) > 0


def test_a_custom_template_with_the_marker_elsewhere_gets_it_first():
    cfg = config(integration(calls={"note_template": ["Agent: {agent}", "CloudTalk call {call_id}", "{notes}"]}))
    body = note_of(only(calls.process_call(long_call(call_notes=["ok"]), cfg)))
    assert body.splitlines() == ["CloudTalk call 1002409191", "Agent: Max Yellow <max.yellow@example.com>", "ok"]


def test_notes_used_twice_in_a_custom_template_both_fit():
    cfg = config(integration(calls={"note_template": ["Notes: {notes}", "Agent: {agent}", "Again: {notes}"]}))
    body = note_of(only(calls.process_call(long_call(call_notes=["y" * 9000]), cfg)))
    assert len(body) <= LIMIT
    lines = body.splitlines()
    assert lines[2] == "Agent: Max Yellow <max.yellow@example.com>"
    assert lines[1].removeprefix("Notes: ") == lines[3].removeprefix("Again: ")
    assert len(lines[1]) + len(lines[3]) > 10_000, "the room is shared by both uses"
    assert removed(lines[1]) == 9000 - CUT.sub("", lines[1].removeprefix("Notes: ")).count("y")


def test_a_template_whose_facts_alone_are_too_long_is_cut_at_its_end_marker_first():
    # an absurd custom template: 30 lines of 450 characters of fixed text, then the facts
    filler = [f"{i:02d} " + "Please read this reminder carefully. " * 12 for i in range(30)]
    cfg = config(integration(calls={"note_template": [*filler, "Notes: {notes}", "Recording: {recording}"]}))
    body = note_of(only(calls.process_call(long_call(call_notes=["z" * 5000]), cfg)))
    assert len(body) <= LIMIT and body.startswith("CloudTalk call 1002409191\n")
    assert CUT.search(body), "the end is marked as cut"
    assert "z" * 100 not in body, "free text went first"


# -- SMS -------------------------------------------------------------------------------------------


def test_a_long_sms_text_is_cut_and_its_facts_stay():
    lines_around = ["Please reply within one business day. " * 12] * 2  # a template with long fixed lines
    cfg = config(integration(sms={"note_template": [*DEFAULT_SMS_TEMPLATE, *lines_around]}))
    text = "Dobrý deň, " + "potrebujem pomoc s faktúrou. " * 344  # 10,000 characters, the schema's most
    assert len(text) <= 10_000
    body = note_of(only(sms.process_sms(sms_env(text=text), cfg)))
    assert len(body) == LIMIT
    lines = body.splitlines()
    assert lines[:8] == [
        "CloudTalk SMS 88231977",
        "Direction: Incoming",
        "From: +447700900123",
        "To: +442012345678",
        "CloudTalk number: +442012345678",
        "Date: 2026-03-02 10:01:22 UTC",
        "Message:",
        lines[7],
    ]
    assert text.startswith(CUT.sub("", lines[7])) and lines[8:] == lines_around


def test_a_long_sms_text_rendered_alone():
    values = sms.note_values({**sms_env().payload, "text": "😀 " * 8000}, "+447700900123", "+442012345678", "incoming")
    body = notes.render(DEFAULT_SMS_TEMPLATE, values, "CloudTalk SMS {sms_id}")
    assert limits.text_length(body) <= LIMIT
    assert body.splitlines()[0] == "CloudTalk SMS 88231977" and "From: +447700900123" in body


# -- several free-text fields ----------------------------------------------------------------------


def test_several_free_text_values_share_the_room_fairly():
    template = ("Marker {call_id}", "Summary: {summary}", "Notes: {notes}", "Text: {text}", "Agent: {agent}")
    values = {"call_id": 7, "summary": "s" * 100, "notes": "n" * 8000, "text": "t" * 20000, "agent": "Max"}
    body = notes.render(template, values, "Marker {call_id}")
    assert len(body) == LIMIT
    lines = body.splitlines()
    assert lines[0] == "Marker 7" and lines[1] == "Summary: " + "s" * 100 and lines[-1] == "Agent: Max"
    cut_notes, cut_text = lines[2].removeprefix("Notes: "), lines[3].removeprefix("Text: ")
    assert removed(cut_notes) == 8000 - len(CUT.sub("", cut_notes))
    assert removed(cut_text) == 20000 - len(CUT.sub("", cut_text))
    assert abs(len(cut_notes) - len(cut_text)) <= 1, "equal parts"


# -- names -----------------------------------------------------------------------------------------


def test_conversation_and_customer_names_fit_kustomers_limit():
    long_name = "Jana " + "Nováková-" * 40
    cmd = notes.log_conversation(
        "support",
        call_env(),
        "call",
        "+447700900123",
        long_name,
        {"name": "Incoming call from " + "x" * 300, "status": "done", "direction": "in", "externalId": "e"},
        "CloudTalk call 1",
        "CloudTalk call 1",
    )
    validate("command.kustomer.log_conversation", cmd.body)
    assert len(cmd.body["customer"]["name"]) == 255 and cmd.body["customer"]["name"].endswith("…")
    assert len(cmd.body["conversation"]["name"]) == 255 and cmd.body["conversation"]["name"].endswith("…")


def test_contact_fields_fit_cloudtalks_limits_and_say_they_were_cut():
    def long_values(a):
        a["name"] = "Žofia " + "Veľká" * 60
        a["companyName"] = "Medzinárodná obchodná spoločnosť " * 5
        too_long = "x" * 250 + "@example.org"
        a["emails"] = [{"type": "work", "email": too_long}, {"type": "work", "email": "ok@example.org"}]
        a["locations"] = [{"type": "work", "address1": "Hlavná " * 60, "zipCode": "811 01 Bratislava 1 SK"}]

    cmd = one(contacts_import.process_customer(customer_env(long_values), config()))
    validate("command.cloudtalk.upsert_contact", cmd.body)
    c = cmd.body["contact"]
    assert len(c["name"]) == 150 and c["name"].endswith("…") and c["name"].startswith("Žofia Veľká")
    assert len(c["company"]) <= 100 and c["company"].endswith("…")
    assert len(c["address"]) <= 255 and c["address"].endswith("…")
    assert c["zip"] == "811 01 Bratisl…"
    assert c["emails"] == ["ok@example.org"], "an e-mail address over 255 characters is left out, not cut"
