"""The pipeline on a secured broker: a SASL_SSL listener (TLS with a certificate for 127.0.0.1 signed
by a CA made with openssl, SCRAM-SHA-512 user created at format time) on a broker of this module's
own (``LocalKafka.ephemeral(..., sasl_ssl=True)``). Ingest publishes a webhook, ``pipeline copy``
runs the transactional loop, a sink's ledger is written and loaded again, and ``pipeline topics
ensure`` creates the catalogue — all over it, with nothing but the README's "Kafka security"
settings. A wrong password and an untrusted CA stop each command within seconds with one line
naming the setting (exit 2), not a traceback and not an endless wait for "the broker"."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiokafka import TopicPartition

from devkit.localkafka import LocalKafka
from devkit.net import free_port
from devkit.tls import make_ca
from pipeline.kafka.clients import new_admin, started, transactional_producer
from pipeline.kafka.lag import group_lag
from pipeline.kafka.loop import Lane
from pipeline.kafka.topics import CATALOGUE, Topics, ensure_topics
from pipeline.sink.ledger import DONE, STARTED, Ledger, LedgerEntry
from tests.conftest import REPO, KafkaIO, pipeline_env
from tests.integration.test_ingest_broker_restart import CONFIG
from tests.unit.test_envelope_schemas import CALL

pytestmark = pytest.mark.kafka

SECRET = "restart-webhook-secret"
REFUSED_WITHIN_S = 15.0  # a refusal is known at the first connection; this bounds the process's start too


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    broker = LocalKafka.ephemeral(tmp_path_factory.mktemp("kafka-sasl-ssl"), sasl_ssl=True)
    broker.up(quiet=True)
    yield broker
    broker.down(quiet=True)


@pytest.fixture
def sasl_env(secured: LocalKafka, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The client settings of the SASL_SSL listener, in this process's environment too (the
    factory reads them there, as a service does)."""
    env = secured.client_env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def service_env(secured: LocalKafka, prefix: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    config = tmp_path / "integrations.yaml"
    config.write_text(CONFIG)
    settings = {
        **secured.client_env(),
        "PIPELINE_CONFIG": str(config),
        "RESTART_CT_ID": "x",
        "RESTART_CT_SECRET": "x",
        "RESTART_K_KEY": "x",
        "RESTART_HOOK_SECRET": SECRET,
        "KAFKA_CONNECT_BACKOFF_MAX_S": "1",
        **extra,
    }
    return pipeline_env(settings.pop("KAFKA_BOOTSTRAP"), prefix, **settings)


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def stop(proc: subprocess.Popen, log: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-3000:]


# --------------------------------------------------------------------------------------------
# everything works over SASL_SSL
# --------------------------------------------------------------------------------------------


async def test_topics_ensure_over_sasl_ssl(secured: LocalKafka, sasl_env: dict[str, str], tmp_path: Path):
    prefix = "ensure-"
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "pipeline", "topics", "ensure"],
        cwd=REPO,
        env=service_env(secured, prefix, tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(CATALOGUE)} created, 0 unchanged, 0 differ" in result.stdout
    admin = await started(new_admin(bootstrap_servers=secured.sasl_ssl_bootstrap))
    try:
        described = await admin.describe_topics([s.name for s in Topics(prefix).specs()])
    finally:
        await admin.close()
    assert {t["topic"]: len(t["partitions"]) for t in described} == {
        s.name: s.partitions for s in Topics(prefix).specs()
    }


async def test_ingest_publishes_a_webhook_over_sasl_ssl(secured: LocalKafka, sasl_env: dict[str, str], tmp_path: Path):
    topics = Topics("ingest-")
    await ensure_topics(secured.sasl_ssl_bootstrap, topics.specs())
    port = free_port()
    log = tmp_path / "ingest.log"
    proc = spawn(["ingest", "--port", str(port)], service_env(secured, topics.prefix, tmp_path), log)
    try:
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            deadline = time.monotonic() + 30
            while True:  # ready = its producer started over SASL_SSL
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                try:
                    async with http.get(f"{url}/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
            headers = {"X-Pipeline-Secret": SECRET, "Content-Type": "application/json"}
            async with http.post(
                f"{url}/ingest/cloudtalk/support/call-ended", data=orjson.dumps(CALL), headers=headers
            ) as r:
                assert r.status == 202, await r.text()
        records = await KafkaIO(secured.sasl_ssl_bootstrap).read_all(topics.raw_calls, expect=1, timeout=15)
        assert [r.key for r in records] == [b"cloudtalk:call:1002409191"]
        assert orjson.loads(records[0].value)["payload"] == CALL
    finally:
        stop(proc, log)


async def test_the_transactional_loop_copies_over_sasl_ssl(
    secured: LocalKafka, sasl_env: dict[str, str], tmp_path: Path
):
    kafka = KafkaIO(secured.sasl_ssl_bootstrap)
    source = await kafka.create_topic("copy-source", partitions=2)
    destination = await kafka.create_topic("copy-destination", partitions=2)
    await kafka.create_topic("copy-deadletter")
    await kafka.produce(source, [(f"k{i}".encode(), f"v{i}".encode()) for i in range(40)])
    log = tmp_path / "copy.log"
    env = service_env(secured, "copy-", tmp_path)
    proc = spawn(["copy", source, destination, "--group", "copy-group", "--deadletter", "copy-deadletter"], env, log)
    try:
        records = await kafka.read_all(destination, expect=40, timeout=30)
        assert sorted(r.value for r in records) == sorted(f"v{i}".encode() for i in range(40)), log.read_text()[-3000:]
        # the offsets went into the same transactions: nothing is left for the group
        lag = await group_lag(secured.sasl_ssl_bootstrap, "copy-group", [source])
        assert sum(lag.values()) == 0
    finally:
        stop(proc, log)


async def test_a_sinks_ledger_round_trip_over_sasl_ssl(secured: LocalKafka, sasl_env: dict[str, str]):
    topics = Topics("ledger-")
    await ensure_topics(secured.sasl_ssl_bootstrap, topics.specs())
    topic = topics.kustomer_ledger
    tid = f"sink-kustomer.{topics.kustomer_commands}.3"
    producer = await started(
        transactional_producer(secured.sasl_ssl_bootstrap, tid, client_id="test-ledger", transaction_timeout_ms=60_000)
    )
    written = Ledger(secured.sasl_ssl_bootstrap, topic)
    entries = {
        0: [LedgerEntry("support|cloudtalk:call:1", DONE, steps={"customer": "c1", "note": "n1"}, outcome="done")],
        3: [LedgerEntry("support|cloudtalk:call:2", STARTED), LedgerEntry("support|cloudtalk:sms:3", DONE)],
    }
    try:
        # as a sink records its intents: a transaction of their own on the partition's producer
        await Lane(TopicPartition(topic, 3), producer, tid).publish(
            [written.record(p, e) for p, es in entries.items() for e in es]
        )
    finally:
        await producer.stop()
    loaded = Ledger(secured.sasl_ssl_bootstrap, topic)
    assert await loaded.load([0, 3]) == {0: 1, 3: 2}
    for partition, es in entries.items():
        for e in es:
            got = loaded.get(partition, e.command_id)
            assert got is not None and (got.state, got.steps, got.outcome) == (e.state, e.steps, e.outcome)


# --------------------------------------------------------------------------------------------
# a wrong password, an untrusted CA: one line, at once
# --------------------------------------------------------------------------------------------


COMMANDS = {
    "topics ensure": ["topics", "ensure"],
    "copy (the transactional loop)": ["copy", "refused-source", "refused-destination", "--group", "refused"],
    "ingest": ["ingest", "--port", "0"],
}
REFUSALS = {
    "wrong password": (
        r"KAFKA_SASL_USERNAME/KAFKA_SASL_PASSWORD_FILE: the broker at 127\.0\.0\.1:\d+ refused the SCRAM-SHA-512 "
        r"login of 'pipeline': .*SaslAuthenticationFailed: .*"
    ),
    "untrusted CA": (
        r"KAFKA_SSL_CA_FILE: the certificate of the broker at 127\.0\.0\.1:\d+ is not trusted: .*"
        r"\(checked against .*other-ca\.pem and the host name 127\.0\.0\.1\)"
    ),
}


@pytest.mark.parametrize("refusal", sorted(REFUSALS))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_refused_connection_stops_the_command_with_one_line(
    secured: LocalKafka, tmp_path: Path, command: str, refusal: str
):
    if refusal == "wrong password":
        wrong = tmp_path / "wrong-password"
        wrong.write_text("not-the-password\n")
        extra = {"KAFKA_SASL_PASSWORD_FILE": str(wrong)}
    else:
        extra = {"KAFKA_SSL_CA_FILE": str(make_ca(tmp_path, "other-ca", "some other CA").cert)}
    env = service_env(secured, "refused-", tmp_path, **extra)
    began = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", *COMMANDS[command]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    took = time.monotonic() - began
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert took < REFUSED_WITHIN_S, f"{took:.1f} s\n{output}"
    assert "Traceback" not in output
    assert "broker_unreachable" not in output  # a wrong setting is not waited out as an outage
    lines = result.stderr.splitlines()
    # services log JSON lines on stderr; the last line is the one for a person
    assert re.fullmatch(r"pipeline( [\w-]+)?: configuration error: " + REFUSALS[refusal], lines[-1]), output
    plain = [line for line in lines if not line.startswith("{")]
    assert plain == lines[-1:], output
    assert "not-the-password" not in output
    assert os.path.basename(str(secured.sasl_password_file)) not in result.stdout
