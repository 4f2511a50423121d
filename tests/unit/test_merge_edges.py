"""Edge cases of the contacts import's pure rules (pipeline.sink.merge): matching by merge key in
the ledger index, and the add/edit body. The main cases are in test_merge.py, whose ``source``
builds the fields here."""

from __future__ import annotations

import pytest

from pipeline.sink.merge import contact_body, ikey, match_in_index, merge_sources
from tests.unit.test_merge import source

INTEG = "support"


def index(**by_kind: dict[str, str]) -> dict[str, str]:
    """``index(phone={"+421…": "17"}, email={...}, name={...})`` → the ledger index keys."""
    return {ikey(INTEG, kind, value): contact for kind, values in by_kind.items() for value, contact in values.items()}


def contact(phones=(), emails=(), name="Jana Nováková"):
    return {"phones": list(phones), "emails": list(emails), "name": name}


# --------------------------------------------------------------------------------------------
# match_in_index
# --------------------------------------------------------------------------------------------

IDX = index(
    phone={"+421905000001": "17", "+421905000002": "23"},
    email={"jana@example.org": "23", "other@example.org": "9"},
    name={"jana nováková": "31"},
)


@pytest.mark.parametrize(
    ("merge_key", "wanted", "expected"),
    [
        # phone: the first number that is known wins; e-mails and the name play no part
        ("phone", contact(["+421905999999", "+421905000002", "+421905000001"]), "23"),
        ("phone", contact(["+421905999999"], ["jana@example.org"]), None),
        # e-mail: looked up lower-cased; numbers play no part
        ("email", contact(["+421905000001"], ["JANA@Example.org"]), "23"),
        ("email", contact(["+421905000001"], ["nobody@example.org"]), None),
        # phone and e-mail: a contact both point at
        ("phone_and_email", contact(["+421905000002"], ["jana@example.org"]), "23"),
        ("phone_and_email", contact(["+421905000001"], ["jana@example.org"]), None),
        ("phone_and_email", contact(["+421905000001"], []), None),
        # phone or name: a number first, else the name (whitespace and case folded)
        ("phone_or_name", contact(["+421905000001"], name="Someone Else"), "17"),
        ("phone_or_name", contact(["+421905999999"], name="  JANA   Nováková "), "31"),
        ("phone_or_name", contact(["+421905999999"], name=""), None),
        # no merging at all, or a key this rule does not know
        ("none", contact(["+421905000001"], ["jana@example.org"]), None),
        ("name", contact([], [], name="Jana Nováková"), None),
    ],
)
def test_match_in_index(merge_key, wanted, expected):
    assert match_in_index(IDX, INTEG, merge_key, wanted) == expected


def test_match_in_index_is_per_integration():
    assert match_in_index(IDX, "sales", "phone", contact(["+421905000001"])) is None


def test_phone_and_email_picks_the_oldest_common_contact_by_numeric_id():
    idx = index(
        phone={"+421905000001": "10", "+421905000002": "9"}, email={"a@example.org": "10", "b@example.org": "9"}
    )
    assert (
        match_in_index(
            idx,
            INTEG,
            "phone_and_email",
            contact(["+421905000001", "+421905000002"], ["a@example.org", "b@example.org"]),
        )
        == "9"
    )


def test_phone_or_name_without_a_name_key():
    assert match_in_index(IDX, INTEG, "phone_or_name", {"phones": [], "emails": []}) is None


# --------------------------------------------------------------------------------------------
# contact_body
# --------------------------------------------------------------------------------------------


def fields(**values):
    return source("", **values)["fields"]


def merged(**values):
    return merge_sources({"c1": {"rev": 1, "updated_at": "t1", "fields": fields(**values)}})


def shown(numbers=(), emails=(), tags=(), links=(), **fields):
    return {
        "Contact": {
            "id": "17",
            "contact_numbers": list(numbers),
            "contact_emails": list(emails),
            "tags": [{"id": str(i), "name": t} for i, t in enumerate(tags)],
            **fields,
        },
        "ExternalUrl": list(links),
    }


def link(n, name="Kustomer"):
    return {"name": name, "url": f"https://acme.kustomerapp.com/app/customers/{n}"}


def test_add_body_of_a_bare_contact_sends_an_empty_number_list_and_nothing_empty():
    body = contact_body(merged(name="Jana", company=""), None, None)
    assert body == {"name": "Jana", "ContactNumber": []}, "empty e-mails, links, tags and blank fields are left out"


def test_edit_never_clears_a_field_and_compares_values_as_text():
    current = shown(["+421905000001"], name="Jana", country_id="202", city="Bratislava")
    body = contact_body(merged(name="Jana", country_id=202, city=None, phones=["+421905000001"]), current, None)
    assert body == {}, "202 == '202'; a missing city never clears the contact's"


def test_edit_keeps_the_contacts_own_numbers_and_emails_and_adds_the_new_ones():
    current = shown(["421905000001", "not a number"], ["Jana@Example.org"])
    body = contact_body(
        merged(phones=["+421905000001", "+421905000002"], emails=["jana@example.org", "jana@work.example"]),
        current,
        None,
    )
    assert body == {
        "ContactNumber": [{"public_number": "+421905000001"}, {"public_number": "+421905000002"}],
        "ContactEmail": [{"email": "Jana@Example.org"}, {"email": "jana@work.example"}],
    }


def test_a_number_the_contact_has_that_cannot_be_normalized_is_not_carried_over():
    # current behaviour, pinned: such a number does not count as a difference, but when the list is
    # sent for another reason it is left out (CloudTalk's edit replaces the whole list)
    current = shown(["+421905000001", "12"])
    assert contact_body(merged(phones=["+421905000001"]), current, None) == {}
    body = contact_body(merged(phones=["+421905000002"]), current, None)
    assert body == {"ContactNumber": [{"public_number": "+421905000001"}, {"public_number": "+421905000002"}]}


def test_links_keep_foreign_ones_first_at_most_three_names_cut_to_30():
    long_name = "Kustomer customer with a very long label"
    foreign = [
        {"name": "Salesforce", "url": "https://sf.example/1"},
        {"name": "Zendesk", "url": "https://zd.example/2"},
    ]
    two_sources = merge_sources(
        {
            "c1": {"rev": 1, "updated_at": "t2", "fields": fields(link=link(1, long_name))},
            "c2": {"rev": 1, "updated_at": "t1", "fields": fields(link=link(2))},
        }
    )
    body = contact_body(two_sources, shown(links=foreign), None)
    # foreign links first, then ours newest first; the older source's link does not fit
    assert body["ExternalUrl"] == [*foreign, {"name": long_name[:30], "url": link(1)["url"]}]


def test_links_in_another_order_are_sent_again():
    current = shown(links=[link(1), {"name": "Salesforce", "url": "https://sf.example/1"}])
    body = contact_body(merged(link=link(1)), current, None)
    assert body == {"ExternalUrl": [{"name": "Salesforce", "url": "https://sf.example/1"}, link(1)]}


def test_tags_are_added_never_removed():
    current = shown(tags=["vip"])
    assert contact_body(merged(), current, None) == {}, "no tag wanted: the contact's stay"
    assert contact_body(merged(), current, "vip") == {}, "already tagged"
    assert contact_body(merged(), current, "kustomer-support") == {
        "ContactsTag": [{"name": "vip"}, {"name": "kustomer-support"}]
    }


def test_a_show_without_contact_details_is_treated_as_empty():
    body = contact_body(merged(name="Jana", phones=["+421905000001"]), {"ExternalUrl": []}, "t")
    assert body == {
        "name": "Jana",
        "ContactNumber": [{"public_number": "+421905000001"}],
        "ContactsTag": [{"name": "t"}],
    }
