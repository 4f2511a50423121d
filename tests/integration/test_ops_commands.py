"""Operator commands on the real broker: ``trace``, ``deadletters``, ``replay deadletter``,
``status`` — as processes (text and ``--json``), over records written in the stages' formats
(tests/integration/ops_seed.py)."""

from __future__ import annotations

import asyncio
import re
import sys
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from pipeline.core.observability import HealthServer, metrics
from pipeline.kafka.clients import new_consumer
from pipeline.kafka.reading import read_topic
from pipeline.kafka.records import REPLAYED_HEADER
from pipeline.kafka.topics import Topics
from pipeline.ops.deadletters import read_deadletters, replay_cursor
from pipeline.ops.inspect import DeadLetter, TopicKinds
from pipeline.ops.trace import parse_query, trace
from tests.conftest import REPO, pipeline_env
from tests.integration.ops_seed import (
    BAD_SMS_EVENT,
    CALL_EVENT,
    CALL_ID,
    CONVERSATION,
    CUSTOMER,
    NOTE,
    PHONE,
    SMS_EVENT,
    SMS_ID,
    seed,
)

pytestmark = pytest.mark.kafka


async def cli(*args: str, env: dict[str, str], stdin: bytes | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pipeline",
        *args,
        cwd=REPO,
        env=env,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def seeded(kafka_bootstrap: str, topics: Topics):
    await seed(kafka_bootstrap, topics)
    return pipeline_env(kafka_bootstrap, topics.prefix, PIPELINE_CONFIG="/nonexistent/integrations.yaml")


async def test_trace_shows_the_whole_path_of_a_call(seeded, topics: Topics):
    rc, out, err = await cli("trace", CALL_EVENT, env=seeded)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"event {CALL_EVENT}: 1 event(s) since ")
    body = "\n".join(lines)
    # both deliveries, the decision of every integration with its rule, the command, the ledger, the ids written
    assert re.search(r"  raw +cloudtalk\.calls\.raw\[\d\]@0 +call\.ended via webhook \(integration support\)", body)
    assert "call.ended via poller" in body
    assert f"process-calls: support emitted → support|{CALL_EVENT}; sales dropped (number_not_connected)" in body
    assert f"kustomer.log_conversation support|{CALL_EVENT} (lane support|{PHONE})" in body
    assert "kustomer started, attempt 1" in body and "kustomer done (created), attempt 1" in body
    written = f"customer_id={CUSTOMER}, conversation_id={CONVERSATION}, note_id={NOTE}"
    assert f"written by support|{CALL_EVENT}: {written}" in body
    kinds = [line.split()[1] for line in lines[3:] if line.startswith("  20")]
    assert kinds.index("raw") < kinds.index("decision") < kinds.index("command") < kinds.index("ledger")
    assert kinds.index("ledger") < kinds.index("effect")

    # the same as JSON, found by the call id alone
    rc, out, err = await cli("trace", str(CALL_ID), "--json", env=seeded)
    assert rc == 0, err
    doc = orjson.loads(out)
    assert doc["query"]["kind"] == "CloudTalk call, SMS or contact"
    [event] = doc["events"]
    assert event["event_id"] == CALL_EVENT
    assert event["written"] == {
        f"support|{CALL_EVENT}": {"customer_id": CUSTOMER, "conversation_id": CONVERSATION, "note_id": NOTE}
    }
    assert [s["kind"] for s in event["timeline"]].count("raw") == 2
    decisions = next(s for s in event["timeline"] if s["kind"] == "decision")["decisions"]
    assert {(d["integration"], d["decision"], d["rule"]) for d in decisions} == {
        ("support", "emitted", None),
        ("sales", "dropped", "number_not_connected"),
    }
    assert event["dead_letters"] == []


async def test_trace_by_phone_customer_and_sms_finds_dead_letters(seeded, kafka_bootstrap: str, topics: Topics):
    kinds, since = TopicKinds(topics), datetime.now(UTC) - timedelta(days=7)

    async def traced(text: str) -> dict:
        return (await trace(kafka_bootstrap, kinds, parse_query(text), since)).to_dict()

    # a phone number: every event that mentions it
    assert {e["event_id"] for e in (await traced(PHONE))["events"]} == {CALL_EVENT, SMS_EVENT}
    # a Kustomer customer id: the events whose effects touched it (ids written)
    assert [e["event_id"] for e in (await traced(CUSTOMER))["events"]] == [CALL_EVENT]
    # the SMS: refused by Kustomer, its ledger entry failed, a dead letter
    [event] = (await traced(f"sms:{SMS_ID}"))["events"]
    [dl] = event["dead_letters"]
    assert dl["stage"] == "sink-kustomer" and dl["reason"] == "TargetRejected" and dl["integration"] == "support"
    # a record no processor could read is traced by its key
    [event] = (await traced(BAD_SMS_EVENT))["events"]
    assert [s["kind"] for s in event["timeline"]] == ["raw", "deadletter"]
    assert (await traced("424242"))["events"] == []

    # as text, from the command line
    rc, out, err = await cli("trace", f"sms:{SMS_ID}", env=seeded)
    assert rc == 0, err
    assert "kustomer failed (rejected:400)" in out
    assert "sink-kustomer: support dead_lettered (http_400)" in out
    assert re.search(r"deadletter +deadletter\[0\]@\d+ +sink-kustomer: TargetRejected", out), out
    assert "1 dead letter(s): `pipeline deadletters show OFFSET`" in out
    # nothing known: exit 1; nonsense: exit 2, one line, before any broker is asked
    rc, out, err = await cli("trace", "424242", env=seeded)
    assert rc == 1 and out.startswith("no record of CloudTalk call, SMS or contact 424242 since ")
    rc, out, err = await cli("trace", "not an id!", env={**seeded, "KAFKA_BOOTSTRAP": "127.0.0.1:1"})
    assert rc == 2 and err.startswith("pipeline trace: ID: 'not an id!' is not an event id") and err.count("\n") == 1


async def test_deadletters_list_show_and_replay_after_a_fix(seeded, kafka_bootstrap: str, topics: Topics):
    rc, out, err = await cli("deadletters", "list", env=seeded)
    assert rc == 0, err
    assert out.splitlines()[0].split() == ["offset", "failed", "at", "stage", "reason", "source", "event", "message"]
    assert re.search(r"process-sms +SchemaError +cloudtalk\.sms\.raw\[\d\]@1 +cloudtalk:sms:5 ", out), out
    assert re.search(r"sink-kustomer +TargetRejected +kustomer\.commands\[\d\]@\d+ +cloudtalk:sms:88231977 ", out)
    assert "2 dead letter(s) — process-sms SchemaError: 1, sink-kustomer TargetRejected: 1" in out

    letters = await read_deadletters(kafka_bootstrap, topics)

    def listed(stage=None, reason=None, topic=None) -> list[DeadLetter]:
        return [d for d in letters if d.matches(stage, reason, topic, topics.prefix)]

    assert [d.event_id for d in listed(stage="process-sms")] == [BAD_SMS_EVENT]
    assert [d.command_id for d in listed(reason="TargetRejected")] == [f"support|{SMS_EVENT}"]
    assert [d.stage for d in listed(topic="cloudtalk.sms.raw")] == ["process-sms"]
    assert listed(topic=topics.raw_sms) == listed(topic="cloudtalk.sms.raw")
    rc, out, err = await cli("deadletters", "list", "--json", "--reason", "TargetRejected", "--since", "1h", env=seeded)
    assert rc == 0, err
    [refused] = orjson.loads(out)
    assert refused["source"]["topic"] == topics.kustomer_commands and refused["integration"] == "support"
    rc, out, err = await cli("deadletters", "list", "--json", "--until", "1h", env=seeded)
    assert rc == 0 and orjson.loads(out) == []

    rc, out, err = await cli("deadletters", "show", str(refused["offset"]), env=seeded)
    assert rc == 0, err
    assert "reason       TargetRejected" in out and "400 Bad Request: channel is invalid" in out
    assert f"command_id: support|{SMS_EVENT}" in out and '"externalId": "cloudtalk-sms-88231977"' in out
    rc, out, err = await cli("deadletters", "show", "999", env=seeded)
    assert rc == 1 and "no dead letter at offset(s) 999" in err

    # replay: never without a confirmation; --dry-run lists
    rc, out, err = await cli("replay", "deadletter", env=seeded)
    assert rc == 2 and err.strip().splitlines() == [
        "pipeline replay deadletter: not on a terminal, so it cannot ask: add --yes to send, --dry-run to list"
    ]
    rc, out, err = await cli("replay", "deadletter", "--dry-run", env=seeded)
    assert rc == 0 and "would send 2 dead letter(s) back" in out
    # after the fix, the refused command only: back to its command topic, marked replayed
    rc, out, err = await cli("replay", "deadletter", "--yes", "--reason", "TargetRejected", env=seeded)
    assert rc == 0, err
    assert f"sent 1 dead letter(s) back ({topics.kustomer_commands} (1)); 1 left out by filters" in out
    replayed = [r for r in await read_topic(kafka_bootstrap, topics.kustomer_commands) if r.headers]
    marked = [r for r in replayed if REPLAYED_HEADER in dict(r.headers)]
    assert len(marked) == 1 and dict(marked[0].headers)[REPLAYED_HEADER] == str(refused["offset"]).encode()
    assert "replay deadletter: 100% 1/1 dead letters" in err, "progress on stderr"
    # a filtered replay leaves the cursor alone: the next run without filters sends both
    assert await replay_cursor(kafka_bootstrap, topics) is None
    rc, out, err = await cli("replay", "deadletter", "--yes", env=seeded)
    assert rc == 0 and "sent 2 dead letter(s) back" in out
    cursor = await replay_cursor(kafka_bootstrap, topics)
    assert cursor is not None and cursor["next_offset"] > max(d.offset for d in letters)


async def test_replay_deadletter_asks_on_a_terminal(seeded):
    """With a terminal (a pty) it asks; anything but y sends nothing."""
    import os
    import pty

    async def run(answer: bytes) -> tuple[int, str]:
        primary, secondary = pty.openpty()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pipeline",
            "replay",
            "deadletter",
            cwd=REPO,
            env=seeded,
            stdin=secondary,
            stdout=asyncio.subprocess.PIPE,
            stderr=secondary,
        )
        os.close(secondary)
        loop = asyncio.get_running_loop()
        seen = b""
        while b"[y/N]" not in seen:
            seen += await loop.run_in_executor(None, os.read, primary, 1024)
        os.write(primary, answer)
        out = await asyncio.wait_for(proc.stdout.read(), 60)  # type: ignore[union-attr]
        await proc.wait()
        os.close(primary)
        assert b"send 2 dead letter(s) back to " in seen
        return proc.returncode or 0, out.decode()

    assert await run(b"n\n") == (1, "nothing sent\n")
    rc, out = await run(b"y\n")
    assert rc == 0 and "sent 2 dead letter(s) back" in out


async def test_status_per_integration_groups_deadletters_and_budget(
    seeded, kafka_bootstrap: str, topics: Topics, tmp_path
):
    # one member in the Kustomer sink's group, and a sink's metrics with a rate-limit budget
    member = new_consumer(
        topics.kustomer_commands,
        bootstrap_servers=kafka_bootstrap,
        group_id=f"{topics.prefix}sink-kustomer",
        client_id="sink-kustomer-test",
        enable_auto_commit=False,
    )
    await member.start()
    health = HealthServer("127.0.0.1", 0)
    await health.start()
    metrics().ratelimit_remaining.labels("kustomer", "support").set(987)
    metrics().ratelimit_remaining.labels("cloudtalk", "my.cloudtalk.io").set(41)
    try:
        for _ in range(50):  # joined and assigned
            await member.getmany(timeout_ms=200)
            if member.assignment():
                break
        url = f"http://127.0.0.1:{health.port}/metrics"
        rc, out, err = await cli("status", "--metrics", url, env=seeded)
        assert rc == 0, err
        lines = out.splitlines()
        support = next(line for line in lines if line.startswith("  support "))
        sales = next(line for line in lines if line.startswith("  sales "))
        assert f"{SMS_EVENT} emitted" in support and f"{CALL_EVENT} done (created)" in support
        assert support.split()[-3:] == ["1", "kustomer", "987"], support
        assert f"{SMS_EVENT} dropped (sms_disabled)" in sales and "—" in sales
        group = next(line for line in lines if line.startswith(f"  {topics.prefix}sink-kustomer "))
        assert group.split()[1:5] == ["Stable", "1", "6", "0"], group
        assert "sink-kustomer-test@127.0.0.1" in group
        assert next(line for line in lines if f"{topics.prefix}process-calls " in line).split()[1:5] == [
            "Empty",
            "0",
            "0",
            "0",
        ]
        assert "dead letters: 2 in the topic, never replayed; process-sms 1, sink-kustomer 1" in out
        budget = next(line for line in lines if line.startswith("rate-limit budget left: "))
        assert "cloudtalk/my.cloudtalk.io 41" in budget and "kustomer/support 987" in budget

        rc, out, err = await cli("status", "--json", env=seeded)
        assert rc == 0, err
        doc = orjson.loads(out)
        assert set(doc["integrations"]) == {"support", "sales"}
        assert doc["integrations"]["support"]["last_effect_out"]["event_id"] == CALL_EVENT
        assert doc["integrations"]["support"]["ratelimit_remaining"] == "n/a", "no --metrics: said, not guessed"
        assert doc["groups"][f"{topics.prefix}sink-kustomer"]["members"][0]["client_id"] == "sink-kustomer-test"
        assert doc["groups"][f"{topics.prefix}process-sms"]["lag"] == 0
        assert doc["dead_letters"]["total"] == 2 and doc["ratelimit_remaining"] == "n/a"
        assert doc["events_in"][topics.raw_calls] is not None and doc["events_in"][topics.raw_contacts] is None

        # the integrations file names them (an inactive one too) when it is readable
        config = tmp_path / "integrations.yaml"
        config.write_text(
            """
cloudtalk: {base_url: "http://127.0.0.1:2/api", key_id: {env: X}, key_secret: {env: X}}
integrations:
  - {name: support, active: true, kustomer: {base_url: "http://127.0.0.1:1", api_key: {env: X}},
     cloudtalk_webhook_secret: {env: X}}
  - {name: marketing, active: false, kustomer: {base_url: "http://127.0.0.1:1", api_key: {env: X}},
     cloudtalk_webhook_secret: {env: X}}
"""
        )
        rc, out, err = await cli("status", "--json", "--config", str(config), env=seeded)
        assert rc == 0, err
        doc = orjson.loads(out)
        assert doc["integrations_from"] == "integrations file"
        assert {n: i["active"] for n, i in doc["integrations"].items()} == {"support": True, "marketing": False}
        assert doc["integrations"]["marketing"]["last_event_in"] is None
    finally:
        await member.stop()
        await health.stop()
