"""What every benchmark shares: the broker it runs against, percentiles, CPU time, a service's
metrics and the summary table every script ends with."""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

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


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


async def metric_sum(url: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` on a service's ``/metrics`` (``url``) whose labels
    include ``labels``; NaN when the service does not answer."""
    try:
        async with aiohttp.ClientSession() as http, http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
            text = await r.text()
    except (TimeoutError, aiohttp.ClientError):
        return math.nan
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


@dataclass(frozen=True)
class Row:
    """One line of a benchmark's summary: what was measured against what, and its aim."""

    measure: str
    result: str
    baseline: str
    ratio: str
    aim: str
    met: bool | None  # None: no aim for this measure


def print_summary(title: str, rows: Sequence[Row]) -> None:
    """The table every benchmark ends with: measure | result | baseline | ratio | aim | met?"""
    head = ("measure", "result", "baseline", "ratio", "aim", "met?")
    cells = [head] + [
        (r.measure, r.result, r.baseline, r.ratio, r.aim, "—" if r.met is None else ("yes" if r.met else "NO"))
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    print(f"\nsummary: {title}")
    for n, c in enumerate(cells):
        print("| " + " | ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    sys.stdout.flush()


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b and not math.isnan(a) and not math.isnan(b) else "n/a"
