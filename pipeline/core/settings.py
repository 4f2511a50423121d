"""Service settings from environment variables, with documented defaults.

Every variable is listed in the README's configuration reference. A bad value raises
:class:`SettingsError` naming the variable and what it expected.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field


class SettingsError(ValueError):
    """A service setting is missing or malformed; the message names the variable."""


def _get(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name)
    return default if value is None or value == "" else value


def env_str(env: Mapping[str, str], name: str, default: str) -> str:
    return _get(env, name, default)


def env_int(env: Mapping[str, str], name: str, default: int, minimum: int | None = None) -> int:
    raw = _get(env, name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}: expected an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name}: must be >= {minimum}, got {value}")
    return value


def env_float(env: Mapping[str, str], name: str, default: float, minimum: float | None = None) -> float:
    raw = _get(env, name, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}: expected a number, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name}: must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap: str = "127.0.0.1:9092"
    topic_prefix: str = ""
    max_batch: int = 1000
    poll_timeout_ms: int = 200
    transaction_timeout_ms: int = 60_000
    client_id: str = "ctk-pipeline"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> KafkaSettings:
        env = os.environ if env is None else env
        return cls(
            bootstrap=env_str(env, "KAFKA_BOOTSTRAP", cls.bootstrap),
            topic_prefix=env_str(env, "TOPIC_PREFIX", cls.topic_prefix),
            max_batch=env_int(env, "LOOP_MAX_BATCH", cls.max_batch, minimum=1),
            poll_timeout_ms=env_int(env, "LOOP_POLL_TIMEOUT_MS", cls.poll_timeout_ms, minimum=1),
            transaction_timeout_ms=env_int(
                env, "KAFKA_TRANSACTION_TIMEOUT_MS", cls.transaction_timeout_ms, minimum=1000
            ),
            client_id=env_str(env, "KAFKA_CLIENT_ID", cls.client_id),
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
            metrics_port=env_int(env, "METRICS_PORT", cls.metrics_port, minimum=0),
            log_level=env_str(env, "LOG_LEVEL", cls.log_level).upper(),
            config_path=env_str(env, "PIPELINE_CONFIG", cls.config_path),
        )
