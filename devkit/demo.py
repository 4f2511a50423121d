"""``python -m devkit demo``: the whole pipeline on this machine, scripted traffic, summaries to check.

1. Starts (or reuses, or takes ``KAFKA_BOOTSTRAP``) a Kafka broker and creates a fresh set of
   topics (a new prefix per run, so every run starts empty).
2. Starts as separate processes: the CloudTalk simulator, one Kustomer simulator per integration
   (each integration is its own Kustomer org); registers the Kustomer webhook the way an
   operator does (``pipeline webhooks register``); then ingest, two replicas of the calls
   processor, the SMS processor, both contact processors, both sinks and the call-history poller.
3. Configures two integrations with different connected numbers and rules, seeds CloudTalk
   contacts, and points CloudTalk's workflow automations at the ingest endpoints.
4. Drives a scripted day through the CloudTalk simulator: calls of every type and SMS both ways,
   some on numbers no integration connects, some from unknown numbers, some delivered twice,
   some never delivered (only the call-history poller finds them), with progress as it goes.
5. Waits until the pipeline is idle, then backfills the whole window once more (a replay must
   write nothing new).
6. Prints a summary: events in, conversations and notes per integration, drops per rule — each
   beside the count an independent model of the documented rules expects — dead letters, and
   duplicates found in the Kustomer simulators (must be 0).
7. Contacts (:mod:`pipeline.demo_contacts`): seeds 1,000 Kustomer customers and 300 CloudTalk
   contacts by category, runs the initial import (``poll customers``) until idle,
8. then the initial export (``poll contacts``), makes live edits on both sides, and prints
   imported / merged / exported / skipped per rule and field checks against its model.
9. Stops everything it started, unless ``--keep-running``. Exit code 1 on any mismatch, 2 when
   a service did not stop cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from devkit.demo_contacts import Checks, ContactsPart, attr
from devkit.localkafka import broker_for_run
from devkit.net import free_port
from devkit.stack import Stack
from devkit.wiring import cloudtalk_workflows, register_kustomer_webhook, sim
from pipeline.kafka.lag import group_lag
from pipeline.kafka.reading import read_topic
from pipeline.kafka.topics import Topics, ensure_topics

# the CloudTalk account's numbers
SUPPORT_LINE = "+442012345678"  # connected to "support"
SALES_LINE = "+14155550123"  # connected to "sales"
BILLING_LINE = "+442079460000"  # connected to no integration
LINES = {SUPPORT_LINE: "UK Support", SALES_LINE: "US Sales", BILLING_LINE: "UK Billing"}

CALL_KINDS = [  # (weight, direction, status, voicemail)
    (40, "incoming", "answered", False),
    (18, "incoming", "missed", False),
    (10, "incoming", "missed", True),
    (20, "outgoing", "answered", False),
    (8, "outgoing", "missed", False),
    (4, "internal", "answered", False),
]

SECRETS = {
    "DEMO_CLOUDTALK_KEY_ID": "demo-key-id",
    "DEMO_CLOUDTALK_KEY_SECRET": "demo-key-secret",
    "DEMO_SUPPORT_KUSTOMER_KEY": "demo-support-kustomer-key",
    "DEMO_SALES_KUSTOMER_KEY": "demo-sales-kustomer-key",
    "DEMO_SUPPORT_WEBHOOK_SECRET": "demo-support-webhook-secret",
    "DEMO_SALES_WEBHOOK_SECRET": "demo-sales-webhook-secret",
}


def integrations_yaml(
    ct_url: str, support_url: str, sales_url: str, ct_rate: int = 60, token_file: str = "support-kustomer-webhook-token"
) -> str:
    return f"""\
cloudtalk:
  base_url: {ct_url}/api
  key_id: {{env: DEMO_CLOUDTALK_KEY_ID}}
  key_secret: {{env: DEMO_CLOUDTALK_KEY_SECRET}}
  rate_limit_per_minute: {ct_rate}
  poller_reserve: {max(10, ct_rate // 6)}
  calls_poll_interval_seconds: 5
  calls_poll_lag_seconds: 0
integrations:
  - name: support
    custom_name: "Kustomer – Support team"
    active: true
    contact_tag: kustomer-support
    kustomer: {{base_url: "{support_url}", org_name: acme, api_key: {{env: DEMO_SUPPORT_KUSTOMER_KEY}},
               webhook_token: {{file: "{token_file}"}}}}
    cloudtalk_webhook_secret: {{env: DEMO_SUPPORT_WEBHOOK_SECRET}}
    calls:
      types:
        incoming_answered:   {{export: true,  status: done}}
        incoming_missed:     {{export: true,  status: open}}
        voicemail:           {{export: true,  status: open}}
        outgoing_answered:   {{export: true,  status: done}}
        outgoing_unanswered: {{export: false, status: done}}
      create_customers_for_unknown_numbers: true
      connected_numbers: ["{SUPPORT_LINE}"]
    sms:
      enabled: true
      types: {{incoming: {{export: true, status: open}}, outgoing: {{export: true, status: done}}}}
      connected_numbers: []
    contacts: {{import: true, export: true, merge_key: phone_or_name}}
  - name: sales
    custom_name: "Kustomer – Sales"
    active: true
    contact_tag: kustomer-sales
    kustomer: {{base_url: "{sales_url}", org_name: acme-sales, api_key: {{env: DEMO_SALES_KUSTOMER_KEY}}}}
    cloudtalk_webhook_secret: {{env: DEMO_SALES_WEBHOOK_SECRET}}
    calls:
      types:
        incoming_answered:   {{export: true, status: done}}
        incoming_missed:     {{export: true, status: open}}
        voicemail:           {{export: false, status: open}}
        outgoing_answered:   {{export: true, status: done}}
        outgoing_unanswered: {{export: true, status: done}}
      create_customers_for_unknown_numbers: false
      connected_numbers: ["{SALES_LINE}"]
    sms:
      enabled: false
    contacts: {{import: false, export: false}}
"""


# --------------------------------------------------------------------------------------------
# The expected outcome: an independent model of the documented rules (README, reference 1.4)
# --------------------------------------------------------------------------------------------


@dataclass
class Expectation:
    emitted: Counter = field(default_factory=Counter)  # integration -> events logged
    dropped: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # integration -> rule -> n
    # integration -> externalId -> "details updated" notes (a change after wrap-up of a call it logged)
    details: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))

    def call(self, direction: str, status: str, voicemail: bool, line: str, known: bool) -> list[str]:
        """Counts the call; the integrations that log it."""
        logged = []
        ctype = None
        if direction == "incoming":
            ctype = "incoming_answered" if status == "answered" else ("voicemail" if voicemail else "incoming_missed")
        elif direction == "outgoing":
            ctype = "outgoing_answered" if status == "answered" else "outgoing_unanswered"
        rules = {
            "support": (SUPPORT_LINE, {"outgoing_unanswered"}, True),
            "sales": (SALES_LINE, {"voicemail"}, False),
        }
        for name, (connected, disabled, unknown_ok) in rules.items():
            if ctype is None:
                self.dropped[name]["internal_call"] += 1
            elif line != connected:
                self.dropped[name]["number_not_connected"] += 1
            elif ctype in disabled:
                self.dropped[name]["call_type_disabled"] += 1
            elif not known and not unknown_ok:
                self.dropped[name]["unknown_number"] += 1
            else:
                self.emitted[name] += 1
                logged.append(name)
        return logged

    def changed(self, call_id: int, logged_by: list[str]) -> None:
        """A call's details changed after it was logged: one note in each integration that logs it."""
        for name in logged_by:
            self.details[name][f"cloudtalk-call-{call_id}"] += 1

    def sms(self) -> None:
        self.emitted["support"] += 1  # SMS on, every number, both types, unknown numbers allowed
        self.dropped["sales"]["sms_disabled"] += 1


# --------------------------------------------------------------------------------------------


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        run = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        self.prefix = f"demo{run}-"
        self.workdir = Path(args.workdir).resolve() / run
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.expect = Expectation()
        self.sent = Counter()
        self.call_ids: list[int] = []
        self.delivered_calls: list[tuple[int, dict[str, Any], list[str]]] = []  # (call id, spec, logged by)
        self.started_at = datetime.now(UTC)

    def say(self, text: str) -> None:
        print(text, flush=True)

    async def run(self) -> int:
        self.say("[1/9] Kafka …")
        kafka = await asyncio.to_thread(broker_for_run, lambda text: self.say(f"      {text}"))
        self.say(f"      {kafka.describe()}")
        bootstrap, broker = kafka.bootstrap, kafka.local
        topics = Topics(self.prefix)
        await ensure_topics(bootstrap, topics.specs())
        self.say(f"      topics with prefix {self.prefix!r} created; work dir {self.workdir}")

        ports = {n: free_port() for n in ("ct", "k_support", "k_sales", "ingest")}
        urls = {n: f"http://127.0.0.1:{p}" for n, p in ports.items()}
        config_path = self.workdir / "integrations.yaml"
        self.token_file = self.workdir / "secrets" / "support-kustomer-webhook-token"
        config_path.write_text(
            integrations_yaml(
                urls["ct"], urls["k_support"], urls["k_sales"], self.args.cloudtalk_rate_limit, str(self.token_file)
            )
        )
        env = {
            "KAFKA_BOOTSTRAP": bootstrap,
            "TOPIC_PREFIX": self.prefix,
            "PIPELINE_CONFIG": str(config_path),
            "LOG_LEVEL": "INFO",
            "CALLS_POLL_INITIAL_LOOKBACK_S": "1800",
            "CALLS_POLL_OVERLAP_S": "1800",
            **SECRETS,
        }
        stack = Stack(self.workdir, env)
        self.failed_stop = False
        try:
            return await self._run(stack, bootstrap, topics, urls, ports)
        finally:
            if self.args.keep_running:
                self.say(
                    f"\n--keep-running: services stay up; logs in {self.workdir / 'logs'}; "
                    f"stop them with kill, the broker with `python -m devkit kafka down`."
                )
            else:
                codes = stack.stop_all()
                bad = {k: v for k, v in codes.items() if v not in (0, None, -15)}
                self.say(f"[9/9] stopped {len(codes)} processes" + (f" (non-zero exits: {bad})" if bad else ""))
                if bad:
                    self.failed_stop = True
                if broker is not None and (kafka.started or self.args.stop_broker):
                    await asyncio.to_thread(broker.down, 30.0, True)
                    self.say("      stopped the Kafka broker it started")

    async def _run(
        self, stack: Stack, bootstrap: str, topics: Topics, urls: dict[str, str], ports: dict[str, int]
    ) -> int:
        rate = str(self.args.kustomer_rate_limit)
        self.say("[2/9] starting simulators and services as separate processes …")
        stack.add_simulator(
            "sim-cloudtalk",
            "cloudtalk",
            ports["ct"],
            [
                "--key-id",
                SECRETS["DEMO_CLOUDTALK_KEY_ID"],
                "--key-secret",
                SECRETS["DEMO_CLOUDTALK_KEY_SECRET"],
                "--rate-limit",
                str(self.args.cloudtalk_rate_limit),
            ],
        )
        for name in ("support", "sales"):
            key = SECRETS[f"DEMO_{name.upper()}_KUSTOMER_KEY"]
            stack.add_simulator(
                f"sim-kustomer-{name}",
                "kustomer",
                ports[f"k_{name}"],
                [
                    "--api-key",
                    key,
                    "--rate-limit",
                    rate,
                    "--org-name",
                    f"acme-{name}",
                    "--webhook-allow-http",
                ],
            )
        await stack.wait_ready(timeout=60)
        said = await register_kustomer_webhook(stack, urls["ingest"], "support")
        self.say(f"      pipeline webhooks register: {said}")
        stack.add("ingest", ["ingest", "--port", str(ports["ingest"])], health=f"{urls['ingest']}/readyz")
        stack.add("process-calls-1", ["process", "calls"])
        stack.add("process-calls-2", ["process", "calls"])
        stack.add("process-sms", ["process", "sms"])
        stack.add("sink-kustomer", ["sink", "kustomer"])
        stack.add("poll-calls", ["poll", "calls"])
        if self.args.contacts_part:
            stack.add("process-contacts-import", ["process", "contacts-import"])
            stack.add("process-contacts-export", ["process", "contacts-export"])
            stack.add("sink-cloudtalk", ["sink", "cloudtalk"])
        await stack.wait_ready(timeout=120)
        self.say(f"      {len(stack.services)} processes ready: {', '.join(stack.services)}")

        async with aiohttp.ClientSession() as http:
            await self._configure_cloudtalk(http, urls)
            await self._drive_day(http, urls["ct"])
            await self._wait_idle(http, bootstrap, topics, urls, "      ")
            await self._after_wrap_up(http, urls["ct"])
            # with the contacts part: the contacts the unknown callers' customers become, too
            await self._wait_idle(http, bootstrap, topics, urls, "[5/9]", contacts=self.args.contacts_part)
            self.say("      replaying the whole window as a backfill (must write nothing new) …")
            before = await self._kustomer_writes(http, urls)
            window_from = (self.started_at - timedelta(minutes=15)).isoformat()  # calls start before they end
            window_to = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
            out, _ = await stack.run_once(["backfill", "calls", "--from", window_from, "--to", window_to])
            backfilled = orjson.loads(out.strip().splitlines()[-1]) if out.strip() else {}
            await self._wait_idle(http, bootstrap, topics, urls, "      ", contacts=self.args.contacts_part)
            after = await self._kustomer_writes(http, urls)
            calls_rc = await self._summary(http, bootstrap, topics, urls, backfilled, before, after)
            if not self.args.contacts_part:
                return calls_rc
            contacts_rc = await ContactsPart(self, stack, http, bootstrap, topics, urls).run()
            return calls_rc or contacts_rc

    async def _configure_cloudtalk(self, http: aiohttp.ClientSession, urls: dict[str, str]) -> None:
        self.say("[3/9] seeding CloudTalk (numbers, agents, contacts) and its workflow automations …")
        self.known = [f"+4474009{n:05d}" for n in self.rng.sample(range(10_000, 99_999), 60)]
        self.known += [f"+1415555{n:04d}" for n in self.rng.sample(range(1000, 9999), 20)]
        self.unknown = [f"+4474008{n:05d}" for n in self.rng.sample(range(10_000, 99_999), 40)]
        contacts = [
            {
                "name": f"Customer {i:03d}",
                "ContactNumber": [{"public_number": n}],
                "ContactEmail": [{"email": f"customer{i:03d}@example.org"}],
            }
            for i, n in enumerate(self.known)
        ]
        agents = [
            {"id": 493933 + i, "firstname": f, "lastname": "Agent", "email": f"{f.lower()}@example.com"}
            for i, f in enumerate(("Max", "Eva", "Ola"))
        ]
        numbers = [{"caller_id_e164": e164, "internal_name": name} for e164, name in LINES.items()]
        workflows = cloudtalk_workflows(
            urls["ingest"], "support", SECRETS["DEMO_SUPPORT_WEBHOOK_SECRET"], contacts=self.args.contacts_part
        )
        await sim(
            http,
            "POST",
            f"{urls['ct']}/_sim/seed",
            {"contacts": contacts, "agents": agents, "numbers": numbers, "workflows": workflows},
        )
        self.agent_ids = [a["id"] for a in agents]
        self.say(
            f"      {len(contacts)} contacts, {len(agents)} agents, {len(numbers)} numbers; "
            f"{len(workflows)} workflows → ingest"
        )

    async def _drive_day(self, http: aiohttp.ClientSession, ct: str) -> None:
        n_calls, n_sms = self.args.calls, self.args.sms
        self.say(f"[4/9] the scripted day: {n_calls} calls and {n_sms} SMS …")
        kinds = [k[1:] for k in CALL_KINDS]
        weights = [k[0] for k in CALL_KINDS]
        lines = [SUPPORT_LINE] * 55 + [SALES_LINE] * 30 + [BILLING_LINE] * 15
        events = ["call"] * n_calls + ["sms"] * n_sms
        self.rng.shuffle(events)
        t0 = time.monotonic()
        for i, kind in enumerate(events, 1):
            known = self.rng.random() < 0.7
            line = self.rng.choice(lines)
            if kind == "call":
                direction, status, voicemail = self.rng.choices(kinds, weights)[0]
                # an unknown number support logs becomes a CloudTalk contact (its customer is
                # imported): "sales" (unknown numbers dropped) gets unknown numbers of its own
                if line == SALES_LINE:
                    number = self.rng.choice(self.known[60:] if known else self.unknown[:15])
                else:
                    number = self.rng.choice(self.known[:60] if known else self.unknown[15:])
                roll = self.rng.random()
                deliver, times = (False, 0) if roll < 0.05 else ((True, 2) if roll < 0.10 else (True, 1))
                self.sent["calls"] += 1
                self.sent["calls delivered twice"] += times == 2
                self.sent["calls only the poller finds"] += not deliver
                self.sent[f"call {direction} {status}{' voicemail' if voicemail else ''}"] += 1
                spec = {
                    "direction": direction,
                    "status": status,
                    "internal_number": line,
                    "internal_number_name": LINES[line],
                    "external_number": number,
                    "is_voicemail": voicemail,
                    "recorded": status == "answered" and self.rng.random() < 0.5,
                    "agent_id": self.rng.choice(self.agent_ids) if status == "answered" else None,
                    "waiting_time": self.rng.randint(1, 40),
                    "talking_time": self.rng.randint(20, 600) if status == "answered" else 0,
                    "wrapup_time": self.rng.randint(0, 60),
                    "tags": self.rng.sample(["Billing", "Refund", "VIP"], 1),
                    "notes": ["Asked about the invoice"] if self.rng.random() < 0.3 else [],
                    "rating": self.rng.randint(1, 5) if self.rng.random() < 0.3 else None,
                    "deliver": deliver,
                    "deliver_times": times,
                }
                call = await sim(http, "POST", f"{ct}/_sim/calls", spec)
                call_id = call.get("call_id") or call.get("id")
                self.call_ids.append(call_id)
                logged_by = self.expect.call(direction, status, voicemail, line, known)
                if deliver:
                    self.delivered_calls.append((call_id, spec, logged_by))
            else:
                direction = "incoming" if self.rng.random() < 0.6 else "outgoing"
                sms_line = self.rng.choice([SUPPORT_LINE, BILLING_LINE])
                number = self.rng.choice(self.known[:60] if known else self.unknown[15:])
                twice = self.rng.random() < 0.05
                self.sent["sms"] += 1
                self.sent["sms delivered twice"] += twice
                await sim(
                    http,
                    "POST",
                    f"{ct}/_sim/sms",
                    {
                        "direction": direction,
                        "internal_number": sms_line,
                        "external_number": number,
                        "text": self.rng.choice(
                            [
                                "Hi, is my refund processed yet?",
                                "Thanks!",
                                "Call me back please",
                                "Your ticket was updated.",
                            ]
                        ),
                        "agent_id": self.rng.choice(self.agent_ids) if direction == "outgoing" else None,
                        "deliver_times": 2 if twice else 1,
                    },
                )
                self.expect.sms()
            if i % 100 == 0 or i == len(events):
                self.say(f"      {i}/{len(events)} events sent ({i / (time.monotonic() - t0):.0f}/s)")

    async def _after_wrap_up(self, http: aiohttp.ClientSession, ct: str) -> None:
        """Agents edit tags of some calls after wrap-up, recordings of others arrive late: each
        change reaches the call's conversation as one note (workflows delivered twice at times)."""
        calls = self.delivered_calls
        edits = self.rng.sample(calls, max(1, len(calls) // 20))
        answered = [c for c in calls if c[1]["status"] == "answered" and not c[1]["recorded"]]
        uploads = self.rng.sample(answered, min(len(answered), max(1, len(calls) // 20)))
        self.say(f"      after wrap-up: {len(edits)} calls get new tags, {len(uploads)} recordings arrive late …")
        for call_id, spec, logged_by in edits:
            tags = [*spec["tags"], "Follow-up"]
            times = 2 if self.rng.random() < 0.2 else 1
            await sim(http, "POST", f"{ct}/_sim/calls/{call_id}/modify", {"tags": tags, "deliver_times": times})
            self.expect.changed(call_id, logged_by)
            self.sent["tag edits after wrap-up"] += 1
        for call_id, _spec, logged_by in uploads:
            times = 2 if self.rng.random() < 0.2 else 1
            await sim(http, "POST", f"{ct}/_sim/calls/{call_id}/recording", {"deliver_times": times})
            self.expect.changed(call_id, logged_by)
            self.sent["recordings uploaded later"] += 1

    async def _wait_idle(
        self,
        http: aiohttp.ClientSession,
        bootstrap: str,
        topics: Topics,
        urls: dict[str, str],
        label: str,
        contacts: bool = False,
        quiet_s: float = 10.0,
    ) -> None:
        self.say(f"{label} waiting until the pipeline is idle …")
        groups = {
            f"{self.prefix}process-calls": [topics.raw_calls],
            f"{self.prefix}process-sms": [topics.raw_sms],
            f"{self.prefix}sink-kustomer": [topics.kustomer_commands],
        }
        if contacts:
            groups |= {
                f"{self.prefix}process-contacts-import": [topics.raw_customers],
                f"{self.prefix}process-contacts-export": [topics.raw_contacts],
                f"{self.prefix}sink-cloudtalk": [topics.cloudtalk_commands],
            }
        deadline = time.monotonic() + self.args.idle_timeout
        quiet_since = None
        last = None
        while time.monotonic() < deadline:
            lag = {g: sum((await group_lag(bootstrap, g, t)).values()) for g, t in groups.items()}
            pending = 0
            for url in (
                f"{urls['ct']}/_sim/deliveries?status=pending",
                f"{urls['k_support']}/_sim/deliveries?status=pending",
            ):
                state = await sim(http, "GET", url)
                pending += len(state.get("deliveries", [])) if isinstance(state, dict) else 0
            convs = await self._conversation_counts(http, urls)
            snapshot = (tuple(lag.values()), pending, tuple(convs.values()))
            busy = any(lag.values()) or pending
            self.say(
                f"      lag {', '.join(f'{g.removeprefix(self.prefix)}={v}' for g, v in lag.items())}; "
                f"webhooks pending {pending}; conversations {dict(convs)}"
            )
            if not busy and snapshot == last:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= quiet_s:  # two poller periods without change
                    return
            else:
                quiet_since = None
            last = snapshot
            await asyncio.sleep(2.5)
        raise TimeoutError(f"the pipeline was not idle within {self.args.idle_timeout}s")

    async def _conversation_counts(self, http: aiohttp.ClientSession, urls: dict[str, str]) -> Counter:
        out = Counter()
        for name in ("support", "sales"):
            state = await sim(http, "GET", f"{urls[f'k_{name}']}/_sim/state")
            out[name] = len(state.get("conversations", []))
        return out

    async def _kustomer_writes(self, http: aiohttp.ClientSession, urls: dict[str, str]) -> dict[str, int]:
        writes = {}
        for name in ("support", "sales"):
            log = await sim(http, "GET", f"{urls[f'k_{name}']}/_sim/requests")
            writes[name] = sum(
                1 for r in log.get("requests", []) if r["method"] in ("POST", "PUT", "PATCH") and r.get("effect")
            )
        return writes

    async def _summary(
        self,
        http: aiohttp.ClientSession,
        bootstrap: str,
        topics: Topics,
        urls: dict[str, str],
        backfilled: dict[str, Any],
        writes_before: dict[str, int],
        writes_after: dict[str, int],
    ) -> int:
        raw_calls = await read_topic(bootstrap, topics.raw_calls)
        raw_sms = await read_topic(bootstrap, topics.raw_sms)
        audit = await read_topic(bootstrap, topics.audit)
        dead = await read_topic(bootstrap, topics.deadletter)
        via = Counter(orjson.loads(r.value)["via"] for r in raw_calls)
        decisions: dict[tuple[str, str], str] = {}  # (event, integration) -> emitted | dropped:<rule>
        for r in audit:
            a = orjson.loads(r.value)
            # calls and SMS (not their details, not the contacts the unknown callers became)
            if a["stage"] in ("process-calls", "process-sms") and "#" not in a["event_id"]:
                for d in a["decisions"]:
                    decisions[(a["event_id"], d["integration"])] = (
                        "emitted" if d["decision"] == "emitted" else f"dropped:{d['rule']}"
                    )
        got_dropped: dict[str, Counter] = defaultdict(Counter)
        got_emitted = Counter()
        for (_event, integration), d in decisions.items():
            if d == "emitted":
                got_emitted[integration] += 1
            else:
                got_dropped[integration][d.split(":", 1)[1]] += 1

        checks = Checks()  # rows per integration
        problems = checks.problems

        def check(label: str, integration: str, got: int, want: int | None) -> None:
            checks.check(integration, label, got, want)

        duplicates = 0
        for name in ("support", "sales"):
            state = await sim(http, "GET", f"{urls[f'k_{name}']}/_sim/state")
            conversations = state.get("conversations", [])
            notes = state.get("notes", [])
            customers = state.get("customers", [])
            ext = Counter(attr(c, "externalId") for c in conversations)
            per_conv = Counter(_rel(n, "conversation") for n in notes)
            dup_conv = sum(n - 1 for n in ext.values() if n > 1)
            changes = self.expect.details[name]
            bad_notes = sum(1 for c in conversations if per_conv.get(c["id"], 0) != 1 + changes[attr(c, "externalId")])
            details_notes = sum(1 for n in notes if " · details updated (" in (attr(n, "body") or "").split("\n")[0])
            phones = Counter(p.get("phone") for c in customers for p in (attr(c, "phones") or []))
            dup_phone = sum(n - 1 for n in phones.values() if n > 1)
            duplicates += dup_conv + bad_notes + dup_phone
            check("conversations", name, len(conversations), self.expect.emitted[name])
            check("notes", name, len(notes), self.expect.emitted[name] + changes.total())
            check("of them: details updated after wrap-up", name, details_notes, changes.total())
            check("customers", name, len(customers), None)
            for rule in sorted(set(self.expect.dropped[name]) | set(got_dropped[name])):
                check(f"dropped: {rule}", name, got_dropped[name][rule], self.expect.dropped[name][rule])
            check("duplicate conversations (same externalId)", name, dup_conv, 0)
            check("conversations without one note plus one per change", name, bad_notes, 0)
            check("customers sharing a phone", name, dup_phone, 0)
        new_writes = {k: writes_after[k] - writes_before[k] for k in writes_after}
        if any(new_writes.values()):
            problems.append(f"the backfill replay wrote to Kustomer: {new_writes}")
        if dead:
            problems.append(f"{len(dead)} dead letters")

        self.say("[6/9] summary of calls and SMS")
        self.say("  sent by the CloudTalk simulator: " + ", ".join(f"{k} {v}" for k, v in self.sent.items()))
        self.say(
            f"  raw events stored: calls {len(raw_calls)} ({', '.join(f'{k} {v}' for k, v in sorted(via.items()))}),"
            f" SMS {len(raw_sms)}"
        )
        self.say(
            f"  distinct calls stored: {len({orjson.loads(r.value)['id'] for r in raw_calls})} of "
            f"{self.sent['calls']} sent"
        )
        self.say(
            f"  backfill replay of the window: {backfilled.get('published', 0)} calls republished, "
            f"Kustomer writes caused: {sum(new_writes.values())}"
        )
        self.say(f"  dead letters: {len(dead)}")
        width = max(len(r[1]) for r in checks.rows) + 2
        self.say(f"  {'':{width}}{'integration':12}{'count':>7}  check")
        for integration, label, got, verdict in checks.rows:
            self.say(f"  {label:{width}}{integration:12}{got:>7}  {verdict}")
        self.say(f"  duplicates found in the Kustomer simulators: {duplicates}")
        if problems:
            self.say("  RESULT: MISMATCH\n    - " + "\n    - ".join(problems))
            return 1
        self.say("  RESULT: OK — every count matches the scripted day; nothing lost, nothing duplicated")
        return 0


def _rel(resource: dict[str, Any], name: str) -> Any:
    rel = (resource.get("relationships") or {}).get(name)
    if isinstance(rel, dict):
        return (rel.get("data") or {}).get("id")
    return resource.get(name) or attr(resource, name)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run everything locally with a scripted day and print a summary")
    p.add_argument("--calls", type=int, default=420, help="calls in the scripted day (default 420)")
    p.add_argument("--sms", type=int, default=140, help="SMS in the scripted day (default 140)")
    p.add_argument("--seed", type=int, default=20261123, help="random seed of the scripted day")
    p.add_argument(
        "--kustomer-rate-limit",
        type=int,
        default=2000,
        help="Kustomer org budget per minute in the simulators (default 2000, the Ultimate plan)",
    )
    p.add_argument("--customers", type=int, default=1000, help="Kustomer customers seeded for the contacts part")
    p.add_argument("--contacts", type=int, default=300, help="CloudTalk contacts seeded for the contacts part")
    p.add_argument(
        "--cloudtalk-rate-limit",
        type=int,
        default=3000,
        help="CloudTalk requests per minute in the simulator and the pipeline (default 3000; the real "
        "API allows 60, at which the initial import of 1,000 customers takes about an hour)",
    )
    p.add_argument("--no-contacts", dest="contacts_part", action="store_false", help="only the calls and SMS part")
    p.add_argument("--idle-timeout", type=float, default=600.0)
    p.add_argument("--workdir", default=".run/demo", help="config and logs of each run (default .run/demo)")
    p.add_argument("--keep-running", action="store_true", help="leave the services running at the end")
    p.add_argument(
        "--stop-broker",
        action="store_true",
        help="stop the local broker at the end even when it was already running "
        "(one the demo started is always stopped, unless --keep-running)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    demo = Demo(args)
    rc = asyncio.run(demo.run())
    if rc == 0 and demo.failed_stop:
        print("RESULT: a service did not stop cleanly on SIGTERM (see the line above)", flush=True)
        return 2
    return rc
