"""Calls and SMS through the whole pipeline, exactly once, under duplicates, replays, kill -9 and faults.

Each test counts requests and distinct effects in the Kustomer simulator's request log.
"""

from __future__ import annotations

import asyncio
import signal

import orjson
import pytest

from pipeline.kafka.lag import group_lag
from pipeline.kafka.reading import read_topic
from tests.e2e.conftest import OTHER_LINE, Flow, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]


def ext(call: dict) -> str:
    return f"cloudtalk-call-{call['call_id']}"


async def idle(flow: Flow, groups=("process-calls", "sink-kustomer"), timeout: float = 60) -> None:
    inputs = {
        "process-calls": flow.topics.raw_calls,
        "process-sms": flow.topics.raw_sms,
        "sink-kustomer": flow.topics.kustomer_commands,
    }

    async def no_lag() -> bool:
        for g in groups:
            if sum((await group_lag(flow.bootstrap, f"{flow.topics.prefix}{g}", [inputs[g]])).values()):
                return False
        return True

    await wait_for(no_lag, timeout, "the pipeline to be idle")


async def test_duplicate_webhooks_and_a_replay_from_offset_zero_leave_one_conversation_and_one_note(flow: Flow):
    calls = [await flow.end_call(deliver_times=2) for _ in range(3)]
    calls.append(await flow.end_call(external_number="+421905123456"))
    await flow.sms(deliver_times=2)
    await wait_for(lambda: len(flow.ksim.conversations) >= 5, 60, "5 conversations")
    await idle(flow, ("process-calls", "process-sms", "sink-kustomer"))
    raw = await read_topic(flow.bootstrap, flow.topics.raw_calls)
    ids = [r.key for r in raw]
    assert len(set(ids)) == 4 and 4 <= len(raw) <= 7, (
        "a copy is stored at most once more (ingest waits for a copy in flight)"
    )
    sms_ext = next(
        c["attributes"]["externalId"]
        for c in flow.ksim.conversations.values()
        if c["attributes"]["externalId"].startswith("cloudtalk-sms-")
    )
    flow.assert_exactly_once([ext(c) for c in calls] + [sms_ext])
    assert flow.creates("customer.create") == 2, "one customer per new number"

    # replay the raw topic from offset 0: processors and the sink see everything again
    writes_before = len([e for e in flow.ksim.log.entries if e.effect])
    code, out, err = await flow.cli(
        "replay", "raw", "--topic", "calls", "--from", "2000-01-01T00:00:00Z", "--to", "2100-01-01T00:00:00Z"
    )
    assert code == 0, err
    assert f"replayed {len(raw)} event(s)" in out
    await idle(flow)
    assert len(await read_topic(flow.bootstrap, flow.topics.raw_calls)) == 2 * len(raw)
    assert len([e for e in flow.ksim.log.entries if e.effect]) == writes_before, "the replay wrote nothing"
    flow.assert_exactly_once([ext(c) for c in calls] + [sms_ext])


@pytest.mark.services("ingest", "process-calls", "sink-kustomer", "poll-calls")
async def test_webhook_plus_poller_and_poller_only_calls_are_logged_once(flow: Flow):
    hooked = [await flow.end_call() for _ in range(3)]
    silent = [await flow.end_call(deliver=False, external_number=f"+42190512345{i}") for i in range(2)]
    await wait_for(lambda: len(flow.ksim.conversations) >= 5, 60, "5 conversations")
    raw = [orjson.loads(r.value) for r in await read_topic(flow.bootstrap, flow.topics.raw_calls)]
    vias = {(e["id"], e["via"]) for e in raw}
    for c in hooked:
        assert {(f"cloudtalk:call:{c['call_id']}", "webhook"), (f"cloudtalk:call:{c['call_id']}", "poller")} <= vias
    for c in silent:
        assert (f"cloudtalk:call:{c['call_id']}", "webhook") not in vias
    await idle(flow)
    flow.assert_exactly_once([ext(c) for c in hooked + silent])


@pytest.mark.services("ingest", "process-calls", "sink-kustomer")
async def test_sink_killed_between_conversation_and_commit_reconciles_to_one(flow: Flow):
    # notes hang: the sink has created the conversation and waits on the note when it is killed
    await flow.fault(match="POST /v1/notes", kind="latency", latency_ms=8_000)
    call = await flow.end_call()
    await wait_for(lambda: flow.creates("conversation.create") == 1, 60, "the conversation")
    await wait_for(
        lambda: any(e.path == "/v1/notes" for e in flow.ksim.log.entries) or len(flow.ksim.log.entries) > 0, 10
    )
    await asyncio.sleep(1.0)
    flow.stack.kill("sink-kustomer", signal.SIGKILL)
    flow.ksim.faults.clear()
    assert len(flow.ksim.notes) == 0 and len(flow.ksim.conversations) == 1
    flow.stack.start("sink-kustomer")
    await wait_for(lambda: len(flow.ksim.notes) == 1, 60, "the note after the restart")

    async def sink_outcomes() -> list[str]:
        audit = [orjson.loads(r.value) for r in await read_topic(flow.bootstrap, flow.topics.audit)]
        return [d["rule"] for a in audit if a["stage"] == "sink-kustomer" for d in a["decisions"]]

    # the restarted sink parks the command until the settle time after its intent (its offsets
    # move on, so the lag says nothing about it), then reconciles it
    await wait_for(sink_outcomes, 60, "the restarted sink's outcome")
    await idle(flow)
    flow.assert_exactly_once([ext(call)])
    outcomes = await sink_outcomes()
    assert outcomes == ["reconciled"], outcomes
    lookups = [e for e in flow.ksim.log.entries if e.method == "GET" and e.path.endswith("/conversations")]
    assert lookups, "the restarted sink looked the conversation up before writing"


async def assigned_partitions(flow: Flow, name: str) -> int:
    """The replica's own gauge: partitions it owns right now (0 when it does not answer)."""
    url = flow.stack.services[name].health_url.replace("/readyz", "/metrics")
    try:
        async with flow.http.get(url) as r:
            text = await r.text()
    except Exception:  # noqa: BLE001 - a killed replica owns nothing
        return 0
    for line in text.splitlines():
        if line.startswith("pipeline_assigned_partitions{"):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


@pytest.mark.services("ingest", "process-calls", "process-calls-2", "sink-kustomer")
async def test_processor_replicas_share_the_work_and_one_killed_mid_stream_loses_nothing(flow: Flow):
    async def sharing() -> bool:
        counts = [await assigned_partitions(flow, n) for n in ("process-calls", "process-calls-2")]
        return min(counts) > 0 and sum(counts) == 6

    await wait_for(sharing, 90, "both replicas to own partitions at the same time")
    calls = []
    for i in range(60):
        calls.append(await flow.end_call(external_number=f"+4479460{i:05d}"))
        if i == 25:
            flow.stack.kill("process-calls-2", signal.SIGKILL)
    await wait_for(lambda: len(flow.ksim.conversations) >= 60, 120, "60 conversations")
    await idle(flow)
    flow.assert_exactly_once([ext(c) for c in calls])
    assert await assigned_partitions(flow, "process-calls") == 6, "the survivor took over every partition"


@pytest.mark.services("ingest", "process-calls", "sink-kustomer")
async def test_processor_killed_mid_transaction_repeatedly_loses_and_duplicates_nothing(flow: Flow):
    calls = []
    for i in range(90):
        calls.append(await flow.end_call(external_number=f"+4479461{i:05d}"))
        if i in (20, 45, 70):
            flow.stack.kill("process-calls", signal.SIGKILL)
            flow.stack.start("process-calls")
    await wait_for(lambda: len(flow.ksim.conversations) >= 90, 180, "90 conversations")
    await idle(flow)
    flow.assert_exactly_once([ext(c) for c in calls])
    assert flow.stack.services["process-calls"].starts == 4


@pytest.mark.services("ingest", "process-calls", "sink-kustomer")
@pytest.mark.kustomer(window_seconds=2.0)  # a 429 announces the window's reset; the sink waits for it
@pytest.mark.env(SINK_RECONCILE_SETTLE_S="3")  # these faults answer or drop before the target acts
async def test_kustomer_429_storms_500s_and_timeouts_still_log_every_call_once(flow: Flow):
    await flow.fault(match="POST /v1/conversations", kind="status", status=429, probability=0.4, times=25)
    await flow.fault(match="POST /v1/notes", kind="status", status=500, probability=0.3, times=15)
    await flow.fault(match="GET /v1/customers/phone=", kind="timeout", latency_ms=3000, times=3)
    await flow.fault(match="POST /v1/customers", kind="reset", times=2)
    calls = [await flow.end_call(external_number=f"+4479462{i:05d}") for i in range(30)]
    await wait_for(lambda: len(flow.ksim.notes) >= 30, 180, "30 notes")
    await idle(flow)
    flow.assert_exactly_once([ext(c) for c in calls])
    fired = {(r.kind, r.status): r.fired for r in flow.ksim.faults.rules}
    assert fired[("status", 429)] > 0 and fired[("status", 500)] > 0 and fired[("timeout", 500)] > 0
    assert flow.creates("customer.create") == 30
    dead = await read_topic(flow.bootstrap, flow.topics.deadletter)
    assert dead == []


@pytest.mark.services("ingest", "process-calls", "sink-kustomer")
async def test_bad_webhooks_get_clear_4xx_and_nothing_reaches_kafka_or_kustomer(flow: Flow):
    headers = {"X-Pipeline-Secret": "e2e-webhook-secret", "Content-Type": "application/json"}
    url = f"{flow.ingest_url}/ingest/cloudtalk/support/call-ended"
    async with flow.http.post(url, data=b'{"event": "call.ended", "call_id": "x"}', headers=headers) as r:
        assert r.status == 400 and "payload" in (await r.json())["error"]
    async with flow.http.post(url, data=b"x" * (300 * 1024), headers=headers) as r:
        assert r.status == 413
    async with flow.http.post(url, data=b"{}", headers={**headers, "X-Pipeline-Secret": "wrong"}) as r:
        assert r.status == 401
    # a call on a number no integration connects: dropped by rule, with an audit record
    call = await flow.end_call(internal_number=OTHER_LINE)

    async def stored() -> bool:
        return len(await read_topic(flow.bootstrap, flow.topics.raw_calls)) == 1

    await wait_for(stored, 30, "the call to be stored")
    await idle(flow)
    raw = await read_topic(flow.bootstrap, flow.topics.raw_calls)
    assert [orjson.loads(r.value)["payload"]["call_id"] for r in raw] == [call["call_id"]]
    audit = [orjson.loads(r.value) for r in await read_topic(flow.bootstrap, flow.topics.audit)]
    assert audit[0]["decisions"] == [
        {
            "integration": "support",
            "decision": "dropped",
            "rule": "number_not_connected",
            "detail": f"CloudTalk number {OTHER_LINE} is not connected",
        }
    ]
    assert not flow.ksim.conversations and not [e for e in flow.ksim.log.entries if e.effect]
