"""Idle and slow connections cannot pile up in ingest: 2,000 connections that send nothing (or a
head that never ends) are held within bounded memory, refused beyond ``INGEST_MAX_CONNECTIONS``
and closed after ``INGEST_HEADER_TIMEOUT_S``. Ingest runs as a separate process (``pipeline
ingest``) whose resident memory is read from /proc; it needs no broker for this."""

from __future__ import annotations

import asyncio
import os
import resource
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from devkit.net import free_port
from devkit.stack import Stack
from tests.integration.test_ingest_broker_restart import CONFIG

CONNECTIONS = 2000
HEADER_TIMEOUT_S = 4.0

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_sockets(pid: int) -> int:
    return sum(1 for fd in os.scandir(f"/proc/{pid}/fd") if os.readlink(fd.path).startswith("socket:"))


def ensure_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def start_ingest(tmp_path: Path, **env: str) -> tuple[Stack, str, int]:
    config = tmp_path / "integrations.yaml"
    config.write_text(CONFIG)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stack = Stack(
        tmp_path,
        {
            "KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",  # no broker: ingest serves anyway (503)
            "PIPELINE_CONFIG": str(config),
            "LOG_LEVEL": "WARNING",
            "RESTART_CT_ID": "x",
            "RESTART_CT_SECRET": "x",
            "RESTART_K_KEY": "x",
            "RESTART_HOOK_SECRET": "secret",
            "INGEST_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
            **env,
        },
    )
    stack.add("ingest", ["ingest", "--port", str(port)], health=f"{url}/healthz")
    await stack.wait_ready(timeout=60)
    pid = stack.services["ingest"].proc.pid  # type: ignore[union-attr]
    async with aiohttp.ClientSession() as http:  # warm up: a few ordinary requests of each kind
        for _ in range(20):
            async with http.post(f"{url}/ingest/cloudtalk/support/call-ended", data=b"{}") as r:
                assert r.status == 401
            async with http.get(f"{url}/readyz") as r:
                assert r.status == 503
    return stack, url, pid


async def open_idle(port: int, n: int, slow_head: bool) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``n`` connections; every other one (with ``slow_head``) sends the start of a head that never ends."""
    out = []
    for start in range(0, n, 200):
        batch = await asyncio.gather(
            *(asyncio.open_connection("127.0.0.1", port) for _ in range(start, min(n, start + 200)))
        )
        for i, (_reader, writer) in enumerate(batch):
            if slow_head and i % 2:
                writer.write(b"POST /ingest/cloudtalk/support/call-ended HTTP/1.1\r\nHost: x\r\nX-Pipeline-Secret: s")
        out.extend(batch)
    return out


async def closed_by_server(conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], timeout: float) -> int:
    async def closed(reader: asyncio.StreamReader) -> bool:
        try:
            return await asyncio.wait_for(reader.read(), timeout) == b""
        except ConnectionError:
            # a refused connection that had already sent bytes ingest never read is closed with a
            # reset, not a FIN: the server ended it all the same
            return True
        except TimeoutError:
            return False

    return sum(await asyncio.gather(*(closed(r) for r, _ in conns)))


@pytest.mark.serial  # 2,000 connections closed by a timeout: on a machine of its own
@pytest.mark.parametrize(("max_connections", "held"), [(4096, CONNECTIONS), (None, 1024)])
async def test_two_thousand_idle_connections_hold_bounded_memory_and_are_closed(tmp_path, max_connections, held):
    ensure_file_limit(CONNECTIONS + 512)
    env = {"INGEST_MAX_CONNECTIONS": str(max_connections)} if max_connections else {}
    stack, url, pid = await start_ingest(tmp_path, **env)
    port = int(url.rsplit(":", 1)[1])
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        base_rss, base_sockets = rss_mib(pid), open_sockets(pid)
        opened_at = time.monotonic()
        conns = await open_idle(port, CONNECTIONS, slow_head=True)
        await asyncio.sleep(1.0)
        with_conns, sockets = rss_mib(pid), open_sockets(pid) - base_sockets
        # the service still answers while they are held
        try:
            async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as r:
                healthy = r.status
        except aiohttp.ClientError:
            healthy = 0  # over the connection limit: refused like the rest
        closed = await closed_by_server(conns, HEADER_TIMEOUT_S + 10)
        closed_after = time.monotonic() - opened_at
        await asyncio.sleep(0.5)
        after_rss, left = rss_mib(pid), open_sockets(pid) - base_sockets
        print(
            f"\n{CONNECTIONS} idle connections (half a never-ending head), INGEST_MAX_CONNECTIONS="
            f"{max_connections or 'default 1024'}: {sockets} held by ingest; RSS {base_rss:.1f} MiB before, "
            f"{with_conns:.1f} MiB with them (+{with_conns - base_rss:.1f}), {after_rss:.1f} MiB after; all "
            f"{closed} closed by ingest within {closed_after:.1f} s; sockets left {left}"
        )
        assert healthy == 200 or held < CONNECTIONS  # beyond the limit even /healthz may be refused
        assert sockets <= held + 5
        assert with_conns - base_rss < 64, "memory grew by more than 64 MiB"
        assert closed == CONNECTIONS  # refused at once, or closed after the header timeout
        assert left <= 2
    finally:
        for _, writer in conns:
            writer.close()
        codes = await asyncio.to_thread(stack.stop_all)
        assert codes.get("ingest") in (0, -15), stack.tail("ingest")
