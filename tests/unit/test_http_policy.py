"""HTTP outcome classes and pacing decisions (pure)."""

from __future__ import annotations

import pytest

from pipeline.clients.http import KUSTOMER_RATE_HEADERS, KeyedLimiter, Outcome, RateWindow, classify


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.SUCCESS),
        (201, Outcome.SUCCESS),
        (204, Outcome.SUCCESS),
        (409, Outcome.CONFLICT),
        (404, Outcome.NOT_FOUND),
        (429, Outcome.RATE_LIMITED),
        (408, Outcome.RETRY),
        (500, Outcome.RETRY),
        (502, Outcome.RETRY),
        (503, Outcome.RETRY),
        (400, Outcome.REJECT),
        (401, Outcome.REJECT),
        (403, Outcome.REJECT),
        (406, Outcome.REJECT),
        (413, Outcome.REJECT),
    ],
)
def test_outcome_classes(status, outcome):
    assert classify(status) is outcome


def test_pacing_sends_at_once_while_the_budget_is_ample():
    w = RateWindow()
    w.update(
        {"x-ratelimit-limit": "1000", "x-ratelimit-remaining": "900", "x-ratelimit-reset": "1060"},
        KUSTOMER_RATE_HEADERS,
    )
    assert w.delay_before_next(now=1000.0) == 0.0


def test_pacing_spreads_the_last_part_of_the_budget_over_the_window():
    w = RateWindow()
    w.update(
        {"x-ratelimit-limit": "1000", "x-ratelimit-remaining": "50", "x-ratelimit-reset": "1060"}, KUSTOMER_RATE_HEADERS
    )
    w._last_sent = 1000.0
    gap = w.delay_before_next(now=1000.0)
    assert gap == pytest.approx(60 / 50, rel=0.01)


def test_pacing_waits_for_the_reset_when_only_the_reserve_is_left():
    w = RateWindow(reserve=5)
    w.update(
        {"x-ratelimit-limit": "60", "x-ratelimit-remaining": "5", "x-ratelimit-reset": "1030"}, KUSTOMER_RATE_HEADERS
    )
    delay = w.delay_before_next(now=1000.0)
    assert 30.0 <= delay <= 30.1


def test_pacing_after_the_window_reset_is_free_again():
    w = RateWindow()
    w.update(
        {"x-ratelimit-limit": "60", "x-ratelimit-remaining": "0", "x-ratelimit-reset": "1030"}, KUSTOMER_RATE_HEADERS
    )
    assert w.delay_before_next(now=1031.0) == 0.0


def test_without_headers_the_fallback_pace_applies():
    w = RateWindow(fallback_per_minute=60)
    w._last_sent = 1000.0
    assert w.delay_before_next(now=1000.25) == pytest.approx(0.75)


def test_keyed_limiter_limits_each_key_separately():
    lim = KeyedLimiter(limit=2, window_s=60)
    for t in (0.0, 1.0):
        assert lim.delay("cust-a", now=t) == 0.0
        lim._hits["cust-a"].append(t)
    assert lim.delay("cust-a", now=2.0) == pytest.approx(58.0)
    assert lim.delay("cust-b", now=2.0) == 0.0
