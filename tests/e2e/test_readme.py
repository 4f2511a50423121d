"""The README's "One call end to end", exactly as written, against ``python -m devkit up``.

The commands between ``<!-- first-hour -->`` and ``<!-- /first-hour -->`` are read from the
README and run one by one in one bash (so the variables they set carry over), in a directory
whose ``.run/local`` is the state directory of the ``up`` this test starts: on free ports, with
the session's broker (``KAFKA_BOOTSTRAP``), so nothing of a developer's own ``make up`` is
touched. ``make up`` and ``make down`` are run as what the Makefile runs,
``python -m devkit up|down``.

A command is the lines of one paragraph (between blank lines) after its leading comments; the
lines starting ``#   `` after it are what it must print, where a line ``…`` stands for any lines.
A command that reads a simulator's ``/_sim/`` state is repeated until it prints that (the
pipeline is asynchronous); every other command runs once. Then the Kustomer simulator must hold
the call's conversation and note exactly once, and ``down`` must leave no process behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from devkit.net import free_port
from devkit.stack import pid_alive
from tests.conftest import REPO

# `devkit up` picks a free port per service and binds it a moment later: alone, so that no other
# test's process takes one in between
pytestmark = [pytest.mark.kafka, pytest.mark.e2e, pytest.mark.serial]

BLOCK = re.compile(r"<!-- first-hour -->\n```sh\n(.*?)```\n<!-- /first-hour -->", re.S)
OUTPUT = "#   "
ANY = "…"


@dataclass
class Step:
    command: str
    expected: list[str]

    @property
    def polls(self) -> bool:
        return "/_sim/" in self.command


def readme_steps() -> list[Step]:
    found = BLOCK.search((REPO / "README.md").read_text())
    assert found, "README.md has no <!-- first-hour --> ```sh … ``` <!-- /first-hour --> block"
    steps = []
    for paragraph in found.group(1).split("\n\n"):
        lines = paragraph.strip("\n").splitlines()
        while lines and lines[0].startswith("#") and not lines[0].startswith(OUTPUT):
            lines.pop(0)  # what the command is for
        expected = []
        while lines and lines[-1].startswith(OUTPUT):
            expected.insert(0, lines.pop()[len(OUTPUT) :].rstrip())
        assert lines, f"a paragraph without a command: {paragraph!r}"
        steps.append(Step("\n".join(lines), expected))
    return steps


def matches(expected: list[str], got: list[str]) -> bool:
    """``got`` line by line as ``expected`` says, where a line ``…`` matches any lines."""
    if not expected:
        return not got
    if expected[0] == ANY:
        return any(matches(expected[1:], got[i:]) for i in range(len(got) + 1))
    return bool(got) and got[0] == expected[0] and matches(expected[1:], got[1:])


class Shell:
    """One bash for the whole block: commands in, their output (stdout and stderr) out."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def run(self, command: str, timeout: float = 60.0) -> tuple[int, list[str]]:
        marker = f"__step_done_{uuid.uuid4().hex}__"
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{command}\n__rc=$?; printf '\\n{marker} %s\\n' \"$__rc\"\n")
        self.proc.stdin.flush()
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no end of {command!r} after {timeout}s; it printed {out}") from None
            if line.startswith(marker):
                while out and not out[-1].strip():
                    out.pop()
                return int(line.split()[-1]), out
            out.append(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)


def devkit(action: str, env: dict[str, str], timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devkit", action],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_readme_steps_parse_into_up_commands_and_down():
    steps = readme_steps()
    assert steps[0].command.splitlines()[0] == "make up" and steps[-1].command == "make down"
    makefile = (REPO / "Makefile").read_text()
    for action in ("up", "down"):
        assert re.search(rf"^{action}: .*\n\t\$\(PY\) -m devkit {action}\n", makefile, re.M), f"make {action}"
    posts = [s for s in steps if "curl" in s.command and "-w ' %{http_code}\\n'" in s.command]
    assert len(posts) == 4 and all(s.expected and s.expected[-1].endswith(" 202") for s in posts)
    assert sum(s.polls for s in steps) == 3


async def test_one_call_end_to_end_by_hand_as_the_readme_says(kafka_bootstrap: str, tmp_path: Path):
    state_dir = tmp_path / ".run" / "local"
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP": kafka_bootstrap,
        "TOPIC_PREFIX": f"readme{uuid.uuid4().hex[:8]}-",
        "DEVKIT_LOCAL_DIR": str(state_dir),
        "INGEST_PORT": str(free_port()),
        "LOCAL_CLOUDTALK_PORT": str(free_port()),
        "LOCAL_KUSTOMER_PORT": str(free_port()),
    }
    steps = readme_steps()
    up = await asyncio.to_thread(devkit, "up", env)
    assert up.returncode == 0, up.stdout + up.stderr
    state = json.loads((state_dir / "state.json").read_text())
    recorded = [(s["name"], s["pid"], s["mark"]) for s in state["services"]]
    assert {n for n, _, _ in recorded} >= {"ingest", "sim-cloudtalk", "sim-kustomer", "sink-kustomer"}
    assert state["broker"] is None, "KAFKA_BOOTSTRAP given: no broker of its own"
    for name in ("cloudtalk-key-id", "cloudtalk-key-secret", "kustomer-api-key", "cloudtalk-webhook-secret"):
        assert (state_dir / "secrets" / name).stat().st_mode & 0o777 == 0o600
    shell = Shell(tmp_path, env)
    try:
        first = steps[0].command.splitlines()
        for step in [Step("\n".join(first[1:]), steps[0].expected), *steps[1:-1]]:
            deadline = time.monotonic() + (60 if step.polls else 0)
            while True:
                rc, out = await asyncio.to_thread(shell.run, step.command)
                if rc == 0 and matches(step.expected, out):
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"README step:\n{step.command}\nprinted (exit {rc}):\n"
                        + "\n".join(out)
                        + "\ninstead of:\n"
                        + "\n".join(step.expected)
                    )
                await asyncio.sleep(0.5)

        k_url = state["urls"]["sim-kustomer"]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{k_url}/_sim/state") as r:
                k_state = await r.json()
            async with http.get(f"{k_url}/_sim/requests") as r:
                effects = [e["effect"].split()[0] for e in (await r.json())["requests"] if e.get("effect")]
        call = [c for c in k_state["conversations"] if c["attributes"]["externalId"] == "cloudtalk-call-1002409191"]
        assert len(call) == 1, k_state["conversations"]
        notes = [n for n in k_state["notes"] if n["relationships"]["conversation"]["data"]["id"] == call[0]["id"]]
        assert len(notes) == 1 and notes[0]["attributes"]["body"].startswith("CloudTalk call 1002409191\n")
        assert effects.count("conversation.create") == 2 and effects.count("note.create") == 2, effects
    finally:
        shell.close()
        down = await asyncio.to_thread(devkit, "down", env)
    assert down.returncode == 0, down.stdout + down.stderr
    left = [name for name, pid, mark in recorded if pid_alive(pid, mark)]
    assert not left, f"still running after down: {left}"
    assert not (state_dir / "state.json").exists()
