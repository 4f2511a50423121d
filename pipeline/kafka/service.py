"""Running a service process: logs, health server, signals, graceful shutdown."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

from pipeline.core.observability import HealthServer, configure_logging, get_logger
from pipeline.core.settings import ServiceSettings
from pipeline.kafka.loop import TransactionalLoop

log = get_logger(__name__)


def install_stop_handlers(stop: Callable[[], None]) -> None:
    """SIGTERM and SIGINT call ``stop`` once; a second signal is ignored (shutdown is under way)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)


async def run_loop_service(
    name: str,
    loop: TransactionalLoop,
    settings: ServiceSettings,
    before_start: Callable[[], Awaitable[None]] | None = None,
    after_stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Start health + loop, run until SIGTERM/SIGINT, then finish the batch in flight and leave."""
    health = HealthServer(settings.metrics_host, settings.metrics_port, ready=loop.ready)
    await health.start()
    log.info("service_starting", service=name, metrics_port=health.port)
    if before_start is not None:
        await before_start()
    await loop.start()
    install_stop_handlers(loop.request_stop)
    try:
        await loop.run()
    finally:
        await loop.stop()
        if after_stop is not None:
            await after_stop()
        await health.stop()
        log.info("service_stopped", service=name)
    if loop.fatal is not None:
        raise SystemExit(f"{name}: stopped: {type(loop.fatal).__name__}: {loop.fatal}")


def start_logging(name: str, settings: ServiceSettings) -> None:
    configure_logging(name, settings.log_level)
