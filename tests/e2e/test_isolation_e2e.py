"""Isolation end to end: one Kustomer org rate limited or out of service for 60 s delays only its own
calls — the other org's calls keep their latency — and every call of both lands exactly once.

Two integrations on two Kustomer orgs (two simulators in the test process), one CloudTalk
simulator, and ingest, the calls processor and the Kustomer sink as separate processes on the real
broker. Calls flow for both orgs at the same rate: first a baseline, then for 60 s while org A
answers every API request with 429 (or 503). Org B's latency (call ended → its note created at
the simulator) is measured in both phases of the same run; afterwards org A's calls must all
land, once each, and both simulators' request logs are counted.
"""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from devkit.net import free_port
from devkit.sim.cloudtalk import CloudTalkSimSettings, running_cloudtalk_sim
from devkit.sim.kustomer import ALL_ROLES, KustomerSim, KustomerSimSettings, running_kustomer_sim
from devkit.stack import Stack
from pipeline.kafka.lag import group_lag
from pipeline.kafka.reading import read_topic
from pipeline.kafka.topics import Topics
from tests.e2e.conftest import wait_for

# latency of one org against another's, in the same run: measured alone (``make test`` runs the
# serial tests after the parallel ones)
pytestmark = [pytest.mark.kafka, pytest.mark.e2e, pytest.mark.serial]

LINES = {"alpha": "+442012345678", "beta": "+442079460000"}
NUMBERS = {"alpha": [f"+4479460300{i:02d}" for i in range(12)], "beta": [f"+4479460400{i:02d}" for i in range(12)]}
SECRETS = {
    "ISO_CT_ID": "iso-key-id",
    "ISO_CT_SECRET": "iso-key-secret",
    "ISO_K_KEY_A": "iso-kustomer-key-a",
    "ISO_K_KEY_B": "iso-kustomer-key-b",
    "ISO_HOOK": "iso-webhook-secret",
}
RATE = 3.0  # calls per second per integration
BASELINE_S = 25.0
OUTAGE_S = 60.0


def config_yaml(ct_api: str, url_a: str, url_b: str) -> str:
    def integration(name: str, url: str, key: str) -> str:
        return f"""
  - name: {name}
    active: true
    kustomer: {{base_url: "{url}", org_name: {name}, api_key: {{env: {key}}}}}
    cloudtalk_webhook_secret: {{env: ISO_HOOK}}
    calls:
      create_customers_for_unknown_numbers: true
      connected_numbers: ["{LINES[name]}"]
"""

    return f"""
cloudtalk:
  base_url: {ct_api}
  key_id: {{env: ISO_CT_ID}}
  key_secret: {{env: ISO_CT_SECRET}}
  rate_limit_per_minute: 6000
  poller_reserve: 0
integrations:{integration("alpha", url_a, "ISO_K_KEY_A")}{integration("beta", url_b, "ISO_K_KEY_B")}"""


@dataclass
class Call:
    call_id: str
    integration: str
    ended: float  # Unix seconds, when the test ended the call
    phase: str


@dataclass
class TwoOrgs:
    stack: Stack
    topics: Topics
    bootstrap: str
    sims: dict[str, KustomerSim]
    ct_root: str
    http: aiohttp.ClientSession
    calls: list[Call] = field(default_factory=list)

    async def end_call(self, integration: str, number: str, phase: str) -> None:
        body = {
            "direction": "incoming",
            "status": "answered",
            "internal_number": LINES[integration],
            "external_number": number,
            "talking_time": 30,
        }
        ended = time.time()
        async with self.http.post(f"{self.ct_root}/_sim/calls", data=orjson.dumps(body)) as r:
            assert r.status < 300, await r.text()
            call = await r.json()
        self.calls.append(Call(str(call["call_id"]), integration, ended, phase))

    async def traffic(self, seconds: float, phase: str) -> None:
        """Calls for both integrations, ``RATE`` per second each, for ``seconds``."""
        n = int(seconds * RATE)
        started = time.perf_counter()
        for i in range(n):
            delay = started + i / RATE - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.end_call("alpha", NUMBERS["alpha"][i % len(NUMBERS["alpha"])], phase)
            await self.end_call("beta", NUMBERS["beta"][i % len(NUMBERS["beta"])], phase)

    def of(self, integration: str, phase: str | None = None) -> list[Call]:
        return [c for c in self.calls if c.integration == integration and (phase is None or c.phase == phase)]

    def note_times(self, integration: str) -> dict[str, float]:
        """Call id → when its note was created at the org's simulator (first time)."""
        out: dict[str, float] = {}
        for e in self.sims[integration].log.entries:
            if e.effect and e.effect.startswith("note.create") and isinstance(e.body, dict):
                marker = str(e.body.get("body", "")).split("\n", 1)[0]
                if marker.startswith("CloudTalk call "):
                    out.setdefault(marker.removeprefix("CloudTalk call "), e.at)
        return out

    def latencies(self, integration: str, phase: str) -> list[float]:
        notes = self.note_times(integration)
        return [notes[c.call_id] - c.ended for c in self.of(integration, phase) if c.call_id in notes]

    def assert_exactly_once(self, integration: str, customers: int | None = None) -> None:
        sim = self.sims[integration]
        wanted = sorted(f"cloudtalk-call-{c.call_id}" for c in self.of(integration))
        convs = Counter(c["attributes"]["externalId"] for c in sim.conversations.values())
        assert sorted(convs) == wanted and set(convs.values()) == {1}, f"{integration}: conversations {convs}"
        per_conversation = Counter(n["conversation"] for n in sim.notes.values())
        assert sorted(per_conversation) == sorted(sim.conversations) and set(per_conversation.values()) == {1}
        effects = Counter((e.effect or "").split(" ")[0] for e in sim.log.entries if e.effect)
        assert effects["conversation.create"] == len(wanted), f"{integration}: {effects}"
        assert effects["note.create"] == len(wanted), f"{integration}: {effects}"
        wanted_customers = len(NUMBERS[integration]) if customers is None else customers
        assert effects["customer.create"] == wanted_customers, f"{integration}: {effects}"


@pytest.fixture
async def orgs(kafka_bootstrap: str, topics: Topics, tmp_path: Path):
    async with (
        running_kustomer_sim(KustomerSimSettings(), keys={SECRETS["ISO_K_KEY_A"]: ALL_ROLES}) as (sim_a, url_a),
        running_kustomer_sim(KustomerSimSettings(), keys={SECRETS["ISO_K_KEY_B"]: ALL_ROLES}) as (sim_b, url_b),
        running_cloudtalk_sim(
            CloudTalkSimSettings(key_id=SECRETS["ISO_CT_ID"], key_secret=SECRETS["ISO_CT_SECRET"], rate_limit=6000)
        ) as (_csim, ct_api),
        aiohttp.ClientSession() as http,
    ):
        ct_root = ct_api.removesuffix("/api")
        ingest_port = free_port()
        ingest_url = f"http://127.0.0.1:{ingest_port}"
        config = tmp_path / "integrations.yaml"
        config.write_text(config_yaml(ct_api, url_a, url_b))
        stack = Stack(
            tmp_path,
            {
                "KAFKA_BOOTSTRAP": kafka_bootstrap,
                "TOPIC_PREFIX": topics.prefix,
                "PIPELINE_CONFIG": str(config),
                "LOG_LEVEL": "INFO",
                "SINK_HTTP_TIMEOUT_S": "2",
                "SINK_RECONCILE_SETTLE_S": "4",
                "SINK_RETRY_MAX_BACKOFF_S": "5",
                **SECRETS,
            },
        )
        stack.add("ingest", ["ingest", "--port", str(ingest_port)], health=f"{ingest_url}/readyz")
        stack.add("process-calls", ["process", "calls"])
        stack.add("sink-kustomer", ["sink", "kustomer"])
        await stack.wait_ready(timeout=90)
        async with http.post(
            f"{ct_root}/_sim/workflows",
            data=orjson.dumps(
                [
                    {
                        "trigger": "call.ended",
                        "url": f"{ingest_url}/ingest/cloudtalk/alpha/call-ended",
                        "headers": {"X-Pipeline-Secret": SECRETS["ISO_HOOK"]},
                    }
                ]
            ),
        ) as r:
            assert r.status < 300, await r.text()
        t = TwoOrgs(stack, topics, kafka_bootstrap, {"alpha": sim_a, "beta": sim_b}, ct_root, http)
        try:
            yield t
        finally:
            codes = await asyncio.to_thread(stack.stop_all)
            crashed = {n: c for n, c in codes.items() if c not in (0, -9, -15, None)}
            assert not crashed, {n: stack.tail(n) for n in crashed}


def p50(values: list[float]) -> float:
    return statistics.median(values)


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


@pytest.mark.parametrize("status", [429, 503])
async def test_one_org_throttled_or_down_for_60s_leaves_the_other_orgs_latency_and_everything_lands_once(
    orgs: TwoOrgs, status: int
) -> None:
    # warm up: every number's customer exists in its org, every process has done its first work
    for integration, numbers in NUMBERS.items():
        for number in numbers:
            await orgs.end_call(integration, number, "warmup")
    await wait_for(lambda: all(len(orgs.note_times(i)) == len(NUMBERS[i]) for i in NUMBERS), 90, "the warm-up notes")

    await orgs.traffic(BASELINE_S, "baseline")
    await wait_for(lambda: len(orgs.note_times("beta")) == len(orgs.of("beta")), 60, "the baseline notes")

    sim_a = orgs.sims["alpha"]
    sent_before = len(sim_a.log.entries)
    sim_a.faults.add(match=r"^(GET|POST|PUT|PATCH) /v1/", kind="status", status=status)
    await orgs.traffic(OUTAGE_S, "outage")
    sim_a.faults.clear()
    during = sim_a.log.entries[sent_before:]
    answered = Counter(e.status for e in during)

    await wait_for(
        lambda: all(len(orgs.note_times(i)) == len(orgs.of(i)) for i in NUMBERS), 180, "every call's note in both orgs"
    )

    async def idle() -> bool:
        lag = await group_lag(orgs.bootstrap, f"{orgs.topics.prefix}sink-kustomer", [orgs.topics.kustomer_commands])
        return sum(lag.values()) == 0

    await wait_for(idle, 60, "the sink to be idle")

    base, out = orgs.latencies("beta", "baseline"), orgs.latencies("beta", "outage")
    late_a = orgs.latencies("alpha", "outage")
    print(
        f"\norg A answered {status} for {OUTAGE_S:.0f}s: {len(during)} requests reached it ({dict(answered)}); "
        f"org B p50/p99 baseline {p50(base) * 1000:.0f}/{p99(base) * 1000:.0f} ms (n={len(base)}), during "
        f"{p50(out) * 1000:.0f}/{p99(out) * 1000:.0f} ms (n={len(out)}), max {max(out) * 1000:.0f} ms; "
        f"org A's calls of that time landed "
        f"{min(late_a):.1f}–{max(late_a):.1f} s after they ended"
    )
    assert len(base) == len(orgs.of("beta", "baseline")) and len(out) == len(orgs.of("beta", "outage"))
    assert p99(out) <= 2 * p99(base), "org B's calls waited for org A"

    orgs.assert_exactly_once("alpha")
    orgs.assert_exactly_once("beta")
    assert len(during) < len(orgs.of("alpha", "outage")) * 3, "the throttled org was not hammered"
    assert await read_topic(orgs.bootstrap, orgs.topics.deadletter) == []


async def test_calls_parked_for_an_org_that_is_down_survive_the_sink_killed_and_land_once(orgs: TwoOrgs) -> None:
    for integration in NUMBERS:
        await orgs.end_call(integration, NUMBERS[integration][0], "warmup")
    await wait_for(lambda: all(len(orgs.note_times(i)) == 1 for i in NUMBERS), 90, "the warm-up notes")

    orgs.sims["alpha"].faults.add(match=r"^(GET|POST|PUT|PATCH) /v1/", kind="status", status=503)
    for i in range(10):
        await orgs.end_call("alpha", NUMBERS["alpha"][i % 4], "down")
        await orgs.end_call("beta", NUMBERS["beta"][i % 4], "down")
    await wait_for(lambda: len(orgs.note_times("beta")) == 11, 60, "org B's notes")

    async def committed_past_everything() -> bool:
        lag = await group_lag(orgs.bootstrap, f"{orgs.topics.prefix}sink-kustomer", [orgs.topics.kustomer_commands])
        return sum(lag.values()) == 0

    # the offsets moved past org A's calls although none of them is done: they are parked in the ledger
    await wait_for(committed_past_everything, 60, "the sink's offsets past every command")
    assert len(orgs.note_times("alpha")) == 1
    ledger = [orgs_json(r.value) for r in await read_topic(orgs.bootstrap, orgs.topics.kustomer_ledger)]
    ledger = [e for e in ledger if isinstance(e, dict)]
    parked = {e["command_id"] for e in ledger if e.get("state") == "parked"}
    assert len(parked) >= 10 and all(e["command"] for e in ledger if e.get("state") == "parked")

    orgs.stack.kill("sink-kustomer", signal.SIGKILL)
    orgs.stack.start("sink-kustomer")
    await orgs.stack.wait_ready(["sink-kustomer"], timeout=60)
    orgs.sims["alpha"].faults.clear()
    await wait_for(lambda: len(orgs.note_times("alpha")) == 11, 90, "org A's calls after the restart")
    await wait_for(committed_past_everything, 60, "the sink to be idle")
    orgs.assert_exactly_once("alpha", customers=4)
    orgs.assert_exactly_once("beta", customers=4)


def orgs_json(raw: bytes | None) -> Any:
    return orjson.loads(raw) if raw else None
