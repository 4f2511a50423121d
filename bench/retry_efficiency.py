"""Retry efficiency: Kustomer create requests per call when 30 % of Kustomer's answers are 503.

    python bench/retry_efficiency.py [--calls 300] [--fault-rate 0.3] [--numbers 50]

Uses ``KAFKA_BOOTSTRAP`` when set, otherwise starts a local broker. For each scenario the Kustomer
sink runs as its own process against its own Kustomer simulator process, on topics of its own:
``--calls`` ``kustomer.log_conversation`` commands (customers already exist, so a call needs
exactly two creates: its conversation and its note) are produced to the command topic, and the
sink works them off. The simulator's request log gives, per call: create requests (``POST
/v1/conversations`` and ``POST /v1/notes``, every attempt), lookups (a customer's conversations,
a conversation's notes — what reconciling an unknown outcome costs), all requests, and how many
conversations and notes exist (must be one each).

Scenarios, in the same run:

* **baseline** — no faults;
* **30 % 503** — every Kustomer API request answered 503 with probability ``--fault-rate``; the
  default policy: a 503 says the target did not handle the request, so a create is sent again
  without looking anything up;
* **30 % 503, as unknown** — the same faults with ``SINK_UNPROCESSED_STATUSES=`` (empty): every 5xx
  leaves a create's outcome unknown, so it is looked up after the settle time before it is sent
  again (the policy before 503 counted as unprocessed).

With independent faults a create needs 1 / (1 − rate) attempts on average whatever the policy —
2 / 0.7 ≈ 2.86 create requests per call at 30 % — so the floor is printed next to each result.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import textwrap
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import orjson  # noqa: E402

from bench.common import Row, kafka, print_summary  # noqa: E402
from devkit.net import free_port  # noqa: E402
from devkit.stack import Stack  # noqa: E402
from pipeline.kafka.clients import new_producer  # noqa: E402
from pipeline.kafka.lag import group_lag  # noqa: E402
from pipeline.kafka.topics import Topics, ensure_topics  # noqa: E402

KEY = "bench-kustomer-key"
SECRETS = {"B_CT_ID": "bench-id", "B_CT_SECRET": "bench-secret", "B_K_KEY": KEY, "B_HOOK": "bench-hook"}
CREATES = ("/v1/conversations", "/v1/notes")


@dataclass
class Scenario:
    name: str
    fault_rate: float
    env: dict[str, str]


@dataclass
class Result:
    scenario: Scenario
    calls: int
    seconds: float
    requests: Counter  # (method, path kind, status) -> count
    conversations: int
    notes: int
    duplicates: int

    def per_call(self, pred) -> float:  # type: ignore[no-untyped-def]
        return sum(n for k, n in self.requests.items() if pred(*k)) / self.calls


def command(i: int, phone: str) -> tuple[bytes, bytes]:
    event_id = f"cloudtalk:call:{900000 + i}"
    cmd = {
        "command_id": f"support|{event_id}",
        "type": "kustomer.log_conversation",
        "integration": "support",
        "event_id": event_id,
        "occurred_at": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        "flow": "call",
        "customer": {"phone": phone, "name": None, "create": True},
        "conversation": {
            "name": f"Call {900000 + i}",
            "status": "done",
            "direction": "in",
            "externalId": f"cloudtalk-call-{900000 + i}",
        },
        "note": {
            "body": f"CloudTalk call {900000 + i}\nAnswered incoming call.",
            "marker": f"CloudTalk call {900000 + i}",
        },
    }
    return f"support|{phone}".encode(), orjson.dumps(cmd)


def kind(path: str) -> str:
    if path in CREATES or path == "/v1/customers":
        return path.rsplit("/", 1)[1]
    if path.endswith("/conversations"):
        return "lookup:conversations"
    if path.endswith("/notes"):
        return "lookup:notes"
    if path.startswith("/v1/customers/phone="):
        return "lookup:customer"
    return path


async def run(bootstrap: str, scenario: Scenario, args: argparse.Namespace) -> Result:
    work = Path(tempfile.mkdtemp(prefix="bench-retry-"))
    topics = Topics(f"bench{uuid.uuid4().hex[:6]}-")
    await ensure_topics(bootstrap, topics.specs())
    port = free_port()
    k = f"http://127.0.0.1:{port}"
    config = work / "integrations.yaml"
    config.write_text(
        textwrap.dedent(f"""
        cloudtalk: {{base_url: "http://127.0.0.1:9/api", key_id: {{env: B_CT_ID}}, key_secret: {{env: B_CT_SECRET}}}}
        integrations:
          - name: support
            active: true
            kustomer: {{base_url: "{k}", org_name: acme, api_key: {{env: B_K_KEY}}}}
            cloudtalk_webhook_secret: {{env: B_HOOK}}
            calls: {{create_customers_for_unknown_numbers: true, connected_numbers: ["+442012345678"]}}
    """)
    )
    env = {
        "KAFKA_BOOTSTRAP": bootstrap,
        "TOPIC_PREFIX": topics.prefix,
        "PIPELINE_CONFIG": str(config),
        "LOG_LEVEL": "WARNING",
        "SINK_HTTP_TIMEOUT_S": "2",
        "SINK_RECONCILE_SETTLE_S": str(args.settle),
        **SECRETS,
        **scenario.env,
    }
    stack = Stack(work, env)
    numbers = [f"+4479470{n:05d}" for n in range(args.numbers)]
    try:
        stack.add_simulator(
            "sim-kustomer",
            "kustomer",
            port,
            ["--api-key", KEY, "--rate-limit", "10000000", "--per-customer-limit", "100000", "--log-level", "WARNING"],
        )
        await stack.wait_ready(timeout=60)
        async with aiohttp.ClientSession() as http:
            seed = {"customers": [{"name": p, "phones": [{"type": "mobile", "phone": p}]} for p in numbers]}
            async with http.post(f"{k}/_sim/seed", data=orjson.dumps(seed)) as r:
                assert r.status < 300, await r.text()
            async with http.delete(f"{k}/_sim/requests") as r:
                assert r.status < 300
            if scenario.fault_rate:
                fault = {"match": r"^(GET|POST) /v1/", "kind": "status", "status": 503}
                async with http.post(
                    f"{k}/_sim/faults", data=orjson.dumps({**fault, "probability": scenario.fault_rate})
                ) as r:
                    assert r.status < 300, await r.text()
            producer = new_producer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
            await producer.start()
            try:
                for i in range(args.calls):
                    key, value = command(i, numbers[i % len(numbers)])
                    await producer.send(topics.kustomer_commands, value, key=key)
                await producer.flush()
            finally:
                await producer.stop()
            started = time.monotonic()
            stack.add("sink-kustomer", ["sink", "kustomer"])
            deadline = started + args.timeout
            while True:
                async with http.get(f"{k}/_sim/requests", params={"method": "POST", "path": "^/v1/notes$"}) as r:
                    notes = sum(1 for e in (await r.json())["requests"] if e["effect"])
                lag = sum(
                    (await group_lag(bootstrap, f"{topics.prefix}sink-kustomer", [topics.kustomer_commands])).values()
                )
                if notes >= args.calls and lag == 0:
                    break
                if time.monotonic() > deadline:
                    print(f"  {scenario.name}: timed out with {notes} of {args.calls} notes", flush=True)
                    break
                await asyncio.sleep(0.25)
            seconds = time.monotonic() - started
            async with http.get(f"{k}/_sim/requests") as r:
                log = (await r.json())["requests"]
            async with http.get(f"{k}/_sim/state") as r:
                state = await r.json()
    finally:
        stack.stop_all()
    requests = Counter((e["method"], kind(e["path"]), e["status"]) for e in log)
    conversations = state["conversations"]
    per_external = Counter(c["attributes"]["externalId"] for c in conversations)
    duplicates = sum(n - 1 for n in per_external.values()) + sum(
        max(0, c["attributes"]["noteCount"] - 1) for c in conversations
    )
    return Result(scenario, args.calls, seconds, requests, len(per_external), len(state["notes"]), duplicates)


def report(r: Result) -> str:
    creates = r.per_call(lambda m, k, s: m == "POST" and k in ("conversations", "notes"))
    lookups = r.per_call(lambda m, k, s: k in ("lookup:conversations", "lookup:notes"))
    total = r.per_call(lambda m, k, s: True)
    answered_503 = r.per_call(lambda m, k, s: s == 503)
    floor = 2 / (1 - r.scenario.fault_rate)
    return (
        f"{r.scenario.name:24} create requests/call {creates:5.2f} (floor {floor:4.2f})  "
        f"lookups/call {lookups:4.2f}  requests/call {total:5.2f} (503s {answered_503:4.2f})  "
        f"{r.calls / r.seconds:6.1f} calls/s  conversations {r.conversations}, notes {r.notes}, "
        f"duplicates {r.duplicates}"
    )


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--numbers", type=int, default=50, help="distinct customers the calls are spread over")
    ap.add_argument("--fault-rate", type=float, default=0.3)
    ap.add_argument("--settle", type=float, default=2.0, help="SINK_RECONCILE_SETTLE_S of the sink")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per scenario at most")
    args = ap.parse_args()
    scenarios = [
        Scenario("baseline (no faults)", 0.0, {}),
        Scenario(f"{args.fault_rate:.0%} 503", args.fault_rate, {}),
        Scenario(f"{args.fault_rate:.0%} 503, as unknown", args.fault_rate, {"SINK_UNPROCESSED_STATUSES": ""}),
    ]
    results = []
    async with kafka() as (bootstrap, _pid):
        print(f"{args.calls} calls over {args.numbers} existing customers per scenario", flush=True)
        for scenario in scenarios:
            results.append(await run(bootstrap, scenario, args))
            print(report(results[-1]), flush=True)
    rows = []
    for r in results:
        creates = r.per_call(lambda m, k, s: m == "POST" and k in ("conversations", "notes"))
        floor = 2 / (1 - r.scenario.fault_rate)
        rows.append(
            Row(
                f"Kustomer create requests per call, {r.scenario.name}",
                f"{creates:.2f}",
                f"{floor:.2f} (floor: 2 / (1 - fault rate))",
                f"{creates / floor:.2f}",
                "one conversation and one note per call",
                r.conversations == r.notes == r.calls and not r.duplicates,
            )
        )
    print_summary("retry efficiency", rows)


if __name__ == "__main__":
    asyncio.run(main())
