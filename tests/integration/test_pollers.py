"""Pollers, backfill and replay on the real broker against the CloudTalk simulator."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime, timedelta

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from devkit.net import free_port
from devkit.sim.cloudtalk import CloudTalkSimSettings, running_cloudtalk_sim
from pipeline.clients.cloudtalk import CloudTalkClient
from pipeline.core.envelope import call_event_id, contact_event_id
from pipeline.ingest.pollers import CallHistoryPoller, ContactsPoller
from pipeline.kafka.clients import durable_producer
from pipeline.kafka.cursors import CursorStore
from pipeline.kafka.topics import Topics
from tests.conftest import REPO, KafkaIO, pipeline_env

pytestmark = pytest.mark.kafka


async def sim_post(http: aiohttp.ClientSession, root: str, path: str, body) -> dict:
    async with http.post(
        f"{root}/_sim/{path}", data=orjson.dumps(body), headers={"Content-Type": "application/json"}
    ) as r:
        assert r.status < 300, await r.text()
        return await r.json()


@pytest.fixture
async def cloudtalk():
    settings = CloudTalkSimSettings(key_id="poll-key", key_secret="poll-secret", rate_limit=1000)
    async with running_cloudtalk_sim(settings) as (sim, api), aiohttp.ClientSession() as http:
        client = CloudTalkClient.from_credentials(http, api, "poll-key", "poll-secret")
        yield sim, api.removesuffix("/api"), client, http


async def test_call_poller_finds_calls_without_webhook_with_the_webhook_event_id(
    cloudtalk, kafka: KafkaIO, topics: Topics
):
    sim, root, client, http = cloudtalk
    await sim_post(
        http, root, "seed", {"contacts": [{"name": "Jana", "ContactNumber": [{"public_number": "+421905123456"}]}]}
    )
    ended = [
        await sim_post(
            http,
            root,
            "calls",
            {
                "direction": "incoming",
                "status": s,
                "internal_number": "+442012345678",
                "external_number": n,
                "deliver": False,
            },
        )
        for s, n in (("answered", "+421905123456"), ("missed", "+447700900123"), ("answered", "+421905123456"))
    ]
    producer = durable_producer(kafka.bootstrap, "test-poller")
    await producer.start()
    try:
        poller = CallHistoryPoller(
            client,
            producer,
            topics,
            CursorStore(kafka.bootstrap, topics.cursors),
            lag_s=0,
            overlap_s=60,
            initial_lookback_s=600,
        )
        first = await poller.poll_once(datetime.now(UTC) + timedelta(seconds=2))
        assert first["published"] == 3 and first["pages"] >= 1
        cursor = await CursorStore(kafka.bootstrap, topics.cursors).read(CallHistoryPoller.CURSOR)
        assert cursor and cursor["published"] == 3
    finally:
        await producer.stop()
    records = await kafka.read_all(topics.raw_calls, expect=3, timeout=10)
    envs = [orjson.loads(r.value) for r in records]
    assert {e["id"] for e in envs} == {call_event_id(c["call_id"]) for c in ended}
    assert all(e["via"] == "poller" and e["integration"] == "*" for e in envs)
    by_id = {e["payload"]["call_id"]: e["payload"] for e in envs}
    for c in ended:  # the poller's body carries what the webhook body would
        webhook = c["body"]
        polled = by_id[c["call_id"]]
        for field in ("direction", "status", "contact_id", "started_at", "ended_at", "talking_time", "waiting_time"):
            assert polled[field] == webhook[field], field
        assert int(polled["external_number"]) == int(webhook["external_number"])


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """The CLI as a process, without blocking the loop the in-process simulator runs on."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pipeline",
        *args,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    return proc.returncode, out.decode(), err.decode()


async def test_backfill_command_publishes_a_window_with_progress(cloudtalk, kafka: KafkaIO, topics: Topics, tmp_path):
    sim, root, client, http = cloudtalk
    for _ in range(4):
        await sim_post(
            http,
            root,
            "calls",
            {
                "direction": "outgoing",
                "status": "answered",
                "internal_number": "+442012345678",
                "external_number": "+421905123456",
                "deliver": False,
            },
        )
    config = tmp_path / "integrations.yaml"
    config.write_text(f"""
cloudtalk: {{base_url: "{root}/api", key_id: {{env: CT_ID}}, key_secret: {{env: CT_SECRET}}}}
integrations:
  - name: support
    active: true
    kustomer: {{base_url: "http://127.0.0.1:9", api_key: {{env: CT_ID}}}}
    cloudtalk_webhook_secret: {{env: CT_ID}}
""")
    now = datetime.now(UTC)
    env = pipeline_env(
        kafka.bootstrap, topics.prefix, PIPELINE_CONFIG=str(config), CT_ID="poll-key", CT_SECRET="poll-secret"
    )
    rc, out, err = await run_cli(
        "backfill",
        "calls",
        "--from",
        (now - timedelta(hours=1)).isoformat(),
        "--to",
        (now + timedelta(minutes=1)).isoformat(),
        env=env,
    )
    assert rc == 0, err
    assert "backfill calls: 100% 1/1 pages · 4 calls published" in err, err
    assert orjson.loads(out.strip().splitlines()[-1])["published"] == 4
    records = await kafka.read_all(topics.raw_calls, expect=4, timeout=10)
    assert {orjson.loads(r.value)["via"] for r in records} == {"backfill"}
    rc, _, err = await run_cli("backfill", "calls", "--from", "yesterday", "--to", "now", env=env)
    assert rc == 2 and "--from/--to: not an ISO-8601 time" in err


async def test_contacts_poller_exports_everything_once_then_only_changes(cloudtalk, kafka: KafkaIO, topics: Topics):
    sim, root, client, http = cloudtalk
    received: list[dict] = []

    async def receive(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post("/hook", receive)
    receiver = TestServer(app)
    await receiver.start_server()
    await sim_post(http, root, "workflows", {"trigger": "contact.updated", "url": str(receiver.make_url("/hook"))})
    await sim_post(
        http,
        root,
        "seed",
        {
            "contacts": [
                {
                    "name": f"Contact {i}",
                    "ContactNumber": [{"public_number": f"+42190512345{i}"}],
                    "ContactEmail": [{"email": f"c{i}@example.org"}],
                }
                for i in range(3)
            ]
        },
    )
    producer = durable_producer(kafka.bootstrap, "test-poller")
    await producer.start()
    try:
        poller = ContactsPoller(client, producer, topics, CursorStore(kafka.bootstrap, topics.cursors))
        first = await poller.poll_once()
        second = await poller.poll_once()
        state = await (await http.get(f"{root}/_sim/state")).json()
        changed = state["contacts"][1]
        cid = changed["Contact"]["id"]
        async with http.patch(
            f"{root}/_sim/contacts/{cid}",
            data=orjson.dumps({"name": "Renamed"}),
            headers={"Content-Type": "application/json"},
        ) as r:
            assert r.status < 300, await r.text()
        third = await poller.poll_once()
    finally:
        await producer.stop()
    assert (first["published"], second["published"], third["published"]) == (3, 0, 1)
    assert second["unchanged"] == 3
    records = await kafka.read_all(topics.raw_contacts, expect=4, timeout=10)
    envs = [orjson.loads(r.value) for r in records]
    assert sorted(e["via"] for e in envs) == ["import", "import", "import", "poller"]
    last = next(e for e in envs if e["via"] == "poller")
    assert last["type"] == "contact.updated" and last["payload"]["name"] == "Renamed"
    # the workflow delivered the same version: the same event id
    for _ in range(50):
        if received:
            break
        await asyncio.sleep(0.1)
    await receiver.close()
    assert [b["contact_id"] for b in received] == [int(cid)]
    assert last["id"] == contact_event_id(received[0]["contact_id"], received[0]["modified_at"])


async def test_sigterm_stops_a_poller_in_the_middle_of_a_pass_without_writing_its_cursor(
    kafka: KafkaIO, topics: Topics, tmp_path
):
    """CloudTalk unreachable: the pass keeps retrying; SIGTERM must still stop the poller at once
    (exit 0), and no cursor is written for the unfinished pass."""
    import signal
    import time

    dead = free_port()  # a port nobody listens on
    config = tmp_path / "integrations.yaml"
    config.write_text(f"""
cloudtalk: {{base_url: "http://127.0.0.1:{dead}/api", key_id: {{env: CT_ID}}, key_secret: {{env: CT_ID}}}}
integrations:
  - name: support
    active: true
    kustomer: {{base_url: "http://127.0.0.1:9", api_key: {{env: CT_ID}}}}
    cloudtalk_webhook_secret: {{env: CT_ID}}
""")
    env = pipeline_env(kafka.bootstrap, topics.prefix, PIPELINE_CONFIG=str(config), CT_ID="x")
    log = tmp_path / "poll.log"
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pipeline", "poll", "contacts", cwd=REPO, env=env, stdout=out, stderr=out
        )
        deadline = time.monotonic() + 60
        while b"http_retry" not in log.read_bytes():
            assert time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.2)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 20)
    assert rc == 0, log.read_text()[-2000:]
    assert time.monotonic() - t0 < 10
    assert b"poll_interrupted" in log.read_bytes()
    cursors = CursorStore(kafka.bootstrap, topics.cursors)
    assert await cursors.read(ContactsPoller.CURSOR) is None


async def test_call_poller_publishes_changed_details_once_and_insights_once_cloudtalk_has_them(
    cloudtalk, kafka: KafkaIO, topics: Topics
):
    sim, root, client, http = cloudtalk
    spec = {"direction": "incoming", "internal_number": "+442012345678", "deliver": False}
    answered = await sim_post(
        http, root, "calls", {**spec, "status": "answered", "external_number": "+421905123456", "tags": ["Billing"]}
    )
    await sim_post(http, root, "calls", {**spec, "status": "missed", "external_number": "+447700900123"})
    call_id = answered["call_id"]
    producer = durable_producer(kafka.bootstrap, "test-poller-details")
    await producer.start()

    def ai_requests() -> list[str]:
        return [e.path for e in sim.log.entries if "/ai/calls/" in e.path]

    try:
        poller = CallHistoryPoller(
            client,
            producer,
            topics,
            CursorStore(kafka.bootstrap, topics.cursors),
            lag_s=0,
            overlap_s=600,
            initial_lookback_s=600,
            insights=True,
            insights_retry_s=1,
        )
        t = datetime.now(UTC) + timedelta(seconds=2)
        first = await poller.poll_once(t)
        # two calls, the answered one's details (its tag), and CloudTalk has no summary for it yet
        assert (first["published"], first["details"], first["insights_not_yet"]) == (2, 1, 1), first
        assert ai_requests() == [f"/api/ai/calls/{call_id}/summary"]
        # nothing changed: nothing published; the summary is not asked again before its retry time
        second = await poller.poll_once(t)
        assert (second["published"], second["details_changed"], second["insights_not_yet"]) == (0, 0, 0), second
        # an edit in Call History (no workflow) and CloudTalk's summary arrive
        await sim_post(http, root, f"calls/{call_id}/modify", {"tags": ["Billing", "VIP"], "deliver": False})
        await sim_post(http, root, f"calls/{call_id}/insights", {"summary": "Refund confirmed"})
        third = await poller.poll_once(t + timedelta(seconds=2))
        assert (third["details_changed"], third["insights_published"]) == (1, 1), third
        fourth = await poller.poll_once(t + timedelta(seconds=60))
        assert (fourth["published"], fourth["details_changed"], fourth["insights_published"]) == (0, 0, 0), fourth
        assert sorted(p.rsplit("/", 1)[1] for p in ai_requests()) == [
            "details-link",
            "smart-notes",
            "summary",
            "summary",
        ]
    finally:
        await producer.stop()
    records = await kafka.read_all(topics.raw_calls, expect=5, timeout=10)
    envs = [orjson.loads(r.value) for r in records]
    details = [e for e in envs if e["type"] == "call.modified"]
    assert [e["payload"].get("call_tags") for e in details[:2]] == [["Billing"], ["Billing", "VIP"]]
    assert details[2]["payload"]["summary"] == "Refund confirmed"
    # every version of the call's details shares the call's record key
    assert {r.key for r in records if f":{call_id}" in r.key.decode()} == {call_event_id(call_id).encode()}
