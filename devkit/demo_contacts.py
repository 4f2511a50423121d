"""The contacts part of ``python -m devkit demo``: Kustomer customers ⇄ CloudTalk contacts.

The scripted data (seeded, deterministic from the demo's seed):

* Kustomer ("support" org): customers without phones (some with shared e-mails), customers with
  only shared or WhatsApp numbers, customers with invalid numbers only, pairs with the same number
  in different notations, pairs with the same name, customers whose number or name is already a
  CloudTalk contact, and singles — some with a company, a work address, a website, a "Created by"
  user whose e-mail is a CloudTalk agent, extra shared/WhatsApp values that must never be copied.
* CloudTalk: contacts colliding with those customers by phone, by name and by e-mail, contacts
  with an invalid number, and clean contacts (plus the contacts of the calls part).

The phases: the initial import (``poll customers`` — the integration has no cursor yet) until
idle, then the initial export (``poll contacts``) until idle, then live edits by people on both
sides. :class:`ContactsModel` is an independent model of the documented rules (it uses
libphonenumber directly, not the pipeline's code); the summary compares the audit trail and the
simulators' final state with it, per rule.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from random import Random
from typing import Any

import orjson
import phonenumbers

from devkit.wiring import sim
from pipeline.kafka.reading import read_topic

# CloudTalk agents of the demo (the calls part seeds them); Kustomer users with these e-mails
# become favorite agents, the others stay empty
AGENT_EMAILS = ("max@example.com", "eva@example.com", "ola@example.com")
LINK_PREFIX = "https://acme.kustomerapp.com/app/customers/"  # the support org's customer links
FIRST = (
    "Jana",
    "Peter",
    "Lucia",
    "Martin",
    "Zuzana",
    "Tomas",
    "Eva",
    "Michal",
    "Katarina",
    "Juraj",
    "Anna",
    "Lukas",
    "Monika",
    "Marek",
    "Petra",
    "Filip",
    "Ivana",
    "Robert",
    "Simona",
    "David",
)
LAST = (
    "Novak",
    "Kovac",
    "Horvath",
    "Varga",
    "Toth",
    "Nagy",
    "Baranek",
    "Molnar",
    "Balaz",
    "Szabo",
    "Kral",
    "Hudak",
    "Urban",
    "Polak",
    "Sokol",
    "Kollar",
    "Bartos",
    "Lukac",
    "Gajdos",
    "Blaho",
)
COMPANIES = (
    "Acme s.r.o.",
    "Tatra Logistics a.s.",
    "Danube Foods",
    "Carpathia Travel",
    "Nordic Parts GmbH",
    "Blue Harbor Ltd",
    "Orava Energy",
    "Vltava Media",
)
CITIES = (
    ("Bratislava", "81101", "Bratislavský kraj", "SK", "Slovakia"),
    ("Košice", "04001", "Košický kraj", "SK", "Slovakia"),
    ("Brno", "60200", "Jihomoravský kraj", "CZ", "Czechia"),
    ("Berlin", "10115", "Berlin", "DE", "Germany"),
)


def e164(raw: str) -> str | None:
    """The model's own normalisation: libphonenumber, '00' as the international prefix."""
    text = raw.strip()
    if text.startswith("00"):
        text = "+" + text[2:]
    try:
        parsed = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def name_key(name: str) -> str:
    return " ".join(name.split()).casefold()


class Numbers:
    """Distinct valid mobile numbers (SK, CZ, DE, FR) that no other part of the demo uses."""

    PREFIXES = (
        ("+421905", 13),
        ("+421911", 13),
        ("+421944", 13),
        ("+420602", 13),
        ("+420731", 13),
        ("+4915112", 14),
        ("+4917623", 14),
        ("+33612", 12),
        ("+33698", 12),
    )

    def __init__(self, rng: Random) -> None:
        self.rng, self.used = rng, set()

    def new(self) -> str:
        while True:
            prefix, length = self.rng.choice(self.PREFIXES)
            number = prefix + "".join(str(self.rng.randint(0, 9)) for _ in range(length - len(prefix)))
            if number not in self.used and e164(number) == number:
                self.used.add(number)
                return number


def notation(number: str, style: int) -> str:
    """The same number as a person might type it."""
    if style == 1:
        return "00" + number[1:]
    if style == 2:
        digits = number[4:] if number.startswith(("+421", "+420")) else number[3:]
        head = number[: len(number) - len(digits)]
        return f"{head} {digits[:3]} {digits[3:6]} {digits[6:]}".strip()
    return number


@dataclass
class ContactsModel:
    """The seeded data and what the documented rules say must happen to it."""

    customers: list[dict[str, Any]] = field(default_factory=list)  # Kustomer seed
    companies: list[dict[str, Any]] = field(default_factory=list)
    users: list[dict[str, Any]] = field(default_factory=list)
    contacts: list[dict[str, Any]] = field(default_factory=list)  # CloudTalk seed (add bodies)
    kind: dict[str, str] = field(default_factory=dict)  # customer id -> category
    contact_kind: list[str] = field(default_factory=list)  # per seeded contact
    groups: list[list[str]] = field(default_factory=list)  # customer ids that become one contact
    import_expect: Counter = field(default_factory=Counter)
    export_expect: Counter = field(default_factory=Counter)
    fields_expect: Counter = field(default_factory=Counter)
    never_copied: set[str] = field(default_factory=set)  # shared / WhatsApp values

    @classmethod
    def build(cls, rng: Random, n_customers: int, n_contacts: int) -> ContactsModel:
        m = cls()
        nums = Numbers(rng)
        now = datetime.now(UTC)
        seq = iter(range(10**6))

        def new_id() -> str:
            return f"6{rng.getrandbits(92):023x}"

        names_used: set[str] = set()

        def new_name() -> str:
            tries = 0
            while True:
                # two-digit suffixes while they last (the demo's data); wider ones for large runs
                suffix = rng.randint(10, 99) if tries < 50 else rng.randint(100, 999_999)
                n = f"{rng.choice(FIRST)} {rng.choice(LAST)}-{suffix}"
                if n not in names_used:
                    names_used.add(n)
                    return n
                tries += 1

        def when() -> str:  # ascending updatedAt over the last 30 days
            return (
                (now - timedelta(days=30) + timedelta(minutes=next(seq)))
                .isoformat(timespec="milliseconds")
                .replace("+00:00", "Z")
            )

        m.companies = [{"id": new_id(), "name": c} for c in COMPANIES]
        matched = [{"id": new_id(), "name": e.split("@")[0].title(), "email": e} for e in AGENT_EMAILS]
        unmatched = [{"id": new_id(), "name": "Temp Agent", "email": "temp.agent@acme.example"}]
        m.users = matched + unmatched

        def customer(
            kind: str, *, name: str | None = None, phones: list[str] | None = None, **attrs: Any
        ) -> dict[str, Any]:
            cid = new_id()
            name = name or new_name()
            c = {
                "id": cid,
                "name": name,
                "updatedAt": when(),
                "createdBy": unmatched[0]["id"],
                "emails": [{"type": "work", "email": f"{name_key(name).replace(' ', '.')}.{cid[-4:]}@mail.example"}],
                **({"phones": [{"type": "mobile", "phone": p} for p in phones]} if phones else {}),
                **attrs,
            }
            m.customers.append(c)
            m.kind[cid] = kind
            return c

        def frac(f: float, n: int) -> int:
            return max(1, round(f * n))

        # --- CloudTalk contacts first (some customers collide with them) ---------------------
        ct_phone = [nums.new() for _ in range(frac(0.06, n_customers))]
        ct_name = [new_name() for _ in range(frac(0.02, n_customers))]
        for p in ct_phone:
            m.contacts.append({"name": new_name(), "ContactNumber": [{"public_number": p}]})
            m.contact_kind.append("phone_collides")
        for n in ct_name:
            m.contacts.append({"name": n, "ContactNumber": [{"public_number": nums.new()}]})
            m.contact_kind.append("name_collides")

        # --- Kustomer customers ----------------------------------------------------------------
        for i in range(frac(0.08, n_customers)):
            c = customer("no_phone")
            if i % 2:
                c["sharedEmails"] = [{"type": "work", "email": f"info{i}@shared.example"}]
        for i in range(frac(0.05, n_customers)):
            if i % 2:
                w = nums.new()
                customer("only_whatsapp", whatsapps=[{"type": "mobile", "phone": f"whatsapp:{w}"}])
                m.never_copied.add(w)
            else:
                s = nums.new()
                customer("only_shared_phone", sharedPhones=[{"type": "work", "phone": s}])
                m.never_copied.add(s)
        for i in range(frac(0.03, n_customers)):  # too short, fictional, not a number
            j = i % 100  # more digits would make some of them valid numbers (+44 1234 561002)
            invalid = (f"+44123456{j:02d}", f"+1555010{j:04d}", f"555-01{j:02d}")[i % 3]
            customer("invalid_phone", phones=[invalid])
        for i in range(frac(0.06, n_customers)):  # the same number, another notation, another name
            p = nums.new()
            a = customer("same_phone", phones=[notation(p, 0)])
            b = customer("same_phone", phones=[notation(p, 1 + i % 2)])
            m.groups.append([a["id"], b["id"]])
        for i in range(frac(0.05, n_customers)):  # the same name (spacing and case may differ)
            name = new_name()
            a = customer("same_name", name=name, phones=[nums.new()])
            b = customer("same_name", name=name.upper() if i % 3 == 0 else name.replace(" ", "  "), phones=[nums.new()])
            m.groups.append([a["id"], b["id"]])
        for p in ct_phone:
            c = customer("existing_contact_phone", phones=[notation(p, 2)])
            m.groups.append([c["id"], "ct"])
        for n in ct_name:
            c = customer("existing_contact_name", name=n.lower(), phones=[nums.new()])
            m.groups.append([c["id"], "ct"])
        singles = n_customers - len(m.customers)
        email_collisions: list[str] = []
        for i in range(max(0, singles)):
            attrs: dict[str, Any] = {}
            if i % 3 == 0:
                attrs["company"] = m.companies[i % len(m.companies)]["id"]
                m.fields_expect["company"] += 1
            if i % 3 == 1:
                city, zip_code, region, code, country = CITIES[i % len(CITIES)]
                attrs["locations"] = [
                    {"type": "home", "address": "Home street 1"},
                    {
                        "type": "work",
                        "address1": f"Main street {i}",
                        "address2": "2nd floor",
                        "cityName": city,
                        "zipCode": zip_code,
                        "regionName": region,
                        "countryCode": code,
                        "countryName": country,
                    },
                ]
                m.fields_expect["work address"] += 1
                m.fields_expect["country"] += 1
            if i % 5 == 0:
                attrs["urls"] = [{"type": "website", "url": f"https://shop{i}.example"}]
                m.fields_expect["website"] += 1
            if i % 4 == 0:
                attrs["createdBy"] = matched[i % len(matched)]["id"]
                m.fields_expect["favorite agent"] += 1
            if i % 7 == 0:
                s, w = nums.new(), nums.new()
                attrs["sharedPhones"] = [{"type": "work", "phone": s}]
                attrs["whatsapps"] = [{"type": "mobile", "phone": f"whatsapp:{w}"}]
                attrs["sharedEmails"] = [{"type": "work", "email": f"team{i}@shared.example"}]
                m.never_copied |= {s, w, f"team{i}@shared.example"}
            c = customer("single", phones=[nums.new()], **attrs)
            m.groups.append([c["id"]])
            if len(email_collisions) < frac(0.02, n_customers) and i % 11 == 5:
                email_collisions.append(c["emails"][0]["email"])

        # --- the rest of the CloudTalk contacts --------------------------------------------------
        for e in email_collisions:
            m.contacts.append(
                {"name": new_name(), "ContactNumber": [{"public_number": nums.new()}], "ContactEmail": [{"email": e}]}
            )
            m.contact_kind.append("email_collides")
        bad = ("+4412345678", "+15550100123", "+4420123")
        for i in range(frac(0.05, n_contacts)):
            m.contacts.append({"name": new_name(), "ContactNumber": [{"public_number": bad[i % len(bad)]}]})
            m.contact_kind.append("invalid_phone")
        while len(m.contacts) < n_contacts:
            i = len(m.contacts)
            m.contacts.append(
                {
                    "name": new_name(),
                    "ContactNumber": [{"public_number": nums.new()}],
                    "ContactEmail": [{"email": f"ct.contact{i}@mail.example"}],
                }
            )
            m.contact_kind.append("clean")

        # --- what the rules say -----------------------------------------------------------------
        k = Counter(m.kind.values())
        m.import_expect["skipped: no_phone"] = k["no_phone"] + k["only_whatsapp"] + k["only_shared_phone"]
        m.import_expect["skipped: no_valid_phone"] = k["invalid_phone"]
        new_groups = [g for g in m.groups if "ct" not in g]
        m.import_expect["created"] = len(new_groups)
        m.import_expect["merged"] = (
            sum(len(g) for g in m.groups if "ct" in g)
            - len([g for g in m.groups if "ct" in g])
            + sum(len(g) - 1 for g in new_groups)
        )
        ck = Counter(m.contact_kind)
        m.export_expect["exported"] = ck["clean"]
        m.export_expect["skipped: email_exists"] = ck["email_collides"]
        m.export_expect["skipped: invalid_phone"] = ck["invalid_phone"]
        m.export_expect["skipped: imported_from_kustomer"] = (
            ck["phone_collides"] + ck["name_collides"] + m.import_expect["created"]
        )
        return m

    def newest_name(self, group: list[str]) -> str:
        members = [c for c in self.customers if c["id"] in group]
        return max(members, key=lambda c: c["updatedAt"])["name"]


def attr(resource: dict[str, Any], name: str) -> Any:
    return (resource.get("attributes") or resource).get(name)


def contact_numbers(contact: dict[str, Any]) -> set[str]:
    return {n if str(n).startswith("+") else f"+{n}" for n in contact.get("contact_numbers") or []}


async def entity_outcomes(
    bootstrap: str,
    raw_topic: str,
    audit_topic: str,
    integration: str,
    entity: Any,
    process_stage: str,
    sink_stage: str,
    via: str = "poll",
) -> dict[str, str]:
    """Entity id -> the outcome of its ``via`` event: ``dropped: rule`` at the processor or the
    sink's outcome (``created``, ``merged``, ``skipped: phone_exists`` …), from the audit trail."""
    events: dict[str, str] = {}
    for r in await read_topic(bootstrap, raw_topic):
        env = orjson.loads(r.value)
        if env.get("via") == via:
            events[env["id"]] = str(entity(env["payload"]))
    outcome: dict[str, str] = {}
    sink: dict[str, str] = {}
    for r in await read_topic(bootstrap, audit_topic):
        a = orjson.loads(r.value)
        if a["event_id"] not in events:
            continue
        for d in a["decisions"]:
            if d["integration"] != integration:
                continue
            if a["stage"] == process_stage and d["decision"] == "dropped":
                outcome[events[a["event_id"]]] = f"skipped: {d['rule']}"
            elif a["stage"] == sink_stage:
                rule = d.get("rule", "")
                sink[events[a["event_id"]]] = rule.replace("skipped:", "skipped: ")
    for entity_id, result in sink.items():
        outcome.setdefault(entity_id, result)
    for entity_id in events.values():
        outcome.setdefault(entity_id, "no outcome")
    return outcome


class Checks:
    """Rows of (label, got, expected) and the problems among them."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []
        self.problems: list[str] = []

    def check(self, section: str, label: str, got: int, want: int | None) -> None:
        ok = want is None or got == want
        self.rows.append((section, label, str(got), "" if want is None else ("ok" if ok else f"expected {want}")))
        if not ok:
            self.problems.append(f"{section} {label}: {got}, expected {want}")


def import_and_export_checks(
    model: ContactsModel,
    imports: dict[str, str],
    exports: dict[str, str],
    calls_day_expect: Counter,
    calls_day_ids: set[str],
    ct_state: dict[str, Any],
    k_customers: list[dict[str, Any]],
    own_created: set[str],
    link_prefix: str,
    tag: str,
) -> Checks:
    checks = Checks()
    seeded = set(model.kind)
    got_import = Counter("merged" if v in ("merged", "updated") else v for k, v in imports.items() if k in seeded)
    for label in sorted(set(model.import_expect) | set(got_import)):
        checks.check(
            "import (Kustomer → CloudTalk), per seeded customer", label, got_import[label], model.import_expect[label]
        )
    contacts = [c["Contact"] | {"links": [u["url"] for u in c.get("ExternalUrl") or []]} for c in ct_state["contacts"]]
    # a customer the calls or SMS flow created for an unknown number becomes a contact (linked to it)
    linked_to = {u.removeprefix(link_prefix) for c in contacts for u in c["links"] if u.startswith(link_prefix)}
    checks.check(
        "import (Kustomer → CloudTalk), per seeded customer",
        "customers the calls flow created: became contacts",
        len(own_created & linked_to),
        len(own_created),
    )

    linked = [c for c in contacts if any(u.startswith(link_prefix) for u in c["links"])]
    section = "CloudTalk contacts after the import"
    checks.check(
        section,
        "contacts linked to a Kustomer customer",
        len(linked),
        model.import_expect["created"] + sum(1 for g in model.groups if "ct" in g) + len(own_created),
    )
    checks.check(
        section,
        "linked contacts without the contact tag",
        sum(1 for c in linked if tag not in {t.get("name") for t in c.get("tags") or []}),
        0,
    )
    by_number: dict[str, list[str]] = defaultdict(list)
    for c in contacts:
        for n in contact_numbers(c):
            by_number[n].append(c["id"])
    customers = {c["id"]: c for c in model.customers}
    missing = split = 0
    merged_right = merged_total = 0
    for group in model.groups:
        ids = {
            cid
            for cust in group
            if cust != "ct"
            for p in customers[cust].get("phones") or []
            if (n := e164(p["phone"]))
            for cid in by_number.get(n, [])
        }
        numbers = [e164(p["phone"]) for cust in group if cust != "ct" for p in customers[cust].get("phones") or []]
        missing += sum(1 for n in numbers if n and not by_number.get(n))
        split += len(ids) > 1
        if len(group) > 1 and "ct" not in group and len(ids) == 1:
            merged_total += 1
            contact = next(c for c in contacts if c["id"] in ids)
            merged_right += name_key(contact["name"]) == name_key(model.newest_name(group))
    checks.check(section, "customer numbers missing in CloudTalk", missing, 0)
    checks.check(section, "customer groups split over several contacts", split, 0)
    checks.check(section, "merged pairs named after the newest customer", merged_right, merged_total)
    copied = sum(
        1
        for c in contacts
        for v in (contact_numbers(c) | set(c.get("contact_emails") or []))
        if v in model.never_copied
    )
    checks.check(section, "shared / WhatsApp values copied", copied, 0)
    for key, expected in (
        ("company", "company"),
        ("website", "website"),
        ("address", "work address"),
        ("country_id", "country"),
        ("favorite_agent", "favorite agent"),
    ):
        checks.check(
            section,
            f"linked contacts with a {expected}",
            sum(1 for c in linked if c.get(key)),
            model.fields_expect[expected],
        )

    seeded_ct = {str(c["id"]) for c in contacts} - calls_day_ids
    got_export = Counter(
        "exported" if v in ("created", "reconciled") else v for k, v in exports.items() if k in seeded_ct
    )
    section = "export (CloudTalk → Kustomer), per contact"
    for label in sorted(set(model.export_expect) | set(got_export)):
        checks.check(section, label, got_export[label], model.export_expect[label])
    got_calls_day = Counter(
        "exported" if v in ("created", "reconciled") else v for k, v in exports.items() if k in calls_day_ids
    )
    for label in sorted(set(calls_day_expect) | set(got_calls_day)):
        checks.check(section, f"contacts of the calls part: {label}", got_calls_day[label], calls_day_expect[label])
    ext = Counter(attr(c, "externalId") for c in k_customers if str(attr(c, "externalId") or "").isdigit())
    checks.check(
        section,
        "Kustomer customers with a CloudTalk contact id",
        len(ext),
        model.export_expect["exported"] + calls_day_expect["exported"],
    )
    checks.check(section, "duplicate customers (same externalId)", sum(n - 1 for n in ext.values() if n > 1), 0)
    return checks


def calls_day_export_model(calls_day: list[dict[str, Any]], k_customers: list[dict[str, Any]]) -> Counter:
    """What rule 4 and 5 say about the contacts of the calls part, given Kustomer's customers."""
    phones = {e164(p["phone"]) for c in k_customers for p in attr(c, "phones") or []}
    emails = {e["email"].lower() for c in k_customers for e in attr(c, "emails") or []}
    out = Counter()
    for c in calls_day:
        numbers = [n["public_number"] for n in c.get("ContactNumber") or []]
        if c.get("linked"):  # the contact an unknown caller's customer became: not exported back
            out["skipped: imported_from_kustomer"] += 1
        elif any(e164(n) is None for n in numbers):
            out["skipped: invalid_phone"] += 1
        elif any(e164(n) in phones for n in numbers):
            out["skipped: phone_exists"] += 1
        elif any(e["email"].lower() in emails for e in c.get("ContactEmail") or []):
            out["skipped: email_exists"] += 1
        else:
            out["exported"] += 1
    return out


def since(t0: float) -> str:
    return f"{time.monotonic() - t0:.1f}s"


# --------------------------------------------------------------------------------------------
# The phases, driven from ``python -m devkit demo``
# --------------------------------------------------------------------------------------------


class ContactsPart:
    """Seed, initial import, initial export, live edits, summary (see the module docstring)."""

    def __init__(self, demo: Any, stack: Any, http: Any, bootstrap: str, topics: Any, urls: dict[str, str]) -> None:
        self.demo, self.stack, self.http = demo, stack, http
        self.bootstrap, self.topics, self.urls = bootstrap, topics, urls
        self.k, self.ct = urls["k_support"], urls["ct"]
        self.say = demo.say

    async def idle(self, label: str) -> None:
        await self.demo._wait_idle(self.http, self.bootstrap, self.topics, self.urls, label, contacts=True, quiet_s=6.0)

    async def first_pass(self, cursor: str, timeout: float = 900.0) -> dict[str, Any]:
        """Waits until a poller finished its first pass (its cursor is in Kafka); with progress."""
        t0 = time.monotonic()
        last = 0.0
        while time.monotonic() - t0 < timeout:
            found = None
            for r in await read_topic(self.bootstrap, self.topics.cursors):
                if r.key == cursor.encode():
                    found = orjson.loads(r.value)
            if found:
                return found
            if time.monotonic() - last > 10:
                raw = self.topics.raw_customers if cursor.startswith("kustomer") else self.topics.raw_contacts
                n = len(await read_topic(self.bootstrap, raw))
                self.say(f"      … first pass running: {n} events in {raw.removeprefix(self.topics.prefix)}")
                last = time.monotonic()
            await asyncio.sleep(1.0)
        raise TimeoutError(f"the poller did not finish its first pass ({cursor}) within {timeout:.0f}s")

    async def run(self) -> int:
        args = self.demo.args
        model = ContactsModel.build(Random(args.seed + 1), args.customers, args.contacts)
        # the state the calls part left: its CloudTalk contacts and the customers its sink created
        ct_before = await sim(self.http, "GET", f"{self.ct}/_sim/state")
        calls_day = ct_before["contacts"]
        calls_day_ids = {str(c["Contact"]["id"]) for c in calls_day}
        k_before = (await sim(self.http, "GET", f"{self.k}/_sim/state"))["customers"]
        calls_day_bodies = [
            {
                "ContactNumber": [{"public_number": n} for n in sorted(contact_numbers(c["Contact"]))],
                "ContactEmail": [{"email": e} for e in c["Contact"].get("contact_emails") or []],
                "linked": any(u["url"].startswith(LINK_PREFIX) for u in c.get("ExternalUrl") or []),
            }
            for c in calls_day
        ]

        self.say(
            f"[7/9] contacts: seeding Kustomer (support org) with {len(model.customers)} customers and "
            f"CloudTalk with {len(model.contacts)} more contacts …"
        )
        kinds = Counter(model.kind.values())
        self.say("      customers: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(kinds.items())))
        self.say(
            "      contacts: "
            + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(Counter(model.contact_kind).items()))
        )
        await sim(
            self.http,
            "POST",
            f"{self.k}/_sim/seed",
            {"users": model.users, "companies": model.companies, "customers": model.customers},
        )
        await sim(self.http, "POST", f"{self.ct}/_sim/seed", {"contacts": model.contacts})
        t0 = time.monotonic()
        self.say("      initial import: `pipeline poll customers` starts (support has no cursor yet) …")
        self.stack.add("poll-customers", ["poll", "customers"])
        await self.stack.wait_ready(["poll-customers"], timeout=180)
        done = await self.first_pass("kustomer.customers.support")
        self.say(f"      first pass published {done.get('published')} customer versions")
        await self.idle("      ")
        self.say(f"      import finished in {since(t0)}")

        t0 = time.monotonic()
        self.say("[8/9] contacts: initial export: `pipeline poll contacts` starts …")
        self.stack.add("poll-contacts", ["poll", "contacts"])
        await self.stack.wait_ready(["poll-contacts"], timeout=180)
        done = await self.first_pass("cloudtalk.contacts")
        self.say(f"      first pass published {done.get('published')} contacts")
        await self.idle("      ")
        self.say(f"      export finished in {since(t0)}")

        imports = await entity_outcomes(
            self.bootstrap,
            self.topics.raw_customers,
            self.topics.audit,
            "support",
            lambda p: p["data"]["id"],
            "process-contacts-import",
            "sink-cloudtalk",
            via="import",
        )
        exports = await entity_outcomes(
            self.bootstrap,
            self.topics.raw_contacts,
            self.topics.audit,
            "support",
            lambda p: p["contact_id"],
            "process-contacts-export",
            "sink-kustomer",
            via="import",
        )
        ct_state = await sim(self.http, "GET", f"{self.ct}/_sim/state")
        k_customers = (await sim(self.http, "GET", f"{self.k}/_sim/state"))["customers"]
        link_prefix = LINK_PREFIX
        checks = import_and_export_checks(
            model,
            imports,
            exports,
            calls_day_export_model(calls_day_bodies, k_before),
            calls_day_ids,
            ct_state,
            k_customers,
            {c["id"] for c in k_before},
            link_prefix,
            "kustomer-support",
        )
        live = await self.live_edits(model, ct_state, k_customers, link_prefix, checks)
        return self.print_summary(checks, live)

    # -- live edits ----------------------------------------------------------------------------
    async def writes(self) -> tuple[int, int]:
        ct = await sim(self.http, "GET", f"{self.ct}/_sim/requests")
        k = await sim(self.http, "GET", f"{self.k}/_sim/requests")

        def api_writes(log: dict[str, Any]) -> int:
            return sum(
                1
                for r in log.get("requests", [])
                if r.get("effect")
                and not r["path"].startswith("/_sim/")
                and not str(r["effect"]).startswith("webhook.")
            )

        n_ct, n_k = api_writes(ct), api_writes(k)
        return n_ct, n_k

    async def wait(self, condition: Any, timeout: float = 60.0) -> str:
        """Polls ``condition`` (an async callable) until it returns something truthy."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if await condition():
                return f"arrived after {time.monotonic() - t0:.1f}s"
            await asyncio.sleep(0.2)
        return f"NOT ARRIVED within {timeout:.0f}s"

    async def live_edits(
        self,
        model: ContactsModel,
        ct_state: dict[str, Any],
        k_customers: list[dict[str, Any]],
        link_prefix: str,
        checks: Checks,
    ) -> list[tuple[str, str]]:
        self.say("      live edits by people on both sides …")
        await sim(self.http, "DELETE", f"{self.ct}/_sim/requests")
        await sim(self.http, "DELETE", f"{self.k}/_sim/requests")
        nums = Numbers(Random(self.demo.args.seed + 2))
        rows: list[tuple[str, str]] = []
        single = next(c for c in model.customers if model.kind[c["id"]] == "single")
        new_number = nums.new()

        async def ct_contact_with(number: str) -> dict[str, Any] | None:
            state = await sim(self.http, "GET", f"{self.ct}/_sim/state")
            return next((c["Contact"] for c in state["contacts"] if number in contact_numbers(c["Contact"])), None)

        # 1. an agent adds a number to a Kustomer customer → the CloudTalk contact gets it
        phones = [*single["phones"], {"type": "work", "phone": new_number}]
        await sim(self.http, "POST", f"{self.k}/_sim/customers/{single['id']}/edit", {"attributes": {"phones": phones}})
        rows.append(
            (
                "Kustomer: an agent adds a number to a customer → CloudTalk contact has it",
                await self.wait(lambda: ct_contact_with(new_number)),
            )
        )
        # 2. an agent creates a Kustomer customer → a new CloudTalk contact
        fresh = nums.new()
        await sim(
            self.http,
            "POST",
            f"{self.k}/_sim/customers",
            {"attributes": {"name": "Walk-in Customer", "phones": [{"type": "mobile", "phone": fresh}]}},
        )
        rows.append(
            (
                "Kustomer: an agent creates a customer → new CloudTalk contact",
                await self.wait(lambda: ct_contact_with(fresh)),
            )
        )
        # 3. an agent renames an exported CloudTalk contact → the Kustomer customer follows
        exported = next(c for c in k_customers if str(attr(c, "externalId") or "").isdigit())
        contact_id = attr(exported, "externalId")
        await sim(self.http, "PATCH", f"{self.ct}/_sim/contacts/{contact_id}", {"name": "Renamed In CloudTalk"})

        async def renamed() -> bool:
            state = await sim(self.http, "GET", f"{self.k}/_sim/state")
            return any(
                c["id"] == exported["id"] and attr(c, "name") == "Renamed In CloudTalk" for c in state["customers"]
            )

        rows.append(
            ("CloudTalk: an agent renames an exported contact → Kustomer customer renamed", await self.wait(renamed))
        )
        # 4. an agent creates a CloudTalk contact → a new Kustomer customer
        other = nums.new()
        await sim(
            self.http,
            "POST",
            f"{self.ct}/_sim/contacts",
            {"name": "New Lead", "ContactNumber": [{"public_number": other}]},
        )

        async def created() -> bool:
            state = await sim(self.http, "GET", f"{self.k}/_sim/state")
            return any(e164(p["phone"]) == other for c in state["customers"] for p in attr(c, "phones") or [])

        rows.append(("CloudTalk: an agent creates a contact → new Kustomer customer", await self.wait(created)))
        await self.idle("      ")
        n_ct, n_k = await self.writes()
        checks.check("live edits (no ping-pong)", "CloudTalk writes (edit + add)", n_ct, 2)
        checks.check("live edits (no ping-pong)", "Kustomer writes (update + create)", n_k, 2)
        for label, verdict in rows:
            self.say(f"      {label}: {verdict}")
            source, action = label.split(" → ")[0].split(": ", 1)
            checks.check(
                "live edits (no ping-pong)",
                f"arrived in the other system: {source} {action.removeprefix('an agent ')}",
                int(verdict.startswith("arrived")),
                1,
            )
        return rows

    def print_summary(self, checks: Checks, live: list[tuple[str, str]]) -> int:
        self.say("      summary of the contacts part")
        width = max(len(r[1]) for r in checks.rows) + 2
        section = None
        for sec, label, got, verdict in checks.rows:
            if sec != section:
                self.say(f"  {sec}")
                section = sec
            self.say(f"    {label:{width}}{got:>6}  {verdict}")
        if checks.problems:
            self.say("  RESULT (contacts): MISMATCH\n    - " + "\n    - ".join(checks.problems))
            return 1
        self.say(
            "  RESULT (contacts): OK — imported, merged, exported and skipped exactly as the rules say; "
            "live edits arrived once, nothing echoed back"
        )
        return 0
