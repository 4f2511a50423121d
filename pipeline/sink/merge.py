"""The pure rules of the contacts import: the lookup index keys, version order, how several
Kustomer customers merge into one CloudTalk contact, the add/edit body, and matching by merge key.
No I/O: the CloudTalk effects (:mod:`pipeline.sink.cloudtalk`) call these with what they fetched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.core.phones import normalize_e164

SCALARS = ("name", "company", "website", "address", "city", "zip", "state", "country_id", "favorite_agent")


def ikey(integration: str, kind: str, value: str) -> str:
    return f"ct|{integration}|{kind}|{value}"


def name_key(name: str) -> str:
    return " ".join(name.split()).casefold()


def is_newer(version: Mapping[str, Any], known: Mapping[str, Any]) -> bool:
    if version.get("rev") is not None and known.get("rev") is not None:
        return int(version["rev"]) > int(known["rev"])
    return str(version.get("updated_at") or "") > str(known.get("updated_at") or "")


def _order(sources: Mapping[str, Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Sources newest first."""
    return sorted(sources.values(), key=lambda s: (str(s.get("updated_at") or ""), s.get("rev") or 0), reverse=True)


def merge_sources(sources: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Union of phones and e-mails; the newest non-empty value of every other field (pure)."""
    ordered = _order(sources)
    merged: dict[str, Any] = {}
    for field in SCALARS:
        merged[field] = next(
            (s["fields"].get(field) for s in ordered if s["fields"].get(field) not in (None, "")), None
        )
    phones: list[str] = []
    emails: list[str] = []
    links: list[dict[str, str]] = []
    for s in ordered:
        for p in s["fields"].get("phones") or []:
            if p not in phones:
                phones.append(p)
        for e in s["fields"].get("emails") or []:
            if e.lower() not in {x.lower() for x in emails}:
                emails.append(e)
        link = s["fields"].get("link")
        if link and link["url"] not in {x["url"] for x in links}:
            links.append(link)
    merged.update(phones=phones, emails=emails, links=links)
    return merged


def contact_body(merged: Mapping[str, Any], current: Mapping[str, Any] | None, tag: str | None) -> dict[str, Any]:
    """The full add body, or — with ``current`` (a show ``responseData``) — the edit with only
    the keys that differ. Lists keep everything the contact already has (pure)."""
    cur = (current or {}).get("Contact") or {}
    cur_numbers = [n for n in (normalize_e164(x) for x in cur.get("contact_numbers") or []) if n]
    phones = list(dict.fromkeys(cur_numbers + list(merged["phones"])))
    cur_emails = list(cur.get("contact_emails") or [])
    emails = cur_emails + [e for e in merged["emails"] if e.lower() not in {x.lower() for x in cur_emails}]
    ours = {link["url"] for link in merged["links"]}
    cur_links = [{"name": x.get("name", ""), "url": x.get("url", "")} for x in (current or {}).get("ExternalUrl") or []]
    foreign = [x for x in cur_links if x["url"] not in ours]
    links = (foreign + [{"name": x["name"][:30], "url": x["url"]} for x in merged["links"]])[:3]
    cur_tags = [t.get("name") for t in cur.get("tags") or [] if t.get("name")]
    tags = cur_tags + ([tag] if tag and tag not in cur_tags else [])

    body: dict[str, Any] = {}
    for field in SCALARS:
        value = merged.get(field)
        if value in (None, ""):
            continue  # never clear what the contact has
        if current is None or str(cur.get(field) or "") != str(value):
            body[field] = value
    if current is None or set(phones) != set(cur_numbers):
        body["ContactNumber"] = [{"public_number": p} for p in phones]
    if current is None or {e.lower() for e in emails} != {e.lower() for e in cur_emails}:
        if emails:
            body["ContactEmail"] = [{"email": e} for e in emails]
    if current is None or [(x["name"], x["url"]) for x in links] != [(x["name"], x["url"]) for x in cur_links]:
        if links:
            body["ExternalUrl"] = links
    if current is None or set(tags) != set(cur_tags):
        if tags:
            body["ContactsTag"] = [{"name": t} for t in tags]
    return body


def match_in_index(
    index: Mapping[str, Any], integration: str, merge_key: str, contact: Mapping[str, Any]
) -> str | None:
    phones = [index.get(ikey(integration, "phone", p)) for p in contact["phones"]]
    emails = [index.get(ikey(integration, "email", e.lower())) for e in contact["emails"]]
    if merge_key in ("phone", "phone_or_name"):
        hit = next((c for c in phones if c), None)
        if hit:
            return hit
    if merge_key == "email":
        return next((c for c in emails if c), None)
    if merge_key == "phone_and_email":
        common = {c for c in phones if c} & {c for c in emails if c}
        return min(common, key=int) if common else None
    if merge_key == "phone_or_name" and contact.get("name"):
        return index.get(ikey(integration, "name", name_key(contact["name"])))
    return None
