"""Live work first at CloudTalk: bulk commands (an initial import, a reconciliation) leave
``CLOUDTALK_LIVE_RESERVE`` requests of each window to live ones, are parked at the reserve the
way a held account's commands are, and a live command passes them in its lane; ``pipeline status``
counts an import's progress.

The stage is driven as in tests/unit/test_sink_parking.py (fake effects and lane, the real ledger
without Kafka); the effects here spend a fake window of requests as the CloudTalk client would.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.clients.http import ApiClient, DeferredError, RateWindow, leave_reserve, wait_budget
from pipeline.core.schemas import validate
from pipeline.ops.status import ImportProgress
from pipeline.process import contacts_import
from pipeline.sink.base import Done, is_bulk
from pipeline.sink.cloudtalk import CloudTalkEffects
from pipeline.sink.ledger import DONE, PARKED, LedgerEntry
from tests.unit.test_call_sms_rules import config
from tests.unit.test_contact_rules import customer_env
from tests.unit.test_sink_parking import Sink, due
from tests.unit.test_sink_stage import PARTITION, ledger_entries, record

RESERVE = 2


def upsert(cid: str, priority: str | None, n: int = 1) -> dict[str, Any]:
    c: dict[str, Any] = {
        "command_id": f"cmd-{cid}",
        "type": "cloudtalk.upsert_contact",
        "integration": "acme",
        "event_id": f"event-{cid}",
        "occurred_at": "2026-03-01T10:00:00.000Z",
        "customer_id": f"{n:024x}",
        "version": {"rev": 1, "updated_at": "2026-03-01T10:00:00.000Z"},
        "merge_key": "phone",
        "contact": {"name": f"Person {n}", "phones": [f"+4219051{n:05d}"], "emails": []},
    }
    if priority is not None:
        c["priority"] = priority
    return c


def rec(offset: int, command: dict[str, Any]) -> Any:
    return record(offset, command, key=b"acme")  # every contacts command of an integration: one lane


class WindowEffects:
    """Effects over a fake CloudTalk window of ``left`` requests: each command takes one; a bulk
    command at the reserve is deferred (``reserve``), as the client's :func:`leave_reserve` does."""

    target = "cloudtalk"
    command_schemas: Mapping[str, str] = {"cloudtalk.upsert_contact": "command.cloudtalk.upsert_contact"}

    def __init__(self, left: int, reserve: int = RESERVE, reset_in: float = 30.0) -> None:
        self.left, self.reserve, self.reset_at = left, reserve, time.time() + reset_in
        self.performed: list[str] = []
        self.deferred: set[str] = set()  # commands whose deferral leaves something unknown

    def ready_at(self, command: dict[str, Any]) -> float:
        floor = self.reserve if is_bulk(command) else 0
        return self.reset_at if self.left <= floor else 0.0

    async def perform(self, command: dict[str, Any], prior: LedgerEntry | None, index: Mapping[str, Any]) -> Done:
        cid = command["command_id"].removeprefix("cmd-")
        if is_bulk(command) and self.left <= self.reserve:
            raise DeferredError("reserve", self.reset_at, unsettled=cid in self.deferred)
        if self.left <= 0:
            raise DeferredError("rate_limited", self.reset_at)
        self.left -= 1
        self.performed.append(cid)
        return Done({"contact_id": f"ct-{cid}"}, "created")


def sink_over(effects: WindowEffects) -> Sink:
    sink = Sink(concurrency=1, budget_s=0.5)
    sink.effects = sink.stage.effects = effects  # type: ignore[assignment]
    return sink


def states(result: Any) -> dict[str, tuple[str, str | None]]:
    return {
        e.command_id.removeprefix("cmd-"): (e.state, e.outcome if e.state == PARKED else None)
        for e in ledger_entries(result)
    }


# -- the window's rule ------------------------------------------------------------------------


def test_a_window_at_the_live_reserve_is_ready_for_live_requests_only() -> None:
    now = time.time()
    window = RateWindow(remaining=10, limit=60, reset_at=now + 20)
    assert window.spare(now, 10) == 0 and window.spare(now) == 10
    assert window.ready_at(now) == 0.0, "live work may go"
    assert abs(window.ready_at(now, leave=10) - (now + 20)) < 0.01, "bulk work waits for the reset"
    assert window.ready_at(now, leave=9) == 0.0, "more than the reserve left: bulk may go"
    window.reset_at = now - 1
    assert window.spare(now, 10) == 50 and window.ready_at(now, leave=10) == 0.0, "a new window: the whole limit"
    assert RateWindow().spare(now) is None, "nothing known yet"


async def test_a_bulk_request_at_the_reserve_defers_inside_a_batch_and_a_live_one_goes() -> None:
    window = RateWindow(remaining=3, limit=10, reset_at=time.time() + 20)  # no low-water pacing
    with wait_budget(time.monotonic() + 0.5):
        with leave_reserve(3), pytest.raises(DeferredError) as exc:
            await window.acquire()
        assert exc.value.reason == "reserve" and exc.value.until > time.time() + 19
        assert window.remaining == 3, "nothing was taken"
        with leave_reserve(2):
            await window.acquire()  # one above the reserve: it goes
        await window.acquire()  # live work takes the reserve
    assert window.remaining == 1


def test_cloudtalk_effects_ready_at_applies_the_reserve_to_bulk_commands_only() -> None:
    window = RateWindow(remaining=10, limit=60, reset_at=time.time() + 20)
    executor = SimpleNamespace(window=window)
    effects = CloudTalkEffects(ApiClient(executor, "http://ct"), {}, live_reserve=10)  # type: ignore[arg-type]
    assert effects.ready_at(upsert("l", "live")) == 0.0 and effects.ready_at(upsert("o", None)) == 0.0
    assert effects.ready_at(upsert("b", "bulk")) > time.time() + 19
    effects.live_reserve = 9
    assert effects.ready_at(upsert("b", "bulk")) == 0.0


# -- the command's priority -------------------------------------------------------------------


@pytest.mark.parametrize(("via", "priority"), [("webhook", "live"), ("import", "bulk"), ("poller", "bulk")])
def test_the_processor_marks_import_and_reconciliation_commands_bulk(via: str, priority: str) -> None:
    env = dataclasses.replace(customer_env(), via=via)
    [command] = contacts_import.process_customer(env, config())
    assert command.body["priority"] == priority  # type: ignore[union-attr]
    validate("command.cloudtalk.upsert_contact", command.body)  # type: ignore[union-attr]


def test_an_old_command_without_priority_still_validates_and_is_live() -> None:
    validate("command.cloudtalk.upsert_contact", upsert("old", None))
    assert not is_bulk(upsert("old", None))
    with pytest.raises(Exception, match="priority"):
        validate("command.cloudtalk.upsert_contact", upsert("bad", "urgent"))


# -- the stage: bulk parked at the reserve, live passes it ------------------------------------


async def test_bulk_commands_stop_at_the_reserve_and_a_live_command_of_the_same_lane_passes_them() -> None:
    effects = WindowEffects(left=RESERVE + 2)
    sink = sink_over(effects)
    batch = [
        rec(0, upsert("b1", "bulk", 1)),
        rec(1, upsert("b2", "bulk", 2)),
        rec(2, upsert("b3", "bulk", 3)),
        rec(3, upsert("live", "live", 4)),
        rec(4, upsert("b4", "bulk", 5)),
    ]
    result, upto = await sink.run(batch)
    assert effects.performed == ["b1", "b2", "live"], "the live command took the reserve"
    assert states(result) == {
        "b1": (DONE, None),
        "b2": (DONE, None),
        "b3": (PARKED, "reserve"),
        "live": (DONE, None),
        "b4": (PARKED, "lane"),
    }
    assert upto == 5, "parked commands live in the ledger: the offsets move past them"
    assert [e.command_id.removeprefix("cmd-") for e in sink.ledger.pending(PARTITION)] == ["b3", "b4"]


async def test_at_the_reserve_bulk_is_parked_before_any_intent_and_live_goes_at_once() -> None:
    effects = WindowEffects(left=RESERVE)
    sink = sink_over(effects)
    result, _ = await sink.run([rec(0, upsert("b1", "bulk", 1)), rec(1, upsert("live", "live", 2))])
    assert effects.performed == ["live"]
    assert [c.removeprefix("cmd-") for c, *_ in sink.intents()] == ["live"], "no intent for bulk work that cannot start"
    assert states(result)["b1"] == (PARKED, "reserve")
    # a later batch: the parked import is not due yet; another live edit still goes at once
    result, _ = await sink.run([rec(2, upsert("live2", "live", 3))])
    assert effects.performed == ["live", "live2"]
    assert [e.command_id.removeprefix("cmd-") for e in sink.ledger.pending(PARTITION)] == ["b1"]
    # the window resets: the import resumes, exactly once
    effects.left, effects.reset_at = 10, time.time() + 60
    due(sink, "cmd-b1")
    result, _ = await sink.run([rec(3, upsert("b2", "bulk", 4))])
    assert effects.performed == ["live", "live2", "b1", "b2"]
    assert sink.ledger.pending(PARTITION) == []


async def test_a_bulk_command_with_an_unknown_outcome_holds_its_whole_lane() -> None:
    """Parked with something unknown (an ambiguous create), a bulk command must be looked up
    before anything of its lane is decided: a live command waits behind it."""
    effects = WindowEffects(left=RESERVE + 1)
    effects.deferred = {"b2"}
    sink = sink_over(effects)
    result, _ = await sink.run(
        [rec(0, upsert("b1", "bulk", 1)), rec(1, upsert("b2", "bulk", 2)), rec(2, upsert("live", "live", 3))]
    )
    assert effects.performed == ["b1"]
    parked = {e.command_id.removeprefix("cmd-"): e for e in ledger_entries(result) if e.state == PARKED}
    assert parked["b2"].reconcile and parked["live"].outcome == "lane"


async def test_a_live_command_parked_because_the_account_is_held_holds_the_bulk_behind_it() -> None:
    effects = WindowEffects(left=0)
    sink = sink_over(effects)
    result, _ = await sink.run([rec(0, upsert("live", "live", 1)), rec(1, upsert("b1", "bulk", 2))])
    assert effects.performed == []
    assert states(result) == {"live": (PARKED, "held"), "b1": (PARKED, "held")}
    woken = min(at for _, at in sink.waker.scheduled)
    assert abs(woken - effects.reset_at) < 0.01


async def test_the_partition_is_woken_for_a_live_command_parked_behind_bulk_work() -> None:
    effects = WindowEffects(left=RESERVE + 1)
    sink = sink_over(effects)
    await sink.run([rec(0, upsert("b1", "bulk", 1)), rec(1, upsert("b2", "bulk", 2))])
    assert [e.command_id.removeprefix("cmd-") for e in sink.ledger.pending(PARTITION)] == ["b2"]
    assert sink.stage.next_due(PARTITION) == pytest.approx(effects.reset_at, abs=0.01)


# -- status: an import's progress -------------------------------------------------------------


def test_import_progress_counts_done_remaining_rate_and_eta() -> None:
    now = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
    p = ImportProgress()
    p.emitted = {f"c{n}" for n in range(100)}
    at = now - timedelta(minutes=2)
    for n in range(40):  # 40 finished over the last two minutes: 20 a minute
        p.finished[f"c{n}"] = int((at + timedelta(seconds=3 * n)).timestamp() * 1000)
    p.finished["old"] = int((now - timedelta(hours=1)).timestamp() * 1000)  # an earlier pass: done, not in the rate
    assert (p.done, p.remaining) == (41, 60)
    assert p.rate_per_min(now) == pytest.approx(20.0)
    assert p.eta_s(now) == pytest.approx(180.0)
    assert p.to_dict(now) == {"emitted": 100, "done": 41, "remaining": 60, "rate_per_min": 20.0, "eta_s": 180}
    assert ImportProgress(emitted={"x"}).eta_s(now) is None, "no rate yet: no ETA"
