"""Ingest survives a broker restart without being restarted itself.

A broker of its own (free ports, its own data directory), ``pipeline ingest`` as a separate
process, webhooks sent the whole time by clients that retry a 503 as CloudTalk would. The broker
is killed (SIGKILL), stays away ~10 s (or 35 s: longer than ingest waits for an acknowledgement
before it replaces its producer) and is started again on the same ports and data directory.
Ingest must answer 202 again within seconds, ``/readyz`` must say 503 while it cannot store and
200 again afterwards, and the raw topic must hold every acknowledged event: an event answered 202
at its first attempt exactly once, an event that got a 503 first (the client sent it again) once
or more, every copy with the same event id.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path

import aiohttp
import orjson
import pytest

from devkit.localkafka import LocalKafka
from devkit.net import free_port
from devkit.stack import Stack
from pipeline.ingest.base import STALLED_AFTER_S
from pipeline.kafka.topics import Topics, ensure_topics
from tests.conftest import KafkaIO
from tests.unit.test_envelope_schemas import CALL

pytestmark = pytest.mark.kafka

SECRET = "restart-webhook-secret"

CONFIG = """
cloudtalk:
  base_url: http://127.0.0.1:1/api
  key_id: {env: RESTART_CT_ID}
  key_secret: {env: RESTART_CT_SECRET}
integrations:
  - name: support
    active: true
    kustomer: {base_url: "http://127.0.0.1:1", org_name: acme, api_key: {env: RESTART_K_KEY}}
    cloudtalk_webhook_secret: {env: RESTART_HOOK_SECRET}
"""


def kill_broker(broker: LocalKafka) -> None:
    pid = broker.pid()
    assert pid is not None, "the broker is not running"
    os.kill(pid, signal.SIGKILL)
    try:
        os.waitpid(pid, 0)  # our child (started by LocalKafka.up in this process): reap it
    except ChildProcessError:
        while broker.pid() is not None:
            time.sleep(0.1)
    broker.pid_file.unlink(missing_ok=True)


async def wait_for_port(broker: LocalKafka) -> float:
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", broker.port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return time.monotonic()


@pytest.mark.parametrize(
    "outage_s",
    [
        pytest.param(10, id="10s"),
        # longer than STALLED_AFTER_S: ingest replaces its producer while the broker is away
        pytest.param(35, id="35s-producer-replaced"),
    ],
)
async def test_ingest_recovers_after_the_broker_is_killed_and_started_again(tmp_path: Path, outage_s: int):
    broker = LocalKafka.ephemeral(tmp_path / "kafka")
    await asyncio.to_thread(broker.up, quiet=True)
    stack: Stack | None = None
    try:
        topics = Topics("restart-")
        await ensure_topics(broker.bootstrap, topics.specs())
        config = tmp_path / "integrations.yaml"
        config.write_text(CONFIG)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        stack = Stack(
            tmp_path,
            {
                "KAFKA_BOOTSTRAP": broker.bootstrap,
                "TOPIC_PREFIX": topics.prefix,
                "PIPELINE_CONFIG": str(config),
                "LOG_LEVEL": "INFO",
                "RESTART_CT_ID": "x",
                "RESTART_CT_SECRET": "x",
                "RESTART_K_KEY": "x",
                "RESTART_HOOK_SECRET": SECRET,
                "INGEST_ACK_TIMEOUT_S": "2",
                "INGEST_RETRY_AFTER_S": "1",
            },
        )
        stack.add("ingest", ["ingest", "--port", str(port)], health=f"{url}/readyz")
        await stack.wait_ready(timeout=60)

        first_status: dict[int, int] = {}  # call id -> status of its first attempt
        accepted_at: dict[int, float] = {}  # call id -> when it was answered 202
        statuses: list[tuple[float, int]] = []  # (when, status) of every answer
        ready: list[tuple[float, int]] = []  # (when, /readyz status)
        stop_sending = asyncio.Event()
        next_id = iter(range(5_000_000, 6_000_000))

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:

            async def deliver(call_id: int) -> None:
                body = orjson.dumps({**CALL, "call_id": call_id})
                headers = {"X-Pipeline-Secret": SECRET, "Content-Type": "application/json"}
                while True:
                    try:
                        async with http.post(
                            f"{url}/ingest/cloudtalk/support/call-ended", data=body, headers=headers
                        ) as r:
                            await r.read()
                            status = r.status
                    except (aiohttp.ClientError, TimeoutError):
                        status = 0  # no answer: the sender keeps the event and sends it again
                    first_status.setdefault(call_id, status)
                    statuses.append((time.monotonic(), status))
                    if status == 202:
                        accepted_at[call_id] = time.monotonic()
                        return
                    assert status in (0, 503), status
                    await asyncio.sleep(0.3)

            async def sender() -> None:
                while not stop_sending.is_set():
                    await deliver(next(next_id))
                    await asyncio.sleep(0.05)

            async def watch_ready() -> None:
                while not stop_sending.is_set():
                    try:
                        async with http.get(f"{url}/readyz") as r:
                            ready.append((time.monotonic(), r.status))
                    except (aiohttp.ClientError, TimeoutError):
                        ready.append((time.monotonic(), 0))
                    await asyncio.sleep(0.2)

            tasks = [asyncio.create_task(sender()) for _ in range(4)] + [asyncio.create_task(watch_ready())]
            await asyncio.sleep(3)
            before = len(accepted_at)
            assert before > 20, f"only {before} webhooks were accepted before the outage"

            killed_at = time.monotonic()
            await asyncio.to_thread(kill_broker, broker)
            await asyncio.sleep(outage_s)

            restart_at = time.monotonic()
            port_open = asyncio.create_task(wait_for_port(broker))
            await asyncio.to_thread(broker.up, quiet=True)  # same ports, same data directory
            up_at = time.monotonic()
            back_at = await port_open  # the broker is back when its port takes connections again
            deadline = back_at + 60
            while time.monotonic() < deadline:
                if any(s == 202 for t, s in statuses if t > back_at):
                    break
                await asyncio.sleep(0.1)
            first_202 = min((t for t, s in statuses if t > back_at and s == 202), default=None)
            settled = False
            if first_202 is not None:  # keep sending until 10 answers in a row are 202 (at most 30 s)
                settle_deadline = time.monotonic() + 30
                while time.monotonic() < settle_deadline:
                    recent = [s for t, s in statuses if t > first_202][-10:]
                    if len(recent) == 10 and all(s == 202 for s in recent):
                        settled = True
                        break
                    await asyncio.sleep(0.2)
            stop_sending.set()
            done, pending = await asyncio.wait(tasks, timeout=30)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        log = stack.services["ingest"].log_path
        down = [s for t, s in statuses if killed_at + 3 < t < restart_at]
        assert 202 not in down, "202 while the broker was down"
        assert any(s == 503 for t, s in ready if killed_at + 3 < t < restart_at), (
            "/readyz said ready while the broker was down"
        )
        assert first_202 is not None, f"no 202 within 60 s after the broker returned; see {log}"
        recovery_s = first_202 - back_at
        ready_again = min((t for t, s in ready if t > back_at and s == 200), default=None)
        assert ready_again is not None, "/readyz never said ready again"
        after = [s for t, s in statuses if t > first_202]
        assert settled, f"ingest kept refusing after the recovery: {Counter(after)}"

        records = await KafkaIO(broker.bootstrap).read_all(topics.raw_calls, expect=len(accepted_at), timeout=30)
        copies = Counter(orjson.loads(r.value)["payload"]["call_id"] for r in records)
        assert all(r.key == f"cloudtalk:call:{orjson.loads(r.value)['payload']['call_id']}".encode() for r in records)
        assert set(copies) == set(accepted_at), "the topic and the 202 answers disagree"
        clean = [c for c, s in first_status.items() if s == 202]
        assert all(copies[c] == 1 for c in clean), {c: copies[c] for c in clean if copies[c] != 1}
        retried = [c for c, s in first_status.items() if s != 202]
        duplicated = {c: n for c, n in copies.items() if n > 1}
        replaced = "producer_replaced" in log.read_text()
        print(
            f"\nbroker restart: {len(accepted_at)} webhooks accepted ({before} before the outage), "
            f"{len(retried)} answered 503 or unanswered first and sent again, "
            f"broker down {restart_at - killed_at:.1f} s, its port open again {back_at - restart_at:.1f} s after "
            f"the restart began (metadata answered {up_at - restart_at:.1f} s after); first 202 {recovery_s:.2f} s "
            f"after the port opened ({first_202 - up_at:+.2f} s from the metadata answer), /readyz 200 again "
            f"{ready_again - back_at:.2f} s after the port opened; copies in the topic: {sum(copies.values())} "
            f"(duplicated ids: {duplicated or 'none'}); producer replaced: {replaced}; "
            f"answers: {Counter(s for _, s in statuses)}"
        )
        assert replaced == (outage_s > STALLED_AFTER_S), "the producer is replaced exactly when it stalled"
        assert recovery_s < 15, f"ingest needed {recovery_s:.1f} s to store again after the broker returned"
    finally:
        if stack is not None:
            codes = await asyncio.to_thread(stack.stop_all)
            assert codes.get("ingest") in (0, -15, None), stack.tail("ingest")
        await asyncio.to_thread(broker.down, quiet=True)
