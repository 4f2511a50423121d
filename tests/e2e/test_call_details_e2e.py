"""Details that change after a call was logged — tags edited after wrap-up, a recording uploaded
later, a rating changed in Call History — reach the call's Kustomer conversation once each:
redelivered workflows, the calls poller seeing the same details pass after pass and a replay of
the raw topic add nothing."""

from __future__ import annotations

import asyncio
import signal

import orjson
import pytest

from pipeline.kafka.reading import read_topic
from tests.e2e.conftest import Flow, wait_for
from tests.e2e.test_calls_e2e import idle

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]


def notes_of(flow: Flow) -> list[str]:
    """The bodies of the simulator's notes, oldest first."""
    return [n["body"] for n in sorted(flow.ksim.notes.values(), key=lambda n: n.get("createdAt") or "")]


async def replay_raw_calls(flow: Flow) -> str:
    code, out, err = await flow.cli(
        "replay", "raw", "--topic", "calls", "--from", "2000-01-01T00:00:00Z", "--to", "2100-01-01T00:00:00Z"
    )
    assert code == 0, err
    return out


@pytest.mark.services("ingest", "process-calls", "sink-kustomer", "poll-calls")
async def test_late_details_add_one_note_each_under_redelivery_the_poller_and_a_replay(flow: Flow):
    call = await flow.end_call(tags=["Billing"], notes=["Asked for a refund"], rating=4, recorded=False)
    call_id = call["call_id"]
    await wait_for(lambda: flow.creates("note.create") >= 1, 60, "the call's note")

    # an agent adds a tag after wrap-up; the workflow is delivered three times
    await flow.modify_call(call_id, tags=["Billing", "VIP"], deliver_times=3)
    await wait_for(lambda: flow.creates("note.create") >= 2, 60, "the note of the tags")
    # the recording is uploaded after the call ended; delivered twice
    await flow.upload_recording(call_id, deliver_times=2)
    await wait_for(lambda: flow.creates("note.create") >= 3, 60, "the note of the recording")
    # a rating changed in Call History fires no workflow: the poller's next pass notices it
    await flow.modify_call(call_id, rating=2, deliver=False)
    await wait_for(lambda: flow.creates("note.create") >= 4, 60, "the rating, noticed by the poller")
    await asyncio.sleep(12)  # two more passes of the poller (every 5 s) see the same details
    await idle(flow)

    assert flow.creates("conversation.create") == 1, "never a second conversation"
    assert flow.creates("note.create") == 4, notes_of(flow)
    assert len(flow.ksim.notes) == 4
    bodies = notes_of(flow)
    assert bodies[0].splitlines()[0] == f"CloudTalk call {call_id}"
    assert "Tags: Billing" in bodies[0] and "Recording:" not in bodies[0]
    markers = [b.splitlines()[0] for b in bodies[1:]]
    assert all(m.startswith(f"CloudTalk call {call_id} · details updated (") for m in markers)
    assert len(set(markers)) == 3
    tags, recording, rating = bodies[1:]
    assert "Tags: Billing, VIP" in tags and "Rating: 4/5" in tags
    assert recording.splitlines()[1].startswith("Recording: https://my.cloudtalk.io/pub/r/")
    assert "Rating: 2/5" in rating and "Tags: Billing, VIP" in rating
    conversation = next(iter(flow.ksim.conversations))
    assert flow.notes_per_conversation() == {conversation: 4}

    # a replay of every raw call event (ended, modified, uploaded, the poller's snapshots): nothing new
    raw = await read_topic(flow.bootstrap, flow.topics.raw_calls)
    writes = len([e for e in flow.ksim.log.entries if e.effect])
    out = await replay_raw_calls(flow)
    assert f"replayed {len(raw)} event(s)" in out
    await idle(flow)
    assert len([e for e in flow.ksim.log.entries if e.effect]) == writes, "the replay wrote nothing"
    assert flow.creates("note.create") == 4


@pytest.mark.services("ingest", "process-calls", "sink-kustomer")
async def test_a_call_modified_that_repeats_what_the_note_states_adds_nothing(flow: Flow):
    call = await flow.end_call(tags=["Billing"], recorded=False)
    await wait_for(lambda: flow.creates("note.create") >= 1, 60, "the call's note")
    await flow.modify_call(call["call_id"], tags=["Billing"], deliver_times=2)  # no change
    await asyncio.sleep(3)
    await idle(flow)
    assert flow.creates("note.create") == 1


def insight_requests(flow: Flow) -> list[str]:
    """The conversation-intelligence requests in the CloudTalk simulator's request log."""
    return [e.path for e in flow.csim.log.entries if e.method == "GET" and "/ai/calls/" in e.path]


@pytest.mark.services("ingest", "process-calls", "sink-kustomer", "poll-calls")
@pytest.mark.calls(conversation_intelligence=True)
@pytest.mark.env(CALLS_INSIGHTS_RETRY_S="2")
async def test_conversation_intelligence_arrives_as_one_note_once_cloudtalk_has_it(flow: Flow):
    answered = await flow.end_call(recorded=False)
    missed = await flow.end_call(status="missed", talking_time=0, recorded=False, external_number="+421905123456")
    await wait_for(lambda: flow.creates("note.create") >= 2, 60, "the calls' notes")
    # CloudTalk has no summary yet: the poller asks (one request per try), and again later
    await wait_for(lambda: len(insight_requests(flow)) >= 2, 60, "the poller asking twice")
    assert all(op.endswith("/summary") for op in insight_requests(flow)), insight_requests(flow)
    assert flow.creates("note.create") == 2
    summary = "Customer asked about the refund; agent confirmed it was sent. " * 3
    await flow._sim(
        "POST",
        f"{flow.ct_root}/_sim/calls/{answered['call_id']}/insights",
        {"summary": summary, "smart_notes": ["Refund sent", "Follow up Friday"], "details_link": "https://x/t/1"},
    )
    await wait_for(lambda: flow.creates("note.create") >= 3, 60, "the note of the insights")
    await asyncio.sleep(12)  # more passes: the insights were published once, nothing is asked again
    await idle(flow)
    assert flow.creates("note.create") == 3 and flow.creates("conversation.create") == 2
    [note] = [b for b in notes_of(flow) if " · details updated (" in b.splitlines()[0]]
    assert note.splitlines()[0].startswith(f"CloudTalk call {answered['call_id']} · details updated (")
    assert f"Summary: {summary}" in note
    assert "Smart notes: Refund sent; Follow up Friday" in note and "Transcription: https://x/t/1" in note
    asked = insight_requests(flow)
    # the missed call is never asked about; the answered one: summary until found, then the other two once
    assert not any(f"/{missed['call_id']}/" in op for op in asked)
    assert (
        sum(op.endswith("/smart-notes") for op in asked) == 1 and sum(op.endswith("/details-link") for op in asked) == 1
    )


@pytest.mark.services("ingest", "process-calls", "sink-kustomer")
async def test_sink_killed_while_a_details_note_is_in_flight_the_note_exists_once(flow: Flow):
    call = await flow.end_call(tags=["Billing"], recorded=False)
    await wait_for(lambda: flow.creates("note.create") >= 1, 60, "the call's note")
    # the details note's create is held at Kustomer (it lands later) and the sink is killed meanwhile
    held = flow.ksim.faults.add(match="POST /v1/notes$", kind="latency", latency_ms=3000, times=1)
    await flow.modify_call(call["call_id"], tags=["Billing", "VIP"])
    await wait_for(lambda: held.fired >= 1, 60, "the details note in flight")
    await asyncio.sleep(0.5)
    flow.stack.kill("sink-kustomer", signal.SIGKILL)
    flow.stack.start("sink-kustomer")
    await wait_for(lambda: flow.creates("note.create") >= 2, 60, "the held note to land")
    await asyncio.sleep(15)  # the restarted sink settles, looks the note up and finds it
    await idle(flow)
    assert (
        sum(1 for e in flow.ksim.log.entries if e.fault == "latency" and (e.effect or "").startswith("note.create"))
        == 1
    )
    assert flow.creates("note.create") == 2 and len(flow.ksim.notes) == 2, notes_of(flow)
    assert "Tags: Billing, VIP" in notes_of(flow)[1]
    # the sink's outcome says it found the note rather than writing it again
    audit = [orjson.loads(r.value) for r in await read_topic(flow.bootstrap, flow.topics.audit)]
    outcomes = [
        d.get("rule")
        for a in audit
        if a["stage"] == "sink-kustomer" and "#details:" in a["event_id"]
        for d in a["decisions"]
    ]
    assert outcomes == ["reconciled"], outcomes
