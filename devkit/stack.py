"""Run the pipeline's services as separate processes (the demo, the local profile, the end-to-end tests).

Each service is ``python -m pipeline <args>`` (``python -m devkit sim …`` for a simulator) with
its own environment, its log in ``<workdir>/logs/<name>.log`` and its health endpoint on a free
port. ``stop_all`` sends SIGTERM in reverse start order, waits, and kills what is left.

A detached stack (``python -m devkit up``) starts each process in its own session, so it
outlives the command that started it; :func:`stop_pids` stops such processes later, by the PID
and start mark recorded then (:func:`process_mark`), from another process. The local broker is
stopped the same way (:mod:`devkit.localkafka`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from devkit.errors import DevkitError
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
    url: str | None = None  # where it serves requests (simulators, ingest)
    mark: str | None = None  # process_mark of the running process

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def metrics_port(self) -> int | None:
        port = self.env.get("METRICS_PORT")
        return int(port) if port else None


class Stack:
    def __init__(self, workdir: Path, base_env: dict[str, str], *, detach: bool = False) -> None:
        """``detach``: every process in a session of its own, to outlive this one (stop it with
        :func:`stop_pids`); otherwise they belong to this process and ``stop_all`` stops them."""
        self.workdir = workdir
        (workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.base_env = base_env
        self.detach = detach
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

    def add_simulator(self, name: str, platform: str, port: int, args: list[str]) -> Service:
        """Register and start ``python -m devkit sim <platform>`` on ``port``; ready when it answers."""
        url = f"http://127.0.0.1:{port}"
        svc = self.add(name, ["sim", platform, "--port", str(port), *args], health=f"{url}/_sim/settings")
        svc.url = url
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
            start_new_session=self.detach,
        )
        log.close()
        svc.mark = process_mark(svc.proc.pid)
        svc.starts += 1
        svc.history.append(f"start pid={svc.proc.pid}")
        return svc

    async def run_once(self, args: list[str]) -> tuple[str, str]:
        """Run a one-shot command (``python -m pipeline <args>``) with the stack's environment;
        its stdout and stderr, or :class:`DevkitError` naming the command when it fails."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            entry_point(args),
            *args,
            cwd=REPO_ROOT,
            env={**os.environ, **self.base_env},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise DevkitError(
                f"{entry_point(args)} {' '.join(args[:2])} failed (exit {proc.returncode}): "
                f"{err.decode(errors='replace').strip()[-800:]}"
            )
        return out.decode(errors="replace"), err.decode(errors="replace")

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
                        raise DevkitError(
                            f"{name} exited with {svc.proc.returncode}; see {svc.log_path}\n" + self.tail(name)
                        )
                    try:
                        async with session.get(svc.health_url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                            if r.status == 200:
                                pending.remove(name)
                    except (TimeoutError, aiohttp.ClientError):
                        pass
                if pending and time.monotonic() > deadline:
                    logs = ", ".join(str(self.services[n].log_path) for n in pending)
                    raise DevkitError(f"not ready after {timeout:.0f}s: {', '.join(pending)}; see {logs}")
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


# --------------------------------------------------------------------------------------------
# Processes found again by PID (detached stacks, the local broker)
# --------------------------------------------------------------------------------------------


def shown(path: Path) -> str:
    """``path`` as a person types it here: relative to the current directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def process_mark(pid: int) -> str | None:
    """When the process ``pid`` started (as the system tells it), or None when there is none.
    A PID is reused after its process ended; PID and mark together name one process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            # fields after the command name in parentheses: state is field 3, starttime field 22
            return fh.read().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        if os.path.isdir("/proc"):
            return None
    except (OSError, IndexError):
        return None
    try:  # no /proc (macOS): ps says when it started
        out = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def pid_alive(pid: int, mark: str | None = None) -> bool:
    """True while ``pid`` runs (a zombie counts as gone) and, with ``mark``, is still the same process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except (OSError, IndexError):
        pass
    return mark is None or process_mark(pid) == mark


def _reap(pid: int) -> None:
    """Collect the exit status of a child of this process (others are reaped by their parent)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_pids(targets: Sequence[tuple[str, int, str | None]], timeout: float = 30.0) -> dict[str, str]:
    """Stop processes by ``(name, pid, mark)``: SIGTERM to each, wait up to ``timeout`` for all
    of them, SIGKILL what is left. A PID whose process is gone, or is another process now (its
    mark differs), is left alone. Returns name -> ``stopped`` | ``killed`` | ``not running``."""
    outcome: dict[str, str] = {}
    live: list[tuple[str, int, str | None]] = []
    for name, pid, mark in targets:
        if not pid_alive(pid, mark):
            outcome[name] = "not running"
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            outcome[name] = "not running"
            continue
        live.append((name, pid, mark))
    deadline = time.monotonic() + timeout
    while live:
        for _name, pid, _mark in live:
            _reap(pid)
        still = [t for t in live if pid_alive(t[1], t[2])]
        for name, _pid, _mark in set(live) - set(still):
            outcome[name] = "stopped"
        live = still
        if not live or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for name, pid, mark in live:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for _ in range(50):
            _reap(pid)
            if not pid_alive(pid, mark):
                break
            time.sleep(0.1)
        outcome[name] = "killed"
    return outcome
