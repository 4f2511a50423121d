"""``pipeline status``: is the pipeline moving? One screen, read from Kafka.

* **Integrations** — for each: the last event a processor evaluated for it (and what it decided)
  and the last effect a sink performed for it (``done``), from the tail of the audit topic
  (``--tail`` records per partition); its dead letters.
* **Events in** — the newest record of each raw topic.
* **Consumer groups** — every processor and sink group: its state, members (client and host),
  partitions assigned, and lag in records (:func:`pipeline.kafka.lag.group_lag`: data records
  after the committed offsets, transaction markers not counted).
* **Dead letters** — how many the topic holds, how many came after the last replay.
* **Imports** — for each integration with bulk work (an initial import, a reconciliation: commands
  with ``priority: bulk``) in the audit tail: commands done (the CloudTalk sink's ``done``,
  ``skipped`` or ``dead_lettered``), remaining (emitted by the processor and not finished yet —
  parked at the live reserve or not read yet), the rate (finished per minute over the last
  ``RATE_WINDOW_S``) and the ETA at that rate. Counted from the audit records read (``--tail``
  per partition): an import larger than the tail shows only its part in it. Customers the poller
  has not published, or the processor not decided yet, are not counted (see the processors' lag).
* **Rate-limit budget** — requests left in each target's window, from the services' ``/metrics``
  (``--metrics URL``, repeatable: the sinks' and pollers'); Kafka does not record it, so without
  ``--metrics`` it says ``n/a``.

The integrations come from the integrations file when one is given or ``PIPELINE_CONFIG`` names a
readable one (no secret is read), else from the audit records. ``--json`` prints one document.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from pipeline.core.config import load_config
from pipeline.core.settings import KafkaSettings, SettingsError
from pipeline.kafka.groups import GroupInfo, describe_groups
from pipeline.kafka.lag import group_lag
from pipeline.kafka.topics import Topics
from pipeline.ops.deadletters import read_deadletters, replay_cursor
from pipeline.ops.inspect import ago, dumps, headers_of, iso_ms, json_or_text, read_window, table

# consumer group (without the prefix) -> its input topic (a Topics attribute); the processors'
# and sinks' runners name their groups so (tests/unit/test_ops_status.py checks it)
GROUPS: dict[str, str] = {
    "process-calls": "raw_calls",
    "process-sms": "raw_sms",
    "process-contacts-import": "raw_customers",
    "process-contacts-export": "raw_contacts",
    "sink-kustomer": "kustomer_commands",
    "sink-cloudtalk": "cloudtalk_commands",
}
RAW_TOPICS = ("raw_calls", "raw_sms", "raw_contacts", "raw_customers")
DEFAULT_TAIL = 5000
RATE_WINDOW_S = 300  # import rate: finished commands per minute over the last five minutes
FINISHED = ("done", "skipped", "dead_lettered")


@dataclass
class ImportProgress:
    """One integration's bulk commands (``priority: bulk``) in the audit tail."""

    emitted: set[str] = field(default_factory=set)  # command ids a processor emitted
    finished: dict[str, int] = field(default_factory=dict)  # command id -> when a sink finished it (ms)

    @property
    def done(self) -> int:
        return len(self.finished)

    @property
    def remaining(self) -> int:
        return len(self.emitted - self.finished.keys())

    def rate_per_min(self, now: datetime) -> float:
        """Finished per minute over the last ``RATE_WINDOW_S`` (over the time since the first of
        them when that is shorter, at least a minute)."""
        now_ms = now.timestamp() * 1000
        recent = [t for t in self.finished.values() if now_ms - t <= RATE_WINDOW_S * 1000]
        if not recent:
            return 0.0
        span_min = max(1.0, (now_ms - min(recent)) / 60_000)
        return len(recent) / span_min

    def eta_s(self, now: datetime) -> float | None:
        """Seconds until the remaining commands are done at the current rate (None: no rate)."""
        rate = self.rate_per_min(now)
        if not self.remaining:
            return 0.0
        return self.remaining / rate * 60 if rate else None

    def to_dict(self, now: datetime) -> dict[str, Any]:
        eta = self.eta_s(now)
        return {
            "emitted": len(self.emitted),
            "done": self.done,
            "remaining": self.remaining,
            "rate_per_min": round(self.rate_per_min(now), 1),
            "eta_s": None if eta is None else round(eta),
        }


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class Seen:
    """The newest audit record of a kind for one integration."""

    timestamp: int
    event_id: str
    stage: str
    decision: str
    rule: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": iso_ms(self.timestamp),
            "event_id": self.event_id,
            "stage": self.stage,
            "decision": self.decision,
            "rule": self.rule,
        }


@dataclass
class IntegrationStatus:
    name: str
    active: bool | None = None  # None: not known (no integrations file)
    last_in: Seen | None = None
    last_out: Seen | None = None
    dead_letters: int = 0
    budget: dict[str, float] = field(default_factory=dict)
    imports: ImportProgress = field(default_factory=ImportProgress)


@dataclass
class Status:
    bootstrap: str
    prefix: str
    at: datetime
    tail: int
    integrations: dict[str, IntegrationStatus] = field(default_factory=dict)
    integrations_from: str = "audit records"
    raw_last: dict[str, int | None] = field(default_factory=dict)
    groups: dict[str, GroupInfo] = field(default_factory=dict)
    lag: dict[str, int | None] = field(default_factory=dict)
    deadletters_total: int = 0
    deadletters_after_replay: int = 0
    deadletters_by_stage: dict[str, int] = field(default_factory=dict)
    replayed_up_to: int | None = None
    budget: dict[tuple[str, str], float] | None = None  # (target, account) -> remaining; None: n/a
    budget_errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        def budget_for(i: IntegrationStatus) -> Any:
            return i.budget if self.budget is not None else "n/a"

        return {
            "at": self.at.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "bootstrap": self.bootstrap,
            "prefix": self.prefix,
            "integrations_from": self.integrations_from,
            "audit_tail_per_partition": self.tail,
            "integrations": {
                name: {
                    "active": i.active,
                    "last_event_in": i.last_in.to_dict() if i.last_in else None,
                    "last_effect_out": i.last_out.to_dict() if i.last_out else None,
                    "dead_letters": i.dead_letters,
                    "ratelimit_remaining": budget_for(i),
                    "import": i.imports.to_dict(self.at) if i.imports.emitted or i.imports.finished else None,
                }
                for name, i in self.integrations.items()
            },
            "events_in": {t: (iso_ms(ts) if ts is not None else None) for t, ts in self.raw_last.items()},
            "groups": {
                g: {**(self.groups[g].to_dict() if g in self.groups else {"state": "?", "members": []}), "lag": lag}
                for g, lag in self.lag.items()
            },
            "dead_letters": {
                "total": self.deadletters_total,
                "after_last_replay": self.deadletters_after_replay,
                "replayed_up_to_offset": self.replayed_up_to,
                "by_stage": self.deadletters_by_stage,
            },
            "ratelimit_remaining": (
                {f"{t}/{a}": v for (t, a), v in sorted(self.budget.items())} if self.budget is not None else "n/a"
            ),
            "ratelimit_errors": self.budget_errors,
        }

    def lines(self) -> list[str]:
        now = self.at

        def moment(timestamp_ms: int) -> str:
            dt = datetime.fromtimestamp(timestamp_ms / 1000, UTC)
            text = dt.isoformat(timespec="seconds").replace("+00:00", "Z")
            return f"{text[11:] if dt.date() == now.date() else text} ({ago(dt, now)})"

        def when(seen: Seen | None) -> str:
            if seen is None:
                return "—"
            what = seen.decision + (f" ({seen.rule})" if seen.rule else "")
            return f"{moment(seen.timestamp)} {seen.event_id} {what}"

        out = [
            f"pipeline status — broker {self.bootstrap}"
            + (f", topic prefix {self.prefix!r}" if self.prefix else "")
            + f", {now.isoformat(timespec='seconds').replace('+00:00', 'Z')}",
            "",
            f"integrations (from the {self.integrations_from}; times UTC; the last {self.tail} audit records"
            " per partition)",
        ]
        rows = []
        for name, i in self.integrations.items():
            label = name + (" (inactive)" if i.active is False else "")
            budget = (
                ", ".join(f"{t} {v:.0f}" for t, v in sorted(i.budget.items())) or "—"
                if self.budget is not None
                else "n/a"
            )
            rows.append([label, when(i.last_in), when(i.last_out), str(i.dead_letters), budget])
        out += [
            "  " + line
            for line in table(
                rows, ["integration", "last event in", "last effect out", "dead letters", "requests left"]
            )
        ]
        if not rows:
            out.append("  none found")
        irows = [
            [
                name,
                str(i.imports.done),
                str(i.imports.remaining),
                f"{i.imports.rate_per_min(now):.1f}/min",
                duration(i.imports.eta_s(now)),
            ]
            for name, i in self.integrations.items()
            if i.imports.emitted or i.imports.finished
        ]
        if irows:
            out += ["", "imports (bulk commands: initial import, reconciliation; from the same audit records)"]
            out += ["  " + line for line in table(irows, ["integration", "done", "remaining", "rate", "eta"])]
        out += ["", "events in (newest record per raw topic)"]
        out += [
            "  " + line for line in table([[t, "—" if ts is None else moment(ts)] for t, ts in self.raw_last.items()])
        ]
        out += ["", "consumer groups"]
        grows = []
        for g, lag in self.lag.items():
            info = self.groups.get(g)
            members = ", ".join(sorted({f"{m.client_id}@{m.host}" for m in info.members})) if info else ""
            grows.append(
                [
                    g,
                    info.state if info else "?",
                    str(len(info.members)) if info else "?",
                    str(info.partitions) if info else "?",
                    "?" if lag is None else str(lag),
                    members,
                ]
            )
        out += ["  " + line for line in table(grows, ["group", "state", "members", "partitions", "lag", "clients"])]
        by_stage = ", ".join(f"{s} {n}" for s, n in sorted(self.deadletters_by_stage.items()))
        replay = (
            f", {self.deadletters_after_replay} after the last replay (offset {self.replayed_up_to})"
            if self.replayed_up_to is not None
            else ", never replayed"
        )
        out += [
            "",
            f"dead letters: {self.deadletters_total} in the topic{replay}" + (f"; {by_stage}" if by_stage else ""),
        ]
        if self.budget is None:
            out.append("rate-limit budget left: n/a (Kafka does not record it; --metrics URL of the sinks and pollers)")
        else:
            left = ", ".join(f"{t}/{a} {v:.0f}" for (t, a), v in sorted(self.budget.items())) or "no series yet"
            out.append(f"rate-limit budget left: {left}")
        for e in self.budget_errors:
            out.append(f"  ({e})")
        return out


def _integrations_from_config(path: str | None) -> dict[str, IntegrationStatus] | None:
    explicit = path is not None
    path = path or os.environ.get("PIPELINE_CONFIG")
    if not path or (not explicit and not os.path.exists(path)):
        return None
    config = load_config(path)  # a bad file is a ConfigError: one line from the CLI
    return {i.name: IntegrationStatus(i.name, active=i.active) for i in config.integrations}


async def _scrape(urls: list[str]) -> tuple[dict[tuple[str, str], float], list[str]]:
    budget: dict[tuple[str, str], float] = {}
    errors: list[str] = []
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for url in urls:
            try:
                async with session.get(url) as response:
                    body = await response.text()
                    if response.status != 200:
                        errors.append(f"{url}: HTTP {response.status}")
                        continue
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                errors.append(f"{url}: {type(exc).__name__}: {exc}")
                continue
            for family in text_string_to_metric_families(body):
                if family.name != "pipeline_ratelimit_remaining":
                    continue
                for sample in family.samples:
                    key = (sample.labels.get("target", "?"), sample.labels.get("account", "?"))
                    # several services share a window: the smallest answer is the newest news
                    budget[key] = min(budget.get(key, sample.value), sample.value)
    return budget, errors


async def collect(
    bootstrap: str,
    topics: Topics,
    *,
    integrations: dict[str, IntegrationStatus] | None = None,
    tail: int = DEFAULT_TAIL,
    metrics_urls: list[str] | None = None,
    now: datetime | None = None,
) -> Status:
    status = Status(bootstrap, topics.prefix, now or datetime.now(UTC), tail)
    if integrations is not None:
        status.integrations, status.integrations_from = integrations, "integrations file"

    def integration(name: str) -> IntegrationStatus | None:
        if name in status.integrations:
            return status.integrations[name]
        if integrations is not None or not name or name == "*":
            return None  # the file is the list; an integration it no longer has is not shown
        return status.integrations.setdefault(name, IntegrationStatus(name))

    # the audit tail: last event in (a processor's decision), last effect out (a sink's "done")
    async for r in read_window(bootstrap, [topics.audit], tail=tail):
        audit = json_or_text(r.value)
        if not isinstance(audit, dict):
            continue
        stage = str(audit.get("stage") or headers_of(r).get("stage") or "?")
        for d in audit.get("decisions") or []:
            i = integration(str(d.get("integration", "")))
            if i is None:
                continue
            seen = Seen(r.timestamp, str(audit.get("event_id")), stage, str(d.get("decision")), d.get("rule"))
            if d.get("priority") == "bulk" and d.get("command_id"):
                if stage.startswith("process") and d.get("decision") == "emitted":
                    i.imports.emitted.add(str(d["command_id"]))
                elif stage.startswith("sink") and d.get("decision") in FINISHED:
                    i.imports.finished[str(d["command_id"])] = r.timestamp
            if stage.startswith("process") and (i.last_in is None or r.timestamp >= i.last_in.timestamp):
                i.last_in = seen
            if (
                stage.startswith("sink")
                and d.get("decision") == "done"
                and (i.last_out is None or r.timestamp >= i.last_out.timestamp)
            ):
                i.last_out = seen

    # the newest raw record of each topic
    raw_names = [getattr(topics, a) for a in RAW_TOPICS]
    status.raw_last = dict.fromkeys(raw_names)
    async for r in read_window(bootstrap, raw_names, tail=1):
        status.raw_last[r.topic] = max(status.raw_last.get(r.topic) or 0, r.timestamp)

    # consumer groups: members, assignments, lag in records
    names = {f"{topics.prefix}{g}": getattr(topics, attr) for g, attr in GROUPS.items()}
    status.groups = await describe_groups(bootstrap, list(names))
    lags = await asyncio.gather(*(group_lag(bootstrap, group, [topic]) for group, topic in names.items()))
    status.lag = {group: sum(lag.values()) for group, lag in zip(names, lags, strict=True)}

    # dead letters
    letters = await read_deadletters(bootstrap, topics)
    cursor = await replay_cursor(bootstrap, topics)
    status.deadletters_total = len(letters)
    status.deadletters_by_stage = dict(Counter(d.stage for d in letters))
    if cursor is not None:
        status.replayed_up_to = int(cursor.get("next_offset", 0))
        status.deadletters_after_replay = sum(1 for d in letters if d.offset >= status.replayed_up_to)
    for d in letters:
        i = integration(d.integration) if d.integration else None
        if i is not None:
            i.dead_letters += 1

    # rate-limit budget, from the services' metrics
    if metrics_urls:
        budget, status.budget_errors = await _scrape(metrics_urls)
        # no service answered: still not known
        status.budget = budget if len(status.budget_errors) < len(metrics_urls) else None
        for (target, account), value in (status.budget or {}).items():
            i = status.integrations.get(account)
            if i is not None:
                i.budget[target] = value
    return status


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="per integration: last event in, last effect out; lag, members, dead letters")
    p.add_argument("--json", action="store_true", help="one JSON document")
    p.add_argument("--tail", type=int, default=DEFAULT_TAIL, help=f"audit records read per partition ({DEFAULT_TAIL})")
    p.add_argument(
        "--metrics",
        action="append",
        metavar="URL",
        help="a service's /metrics for the rate-limit budget (repeatable: the sinks, the pollers)",
    )
    p.add_argument("--config", help="integrations file for the list of integrations (env PIPELINE_CONFIG)")
    p.add_argument("--bootstrap", help="broker (env KAFKA_BOOTSTRAP)")
    p.add_argument("--prefix", help="topic name prefix (env TOPIC_PREFIX)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    kafka = KafkaSettings.from_env()
    if args.tail < 1:
        raise SettingsError("--tail: must be at least 1")
    topics = Topics(args.prefix if args.prefix is not None else kafka.topic_prefix)
    integrations = _integrations_from_config(args.config)
    status = asyncio.run(
        collect(
            args.bootstrap or kafka.bootstrap,
            topics,
            integrations=integrations,
            tail=args.tail,
            metrics_urls=args.metrics,
        )
    )
    print(dumps(status.to_dict()) if args.json else "\n".join(status.lines()))
    return 0
