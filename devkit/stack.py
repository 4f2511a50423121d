"""Run the pipeline's services as separate processes (the demo and the end-to-end tests).

Each service is ``python -m pipeline <args>`` (``python -m devkit sim …`` for a simulator) with
its own environment, its log in ``<workdir>/logs/<name>.log`` and its health endpoint on a free
port. ``stop_all`` sends SIGTERM in reverse start order, waits, and kills what is left.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from devkit.net import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent


DEVKIT_COMMANDS = frozenset({"sim", "kafka", "demo"})


def entry_point(args: list[str]) -> str:
    """The module that runs ``args``: the product's CLI, or the development kit's."""
    return "devkit" if args and args[0] in DEVKIT_COMMANDS else "pipeline"


@dataclass
class Service:
    name: str
    args: list[str]
    env: dict[str, str]
    health_url: str | None
    log_path: Path
    proc: subprocess.Popen | None = None
    starts: int = 0
    history: list[str] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Stack:
    def __init__(self, workdir: Path, base_env: dict[str, str]) -> None:
        self.workdir = workdir
        (workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.base_env = base_env
        self.services: dict[str, Service] = {}

    def add(
        self,
        name: str,
        args: list[str],
        env: dict[str, str] | None = None,
        *,
        health: str | None = "readyz",
        port: int | None = None,
    ) -> Service:
        """Register and start a service. ``health``: readyz (pipeline services with METRICS_PORT),
        a full URL, or None."""
        env = dict(env or {})
        health_url = None
        if health == "readyz":
            port = port or free_port()
            env.setdefault("METRICS_PORT", str(port))
            health_url = f"http://127.0.0.1:{env['METRICS_PORT']}/readyz"
        elif health:
            health_url = health
        svc = Service(name, args, env, health_url, self.workdir / "logs" / f"{name}.log")
        self.services[name] = svc
        self.start(name)
        return svc

    def start(self, name: str) -> Service:
        svc = self.services[name]
        env = {**os.environ, **self.base_env, **svc.env, "PYTHONUNBUFFERED": "1"}
        log = open(svc.log_path, "ab")  # noqa: SIM115 - handed to the child
        svc.proc = subprocess.Popen(
            [sys.executable, "-m", entry_point(svc.args), *svc.args],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        svc.starts += 1
        svc.history.append(f"start pid={svc.proc.pid}")
        return svc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        svc = self.services[name]
        if svc.proc is not None and svc.proc.poll() is None:
            svc.proc.send_signal(sig)
            svc.proc.wait(30)
            svc.history.append(f"signal {signal.Signals(sig).name}")

    async def wait_ready(self, names: list[str] | None = None, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        pending = [n for n in (names or list(self.services)) if self.services[n].health_url]
        async with aiohttp.ClientSession() as session:
            while pending:
                for name in list(pending):
                    svc = self.services[name]
                    if svc.proc is not None and svc.proc.poll() is not None:
                        raise RuntimeError(
                            f"{name} exited with {svc.proc.returncode}; see {svc.log_path}\n" + self.tail(name)
                        )
                    try:
                        async with session.get(svc.health_url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                            if r.status == 200:
                                pending.remove(name)
                    except (TimeoutError, aiohttp.ClientError):
                        pass
                if pending and time.monotonic() > deadline:
                    raise TimeoutError(f"not ready after {timeout}s: {pending}")
                if pending:
                    await asyncio.sleep(0.3)

    def tail(self, name: str, lines: int = 30) -> str:
        try:
            return "\n".join(self.services[name].log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop_all(self, timeout: float = 30.0) -> dict[str, int | None]:
        codes: dict[str, int | None] = {}
        for svc in reversed(list(self.services.values())):
            if svc.running:
                svc.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        self.stop_seconds: dict[str, float] = {}
        started = time.monotonic()
        for svc in self.services.values():
            if svc.proc is None:
                continue
            try:
                codes[svc.name] = svc.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                svc.proc.kill()
                codes[svc.name] = svc.proc.wait(10)
            self.stop_seconds[svc.name] = round(time.monotonic() - started, 1)
        return codes
