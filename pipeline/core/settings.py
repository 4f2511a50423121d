"""Service settings from environment variables, with documented defaults.

Every variable is listed in the README's configuration reference. A bad value raises
:class:`SettingsError` naming the variable and what it expected.
"""

from __future__ import annotations

import functools
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field


class SettingsError(ValueError):
    """A service setting is missing or malformed; the message names the variable."""


def _get(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name)
    return default if value is None or value == "" else value


def env_str(env: Mapping[str, str], name: str, default: str) -> str:
    return _get(env, name, default)


def env_int(
    env: Mapping[str, str], name: str, default: int, minimum: int | None = None, maximum: int | None = None
) -> int:
    raw = _get(env, name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}: expected an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name}: must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name}: must be <= {maximum}, got {value}")
    return value


def env_port(env: Mapping[str, str], name: str, default: int) -> int:
    """A TCP port to listen on: 0 (any free port) to 65535."""
    return env_int(env, name, default, minimum=0, maximum=65535)


def env_float(env: Mapping[str, str], name: str, default: float, minimum: float | None = None) -> float:
    raw = _get(env, name, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}: expected a number, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name}: must be >= {minimum}, got {value}")
    return value


_ON, _OFF = ("on", "true", "yes", "1"), ("off", "false", "no", "0")


def env_switch(env: Mapping[str, str], name: str, default: bool) -> bool:
    """``on``/``off`` (also true/false, yes/no, 1/0, any case); anything else is a SettingsError."""
    raw = _get(env, name, "on" if default else "off").strip().lower()
    if raw in _ON:
        return True
    if raw in _OFF:
        return False
    raise SettingsError(f"{name}: expected on or off, got {raw!r}")


def env_choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = _get(env, name, default).strip().lower()
    if raw not in choices:
        raise SettingsError(f"{name}: expected one of {', '.join(choices)}, got {raw!r}")
    return raw


_INSTANCE_ID = re.compile(r"[A-Za-z0-9._-]{1,100}")


def env_instance_id(env: Mapping[str, str], name: str) -> str:
    """A name for this process among its stage's replicas ("" when unset): letters, digits, ``._-``."""
    raw = _get(env, name, "").strip()
    if raw and not _INSTANCE_ID.fullmatch(raw):
        raise SettingsError(f"{name}: expected up to 100 letters, digits, '.', '_' or '-', got {raw!r}")
    return raw


PRODUCER_SCOPES = ("partition", "process")
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_SASL_VARS = ("KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME", "KAFKA_SASL_USERNAME_FILE", "KAFKA_SASL_PASSWORD_FILE")
_SSL_VARS = ("KAFKA_SSL_CA_FILE", "KAFKA_SSL_CERT_FILE", "KAFKA_SSL_KEY_FILE")


def _read_secret(name: str, path: str) -> str:
    """A secret file's content without its trailing line break; unreadable or empty: SettingsError."""
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().rstrip("\r\n")
    except OSError as exc:
        raise SettingsError(f"{name}: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{name}: {path} is not UTF-8 text") from None
    if not value:
        raise SettingsError(f"{name}: {path} is empty")
    return value


def _readable(name: str, path: str) -> str:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise SettingsError(f"{name}: cannot read {path}: {exc.strerror or exc}") from None
    return path


def _mtime(path: str | None) -> int:
    try:
        return os.stat(path).st_mtime_ns if path else 0
    except OSError:
        return -1


@functools.lru_cache(maxsize=8)
def _tls_context(
    ca_file: str | None, cert_file: str | None, key_file: str | None, _mtimes: tuple[int, ...]
) -> ssl.SSLContext:
    # one context per set of files (and their modification times): every client of a process shares it
    try:
        context = ssl.create_default_context(cafile=ca_file)  # ca_file None: the system's trusted CAs
    except (ssl.SSLError, OSError) as exc:
        raise SettingsError(f"KAFKA_SSL_CA_FILE: {ca_file} holds no usable PEM certificate ({exc})") from None
    context.check_hostname = True  # the defaults, said: the broker's name or IP must be in its certificate
    context.verify_mode = ssl.CERT_REQUIRED
    if cert_file:
        try:
            # an encrypted key fails here instead of prompting on a terminal the service does not have
            context.load_cert_chain(cert_file, key_file, password=lambda: b"")
        except (ssl.SSLError, OSError) as exc:
            raise SettingsError(
                f"KAFKA_SSL_CERT_FILE/KAFKA_SSL_KEY_FILE: {cert_file} (key {key_file or 'in the same file'}) is not "
                f"a usable PEM certificate and unencrypted private key ({exc})"
            ) from None
    return context


@dataclass(frozen=True)
class KafkaSecurity:
    """How clients authenticate to the broker and protect the connection (README "Kafka security").

    ``protocol`` is Kafka's ``security.protocol``. With SSL/SASL_SSL the broker's certificate is
    verified against ``ssl_ca_file`` (default: the system's trusted CAs) and its host name or IP;
    ``ssl_cert_file``/``ssl_key_file`` are a client certificate for brokers that ask for one.
    With SASL_* the client logs in with ``sasl_mechanism``, user and password; the password comes
    only from a file. Secret files are read when the settings are read (a client built later
    reads them again, so a rotated password reaches new connections).
    """

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_ca_file: str | None = None
    ssl_cert_file: str | None = None
    ssl_key_file: str | None = None

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def sasl(self) -> bool:
        return self.protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> KafkaSecurity:
        """The ``KAFKA_SECURITY_PROTOCOL``, ``KAFKA_SASL_*`` and ``KAFKA_SSL_*`` settings, checked:
        a setting the protocol does not use, a missing or unreadable file, SASL without mechanism
        or credentials, a password given in the environment — each is one :class:`SettingsError`."""
        env = os.environ if env is None else env
        raw = _get(env, "KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
        protocol = raw.strip().upper()
        if protocol not in SECURITY_PROTOCOLS:
            raise SettingsError(
                f"KAFKA_SECURITY_PROTOCOL: expected one of {', '.join(SECURITY_PROTOCOLS)}, got {raw!r}"
            )
        if _get(env, "KAFKA_SASL_PASSWORD", ""):
            raise SettingsError(
                "KAFKA_SASL_PASSWORD: the password is read only from a file; put it in a file readable by the "
                "service alone and set KAFKA_SASL_PASSWORD_FILE (then unset KAFKA_SASL_PASSWORD)"
            )

        def given(names: tuple[str, ...]) -> list[str]:
            return [n for n in names if _get(env, n, "")]

        sasl, tls = protocol.startswith("SASL_"), protocol.endswith("SSL")
        if not sasl and given(_SASL_VARS):
            raise SettingsError(
                f"{given(_SASL_VARS)[0]} is set but KAFKA_SECURITY_PROTOCOL={protocol} does not log in with SASL "
                f"(use SASL_SSL or SASL_PLAINTEXT, or unset it)"
            )
        if not tls and given(_SSL_VARS):
            raise SettingsError(
                f"{given(_SSL_VARS)[0]} is set but KAFKA_SECURITY_PROTOCOL={protocol} does not use TLS "
                f"(use SSL or SASL_SSL, or unset it)"
            )
        mechanism = username = password = None
        if sasl:
            raw_mechanism = _get(env, "KAFKA_SASL_MECHANISM", "")
            mechanism = raw_mechanism.strip().upper()
            if not mechanism:
                raise SettingsError(
                    f"KAFKA_SASL_MECHANISM: required with KAFKA_SECURITY_PROTOCOL={protocol}; "
                    f"one of {', '.join(SASL_MECHANISMS)}"
                )
            if mechanism not in SASL_MECHANISMS:
                raise SettingsError(
                    f"KAFKA_SASL_MECHANISM: expected one of {', '.join(SASL_MECHANISMS)}, got {raw_mechanism!r}"
                )
            user_file, user = _get(env, "KAFKA_SASL_USERNAME_FILE", ""), _get(env, "KAFKA_SASL_USERNAME", "")
            if user_file and user:
                raise SettingsError("KAFKA_SASL_USERNAME and KAFKA_SASL_USERNAME_FILE are both set; give one")
            if not user_file and not user:
                raise SettingsError(
                    "KAFKA_SASL_USERNAME_FILE (or KAFKA_SASL_USERNAME): required with "
                    f"KAFKA_SECURITY_PROTOCOL={protocol}"
                )
            username = _read_secret("KAFKA_SASL_USERNAME_FILE", user_file) if user_file else user
            password_file = _get(env, "KAFKA_SASL_PASSWORD_FILE", "")
            if not password_file:
                raise SettingsError(f"KAFKA_SASL_PASSWORD_FILE: required with KAFKA_SECURITY_PROTOCOL={protocol}")
            password = _read_secret("KAFKA_SASL_PASSWORD_FILE", password_file)
        ca = cert = key = None
        if tls:
            ca = _get(env, "KAFKA_SSL_CA_FILE", "") or None
            cert = _get(env, "KAFKA_SSL_CERT_FILE", "") or None
            key = _get(env, "KAFKA_SSL_KEY_FILE", "") or None
            if key and not cert:
                raise SettingsError("KAFKA_SSL_KEY_FILE is set without KAFKA_SSL_CERT_FILE (the client certificate)")
            for name, path in (("KAFKA_SSL_CA_FILE", ca), ("KAFKA_SSL_CERT_FILE", cert), ("KAFKA_SSL_KEY_FILE", key)):
                if path:
                    _readable(name, path)
        security = cls(protocol, mechanism, username, password, ca, cert, key)
        security.ssl_context()  # a file that is not PEM is said now, not at the first connection
        return security

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for SSL/SASL_SSL (None otherwise): the broker's certificate must chain to
        the CA file (or a system CA) and name the host the client connects to."""
        if not self.tls:
            return None
        files = (self.ssl_ca_file, self.ssl_cert_file, self.ssl_key_file)
        return _tls_context(*files, tuple(_mtime(f) for f in files))

    def describe(self) -> str:
        """For log lines and error messages; never the password."""
        text = self.protocol
        if self.sasl:
            text += f" {self.sasl_mechanism} as {self.sasl_username!r}"
        if self.tls:
            text += f", CA {self.ssl_ca_file or 'the system trust store'}"
            if self.ssl_cert_file:
                text += f", client certificate {self.ssl_cert_file}"
        return text


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap: str = "127.0.0.1:9092"
    topic_prefix: str = ""
    max_batch: int = 1000
    poll_timeout_ms: int = 200
    commit_interval_ms: int = 200
    commit_max_records: int = 1000
    transaction_timeout_ms: int = 60_000
    producers: str = "process"  # one transactional producer per "process", or per input "partition"
    instance_id: str = ""  # the process's part of its transactional id (producers=process); "": host-pid
    client_id: str = "ctk-pipeline"
    security: KafkaSecurity = field(default_factory=KafkaSecurity)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> KafkaSettings:
        env = os.environ if env is None else env
        return cls(
            bootstrap=env_str(env, "KAFKA_BOOTSTRAP", cls.bootstrap),
            topic_prefix=env_str(env, "TOPIC_PREFIX", cls.topic_prefix),
            max_batch=env_int(env, "LOOP_MAX_BATCH", cls.max_batch, minimum=1),
            poll_timeout_ms=env_int(env, "LOOP_POLL_TIMEOUT_MS", cls.poll_timeout_ms, minimum=1),
            commit_interval_ms=env_int(env, "LOOP_COMMIT_INTERVAL_MS", cls.commit_interval_ms, minimum=0),
            commit_max_records=env_int(env, "LOOP_COMMIT_MAX_RECORDS", cls.commit_max_records, minimum=1),
            transaction_timeout_ms=env_int(
                env, "KAFKA_TRANSACTION_TIMEOUT_MS", cls.transaction_timeout_ms, minimum=1000
            ),
            producers=env_choice(env, "LOOP_PRODUCERS", cls.producers, PRODUCER_SCOPES),
            instance_id=env_instance_id(env, "LOOP_INSTANCE_ID"),
            client_id=env_str(env, "KAFKA_CLIENT_ID", cls.client_id),
            security=KafkaSecurity.from_env(env),
        )


@dataclass(frozen=True)
class ServiceSettings:
    """What every service reads: broker, health port, log level, integrations file."""

    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    log_level: str = "INFO"
    config_path: str = "deploy/integrations.yaml"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServiceSettings:
        env = os.environ if env is None else env
        return cls(
            kafka=KafkaSettings.from_env(env),
            metrics_host=env_str(env, "METRICS_HOST", cls.metrics_host),
            metrics_port=env_port(env, "METRICS_PORT", cls.metrics_port),
            log_level=env_str(env, "LOG_LEVEL", cls.log_level).upper(),
            config_path=env_str(env, "PIPELINE_CONFIG", cls.config_path),
        )
