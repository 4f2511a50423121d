"""What the contacts export costs in Kustomer requests: 40 CloudTalk contacts with 1–3 phones and
0–2 e-mails each become 40 customers, counted in the Kustomer simulator's request log by endpoint:
a lookup by ``externalId``, a lookup per phone and e-mail (rule 4: a value that already belongs to
a customer), the create — 2 + (values per contact) requests. Prints its counts:

    .venv/bin/pytest -n 0 -s tests/e2e/test_export_cost_e2e.py
"""

from __future__ import annotations

import asyncio
import random
import re
from collections import Counter

import pytest

from pipeline.kafka.lag import group_lag
from tests.e2e.conftest import Flow, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]
SERVICES = ("ingest", "process-contacts-export", "sink-kustomer")
CONTACTS = 40


def mix(n: int = CONTACTS, seed: int = 17) -> list[dict[str, object]]:
    """``n`` contacts: 1–3 valid Slovak mobile numbers and 0–2 e-mails each, all distinct."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        phones = [f"+4219113{i:02d}{j:03d}" for j in range(rnd.randint(1, 3))]
        emails = [f"person.{i:02d}.{j}@example.net" for j in range(rnd.randint(0, 2))]
        out.append(
            {
                "name": f"Export Cost {i:02d}",
                "ContactNumber": [{"public_number": p} for p in phones],
                "ContactEmail": [{"email": e} for e in emails],
            }
        )
    return out


def endpoint(method: str, path: str) -> str:
    """``GET /v1/customers/phone=+421…`` → ``GET /v1/customers/phone=…``; ids become ``{id}``."""
    path = re.sub(r"^(/v1/customers/(?:phone|email|externalId)=).*$", r"\1…", path)
    path = re.sub(r"/[0-9a-f]{24}(?=/|$)", "/{id}", path)
    return f"{method} {path}"


def requests_by_endpoint(flow: Flow) -> Counter[str]:
    return Counter(endpoint(e.method, e.path) for e in flow.ksim.log.entries if e.path.startswith("/v1/"))


async def export_and_count(flow: Flow, label: str) -> tuple[float, Counter[str]]:
    contacts = mix()
    ids = [await flow.person_creates_contact(c) for c in contacts]
    await wait_for(lambda: len(flow.ksim.customers) >= CONTACTS, 120, f"{CONTACTS} customers")

    async def quiet() -> bool:
        for group, topic in (
            ("process-contacts-export", flow.topics.raw_contacts),
            ("sink-kustomer", flow.topics.kustomer_commands),
        ):
            if sum((await group_lag(flow.bootstrap, f"{flow.topics.prefix}{group}", [topic])).values()):
                return False
        return True

    await asyncio.sleep(1.0)
    await wait_for(quiet, 90, "the export to be idle")
    # every contact became exactly one customer, with its phones and e-mails
    by_external = Counter(c["attributes"].get("externalId") for c in flow.ksim.customers.values())
    assert by_external == dict.fromkeys(ids, 1), by_external
    for cid, contact in zip(ids, contacts, strict=True):
        customer = next(c for c in flow.ksim.customers.values() if c["attributes"].get("externalId") == cid)
        attributes = flow.ksim.customer_resource(customer)["attributes"]
        assert [p["phone"] for p in attributes["phones"]] == [n["public_number"] for n in contact["ContactNumber"]]
        assert [e["email"] for e in attributes["emails"]] == [e["email"] for e in contact["ContactEmail"]]
    writes = Counter(e.split()[0] for e in flow.k_writes())
    assert writes == {"customer.create": CONTACTS}, writes
    counts = requests_by_endpoint(flow)
    per_contact = sum(counts.values()) / CONTACTS
    values = sum(len(c["ContactNumber"]) + len(c["ContactEmail"]) for c in contacts)
    print(f"\n{label}: {per_contact:.2f} Kustomer requests per exported contact ({values} phones and e-mails)")
    for name, n in counts.most_common():
        print(f"  {name:40} {n:4}  {n / CONTACTS:.2f}/contact")
    return per_contact, counts


@pytest.mark.services(*SERVICES)
async def test_export_cost_with_a_lookup_per_phone_and_email(flow: Flow):
    """The externalId lookup, a lookup per phone and e-mail, the create: nothing else."""
    per_contact, counts = await export_and_count(flow, "a lookup per value")
    values = sum(len(c["ContactNumber"]) + len(c["ContactEmail"]) for c in mix())
    assert counts["POST /v1/customers/search"] == 0
    assert per_contact == pytest.approx(2 + values / CONTACTS)
