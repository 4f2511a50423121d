"""CloudTalk contact → Kustomer customer ("export").

Every CloudTalk contact event is evaluated for every integration of the account, in this order:

1. the integration is Active and exports contacts;
2. deletions are not exported ([ASSUMPTION]: the reference names no delete sync);
3. a contact that carries this integration's Kustomer customer link was imported from Kustomer
   (the pipeline wrote it) and is not exported back (``imported_from_kustomer``);
4. every phone must be a valid number (``invalid_phone``) and unique within the contact
   (``duplicate_phone``) — rule 5; the contact is skipped, never partly exported.

Otherwise a ``kustomer.upsert_customer`` command: name, ``externalId`` = contact id, phones and
e-mails as ``work`` entries. The sink applies rule 4 — skip when a phone or
e-mail already belongs to a Kustomer customer — and sends later edits to the customer found by
that externalId.
"""

from __future__ import annotations

from pipeline.core import limits
from pipeline.core.config import Integration, PipelineConfig
from pipeline.core.decisions import RULE_INACTIVE, Command, Decision, Dropped
from pipeline.core.envelope import Envelope, command_id
from pipeline.core.phones import is_valid_e164, normalize_e164

RULE_EXPORT_DISABLED = "export_disabled"
RULE_DELETED = "contact_deleted"
RULE_IMPORTED = "imported_from_kustomer"
RULE_INVALID_PHONE = "invalid_phone"
RULE_DUPLICATE_PHONE = "duplicate_phone"


def customer_link_prefix(integration: Integration) -> str:
    return integration.kustomer.customer_link("")


def decide(env: Envelope, integration: Integration) -> Decision:
    payload = env.payload
    if not integration.active:
        return Dropped(integration.name, RULE_INACTIVE)
    if not integration.contacts.export_enabled:
        return Dropped(integration.name, RULE_EXPORT_DISABLED)
    if payload["event"] == "contact.deleted":
        return Dropped(integration.name, RULE_DELETED, "deletions are not exported")
    prefix = customer_link_prefix(integration)
    if any(
        isinstance(u, dict) and str(u.get("url") or "").startswith(prefix) for u in payload.get("external_urls") or []
    ):
        return Dropped(integration.name, RULE_IMPORTED, "the contact links to this integration's Kustomer customer")
    phones: list[str] = []
    for raw in payload.get("contact_numbers") or []:
        e164 = normalize_e164(raw)
        if e164 is None or not is_valid_e164(e164):
            return Dropped(integration.name, RULE_INVALID_PHONE, f"{raw!r} is not a valid E.164 number")
        if e164 in phones:
            return Dropped(integration.name, RULE_DUPLICATE_PHONE, f"{e164} appears twice")
        phones.append(e164)
    emails: list[str] = []
    for e in payload.get("contact_emails") or []:
        e = (e or "").strip()
        if e and e.lower() not in {x.lower() for x in emails}:
            emails.append(e)
    contact_id = str(payload["contact_id"])
    cid = command_id(integration.name, env.id)
    return Command(
        integration.name,
        cid,
        integration.name,
        {
            "command_id": cid,
            "type": "kustomer.upsert_customer",
            "integration": integration.name,
            "event_id": env.id,
            "occurred_at": env.occurred_at,
            "contact_id": contact_id,
            "version": payload["modified_at"],
            "customer": {
                "name": limits.clip((payload.get("name") or "").strip() or None, limits.KUSTOMER_CUSTOMER_NAME),
                "externalId": contact_id,
                "phones": [{"type": "work", "phone": p} for p in phones],
                "emails": [{"type": "work", "email": e} for e in emails],
            },
        },
    )


def process_contact(env: Envelope, config: PipelineConfig) -> list[Decision]:
    return [decide(env, integration) for integration in config.integrations]
