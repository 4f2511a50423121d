"""The container end-to-end test: README "Deploy" run with podman-compose against real containers.

``.ci/containers-test`` (``make test-containers``) builds the images, then runs this script. It
runs the README's blocks (``<!-- deploy-NAME -->``) verbatim, with ``podman-compose`` in place of
``docker compose``, in a copy of the compose project under ``<state>/project``. The copy holds
``docker-compose.yml``, the mounted integrations and Prometheus files, and its own ``secrets/``.
It differs in three places: the ``build`` line is left out (the images were built with
``podman build``, on Debian bases), the host ports are free ones (``*_PUBLISH``), and the replay
window is this run's. Between the blocks it drives traffic and checks the effects:

1. ``deploy-secrets``, ``deploy-up``: the stack starts; every service answers ``/readyz``.
2. The Kustomer webhook token is still empty. Ingest says why at start and answers 401 on the
   Kustomer endpoint, and calls and SMS flow anyway.
3. ``deploy-register``: the webhook is registered, the token stored, and ingest restarted.
4. Traffic: 200 calls and 50 SMS ended in the CloudTalk simulator (its workflow automations post
   them to the ingest container), 10 contacts created in CloudTalk and 10 customers created in
   Kustomer (signed webhooks). Mid-stream, ``podman kill`` hits a processor and a sink, and a
   second processor crashes (SIGKILL of its process). The restart policy or ``podman start``
   brings each one back.
5. Exactly once, in the simulators' state and request logs: one conversation per externalId, one
   note per conversation, one Kustomer customer per phone and per CloudTalk contact, one CloudTalk
   contact per Kustomer customer, every write counted in ``/_sim/requests``. No webhook delivery
   is left pending or failed.
6. Prometheus scrapes every service (``/api/v1/targets``: all up) and evaluates the rules of
   ``deploy/prometheus/rules.yml`` (``/api/v1/rules``: every group, no rule failing).
7. ``deploy-operate`` (``pipeline lag``, ``pipeline replay raw`` of the calls, logs): the replay
   reaches the sink and writes nothing.
8. ``deploy-down``, then ``deploy-up`` again. The volume kept the ledgers (sink metrics), the
   consumer offsets (nothing is processed again) and the poller cursors (the pollers continue,
   they do not import again). A replay of all four raw topics reaches the sinks and writes
   nothing to the simulators, which started empty.

Any failed check stops the run with the reason, the containers' states and the last log lines.
The load is bounded: about 260 requests to the simulators, paced over half a minute. At the end
the stack and its volumes are removed, unless ``CONTAINERS_KEEP=1``. A summary of the figures is
printed and written to ``<state>/summary.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
PROJECT_NAME = "ctk-containers-test"
INTEGRATION = "support"
SUPPORT_LINE = "+442012345678"  # the CloudTalk number of every call and SMS
CALLS, SMS, CT_CONTACTS, K_CUSTOMERS = 200, 50, 10, 10
CALLS_BEFORE_TOKEN, SMS_BEFORE_TOKEN = 20, 10
CALLER_NUMBERS = [f"+421907400{n:03d}" for n in range(40)]  # unknown numbers: the pipeline makes their customers
CALL_KINDS = [("incoming", "answered"), ("incoming", "missed"), ("outgoing", "answered")]
NO_TOKEN = (
    "An integration without a Kustomer webhook token (no reference, or its secret file empty or unreadable) "
    "must not stop ingest: ingest logs one warning at start naming the integration and why, answers 401 on "
    "/ingest/kustomer/<integration>, and takes every other webhook (pipeline/ingest/app.py run())."
)
BUILD_LINE = re.compile(r"^podman-compose( --profile \S+)* build\b")
REPLAY_WINDOW = re.compile(r"--from \S+ --to \S+")


class Failed(Exception):
    pass


def say(text: str) -> None:
    print(text, flush=True)


def utc(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(what: str, check: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    """``check()`` until it returns something true (returned) or raises nothing; Failed after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = check()
            if result:
                return result
            last = result
        except (OSError, ValueError, KeyError, Failed) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise Failed(f"{what}: not within {timeout:.0f} s (last: {str(last)[:400]})")
        time.sleep(every)


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, raw: bytes | None = None):
    """(status, decoded JSON or text) of one request; HTTP errors are answers, not exceptions."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    try:
        return status, json.loads(text) if text else None
    except ValueError:
        return status, text


def ok(method: str, url: str, body: Any = None) -> Any:
    status, answer = http(method, url, body)
    if status >= 300:
        raise Failed(f"{method} {url} -> {status}: {str(answer)[:300]}")
    return answer


def metrics(url: str) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value}."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def metric_sum(values: dict[str, float], name: str, **labels: str) -> float:
    total = 0.0
    for key, value in values.items():
        if key == name or key.startswith(name + "{"):
            if all(f'{k}="{v}"' in key for k, v in labels.items()):
                total += value
    return total


# --------------------------------------------------------------------------------------------
# The compose project
# --------------------------------------------------------------------------------------------


class Stack:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.dir = state / "project"
        self.logs = state / "logs"
        self.ports = {
            "INGEST_PUBLISH": free_port(),
            "SIM_CLOUDTALK_PUBLISH": free_port(),
            "SIM_KUSTOMER_PUBLISH": free_port(),
            "PROMETHEUS_PUBLISH": free_port(),
        }
        self.env = {
            **os.environ,
            "COMPOSE_PROJECT_NAME": PROJECT_NAME,
            **{k: f"127.0.0.1:{p}" for k, p in self.ports.items()},
            # a broker for a short run on a small machine (as the local broker): small heap, C1 only
            "KAFKA_HEAP_OPTS": "-Xmx512m -Xms512m",
            "KAFKA_JVM_PERFORMANCE_OPTS": "-XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true",
            "PROMETHEUS_IMAGE": os.environ.get("PROMETHEUS_IMAGE", "prom/prometheus:v3.5.0"),
        }
        self.env.pop("SECRETS_DIR", None)
        self.env.pop("PIPELINE_CONFIG_FILE", None)
        self.compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
        self.runs = 0

    # -- urls --------------------------------------------------------------------------------
    def url(self, var: str) -> str:
        return f"http://127.0.0.1:{self.ports[var]}"

    @property
    def ingest(self) -> str:
        return self.url("INGEST_PUBLISH")

    @property
    def ct(self) -> str:
        return self.url("SIM_CLOUDTALK_PUBLISH")

    @property
    def k(self) -> str:
        return self.url("SIM_KUSTOMER_PUBLISH")

    @property
    def prometheus(self) -> str:
        return self.url("PROMETHEUS_PUBLISH")

    # -- commands ------------------------------------------------------------------------------
    def sh(
        self,
        script: str,
        what: str,
        timeout: float = 300,
        check: bool = True,
        watch: Callable[[], None] | None = None,
    ) -> str:
        """A shell script in the project directory (bash -euo pipefail): its output, also kept in
        <state>/logs/NN-<what>.log. ``watch`` is called every 2 s while it runs; what it raises
        stops the script."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self.runs += 1
        log = self.logs / f"{self.runs:02d}-{re.sub(r'[^a-z0-9]+', '-', what.lower()).strip('-')[:60]}.log"
        with open(log, "wb") as out:
            out.write(f"$ {script}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                ["bash", "-euo", "pipefail", "-c", script],
                cwd=self.dir,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            deadline = time.monotonic() + timeout
            while True:
                try:
                    rc = proc.wait(timeout=2)
                    break
                except subprocess.TimeoutExpired:
                    try:
                        if time.monotonic() > deadline:
                            raise Failed(f"{what}: still running after {timeout:.0f} s (log {log})") from None
                        if watch is not None:
                            watch()
                    except Failed:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                        raise
        text = log.read_text(errors="replace").split("\n", 1)[1]
        if check and rc != 0:
            raise Failed(f"{what}: exit {rc} (log {log})\n{text[-2000:]}")
        return text

    def readme_block(
        self,
        name: str,
        timeout: float = 300,
        replay_window: str | None = None,
        watch: Callable[[], None] | None = None,
    ) -> str:
        """Run the README's ``deploy-NAME`` block with podman-compose; returns its output."""
        lines = []
        for line in readme_block(name).splitlines():
            line = line.replace("docker compose", "podman-compose")
            if BUILD_LINE.match(line):
                continue  # the images were built by .ci/containers-test
            if replay_window:
                line = REPLAY_WINDOW.sub(replay_window, line)
            lines.append(line)
        script = "\n".join(lines)
        say("    " + "\n    ".join(lines))
        return self.sh(script, f"readme {name}", timeout, watch=watch)

    def podman(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        proc = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise Failed(f"podman {' '.join(args)}: exit {proc.returncode}: {proc.stderr[-800:]}")
        return proc.stdout

    def compose_cmd(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        what = "compose " + " ".join(a for a in args if not a.startswith("-"))
        return self.sh(" ".join(_quote(a) for a in ["podman-compose", *args]), what, timeout, check)

    # -- containers ----------------------------------------------------------------------------
    def container(self, service: str, n: int = 1) -> str:
        return f"{PROJECT_NAME}_{service}_{n}"

    def pipeline_services(self) -> dict[str, int]:
        """Long-running pipeline services (not one-shots, not in a profile) -> replicas."""
        out = {}
        for name, svc in self.compose["services"].items():
            if svc.get("profiles") or name in ("kafka", "prometheus", "topics"):
                continue
            out[name] = int((svc.get("deploy") or {}).get("replicas", 1))
        return out

    def containers(self) -> list[str]:
        return [self.container(s, n) for s, r in self.pipeline_services().items() for n in range(1, r + 1)]

    def inspect(self, name: str) -> dict[str, Any]:
        return json.loads(self.podman("inspect", name))[0]

    def ip(self, name: str) -> str:
        networks = self.inspect(name)["NetworkSettings"]["Networks"]
        return next(iter(networks.values()))["IPAddress"]

    def health_url(self, name: str, path: str = "/readyz") -> str:
        port = 8080 if name == self.container("ingest") else 9100
        return f"http://{self.ip(name)}:{port}{path}"

    def logs_of(self, name: str, tail: int | None = None) -> str:
        args = ["logs", *(["--tail", str(tail)] if tail else []), name]
        proc = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=60)
        return proc.stdout + proc.stderr

    def wait_ready(self, timeout: float = 180) -> float:
        """Every pipeline container answers /readyz 200 (the test polls; podman runs no healthchecks here)."""
        started = time.monotonic()
        for name in self.containers():

            def ready(name: str = name) -> bool:
                state = self.inspect(name)["State"]
                if state["Status"] != "running":
                    raise Failed(f"{name} is {state['Status']} (exit {state.get('ExitCode')})")
                status, body = http("GET", self.health_url(name))
                if status != 200:
                    raise Failed(f"/readyz {status}: {body}")
                return True

            wait_until(f"{name} ready", ready, max(5.0, timeout - (time.monotonic() - started)), 0.5)
        return time.monotonic() - started

    def diagnostics(self) -> str:
        lines = ["containers:"]
        proc = subprocess.run(
            ["podman", "ps", "-a", "--filter", f"name={PROJECT_NAME}_", "--format", "{{.Names}}  {{.Status}}"],
            env=self.env,
            capture_output=True,
            text=True,
        )
        lines.append(proc.stdout)
        for name in [self.container("kafka"), *self.containers()]:
            tail = self.problems_in_log(name)
            if tail:
                lines.append(f"--- {name} (last warnings and errors)\n{tail}")
        return "\n".join(lines)

    def problems_in_log(self, name: str, n: int = 6) -> str:
        """The last ``n`` warning/error lines of a container's log (JSON or Kafka's), else its last lines."""
        text = self.logs_of(name)
        bad = [
            line
            for line in text.splitlines()
            if re.search(r'"level":"(warning|error|critical)"|\] (WARN|ERROR|FATAL) |Traceback|Error:', line)
        ]
        return "\n".join((bad or text.splitlines())[-n:])[-3000:]


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r"[A-Za-z0-9_./:=@%+-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"


def readme_block(name: str) -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(rf"<!-- deploy-{name} -->\n```sh\n(.*?)```\n<!-- /deploy-{name} -->", text, re.S)
    if not m:
        raise Failed(f"README.md has no <!-- deploy-{name} --> block")
    return m.group(1)


# --------------------------------------------------------------------------------------------
# The simulators
# --------------------------------------------------------------------------------------------


def rel(resource: dict[str, Any], name: str) -> Any:
    r = (resource.get("relationships") or {}).get(name)
    return (r.get("data") or {}).get("id") if isinstance(r, dict) else resource.get(name)


def effects(base: str) -> list[str]:
    """State changes the pipeline made through a simulator's API (its request log)."""
    log = ok("GET", f"{base}/_sim/requests")["requests"]
    return [r["effect"] for r in log if r.get("effect") and not r["path"].startswith("/_sim/")]


def kinds(found: list[str]) -> Counter:
    return Counter(e.split(" ", 1)[0] for e in found)


def deliveries(base: str, status: str) -> int:
    return len(ok("GET", f"{base}/_sim/deliveries?status={status}")["deliveries"])


def created_at(resource: dict[str, Any]) -> float:
    """A simulator resource's ``createdAt`` as Unix seconds."""
    return datetime.fromisoformat(resource["attributes"]["createdAt"].replace("Z", "+00:00")).timestamp()


class Traffic:
    """What the test sent and what it expects in the simulators."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.conversations: set[str] = set()  # externalIds
        self.numbers: set[str] = set()  # external numbers of calls and SMS
        self.webhook_since = float("inf")  # when Kustomer's webhook (and its token) were in place
        self.ct_contacts: dict[str, str] = {}  # CloudTalk contact id -> phone
        self.k_customers: dict[str, str] = {}  # Kustomer customer id -> phone
        self.sent = Counter()

    def call(self, i: int) -> None:
        direction, status = CALL_KINDS[i % len(CALL_KINDS)]
        number = CALLER_NUMBERS[i % len(CALLER_NUMBERS)]
        body = {
            "direction": direction,
            "status": status,
            "internal_number": SUPPORT_LINE,
            "external_number": number,
            "talking_time": 0 if status == "missed" else 30 + i % 200,
            "waiting_time": 5,
        }
        call = ok("POST", f"{self.stack.ct}/_sim/calls", body)
        self.conversations.add(f"cloudtalk-call-{call['call_id']}")
        self.numbers.add(number)
        self.sent["calls"] += 1

    def sms(self, i: int) -> None:
        number = CALLER_NUMBERS[(i * 7) % len(CALLER_NUMBERS)]
        body = {
            "direction": "incoming" if i % 3 else "outgoing",
            "internal_number": SUPPORT_LINE,
            "external_number": number,
            "text": f"Message {i} from the container test",
        }
        sms = ok("POST", f"{self.stack.ct}/_sim/sms", body)
        self.conversations.add(f"cloudtalk-sms-{sms['sms_id']}")
        self.numbers.add(number)
        self.sent["sms"] += 1

    def ct_contact(self, i: int) -> None:
        phone = f"+421911200{i:03d}"
        body = {
            "name": f"Container Contact {i:02d}",
            "ContactNumber": [{"public_number": phone}],
            "ContactEmail": [{"email": f"contact{i:02d}@example.org"}],
        }
        created = ok("POST", f"{self.stack.ct}/_sim/contacts", body)
        self.ct_contacts[str(created["id"])] = phone
        self.sent["cloudtalk contacts"] += 1

    def k_customer(self, i: int) -> None:
        phone = f"+421905300{i:03d}"
        body = {"attributes": {"name": f"Container Customer {i:02d}", "phones": [{"type": "mobile", "phone": phone}]}}
        created = ok("POST", f"{self.stack.k}/_sim/customers", body)
        self.k_customers[created["data"]["id"]] = phone
        self.sent["kustomer customers"] += 1

    # -- what the simulators hold ----------------------------------------------------------
    def k_state(self) -> dict[str, Any]:
        return ok("GET", f"{self.stack.k}/_sim/state")

    def ct_state(self) -> dict[str, Any]:
        return ok("GET", f"{self.stack.ct}/_sim/state")

    def arrived(self) -> bool:
        k, ct = self.k_state(), self.ct_state()
        external = {c["attributes"]["externalId"] for c in k["conversations"]}
        exported = {c["attributes"].get("externalId") for c in k["customers"]}
        linked = {c for c in self.k_customers if any(c in u["url"] for x in ct["contacts"] for u in x["ExternalUrl"])}
        missing = {
            "conversations": len(self.conversations - external),
            "notes": max(0, len(self.conversations) - len(k["notes"])),
            "exported contacts": len(set(self.ct_contacts) - exported),
            "imported customers": len(set(self.k_customers) - linked),
            "pending deliveries": deliveries(self.stack.k, "pending") + deliveries(self.stack.ct, "pending"),
        }
        if any(missing.values()):
            raise Failed(f"still missing: {missing}")
        return True

    def check_exactly_once(self) -> dict[str, Any]:
        """Every effect once: in the state and in the request logs. Returns the figures."""
        k, ct = self.k_state(), self.ct_state()
        problems = []
        conv_ids = Counter(c["attributes"]["externalId"] for c in k["conversations"])
        if set(conv_ids) != self.conversations:
            problems.append(
                f"conversations: {len(set(conv_ids) - self.conversations)} unexpected, "
                f"{len(self.conversations - set(conv_ids))} missing"
            )
        dup_conv = {e: n for e, n in conv_ids.items() if n > 1}
        if dup_conv:
            problems.append(f"conversations created more than once: {dup_conv}")
        per_conv = Counter(rel(n, "conversation") for n in k["notes"])
        bad_notes = {c["id"]: per_conv.get(c["id"], 0) for c in k["conversations"] if per_conv.get(c["id"], 0) != 1}
        if bad_notes:
            problems.append(f"conversations without exactly one note: {bad_notes}")
        phones = Counter(p["phone"] for c in k["customers"] for p in (c["attributes"].get("phones") or []))
        dup_phones = {p: n for p, n in phones.items() if n > 1}
        if dup_phones:
            problems.append(f"Kustomer customers sharing a phone: {dup_phones}")
        missing_phones = (self.numbers | set(self.ct_contacts.values()) | set(self.k_customers.values())) - set(phones)
        if missing_phones:
            problems.append(f"no Kustomer customer for {sorted(missing_phones)}")
        exported = Counter(c["attributes"].get("externalId") for c in k["customers"])
        bad_export = {cid: exported.get(cid, 0) for cid in self.ct_contacts if exported.get(cid, 0) != 1}
        if bad_export:
            problems.append(f"CloudTalk contacts not exported exactly once (externalId: customers): {bad_export}")
        links = Counter(
            cid for c in ct["contacts"] for u in c["ExternalUrl"] for cid in self.k_customers if u["url"].endswith(cid)
        )
        bad_import = {cid: links.get(cid, 0) for cid in self.k_customers if links.get(cid, 0) != 1}
        if bad_import:
            problems.append(f"Kustomer customers not imported exactly once (customer: contacts): {bad_import}")
        k_writes, ct_writes = kinds(effects(self.stack.k)), kinds(effects(self.stack.ct))
        want_k = {
            "conversation.create": len(self.conversations),
            "note.create": len(self.conversations),
            "customer.create": len(self.numbers) + len(self.ct_contacts),
        }
        for kind, n in want_k.items():
            if k_writes[kind] != n:
                problems.append(f"Kustomer request log: {k_writes[kind]} × {kind}, expected {n}")
        # The customers the calls and SMS flows created for their (unknown) numbers become contacts
        # too: at once when Kustomer's webhook tells (those created after it was registered), the
        # others at the next reconciliation. Never twice.
        ct_numbers = Counter(
            n if str(n).startswith("+") else f"+{n}" for c in ct["contacts"] for n in c["Contact"]["contact_numbers"]
        )
        callers_created_after = {
            p["phone"]
            for c in k["customers"]
            if created_at(c) >= self.webhook_since
            for p in c["attributes"].get("phones") or []
            if p["phone"] in self.numbers
        }
        on_contacts = {n for n in self.numbers if ct_numbers.get(n)}
        bad_callers = {n: ct_numbers.get(n, 0) for n in self.numbers if ct_numbers.get(n, 0) > 1}
        bad_callers |= {n: 0 for n in callers_created_after - on_contacts}
        if bad_callers:
            problems.append(f"callers' numbers not on exactly one CloudTalk contact: {bad_callers}")
        want = len(self.k_customers) + len(on_contacts)
        if ct_writes["contact.add"] != want:
            problems.append(f"CloudTalk request log: {ct_writes['contact.add']} × contact.add, expected {want}")
        failed = deliveries(self.stack.k, "failed") + deliveries(self.stack.ct, "failed")
        if failed:
            problems.append(f"{failed} webhook deliveries failed")
        if problems:
            raise Failed("exactly once:\n  " + "\n  ".join(problems))
        return {
            "kustomer": {
                "conversations": len(k["conversations"]),
                "notes": len(k["notes"]),
                "customers": len(k["customers"]),
                "writes": dict(k_writes),
            },
            "cloudtalk": {"contacts": len(ct["contacts"]), "writes": dict(ct_writes)},
            "duplicates": 0,
        }


def signed_webhook(stack: Stack, token: str, customer_id: str) -> int:
    body = {
        "id": f"evt-{customer_id}",
        "name": "kustomer.customer.create",
        "createdAt": utc(datetime.now(UTC)),
        "data": {
            "type": "customer",
            "id": customer_id,
            "attributes": {
                "name": "Signed Webhook",
                "phones": [{"type": "mobile", "phone": "+421905399999"}],
                "rev": 1,
                "createdAt": utc(datetime.now(UTC)),
                "updatedAt": utc(datetime.now(UTC)),
            },
        },
    }
    raw = json.dumps(body).encode()
    sig = hmac.new(token.encode(), raw, hashlib.sha256).hexdigest()
    status, _ = http(
        "POST",
        f"{stack.ingest}/ingest/kustomer/{INTEGRATION}",
        raw=raw,
        headers={"X-Kustomer-Webhook-Signature": sig},
    )
    return status


# --------------------------------------------------------------------------------------------
# The scenario
# --------------------------------------------------------------------------------------------


class Scenario:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.stack = Stack(state)
        self.traffic = Traffic(self.stack)
        self.figures: dict[str, Any] = {}
        self.started = time.monotonic()
        self.window_start = datetime.now(UTC) - timedelta(minutes=1)
        self.step_no = 0

    def step(self, text: str) -> None:
        self.step_no += 1
        say(f"\n-- [{time.monotonic() - self.started:5.0f} s] {self.step_no}. {text}")

    def run(self) -> None:
        s, t = self.stack, self.traffic
        self.step("project: a copy of the compose project with its own secrets/ and free host ports")
        self.prepare()
        self.images()

        self.step("README deploy-secrets")
        s.readme_block("secrets")
        token_file = s.dir / "secrets" / "kustomer_support_webhook_token"
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (s.dir / "secrets").iterdir()}
        if token_file.read_text() or oct((s.dir / "secrets").stat().st_mode & 0o777) != "0o700":
            raise Failed(f"secrets: the token must start empty and the directory 0700: {modes}")

        self.step("README deploy-up (the stack starts; the token is empty)")
        began = time.monotonic()
        s.readme_block("up", timeout=240, watch=self.ingest_keeps_running)
        self.figures["stack start, ingest ready (s)"] = round(time.monotonic() - began, 1)
        s.wait_ready(120)
        self.figures["stack start, every service ready (s)"] = round(time.monotonic() - began, 1)
        ready_s = self.figures["stack start, every service ready (s)"]
        say(f"    {len(s.containers())} pipeline containers ready in {ready_s} s")

        self.step("no Kustomer webhook token: ingest says why at start, answers 401, calls and SMS flow")
        line = self.startup_line_about_token()
        say(f"    ingest at start: {line}")
        status = signed_webhook(s, secrets.token_hex(16), "65f1c0ffee0000000000dead")
        if status != 401:
            raise Failed(f"the Kustomer endpoint without a token answered {status}, expected 401")
        for i in range(CALLS_BEFORE_TOKEN):
            t.call(i)
        for i in range(SMS_BEFORE_TOKEN):
            t.sms(i)
        wait_until("calls and SMS without a webhook token", lambda: self.conversations() >= len(t.conversations), 120)
        say(f"    {len(t.conversations)} conversations in Kustomer; /ingest/kustomer/{INTEGRATION}: 401")

        self.step("README deploy-register (the webhook, its token, ingest restarted)")
        s.readme_block("register", timeout=120)
        token = token_file.read_text().strip()
        if not re.fullmatch(r"[0-9a-f]{32,}", token):
            raise Failed("the token file holds something other than the token (stdout must carry only the token)")
        hooks = self.traffic.k_state()["webhooks"]
        if [h["attributes"]["url"] for h in hooks] != [f"http://ingest:8080/ingest/kustomer/{INTEGRATION}"]:
            raise Failed(f"Kustomer webhooks: {hooks}")
        wait_until("ingest ready after the restart", lambda: http("GET", f"{s.ingest}/readyz")[0] == 200, 60, 0.5)
        if signed_webhook(s, secrets.token_hex(16), "65f1c0ffee0000000000beef") != 401:
            raise Failed("a wrong signature was not refused")
        say("    token stored (not shown); a wrong signature still gets 401")
        t.webhook_since = time.time()  # customers created from here on reach the import by webhook

        self.step(f"traffic: {CALLS} calls, {SMS} SMS, contacts both ways; kills mid-stream")
        ok("POST", f"{s.k}/_sim/settings", {"rate_limit": 5000})  # test equipment: no 429 waits at this pace
        self.traffic_with_kills()
        s.wait_ready(120)
        began = time.monotonic()
        wait_until("every effect in the simulators", t.arrived, 240, 2)
        self.quiet()
        self.figures["drain after the last event (s)"] = round(time.monotonic() - began, 1)
        self.figures["events sent"] = dict(t.sent)

        self.step("exactly once (state and request logs of both simulators)")
        self.figures["effects"] = t.check_exactly_once()
        say(f"    {json.dumps(self.figures['effects'])}")

        self.step("Prometheus scrapes every service")
        self.figures["prometheus targets up"] = self.prometheus_targets()
        self.figures["prometheus rules"] = self.prometheus_rules()

        self.step("README deploy-operate (lag, replay of the calls, logs): the replay writes nothing")
        before = {"k": len(effects(s.k)), "ct": len(effects(s.ct))}
        dup_before = self.duplicates()
        out = s.readme_block("operate", timeout=180, replay_window=self.replay_window())
        replayed = self.replayed(out)
        say(f"    replayed {replayed} call events")
        wait_until(
            "the replayed calls at the sink",
            lambda: self.duplicates() - dup_before >= CALLS or Failed(f"{self.duplicates() - dup_before} skipped"),
            120,
            2,
        )
        self.quiet()
        after = {"k": len(effects(s.k)), "ct": len(effects(s.ct))}
        if after != before:
            raise Failed(f"the replay wrote to the simulators: {before} -> {after}")
        self.figures["replay before down: events, skipped by the ledger, writes"] = [
            replayed,
            self.duplicates() - dup_before,
            0,
        ]
        self.figures["ledger entries before down"] = self.ledger_entries()

        self.step("README deploy-down, then deploy-up: the volume keeps ledgers, offsets, cursors")
        began = time.monotonic()
        s.readme_block("down", timeout=180)
        self.figures["down (s)"] = round(time.monotonic() - began, 1)
        leftovers = s.podman("ps", "-a", "--filter", f"name={PROJECT_NAME}_", "--format", "{{.Names}}").split()
        volumes = s.podman("volume", "ls", "--format", "{{.Name}}").split()
        if leftovers or f"{PROJECT_NAME}_kafka-data" not in volumes:
            raise Failed(f"after down: containers {leftovers}, volumes {volumes}")
        began = time.monotonic()
        s.readme_block("up", timeout=240)
        s.wait_ready(120)
        self.figures["second start, every service ready (s)"] = round(time.monotonic() - began, 1)
        self.after_restart()

        self.step("a replay of every raw topic after down/up writes nothing")
        self.replay_everything()

        self.figures["test duration (s)"] = round(time.monotonic() - self.started, 1)

    # -- steps ------------------------------------------------------------------------------
    def prepare(self) -> None:
        s = self.stack
        if s.dir.exists():  # an earlier run's stack: gone, with its volumes
            s.sh("podman-compose --profile sim --profile tools down -v", "cleanup", 180, check=False)
            shutil.rmtree(s.dir)
        if s.logs.exists():
            shutil.rmtree(s.logs)
        (s.dir / "deploy").mkdir(parents=True)
        shutil.copy(REPO / "docker-compose.yml", s.dir)
        for name in ("integrations.compose.yaml", "prometheus.yml", "prometheus/rules.yml"):
            (s.dir / "deploy" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / "deploy" / name, s.dir / "deploy" / name)
        for volume in ("kafka-data", "prometheus-data"):
            s.podman("volume", "rm", "-f", f"{PROJECT_NAME}_{volume}", check=False)
        say(f"    {s.dir}; host ports {s.ports}")

    def images(self) -> None:
        sizes = {}
        for image in (
            "localhost/ctk-kustomer-pipeline:latest",
            "localhost/ctk-kustomer-devkit:latest",
            "localhost/ctk-kafka:4.1.1",
            self.stack.env["PROMETHEUS_IMAGE"],
        ):
            info = json.loads(self.stack.podman("image", "inspect", image))[0]
            sizes[image] = f"{info['Size'] / 1e6:.0f} MB"
        product = json.loads(self.stack.podman("image", "inspect", "localhost/ctk-kustomer-pipeline:latest"))[0]
        user = product["Config"].get("User", "")
        if not re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", user):
            raise Failed(f"the product image runs as {user!r}, not a numeric non-root uid")
        probe = self.stack.podman(
            "run",
            "--rm",
            "--entrypoint",
            "python",
            "localhost/ctk-kustomer-pipeline:latest",
            "-c",
            "import importlib.util as u; print([m for m in ('devkit', 'tests', 'pip', 'pytest') if u.find_spec(m)])",
        )
        if probe.strip() != "[]":
            raise Failed(f"the product image holds development tooling: {probe.strip()}")
        self.figures["images"] = sizes
        say(f"    {sizes}; product runs as uid {user}, holds no devkit, tests, pip or pytest")

    def ingest_keeps_running(self) -> None:
        """Ingest started with an empty webhook token file must not stop (or be restarted)."""
        name = self.stack.container("ingest")
        try:
            info = self.stack.inspect(name)
        except Failed:
            return  # not created yet
        if info["State"]["Status"] in ("exited", "stopped") or info.get("RestartCount", 0) > 0:
            raise Failed(
                f"ingest stopped at start ({info['State']['Status']}, {info.get('RestartCount', 0)} restarts) while "
                f"the Kustomer webhook token is empty.\n{NO_TOKEN}\nIngest's log:\n"
                + self.stack.problems_in_log(name, 2)
            )

    def startup_line_about_token(self) -> str:
        """The ingest line that says the integration's Kustomer webhook has no token."""
        name = self.stack.container("ingest")

        def find() -> str | None:
            if self.stack.inspect(name)["State"]["Status"] != "running":
                raise Failed("ingest is not running")
            for raw in self.stack.logs_of(name).splitlines():
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue
                text = json.dumps(line).lower()
                if line.get("level") in ("warning", "error") and "webhook" in text and INTEGRATION in text:
                    return raw
            return None

        try:
            return wait_until("ingest's start-up line about the missing webhook token", find, 30)
        except Failed as exc:
            raise Failed(f"{exc}\n{NO_TOKEN}\nIngest's log:\n{self.stack.problems_in_log(name, 2)}") from None

    def conversations(self) -> int:
        return len(self.traffic.k_state()["conversations"])

    def traffic_with_kills(self) -> None:
        """The rest of the calls and SMS plus the contacts, paced (about 8 events/s); at a third,
        `podman kill` a processor and a sink and crash a second processor."""
        t = self.traffic
        actions: list[Callable[[], None]] = []
        calls = list(range(CALLS_BEFORE_TOKEN, CALLS))
        sms = list(range(SMS_BEFORE_TOKEN, SMS))
        every = max(1, len(calls) // max(1, CT_CONTACTS))
        for j, i in enumerate(calls):
            actions.append(lambda i=i: t.call(i))
            if j % 4 == 1 and sms:
                first = sms.pop(0)
                actions.append(lambda i=first: t.sms(i))
            if j % every == 0 and j // every < CT_CONTACTS:
                actions.append(lambda i=j // every: t.ct_contact(i))
            if j % every == every // 2 and j // every < K_CUSTOMERS:
                actions.append(lambda i=j // every: t.k_customer(i))
        actions.extend(lambda i=i: t.sms(i) for i in sms)
        kill_at, check_at = len(actions) // 3, len(actions) // 3 + 60  # check 7.5 s after the kills
        killed: dict[str, str] = {}
        began = time.monotonic()
        for n, action in enumerate(actions):
            if n == kill_at:
                killed = self.kill()
            if n == check_at:
                self.bring_back(killed)
            action()
            time.sleep(max(0.0, began + (n + 1) / 8 - time.monotonic()))
        if check_at >= len(actions):
            self.bring_back(killed)
        self.figures["traffic sent in (s)"] = round(time.monotonic() - began, 1)

    def kill(self) -> dict[str, str]:
        s = self.stack
        victims = {s.container("process-calls"): "podman kill", s.container("sink-kustomer"): "podman kill"}
        for name in victims:
            s.podman("kill", name)
        crashed = s.container("process-sms")
        os.kill(int(s.inspect(crashed)["State"]["Pid"]), signal.SIGKILL)  # a crash: the process dies
        victims[crashed] = "SIGKILL of its process"
        say(f"    mid-stream ({self.traffic.sent['calls']} calls sent): {victims}")
        return victims

    def bring_back(self, killed: dict[str, str]) -> None:
        """What the restart policy did within 10 s; `podman start` for what it left stopped."""
        s = self.stack
        outcome = {}
        for name, how in killed.items():
            try:
                wait_until(f"{name} restarted", lambda name=name: s.inspect(name)["State"]["Status"] == "running", 10)
                outcome[name] = f"{how} -> restarted by the restart policy ({s.inspect(name)['RestartCount']} restart)"
            except Failed:
                s.podman("start", name)
                outcome[name] = f"{how} -> left stopped by podman (a kill by the user) -> podman start"
        for name, text in outcome.items():
            say(f"    {name}: {text}")
        self.figures["kills"] = outcome

    def quiet(self, seconds: float = 6.0) -> None:
        """No new effect in either simulator for ``seconds``, and no backlog at any processor or sink."""

        def idle() -> bool:
            counts = (len(effects(self.stack.k)), len(effects(self.stack.ct)))
            time.sleep(seconds)
            lags = {}
            for name in self.stack.containers():
                status, body = http("GET", self.stack.health_url(name))
                if isinstance(body, dict) and body.get("lag"):
                    lags[name] = body["lag"]
            later = (len(effects(self.stack.k)), len(effects(self.stack.ct)))
            if counts != later or lags:
                raise Failed(f"still busy: writes {counts} -> {later}, lag {lags}")
            return True

        wait_until("quiet", idle, 120, 0)

    def prometheus_targets(self) -> str:
        want = sum(self.stack.pipeline_services().values())

        def all_up() -> str:
            targets = ok("GET", f"{self.stack.prometheus}/api/v1/targets")["data"]["activeTargets"]
            health = Counter(t["health"] for t in targets)
            if len(targets) != want or health["up"] != want:
                raise Failed(f"{len(targets)} of {want} targets, {dict(health)}")
            return f"{health['up']}/{want}"

        result = wait_until("every service scraped", all_up, 90, 3)
        say(f"    /api/v1/targets: {result} up")
        return result

    def prometheus_rules(self) -> str:
        """The groups of deploy/prometheus/rules.yml are loaded and evaluated without errors."""
        want = {
            g["name"]: len(g["rules"])
            for g in yaml.safe_load((REPO / "deploy/prometheus/rules.yml").read_text())["groups"]
        }

        def loaded() -> str:
            groups = ok("GET", f"{self.stack.prometheus}/api/v1/rules")["data"]["groups"]
            have = {g["name"]: len(g["rules"]) for g in groups}
            if have != want:
                raise Failed(f"rule groups {have}, want {want}")
            failing = [r["name"] for g in groups for r in g["rules"] if r.get("health") == "err"]
            if failing:
                raise Failed(f"rules failing to evaluate: {failing}")
            unevaluated = [g["name"] for g in groups if not g.get("lastEvaluation", "").startswith("20")]
            if unevaluated:
                raise Failed(f"groups not evaluated yet: {unevaluated}")
            return f"{len(want)} groups, {sum(want.values())} rules"

        result = wait_until("the rules loaded and evaluated", loaded, 90, 3)
        say(f"    /api/v1/rules: {result}")
        return result

    def replay_window(self) -> str:
        return f"--from {utc(self.window_start)} --to {utc(datetime.now(UTC) + timedelta(minutes=1))}"

    @staticmethod
    def replayed(output: str) -> int:
        """The count `pipeline replay raw` printed ("replayed N event(s) of TOPIC ...")."""
        m = re.search(r"replayed (\d+) event", output)
        if not m:
            raise Failed(f"pipeline replay raw said no count:\n{output[-1000:]}")
        return int(m.group(1))

    def sink_metrics(self, sink: str) -> dict[str, float]:
        return metrics(self.stack.health_url(self.stack.container(sink), "/metrics"))

    def duplicates(self) -> float:
        return sum(
            metric_sum(self.sink_metrics(sink), "pipeline_commands_total", outcome="duplicate")
            for sink in ("sink-kustomer", "sink-cloudtalk")
        )

    def ledger_entries(self) -> dict[str, float]:
        return {
            sink: metric_sum(self.sink_metrics(sink), "pipeline_ledger_entries")
            for sink in ("sink-kustomer", "sink-cloudtalk")
        }

    def after_restart(self) -> None:
        s, t = self.stack, self.traffic
        k = t.k_state()
        if k["conversations"] or k["customers"]:
            raise Failed("the Kustomer simulator did not start empty")
        ledgers = wait_until(
            "the ledgers loaded from the volume",
            lambda: (e := self.ledger_entries())["sink-kustomer"] >= len(t.conversations) and e,
            60,
        )
        say(f"    ledger entries loaded by the sinks: {ledgers}")
        self.figures["ledger entries after down/up"] = ledgers
        time.sleep(5)
        if self.duplicates() or effects(s.k) or effects(s.ct):
            raise Failed(
                f"after up, before any replay: {self.duplicates()} commands seen again, "
                f"{len(effects(s.k))} + {len(effects(s.ct))} writes (the consumer offsets did not survive?)"
            )
        lag = s.compose_cmd("--profile", "tools", "run", "--rm", "pipeline", "lag", *self.groups(), timeout=120)
        behind = [int(n) for n in re.findall(r"(\d+) record\(s\) behind", lag)]
        if len(behind) != len(self.groups()) or any(behind):
            raise Failed(f"pipeline lag after down/up:\n{lag[-1500:]}")
        say(f"    pipeline lag: {len(behind)} groups, 0 behind; no command seen again")
        cursors = {}
        for service, event in (("poll-contacts", "contacts_polled"), ("poll-customers", "customers_polled")):

            def polled(service: str = service, event: str = event) -> str | None:
                for raw in s.logs_of(s.container(service)).splitlines():
                    if f'"{event}"' in raw:
                        return json.loads(raw).get("via")
                return None

            cursors[service] = wait_until(f"{service}'s first pass", polled, 60)
        if set(cursors.values()) != {"poller"}:
            raise Failed(f"the pollers started over (no cursor): {cursors}")
        say(f"    pollers continue from their cursors: {cursors}")
        self.figures["cursors after down/up"] = cursors

    def groups(self) -> list[str]:
        return [
            "process-calls",
            "process-sms",
            "process-contacts-import",
            "process-contacts-export",
            "sink-kustomer",
            "sink-cloudtalk",
        ]

    def replay_everything(self) -> None:
        s, t = self.stack, self.traffic
        window = self.replay_window().split()
        replayed = {}
        for topic in ("calls", "sms", "contacts", "customers"):
            out = s.compose_cmd(
                "--profile", "tools", "run", "--rm", "-T", "pipeline", "replay", "raw", "--topic", topic, *window
            )
            replayed[topic] = self.replayed(out)
        say(f"    replayed: {replayed}")
        want = len(t.conversations) + len(t.ct_contacts)
        wait_until(
            "the replayed events at the sinks",
            lambda: self.duplicates() >= want or Failed(f"{self.duplicates()} of {want} skipped"),
            180,
            2,
        )
        self.quiet()
        writes = {"kustomer": effects(s.k), "cloudtalk": effects(s.ct)}
        if any(writes.values()):
            raise Failed(f"the replay after down/up wrote: {writes}")
        self.figures["replay after down/up: events, skipped by the ledger, writes"] = [
            replayed,
            self.duplicates(),
            0,
        ]
        say(f"    {self.duplicates():.0f} commands skipped by the ledgers; 0 writes")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--state", type=Path, default=REPO / ".run" / "containers")
    args = parser.parse_args()
    scenario = Scenario(args.state.resolve())
    keep = os.environ.get("CONTAINERS_KEEP") == "1"
    code = 0
    try:
        scenario.run()
    except (Failed, subprocess.SubprocessError, OSError) as exc:
        code = 1
        say(f"\ncontainers-test: FAILED: {exc}")
        try:
            say(scenario.stack.diagnostics())
        except Exception as diag:  # noqa: BLE001 - diagnostics are best effort
            say(f"(no diagnostics: {diag})")
    finally:
        setup = os.environ.get("CONTAINERS_SETUP_SECONDS")
        if setup:
            scenario.figures["setup: tools, bases, images (s)"] = int(setup)
            scenario.figures["whole test (s)"] = round(int(setup) + time.monotonic() - scenario.started, 1)
        (args.state / "summary.json").write_text(json.dumps(scenario.figures, indent=2) + "\n")
        say("\nfigures:\n" + json.dumps(scenario.figures, indent=2))
        if keep:
            say(f"\nCONTAINERS_KEEP=1: the stack runs on ({scenario.stack.dir}); remove it with")
            say(f"  cd {scenario.stack.dir} && COMPOSE_PROJECT_NAME={PROJECT_NAME} \\")
            say("    podman-compose --profile sim down -v")
        else:
            scenario.stack.sh("podman-compose --profile sim --profile tools down -v", "teardown", 180, check=False)
    say(f"\ncontainers-test: {'OK' if code == 0 else 'FAILED'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
