"""The integrations file changed while calls flow, with every service running: an added
integration, a bad file, a connected number moved, a rotated Kustomer key — none needs a restart,
and the request logs show nothing lost and nothing written twice."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from devkit.sim.kustomer import ALL_ROLES, KustomerSimSettings, running_kustomer_sim
from pipeline.kafka.reading import read_topic
from tests.e2e.conftest import OTHER_LINE, SECRETS, SUPPORT_LINE, Flow, wait_for
from tests.e2e.test_calls_e2e import idle

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]

SERVICES = ("ingest", "process-calls", "sink-kustomer")


def config_path(flow: Flow) -> Path:
    return Path(flow.stack.base_env["PIPELINE_CONFIG"])


def replace_file(path: Path, text: str) -> None:
    """As a mounted config map or an editor's save does: the new file appears at once."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    tmp.replace(path)


def sales_yaml(url: str, more: str = "") -> str:
    """A second integration, "sales", on its own Kustomer org (key in SALES_K_KEY)."""
    return f"""
  - name: sales
    active: true
    contact_tag: kustomer-sales
    kustomer: {{base_url: "{url}", org_name: acme-sales, api_key: {{env: SALES_K_KEY}}}}
    cloudtalk_webhook_secret: {{env: E2E_HOOK_SECRET}}
{more}"""


def log_count(flow: Flow, service: str, event: str) -> int:
    text = flow.stack.services[service].log_path.read_text(errors="replace")
    return sum(1 for line in text.splitlines() if line.startswith("{") and orjson.loads(line).get("event") == event)


async def all_reloaded(flow: Flow, times: int, services: tuple[str, ...] = SERVICES) -> None:
    await wait_for(
        lambda: all(log_count(flow, s, "config_reloaded") >= times for s in services),
        30,
        f"every service to take the new file ({times})",
    )


def conversations(sim) -> int:
    return sum(1 for e in sim.log.entries if (e.effect or "").startswith("conversation.create"))


def notes(sim) -> int:
    return sum(1 for e in sim.log.entries if (e.effect or "").startswith("note.create"))


@pytest.mark.services(*SERVICES)
@pytest.mark.env(CONFIG_WATCH_INTERVAL_S="1", SALES_K_KEY="sales-key")
async def test_an_added_integration_gets_calls_from_then_on_and_its_backfill_fills_the_hour_before(flow: Flow):
    async with running_kustomer_sim(KustomerSimSettings(webhook_allow_http=True), keys={"sales-key": ALL_ROLES}) as (
        sales_sim,
        sales_url,
    ):
        before = [await flow.end_call() for _ in range(3)]
        await wait_for(lambda: notes(flow.ksim) >= 3, 60, "support's first three calls")
        path = config_path(flow)
        replace_file(
            path,
            path.read_text()
            + sales_yaml(
                sales_url,
                f"""    calls:
      create_customers_for_unknown_numbers: true
      connected_numbers: ["{SUPPORT_LINE}"]
    sms: {{enabled: false}}
""",
            ),
        )
        await all_reloaded(flow, 1)
        after = [await flow.end_call() for _ in range(3)]
        await wait_for(lambda: notes(flow.ksim) >= 6 and notes(sales_sim) >= 3, 60, "both integrations' calls")
        await idle(flow)
        assert (conversations(flow.ksim), conversations(sales_sim)) == (6, 3)
        sales_ids = {c["attributes"]["externalId"] for c in sales_sim.conversations.values()}
        assert sales_ids == {f"cloudtalk-call-{c['call_id']}" for c in after}

        # the hour before, for sales alone: the three calls it missed, once; support sees nothing
        support_writes = len([e for e in flow.ksim.log.entries if e.effect])
        now = datetime.now(UTC)
        code, out, err = await flow.cli(
            *("backfill", "calls", "--integration", "sales"),
            *("--from", (now - timedelta(hours=1)).isoformat(), "--to", (now + timedelta(minutes=1)).isoformat()),
        )
        assert code == 0, err
        assert orjson.loads(out.strip().splitlines()[-1])["published"] == 6
        await wait_for(lambda: notes(sales_sim) >= 6, 60, "the backfill for sales")
        await asyncio.sleep(3)
        await idle(flow)
        assert (conversations(sales_sim), notes(sales_sim)) == (6, 6)
        assert {c["attributes"]["externalId"] for c in sales_sim.conversations.values()} == {
            f"cloudtalk-call-{c['call_id']}" for c in before + after
        }
        assert len([e for e in flow.ksim.log.entries if e.effect]) == support_writes, "support wrote nothing more"
        # the processor decided the backfilled events for sales alone
        audit = [orjson.loads(r.value) for r in await read_topic(flow.bootstrap, flow.topics.audit)]
        backfilled = {c["call_id"] for c in before}
        decided = [
            [d["integration"] for d in a["decisions"]]
            for a in audit
            if a["stage"] == "process-calls"
            and "#" not in a["event_id"]
            and int(a["event_id"].rsplit(":", 1)[1]) in backfilled
        ]
        assert ["sales"] in decided and all(d in (["support"], ["sales"]) for d in decided), decided
        # a name that is not in the file: one line, nothing published
        code, out, err = await flow.cli(
            *("backfill", "calls", "--integration", "nobody"),
            *("--from", (now - timedelta(hours=1)).isoformat(), "--to", now.isoformat()),
        )
        assert code != 0 and len(err.strip().splitlines()) == 1, err
        assert "'nobody'" in err and "support, sales" in err


@pytest.mark.services(*SERVICES)
@pytest.mark.env(CONFIG_WATCH_INTERVAL_S="1")
async def test_a_bad_file_changes_nothing_and_a_moved_number_applies_from_the_next_event(flow: Flow):
    path = config_path(flow)
    good = path.read_text()
    first = [await flow.end_call() for _ in range(2)]
    await wait_for(lambda: notes(flow.ksim) >= 2, 60, "the first calls")
    # a bad file: refused by every service, the calls go on under the running configuration
    replace_file(path, good.replace(f'connected_numbers: ["{SUPPORT_LINE}"]', 'connected_numbers: ["12"]'))
    await wait_for(
        lambda: all(log_count(flow, s, "config_reload_refused") == 1 for s in SERVICES), 30, "the file refused"
    )
    during = [await flow.end_call() for _ in range(2)]
    await wait_for(lambda: notes(flow.ksim) >= 4, 60, "calls under the running configuration")
    # the number moves: calls on the support line are dropped from the next event on, the other line logs
    replace_file(path, good.replace(f'connected_numbers: ["{SUPPORT_LINE}"]', f'connected_numbers: ["{OTHER_LINE}"]'))
    await all_reloaded(flow, 1)
    dropped = [await flow.end_call() for _ in range(2)]
    moved = [await flow.end_call(internal_number=OTHER_LINE) for _ in range(2)]
    await wait_for(lambda: notes(flow.ksim) >= 6, 60, "the other line's calls")
    await asyncio.sleep(2)
    await idle(flow)
    logged = set(flow.conversations_by_external_id())
    assert logged == {f"cloudtalk-call-{c['call_id']}" for c in first + during + moved}
    assert (conversations(flow.ksim), notes(flow.ksim)) == (6, 6)
    audit = [orjson.loads(r.value) for r in await read_topic(flow.bootstrap, flow.topics.audit)]
    rules = {
        int(a["event_id"].rsplit(":", 1)[1]): (a["config"], a["decisions"][0].get("rule"))
        for a in audit
        if a["stage"] == "process-calls" and "#" not in a["event_id"]
    }
    assert {rules[c["call_id"]][1] for c in dropped} == {"number_not_connected"}
    versions = {rules[c["call_id"]][0] for c in first + during}
    assert len(versions) == 1 and rules[moved[0]["call_id"]][0] not in versions, "the audit names the version"
    assert all(log_count(flow, s, "config_reload_refused") == 1 for s in SERVICES), "said once per bad file"


@pytest.mark.services(*SERVICES)
@pytest.mark.env(CONFIG_WATCH_INTERVAL_S="1")
async def test_a_kustomer_key_rotated_on_disk_is_used_without_a_restart(flow: Flow, tmp_path: Path):
    path = config_path(flow)
    key_file = tmp_path / "support-kustomer-key"
    key_file.write_text(SECRETS["E2E_K_KEY"])
    replace_file(path, path.read_text().replace("api_key: {env: E2E_K_KEY}", f"api_key: {{file: {key_file}}}"))
    await all_reloaded(flow, 1)
    await flow.end_call()
    await wait_for(lambda: notes(flow.ksim) >= 1, 60, "a call with the first key")
    # rotation: Kustomer gets a new key and revokes the old one; the file gets the new one
    flow.ksim.add_key("rotated-key", ALL_ROLES)
    del flow.ksim.keys[SECRETS["E2E_K_KEY"]]
    key_file.write_text("rotated-key")
    calls = [await flow.end_call(external_number=f"+42190512345{i}") for i in range(3)]
    await wait_for(lambda: notes(flow.ksim) >= 4, 60, "calls with the rotated key")
    await idle(flow)
    assert (conversations(flow.ksim), notes(flow.ksim)) == (4, 4)
    assert {f"cloudtalk-call-{c['call_id']}" for c in calls} <= set(flow.conversations_by_external_id())
    sink_log = flow.stack.services["sink-kustomer"].log_path.read_text()
    assert "clients_rebuilt" in sink_log and "rotated-key" not in sink_log, "the key itself is never logged"
    assert not re.search(r'"event": "command_dead_lettered"', sink_log)
    dead = await read_topic(flow.bootstrap, flow.topics.deadletter)
    assert dead == [], "no command was dead-lettered"


@pytest.mark.services("poll-customers", "poll-contacts")
@pytest.mark.env(CONFIG_WATCH_INTERVAL_S="1", SALES_K_KEY="sales-key")
async def test_an_added_integration_starts_its_initial_import_and_export_by_itself(flow: Flow):
    async with running_kustomer_sim(KustomerSimSettings(webhook_allow_http=True), keys={"sales-key": ALL_ROLES}) as (
        sales_sim,
        sales_url,
    ):
        for i in range(3):
            await flow._sim(
                "POST",
                f"{sales_url}/_sim/customers",
                {"attributes": {"name": f"Sales customer {i}", "phones": [{"phone": f"+42190555000{i}"}]}},
            )
        for i in range(2):
            await flow.person_creates_contact(
                {"name": f"Contact {i}", "ContactNumber": [{"public_number": f"+42190766600{i}"}]}
            )

        async def raw(topic: str) -> list[dict]:
            return [orjson.loads(r.value) for r in await read_topic(flow.bootstrap, topic)]

        # the running pollers did their first passes for support (the contacts poller's next is far off)
        await wait_for(lambda: log_count(flow, "poll-contacts", "contacts_polled") >= 1, 60, "the first contacts pass")
        before = len(await raw(flow.topics.raw_contacts))
        path = config_path(flow)
        replace_file(
            path,
            path.read_text() + sales_yaml(sales_url),
        )
        await all_reloaded(flow, 1, ("poll-customers", "poll-contacts"))

        async def sales_imported() -> bool:
            events = [e for e in await raw(flow.topics.raw_customers) if e["integration"] == "sales"]
            return len(events) >= 3

        await wait_for(sales_imported, 60, "sales' initial import")
        customers = [e for e in await raw(flow.topics.raw_customers) if e["integration"] == "sales"]
        assert {e["via"] for e in customers} == {"import"} and len(customers) == 3

        async def sales_exported() -> bool:
            return any(
                (e.get("meta") or {}).get("for_integration") == "sales" for e in await raw(flow.topics.raw_contacts)
            )

        await wait_for(sales_exported, 60, "sales' initial export")
        await asyncio.sleep(1)
        stored = await raw(flow.topics.raw_contacts)
        for_sales = [e for e in stored if (e.get("meta") or {}).get("for_integration") == "sales"]
        # every contact once, for sales alone; nothing more for the integrations that had theirs
        assert {e["via"] for e in for_sales} == {"import"}
        assert sorted(e["payload"]["contact_id"] for e in for_sales) == sorted(
            {e["payload"]["contact_id"] for e in stored}
        )
        assert len(stored) - len(for_sales) == before
