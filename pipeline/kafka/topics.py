"""The topic catalogue: every topic the product uses, its partitions and its cleanup policy.

Names get ``TOPIC_PREFIX`` in front (tests use a unique prefix per test; a deployment may use
one per environment). ``ensure`` creates what is missing and reports existing topics whose
settings differ from the catalogue — it never changes an existing topic.

| topic                  | key                           | what                                   |
|------------------------|-------------------------------|----------------------------------------|
| cloudtalk.calls.raw    | event id                      | call ended (webhook, poller, backfill) |
| cloudtalk.sms.raw      | event id                      | SMS sent / received                    |
| cloudtalk.contacts.raw | event id                      | contact created / updated / deleted    |
| kustomer.customers.raw | event id                      | customer created / updated             |
| kustomer.commands      | integration + external number | conversations, notes, customers        |
| cloudtalk.commands     | integration                   | contact create / edit                  |
| kustomer.ledger        | command id (compacted)        | sink bookkeeping, co-partitioned       |
| cloudtalk.ledger       | command id (compacted)        | sink bookkeeping, co-partitioned       |
| cloudtalk.contacts.index | contact id (compacted)      | the CloudTalk sink's contacts index    |
| poller.cursors         | poller name (compacted)       | where each poller stopped              |
| audit                  | event id                      | why an event went where it went        |
| deadletter             | original key                  | records that could not be processed    |
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from pipeline.kafka.clients import new_admin

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    doc: str = ""


_RAW = {"cleanup.policy": "delete", "retention.ms": str(30 * DAY_MS)}
_COMPACT = {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000", "segment.ms": str(DAY_MS)}

RAW_CALLS = "cloudtalk.calls.raw"
RAW_SMS = "cloudtalk.sms.raw"
RAW_CONTACTS = "cloudtalk.contacts.raw"
RAW_CUSTOMERS = "kustomer.customers.raw"
KUSTOMER_COMMANDS = "kustomer.commands"
CLOUDTALK_COMMANDS = "cloudtalk.commands"
KUSTOMER_LEDGER = "kustomer.ledger"
CLOUDTALK_LEDGER = "cloudtalk.ledger"
CONTACTS_INDEX = "cloudtalk.contacts.index"
CURSORS = "poller.cursors"
AUDIT = "audit"
DEADLETTER = "deadletter"

CATALOGUE: tuple[TopicSpec, ...] = (
    TopicSpec(RAW_CALLS, 6, _RAW, "CloudTalk call ended events"),
    TopicSpec(RAW_SMS, 6, _RAW, "CloudTalk SMS sent/received events"),
    TopicSpec(RAW_CONTACTS, 3, _RAW, "CloudTalk contact created/updated/deleted events"),
    TopicSpec(RAW_CUSTOMERS, 3, _RAW, "Kustomer customer created/updated events"),
    TopicSpec(KUSTOMER_COMMANDS, 6, _RAW, "commands for the Kustomer sink"),
    TopicSpec(CLOUDTALK_COMMANDS, 3, _RAW, "commands for the CloudTalk sink"),
    TopicSpec(KUSTOMER_LEDGER, 6, _COMPACT, "Kustomer sink ledger (co-partitioned with kustomer.commands)"),
    TopicSpec(CLOUDTALK_LEDGER, 3, _COMPACT, "CloudTalk sink ledger (co-partitioned with cloudtalk.commands)"),
    TopicSpec(CONTACTS_INDEX, 1, _COMPACT, "the CloudTalk sink's index of the company's contacts"),
    TopicSpec(CURSORS, 1, _COMPACT, "poller cursors"),
    TopicSpec(AUDIT, 3, {"cleanup.policy": "delete", "retention.ms": str(14 * DAY_MS)}, "audit trail"),
    TopicSpec(DEADLETTER, 1, {"cleanup.policy": "delete", "retention.ms": str(30 * DAY_MS)}, "dead letters"),
)

# A ledger must have exactly as many partitions as its command topic (co-partitioning).
CO_PARTITIONED = {KUSTOMER_LEDGER: KUSTOMER_COMMANDS, CLOUDTALK_LEDGER: CLOUDTALK_COMMANDS}


class Topics:
    """Resolves catalogue names with a prefix: ``Topics("t1-").name(RAW_CALLS)``."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    def name(self, base: str) -> str:
        return f"{self.prefix}{base}"

    def __getattr__(self, attr: str) -> str:
        # topics.raw_calls, topics.kustomer_commands, ...
        base = _ATTR_TO_BASE.get(attr)
        if base is None:
            raise AttributeError(attr)
        return self.name(base)

    def specs(self) -> list[TopicSpec]:
        return [TopicSpec(self.name(s.name), s.partitions, dict(s.config), s.doc) for s in CATALOGUE]


_ATTR_TO_BASE = {
    "raw_calls": RAW_CALLS,
    "raw_sms": RAW_SMS,
    "raw_contacts": RAW_CONTACTS,
    "raw_customers": RAW_CUSTOMERS,
    "kustomer_commands": KUSTOMER_COMMANDS,
    "cloudtalk_commands": CLOUDTALK_COMMANDS,
    "kustomer_ledger": KUSTOMER_LEDGER,
    "cloudtalk_ledger": CLOUDTALK_LEDGER,
    "contacts_index": CONTACTS_INDEX,
    "cursors": CURSORS,
    "audit": AUDIT,
    "deadletter": DEADLETTER,
}


@dataclass
class EnsureReport:
    created: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    differs: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.differs

    def lines(self) -> list[str]:
        out = [f"created    {t}" for t in self.created]
        out += [f"unchanged  {t}" for t in self.unchanged]
        for t, problems in self.differs.items():
            out += [f"DIFFERS    {t}: {p}" for p in problems]
        return out


async def ensure_topics(
    bootstrap: str, specs: list[TopicSpec], replication_factor: int = 1, timeout_ms: int = 30_000
) -> EnsureReport:
    """Create missing topics; report existing ones whose partitions or configs differ."""
    report = EnsureReport()
    admin = new_admin(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms)
    await admin.start()
    try:
        existing = {
            t["topic"]: t for t in await admin.describe_topics([s.name for s in specs]) if t.get("error_code", 0) == 0
        }
        missing = [s for s in specs if s.name not in existing]
        if missing:
            response = await admin.create_topics(
                [NewTopic(s.name, s.partitions, replication_factor, topic_configs=s.config) for s in missing],
                timeout_ms=timeout_ms,
            )
            already = []
            for topic, code, *rest in response.topic_errors:
                if code == 36:  # TOPIC_ALREADY_EXISTS: metadata lagged, or a concurrent ensure
                    already.append(topic)
                elif code != 0:
                    msg = rest[0] if rest else ""
                    raise RuntimeError(f"creating topic {topic} failed: error {code} {msg}")
            report.created = [s.name for s in missing if s.name not in already]
            if already:
                for _ in range(20):  # the topic exists; wait until metadata shows it, then check it
                    found = {
                        t["topic"]: t
                        for t in await admin.describe_topics(already)
                        if t.get("error_code", 0) == 0 and t.get("partitions")
                    }
                    if len(found) == len(already):
                        existing.update(found)
                        break
                    await asyncio.sleep(0.25)
                else:
                    raise RuntimeError(f"topics {already} exist but their metadata is not available")
        present = [s for s in specs if s.name in existing]
        if present:
            configs = await _describe_configs(admin, [s.name for s in present])
            for s in present:
                problems = []
                have_parts = len(existing[s.name]["partitions"])
                if have_parts != s.partitions:
                    problems.append(f"partitions {have_parts} (catalogue {s.partitions})")
                have = configs.get(s.name, {})
                for key, want in s.config.items():
                    if have.get(key) != want:
                        problems.append(f"{key}={have.get(key)} (catalogue {want})")
                if problems:
                    report.differs[s.name] = problems
                else:
                    report.unchanged.append(s.name)
        # co-partitioning is a correctness rule for the ledgers, not a preference
        by_name = {s.name: s for s in specs}
        for s in specs:
            for ledger, commands in CO_PARTITIONED.items():
                if s.name.endswith(ledger) and s.name[: -len(ledger)] + commands in by_name:
                    cmd_name = s.name[: -len(ledger)] + commands
                    parts = {}
                    for n in (s.name, cmd_name):
                        parts[n] = len(existing[n]["partitions"]) if n in existing else by_name[n].partitions
                    if parts[s.name] != parts[cmd_name]:
                        report.differs.setdefault(s.name, []).append(
                            f"has {parts[s.name]} partitions but {cmd_name} has {parts[cmd_name]}: "
                            "a ledger must be co-partitioned with its command topic"
                        )
    finally:
        await admin.close()
    return report


async def _describe_configs(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, dict[str, str]]:
    responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
    out: dict[str, dict[str, str]] = {}
    for response in responses:
        for resource in response.resources:
            # (error_code, error_message, resource_type, resource_name, config_entries)
            name, entries = resource[3], resource[4]
            out[name] = {entry[0]: entry[1] for entry in entries}
    return out


async def delete_topics(bootstrap: str, names: list[str]) -> None:
    admin = new_admin(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(names)
    finally:
        await admin.close()
