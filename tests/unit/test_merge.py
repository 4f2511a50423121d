"""Merging customers into one CloudTalk contact (reference 1.9), as pure functions."""

from __future__ import annotations

from pipeline.sink.merge import contact_body, is_newer, merge_sources


def source(updated_at, rev=None, **fields):
    base = {
        "name": None,
        "company": None,
        "website": None,
        "address": None,
        "city": None,
        "zip": None,
        "state": None,
        "country_id": None,
        "favorite_agent": None,
        "phones": [],
        "emails": [],
        "link": None,
    }
    base.update(fields)
    return {"rev": rev, "updated_at": updated_at, "fields": base}


def link(cid):
    return {"name": "Kustomer", "url": f"https://acme.kustomerapp.com/app/customers/{cid}"}


def test_reference_example_union_of_numbers_and_newest_name():
    # "John Jones" (2 numbers) + incoming "John J" with a matching number -> one contact "John J", 3 numbers
    sources = {
        "a" * 24: source(
            "2026-03-01T10:00:00.000Z",
            name="John Jones",
            phones=["+421905111111", "+421905222222"],
            emails=["john@example.org"],
            company="Acme",
            link=link("a" * 24),
        ),
        "b" * 24: source(
            "2026-03-02T10:00:00.000Z",
            name="John J",
            phones=["+421905222222", "+421905333333"],
            emails=["JOHN@example.org", "jj@example.org"],
            link=link("b" * 24),
        ),
    }
    merged = merge_sources(sources)
    assert merged["name"] == "John J"
    assert set(merged["phones"]) == {"+421905111111", "+421905222222", "+421905333333"} and len(merged["phones"]) == 3
    assert merged["emails"] == ["JOHN@example.org", "jj@example.org"], "e-mails are unique without regard to case"
    assert merged["company"] == "Acme", "the newest source has no company: the older value stays"
    assert [x["url"] for x in merged["links"]] == [link("b" * 24)["url"], link("a" * 24)["url"]]


def test_add_body_has_every_mapped_field():
    merged = merge_sources(
        {
            "a" * 24: source(
                "t1",
                name="Jana",
                company="Acme s.r.o.",
                website="https://acme.example.sk",
                address="Hlavná 12 3rd floor",
                city="Bratislava",
                zip="81101",
                state="Bratislavský kraj",
                country_id=202,
                favorite_agent=493933,
                phones=["+421905123456"],
                emails=["jana@example.org"],
                link=link("a" * 24),
            )
        }
    )
    body = contact_body(merged, None, "kustomer-support")
    assert body == {
        "name": "Jana",
        "company": "Acme s.r.o.",
        "website": "https://acme.example.sk",
        "address": "Hlavná 12 3rd floor",
        "city": "Bratislava",
        "zip": "81101",
        "state": "Bratislavský kraj",
        "country_id": 202,
        "favorite_agent": 493933,
        "ContactNumber": [{"public_number": "+421905123456"}],
        "ContactEmail": [{"email": "jana@example.org"}],
        "ExternalUrl": [link("a" * 24)],
        "ContactsTag": [{"name": "kustomer-support"}],
    }


def shown(numbers, emails=(), name="Jana", tags=(), links=(), **fields):
    return {
        "Contact": {
            "id": "17",
            "name": name,
            "contact_numbers": list(numbers),
            "contact_emails": list(emails),
            "tags": [{"id": str(i), "name": t} for i, t in enumerate(tags)],
            **fields,
        },
        "ExternalUrl": list(links),
    }


def test_edit_never_drops_a_number_the_contact_already_has():
    merged = merge_sources({"a" * 24: source("t1", name="Jana", phones=["+421905123456"], link=link("a" * 24))})
    current = shown(["+421905123456", "+420601123456"], tags=["vip"], links=[link("a" * 24)])
    body = contact_body(merged, current, "kustomer-support")
    assert "ContactNumber" not in body, "nothing new: the list is not sent (an edit would replace it)"
    assert body == {"ContactsTag": [{"name": "vip"}, {"name": "kustomer-support"}]}
    merged2 = merge_sources({"a" * 24: source("t1", name="Jana", phones=["+421905999999"], link=link("a" * 24))})
    body2 = contact_body(merged2, current, "vip")
    assert [n["public_number"] for n in body2["ContactNumber"]] == ["+421905123456", "+420601123456", "+421905999999"]


def test_unchanged_contact_needs_no_edit_and_foreign_links_are_kept():
    merged = merge_sources(
        {"a" * 24: source("t1", name="Jana", phones=["+421905123456"], emails=["j@x.org"], link=link("a" * 24))}
    )
    other = {"name": "Salesforce", "url": "https://sf.example/1"}
    current = shown(["421905123456"], ["J@x.org"], tags=["kustomer-support"], links=[other, link("a" * 24)])
    assert contact_body(merged, current, "kustomer-support") == {}
    current_no_link = shown(["421905123456"], ["J@x.org"], tags=["kustomer-support"], links=[other])
    assert contact_body(merged, current_no_link, "kustomer-support") == {"ExternalUrl": [other, link("a" * 24)]}


def test_versions_compare_by_rev_then_updated_at():
    assert is_newer({"rev": 8, "updated_at": "a"}, {"rev": 7, "updated_at": "z"})
    assert not is_newer({"rev": 7, "updated_at": "z"}, {"rev": 7, "updated_at": "a"})
    assert is_newer(
        {"rev": None, "updated_at": "2026-03-02T11:00:03.207Z"}, {"rev": 8, "updated_at": "2026-03-01T00:00:00.000Z"}
    )
