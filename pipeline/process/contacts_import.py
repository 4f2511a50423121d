"""Kustomer customer → CloudTalk contact ("import").

A Kustomer event belongs to the integration whose Kustomer org sent it. In this order:

1. the integration is Active and imports contacts;
2. the customer has a phone in ``phones`` (shared phones and WhatsApp numbers never count) that
   is a valid number — else ``no_phone`` / ``no_valid_phone``;
3. with ``skip_customer_if_shared_or_whatsapp`` (the strict reading of rule 2) a customer with
   any shared e-mail, shared phone or WhatsApp number is skipped (``shared_or_whatsapp``).

Otherwise a ``cloudtalk.upsert_contact`` command with the mapped fields: name,
phones (``phones`` only, E.164), e-mails (``emails`` only), company, first website URL, first
work address (line 1 + line 2, city, zip, state, country), the "Created by" user (the sink turns
it into a favorite agent by e-mail), the customer link, the integration's contact tag. Values of
``sharedEmails``, ``sharedPhones``, ``whatsapps`` and ``sharedWhatsapps`` are never copied.
Text over a CloudTalk field's limit is cut and ends in ``…``; a website or an e-mail address over
its limit is left out instead (a cut one would be broken).
All commands of one integration share one lane (CloudTalk allows 60 requests a minute per
company), which makes merging by phone or name safe.

Each command says whose work it is (``priority``): ``bulk`` for a customer an initial import, a
reconciliation pass, a backfill or a replay published (the envelope's ``via``), ``live`` for a
webhook (a person's edit, a customer the calls or SMS flow created for an unknown number). The
CloudTalk sink leaves ``CLOUDTALK_LIVE_RESERVE`` requests of each window to live commands, and
a live command passes the bulk commands parked for it in its lane (:mod:`pipeline.sink.base`).
"""

from __future__ import annotations

from typing import Any

from pipeline.core import limits
from pipeline.core.config import Integration, PipelineConfig
from pipeline.core.decisions import RULE_INACTIVE, Command, Decision, Dropped, Reject
from pipeline.core.envelope import Envelope, command_id
from pipeline.core.phones import is_valid_e164, normalize_e164

RULE_IMPORT_DISABLED = "import_disabled"
RULE_NO_PHONE = "no_phone"
RULE_NO_VALID_PHONE = "no_valid_phone"
RULE_SHARED_OR_WHATSAPP = "shared_or_whatsapp"
LIVE_VIAS = frozenset({"webhook"})  # the rest (import, poller, backfill, replay) is bulk work


def priority_of(env: Envelope) -> str:
    """``live`` for what a webhook brought, ``bulk`` for what a poller, a backfill or a replay did."""
    return "live" if env.via in LIVE_VIAS else "bulk"


LIMITS = limits.CLOUDTALK_CONTACT_FIELDS


def _clip(value: Any, field: str) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    limit = LIMITS[field]
    if limits.fits(text, limit):
        return text
    return None if field == "website" else limits.clip(text, limit)  # a cut URL is a broken link


def _rel_id(data: dict[str, Any], name: str) -> str | None:
    rel = (data.get("relationships") or {}).get(name) or {}
    inner = rel.get("data") if isinstance(rel, dict) else None
    return inner.get("id") if isinstance(inner, dict) else None


def work_location(attrs: dict[str, Any]) -> dict[str, Any] | None:
    for loc in attrs.get("locations") or []:
        if isinstance(loc, dict) and (loc.get("type") or "").lower() == "work":
            return loc
    return None


def address_fields(loc: dict[str, Any] | None) -> dict[str, Any]:
    """First work location → address (line 1 + line 2), city, zip, state, country."""
    if not loc:
        return {"address": None, "city": None, "zip": None, "state": None, "country": None}
    lines = [loc.get("address1"), loc.get("address2")]
    address = " ".join(str(x).strip() for x in lines if x and str(x).strip()) or loc.get("address")
    country = None
    if loc.get("countryCode") or loc.get("countryName"):
        country = {"code": loc.get("countryCode"), "name": loc.get("countryName")}
    return {
        "address": _clip(address, "address"),
        "city": _clip(loc.get("cityName") or loc.get("city"), "city"),
        "zip": _clip(loc.get("zipCode") or loc.get("zip"), "zip"),
        "state": _clip(loc.get("regionName") or loc.get("state"), "state"),
        "country": country,
    }


def first_website(attrs: dict[str, Any]) -> str | None:
    urls = [u for u in attrs.get("urls") or [] if isinstance(u, dict) and u.get("url")]
    chosen = next((u for u in urls if (u.get("type") or "").lower() == "website"), urls[0] if urls else None)
    return _clip(chosen["url"], "website") if chosen else None


def contact_phones(attrs: dict[str, Any]) -> tuple[list[str], int]:
    """Valid E.164 numbers of ``phones`` (order kept, no repeats) and how many were present."""
    present = [p.get("phone") for p in attrs.get("phones") or [] if isinstance(p, dict) and p.get("phone")]
    out: list[str] = []
    for raw in present:
        e164 = normalize_e164(raw)
        if e164 and is_valid_e164(e164) and e164 not in out:
            out.append(e164)
    return out, len(present)


def contact_emails(attrs: dict[str, Any]) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for e in attrs.get("emails") or []:
        value = (e.get("email") or "").strip() if isinstance(e, dict) else ""
        if value and "@" in value and limits.fits(value, limits.CLOUDTALK_EMAIL) and value.lower() not in seen:
            seen.add(value.lower())
            out.append(value)
    return out


def has_shared_or_whatsapp(attrs: dict[str, Any]) -> bool:
    return any(attrs.get(k) for k in ("sharedPhones", "sharedEmails", "whatsapps", "sharedWhatsapps"))


def decide(env: Envelope, integration: Integration) -> Decision:
    if not integration.active:
        return Dropped(integration.name, RULE_INACTIVE)
    settings = integration.contacts
    if not settings.import_enabled:
        return Dropped(integration.name, RULE_IMPORT_DISABLED)
    data = env.payload["data"]
    attrs = data.get("attributes") or {}
    phones, present = contact_phones(attrs)
    if present == 0:
        return Dropped(integration.name, RULE_NO_PHONE, "the customer has no phone in phones")
    if not phones:
        return Dropped(integration.name, RULE_NO_VALID_PHONE, f"none of {present} phone(s) is a valid number")
    if settings.skip_customer_if_shared_or_whatsapp and has_shared_or_whatsapp(attrs):
        return Dropped(integration.name, RULE_SHARED_OR_WHATSAPP, "skip_customer_if_shared_or_whatsapp is on")
    customer_id = data["id"]
    name = _clip(attrs.get("name") or attrs.get("displayName"), "name") or phones[0]
    contact = {
        "name": name,
        "phones": phones,
        "emails": contact_emails(attrs),
        "company": _clip(attrs.get("companyName"), "company"),
        "company_ref": None if attrs.get("companyName") else _rel_id(data, "company"),
        "website": first_website(attrs),
        **address_fields(work_location(attrs)),
        "created_by_ref": _rel_id(data, "createdBy"),
        "external_url": {
            "name": limits.clip(settings.external_url_name, limits.CLOUDTALK_LINK_NAME),
            "url": integration.kustomer.customer_link(customer_id),
        },
        "tag": integration.contact_tag,
    }
    cid = command_id(integration.name, env.id)
    return Command(
        integration.name,
        cid,
        integration.name,
        {
            "command_id": cid,
            "type": "cloudtalk.upsert_contact",
            "integration": integration.name,
            "event_id": env.id,
            "occurred_at": env.occurred_at,
            "customer_id": customer_id,
            "modified_by": _rel_id(data, "modifiedBy"),
            "external_id": attrs.get("externalId") or None,
            "version": {"rev": attrs.get("rev"), "updated_at": attrs.get("updatedAt") or env.occurred_at},
            "merge_key": settings.merge_key,
            "contact": contact,
            "priority": priority_of(env),
        },
    )


def process_customer(env: Envelope, config: PipelineConfig) -> list[Decision]:
    """A Kustomer event concerns only the integration (Kustomer org) that sent it."""
    integration = config.get(env.integration)
    if integration is None:
        raise Reject("UnknownIntegration", f"integration: {env.integration!r} is not configured")
    return [decide(env, integration)]
