"""``python -m devkit up|down|status``: the local profile — every service against the simulators, in the background.

``up`` (``make up``):

1. Kafka: ``KAFKA_BOOTSTRAP`` when set, else the local broker, started or reused
   (:func:`devkit.localkafka.broker_for_run`: free ports when 9092/9093 are taken).
2. Secrets: random values generated on first use in ``<state>/secrets/`` (mode 0600) and kept for
   later runs; the simulators are started with the same values. The Kustomer webhook token is the
   Kustomer simulator's: ``pipeline webhooks register --write-secret-file`` stores it there.
3. Ports: ingest 8080 (``INGEST_PORT``), the CloudTalk simulator 8092 (``LOCAL_CLOUDTALK_PORT``),
   the Kustomer simulator 8091 (``LOCAL_KUSTOMER_PORT``); a default another process holds is
   replaced by a free port (said), a port chosen in the environment that is taken stops ``up``
   with one line. Every other service serves its metrics on a free port.
4. The integrations file ``deploy/integrations.local.yaml`` — or, when the ports or the state
   directory differ from what it says, a copy with this run's values in ``<state>/integrations.yaml``.
5. Topics with this run's prefix (``TOPIC_PREFIX``, else ``local-<UTC time>-``): the simulators
   start empty, so the pipeline's ledgers and cursors start empty too.
6. The simulators (CloudTalk seeded with a number, an agent and workflow automations posting to
   ingest), the Kustomer webhook registration, then ingest, the four processors, both sinks and
   the three pollers — each a process of its own session (it outlives ``up``), its log in
   ``<state>/logs/<name>.log``; ``up`` returns once every one is ready.
7. ``<state>/state.json`` records what it started (PIDs with their start marks, ports, logs, and
   whether it started the broker); ``<state>/env`` holds shell variables for this run (``INGEST``,
   ``CLOUDTALK_SIM``, ``KUSTOMER_SIM``, ``PIPELINE_ENV``). It prints where everything listens.

``down`` (``make down``) stops exactly the processes ``state.json`` names (SIGTERM, SIGKILL after
30 s; a PID that now belongs to another process is left alone) and the broker only when ``up``
started it. ``status`` shows what runs and whether it is ready.

The state directory is ``.run/local`` of the repository (git-ignored), or ``DEVKIT_LOCAL_DIR``
or ``--state-dir``. The simulators get their keys on the command line: this is a profile for one
person's machine, not for shared hosts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from devkit.errors import DevkitError
from devkit.localkafka import LocalKafka, RunBroker, broker_for_run
from devkit.net import choose_port
from devkit.stack import REPO_ROOT, Stack, pid_alive, shown, stop_pids
from devkit.wiring import cloudtalk_workflows, register_kustomer_webhook, sim
from pipeline.kafka.topics import Topics, ensure_topics

CONFIG = REPO_ROOT / "deploy" / "integrations.local.yaml"
DEFAULT_DIR = REPO_ROOT / ".run" / "local"
INTEGRATION = "support"  # the one integration of the local file

# What deploy/integrations.local.yaml says (a unit test keeps the two in step); a run on other
# ports or with another state directory runs a copy with its own values.
FILE_URLS = {"sim-cloudtalk": "http://127.0.0.1:8092", "sim-kustomer": "http://127.0.0.1:8091"}
FILE_SECRET = re.compile(r"\{file: \.run/local/secrets/([a-z0-9-]+)\}")

# name -> (variable, default port, what listens there)
PORTS: dict[str, tuple[str, int, str]] = {
    "ingest": ("INGEST_PORT", 8080, "the ingest endpoints"),
    "sim-cloudtalk": ("LOCAL_CLOUDTALK_PORT", 8092, "the CloudTalk simulator"),
    "sim-kustomer": ("LOCAL_KUSTOMER_PORT", 8091, "the Kustomer simulator"),
}

GENERATED_SECRETS = ("cloudtalk-key-id", "cloudtalk-key-secret", "kustomer-api-key", "cloudtalk-webhook-secret")
WEBHOOK_TOKEN = "kustomer-webhook-token"  # the Kustomer simulator makes it; `pipeline webhooks register` stores it

# the pipeline's services, in start order (after the simulators)
SERVICES: dict[str, list[str]] = {
    "ingest": ["ingest"],
    "process-calls": ["process", "calls"],
    "process-sms": ["process", "sms"],
    "process-contacts-import": ["process", "contacts-import"],
    "process-contacts-export": ["process", "contacts-export"],
    "sink-kustomer": ["sink", "kustomer"],
    "sink-cloudtalk": ["sink", "cloudtalk"],
    "poll-calls": ["poll", "calls"],
    "poll-contacts": ["poll", "contacts"],
    "poll-customers": ["poll", "customers"],
}

# the CloudTalk account of the local profile: one number and one agent (the README's call uses both)
CLOUDTALK_SEED: dict[str, Any] = {
    "numbers": [{"caller_id_e164": "+442012345678", "internal_name": "UK Support"}],
    "agents": [{"id": 493933, "firstname": "Max", "lastname": "Yellow", "email": "max.yellow@example.com"}],
}

Say = Callable[[str], None]


def say(text: str) -> None:
    print(text, flush=True)


@dataclass
class Local:
    """The state directory of the local profile and what lives in it."""

    dir: Path

    @classmethod
    def from_args(cls, state_dir: str | None) -> Local:
        raw = state_dir or os.environ.get("DEVKIT_LOCAL_DIR", "").strip()
        return cls(Path(raw).resolve() if raw else DEFAULT_DIR)

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def env_file(self) -> Path:
        return self.dir / "env"

    @property
    def secrets_dir(self) -> Path:
        return self.dir / "secrets"

    def read_state(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise DevkitError(f"cannot read {shown(self.state_file)}: {exc}") from None
        return data

    def write_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_file)

    # -- secrets -----------------------------------------------------------------------------
    def ensure_secrets(self) -> dict[str, str]:
        """The generated secrets: made on first use (random, mode 0600), the same ones afterwards."""
        self.secrets_dir.mkdir(parents=True, exist_ok=True)
        self.secrets_dir.chmod(0o700)
        values = {}
        for name in GENERATED_SECRETS:
            path = self.secrets_dir / name
            value = path.read_text().strip() if path.exists() else ""
            if not value:
                value = secrets.token_hex(20)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(value + "\n")
            values[name] = value
        return values

    # -- the integrations file ---------------------------------------------------------------
    def config_for(self, urls: dict[str, str]) -> Path:
        """``deploy/integrations.local.yaml`` when this run matches it, else a copy with this run's
        simulator URLs and secret files in the state directory."""
        if self.dir == DEFAULT_DIR and all(urls[name] == url for name, url in FILE_URLS.items()):
            return CONFIG
        text = CONFIG.read_text()
        for name, url in FILE_URLS.items():
            text = text.replace(url, urls[name])
        text = FILE_SECRET.sub(lambda m: "{file: " + json.dumps(str(self.secrets_dir / m.group(1))) + "}", text)
        path = self.dir / "integrations.yaml"
        path.write_text(
            "# Written by `python -m devkit up` from deploy/integrations.local.yaml with this run's ports and\n"
            f"# state directory ({self.dir}); rewritten by every `up`.\n" + text
        )
        return path


# --------------------------------------------------------------------------------------------
# up
# --------------------------------------------------------------------------------------------


async def up(local: Local) -> int:
    started_at = time.monotonic()
    prior = local.read_state()
    if prior is not None:
        alive = [s["name"] for s in prior["services"] if pid_alive(s["pid"], s.get("mark"))]
        if alive and len(alive) == len(prior["services"]):
            say(f"already up (started {prior['started_at']}); `python -m devkit down` stops it")
            return await status(local)
        if alive:
            raise DevkitError(
                f"{len(alive)} of the {len(prior['services'])} processes of the last `up` still run "
                f"({', '.join(alive)}); `python -m devkit down` stops them first"
            )
        local.state_file.unlink()  # a run that ended without `down`: nothing of it runs, but maybe its broker
    say(f"python -m devkit up: the local profile (state {shown(local.dir)})")
    # the ports first: a port chosen in the environment that is taken stops `up` before anything started
    ports = {name: choose_port(var, port, what, lambda t: say(f"  {t}")) for name, (var, port, what) in PORTS.items()}
    kafka = await asyncio.to_thread(broker_for_run, lambda text: say(f"  {text}"))
    earlier = (prior or {}).get("broker") or {}
    if earlier.get("started") and kafka.local is not None and kafka.local.pid() == earlier.get("pid"):
        kafka.started = True  # the broker an earlier `up` started is still this profile's to stop
    say(f"  Kafka: {kafka.describe()}")
    stack = Stack(local.dir, {}, detach=True)
    try:
        state = await _start(local, kafka, ports, stack)
    except BaseException:  # a failure, or Ctrl-C: nothing of this `up` is left running
        say(f"  stopping the {len(stack.services)} processes it started …")
        await asyncio.to_thread(stack.stop_all)
        if kafka.started and kafka.local is not None:
            await asyncio.to_thread(kafka.local.down, 30.0, True)
            say("  stopped the Kafka broker it started")
        local.state_file.unlink(missing_ok=True)
        raise
    _print_table(state["services"])
    say(
        f"\nup in {time.monotonic() - started_at:.0f} s. `. {shown(local.env_file)}` sets INGEST, CLOUDTALK_SIM, "
        "KUSTOMER_SIM (and PIPELINE_ENV for pipeline commands: `env $PIPELINE_ENV .venv/bin/pipeline lag "
        "process-calls`);\n`python -m devkit status` shows what runs, `python -m devkit down` stops it."
    )
    return 0


async def _start(local: Local, kafka: RunBroker, ports: dict[str, int], stack: Stack) -> dict[str, Any]:
    """Everything after the broker, started in ``stack`` (which the caller stops on failure); the state."""
    values = local.ensure_secrets()
    say(f"  secrets: {shown(local.secrets_dir)}/ (random, generated on first use, mode 0600)")
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    config = local.config_for(urls)
    say(f"  integrations file: {shown(config)}")
    prefix = os.environ.get("TOPIC_PREFIX", "").strip() or f"local-{datetime.now(UTC):%Y%m%dT%H%M%S}-"
    report = await ensure_topics(kafka.bootstrap, Topics(prefix).specs())
    if not report.ok:
        raise DevkitError(f"topics with prefix {prefix!r} exist with other settings: " + "; ".join(report.lines()))
    say(f"  topics: prefix {prefix!r} ({len(report.created)} created)")

    for old in (local.dir / "logs").glob("*.log"):
        old.unlink()  # this run's logs only
    env = stack.base_env
    env |= {
        "KAFKA_BOOTSTRAP": kafka.bootstrap,
        "TOPIC_PREFIX": prefix,
        "PIPELINE_CONFIG": str(config),
        "LOG_LEVEL": os.environ.get("LOG_LEVEL", "INFO"),
    }
    state: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "bootstrap": kafka.bootstrap,
        "broker": {"started": kafka.started, "state_dir": str(kafka.local.state_dir), "pid": kafka.local.pid()}
        if kafka.local is not None
        else None,
        "topic_prefix": prefix,
        "config": str(config),
        "urls": urls,
        "services": [],
    }

    def record() -> None:  # after every start: a `down` after an interrupted `up` finds everything
        state["services"] = [
            {
                "name": svc.name,
                "pid": svc.pid,
                "mark": svc.mark,
                "url": svc.url,
                "health": svc.health_url,
                "metrics": f"http://127.0.0.1:{svc.metrics_port}/metrics" if svc.metrics_port else None,
                "log": str(svc.log_path),
            }
            for svc in stack.services.values()
        ]
        local.write_state(state)

    say("  starting the simulators …")
    stack.add_simulator(
        "sim-cloudtalk",
        "cloudtalk",
        ports["sim-cloudtalk"],
        ["--key-id", values["cloudtalk-key-id"], "--key-secret", values["cloudtalk-key-secret"]],
    )
    stack.add_simulator(
        "sim-kustomer",
        "kustomer",
        ports["sim-kustomer"],
        ["--api-key", values["kustomer-api-key"], "--org-name", "acme", "--webhook-allow-http"],
    )
    record()
    await stack.wait_ready(timeout=60)
    async with aiohttp.ClientSession() as http:
        workflows = cloudtalk_workflows(urls["ingest"], INTEGRATION, values["cloudtalk-webhook-secret"])
        await sim(http, "POST", f"{urls['sim-cloudtalk']}/_sim/seed", {**CLOUDTALK_SEED, "workflows": workflows})
    say(f"  CloudTalk: {len(workflows)} workflow automations post to {urls['ingest']}/ingest/cloudtalk/{INTEGRATION}/…")
    said = await register_kustomer_webhook(stack, urls["ingest"], INTEGRATION)
    say(f"  Kustomer: {said} (token in {shown(local.secrets_dir / WEBHOOK_TOKEN)})")

    say(f"  starting {len(SERVICES)} services …")
    for name, args in SERVICES.items():
        if name == "ingest":
            svc = stack.add(name, [*args, "--port", str(ports["ingest"])], health=f"{urls['ingest']}/readyz")
            svc.url = urls["ingest"]
        else:
            stack.add(name, args)
        record()
    await stack.wait_ready(timeout=180)
    _write_env(local, urls, env)
    return state


def _write_env(local: Local, urls: dict[str, str], env: dict[str, str]) -> None:
    config = Path(env["PIPELINE_CONFIG"])
    pipeline_env = " ".join(
        f"{k}={v}"
        for k, v in {
            "KAFKA_BOOTSTRAP": env["KAFKA_BOOTSTRAP"],
            "TOPIC_PREFIX": env["TOPIC_PREFIX"],
            "PIPELINE_CONFIG": config.relative_to(REPO_ROOT) if config.is_relative_to(REPO_ROOT) else config,
        }.items()
    )
    local.env_file.write_text(
        f"# Written by `python -m devkit up` ({datetime.now(UTC).isoformat(timespec='seconds')}); read it with\n"
        f"# `. {shown(local.env_file)}`. Where this run listens:\n"
        f"INGEST={shlex.quote(urls['ingest'])}\n"
        f"CLOUDTALK_SIM={shlex.quote(urls['sim-cloudtalk'])}\n"
        f"KUSTOMER_SIM={shlex.quote(urls['sim-kustomer'])}\n"
        "# The pipeline's settings of this run, for its commands (from the repository):\n"
        "#   env $PIPELINE_ENV .venv/bin/pipeline lag process-calls sink-kustomer\n"
        f"PIPELINE_ENV={shlex.quote(pipeline_env)}\n"
    )


def _print_table(services: list[dict[str, Any]], states: dict[str, str] | None = None) -> None:
    """One row per process: name, (state,) pid, where it listens, its metrics, its log."""
    rows = [["", "pid", "listens on", "metrics", "log"]]
    for s in services:
        metrics = s["metrics"] or (f"{s['url']}/metrics" if s["name"] == "ingest" else "")
        rows.append([s["name"], str(s["pid"]), s["url"] or "", metrics, shown(Path(s["log"]))])
    if states is not None:
        for row in rows:
            row.insert(1, states[row[0]] if row[0] else "state")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    say("")
    for r in rows:
        say("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])


# --------------------------------------------------------------------------------------------
# down, status
# --------------------------------------------------------------------------------------------


async def down(local: Local) -> int:
    state = local.read_state()
    if state is None:
        say(f"nothing to stop: no {shown(local.state_file)} (`python -m devkit up` writes it)")
        return 0
    targets = [(s["name"], s["pid"], s.get("mark")) for s in reversed(state["services"])]
    outcome = await asyncio.to_thread(stop_pids, targets, 30.0)
    for name, _pid, _mark in targets:
        say(f"  {name:<24} {outcome[name]}")
    broker = state.get("broker")
    if broker and broker["started"]:
        local_kafka = LocalKafka(state_dir=Path(broker["state_dir"]))
        if broker["pid"] is not None and local_kafka.pid() == broker["pid"]:
            await asyncio.to_thread(local_kafka.down, 30.0, True)
            say(f"  {'kafka broker':<24} stopped")
        else:
            say(f"  {'kafka broker':<24} not running (or not the one `up` started: left alone)")
    elif broker:
        say(f"  {'kafka broker':<24} left running (it ran before `up`)")
    local.state_file.unlink(missing_ok=True)
    local.env_file.unlink(missing_ok=True)
    killed = [n for n, o in outcome.items() if o == "killed"]
    if killed:
        say(f"did not stop on SIGTERM within 30 s, killed: {', '.join(killed)} (see their logs)")
    return 0


async def status(local: Local) -> int:
    state = local.read_state()
    if state is None:
        say(f"not up: no {shown(local.state_file)} (`python -m devkit up` starts the local profile)")
        return 1
    states: dict[str, str] = {}
    async with aiohttp.ClientSession() as http:
        for s in state["services"]:
            if not pid_alive(s["pid"], s.get("mark")):
                states[s["name"]] = "not running"
                continue
            states[s["name"]] = "running"
            if s.get("health"):
                try:
                    async with http.get(s["health"], timeout=aiohttp.ClientTimeout(total=2)) as r:
                        states[s["name"]] = "ready" if r.status == 200 else f"not ready ({r.status})"
                except (TimeoutError, aiohttp.ClientError):
                    states[s["name"]] = "not answering"
    say(f"the local profile (state {shown(local.dir)}), up since {state['started_at']}")
    broker = state.get("broker")
    kafka = f"Kafka {state['bootstrap']}"
    if broker:
        running = LocalKafka(state_dir=Path(broker["state_dir"])).pid() is not None
        kafka += f" (local broker, {'running' if running else 'NOT RUNNING'})"
    say(f"  {kafka}; topic prefix {state['topic_prefix']!r}; integrations file {shown(Path(state['config']))}")
    _print_table(state["services"], states)
    bad = [n for n, v in states.items() if v != "ready"]
    if bad:
        say(f"\nnot ready: {', '.join(bad)} (see their logs)")
    return 1 if bad else 0


# --------------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction, name: str) -> None:
    from devkit.cli import COMMANDS

    commands = {"up": up, "down": down, "status": status}
    p = sub.add_parser(name, help=COMMANDS[name][1], description=COMMANDS[name][1])
    p.add_argument(
        "--state-dir", help="state, logs and secrets (env DEVKIT_LOCAL_DIR; default .run/local of the repository)"
    )
    p.set_defaults(func=lambda args: asyncio.run(commands[name](Local.from_args(args.state_dir))))


def register_up(sub: argparse._SubParsersAction) -> None:
    register(sub, "up")


def register_down(sub: argparse._SubParsersAction) -> None:
    register(sub, "down")


def register_status(sub: argparse._SubParsersAction) -> None:
    register(sub, "status")
