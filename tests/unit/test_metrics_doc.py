"""The README's metric table is what ``/metrics`` serves: every name, every label; and no label
value is a secret."""

from __future__ import annotations

import re

import aiohttp
from prometheus_client.metrics import MetricWrapperBase

from pipeline.clients.cloudtalk import CloudTalkClient
from pipeline.clients.kustomer import KustomerClient
from pipeline.core.observability import HealthServer, metrics
from tests.conftest import REPO


def readme_table() -> dict[str, list[str]]:
    """metric name -> labels, from the README's "## Metrics" table."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    out: dict[str, list[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        labels = [] if cells[1] in ("—", "") else [label.strip() for label in cells[1].split(",")]
        for name in re.findall(r"`([a-z_]+)`", cells[0]):
            out[name] = labels
    return out


async def scrape() -> str:
    health = HealthServer("127.0.0.1", 0)
    await health.start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{health.port}/metrics") as response:
                assert response.status == 200
                return await response.text()
    finally:
        await health.stop()


async def test_the_readme_lists_exactly_the_metrics_served():
    families = set(re.findall(r"^# TYPE (\S+) \S+$", await scrape(), re.M))
    # a counter's or histogram's creation time comes as its own gauge, ``<name>_created``
    served = {
        f
        for f in families
        if not (f.endswith("_created") and ({f[: -len("_created")], f[: -len("_created")] + "_total"} & families))
    }
    documented = readme_table()
    assert served == set(documented), {
        "served, not in the README": sorted(served - set(documented)),
        "in the README, not served": sorted(set(documented) - served),
    }
    # every service's process metrics are among them (CPU, memory, file descriptors)
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"} <= served


def test_the_readme_names_every_label():
    documented = readme_table()
    for metric in vars(metrics()).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        name = metric._name + ("_total" if metric._type == "counter" else "")  # noqa: SLF001
        assert documented[name] == list(metric._labelnames), name  # noqa: SLF001


async def test_no_label_value_is_a_key_id_or_a_key():
    async with aiohttp.ClientSession() as session:
        # a marker no port or other label of the process's registry can hold by chance
        ct = CloudTalkClient.from_credentials(session, "https://my.cloudtalk.io/api", "KEYIDqzxw", "KEYSECRETqzxw")
        k = KustomerClient.from_credentials(
            session, "https://acme.api.kustomerapp.com", "APIKEYqzxw", account="support"
        )
        ct.executor._remaining_gauge.set(59)  # noqa: SLF001 - what a response's headers set
        k.executor._remaining_gauge.set(999)  # noqa: SLF001
    body = await scrape()
    assert "qzxw" not in body
    assert 'pipeline_ratelimit_remaining{account="my.cloudtalk.io",target="cloudtalk"} 59.0' in body
    assert 'pipeline_ratelimit_remaining{account="support",target="kustomer"} 999.0' in body
