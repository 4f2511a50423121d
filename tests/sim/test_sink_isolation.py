"""One Kustomer org (or one customer) that makes the sink wait delays only its own commands.

The real Kustomer sink effects and HTTP clients against two in-process Kustomer simulators (org A
and org B, one integration each); the sink's stage with the ledger kept in memory (no Kafka — the
end-to-end version is tests/e2e/test_isolation_e2e.py). Each test counts requests and effects in
the simulators' request logs.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp

from devkit.sim.kustomer import ALL_ROLES, KustomerSim, KustomerSimSettings, running_kustomer_sim
from pipeline.clients.http import RetryPolicy
from pipeline.clients.kustomer import KustomerClient
from pipeline.sink.base import SinkStage
from pipeline.sink.kustomer import KustomerEffects
from pipeline.sink.ledger import DONE, PARKED
from pipeline.sink.wake import WAKE_HEADER
from tests.unit.test_sink_stage import AUDIT_TOPIC, PARTITION, FakeLane, MemoryLedger, commit, ledger_entries, record

KEY = "k"
POLICY = RetryPolicy(initial_s=0.05, max_backoff_s=0.2, max_attempts=20, deadline_s=30.0, timeout_s=2.0)


def call(cid: str, integration: str, phone: str) -> dict[str, Any]:
    return {
        "command_id": f"{integration}|cloudtalk:call:{cid}",
        "type": "kustomer.log_conversation",
        "integration": integration,
        "event_id": f"cloudtalk:call:{cid}",
        "occurred_at": "2026-03-01T10:00:00.000Z",
        "flow": "call",
        "customer": {"phone": phone, "name": None, "create": True},
        "conversation": {"name": "Call", "status": "done", "direction": "in", "externalId": f"cloudtalk-call-{cid}"},
        "note": {"body": f"CloudTalk call {cid}\nhello", "marker": f"CloudTalk call {cid}"},
    }


@dataclass
class Orgs:
    a: KustomerSim
    b: KustomerSim
    stage: SinkStage
    effects: KustomerEffects
    ledger: MemoryLedger
    lane: FakeLane
    offset: int = 0

    async def run(self, commands: list[dict[str, Any]]) -> Any:
        """One batch through the stage, committed as the loop would; a wake-up record when empty."""
        records = []
        for c in commands or [None]:
            if c is None:
                records.append(record(self.offset, b"", key=b"sink.wake", headers=[(WAKE_HEADER, b"1")]))
            else:
                records.append(record(self.offset, c, key=f"{c['integration']}|{c['customer']['phone']}".encode()))
            self.offset += 1
        result = await self.stage.handle(self.lane, records)  # type: ignore[arg-type]
        commit(self.stage, self.lane, records, result)
        return result

    def pending(self) -> list[str]:
        return [e.command_id for e in self.ledger.pending(PARTITION)]

    async def resume(self, within: float = 30.0) -> None:
        """Wake the partition until nothing is pending (as the waker would, when due)."""
        deadline = time.monotonic() + within
        while self.pending():
            assert time.monotonic() < deadline, f"still pending: {self.pending()}"
            due = self.stage.next_due(PARTITION) or time.time()
            await _sleep_until(due)
            await self.run([])


async def _sleep_until(at: float) -> None:
    import asyncio

    await asyncio.sleep(max(0.0, at - time.time()) + 0.05)


def posts(sim: KustomerSim, path: str) -> list[int]:
    return [e.status for e in sim.log.entries if e.method == "POST" and e.path == path]


def lookups(sim: KustomerSim) -> int:
    return sum(1 for e in sim.log.entries if e.method == "GET" and e.path.endswith(("/conversations", "/notes")))


def exactly_once(sim: KustomerSim, calls: list[str]) -> None:
    by_external = sorted(c["attributes"]["externalId"] for c in sim.conversations.values())
    assert by_external == sorted(f"cloudtalk-call-{c}" for c in calls)
    assert sorted(n["conversation"] for n in sim.notes.values()) == sorted(sim.conversations)
    effects = [e.effect for e in sim.log.entries if e.effect]
    assert sum(1 for e in effects if e.startswith("conversation.create")) == len(calls)
    assert sum(1 for e in effects if e.startswith("note.create")) == len(calls)


@asynccontextmanager
async def two_orgs(
    a: KustomerSimSettings | None = None,
    b: KustomerSimSettings | None = None,
    budget_s: float = 0.5,
    per_customer_per_minute: int = 120,
) -> AsyncIterator[Orgs]:
    async with (
        running_kustomer_sim(a or KustomerSimSettings(), keys={KEY: ALL_ROLES}) as (sim_a, url_a),
        running_kustomer_sim(b or KustomerSimSettings(), keys={KEY: ALL_ROLES}) as (sim_b, url_b),
        aiohttp.ClientSession() as http,
    ):
        clients = {
            "alpha": KustomerClient.from_credentials(http, url_a, KEY, policy=POLICY),
            "beta": KustomerClient.from_credentials(http, url_b, KEY, policy=POLICY),
        }
        effects = KustomerEffects(clients, per_customer_per_minute=per_customer_per_minute, settle_s=1.0)
        events: list[tuple[Any, ...]] = []
        ledger = MemoryLedger(events)
        stage = SinkStage("sink-kustomer", effects, ledger, AUDIT_TOPIC, concurrency=2, settle_s=1.0, budget_s=budget_s)
        yield Orgs(sim_a, sim_b, stage, effects, ledger, FakeLane(events))


async def test_a_rate_limited_org_parks_its_calls_while_the_other_org_is_served_in_the_same_batch() -> None:
    # org A's window resets every 8 s: a 429 there announces a wait longer than the 0.5 s budget
    async with two_orgs(a=KustomerSimSettings(window_seconds=8.0)) as orgs:
        orgs.a.faults.add(match=r"^(GET|POST) /v1/", kind="status", status=429, times=6)
        batch = [call(f"{i}", "alpha", f"+4479460000{i}") for i in range(4)]
        batch += [call(f"{i + 10}", "beta", f"+4479460001{i}") for i in range(4)]

        started = time.monotonic()
        result = await orgs.run(batch)
        took = time.monotonic() - started

        states = {e.command_id.split("|")[0] + e.command_id[-2:]: e.state for e in ledger_entries(result)}
        assert took < 3.0, f"the batch took {took:.1f}s: it waited for org A"
        assert sorted(s for k, s in states.items() if k.startswith("beta")) == [DONE] * 4
        assert sorted(s for k, s in states.items() if k.startswith("alpha")) == [PARKED] * 4
        assert result.commit_upto is None, "parked commands do not hold the offsets"
        assert len(orgs.a.log.entries) <= 4, "one 429 holds the org: the others are not even sent"
        window = orgs.effects.clients["alpha"].executor.window  # type: ignore[attr-defined]
        assert window.hold_until > time.time() and orgs.effects.clients["beta"].executor.window.hold_until == 0  # type: ignore[attr-defined]

        # a new batch: org A's calls are parked at once, without a request
        sent = len(orgs.a.log.entries)
        await orgs.run([call("20", "alpha", "+447946000020"), call("21", "beta", "+447946000021")])
        assert len(orgs.a.log.entries) == sent and len(orgs.b.conversations) == 5

        orgs.a.faults.clear()
        await orgs.resume()
        exactly_once(orgs.a, ["0", "1", "2", "3", "20"])
        exactly_once(orgs.b, ["10", "11", "12", "13", "21"])
        assert lookups(orgs.a) == 0, "a 429 says nothing happened: nothing is looked up"


async def test_an_org_out_of_service_is_held_and_its_calls_land_once_when_it_is_back() -> None:
    async with two_orgs() as orgs:
        orgs.a.faults.add(match=r"^(GET|POST) /v1/", kind="status", status=503)
        batch = [call(f"{i}", "alpha", f"+4479460100{i}") for i in range(3)]
        batch += [call(f"{i + 10}", "beta", f"+4479460101{i}") for i in range(3)]

        started = time.monotonic()
        await orgs.run(batch)
        assert time.monotonic() - started < 3.0
        assert len(orgs.b.notes) == 3 and len(orgs.a.conversations) == 0
        assert len(orgs.pending()) == 3
        window = orgs.effects.clients["alpha"].executor.window  # type: ignore[attr-defined]
        assert window.failures >= window.outage_after, "a run of 503s: the org is held"

        orgs.a.faults.clear()
        await orgs.resume()
        exactly_once(orgs.a, ["0", "1", "2"])
        exactly_once(orgs.b, ["10", "11", "12"])
        assert window.failures == 0 and lookups(orgs.a) == 0


async def test_a_customer_at_its_limit_waits_alone() -> None:
    # Kustomer answers 429 for the second conversation of a customer within its window, with the
    # org's window far from spent: only that customer waits; the org is not held
    async with two_orgs(b=KustomerSimSettings(per_customer_limit=1, window_seconds=2.0)) as orgs:
        first = call("1", "beta", "+447946020001")
        again = call("2", "beta", "+447946020001")  # same number: same customer, same lane
        other = call("3", "beta", "+447946020003")
        result = await orgs.run([first, again, other])

        states = {e.command_id: (e.state, e.outcome) for e in ledger_entries(result)}
        assert states[first["command_id"]][0] == DONE and states[other["command_id"]][0] == DONE
        assert states[again["command_id"]] == (PARKED, "resource_limited")
        assert orgs.effects.clients["beta"].executor.window.hold_until == 0, "the org is not held"  # type: ignore[attr-defined]
        parked = orgs.ledger.get(PARTITION, again["command_id"])
        assert parked is not None and parked.steps.get("customer_id"), "it resumes with its customer"

        await orgs.resume()
        exactly_once(orgs.b, ["1", "2", "3"])


async def test_the_local_per_customer_limit_parks_only_that_customer() -> None:
    async with two_orgs(per_customer_per_minute=1) as orgs:
        first = call("1", "beta", "+447946030001")
        again = call("2", "beta", "+447946030001")
        other = call("3", "beta", "+447946030003")
        result = await orgs.run([first, again, other])
        states = {e.command_id: (e.state, e.outcome) for e in ledger_entries(result)}
        assert states[again["command_id"]] == (PARKED, "customer_limit")
        assert states[first["command_id"]][0] == DONE and states[other["command_id"]][0] == DONE
        parked = orgs.ledger.get(PARTITION, again["command_id"])
        assert parked is not None and parked.not_before is not None and parked.not_before - time.time() > 55
        assert posts(orgs.b, "/v1/conversations") == [201, 201], "nothing was sent for the waiting customer"


async def test_a_503_on_a_create_is_sent_again_without_a_lookup_but_a_500_is_looked_up_first() -> None:
    async with two_orgs() as orgs:
        orgs.b.faults.add(match="POST /v1/notes", kind="status", status=503, times=1)
        await orgs.run([call("1", "beta", "+447946040001")])
        assert posts(orgs.b, "/v1/notes") == [503, 201] and lookups(orgs.b) == 0

        orgs.b.faults.add(match="POST /v1/notes", kind="status", status=500, times=1)
        await orgs.run([call("2", "beta", "+447946040002")])
        await orgs.resume()
        assert posts(orgs.b, "/v1/notes") == [503, 201, 500, 201]
        assert lookups(orgs.b) == 1, "a 500 leaves the create's outcome unknown: looked up before sending again"
        exactly_once(orgs.b, ["1", "2"])
