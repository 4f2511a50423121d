"""The operator commands after a real run: ``trace``, ``deadletters list`` and ``status`` over what
the services wrote for three calls — one logged in Kustomer, one dropped by rule, one refused by
Kustomer (a 400) and dead-lettered."""

from __future__ import annotations

import orjson
import pytest

from tests.e2e.conftest import OTHER_LINE, Flow, quiet, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]


async def traced(flow: Flow, call_id: str) -> dict:
    out, _ = await flow.stack.run_once(["trace", call_id, "--json"])
    [event] = orjson.loads(out)["events"]
    assert event["event_id"] == f"cloudtalk:call:{call_id}"
    return event


def kinds(event: dict) -> list[str]:
    return [s["kind"] for s in event["timeline"]]


def decisions(event: dict) -> list[tuple[str, str, str | None]]:
    return [
        (d["integration"], d["decision"], d["rule"])
        for s in event["timeline"]
        if s["kind"] == "decision"
        for d in s["decisions"]
    ]


@pytest.mark.services("ingest", "process-calls", "sink-kustomer")
async def test_trace_deadletters_and_status_after_a_real_run(flow: Flow):
    # landed: a conversation and a note in Kustomer
    landed = await flow.end_call()
    await wait_for(lambda: len(flow.ksim.notes) == 1, 60, "the landed call's note")
    # dropped: a line no integration connects
    dropped = await flow.end_call(internal_number=OTHER_LINE, external_number="+447700900124")
    # refused: Kustomer answers the conversation create with a 400, once
    await flow.fault(match=r"^POST /v1/conversations$", kind="status", status=400, times=1)
    refused = await flow.end_call(external_number="+447700900125")
    await wait_for(lambda: flow.ksim.faults.rules[0].fired == 1, 60, "the refusal")
    await quiet(flow, ("process-calls", "sink-kustomer"))
    ids = {name: str(c["call_id"]) for name, c in (("landed", landed), ("dropped", dropped), ("refused", refused))}

    # the landed call: raw, decision (emitted), command, ledger done with the conversation written
    event = await traced(flow, ids["landed"])
    assert {"raw", "decision", "command", "ledger"} <= set(kinds(event)), kinds(event)
    assert decisions(event) == [("support", "emitted", None)]
    command_id = f"support|cloudtalk:call:{ids['landed']}"
    done = [s for s in event["timeline"] if s["kind"] == "ledger" and s["state"] == "done"]
    assert done and done[-1]["command_id"] == command_id, event["timeline"]
    conversation = event["written"][command_id]["conversation_id"]
    assert conversation in flow.ksim.conversations
    assert flow.ksim.conversations[conversation]["attributes"]["externalId"] == f"cloudtalk-call-{ids['landed']}"
    assert event["dead_letters"] == []

    # the dropped call: the rule that dropped it, no command
    event = await traced(flow, ids["dropped"])
    assert decisions(event) == [("support", "dropped", "number_not_connected")]
    assert "command" not in kinds(event) and event["dead_letters"] == []

    # the refused call: a dead letter of the sink
    event = await traced(flow, ids["refused"])
    assert decisions(event) == [("support", "emitted", None)]
    [dead] = event["dead_letters"]
    assert dead["stage"] == "sink-kustomer" and dead["reason"] == "TargetRejected", dead
    assert "deadletter" in kinds(event) and event["written"] == {}

    # as text: the rule is named
    out, _ = await flow.stack.run_once(["trace", ids["dropped"]])
    assert "support dropped (number_not_connected)" in out, out

    # exactly the refused command is dead-lettered
    out, _ = await flow.stack.run_once(["deadletters", "list", "--json"])
    [letter] = orjson.loads(out)
    assert letter["stage"] == "sink-kustomer" and letter["reason"] == "TargetRejected", letter
    assert letter["command_id"] == f"support|cloudtalk:call:{ids['refused']}", letter
    assert letter["integration"] == "support"

    # status: the integration's last event in and last effect out; nothing left to read
    out, _ = await flow.stack.run_once(["status", "--json"])
    doc = orjson.loads(out)
    support = doc["integrations"]["support"]
    assert support["last_event_in"] is not None and support["last_effect_out"] is not None, support
    assert support["last_effect_out"]["event_id"] == f"cloudtalk:call:{ids['landed']}"
    assert support["last_effect_out"]["decision"] == "done"
    assert support["dead_letters"] == 1
    prefix = flow.topics.prefix
    assert doc["groups"][f"{prefix}process-calls"]["lag"] == 0
    assert doc["groups"][f"{prefix}sink-kustomer"]["lag"] == 0
    assert doc["dead_letters"]["total"] == 1
