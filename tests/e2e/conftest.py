"""End-to-end harness: the services as separate processes, the simulators, the real broker.

The simulators run inside the test (so a test reads their state, request logs and injects
faults); ingest, processors and sinks are ``python -m pipeline …`` processes started with
:class:`pipeline.stack.Stack`. Every test gets its own topics and consumer groups.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from devkit.net import free_port
from devkit.sim.cloudtalk import CloudTalkSimSettings, running_cloudtalk_sim
from devkit.sim.kustomer import ALL_ROLES, KustomerSimSettings, running_kustomer_sim
from devkit.stack import Stack
from pipeline.kafka.lag import group_lag
from pipeline.kafka.reading import read_topic
from pipeline.kafka.topics import Topics
from pipeline.ops.status import GROUPS

SUPPORT_LINE = "+442012345678"
OTHER_LINE = "+442079460000"
SECRETS = {
    "E2E_CT_ID": "e2e-key-id",
    "E2E_CT_SECRET": "e2e-key-secret",
    "E2E_K_KEY": "e2e-kustomer-key",
    "E2E_HOOK_SECRET": "e2e-webhook-secret",
    "E2E_K_TOKEN": "e2e-kustomer-token",
}


def config_yaml(ct_api: str, kustomer_url: str, extra: str = "", calls: dict[str, Any] | None = None) -> str:
    calls_extra = "".join(f"\n      {k}: {orjson.dumps(v).decode()}" for k, v in (calls or {}).items())
    return f"""
cloudtalk:
  base_url: {ct_api}
  key_id: {{env: E2E_CT_ID}}
  key_secret: {{env: E2E_CT_SECRET}}
  rate_limit_per_minute: 6000
  poller_reserve: 0
  calls_poll_interval_seconds: 5
  calls_poll_lag_seconds: 0
integrations:
  - name: support
    active: true
    contact_tag: kustomer-support
    kustomer:
      {{base_url: "{kustomer_url}", org_name: acme, api_key: {{env: E2E_K_KEY}}, webhook_token: {{env: E2E_K_TOKEN}}}}
    cloudtalk_webhook_secret: {{env: E2E_HOOK_SECRET}}
    calls:
      create_customers_for_unknown_numbers: true
      connected_numbers: ["{SUPPORT_LINE}"]{calls_extra}
    sms:
      enabled: true
{extra}
"""


async def wait_for(condition: Callable[[], Awaitable[bool] | bool], timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(0.25)


@dataclass
class Flow:
    stack: Stack
    topics: Topics
    bootstrap: str
    ksim: Any
    csim: Any
    ct_root: str
    k_url: str
    ingest_url: str
    http: aiohttp.ClientSession
    calls: list[dict[str, Any]] = field(default_factory=list)

    async def end_call(self, **spec: Any) -> dict[str, Any]:
        body = {
            "direction": "incoming",
            "status": "answered",
            "internal_number": SUPPORT_LINE,
            "external_number": "+447700900123",
            **spec,
        }
        async with self.http.post(
            f"{self.ct_root}/_sim/calls", data=orjson.dumps(body), headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status < 300, await r.text()
            call = await r.json()
        self.calls.append(call)
        return call

    async def sms(self, **spec: Any) -> None:
        body = {
            "direction": "incoming",
            "internal_number": SUPPORT_LINE,
            "external_number": "+447700900123",
            "text": "Hi",
            **spec,
        }
        async with self.http.post(
            f"{self.ct_root}/_sim/sms", data=orjson.dumps(body), headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status < 300, await r.text()

    async def modify_call(self, call_id: int, **spec: Any) -> dict[str, Any]:
        """An agent changes a call's tags, notes or rating after wrap-up (Call Modified fires)."""
        return await self._sim("POST", f"{self.ct_root}/_sim/calls/{call_id}/modify", spec)

    async def upload_recording(self, call_id: int, **spec: Any) -> dict[str, Any]:
        """The call's recording is uploaded (Recording Uploaded fires)."""
        return await self._sim("POST", f"{self.ct_root}/_sim/calls/{call_id}/recording", spec)

    async def cli(self, *args: str) -> tuple[int, str, str]:
        """``pipeline ARGS`` as an operator runs it, with the services' environment: (exit code,
        stdout, stderr)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pipeline",
            *args,
            env={**self.stack.base_env, "PATH": "/usr/bin:/bin"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        return proc.returncode or 0, out.decode(), err.decode()

    async def fault(self, **spec: Any) -> None:
        self.ksim.faults.add(**spec)

    async def _sim(self, method: str, url: str, body: Any = None) -> Any:
        async with self.http.request(
            method,
            url,
            data=orjson.dumps(body) if body is not None else None,
            headers={"Content-Type": "application/json"},
        ) as r:
            assert r.status < 300, f"{method} {url}: {r.status} {await r.text()}"
            return await r.json()

    async def person_creates_customer(self, **attributes: Any) -> dict[str, Any]:
        """An agent creates a Kustomer customer (a webhook fires; createdBy is a person)."""
        extra = {k: attributes.pop(k) for k in ("user", "company") if k in attributes}
        return (await self._sim("POST", f"{self.k_url}/_sim/customers", {"attributes": attributes, **extra}))["data"]

    async def person_edits_customer(self, customer_id: str, **attributes: Any) -> dict[str, Any]:
        return (await self._sim("POST", f"{self.k_url}/_sim/customers/{customer_id}/edit", {"attributes": attributes}))[
            "data"
        ]

    async def person_creates_contact(self, body: dict[str, Any]) -> str:
        """An agent creates a CloudTalk contact (the contact.created workflow fires)."""
        created = await self._sim("POST", f"{self.ct_root}/_sim/contacts", body)
        return str(created.get("id") or created.get("contact_id") or created["Contact"]["id"])

    async def person_edits_contact(self, contact_id: str, body: dict[str, Any]) -> None:
        await self._sim("PATCH", f"{self.ct_root}/_sim/contacts/{contact_id}", body)

    async def ct_state(self) -> dict[str, Any]:
        return await self._sim("GET", f"{self.ct_root}/_sim/state")

    def ct_writes(self) -> list[str]:
        """State changes made through the CloudTalk API (the request log's effects; a bulk
        request's are its commands' own, one per command applied)."""
        writes: list[str] = []
        for e in self.csim.log.entries:
            if e.items is not None:
                writes.extend(item["effect"] for item in e.items if item.get("effect"))
            elif e.effect:
                writes.append(e.effect)
        return writes

    def k_writes(self) -> list[str]:
        return [e.effect for e in self.ksim.log.entries if e.effect and not e.effect.startswith("webhook.")]

    def conversations_by_external_id(self) -> Counter:
        return Counter(c["attributes"]["externalId"] for c in self.ksim.conversations.values())

    def notes_per_conversation(self) -> Counter:
        return Counter(n["conversation"] for n in self.ksim.notes.values())

    def creates(self, kind: str) -> int:
        """Distinct effects of one kind in the Kustomer request log (e.g. conversation.create)."""
        return sum(1 for e in self.ksim.log.entries if e.effect and e.effect.startswith(kind))

    def assert_exactly_once(self, external_ids: list[str]) -> None:
        convs = self.conversations_by_external_id()
        assert {e: convs[e] for e in external_ids} == {e: 1 for e in external_ids}, convs
        assert len(convs) == len(external_ids), f"unexpected conversations: {set(convs) - set(external_ids)}"
        per_conv = self.notes_per_conversation()
        for cid in self.ksim.conversations:
            assert per_conv[cid] == 1, f"conversation {cid} has {per_conv[cid]} notes"
        assert self.creates("conversation.create") == len(external_ids), "a conversation was created twice"
        assert self.creates("note.create") == len(external_ids), "a note was created twice"


@pytest.fixture
async def flow(kafka_bootstrap: str, topics: Topics, tmp_path: Path, request: pytest.FixtureRequest):
    marker = request.node.get_closest_marker("services")
    services = marker.args if marker else ("ingest", "process-calls", "process-sms", "sink-kustomer")
    kmarker = request.node.get_closest_marker("kustomer")
    ksettings = KustomerSimSettings(webhook_allow_http=True, **(kmarker.kwargs if kmarker else {}))
    csettings = CloudTalkSimSettings(key_id=SECRETS["E2E_CT_ID"], key_secret=SECRETS["E2E_CT_SECRET"], rate_limit=6000)
    async with (
        running_kustomer_sim(ksettings, keys={SECRETS["E2E_K_KEY"]: ALL_ROLES}) as (ksim, k_url),
        running_cloudtalk_sim(csettings) as (csim, ct_api),
        aiohttp.ClientSession() as http,
    ):
        ct_root = ct_api.removesuffix("/api")
        ingest_port = free_port()
        ingest_url = f"http://127.0.0.1:{ingest_port}"
        config = tmp_path / "integrations.yaml"
        cmarker = request.node.get_closest_marker("calls")
        config.write_text(config_yaml(ct_api, k_url, calls=cmarker.kwargs if cmarker else None))
        env = {
            "KAFKA_BOOTSTRAP": kafka_bootstrap,
            "TOPIC_PREFIX": topics.prefix,
            "PIPELINE_CONFIG": str(config),
            "LOG_LEVEL": "INFO",
            "SINK_RETRY_DEADLINE_S": "20",
            "SINK_HTTP_TIMEOUT_S": "2",
            "SINK_RECONCILE_SETTLE_S": "10",
            "SINK_RETRY_MAX_BACKOFF_S": "1",
            "CALLS_POLL_INITIAL_LOOKBACK_S": "1800",
            "CALLS_POLL_OVERLAP_S": "1800",
            **SECRETS,
        }
        env_marker = request.node.get_closest_marker("env")
        env.update(env_marker.kwargs if env_marker else {})
        stack = Stack(tmp_path, env)
        commands = {
            "ingest": ["ingest", "--port", str(ingest_port)],
            "process-calls": ["process", "calls"],
            "process-calls-2": ["process", "calls"],
            "process-sms": ["process", "sms"],
            "sink-kustomer": ["sink", "kustomer"],
            "poll-calls": ["poll", "calls"],
            "process-contacts-import": ["process", "contacts-import"],
            "process-contacts-export": ["process", "contacts-export"],
            "sink-cloudtalk": ["sink", "cloudtalk"],
            "poll-customers": ["poll", "customers"],
            "poll-contacts": ["poll", "contacts"],
        }
        if "process-contacts-import" in services:  # Kustomer signs its webhooks with the token it hands out
            async with http.post(
                f"{k_url}/v1/outbound-webhooks",
                data=orjson.dumps(
                    {
                        "name": "sync",
                        "url": f"{ingest_url}/ingest/kustomer/support",
                        "events": ["kustomer.customer.create", "kustomer.customer.update"],
                    }
                ),
                headers={"Authorization": f"Bearer {SECRETS['E2E_K_KEY']}", "Content-Type": "application/json"},
            ) as r:
                env["E2E_K_TOKEN"] = (await r.json())["data"]["attributes"]["token"]
        for name in services:
            if name == "ingest":
                stack.add(name, commands[name], health=f"{ingest_url}/readyz")
            else:
                stack.add(name, commands[name])
        await stack.wait_ready(timeout=90)
        await http.post(
            f"{ct_root}/_sim/workflows",
            data=orjson.dumps(
                [
                    {
                        "trigger": t,
                        "url": f"{ingest_url}/ingest/cloudtalk/support/{path}",
                        "headers": {"X-Pipeline-Secret": SECRETS["E2E_HOOK_SECRET"]},
                    }
                    for t, path in (
                        ("call.ended", "call-ended"),
                        ("call.modified", "call-modified"),
                        ("recording.uploaded", "recording-uploaded"),
                        ("sms.received", "sms"),
                        ("sms.sent", "sms"),
                        ("contact.created", "contact"),
                        ("contact.updated", "contact"),
                        ("contact.deleted", "contact"),
                    )
                ]
            ),
            headers={"Content-Type": "application/json"},
        )
        f = Flow(stack, topics, kafka_bootstrap, ksim, csim, ct_root, k_url, ingest_url, http)
        try:
            yield f
        finally:
            codes = await asyncio.to_thread(stack.stop_all)
            print(f"\nstop times: {stack.stop_seconds}")
            crashed = {n: c for n, c in codes.items() if c not in (0, -9, -15, None)}
            assert not crashed, {n: stack.tail(n) for n in crashed}


# Each service's consumer group reads one topic (the helpers below wait on their lag).
GROUP_INPUTS = GROUPS


async def quiet(flow: Flow, groups: tuple[str, ...], timeout: float = 90) -> None:
    """Wait until ``groups`` have no lag and neither simulator has a webhook delivery pending.

    A sink's parked commands are not lag (its offsets moved past them): wait for their effects first."""

    async def idle() -> bool:
        if any(d.status == "pending" for d in flow.ksim.deliveries):
            return False
        if any(d.status == "pending" for d in flow.csim.company.deliveries):
            return False
        for group in groups:
            topic = getattr(flow.topics, GROUP_INPUTS[group])
            if sum((await group_lag(flow.bootstrap, f"{flow.topics.prefix}{group}", [topic])).values()):
                return False
        return True

    await wait_for(idle, timeout, f"{', '.join(groups)} to be idle")


async def audit_rules(flow: Flow, stage: str) -> list[tuple[str, str]]:
    """(decision, rule) of every audit record ``stage`` wrote."""
    out = []
    for r in await read_topic(flow.bootstrap, flow.topics.audit):
        a = orjson.loads(r.value)
        if a["stage"] == stage:
            out += [(d["decision"], d.get("rule", "")) for d in a["decisions"]]
    return out
