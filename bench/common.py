"""What every benchmark shares: the broker it runs against and percentiles."""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devkit.localkafka import LocalKafka  # noqa: E402


@asynccontextmanager
async def kafka() -> AsyncIterator[tuple[str, int | None]]:
    """``KAFKA_BOOTSTRAP`` when set, else a throwaway local broker (stopped afterwards).
    Yields the bootstrap address and the broker's pid when this process started it."""
    given = os.environ.get("KAFKA_BOOTSTRAP")
    if given:
        yield given, None
        return
    broker = LocalKafka.ephemeral(Path(tempfile.mkdtemp(prefix="bench-kafka-")))
    bootstrap = await asyncio.to_thread(broker.up, 90.0, True)
    try:
        pid = int(broker.pid_file.read_text()) if broker.pid_file.exists() else None
        yield bootstrap, pid
    finally:
        await asyncio.to_thread(broker.down, 30.0, True)


def percentile_ms(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0–100) of seconds, in milliseconds."""
    if len(values) < 2:
        return float("nan")
    return statistics.quantiles(values, n=1000)[int(q * 10) - 1] * 1000
