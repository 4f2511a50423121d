"""The quick envelope check never lets through what the envelope schema refuses, takes the usual
envelopes itself, and leaves every refusal — with its message — to the schema validator."""

from __future__ import annotations

import copy
import random
from typing import Any

import fastjsonschema
import orjson
import pytest

from pipeline.core.envelope import PAYLOAD_SCHEMAS, Envelope, usual_envelope_check, validate_envelope
from pipeline.core.schemas import SchemaError, load_schema, validate
from tests.unit.test_envelope_schemas import envelope

SCHEMA_ACCEPTS = fastjsonschema.compile(load_schema("envelope"))

ODD_VALUES: tuple[Any, ...] = (
    None,
    True,
    0,
    1,
    1.0,
    2.5,
    -1,
    "",
    "ab",
    "x" * 301,
    "*",
    "Support",
    "support team",
    "a" * 64,
    "a" * 63,
    "call.ended",
    "call.Ended",
    "call.ended\n",
    "cloudtalk",
    "kustomer",
    "replay",
    "2026-03-02T09:18:40.000Z",
    "2026-03-02t09:18:40+01:00",
    "2026-02-29T09:18:40Z",
    "2028-02-29T09:18:40Z",
    "2026-03-02T24:00:00Z",
    "2026-03-02 09:18:40",
    "2026-03-02T09:18:40.000Z\n",
    "٢٠٢٦-03-02T09:18:40Z",
    [],
    {},
    {"for_integration": "support"},
)


def accepted(data: Any) -> bool:
    try:
        SCHEMA_ACCEPTS(copy.deepcopy(data))
    except fastjsonschema.JsonSchemaValueException:
        return False
    return True


def refusal(data: Any) -> str | None:
    try:
        validate_envelope(data, payload=False)
    except SchemaError as exc:
        return str(exc)
    return None


def refusal_by_the_schema_validator(data: Any) -> str | None:
    """What :func:`validate_envelope` answers with every envelope given to the schema validator."""
    try:
        validate("envelope", data)
        if (data["source"], data["type"]) not in PAYLOAD_SCHEMAS:
            return f"no event type {data['type']!r} for source {data['source']!r}"
    except SchemaError as exc:
        return str(exc)
    return None


def test_the_check_knows_the_schema_file():
    assert usual_envelope_check()(envelope()), "the envelope schema changed: update ENVELOPE_PROPERTIES"


def test_the_usual_envelopes_pass_the_quick_check():
    for data in (
        envelope(),
        envelope(via="poller", integration="*", meta={"for_integration": "support"}),
        {k: v for k, v in envelope().items() if k != "via"},
        envelope(source="kustomer", type="customer.updated", id="kustomer:customer:abc:7"),
    ):
        assert usual_envelope_check()(data)
        assert accepted(data)


@pytest.mark.parametrize("seed", range(3))
def test_the_quick_check_never_passes_what_the_schema_refuses(seed):
    rng = random.Random(seed)
    fields = [*envelope(), "meta", "extra"]
    check = usual_envelope_check()
    taken = refused = 0
    for _ in range(3000):
        data: Any = envelope()
        for _ in range(rng.randint(0, 2)):
            name = rng.choice(fields)
            if rng.random() < 0.2:
                data.pop(name, None)
            else:
                data[name] = rng.choice(ODD_VALUES)
        if rng.random() < 0.01:
            data = rng.choice([None, [], "envelope"])
        ok = accepted(data)
        if check(data):
            assert ok, data
            taken += 1
        refused += not ok
        assert refusal(data) == refusal_by_the_schema_validator(data), data
    assert taken > 100 and refused > 100


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"integration": "Support"}, "integration: must match pattern"),
        ({"occurred_at": "2026-02-29T09:18:40Z"}, "occurred_at: must be date-time (rule: format)"),
        ({"schema": 0}, "schema: must be bigger than or equal to 1 (rule: minimum)"),
        ({"via": None}, "via: must be one of"),
        ({"extra": 1}, "must not contain {'extra'} properties (rule: additionalProperties)"),
    ],
)
def test_refusals_keep_the_schema_validators_message(over, message):
    assert message in (refusal(envelope(**over)) or "")


def test_decoding_builds_the_same_envelope():
    data = envelope(meta={"for_integration": "support"})
    env = Envelope.from_json(orjson.dumps(data), payload=False)
    assert env == Envelope(
        id=data["id"],
        integration="support",
        source="cloudtalk",
        type="call.ended",
        occurred_at=data["occurred_at"],
        received_at=data["received_at"],
        payload=data["payload"],
        schema=1,
        via="webhook",
        meta={"for_integration": "support"},
    )
    assert env.to_dict() == data
    bare = {k: v for k, v in data.items() if k not in ("via", "meta")}
    assert Envelope.from_dict(bare).to_dict() == {**bare, "via": "webhook"}
