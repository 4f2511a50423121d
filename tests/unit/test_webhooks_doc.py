"""docs/webhooks.md says what the code does: its examples pass the endpoints' checks and build the
event ids it names, and its "required" columns are the schemas' required fields."""

from __future__ import annotations

import json
import re

import pytest

from pipeline.core.schemas import load_schema
from pipeline.ingest.cloudtalk import cloudtalk_envelope
from pipeline.ingest.kustomer import kustomer_envelope
from tests.conftest import REPO

DOC = (REPO / "docs" / "webhooks.md").read_text()

# section heading -> (schema, envelope builder, the example's event id)
SECTIONS = {
    "### call-ended": ("cloudtalk.call.ended", cloudtalk_envelope, "cloudtalk:call:1002409191"),
    "### call-modified": (
        "cloudtalk.call.modified",
        cloudtalk_envelope,
        "cloudtalk:call:1002409191#details:417710dafc97499e",
    ),
    "### recording-uploaded": (
        "cloudtalk.recording.uploaded",
        cloudtalk_envelope,
        "cloudtalk:call:1002409191#details:d3ac7506773cf788",
    ),
    "### sms": ("cloudtalk.sms", cloudtalk_envelope, "cloudtalk:sms:88231977"),
    "### contact": ("cloudtalk.contact", cloudtalk_envelope, "cloudtalk:contact:1451646073:2026-03-02T10:05:00Z"),
    "## Kustomer customer events": (
        "kustomer.customer.event",
        kustomer_envelope,
        "kustomer:customer:65f1c0ffee00000000000001:1",
    ),
}


def section(heading: str) -> str:
    start = DOC.index(f"\n{heading}\n")
    following = re.search(r"\n##+ ", DOC[start + len(heading) + 2 :])
    return DOC[start : start + len(heading) + 2 + following.start()] if following else DOC[start:]


def required_in_doc(text: str) -> set[str]:
    """The backticked names of the table rows whose "required" column is ``yes``."""
    names: set[str] = set()
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[1] == "yes":
            names.update(re.findall(r"`([^`]+)`", cells[0]))
    return names


@pytest.mark.parametrize("heading", list(SECTIONS))
def test_the_example_is_accepted_and_gets_the_event_id_the_doc_names(heading):
    schema, build, event_id = SECTIONS[heading]
    text = section(heading)
    assert f"../schemas/{schema}.schema.json" in text
    example = json.loads(re.search(r"```json\n(.*?)```", text, re.S).group(1))
    assert build(example, "support", "webhook").id == event_id


@pytest.mark.parametrize("heading", list(SECTIONS))
def test_required_fields_are_the_schemas(heading):
    schema_name = SECTIONS[heading][0]
    schema = load_schema(schema_name)
    required = set(schema["required"])
    if "data" in schema["properties"]:
        required |= {f"data.{f}" for f in schema["properties"]["data"]["required"]}
        required.discard("data")
    assert required_in_doc(section(heading)) == required


def test_every_endpoint_and_answer_is_listed():
    for path in (
        "/call-ended",
        "/call-modified",
        "/recording-uploaded",
        "/sms",
        "/contact",
        "/ingest/kustomer/{integration}",
    ):
        assert path in DOC
    for status in ("202", "200", "400", "401", "404", "408", "413", "429", "503"):
        assert f"| **{status}**" in DOC, status
    readme = (REPO / "README.md").read_text()
    assert "docs/webhooks.md" in readme
