"""The Kafka client factory: every client is built in pipeline/kafka/clients.py, with the connection
settings (KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_*, KAFKA_SSL_*) read and checked from the environment;
a bad setting is one SettingsError naming the variable. No broker here: tests/integration/
test_kafka_security.py runs the same settings against a SASL_SSL listener."""

from __future__ import annotations

import logging
import os
import re
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed

from devkit.net import free_port
from devkit.tls import make_ca
from pipeline.core.settings import KafkaSecurity, KafkaSettings, SettingsError
from pipeline.kafka import clients
from pipeline.kafka.clients import (
    KafkaSecurityError,
    committed_reader,
    connection_options,
    durable_producer,
    explain_refusal,
    new_admin,
    new_consumer,
    new_producer,
    transactional_producer,
)
from pipeline.kafka.loop import LoopSettings
from tests.conftest import REPO

CONSTRUCTION = re.compile(r"\bAIOKafka(Producer|Consumer|AdminClient)\s*\(")
ALIASED = re.compile(r"\bAIOKafka(Producer|Consumer|AdminClient)\s+as\b")


def _sources(*roots: str) -> list[Path]:
    return [p for root in roots for p in sorted((REPO / root).rglob("*.py"))]


def test_every_kafka_client_is_built_by_the_factory():
    """A client built anywhere else would connect without TLS or SASL: grep the product, the
    development kit, the benchmarks and the test harnesses for aiokafka constructors (and aliases
    of them)."""
    factory = REPO / "pipeline" / "kafka" / "clients.py"
    found = []
    for path in [*_sources("pipeline", "devkit", "bench"), *sorted((REPO / "tests").rglob("conftest.py"))]:
        if path == factory:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if CONSTRUCTION.search(line) or ALIASED.search(line):
                found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "build Kafka clients with pipeline.kafka.clients (new_producer, new_consumer, ...):\n" + (
        "\n".join(found)
    )


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    ca = make_ca(tmp_path / "ca")
    (tmp_path / "user").write_text("svc-pipeline\n")
    (tmp_path / "password").write_text("s3cret pass\n")
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "not-pem").write_text("hello\n")
    return {
        "ca": str(ca.cert),
        "ca_key": str(ca.key),
        "user": str(tmp_path / "user"),
        "password": str(tmp_path / "password"),
        "empty": str(tmp_path / "empty"),
        "not_pem": str(tmp_path / "not-pem"),
        "missing": str(tmp_path / "missing"),
    }


def sasl_ssl(files: dict[str, str], **extra: str) -> dict[str, str]:
    env = {
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME_FILE": files["user"],
        "KAFKA_SASL_PASSWORD_FILE": files["password"],
        "KAFKA_SSL_CA_FILE": files["ca"],
    }
    env.update(extra)
    return {k: v for k, v in env.items() if v != "-"}  # "-": leave the variable out


def test_plaintext_by_default():
    security = KafkaSecurity.from_env({})
    assert security == KafkaSecurity() and not security.tls and not security.sasl
    assert connection_options(security) == {"security_protocol": "PLAINTEXT"}
    assert KafkaSettings.from_env({}).security == KafkaSecurity()


def test_sasl_ssl_reads_the_secret_files_and_verifies_the_broker(files: dict[str, str]):
    security = KafkaSecurity.from_env(sasl_ssl(files, KAFKA_SECURITY_PROTOCOL="sasl_ssl"))
    assert security.protocol == "SASL_SSL" and security.sasl_mechanism == "SCRAM-SHA-512"
    assert security.sasl_username == "svc-pipeline"
    assert security.sasl_password == "s3cret pass"  # the trailing line break is not part of it
    assert "s3cret" not in repr(security) and "s3cret" not in repr(KafkaSettings(security=security))
    assert "s3cret" not in security.describe()
    options = connection_options(security)
    context = options.pop("ssl_context")
    assert options == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "svc-pipeline",
        "sasl_plain_password": "s3cret pass",
    }
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname is True and context.verify_mode == ssl.CERT_REQUIRED
    assert context is security.ssl_context()  # one context per set of files, shared by every client


def test_the_username_may_come_from_the_environment(files: dict[str, str]):
    env = sasl_ssl(files, KAFKA_SASL_USERNAME_FILE="-", KAFKA_SASL_USERNAME="alice", KAFKA_SASL_MECHANISM="PLAIN")
    security = KafkaSecurity.from_env(env)
    assert security.sasl_username == "alice" and security.sasl_mechanism == "PLAIN"


def test_ssl_with_a_client_certificate(files: dict[str, str]):
    env = {
        "KAFKA_SECURITY_PROTOCOL": "SSL",
        "KAFKA_SSL_CA_FILE": files["ca"],
        "KAFKA_SSL_CERT_FILE": files["ca"],  # any certificate and its key will do here
        "KAFKA_SSL_KEY_FILE": files["ca_key"],
    }
    security = KafkaSecurity.from_env(env)
    assert security.tls and not security.sasl
    assert set(connection_options(security)) == {"security_protocol", "ssl_context"}


def test_system_trust_store_when_no_ca_file_is_given():
    security = KafkaSecurity.from_env({"KAFKA_SECURITY_PROTOCOL": "SSL"})
    context = security.ssl_context()
    assert context is not None and context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED


BAD = [
    ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, r"^KAFKA_SECURITY_PROTOCOL: expected one of PLAINTEXT, SSL, SASL_PLAINTEXT, "),
    ({"KAFKA_SASL_MECHANISM": "-"}, r"^KAFKA_SASL_MECHANISM: required with KAFKA_SECURITY_PROTOCOL=SASL_SSL"),
    ({"KAFKA_SASL_MECHANISM": "GSSAPI"}, r"^KAFKA_SASL_MECHANISM: expected one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"),
    ({"KAFKA_SASL_USERNAME_FILE": "-"}, r"^KAFKA_SASL_USERNAME_FILE \(or KAFKA_SASL_USERNAME\): required"),
    ({"KAFKA_SASL_USERNAME": "bob"}, r"^KAFKA_SASL_USERNAME and KAFKA_SASL_USERNAME_FILE are both set"),
    ({"KAFKA_SASL_PASSWORD_FILE": "-"}, r"^KAFKA_SASL_PASSWORD_FILE: required with KAFKA_SECURITY_PROTOCOL=SASL_SSL"),
    ({"KAFKA_SASL_PASSWORD_FILE": "{missing}"}, r"^KAFKA_SASL_PASSWORD_FILE: cannot read .*missing: No such file"),
    ({"KAFKA_SASL_PASSWORD_FILE": "{empty}"}, r"^KAFKA_SASL_PASSWORD_FILE: .*empty is empty"),
    ({"KAFKA_SASL_PASSWORD": "hunter2"}, r"^KAFKA_SASL_PASSWORD: the password is read only from a file"),
    ({"KAFKA_SSL_CA_FILE": "{missing}"}, r"^KAFKA_SSL_CA_FILE: cannot read .*missing: No such file"),
    ({"KAFKA_SSL_CA_FILE": "{not_pem}"}, r"^KAFKA_SSL_CA_FILE: .*not-pem holds no usable PEM certificate"),
    ({"KAFKA_SSL_KEY_FILE": "{ca_key}"}, r"^KAFKA_SSL_KEY_FILE is set without KAFKA_SSL_CERT_FILE"),
    ({"KAFKA_SSL_CERT_FILE": "{not_pem}"}, r"^KAFKA_SSL_CERT_FILE/KAFKA_SSL_KEY_FILE: .*not a usable PEM"),
    (
        {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"},  # a CA file without TLS: a protocol forgotten
        r"^KAFKA_SSL_CA_FILE is set but KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT does not use TLS",
    ),
    (
        {"KAFKA_SECURITY_PROTOCOL": "SSL"},
        r"^KAFKA_SASL_MECHANISM is set but KAFKA_SECURITY_PROTOCOL=SSL does not log in with SASL",
    ),
    (
        {"KAFKA_SECURITY_PROTOCOL": "-"},  # PLAINTEXT by default, and SASL settings given
        r"^KAFKA_SASL_MECHANISM is set but KAFKA_SECURITY_PROTOCOL=PLAINTEXT",
    ),
]


@pytest.mark.parametrize(("change", "says"), BAD)
def test_a_bad_setting_is_one_error_naming_the_variable(files: dict[str, str], change: dict[str, str], says: str):
    env = sasl_ssl(files, **{k: v.format(**files) for k, v in change.items()})
    with pytest.raises(SettingsError) as err:
        KafkaSettings.from_env(env)
    message = str(err.value)
    assert re.search(says, message), message
    assert "\n" not in message and "hunter2" not in message and "s3cret" not in message


def test_a_bad_setting_stops_a_command_with_one_line():
    env = {"PATH": "/usr/bin:/bin", "KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_USERNAME": "svc"}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "topics", "ensure"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert re.fullmatch(r"pipeline( topics)?: configuration error: (.*)", line), line
    assert line.endswith(
        ": KAFKA_SASL_MECHANISM: required with KAFKA_SECURITY_PROTOCOL=SASL_SSL; "
        "one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"
    )


# --------------------------------------------------------------------------------------------
# the factory
# --------------------------------------------------------------------------------------------


async def test_every_kind_of_client_gets_the_connection_settings(files: dict[str, str]):
    security = KafkaSecurity.from_env(sasl_ssl(files))
    built = {
        "producer": new_producer(bootstrap_servers="b:1", security=security),
        "durable": durable_producer("b:1", "c", security=security),
        "transactional": transactional_producer(
            "b:1", "g.t.0", client_id="c", transaction_timeout_ms=60_000, security=security
        ),
        "consumer": new_consumer("t", bootstrap_servers="b:1", security=security, group_id="g"),
        "reader": committed_reader("b:1", security=security),
        "admin": new_admin(bootstrap_servers="b:1", security=security),
    }
    for name, client in built.items():
        inner = client.client if name in ("producer", "durable", "transactional") else client._client  # noqa: SLF001
        assert inner._security_protocol == "SASL_SSL", name  # noqa: SLF001
        assert inner._ssl_context is security.ssl_context(), name  # noqa: SLF001
        assert inner._sasl_mechanism == "SCRAM-SHA-512", name  # noqa: SLF001
        assert inner._sasl_plain_password == "s3cret pass", name  # noqa: SLF001
    assert built["transactional"]._txn_manager.transactional_id == "g.t.0"  # noqa: SLF001
    reader = built["reader"]
    assert reader._group_id is None and reader._isolation_level == "read_committed"  # noqa: SLF001
    assert not reader._enable_auto_commit  # noqa: SLF001


async def test_the_settings_default_to_the_environment(files: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    for name, value in sasl_ssl(files).items():
        monkeypatch.setenv(name, value)
    producer = durable_producer("b:1", "c")
    assert producer.client._security_protocol == "SASL_SSL"  # noqa: SLF001
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "TLS")
    with pytest.raises(SettingsError, match="KAFKA_SECURITY_PROTOCOL"):
        committed_reader("b:1")


async def test_connection_settings_are_not_options():
    with pytest.raises(TypeError, match="security_protocol"):
        new_producer(bootstrap_servers="b:1", security=KafkaSecurity(), security_protocol="SSL")


async def test_an_unreachable_secured_broker_is_an_outage_not_a_setting(files: dict[str, str]):
    """Nothing listens: the start fails as an outage does (start_when_reachable waits for it)."""
    security = KafkaSecurity.from_env(sasl_ssl(files))
    bootstrap = f"127.0.0.1:{free_port()}"
    assert await explain_refusal(bootstrap, security) is None
    consumer = committed_reader(bootstrap, security=security, request_timeout_ms=2000)
    with pytest.raises(KafkaConnectionError):
        await clients.started(consumer)


def test_which_failures_are_settings():
    assert clients._is_security_failure(SaslAuthenticationFailed("bad credentials"))  # noqa: SLF001
    assert clients._is_security_failure(ssl.SSLCertVerificationError(1, "certificate verify failed"))  # noqa: SLF001
    assert clients._is_security_failure(ssl.SSLError(1, "TLSV13_ALERT_CERTIFICATE_REQUIRED"))  # noqa: SLF001
    assert not clients._is_security_failure(ssl.SSLEOFError(8, "EOF in violation of protocol"))  # noqa: SLF001
    assert not clients._is_security_failure(ConnectionRefusedError(111, "refused"))  # noqa: SLF001
    assert not clients._is_security_failure(KafkaConnectionError("closed"))  # noqa: SLF001
    assert issubclass(KafkaSecurityError, SettingsError)  # the CLI's one line, exit 2


def test_aiokafka_lines_about_a_refusal_give_way_to_the_failed_start():
    chatter = clients._BrokerChatter()  # noqa: SLF001

    def record(err: BaseException) -> logging.LogRecord:
        return logging.LogRecord("aiokafka", logging.ERROR, "", 0, 'Unable connect to "%s:%s": %s', ("h", 1, err), None)

    refused = SaslAuthenticationFailed("bad credentials")
    assert chatter.filter(record(refused))  # a running client's reconnection: said (once a minute)
    starting = clients._BrokerChatter()  # noqa: SLF001
    starting.starting = 1
    assert not starting.filter(record(refused))  # a starting client raises it as one line instead
    assert starting.filter(record(ConnectionRefusedError(111, "refused")))  # an outage is said as before
    node = logging.LogRecord(
        "aiokafka", logging.ERROR, "", 0, "Unable connect to node with id %s: %s", (2, refused), None
    )
    fresh = clients._BrokerChatter()  # noqa: SLF001
    fresh.starting = 1
    assert fresh.filter(node)  # a broker found through metadata: no start explains it, so it is said


def test_a_refusal_names_the_setting_to_change(files: dict[str, str]):
    security = KafkaSecurity.from_env(sasl_ssl(files))
    untrusted = ssl.SSLCertVerificationError(1, "certificate verify failed")
    untrusted.verify_code, untrusted.verify_message = 19, "self-signed certificate in certificate chain"
    message = str(clients._refusal(untrusted, "kafka-1:9093", security))  # noqa: SLF001
    assert message.startswith("KAFKA_SSL_CA_FILE: the certificate of the broker at kafka-1:9093 is not trusted: self")
    mismatch = ssl.SSLCertVerificationError(1, "certificate verify failed")
    mismatch.verify_code, mismatch.verify_message = 62, "Hostname mismatch, certificate is not valid for 'kafka-1'."
    message = str(clients._refusal(mismatch, "kafka-1:9093", security))  # noqa: SLF001
    assert message.startswith("KAFKA_BOOTSTRAP: the certificate of the broker at kafka-1:9093 does not name kafka-1")
    login = SaslAuthenticationFailed("Authentication failed")
    message = str(clients._refusal(login, "kafka-1:9093", security))  # noqa: SLF001
    assert message.startswith(
        "KAFKA_SASL_USERNAME/KAFKA_SASL_PASSWORD_FILE: the broker at kafka-1:9093 refused the SCRAM-SHA-512 login "
        "of 'svc-pipeline'"
    )
    assert "s3cret" not in message


def test_the_loops_producer_scope_and_instance_come_from_the_environment():
    assert KafkaSettings.from_env({}).producers == "process"
    assert KafkaSettings.from_env({"LOOP_PRODUCERS": "Partition"}).producers == "partition"
    kafka = KafkaSettings.from_env({"LOOP_INSTANCE_ID": "sink-cloudtalk-0"})
    loop = LoopSettings.of(kafka, group_id="sink-cloudtalk", input_topics=("t",), deadletter_topic="d")
    assert (loop.producers, loop.process_transactional_id) == ("process", "sink-cloudtalk.sink-cloudtalk-0")
    # unset: host and process id, so two replicas on one host never share a transactional id
    unnamed = LoopSettings.of(KafkaSettings.from_env({}), group_id="g", input_topics=("t",), deadletter_topic="d")
    assert unnamed.process_transactional_id.endswith(f"-{os.getpid()}")


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"LOOP_PRODUCERS": "thread"}, "LOOP_PRODUCERS: expected one of partition, process, got 'thread'"),
        ({"LOOP_INSTANCE_ID": "pod 1"}, "LOOP_INSTANCE_ID: expected up to 100 letters"),
    ],
)
def test_a_bad_producer_setting_names_the_variable(env: dict[str, str], says: str):
    with pytest.raises(SettingsError, match=re.escape(says)):
        KafkaSettings.from_env(env)
