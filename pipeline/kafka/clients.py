"""Kafka clients built in one place, and waiting for a broker that is not there yet.

Every producer, consumer and admin client of the product is built here (``tests/unit/
test_kafka_clients.py`` fails on any other construction site), so every one of them gets the
connection settings of :class:`~pipeline.core.settings.KafkaSecurity` — TLS with the broker's
certificate and host name verified, SASL login — from the environment (``KAFKA_SECURITY_PROTOCOL``,
``KAFKA_SASL_*``, ``KAFKA_SSL_*``), read when the client is built:

* :func:`new_producer`, :func:`new_consumer`, :func:`new_admin`: any aiokafka options;
* :func:`durable_producer` (idempotent, ``acks=all``), :func:`transactional_producer` (the loop's
  lanes), :func:`committed_reader` (``read_committed``, no group, manual offsets).

A client whose start fails while TLS or SASL is on asks the broker once more, directly, why: a
refused login, an untrusted or mismatched certificate, a mechanism the broker does not offer or a
failed TLS handshake is a wrong setting, not an outage, and becomes one :class:`KafkaSecurityError`
(a :class:`SettingsError`: one line, exit 2) instead of an endless wait for "the broker".

:func:`start_when_reachable` is how every service starts its Kafka clients: while the broker
cannot be reached it retries with capped exponential backoff (``KAFKA_CONNECT_BACKOFF_MAX_S``),
logs one line when the broker is unreachable and one when it is back — not one per attempt — and
gives up at once when the service is asked to stop. aiokafka's own lines about a broker it cannot
reach (each client retries every ~100 ms and logs every failure) are let through once per kind a
minute.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    NodeNotReadyError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)

from pipeline.core.observability import get_logger
from pipeline.core.settings import KafkaSecurity, SettingsError, env_float
from pipeline.kafka.partitioner import partitioner

log = get_logger(__name__)

T = TypeVar("T")

CONNECT_BACKOFF_MAX_S = 10.0
CONNECT_BACKOFF_FIRST_S = 0.5
DIAGNOSE_TIMEOUT_S = 10.0  # the direct connection that explains a failed start

# What "the broker cannot be reached (yet)" looks like when a client starts; anything else
# (a bad setting, an authorisation error) is a real error and is raised at once.
UNREACHABLE: tuple[type[BaseException], ...] = (
    KafkaConnectionError,
    KafkaTimeoutError,
    NodeNotReadyError,
    OSError,
    TimeoutError,
)


# --------------------------------------------------------------------------------------------
# Connection settings and the client factory
# --------------------------------------------------------------------------------------------


class KafkaSecurityError(SettingsError):
    """The broker refused the connection's security: the login, the certificate, the mechanism or
    the TLS handshake. A setting is wrong; waiting will not help."""


def connection_options(security: KafkaSecurity) -> dict[str, Any]:
    """The aiokafka options for ``security`` (the same for producers, consumers and admin clients)."""
    options: dict[str, Any] = {"security_protocol": security.protocol}
    if security.tls:
        options["ssl_context"] = security.ssl_context()
    if security.sasl:
        options["sasl_mechanism"] = security.sasl_mechanism
        options["sasl_plain_username"] = security.sasl_username
        options["sasl_plain_password"] = security.sasl_password
    return options


def _security(security: KafkaSecurity | None) -> KafkaSecurity:
    return KafkaSecurity.from_env() if security is None else security


def _is_security_failure(exc: BaseException) -> bool:
    if isinstance(exc, (SaslAuthenticationFailed, UnsupportedSaslMechanismError, ssl.SSLCertVerificationError)):
        return True
    # a connection closed in the middle of a handshake is an outage; any other TLS failure is not
    return isinstance(exc, ssl.SSLError) and not isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError))


_NAME_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


def _refusal(exc: BaseException, where: str, security: KafkaSecurity) -> KafkaSecurityError:
    if isinstance(exc, SaslAuthenticationFailed):
        return KafkaSecurityError(
            f"KAFKA_SASL_USERNAME/KAFKA_SASL_PASSWORD_FILE: the broker at {where} refused the "
            f"{security.sasl_mechanism} login of {security.sasl_username!r}: {exc}"
        )
    if isinstance(exc, UnsupportedSaslMechanismError):
        return KafkaSecurityError(f"KAFKA_SASL_MECHANISM: the broker at {where} does not accept it: {exc}")
    trust = security.ssl_ca_file or "the system's trusted CAs (KAFKA_SSL_CA_FILE is not set)"
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_code in _NAME_MISMATCH:
        return KafkaSecurityError(
            f"KAFKA_BOOTSTRAP: the certificate of the broker at {where} does not name {where.rsplit(':', 1)[0]}: "
            f"{exc.verify_message or exc} (connect by a name or address the certificate holds)"
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return KafkaSecurityError(
            f"KAFKA_SSL_CA_FILE: the certificate of the broker at {where} is not trusted: "
            f"{exc.verify_message or exc} (checked against {trust} and the host name {where.rsplit(':', 1)[0]})"
        )
    return KafkaSecurityError(
        f"KAFKA_SECURITY_PROTOCOL={security.protocol}: the TLS handshake with the broker at {where} failed: "
        f"{getattr(exc, 'reason', None) or exc} (is it a TLS listener? does it require a client certificate, "
        f"KAFKA_SSL_CERT_FILE?)"
    )


async def explain_refusal(bootstrap: str | list[str], security: KafkaSecurity) -> KafkaSecurityError | None:
    """Connect to each bootstrap broker directly (TLS handshake, SASL login); the first refusal that
    is about security, or None when a broker accepts or none answers (an outage, not a setting)."""
    for host, port, _ in collect_hosts(bootstrap, randomize=False):
        try:
            conn = await asyncio.wait_for(
                create_conn(
                    host,
                    port,
                    client_id="ctk-pipeline-check",
                    request_timeout_ms=int(DIAGNOSE_TIMEOUT_S * 1000),
                    **connection_options(security),
                ),
                DIAGNOSE_TIMEOUT_S,
            )
        except Exception as exc:  # noqa: BLE001 - classified below
            if _is_security_failure(exc):
                return _refusal(exc, f"{host}:{port}", security)
            continue
        conn.close()
        return None
    return None


async def _start_checked(
    start: Callable[[], Awaitable[None]], bootstrap: str | list[str], security: KafkaSecurity
) -> None:
    if security.protocol == "PLAINTEXT":
        await start()
        return
    _CHATTER.starting += 1
    try:
        await start()
    except UNREACHABLE:
        refused = await explain_refusal(bootstrap, security)
        if refused is not None:
            raise refused from None
        raise
    finally:
        _CHATTER.starting -= 1


_CONNECTION_OPTIONS = {
    "security_protocol",
    "ssl_context",
    "sasl_mechanism",
    "sasl_plain_username",
    "sasl_plain_password",
}


def _with_connection(options: dict[str, Any], security: KafkaSecurity | None) -> tuple[dict[str, Any], Any]:
    resolved = _security(security)
    if "bootstrap_servers" not in options:
        raise TypeError("bootstrap_servers is required")
    clash = sorted(set(options) & _CONNECTION_OPTIONS)
    if clash:
        raise TypeError(f"{', '.join(clash)}: connection settings come from KafkaSecurity, not from options")
    return {**options, **connection_options(resolved)}, (options["bootstrap_servers"], resolved)


class _Producer(AIOKafkaProducer):
    def __init__(self, security: KafkaSecurity | None, **options: Any) -> None:
        options, self._pipeline_connection = _with_connection(options, security)
        super().__init__(**options)

    async def start(self) -> None:
        await _start_checked(super().start, *self._pipeline_connection)


class _Consumer(AIOKafkaConsumer):
    def __init__(self, *topics: str, security: KafkaSecurity | None, **options: Any) -> None:
        options, self._pipeline_connection = _with_connection(options, security)
        super().__init__(*topics, **options)

    async def start(self) -> None:
        await _start_checked(super().start, *self._pipeline_connection)


class _Admin(AIOKafkaAdminClient):
    def __init__(self, security: KafkaSecurity | None, **options: Any) -> None:
        options, self._pipeline_connection = _with_connection(options, security)
        super().__init__(**options)

    async def start(self) -> None:
        await _start_checked(super().start, *self._pipeline_connection)


# new_producer, new_consumer and new_admin take exactly aiokafka's arguments (``bootstrap_servers``
# included) and add the connection settings: ``security``, by default read from the environment.


def new_producer(*, security: KafkaSecurity | None = None, **options: Any) -> AIOKafkaProducer:
    """``AIOKafkaProducer(**options)`` with the connection settings and the product's partitioner
    (the Java client's partitions, computed faster; ``partitioner=`` overrides it)."""
    options.setdefault("partitioner", partitioner)
    return _Producer(security, **options)


def new_consumer(*topics: str, security: KafkaSecurity | None = None, **options: Any) -> AIOKafkaConsumer:
    """``AIOKafkaConsumer(*topics, **options)`` with the connection settings."""
    return _Consumer(*topics, security=security, **options)


def new_admin(*, security: KafkaSecurity | None = None, **options: Any) -> AIOKafkaAdminClient:
    """``AIOKafkaAdminClient(**options)`` with the connection settings."""
    return _Admin(security, **options)


def durable_producer(
    bootstrap: str, client_id: str, linger_ms: int = 2, *, security: KafkaSecurity | None = None
) -> AIOKafkaProducer:
    """acks=all + idempotence: a send that resolves is stored on the broker."""
    return new_producer(
        bootstrap_servers=bootstrap,
        security=security,
        client_id=client_id,
        acks="all",
        enable_idempotence=True,
        linger_ms=linger_ms,
        request_timeout_ms=15_000,
        max_batch_size=256 * 1024,
    )


def transactional_producer(
    bootstrap: str,
    transactional_id: str,
    *,
    client_id: str,
    transaction_timeout_ms: int,
    security: KafkaSecurity | None = None,
    **options: Any,
) -> AIOKafkaProducer:
    """A transactional producer (idempotent, ``acks=all``): one per input partition of the loop."""
    return new_producer(
        bootstrap_servers=bootstrap,
        security=security,
        client_id=client_id,
        transactional_id=transactional_id,
        enable_idempotence=True,
        acks="all",
        transaction_timeout_ms=transaction_timeout_ms,
        **options,
    )


def committed_reader(bootstrap: str, *, security: KafkaSecurity | None = None, **options: Any) -> AIOKafkaConsumer:
    """A consumer that reads what transactions committed (``read_committed``), in no group, with
    offsets chosen by the caller (assign, seek): for bounded reads of a topic."""
    defaults: dict[str, Any] = {"group_id": None, "enable_auto_commit": False, "isolation_level": "read_committed"}
    return new_consumer(bootstrap_servers=bootstrap, security=security, **{**defaults, **options})


# --------------------------------------------------------------------------------------------
# Starting, stopping, waiting for the broker
# --------------------------------------------------------------------------------------------


def connect_backoff_from_env(env: Mapping[str, str] | None = None) -> float:
    """``KAFKA_CONNECT_BACKOFF_MAX_S``: the longest wait between two attempts to reach the broker."""
    return env_float(os.environ if env is None else env, "KAFKA_CONNECT_BACKOFF_MAX_S", CONNECT_BACKOFF_MAX_S, 0.1)


async def stop_quietly(client: Any) -> None:
    """Stop a client that may never have started; errors (and aiokafka's own cancelled tasks) are
    swallowed, a cancellation of the calling task is passed on."""
    try:
        await client.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
    except Exception:  # noqa: BLE001 - a client that failed to start may fail to stop
        pass


async def started(client: T) -> T:
    """``await client.start()``; a client that failed to start is stopped again (no leaked tasks)."""
    try:
        await client.start()  # type: ignore[attr-defined]
    except BaseException:
        await stop_quietly(client)
        raise
    return client


def _describe(exc: BaseException) -> str:
    text, name = str(exc), type(exc).__name__
    return text if text.startswith(name) else f"{name}: {text}"


# aiokafka's lines about a broker it cannot reach, by how they begin (the format string)
_BROKER_TROUBLE = (
    "Unable connect to",
    "Unable to update metadata",
    "Unable to request metadata",
    "Failed fetch messages from",
    "Failed fetch offsets from",
    "Group Coordinator Request failed",
    "Got error produce response",
    "Heartbeat failed",
    "Heartbeat send request failed",
    "Error sending HeartbeatRequest",
    "Marking the coordinator dead",
)
_AIOKAFKA_LOGGERS = (
    "aiokafka",  # aiokafka.client logs under this name
    "aiokafka.conn",
    "aiokafka.consumer.fetcher",
    "aiokafka.consumer.group_coordinator",
    "aiokafka.producer.sender",
)


class _BrokerChatter(logging.Filter):
    """aiokafka retries a broker it lost about every 100 ms in every client (a processor with six
    lanes has seven) and logs each failure: thousands of lines a minute while the broker is away.
    The first line of each kind passes, then one a minute. While a service waits for the broker
    (:func:`start_when_reachable`) none passes: the wait says it in one line. While a client with
    TLS or SASL starts, a bootstrap broker's refused login or handshake does not pass: the failed
    start says it (a refusal by a broker found later, through metadata, is let through)."""

    every_s = 60.0

    def __init__(self) -> None:
        super().__init__()
        self.waiting = 0
        self.starting = 0  # clients with TLS or SASL starting: a refusal is said by their start
        self._last: dict[tuple[str, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        kind = next((k for k in _BROKER_TROUBLE if msg.startswith(k)), None)
        if kind is None:
            return True
        if self.waiting:
            return False
        if self.starting and msg == _BOOTSTRAP_FAILED and any(_is_security_failure(a) for a in _exceptions(record)):
            return False
        now, key = time.monotonic(), (record.name, kind)
        last = self._last.get(key)
        if last is not None and now - last < self.every_s:
            return False
        self._last[key] = now
        return True


_BOOTSTRAP_FAILED = 'Unable connect to "%s:%s": %s'  # what the failed start explains (not a later node's)


def _exceptions(record: logging.LogRecord) -> list[BaseException]:
    args = record.args if isinstance(record.args, tuple) else ()
    return [a for a in args if isinstance(a, BaseException)]


_CHATTER = _BrokerChatter()
for _name in _AIOKAFKA_LOGGERS:
    logging.getLogger(_name).addFilter(_CHATTER)


async def start_when_reachable(
    attempt: Callable[[], Awaitable[T]],
    *,
    bootstrap: str,
    what: str,
    stopping: asyncio.Event | None = None,
    backoff_max_s: float = CONNECT_BACKOFF_MAX_S,
) -> T | None:
    """Run ``attempt`` (build and start a client, e.g. ``lambda: started(consumer_factory())``)
    until the broker answers; None when ``stopping`` is set first.

    Between attempts: 0.5 s doubling up to ``backoff_max_s``, with jitter. One ``broker_unreachable``
    line when the first attempt fails, one ``broker_reachable`` line when an attempt succeeds after
    that; nothing per attempt. An error that is not about reaching the broker is raised.
    """
    stop = stopping or asyncio.Event()
    delay = min(CONNECT_BACKOFF_FIRST_S, backoff_max_s)
    attempts = 0
    since: float | None = None
    _CHATTER.waiting += 1
    try:
        while not stop.is_set():
            attempts += 1
            task = asyncio.ensure_future(attempt())
            stopper = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
            if not task.done():  # asked to stop in the middle of an attempt
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                break
            try:
                client = task.result()
            except UNREACHABLE as exc:
                if since is None:
                    since = time.monotonic()
                    log.warning(
                        "broker_unreachable",
                        bootstrap=bootstrap,
                        waiting=what,
                        error=_describe(exc),
                        backoff_max_s=backoff_max_s,
                    )
                try:
                    await asyncio.wait_for(stop.wait(), delay * random.uniform(0.8, 1.0))
                except TimeoutError:
                    pass
                delay = min(delay * 2, backoff_max_s)
                continue
            if since is not None:
                log.info(
                    "broker_reachable",
                    bootstrap=bootstrap,
                    waiting=what,
                    waited_s=round(time.monotonic() - since, 1),
                    attempts=attempts,
                )
            return client
        if since is not None:
            log.info("broker_wait_stopped", bootstrap=bootstrap, waiting=what, attempts=attempts)
        return None
    finally:
        _CHATTER.waiting -= 1
