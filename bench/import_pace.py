"""Initial import at the platforms' pace: Kustomer customers → CloudTalk contacts, requests per customer.

    python bench/import_pace.py [--customers 1000] [--scale 100] [--variant search ...] [--seed 7]

Uses ``KAFKA_BOOTSTRAP`` when set, otherwise starts a local broker. The data is the demo's
(:class:`devkit.demo_contacts.ContactsModel`, built for ``--customers``): customers without a
phone (some with shared e-mails), with only shared or WhatsApp numbers, with invalid numbers, pairs
with the same number in another notation, pairs with the same name, customers whose number or name
is already a CloudTalk contact, and singles (company, work address, website, a "Created by" agent,
shared / WhatsApp values that must never be copied); CloudTalk holds ``--contacts`` contacts (by
default 30 % of the customers, the demo's 300 per 1,000), some colliding with the customers.

The import runs as the product runs it (and as the demo triggers it): ``pipeline poll customers``
starts while the integration has no cursor yet, so its first pass publishes every customer
(``via: import``) to ``kustomer.customers.raw``; the contacts-import processor and the CloudTalk
sink run as separate processes on a real broker; both simulators are processes of their own. The
CloudTalk simulator enforces ``60 × --scale`` requests per 60 s window for the company (real
CloudTalk: 60), and the integrations file tells the pipeline the same budget; the Kustomer simulator
allows ``2000 × --scale`` (the Ultimate plan, scaled). The run ends when every seeded customer has
an outcome in the audit trail (processor drop or sink result), no consumer lags and the CloudTalk
simulator saw no request for a few seconds.

Reported per variant, from the simulators' request logs:

* CloudTalk requests per customer of the import, by endpoint (contacts index, show, add, edit,
  bulk — with its commands —, others such as agents and countries); refused requests (429) apart;
* the projected wall time at the real 60 requests/min: requests / 60 minutes, reading a bulk
  request as one request and, when bulk is used, as one operation per command; the same projected
  to 50,000 customers from the requests per customer (unless ``--customers 50000`` ran);
* the Kustomer requests of the run (customer pages, company and user lookups …);
* the import outcomes per customer from the audit trail (created, merged, skipped per rule) against
  the demo's model of the rules, the model's checks of CloudTalk's final state (linked contacts,
  groups split over several contacts, numbers missing, fields, tags, shared values never copied),
  and duplicates: customers whose link was added in more than one contact (from the add requests and
  bulk add commands in the log) — each customer must cause one contact, once.

Variants (``--variant``, repeatable; default all of :data:`VARIANTS` but ``complete-all``) select the pipeline's path by
environment variables given to the CloudTalk sink; each runs on fresh topics and fresh simulators
with the same data. ``search`` (no contacts index) is the baseline of the summary; with another variant the summary
shows it against ``search`` (ratio variant/search). Adding a path is one line in :data:`VARIANTS`.

Aim: ≤ 0.25 CloudTalk
requests per customer, a bulk request read as one request. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import sys
import tempfile
import textwrap
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from random import Random
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402

from bench.common import Row, kafka, print_summary, ratio  # noqa: E402
from devkit.demo_contacts import (  # noqa: E402
    AGENT_EMAILS,
    LINK_PREFIX,
    ContactsModel,
    entity_outcomes,
    import_and_export_checks,
)
from devkit.net import free_port  # noqa: E402
from devkit.stack import Stack  # noqa: E402
from devkit.wiring import sim  # noqa: E402
from pipeline.kafka.lag import group_lag  # noqa: E402
from pipeline.kafka.reading import read_topic  # noqa: E402
from pipeline.kafka.topics import Topics, ensure_topics  # noqa: E402

# variant name -> environment given to the CloudTalk sink (one line per pipeline path); the
# baseline is the import without the contacts index (keyword search per phone and name)
VARIANTS: dict[str, dict[str, str]] = {
    "search": {"CLOUDTALK_INDEX": "off", "CLOUDTALK_BULK_MAX": "1"},  # no index: keyword search and shows
    "index": {"CLOUDTALK_BULK_MAX": "1", "CLOUDTALK_INDEX_COMPLETE": "0"},  # the index; one request per write
    "bulk": {"CLOUDTALK_INDEX_COMPLETE": "0"},  # + bulk writes (asking about new numbers first)
    "complete": {},  # the product's defaults: + a small CloudTalk's listed contacts shown once
    "complete-all": {"CLOUDTALK_INDEX_COMPLETE": "1000000"},  # + a CloudTalk of any size shown once
}
DEFAULT_VARIANTS = [v for v in VARIANTS if v != "complete-all"]  # complete-all: for large runs
BASELINE = "search"

REAL_PER_MINUTE = 60  # CloudTalk's budget per company
KUSTOMER_PER_MINUTE = 2000  # the Kustomer Ultimate plan (the demo's default)
PROJECT_TO = 50_000
SEED_PART = 1000  # records per seed request
INTEGRATION = "support"
TAG = "kustomer-support"
LINE = "+442012345678"
SECRETS = {"B_CT_ID": "bench-id", "B_CT_SECRET": "bench-secret", "B_K_KEY": "bench-kustomer-key", "B_HOOK": "b-hook"}
CHECKED_SECTIONS = ("import (", "CloudTalk contacts after the import")  # the model's checks this run covers
CONTACT_PATH = re.compile(r"^/api/contacts/(index|show|add|edit|delete|addTags|removeTags|attributes)\b")


@dataclass
class Run:
    variant: str
    customers: int
    seconds: float  # poller start → the last CloudTalk request
    first_pass_s: float  # poller start → its cursor (every customer published)
    ct_log: list[dict[str, Any]]
    k_log: list[dict[str, Any]]
    outcomes: Counter  # per seeded customer: created / merged / skipped: rule / …
    checks: list[tuple[str, str, str, str]]  # (section, label, got, verdict) of the model's checks
    problems: list[str]
    by_endpoint: Counter = field(default_factory=Counter)
    bulk_items: int = 0
    refused: int = 0  # 429
    added_twice: int = 0  # customers whose link went into more than one contact add
    adds: int = 0
    edits: int = 0

    def __post_init__(self) -> None:
        links: Counter = Counter()
        for e in self.ct_log:
            if not e["path"].startswith("/api/"):
                continue
            if e["status"] == 429:
                self.refused += 1
                continue
            self.by_endpoint[endpoint(e)] += 1
            if e["path"].endswith("/bulk/contacts.json"):
                items = e.get("items") or []
                self.bulk_items += len(items) or (len(e["body"]) if isinstance(e.get("body"), list) else 1)
                bodies = e["body"] if isinstance(e.get("body"), list) else []
                for item, command in zip(items, bodies, strict=False):
                    effect = str(item.get("effect") or "")
                    self.count_write(effect, (command or {}).get("data") or {}, links)
            else:
                self.count_write(str(e.get("effect") or ""), e.get("body") or {}, links)
        self.added_twice = sum(1 for n in links.values() if n > 1)

    def count_write(self, effect: str, body: dict[str, Any], links: Counter) -> None:
        if effect.startswith("contact.add "):
            self.adds += 1
            for url in {u.get("url", "") for u in body.get("ExternalUrl") or [] if isinstance(u, dict)}:
                if url.startswith(LINK_PREFIX):
                    links[url] += 1
        elif effect.startswith("contact.edit "):
            self.edits += 1

    def busiest_minute(self) -> int:
        """The most operations the company's window took in any 60 s of the run (sliding)."""
        taken = sorted(
            (e["at"], len(e.get("items") or []) or 1 if e["path"].endswith("/bulk/contacts.json") else 1)
            for e in self.ct_log
            if e["path"].startswith("/api/") and e["status"] != 429
        )
        best = total = lo = 0
        for at, cost in taken:
            total += cost
            while taken[lo][0] <= at - 60:
                total -= taken[lo][1]
                lo += 1
            best = max(best, total)
        return best

    @property
    def requests(self) -> int:
        """CloudTalk API requests the company's budget answered (a bulk request counts once)."""
        return sum(self.by_endpoint.values())

    @property
    def operations(self) -> int:
        """The same with a bulk request counted once per command (the cautious reading)."""
        return self.requests - self.by_endpoint["bulk"] + self.bulk_items

    def per_customer(self, n: float) -> float:
        return n / self.customers

    @property
    def k_requests(self) -> Counter:
        out: Counter = Counter()
        for e in self.k_log:
            if e["path"].startswith("/v1/") and e["status"] != 429:
                parts = [p for p in e["path"].split("/") if p]
                what = "/".join(parts[:2]) + ("/{id}" if len(parts) > 2 else "")
                out[f"{e['method']} /{what}"] += 1
        return out


def endpoint(entry: dict[str, Any]) -> str:
    path = entry["path"]
    m = CONTACT_PATH.match(path)
    if m:
        return {"index": "index/list"}.get(m.group(1), m.group(1))
    if path.endswith("/bulk/contacts.json"):
        return "bulk"
    return "other " + path.removeprefix("/api/").split("/")[0]


def minutes(requests: float) -> str:
    """Wall time at the real budget of 60 requests a minute."""
    m = requests / REAL_PER_MINUTE
    return f"{m:,.0f} min ({m / 60:.1f} h)" if m >= 90 else f"{m:,.1f} min"


def integrations_yaml(ct: str, k: str, rate: int) -> str:
    return textwrap.dedent(f"""\
        cloudtalk:
          base_url: "{ct}/api"
          key_id: {{env: B_CT_ID}}
          key_secret: {{env: B_CT_SECRET}}
          rate_limit_per_minute: {rate}
          poller_reserve: {max(10, rate // 6)}
        integrations:
          - name: {INTEGRATION}
            active: true
            contact_tag: {TAG}
            kustomer: {{base_url: "{k}", org_name: acme, api_key: {{env: B_K_KEY}}}}
            cloudtalk_webhook_secret: {{env: B_HOOK}}
            calls: {{connected_numbers: ["{LINE}"]}}
            contacts: {{import: true, export: false, merge_key: phone_or_name}}
        """)


async def import_outcomes(bootstrap: str, topics: Topics) -> dict[str, str]:
    """Each imported customer's outcome, from the audit trail of the import's two stages."""
    return await entity_outcomes(
        bootstrap,
        topics.raw_customers,
        topics.audit,
        INTEGRATION,
        lambda p: p["data"]["id"],
        "process-contacts-import",
        "sink-cloudtalk",
        via="import",
    )


async def fetch_log(http: aiohttp.ClientSession, url: str, since: int) -> list[dict[str, Any]]:
    """The simulator's request log after ``since`` (read as it grows: the log keeps 200,000)."""
    return (await sim(http, "GET", f"{url}/_sim/requests?since={since}"))["requests"]


async def run_variant(bootstrap: str, args: argparse.Namespace, model: ContactsModel, variant: str) -> Run:
    work = Path(tempfile.mkdtemp(prefix=f"bench-import-{variant}-"))
    topics = Topics(f"bimp{uuid.uuid4().hex[:6]}-")
    await ensure_topics(bootstrap, topics.specs())
    ports = {n: free_port() for n in ("ct", "k")}
    ct, k = (f"http://127.0.0.1:{ports[n]}" for n in ("ct", "k"))
    rate = REAL_PER_MINUTE * args.scale
    config = work / "integrations.yaml"
    config.write_text(integrations_yaml(ct, k, rate))
    env = {
        "KAFKA_BOOTSTRAP": bootstrap,
        "TOPIC_PREFIX": topics.prefix,
        "PIPELINE_CONFIG": str(config),
        "LOG_LEVEL": "WARNING",
        **SECRETS,
    }
    stack = Stack(work, env)
    ct_args = ["--key-id", SECRETS["B_CT_ID"], "--key-secret", SECRETS["B_CT_SECRET"], "--rate-limit", str(rate)]
    if args.bulk_counts_per_request:
        ct_args.append("--bulk-counts-per-request")
    try:
        stack.add_simulator("sim-cloudtalk", "cloudtalk", ports["ct"], [*ct_args, "--log-level", "WARNING"])
        stack.add_simulator(
            "sim-kustomer",
            "kustomer",
            ports["k"],
            [
                "--api-key",
                SECRETS["B_K_KEY"],
                "--org-name",
                "acme",
                "--rate-limit",
                str(KUSTOMER_PER_MINUTE * args.scale),
                "--log-level",
                "WARNING",
            ],
        )
        await stack.wait_ready(timeout=90)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
            agents = [
                {"id": 493933 + i, "firstname": e.split("@")[0].title(), "lastname": "Agent", "email": e}
                for i, e in enumerate(AGENT_EMAILS)
            ]
            # in parts: a simulator takes request bodies up to 1 MB
            await sim(http, "POST", f"{ct}/_sim/seed", {"agents": agents})
            for part in range(0, len(model.contacts), SEED_PART):
                await sim(http, "POST", f"{ct}/_sim/seed", {"contacts": model.contacts[part : part + SEED_PART]})
            await sim(http, "POST", f"{k}/_sim/seed", {"users": model.users, "companies": model.companies})
            for part in range(0, len(model.customers), SEED_PART):
                await sim(http, "POST", f"{k}/_sim/seed", {"customers": model.customers[part : part + SEED_PART]})
            stack.add("process-contacts-import", ["process", "contacts-import"])
            stack.add("sink-cloudtalk", ["sink", "cloudtalk"], env=VARIANTS[variant])
            await stack.wait_ready(timeout=120)
            ct_log = await fetch_log(http, ct, 0)  # nothing yet: the simulators' seeds are not logged
            t0 = time.monotonic()
            stack.add("poll-customers", ["poll", "customers"])  # no cursor yet: the initial import
            first_pass_s, last_request_at = await wait_done(http, bootstrap, topics, model, ct, ct_log, t0, args)
            k_log = await fetch_log(http, k, 0)
            ct_log += await fetch_log(http, ct, ct_log[-1]["seq"] if ct_log else 0)
            imports = await import_outcomes(bootstrap, topics)
            ct_state = await sim(http, "GET", f"{ct}/_sim/state")
        checks = import_and_export_checks(model, imports, {}, Counter(), set(), ct_state, [], set(), LINK_PREFIX, TAG)
        rows = [r for r in checks.rows if r[0].startswith(CHECKED_SECTIONS) and "calls flow" not in r[1]]
        problems = [p for p in checks.problems if p.startswith(CHECKED_SECTIONS)]
        seeded = set(model.kind)
        outcomes = Counter("merged" if v == "updated" else v for c, v in imports.items() if c in seeded)
        return Run(
            variant,
            len(model.customers),
            last_request_at - t0,
            first_pass_s,
            ct_log,
            k_log,
            outcomes,
            rows,
            problems,
        )
    finally:
        codes = stack.stop_all()
        bad = {n: c for n, c in codes.items() if c not in (0, None, -15)}
        if bad:
            print(f"  non-zero exits: {bad}; logs in {work / 'logs'}", flush=True)


async def wait_done(
    http: aiohttp.ClientSession,
    bootstrap: str,
    topics: Topics,
    model: ContactsModel,
    ct: str,
    ct_log: list[dict[str, Any]],
    t0: float,
    args: argparse.Namespace,
) -> tuple[float, float]:
    """Until every seeded customer has an outcome, nothing lags and CloudTalk is quiet; extends
    ``ct_log`` as it goes. Returns (first pass seconds, monotonic time of the last CloudTalk request)."""
    cursor = f"kustomer.customers.{INTEGRATION}".encode()
    groups = {
        f"{topics.prefix}process-contacts-import": [topics.raw_customers],
        f"{topics.prefix}sink-cloudtalk": [topics.cloudtalk_commands],
    }
    seeded = set(model.kind)
    deadline = t0 + args.timeout
    first_pass = None
    last_request_at = time.monotonic()
    last_print = 0.0
    outcome_every = max(5.0, len(seeded) / 2000)
    outcome_at = 0.0
    missing = len(seeded)
    while time.monotonic() < deadline:
        new = await fetch_log(http, ct, ct_log[-1]["seq"] if ct_log else 0)
        if new:
            ct_log += new
            last_request_at = time.monotonic()
        if first_pass is None and any(r.key == cursor for r in await read_topic(bootstrap, topics.cursors)):
            first_pass = time.monotonic() - t0
        lag = {g: sum((await group_lag(bootstrap, g, t)).values()) for g, t in groups.items()}
        if first_pass is not None and time.monotonic() - outcome_at >= outcome_every:
            outcome_at = time.monotonic()
            imports = await import_outcomes(bootstrap, topics)
            missing = sum(1 for c in seeded if imports.get(c, "no outcome") == "no outcome")
        if time.monotonic() - last_print >= 10:
            last_print = time.monotonic()
            print(
                f"    {time.monotonic() - t0:6.0f}s  first pass {'done' if first_pass else 'running'}; "
                f"CloudTalk requests {sum(1 for e in ct_log if e['path'].startswith('/api/')):,}; "
                f"customers without an outcome {missing:,}; lag "
                + ", ".join(f"{g.removeprefix(topics.prefix)}={v}" for g, v in lag.items()),
                flush=True,
            )
        if first_pass is not None and not missing and not any(lag.values()):
            if time.monotonic() - last_request_at >= args.quiet:
                return first_pass, last_request_at
        await asyncio.sleep(1.0)
    raise TimeoutError(f"the import did not finish within {args.timeout:.0f}s ({missing:,} customers pending)")


def describe(run: Run, args: argparse.Namespace) -> None:
    n = run.customers
    print(f"\n  variant {run.variant!r}: {n:,} customers imported in {run.seconds:.1f}s at {args.scale}× the pace")
    print(f"    first pass of `poll customers` (every customer published): {run.first_pass_s:.1f}s")
    parts = ", ".join(f"{what} {c:,} ({c / n:.3f})" for what, c in sorted(run.by_endpoint.items(), key=lambda x: -x[1]))
    print(f"    CloudTalk requests by endpoint (per customer): {parts}")
    if run.by_endpoint["bulk"]:
        print(f"    bulk commands {run.bulk_items:,} in {run.by_endpoint['bulk']:,} bulk requests")
    print(
        f"    CloudTalk requests {run.requests:,} = {run.per_customer(run.requests):.3f} per customer"
        f" (operations, bulk per command: {run.operations:,} = {run.per_customer(run.operations):.3f});"
        f" refused with 429: {run.refused:,}"
    )
    reached = run.outcomes["created"] + run.outcomes["merged"]
    if reached:
        print(f"    per customer that became or joined a contact ({reached:,}): {run.requests / reached:.3f}")
    budget = REAL_PER_MINUTE * args.scale
    measured_rate = run.requests / run.seconds * 60 if run.seconds else math.nan
    busiest = run.busiest_minute()
    print(
        f"    measured {measured_rate:,.0f} requests/min over the run; busiest 60 s: {busiest:,} requests "
        f"(operations) of the scaled budget {budget:,}"
        + (
            " — the budget never held the sink back, its pace was its own (the projection counts requests only)"
            if busiest < budget and not run.refused
            else ""
        )
    )
    print(
        f"    at the real {REAL_PER_MINUTE}/min: {minutes(run.requests)} (bulk as one request)"
        + (f", {minutes(run.operations)} (bulk per command)" if run.by_endpoint["bulk"] else "")
    )
    if args.customers != PROJECT_TO:
        print(
            f"    projected to {PROJECT_TO:,} customers: {minutes(run.per_customer(run.requests) * PROJECT_TO)}"
            + (
                f" (bulk per command {minutes(run.per_customer(run.operations) * PROJECT_TO)})"
                if run.by_endpoint["bulk"]
                else ""
            )
        )
    k = run.k_requests
    print(
        f"    Kustomer requests {sum(k.values()):,} ({sum(k.values()) / n:.3f} per customer): "
        + ", ".join(f"{what} {c:,}" for what, c in k.most_common())
    )
    print(
        "    outcomes per customer: "
        + ", ".join(f"{what} {c:,}" for what, c in sorted(run.outcomes.items()))
        + f"; contact adds {run.adds:,}, edits {run.edits:,}; customers added twice {run.added_twice}"
    )
    width = max(len(r[1]) for r in run.checks) + 2
    section = None
    for sec, label, got, verdict in run.checks:
        if sec != section:
            print(f"    {sec}")
            section = sec
        print(f"      {label:{width}}{got:>7}  {verdict}")


def summary_rows(runs: dict[str, Run], args: argparse.Namespace, model: ContactsModel) -> list[Row]:
    base = runs.get(BASELINE)
    shown = next((r for name, r in reversed(runs.items()) if name != BASELINE), base)
    assert shown is not None
    n = shown.customers
    label = f" [{shown.variant}]" if len(runs) > 1 or shown.variant != BASELINE else ""
    only_base = shown is base

    def row(measure: str, value: float, text: str, base_text: str | None, base_value: float | None, **kw: Any) -> Row:
        if only_base or base is None or base_value is None:
            baseline, r = ("same run (only the baseline ran)" if only_base else "—"), "—"
        else:
            baseline, r = base_text or f"{base_value:.3f}", ratio(value, base_value)
        return Row(measure + label, text, baseline, r, kw.get("aim", "—"), kw.get("met"))

    per = shown.per_customer(shown.requests)
    per_ops = shown.per_customer(shown.operations)
    b_per = base.per_customer(base.requests) if base else None
    b_ops = base.per_customer(base.operations) if base else None
    rows = [
        row(
            f"CloudTalk requests per customer, initial import of {n:,} (bulk = 1 request)",
            per,
            f"{per:.3f} ({shown.requests:,})",
            f"{b_per:.3f} ({base.requests:,})" if base and b_per is not None else None,
            b_per,
            aim="<= 0.25",
            met=per <= 0.25,
        ),
        row(
            "CloudTalk operations per customer (bulk = 1 per command)",
            per_ops,
            f"{per_ops:.3f} ({shown.operations:,})",
            f"{b_ops:.3f}" if b_ops is not None else None,
            b_ops,
        ),
        row(
            f"projected wall time of {n:,} customers at {REAL_PER_MINUTE} requests/min (bulk = 1 request)",
            shown.requests,
            minutes(shown.requests),
            minutes(base.requests) if base else None,
            base.requests if base else None,
        ),
    ]
    if shown.by_endpoint["bulk"] or (base and base.by_endpoint["bulk"]):
        rows.append(
            row(
                f"projected wall time of {n:,} customers at {REAL_PER_MINUTE}/min (bulk = 1 per command)",
                shown.operations,
                minutes(shown.operations),
                minutes(base.operations) if base else None,
                base.operations if base else None,
            )
        )
    if args.customers != PROJECT_TO:
        rows.append(
            row(
                f"projected wall time of {PROJECT_TO:,} customers at {REAL_PER_MINUTE}/min (from this run's rate)",
                per * PROJECT_TO,
                minutes(per * PROJECT_TO)
                + (f"; per command {minutes(per_ops * PROJECT_TO)}" if per_ops != per else ""),
                minutes(b_per * PROJECT_TO) if b_per is not None else None,
                b_per * PROJECT_TO if b_per is not None else None,
            )
        )
    k = sum(shown.k_requests.values())
    b_k = sum(base.k_requests.values()) if base else None
    rows.append(
        row(
            "Kustomer requests of the run (per customer)",
            k,
            f"{k:,} ({k / n:.3f})",
            f"{b_k:,} ({b_k / n:.3f})" if b_k is not None else None,
            b_k,
        )
    )
    expected = model.import_expect

    def outcomes_ok(run: Run) -> bool:
        return all(run.outcomes[w] == expected[w] for w in expected) and set(run.outcomes) <= set(expected)

    def no_duplicates(run: Run) -> bool:
        return run.added_twice == 0 and run.adds == expected["created"]

    def against(what: str, ok: Any) -> str:  # the model, and the baseline's verdict
        return what if only_base or base is None else f"{what}; {BASELINE}: {'ok' if ok(base) else 'MISMATCH'}"

    got = ", ".join(f"{what} {shown.outcomes[what]:,}" for what in sorted(expected))
    rows.append(
        Row(
            "import outcomes per customer = the demo's model (created, merged, skipped per rule)" + label,
            got if outcomes_ok(shown) else got + " vs " + ", ".join(f"{w} {c:,}" for w, c in sorted(expected.items())),
            against("the model", outcomes_ok),
            "—",
            "all equal",
            outcomes_ok(shown),
        )
    )
    rows.append(
        Row(
            "model checks of CloudTalk's final state (linked, split, missing, fields, tags)" + label,
            f"{len(shown.checks) - len(shown.problems)} of {len(shown.checks)} as expected",
            against("the model", lambda r: not r.problems),
            "—",
            "all",
            not shown.problems,
        )
    )
    rows.append(
        Row(
            "duplicated contacts: customers added more than once / adds beyond the model's creates" + label,
            f"{shown.added_twice} / {max(0, shown.adds - expected['created'])}",
            against("0", no_duplicates),
            "—",
            "0",
            no_duplicates(shown),
        )
    )
    return rows


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--customers", type=int, default=1000, help="Kustomer customers to import (default 1000)")
    ap.add_argument("--contacts", type=int, default=None, help="CloudTalk contacts seeded (default 30%% of customers)")
    ap.add_argument("--scale", type=int, default=100, help="CloudTalk budget = 60 × scale per minute (default 100)")
    ap.add_argument(
        "--variant",
        action="append",
        choices=list(VARIANTS),
        help=f"pipeline path(s) to run, repeatable (default: {', '.join(DEFAULT_VARIANTS)})",
    )
    ap.add_argument("--seed", type=int, default=20261124, help="random seed of the data")
    ap.add_argument(
        "--bulk-counts-per-request",
        action="store_true",
        help="the simulator charges a bulk request once (default: once per command, the cautious reading)",
    )
    ap.add_argument("--quiet", type=float, default=5.0, help="seconds without a CloudTalk request that end a run")
    ap.add_argument("--timeout", type=float, default=None, help="seconds a variant may take (default from N/scale)")
    args = ap.parse_args()
    variants = list(dict.fromkeys(args.variant or DEFAULT_VARIANTS))
    if args.timeout is None:  # room for 10 requests per customer at the scaled budget, at least 10 minutes
        args.timeout = max(600.0, args.customers * 10 / (REAL_PER_MINUTE * args.scale) * 60 * 1.5)
    contacts = args.contacts if args.contacts is not None else max(10, round(args.customers * 0.3))
    model = ContactsModel.build(Random(args.seed), args.customers, contacts)
    kinds = Counter(model.kind.values())
    print(
        f"initial import of {len(model.customers):,} Kustomer customers into CloudTalk holding {len(model.contacts):,} "
        f"contacts; CloudTalk budget {REAL_PER_MINUTE * args.scale:,}/min ({args.scale}× the real {REAL_PER_MINUTE})",
        flush=True,
    )
    print("  customers: " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in sorted(kinds.items())))
    print("  the model expects: " + ", ".join(f"{k} {v:,}" for k, v in sorted(model.import_expect.items())))
    runs: dict[str, Run] = {}
    async with kafka() as (bootstrap, _pid):
        for variant in variants:
            print(f"\n  variant {variant!r}: sink env {VARIANTS[variant] or '(none)'}", flush=True)
            runs[variant] = await run_variant(bootstrap, args, model, variant)
            describe(runs[variant], args)
    if BASELINE in runs and len(runs) > 1:
        base = runs[BASELINE]
        for name, run in runs.items():
            if name != BASELINE:
                print(
                    f"\n  ratio {name}/{BASELINE}: CloudTalk requests {ratio(run.requests, base.requests)}, "
                    f"operations {ratio(run.operations, base.operations)}, "
                    f"Kustomer requests {ratio(sum(run.k_requests.values()), sum(base.k_requests.values()))}"
                )
    print_summary(
        f"initial import of {args.customers:,} customers at {args.scale}× CloudTalk's pace",
        summary_rows(runs, args, model),
    )


if __name__ == "__main__":
    asyncio.run(main())
