"""The integrations file, kept current while a service runs.

A service loads the file once at start (a bad file stops it with one line) and then watches it:
every ``CONFIG_WATCH_INTERVAL_S`` (10 s; 0 = never) and at once on SIGHUP, :meth:`LiveConfig.reload`
reads the file again, and the secret files it names. Nothing changed → nothing happens. A changed
file is validated as at start — its structure, its rules *and* its secrets — before anything uses
it:

* invalid → the configuration in use stays; one ``config_reload_refused`` line names the first
  problem (once per bad version of the file) and ``pipeline_config_reloads_total{result="refused"}``
  counts it;
* valid → it becomes :attr:`LiveConfig.current`, with a new :attr:`LiveConfig.version` (a digest of
  the file: ``pipeline_config_info{version}``, ``pipeline_config_loaded_timestamp_seconds``) and one
  ``config_reloaded`` line naming the integrations added, removed and changed; the listeners
  (:meth:`LiveConfig.on_change`) rebuild what depends on it — API clients when a key was rotated,
  the webhook secrets, the pollers.

Each stage takes :attr:`current` at a batch boundary (processors: once per batch; sinks: once per
command), so no batch is decided half by old, half by new rules. The audit record of each decision
names the version it used.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.core.config import ConfigError, PipelineConfig, Secret, load_config
from pipeline.core.observability import get_logger, metrics

log = get_logger(__name__)

Listener = Callable[[PipelineConfig, PipelineConfig], object]  # its result is ignored


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


Secrets = Callable[[PipelineConfig], Sequence[Secret]]


def no_secrets(_config: PipelineConfig) -> list[Secret]:
    return []


def secrets_digest(secrets: Sequence[Secret]) -> str:
    """A digest of the secrets' current values (never the values themselves): a rotated secret
    changes it. A secret that cannot be read counts as empty here."""
    h = hashlib.sha256()
    for secret in secrets:
        try:
            value = secret.value()
        except ConfigError:
            value = ""
        h.update(secret.reference.encode() + b"\0" + value.encode() + b"\0")
    return h.hexdigest()


class LiveConfig:
    def __init__(
        self,
        path: str | os.PathLike[str],
        config: PipelineConfig | None = None,
        *,
        reads: Secrets = no_secrets,
        watches: Secrets = no_secrets,
    ) -> None:
        """``reads``: the secrets this service needs (a file whose ``reads`` cannot all be read is
        refused); ``watches``: secrets it takes when they appear or change but can run without
        (Kustomer webhook tokens: they exist once ``pipeline webhooks register`` stored them)."""
        self.path = Path(path)
        self.reads, self.watches = reads, watches
        text = self._read()
        self.current = config if config is not None else load_config(self.path)
        self.version = _digest(text)
        self.loaded_at = time.time()
        self._secrets = self._secrets_of(self.current)
        self._refused: str | None = None  # the version last refused (said once)
        self._listeners: list[Listener] = []
        self._wake: asyncio.Event | None = None
        self._publish()

    # -- reading ---------------------------------------------------------------------------------
    def _secrets_of(self, config: PipelineConfig) -> str:
        return secrets_digest([*self.reads(config), *self.watches(config)])

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError:
            return b""  # a file being replaced: the next look finds it (load_config names the problem)

    def on_change(self, listener: Listener) -> None:
        """``listener(old, new)`` after a new configuration took effect (also for rotated secrets)."""
        self._listeners.append(listener)

    def reload(self) -> bool:
        """Look at the file (and its secrets) again; True when a new configuration took effect."""
        text = self._read()
        version = _digest(text)
        if version == self.version and self._secrets_of(self.current) == self._secrets:
            return False
        try:
            new = load_config(self.path)
            problems = new.check_secrets(secrets=self.reads(new))
            if problems:
                raise ConfigError("secrets", problems)
        except ConfigError as exc:
            if self._refused != version:
                self._refused = version
                metrics().config_reloads.labels("refused").inc()
                log.error(
                    "config_reload_refused",
                    path=str(self.path),
                    version=version,
                    problem=exc.problems[0] if exc.problems else str(exc),
                    problems=len(exc.problems),
                    kept=self.version,
                )
            return False
        old, old_version = self.current, self.version
        self.current, self.version, self.loaded_at = new, version, time.time()
        self._secrets = self._secrets_of(new)
        self._refused = None
        before = {i.name: i for i in old.integrations}
        after = {i.name: i for i in new.integrations}
        if old_version != version:
            metrics().config_info.remove(old_version)
        self._publish()
        metrics().config_reloads.labels("applied").inc()
        log.info(
            "config_reloaded",
            version=version,
            previous=old_version,
            added=sorted(set(after) - set(before)),
            removed=sorted(set(before) - set(after)),
            changed=sorted(n for n in set(before) & set(after) if before[n] != after[n]),
            secrets_only=version == old_version,
        )
        for listener in self._listeners:
            listener(old, new)
        return True

    def _publish(self) -> None:
        metrics().config_info.labels(self.version).set(1)
        metrics().config_loaded.set(self.loaded_at)

    # -- watching --------------------------------------------------------------------------------
    def request(self) -> None:
        """Look again now (SIGHUP)."""
        if self._wake is not None:
            self._wake.set()

    async def watch(self, stop: asyncio.Event, interval_s: float) -> None:
        """Until ``stop``: :meth:`reload` every ``interval_s`` (0: only on :meth:`request`)."""
        self._wake = asyncio.Event()
        while not stop.is_set():
            waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())}
            done, pending = await asyncio.wait(
                waits, timeout=interval_s if interval_s > 0 else None, return_when=asyncio.FIRST_COMPLETED
            )
            for w in pending:
                w.cancel()
            if stop.is_set():
                return
            self._wake.clear()
            try:
                self.reload()
            except Exception as exc:  # noqa: BLE001 - a listener's failure never stops the watch
                log.error("config_reload_failed", error=f"{type(exc).__name__}: {exc}")
