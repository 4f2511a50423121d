"""Operator tools without a broker: what ``trace`` takes for an ID, time windows, the order of a
timeline, progress lines, the consumer groups ``status`` looks at."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import pytest

from pipeline.core.progress import Progress, format_duration
from pipeline.core.settings import SettingsError, env_switch
from pipeline.ops.inspect import parse_when, table
from pipeline.ops.status import GROUPS
from pipeline.ops.trace import Step, in_order, parse_query


@pytest.mark.parametrize(
    ("text", "kind", "wants", "not_wanted"),
    [
        (
            "cloudtalk:call:1002409191",
            "event",
            ["cloudtalk:call:1002409191", "cloudtalk:call:1002409191#details:417710dafc97499e"],
            ["cloudtalk:call:10024091910", "cloudtalk:call:10024091910#details:417710dafc97499e"],
        ),
        ("support|cloudtalk:sms:88231977", "command", ["cloudtalk:sms:88231977"], ["cloudtalk:call:88231977"]),
        (
            "1002409191",
            "CloudTalk call, SMS or contact",
            [
                "cloudtalk:call:1002409191",
                "cloudtalk:call:1002409191#details:ab",
                "cloudtalk:sms:1002409191",
                "cloudtalk:contact:1002409191:2026-03-02",
            ],
            ["cloudtalk:call:100240919", "cloudtalk:contact:10024091910:x"],
        ),
        ("call:77", "CloudTalk call", ["cloudtalk:call:77", "cloudtalk:call:77#details:ab"], ["cloudtalk:sms:77"]),
        ("sms:77", "CloudTalk sms", ["cloudtalk:sms:77"], ["cloudtalk:call:77"]),
        ("contact:12", "CloudTalk contact", ["cloudtalk:contact:12:2026-03-02T10:00:00Z"], ["cloudtalk:contact:123:x"]),
        (
            "cloudtalk:contact:12",
            "events",
            ["cloudtalk:contact:12:2026-03-02T10:00:00Z", "cloudtalk:contact:12:deleted"],
            ["cloudtalk:contact:123:x"],
        ),
        (
            "65f1c0ffee00000000000001",
            "Kustomer customer",
            ["kustomer:customer:65f1c0ffee00000000000001:3"],
            ["kustomer:customer:65f1c0ffee00000000000002:3"],
        ),
        ("kustomer:customer:abc:3", "event", ["kustomer:customer:abc:3"], ["kustomer:customer:abc:4"]),
    ],
)
def test_an_id_names_its_events(text, kind, wants, not_wanted):
    q = parse_query(text)
    assert q.kind == kind
    assert all(q.wants(e) for e in wants)
    assert not any(q.wants(e) for e in not_wanted)


@pytest.mark.parametrize("text", ["+447700900123", "00447700900123", "+44 7700 900123", "phone:447700900123"])
def test_a_phone_number_is_searched_for_in_every_notation_the_records_use(text):
    q = parse_query(text)
    assert q.kind == "phone number" and q.needle is not None
    assert q.needle.search(b'{"external_number": 447700900123}')
    assert q.needle.search(b"support|+447700900123")
    assert not q.needle.search(b'{"external_number": 4477009001234}'), "a longer number is another number"
    assert q.needle.search(b"4477009001230") is None


def test_an_id_that_is_none_of_them_is_refused_naming_what_would_be():
    for bad in ("", "not an id!", "phone:+1", "call:abc"):
        with pytest.raises(SettingsError) as e:
            parse_query(bad)
        assert str(e.value).startswith("ID: ")


def test_windows_take_durations_or_times():
    now = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
    assert parse_when("7d", "--since", now) == now - timedelta(days=7)
    assert parse_when("90m", "--since", now) == now - timedelta(minutes=90)
    assert parse_when("2026-03-01T00:00:00Z", "--since", now) == datetime(2026, 3, 1, tzinfo=UTC)
    assert parse_when("2026-03-01T00:00:00", "--since", now) == datetime(2026, 3, 1, tzinfo=UTC), "UTC by default"
    with pytest.raises(SettingsError, match=r"^--until: 'yesterday' is neither a duration"):
        parse_when("yesterday", "--until", now)


def test_a_timeline_keeps_the_path_order_for_records_of_one_moment():
    def step(ts: int, kind: str) -> Step:
        return Step("e", ts, kind, "t[0]@0", kind)

    # a processor's transaction puts the command on the broker 3 ms before its audit record
    steps = [step(1000, "raw"), step(1300, "command"), step(1303, "decision"), step(2000, "ledger"), step(900, "raw")]
    assert [(s.timestamp, s.kind) for s in in_order(steps)] == [
        (900, "raw"),
        (1000, "raw"),
        (1303, "decision"),
        (1300, "command"),
        (2000, "ledger"),
    ]


def test_tables_align_columns_and_leave_the_last_one_alone():
    assert table([["a", "long value", "x y"], ["bbb", "v", "z"]], ["h1", "h2", "h3"]) == [
        "h1   h2          h3",
        "a    long value  x y",
        "bbb  v           z",
    ]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_on_a_terminal_rewrites_one_line_with_rate_and_eta():
    clock, out = Clock(), io.StringIO()
    p = Progress("replay t", unit="offsets", items_unit="events", stream=out, tty=True, clock=clock)
    clock.now = 102
    p.update(500, total=2000, items=400)
    clock.now = 104
    p.update(1000, total=2000, items=800)
    p.close()
    frames = out.getvalue().split("\r")[1:]
    assert frames[0] == "replay t: 25% 500/2,000 offsets · 400 events · 200 events/s · ETA 6s"
    assert frames[1] == "replay t: 50% 1,000/2,000 offsets · 800 events · 200 events/s · ETA 4s"
    assert frames[2].startswith("replay t: 50% 1,000/2,000 offsets · 800 events · 200 events/s · in 4s")
    assert frames[2].endswith("\n") and "\n" not in "".join(frames[:2])


def test_progress_elsewhere_is_a_plain_line_every_interval_and_one_at_the_end():
    clock, out = Clock(), io.StringIO()
    p = Progress(
        "backfill calls", unit="pages", items_unit="calls published", rate_unit="calls", stream=out, clock=clock
    )
    assert not p.tty
    for page in range(1, 31):
        clock.now = 100 + page  # a page a second, 30 pages
        p.update(page, total=30, items=page * 100)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines  # after 10 s, 20 s, 30 s, and the end
    assert lines[0] == "backfill calls: 33% 10/30 pages · 1,000 calls published · 100 calls/s · ETA 20s"
    assert lines[-1] == "backfill calls: 100% 30/30 pages · 3,000 calls published · 100 calls/s · in 30s"
    assert "\r" not in out.getvalue()


def test_durations_read_like_clocks():
    assert [format_duration(s) for s in (0, 7.4, 65, 3723)] == ["0s", "7s", "1:05", "1:02:03"]


def test_status_looks_at_the_groups_the_services_join():
    from pipeline.process.runner import FLOWS
    from pipeline.sink.runner import SINKS

    expected = {f"process-{f.name}": f.input_base for f in FLOWS.values()}
    expected |= {f"sink-{target}": attr for target, (attr, _build) in SINKS.items()}
    assert expected == GROUPS


def test_a_switch_takes_on_or_off_and_refuses_anything_else_by_name():
    assert env_switch({}, "CLOUDTALK_INDEX", True) is True
    assert env_switch({"CLOUDTALK_INDEX": "OFF"}, "CLOUDTALK_INDEX", True) is False
    assert env_switch({"CLOUDTALK_INDEX": "yes"}, "CLOUDTALK_INDEX", False) is True
    with pytest.raises(SettingsError, match=r"^CLOUDTALK_INDEX: expected on or off, got 'of'$"):
        env_switch({"CLOUDTALK_INDEX": "of"}, "CLOUDTALK_INDEX", True)
