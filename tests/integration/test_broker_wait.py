"""Processors, sinks and pollers started while the broker cannot be reached.

They wait with capped backoff — one ``broker_unreachable`` line, not one per attempt — with
``/healthz`` alive and ``/readyz`` not ready; SIGTERM while waiting ends them at once with exit 0;
when the broker comes they become ready and process records without being restarted; and when it
goes away again SIGTERM still stops them at once with exit 0.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from devkit.localkafka import LocalKafka
from devkit.net import free_port
from devkit.sim.cloudtalk import CloudTalkSimSettings, running_cloudtalk_sim
from devkit.sim.kustomer import ALL_ROLES, KustomerSimSettings, running_kustomer_sim
from devkit.stack import Stack
from pipeline.kafka.topics import Topics, ensure_topics
from tests.e2e.conftest import SECRETS, SUPPORT_LINE, config_yaml, wait_for

pytestmark = pytest.mark.kafka

SERVICES = {
    "process-calls": ["process", "calls"],
    "sink-kustomer": ["sink", "kustomer"],
    "poll-calls": ["poll", "calls"],
}


def events(stack: Stack, name: str, event: str) -> int:
    """How many log lines of ``name`` are the event ``event``."""
    return stack.services[name].log_path.read_text(errors="replace").count(f'"event":"{event}"')


async def status(http: aiohttp.ClientSession, stack: Stack, name: str, path: str) -> int:
    async with http.get(f"http://127.0.0.1:{stack.services[name].env['METRICS_PORT']}{path}") as r:
        return r.status


async def assert_waiting(http: aiohttp.ClientSession, stack: Stack) -> None:
    """Every service logged that the broker is unreachable, is alive and not ready."""
    for name in SERVICES:
        await wait_for(lambda n=name: events(stack, n, "broker_unreachable") >= 1, 60, f"{name} to wait for the broker")
    await asyncio.sleep(3)  # several attempts (backoff at most 0.5 s here), still one line
    for name in SERVICES:
        assert stack.services[name].running, stack.tail(name)
        assert await status(http, stack, name, "/healthz") == 200
        assert await status(http, stack, name, "/readyz") == 503
        log = stack.services[name].log_path.read_text(errors="replace")
        assert log.count('"event":"broker_unreachable"') == 1, log[-3000:]
        assert "Unable connect to" not in log, "one line per state change, not one per attempt"


async def test_sigterm_while_waiting_for_the_broker_exits_at_once_with_0(tmp_path: Path):
    config = tmp_path / "integrations.yaml"
    config.write_text(config_yaml("http://127.0.0.1:1/api", "http://127.0.0.1:1"))
    stack = Stack(
        tmp_path,
        {
            "KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",  # nobody listens there
            "TOPIC_PREFIX": "wait-",
            "PIPELINE_CONFIG": str(config),
            "KAFKA_CONNECT_BACKOFF_MAX_S": "0.5",
            **SECRETS,
        },
    )
    try:
        for name, args in SERVICES.items():
            stack.add(name, args)
        async with aiohttp.ClientSession() as http:
            await assert_waiting(http, stack)
    finally:
        started = time.monotonic()
        codes = await asyncio.to_thread(stack.stop_all)
        took = time.monotonic() - started
    assert codes == {name: 0 for name in SERVICES}, {n: stack.tail(n) for n in SERVICES}
    assert took < 10, f"SIGTERM took {took:.1f}s"
    for name in SERVICES:
        assert events(stack, name, "broker_wait_stopped") == 1, stack.tail(name)


async def test_services_started_before_the_broker_become_ready_and_process_records_when_it_comes(tmp_path: Path):
    broker = LocalKafka.ephemeral(tmp_path / "kafka")
    topics = Topics("wait-")
    # the topics exist on the broker's disk, as they do when a broker is restarted
    await asyncio.to_thread(broker.up, quiet=True)
    await ensure_topics(broker.bootstrap, topics.specs())
    await asyncio.to_thread(broker.down, quiet=True)
    csettings = CloudTalkSimSettings(key_id=SECRETS["E2E_CT_ID"], key_secret=SECRETS["E2E_CT_SECRET"], rate_limit=6000)
    stack: Stack | None = None
    try:
        async with (
            running_kustomer_sim(KustomerSimSettings(), keys={SECRETS["E2E_K_KEY"]: ALL_ROLES}) as (ksim, k_url),
            running_cloudtalk_sim(csettings) as (csim, ct_api),
            aiohttp.ClientSession() as http,
        ):
            config = tmp_path / "integrations.yaml"
            config.write_text(config_yaml(ct_api, k_url))
            stack = Stack(
                tmp_path,
                {
                    "KAFKA_BOOTSTRAP": broker.bootstrap,
                    "TOPIC_PREFIX": topics.prefix,
                    "PIPELINE_CONFIG": str(config),
                    "KAFKA_CONNECT_BACKOFF_MAX_S": "0.5",
                    "CALLS_POLL_INITIAL_LOOKBACK_S": "1800",
                    **SECRETS,
                },
            )
            for name, args in SERVICES.items():
                stack.add(name, args)
            await assert_waiting(http, stack)

            # a call whose webhook never came: only the call-history poller finds it
            async with http.post(
                f"{ct_api.removesuffix('/api')}/_sim/calls",
                data=orjson.dumps(
                    {
                        "direction": "incoming",
                        "status": "answered",
                        "internal_number": SUPPORT_LINE,
                        "external_number": "+447700900123",
                        "deliver": False,
                    }
                ),
                headers={"Content-Type": "application/json"},
            ) as r:
                assert r.status < 300, await r.text()
                call = await r.json()

            await asyncio.to_thread(broker.up, quiet=True)
            back_at = time.monotonic()
            await stack.wait_ready(timeout=90)
            ready_s = time.monotonic() - back_at
            external_id = f"cloudtalk-call-{call['call_id']}"
            await wait_for(
                lambda: any(c["attributes"]["externalId"] == external_id for c in ksim.conversations.values()),
                90,
                "the polled call to reach Kustomer",
            )
            effect_s = time.monotonic() - back_at
            print(f"\nready {ready_s:.1f}s and first effect {effect_s:.1f}s after the broker answered")
            assert [c["attributes"]["externalId"] for c in ksim.conversations.values()] == [external_id]
            assert len(ksim.notes) == 1
            for name in SERVICES:
                assert events(stack, name, "broker_unreachable") == 1, stack.tail(name)
                assert events(stack, name, "broker_reachable") == 1, stack.tail(name)

            # the broker goes away again; SIGTERM still stops every service at once with exit 0
            await asyncio.to_thread(broker.down, quiet=True)
            await asyncio.sleep(3)
            started = time.monotonic()
            codes = await asyncio.to_thread(stack.stop_all)
            took = time.monotonic() - started
            assert codes == {name: 0 for name in SERVICES}, {n: stack.tail(n) for n in SERVICES}
            assert took < 10, f"SIGTERM with the broker away took {took:.1f}s"
    finally:
        if stack is not None:
            await asyncio.to_thread(stack.stop_all)
        await asyncio.to_thread(broker.down, quiet=True)
