"""Running a service process: logs, health server, signals, graceful shutdown, a live
integrations file (:mod:`pipeline.core.live_config`: SIGHUP and a file watch)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable

from pipeline.core.live_config import LiveConfig
from pipeline.core.observability import HealthServer, capture_uncaught, configure_logging, get_logger
from pipeline.core.settings import ServiceSettings, env_float
from pipeline.kafka.clients import connect_backoff_from_env
from pipeline.kafka.loop import TransactionalLoop

log = get_logger(__name__)


def install_stop_handlers(stop: Callable[[], None]) -> None:
    """SIGTERM and SIGINT call ``stop`` once; a second signal is ignored (shutdown is under way)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)


CONFIG_WATCH_INTERVAL_S = 10.0


def watch_config(live: LiveConfig, stop: asyncio.Event) -> asyncio.Task[None]:
    """Keep ``live`` current until ``stop``: SIGHUP looks at the file at once, and it is looked at
    every ``CONFIG_WATCH_INTERVAL_S`` (10 s; 0 = only on SIGHUP)."""
    interval = env_float(os.environ, "CONFIG_WATCH_INTERVAL_S", CONFIG_WATCH_INTERVAL_S, minimum=0.0)
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, live.request)
    return asyncio.ensure_future(live.watch(stop, interval))


SHUTDOWN_GRACE_S = 30.0


def _give_up(name: str, grace_s: float) -> None:
    log.error(
        "shutdown_timed_out",
        service=name,
        grace_s=grace_s,
        detail="the batch in flight or a rebalance waits for a broker that does not answer; exiting without "
        "it (as a kill would): what was not committed is redone by the partition's next owner",
    )
    sys.stderr.flush()
    os._exit(1)


async def run_loop_service(
    name: str,
    loop: TransactionalLoop,
    settings: ServiceSettings,
    before_start: Callable[[], Awaitable[None]] | None = None,
    after_stop: Callable[[], Awaitable[None]] | None = None,
    live: LiveConfig | None = None,
) -> None:
    """Start health + loop, run until SIGTERM/SIGINT, then finish the batch in flight and leave.

    The health server answers from the first moment: ``/healthz`` alive, ``/readyz`` 503 until the
    loop has joined its group. A broker that cannot be reached yet is waited for with capped
    backoff (``KAFKA_CONNECT_BACKOFF_MAX_S``); SIGTERM while waiting ends the service at once (exit 0).
    A shutdown that cannot finish within ``SHUTDOWN_GRACE_S`` (a transaction or a rebalance waiting
    for a broker that went away) ends the process with exit 1, which is as safe as a kill.
    """
    backoff_max_s = connect_backoff_from_env()
    grace_s = env_float(os.environ, "SHUTDOWN_GRACE_S", SHUTDOWN_GRACE_S, minimum=1.0)
    health = HealthServer(settings.metrics_host, settings.metrics_port, ready=loop.ready)
    await health.start()
    log.info("service_starting", service=name, metrics_port=health.port)
    deadline: list[asyncio.TimerHandle] = []

    def stop() -> None:
        loop.request_stop()
        if not deadline:
            deadline.append(asyncio.get_running_loop().call_later(grace_s, _give_up, name, grace_s))

    install_stop_handlers(stop)
    stopping = asyncio.Event()
    watching = watch_config(live, stopping) if live is not None else None
    try:
        if before_start is not None:
            await before_start()
        if await loop.start(connect_backoff_max_s=backoff_max_s):
            await loop.run()
    finally:
        stopping.set()
        if watching is not None:
            await watching
        await loop.stop()
        if after_stop is not None:
            await after_stop()
        await health.stop()
        for handle in deadline:
            handle.cancel()
        log.info("service_stopped", service=name)
    if loop.fatal is not None:
        raise SystemExit(f"{name}: stopped: {type(loop.fatal).__name__}: {loop.fatal}")


def start_logging(name: str, settings: ServiceSettings) -> None:
    """From here on everything the process logs is a masked JSON line on stderr: its own events, the
    libraries' records (aiokafka, aiohttp, asyncio), warnings and uncaught exceptions."""
    configure_logging(name, settings.log_level)
    capture_uncaught()
