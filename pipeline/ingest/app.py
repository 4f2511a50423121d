"""The ingest service (``pipeline ingest``): the CloudTalk and Kustomer webhook routes
(:mod:`pipeline.ingest.cloudtalk`, :mod:`pipeline.ingest.kustomer`) on one aiohttp app, plus
``/metrics``, ``/healthz``, ``/readyz``; every endpoint follows the steps of
:mod:`pipeline.ingest.base`.

What one process holds is bounded (each bound an ``INGEST_*`` setting, :class:`IngestLimits`):

* connections (:class:`ConnectionGuard`): at most ``max_connections`` open, a new one beyond that is
  closed at once; a request's head must be complete ``header_timeout_s`` after the connection
  opened or after its first byte arrived, else the connection is closed (slowloris); an idle
  kept-alive connection is closed after ``keepalive_timeout_s``;
* requests (:func:`guard_middleware`): at most ``max_in_flight`` webhooks handled at once, beyond
  that 503 + ``Retry-After``; the body must arrive within ``body_timeout_s`` (408) and be at most
  ``max_body`` bytes (413); each integration may send ``rate_per_s`` (burst ``rate_burst``), beyond
  that 429 + ``Retry-After``; every refusal is a JSON body naming the problem, never a 5xx.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from typing import Any

from aiohttp import web

from pipeline.core.config import ConfigError, PipelineConfig
from pipeline.core.live_config import LiveConfig
from pipeline.core.observability import add_health_routes, get_logger
from pipeline.core.settings import ServiceSettings, SettingsError, env_float, env_int, env_port, env_str
from pipeline.ingest import cloudtalk, kustomer
from pipeline.ingest.base import BadRequest, IngestApp, IngestLimits, Publisher, RateLimited, problem, refusal
from pipeline.kafka.service import install_stop_handlers, start_logging, watch_config
from pipeline.kafka.topics import Topics

log = get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --------------------------------------------------------------------------------------------
# Connections
# --------------------------------------------------------------------------------------------


class _GuardedConnection(asyncio.Protocol):
    """aiohttp's protocol for one connection, wrapped: counts it and closes it when a request's
    head does not arrive in time. Everything else is passed through."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard, self.inner = guard, inner
        self.transport: asyncio.Transport | None = None
        self.refused = False
        self.busy = 0  # requests of this connection inside the app
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.guard.open >= self.guard.limits.max_connections:
            self.refused = True
            self.guard.refuse()
            transport.close()
            return
        self.guard.open += 1
        self.guard.connections[transport] = self
        self.inner.connection_made(transport)
        self._arm()  # the first request's head: header_timeout_s from the connection opening

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if not self.busy and self.timer is None:
            self._arm()  # the first bytes of a new request's head
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return None if self.refused else self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.refused:
            return
        self.guard.open -= 1
        if self.transport is not None:
            self.guard.connections.pop(self.transport, None)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # -- the head timer ----------------------------------------------------------------------
    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.guard.limits.header_timeout_s, self._head_late)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _head_late(self) -> None:
        self.timer = None
        if not self.busy and self.transport is not None and not self.transport.is_closing():
            self.guard.timed_out += 1
            self.transport.close()

    def request_started(self) -> None:
        self.busy += 1
        self._disarm()

    def request_finished(self) -> None:
        self.busy -= 1


class ConnectionGuard:
    """Wraps each connection of the ingest server (:class:`_GuardedConnection`)."""

    def __init__(self, limits: IngestLimits) -> None:
        self.limits = limits
        self.open = 0
        self.refused = 0
        self.timed_out = 0
        self.connections: dict[asyncio.BaseTransport, _GuardedConnection] = {}
        self._refusal_logged = 0.0

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        return lambda: _GuardedConnection(self, server())

    def of(self, request: web.BaseRequest) -> _GuardedConnection | None:
        transport = request.transport
        return None if transport is None else self.connections.get(transport)

    def refuse(self) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._refusal_logged > 10:
            self._refusal_logged = now
            log.warning("connection_refused", open=self.open, limit=self.limits.max_connections, refused=self.refused)


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


def guard_middleware(ingest: IngestApp, guard: ConnectionGuard | None) -> Any:
    """Tells the connection guard a request is inside the app; for the webhook routes also the
    in-flight limit, and refusals (BadRequest, RateLimited) turned into their JSON answers."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        connection = guard.of(request) if guard is not None else None
        if connection is not None:
            connection.request_started()
        try:
            if not request.path.startswith("/ingest/"):
                return await handler(request)
            response = await _webhook(ingest, request, handler)
            if response.status >= 400 and not request.content.at_eof():
                response.force_close()  # the rest of an unread body is not waited for
            return response
        finally:
            if connection is not None:
                connection.request_finished()

    return middleware


async def _webhook(ingest: IngestApp, request: web.Request, handler: Handler) -> web.StreamResponse:
    if ingest.in_flight >= ingest.limits.max_in_flight:
        return ingest.unavailable(_endpoint(request), "too many requests in flight")
    ingest.in_flight += 1
    try:
        return await handler(request)
    except BadRequest as exc:
        ingest.count(_endpoint(request), exc.status)
        return refusal(exc)
    except RateLimited as exc:
        ingest.count(_endpoint(request), 429)
        return problem(429, str(exc), headers={"Retry-After": str(exc.retry_after_s)})
    finally:
        ingest.in_flight -= 1


def _endpoint(request: web.Request) -> str:
    """The ``endpoint`` label of a webhook request (never text from the request itself)."""
    if request.path.startswith("/ingest/kustomer/"):
        return "kustomer/customer"
    kind = request.match_info.get("kind")
    if kind is not None:
        return f"cloudtalk/{kind}" if kind in cloudtalk.KINDS else "cloudtalk/unknown"
    return "unknown"


INGEST = web.AppKey("ingest", IngestApp)


def use_config(app: web.Application, config: PipelineConfig, secrets: dict[str, str], tokens: dict[str, str]) -> None:
    """Take a reloaded integrations file: its integrations, webhook secrets and Kustomer tokens
    (the dicts the routes hold are updated in place, so the next request uses them)."""
    app[INGEST].config = config
    secrets.clear()
    secrets.update(webhook_secrets(config))
    tokens.clear()
    tokens.update(kustomer_tokens(config))


def webhook_secrets(config: PipelineConfig) -> dict[str, str]:
    return {i.name: i.cloudtalk_webhook_secret.value() for i in config.integrations}


def build_app(
    config: PipelineConfig,
    publisher: Publisher,
    topic_prefix: str,
    secrets: dict[str, str],
    kustomer_tokens: dict[str, str],
    limits: IngestLimits | None = None,
    guard: ConnectionGuard | None = None,
) -> web.Application:
    limits = limits or IngestLimits()
    ingest = IngestApp(config, publisher, secrets, limits)
    app = web.Application(client_max_size=limits.max_body, middlewares=[guard_middleware(ingest, guard)])
    app[INGEST] = ingest
    topics = Topics(topic_prefix)
    cloudtalk.add_routes(app, ingest, topics)
    kustomer.add_routes(app, ingest, topics, kustomer_tokens)

    async def ready() -> tuple[bool, dict[str, Any]]:
        return publisher.ready, publisher.readiness()

    add_health_routes(app, ready)
    return app


# --------------------------------------------------------------------------------------------
# The service
# --------------------------------------------------------------------------------------------


class IngestServer:
    """The app on ``host:port`` behind a :class:`ConnectionGuard` (what ``pipeline ingest`` runs;
    tests start one too)."""

    def __init__(self, app: web.Application, limits: IngestLimits, guard: ConnectionGuard) -> None:
        self.app, self.limits, self.guard = app, limits, guard
        self.runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=limits.keepalive_timeout_s,
            lingering_time=min(2.0, limits.body_timeout_s),
        )
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        await self.runner.setup()
        server = self.runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.guard.protocol_factory(server), host, port, reuse_address=True, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop taking connections, let the requests in flight finish, close the rest."""
        if self._server is not None:
            self._server.close()
        await self.runner.cleanup()
        if self._server is not None:
            await self._server.wait_closed()


def fit_connections_to_file_limit(limits: IngestLimits) -> IngestLimits:
    """Raise the open-file limit for ``max_connections`` (plus room for the broker and logs), or
    lower ``max_connections`` to what the process may open."""
    needed = limits.max_connections + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        allowed = max(1, soft - 256)
        log.warning("max_connections_lowered", wanted=limits.max_connections, allowed=allowed, open_file_limit=soft)
        return replace(limits, max_connections=allowed)
    return limits


def kustomer_tokens(config: PipelineConfig) -> dict[str, str]:
    """The Kustomer webhook signing token of each integration that has one readable now. An
    integration without one still logs calls and SMS; its Kustomer endpoint answers 401 (the token
    exists only after ``pipeline webhooks register``), and a start-up line says why."""
    tokens: dict[str, str] = {}
    for i in config.integrations:
        try:
            if i.kustomer.webhook_token is None:
                raise ConfigError("secrets", [f"{i.name}: no kustomer.webhook_token in the integrations file"])
            tokens[i.name] = i.kustomer.webhook_token.value()
        except ConfigError as exc:
            log.warning(
                "kustomer_webhook_token_missing",
                integration=i.name,
                reason="; ".join(exc.problems),
                answer=f"401 on /ingest/kustomer/{i.name} until `pipeline webhooks register` stored the token "
                "(picked up without a restart)",
            )
    return tokens


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="run the webhook ingest service (CloudTalk and Kustomer endpoints)")
    p.add_argument("--config", help="integrations file (env PIPELINE_CONFIG)")
    p.add_argument("--host", help="listen address (env INGEST_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (env INGEST_PORT, default 8080)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = ServiceSettings.from_env()
    start_logging("ingest", settings)
    live = LiveConfig(
        args.config or settings.config_path, reads=PipelineConfig.webhook_secrets, watches=PipelineConfig.webhook_tokens
    )
    config = live.current
    # secrets are read at start: a missing one stops the service with the field named (a reload
    # with a missing one is refused and the running configuration stays)
    secrets = webhook_secrets(config)
    tokens = kustomer_tokens(config)
    host = args.host or env_str(os.environ, "INGEST_HOST", "127.0.0.1")
    port = args.port if args.port is not None else env_port(os.environ, "INGEST_PORT", 8080)
    if not 0 <= port <= 65535:
        raise SettingsError(f"--port: must be 0 to 65535, got {port}")
    limits = fit_connections_to_file_limit(IngestLimits.from_env())
    publisher = Publisher(
        settings.kafka.bootstrap,
        f"{settings.kafka.client_id}-ingest",
        ack_timeout_s=env_float(os.environ, "INGEST_ACK_TIMEOUT_S", 5.0, minimum=0.1),
        retry_after_s=env_int(os.environ, "INGEST_RETRY_AFTER_S", 5, minimum=1),
        max_pending=limits.max_in_flight,
        reconnect_backoff_s=env_float(os.environ, "INGEST_RECONNECT_BACKOFF_MAX_S", 2.0, minimum=0.1),
    )

    async def main() -> None:
        guard = ConnectionGuard(limits)
        app = build_app(config, publisher, settings.kafka.topic_prefix, secrets, tokens, limits, guard)
        server = IngestServer(app, limits, guard)
        # the port first: one that is taken stops the service before anything connects to Kafka
        # (until the producer is connected, webhooks get 503 + Retry-After)
        await server.start(host, port)
        await publisher.start()
        log.info(
            "ingest_listening",
            host=host,
            port=server.port,
            integrations=[i.name for i in config.integrations],
            limits=asdict(limits),
        )
        stop = asyncio.Event()
        install_stop_handlers(stop.set)
        live.on_change(lambda _old, new: use_config(app, new, secrets, tokens))
        watching = watch_config(live, stop)
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(publisher.failed.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        stop.set()
        await watching
        # stop taking requests, let the ones in flight finish, then flush the producer
        await server.stop()
        await publisher.stop()
        log.info("ingest_stopped")

    asyncio.run(main())
    if publisher.fatal is not None:  # the broker refused the connection settings: one line, not a traceback
        if isinstance(publisher.fatal, SettingsError):
            raise publisher.fatal
        raise SystemExit(f"ingest: stopped: {type(publisher.fatal).__name__}: {publisher.fatal}")
    return 0
