"""Contact import and export rules (reference 1.4 rules 1–5, 1.5, 1.6) with the reference's examples."""

from __future__ import annotations

import copy

import pytest

from pipeline.core.decisions import Command, Dropped, Reject
from pipeline.core.envelope import Envelope, contact_event_id, customer_event_id
from pipeline.core.schemas import validate
from pipeline.process import contacts_export, contacts_import
from tests.unit.test_call_sms_rules import config, integration

# reference 4.4 (GET /v1/customers/65f1c0a2e4b0a1b2c3d4e5f6), as carried by a webhook event
CUSTOMER = {
    "type": "customer",
    "id": "65f1c0a2e4b0a1b2c3d4e5f6",
    "attributes": {
        "name": "Jana Nováková",
        "displayName": "Jana Nováková",
        "companyName": "Acme s.r.o.",
        "externalId": "1451646073",
        "emails": [{"type": "work", "email": "jana@example.org"}],
        "sharedEmails": [{"type": "work", "email": "info@acme.example.sk"}],
        "phones": [{"type": "mobile", "phone": "+421905123456"}, {"type": "work", "phone": "+447700900123"}],
        "sharedPhones": [{"type": "work", "phone": "+421232123456"}],
        "whatsapps": [{"type": "mobile", "phone": "whatsapp:+421905123456"}],
        "sharedWhatsapps": [],
        "urls": [{"type": "website", "url": "https://acme.example.sk"}],
        "locations": [
            {"type": "home", "address": "Obchodná 5, 81106 Bratislava"},
            {
                "type": "work",
                "name": "Office",
                "address1": "Hlavná 12",
                "address2": "3rd floor",
                "cityName": "Bratislava",
                "regionName": "Bratislavský kraj",
                "zipCode": "81101",
                "countryName": "Slovakia",
                "countryCode": "SK",
            },
        ],
        "rev": 7,
        "createdAt": "2026-02-11T08:29:58.512Z",
        "updatedAt": "2026-03-01T17:02:44.100Z",
    },
    "relationships": {
        "company": {"data": {"type": "company", "id": "65f1bf00e4b0a1b2c3d4e111"}},
        "createdBy": {"data": {"type": "user", "id": "60aa11bb22cc33dd44ee55ff"}},
        "modifiedBy": {"data": {"type": "user", "id": "60aa11bb22cc33dd44ee55ff"}},
    },
}


def customer_env(mutate=None, integration_name="support") -> Envelope:
    data = copy.deepcopy(CUSTOMER)
    if mutate:
        mutate(data["attributes"])
    attrs = data["attributes"]
    event = {
        "id": "65f1d0c4e4b0a1b2c3d4e9aa",
        "name": "kustomer.customer.update",
        "createdAt": attrs["updatedAt"],
        "data": data,
    }
    validate("kustomer.customer.event", event)
    return Envelope(
        id=customer_event_id(data["id"], attrs.get("rev"), attrs["updatedAt"]),
        integration=integration_name,
        source="kustomer",
        type="customer.updated",
        occurred_at=attrs["updatedAt"],
        received_at=attrs["updatedAt"],
        payload=event,
    )


def one(decisions):
    assert len(decisions) == 1
    return decisions[0]


# -- import ------------------------------------------------------------------------------------


def test_reference_customer_imports_the_documented_fields():
    cmd = one(contacts_import.process_customer(customer_env(), config()))
    assert isinstance(cmd, Command)
    validate("command.cloudtalk.upsert_contact", cmd.body)
    c = cmd.body["contact"]
    # reference 4.4: phones +421905123456, +447700900123 and jana@example.org are imported;
    # the shared phone, the shared e-mail and the WhatsApp number are dropped
    assert c["phones"] == ["+421905123456"], "+447700900123 is possible but not a valid number"
    assert c["emails"] == ["jana@example.org"]
    assert c["name"] == "Jana Nováková" and c["company"] == "Acme s.r.o." and c["company_ref"] is None
    assert c["website"] == "https://acme.example.sk"
    assert c["address"] == "Hlavná 12 3rd floor" and c["city"] == "Bratislava" and c["zip"] == "81101"
    assert c["state"] == "Bratislavský kraj" and c["country"] == {"code": "SK", "name": "Slovakia"}
    assert c["created_by_ref"] == "60aa11bb22cc33dd44ee55ff"
    assert c["external_url"] == {
        "name": "Kustomer",
        "url": "https://acme.kustomerapp.com/app/customers/65f1c0a2e4b0a1b2c3d4e5f6",
    }
    assert c["tag"] == "kustomer-support"
    assert cmd.key == "support", "one lane per integration"
    assert cmd.body["version"] == {"rev": 7, "updated_at": "2026-03-01T17:02:44.100Z"}
    assert cmd.body["modified_by"] == "60aa11bb22cc33dd44ee55ff"
    assert cmd.body["merge_key"] == "phone_or_name"


def test_customer_without_phone_is_skipped_and_only_phones_count():
    def only_shared(a):
        a["phones"] = []

    d = one(contacts_import.process_customer(customer_env(only_shared), config()))
    assert d == Dropped("support", "no_phone", "the customer has no phone in phones")


def test_customer_whose_phones_are_all_invalid_is_skipped():
    def invalid(a):
        a["phones"] = [{"type": "mobile", "phone": "+44123"}, {"type": "work", "phone": "+447700900123"}]

    d = one(contacts_import.process_customer(customer_env(invalid), config()))
    assert d.rule == "no_valid_phone"


def test_strict_reading_skips_customers_with_shared_or_whatsapp_values():
    strict = config(integration(contacts={"skip_customer_if_shared_or_whatsapp": True}))
    assert one(contacts_import.process_customer(customer_env(), strict)).rule == "shared_or_whatsapp"

    def clean(a):
        a["sharedPhones"], a["sharedEmails"], a["whatsapps"] = [], [], []

    assert isinstance(one(contacts_import.process_customer(customer_env(clean), strict)), Command)


def test_company_from_the_relationship_when_no_denormalised_name():
    def no_company_name(a):
        a.pop("companyName")

    c = one(contacts_import.process_customer(customer_env(no_company_name), config())).body["contact"]
    assert c["company"] is None and c["company_ref"] == "65f1bf00e4b0a1b2c3d4e111"


def test_address_falls_back_to_single_line_and_limits_are_kept():
    def single_line(a):
        a["locations"] = [{"type": "work", "address": "Main St 1, Springfield", "zipCode": "1234567890123456789"}]
        a["name"] = "N" * 200
        a["urls"] = [{"type": "blog", "url": "https://example.org/" + "x" * 120}]

    c = one(contacts_import.process_customer(customer_env(single_line), config())).body["contact"]
    assert c["address"] == "Main St 1, Springfield" and c["country"] is None
    assert len(c["name"]) == 150 and len(c["zip"]) == 15
    assert c["website"] is None, "a URL longer than CloudTalk's 100 characters is not cut into a broken link"


def test_name_falls_back_to_display_name_then_phone():
    def no_name(a):
        a["name"] = None

    assert (
        one(contacts_import.process_customer(customer_env(no_name), config())).body["contact"]["name"]
        == "Jana Nováková"
    )

    def nothing(a):
        a["name"] = a["displayName"] = None

    assert (
        one(contacts_import.process_customer(customer_env(nothing), config())).body["contact"]["name"]
        == "+421905123456"
    )


def test_import_respects_active_and_the_import_switch_and_unknown_integrations():
    assert (
        one(contacts_import.process_customer(customer_env(), config(integration(active=False)))).rule
        == "integration_inactive"
    )
    off = config(integration(contacts={"import": False}))
    assert one(contacts_import.process_customer(customer_env(), off)).rule == "import_disabled"
    with pytest.raises(Reject):
        contacts_import.process_customer(customer_env(integration_name="nobody"), config())


# -- export ------------------------------------------------------------------------------------


def contact_env(**over) -> Envelope:
    payload = {
        "event": "contact.created",
        "contact_id": 1451700001,
        "name": "Peter Horváth",
        "contact_numbers": [421911222333],
        "contact_emails": ["peter.horvath@example.net"],
        "tags": [],
        "external_urls": [],
        "created_at": "2026-03-01T10:00:00.000Z",
        "modified_at": "2026-03-01T10:00:00.000Z",
    }
    payload.update(over)
    validate("cloudtalk.contact", payload)
    return Envelope(
        id=contact_event_id(
            payload["contact_id"], payload["modified_at"], deleted=payload["event"] == "contact.deleted"
        ),
        integration="support",
        source="cloudtalk",
        type=payload["event"],
        occurred_at=payload["modified_at"],
        received_at=payload["modified_at"],
        payload=payload,
    )


def test_reference_export_create_body():
    cmd = one(contacts_export.process_contact(contact_env(), config()))
    validate("command.kustomer.upsert_customer", cmd.body)
    # reference 4.4 "Export-direction create"
    assert cmd.body["customer"] == {
        "name": "Peter Horváth",
        "externalId": "1451700001",
        "phones": [{"type": "work", "phone": "+421911222333"}],
        "emails": [{"type": "work", "email": "peter.horvath@example.net"}],
    }
    assert cmd.body["version"] == "2026-03-01T10:00:00.000Z"


@pytest.mark.parametrize(
    ("over", "rule"),
    [
        ({"contact_numbers": [421911222333, 44123]}, "invalid_phone"),
        ({"contact_numbers": [447700900123]}, "invalid_phone"),
        ({"contact_numbers": [421911222333, "+421 911 222 333"]}, "duplicate_phone"),
        ({"event": "contact.deleted"}, "contact_deleted"),
        (
            {
                "external_urls": [
                    {"name": "Kustomer", "url": "https://acme.kustomerapp.com/app/customers/65f1c0a2e4b0a1b2c3d4e5f6"}
                ]
            },
            "imported_from_kustomer",
        ),
    ],
)
def test_export_skips_invalid_duplicate_deleted_and_imported_contacts(over, rule):
    assert one(contacts_export.process_contact(contact_env(**over), config())).rule == rule


def test_export_is_evaluated_for_every_integration():
    cfg = config(
        integration("support"), integration("sales", contacts={"export": False}), integration("ops", active=False)
    )
    ds = contacts_export.process_contact(contact_env(), cfg)
    assert [getattr(d, "rule", "command") for d in ds] == ["command", "export_disabled", "integration_inactive"]
    # a contact imported for "support" links to support's org only; "billing" may still export it
    linked = contact_env(
        external_urls=[
            {"name": "Kustomer", "url": "https://acme.kustomerapp.com/app/customers/65f1c0a2e4b0a1b2c3d4e5f6"}
        ]
    )
    other = config(
        integration("support"),
        integration(
            "billing", kustomer={"base_url": "http://127.0.0.1:1", "org_name": "billing", "api_key": {"env": "X"}}
        ),
    )
    ds = contacts_export.process_contact(linked, other)
    assert ds[0].rule == "imported_from_kustomer" and isinstance(ds[1], Command)
