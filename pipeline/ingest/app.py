"""The ingest service (``pipeline ingest``): the CloudTalk and Kustomer webhook routes
(:mod:`pipeline.ingest.cloudtalk`, :mod:`pipeline.ingest.kustomer`) on one aiohttp app, plus
``/metrics``, ``/healthz``, ``/readyz``; every endpoint follows :meth:`IngestApp.accept`."""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from aiohttp import web

from pipeline.core.config import PipelineConfig, load_config
from pipeline.core.observability import add_health_routes, get_logger
from pipeline.core.settings import ServiceSettings, env_float, env_int, env_str
from pipeline.ingest import cloudtalk, kustomer
from pipeline.ingest.base import MAX_BODY, IngestApp, Publisher
from pipeline.kafka.service import install_stop_handlers, start_logging
from pipeline.kafka.topics import Topics

log = get_logger(__name__)


def build_app(
    config: PipelineConfig,
    publisher: Publisher,
    topic_prefix: str,
    secrets: dict[str, str],
    kustomer_tokens: dict[str, str],
) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    ingest = IngestApp(config, publisher, secrets)
    topics = Topics(topic_prefix)
    cloudtalk.add_routes(app, ingest, topics)
    kustomer.add_routes(app, ingest, topics, kustomer_tokens)

    async def ready() -> tuple[bool, dict[str, Any]]:
        return publisher.connected, {"broker": "connected" if publisher.connected else "unreachable"}

    add_health_routes(app, ready)
    return app


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="run the webhook ingest service (CloudTalk and Kustomer endpoints)")
    p.add_argument("--config", help="integrations file (env PIPELINE_CONFIG)")
    p.add_argument("--host", help="listen address (env INGEST_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (env INGEST_PORT, default 8080)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = ServiceSettings.from_env()
    start_logging("ingest", settings)
    config = load_config(args.config or settings.config_path)
    # secrets are read at start: a missing one stops the service with the field named
    secrets = {i.name: i.cloudtalk_webhook_secret.value() for i in config.integrations}
    tokens = {i.name: i.kustomer.webhook_token.value() for i in config.integrations if i.kustomer.webhook_token}
    host = args.host or env_str(os.environ, "INGEST_HOST", "127.0.0.1")
    port = args.port if args.port is not None else env_int(os.environ, "INGEST_PORT", 8080, minimum=0)
    publisher = Publisher(
        settings.kafka.bootstrap,
        f"{settings.kafka.client_id}-ingest",
        ack_timeout_s=env_float(os.environ, "INGEST_ACK_TIMEOUT_S", 5.0, minimum=0.1),
        retry_after_s=env_int(os.environ, "INGEST_RETRY_AFTER_S", 5, minimum=1),
    )

    async def main() -> None:
        await publisher.start()
        app = build_app(config, publisher, settings.kafka.topic_prefix, secrets, tokens)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        log.info("ingest_listening", host=host, port=port, integrations=[i.name for i in config.integrations])
        stop = asyncio.Event()
        install_stop_handlers(stop.set)
        await stop.wait()
        # stop taking requests, let the ones in flight finish, then flush the producer
        await runner.cleanup()
        await publisher.stop()
        log.info("ingest_stopped")

    asyncio.run(main())
    return 0
