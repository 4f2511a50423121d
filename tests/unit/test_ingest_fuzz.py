"""Generated requests against every ingest endpoint (the real app over a fake producer that records
what the broker would store): whatever the body, the headers or the path, the answer is never a
5xx, a refused request publishes nothing, and a 202 publishes exactly one record.

Header values are also sent as raw bytes over a socket (aiohttp's client refuses bytes that are
not valid header text). ``INGEST_FUZZ_EXAMPLES`` sets the number of examples per test.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.ingest.base import IngestLimits
from tests.unit.ingest_fakes import KUSTOMER_EVENT, SECRET, TOKEN, Broker, ingest_app, signature, start_publisher
from tests.unit.test_call_sms_rules import SMS
from tests.unit.test_envelope_schemas import CALL

EXAMPLES = int(os.environ.get("INGEST_FUZZ_EXAMPLES", "1000"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # every run explores anew; nothing is written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
CONTACT = {
    "event": "contact.updated",
    "contact_id": 17,
    "modified_at": "2026-03-01T17:02:44.000Z",
    "name": "Jana Nováková",
    "phones": ["+421905123456"],
}
VALID = {"call-ended": CALL, "sms": SMS, "contact": CONTACT}


class Harness:
    """One app on its own event loop for every example of a test module."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.broker = Broker()
        self.client: TestClient = self.loop.run_until_complete(self._start())
        self.statuses: dict[int, int] = {}

    async def _start(self) -> TestClient:
        self.publisher = await start_publisher(self.broker)
        client = TestClient(TestServer(ingest_app(self.publisher, IngestLimits(rate_per_s=0))))
        await client.start_server()
        return client

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.run_until_complete(self.publisher.stop())
        self.loop.close()

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        async def go() -> tuple[int, bytes]:
            async with self.client.post(path, data=body, headers=headers) as r:
                return r.status, await r.read()

        return self.loop.run_until_complete(go())

    def raw(self, request: bytes) -> bytes:
        async def go() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.client.server.port)
            try:
                writer.write(request)
                await writer.drain()
                return await asyncio.wait_for(reader.read(), 10)
            finally:
                writer.close()

        return self.loop.run_until_complete(go())

    def check(self, status: int, answer: bytes, before: int) -> None:
        """The properties every answer has."""
        self.statuses[status] = self.statuses.get(status, 0) + 1
        published = len(self.broker.stored) - before
        assert status < 500, answer[:500]
        assert published == (1 if status == 202 else 0), (status, published, answer[:300])
        if status >= 400 and answer.startswith(b"{"):
            assert "error" in json.loads(answer)


@pytest.fixture(scope="module")
def harness():
    h = Harness()
    yield h
    h.close()
    print(f"\nanswers: {dict(sorted(h.statuses.items()))}; stored {len(h.broker.stored)}")


# --- generated values -----------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**30, 10**30 + 1, 0, -1])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def dumps(value: Any) -> bytes:
    """JSON text as any sender could write it (integers of any size; ensure_ascii off)."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def nested(draw: st.DrawFn) -> Any:
    """A value wrapped in many levels of lists or objects (a few hundred at most)."""
    value = draw(scalars)
    for _ in range(draw(st.integers(min_value=0, max_value=400))):
        value = [value] if draw(st.booleans()) else {"k": value}
    return value


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> Any:
    """A valid body with some fields replaced, removed or added, at any depth."""
    body = copy.deepcopy(base)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        target = body
        while isinstance(target, dict) and target and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(target)))
            if not isinstance(target[key], dict):
                break
            target = target[key]
        if not isinstance(target, dict):
            break
        action = draw(st.sampled_from(["replace", "replace", "nest", "delete", "add"]))
        key = draw(st.sampled_from(sorted(target))) if target else "x"
        if action == "replace":
            target[key] = draw(json_values)
        elif action == "nest":
            target[key] = draw(nested())
        elif action == "delete":
            target.pop(key, None)
        else:
            target[draw(st.text(max_size=8))] = draw(json_values)
    return draw(st.sampled_from([body, body, [body], draw(json_values)]))


# header text aiohttp's client will send (raw bytes of any kind: the last test)
header_text = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=20)
cloudtalk_kinds = st.sampled_from(["call-ended", "sms", "contact"])
integrations = st.sampled_from(["support"] * 6 + ["sales", "nobody"]) | st.text(min_size=1, max_size=12)
raw_bodies = st.binary(max_size=400) | st.sampled_from(
    [b"", b"{}", b"[]", b'{"event": []}', b'{"event": {}}', b"null", b"1e999", b"\xff", b'{"a":"\\ud800"}']
)


# --- the properties ---------------------------------------------------------------------------------


@FUZZ
@given(
    kind=cloudtalk_kinds | st.text(max_size=10),
    integration=integrations,
    secret=st.sampled_from([SECRET] * 6 + ["other-secret", "wrong", ""]) | header_text,
    body=st.one_of(cloudtalk_kinds.flatmap(lambda k: mutated(VALID[k])).map(dumps), raw_bodies),
)
def test_cloudtalk_endpoints_never_answer_5xx_and_publish_only_what_they_accept(
    harness, kind, integration, secret, body
):
    path = f"/ingest/cloudtalk/{quote(integration, safe='')}/{quote(kind, safe='')}"
    headers = {"Content-Type": "application/json"}
    if secret:
        headers["X-Pipeline-Secret"] = secret
    before = len(harness.broker.stored)
    status, answer = harness.post(path, body, headers)
    harness.check(status, answer, before)
    if status == 202:
        assert (
            integration in ("support", "sales") and secret == {"support": SECRET, "sales": "other-secret"}[integration]
        )


@FUZZ
@given(
    integration=integrations,
    signed=st.sampled_from(["right", "right", "right", "wrong", "none", "upper"]),
    event_header=st.none() | st.sampled_from(["kustomer.customer.create", "kustomer.customer.update"]) | header_text,
    body=st.one_of(mutated(KUSTOMER_EVENT).map(dumps), raw_bodies),
)
def test_the_kustomer_endpoint_never_answers_5xx_and_publishes_only_signed_valid_events(
    harness, integration, signed, event_header, body
):
    headers = {"Content-Type": "application/json"}
    if signed != "none":
        sig = signature(body, TOKEN if signed != "wrong" else "other")
        headers["X-Kustomer-Webhook-Signature"] = sig.upper() if signed == "upper" else sig
    if event_header is not None:
        headers["X-Kustomer-Webhook-Event"] = event_header
    before = len(harness.broker.stored)
    status, answer = harness.post(f"/ingest/kustomer/{quote(integration, safe='')}", body, headers)
    harness.check(status, answer, before)
    if status == 202:
        assert integration == "support" and signed in ("right", "upper")
    if signed in ("wrong", "none") or integration != "support":
        assert status in (401, 404, 405, 413), (status, answer)


header_bytes = st.binary(min_size=0, max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@FUZZ
@given(
    path=st.sampled_from(
        [
            "/ingest/cloudtalk/support/call-ended",
            "/ingest/cloudtalk/support/sms",
            "/ingest/cloudtalk/nobody/contact",
            "/ingest/kustomer/support",
            "/ingest/kustomer/nobody",
        ]
    ),
    name=st.sampled_from(
        [b"X-Pipeline-Secret", b"X-Kustomer-Webhook-Signature", b"X-Kustomer-Webhook-Event", b"Content-Type"]
    ),
    value=header_bytes | st.sampled_from([b"\xff\xfe", SECRET.encode() + b"\xc3", b"\xed\xa0\x80", b"\x00"]),
    with_secret=st.booleans(),
)
def test_header_bytes_of_any_kind_never_reach_a_5xx(harness, path, name, value, with_secret):
    body = dumps(CALL if "cloudtalk" in path else KUSTOMER_EVENT)
    headers = [(name, value)]
    if with_secret:
        headers.append((b"X-Pipeline-Secret", SECRET.encode()))
        headers.append((b"X-Kustomer-Webhook-Signature", signature(body).encode()))
    head = [b"POST " + path.encode() + b" HTTP/1.1", b"Host: ingest", b"Connection: close"]
    head += [k + b": " + v for k, v in headers]
    head.append(b"Content-Length: " + str(len(body)).encode())
    before = len(harness.broker.stored)
    answer = harness.raw(b"\r\n".join(head) + b"\r\n\r\n" + body)
    status = int(answer.split(b" ", 2)[1])
    harness.check(status, answer.partition(b"\r\n\r\n")[2], before)
