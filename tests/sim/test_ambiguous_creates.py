"""Creates whose outcome is unknown are never repeated blindly (no idempotency keys exist)."""

from __future__ import annotations

import aiohttp
import pytest

from devkit.sim.kustomer import ALL_ROLES, KustomerSimSettings, running_kustomer_sim
from pipeline.clients.http import AmbiguousOutcomeError, RetryPolicy, create_or_find
from pipeline.clients.kustomer import KustomerClient


async def test_a_timed_out_create_that_the_target_finished_is_found_not_repeated():
    async with (
        running_kustomer_sim(KustomerSimSettings(), keys={"k": ALL_ROLES}) as (sim, url),
        aiohttp.ClientSession() as http,
    ):
        client = KustomerClient.from_credentials(http, url, "k", policy=RetryPolicy(timeout_s=0.5, initial_s=0.01))
        customer = await client.create_customer({"name": "Jana", "phones": [{"phone": "+421905123456"}]})
        conv = await client.create_conversation({"customer": customer["id"]})
        # the target holds the note 1.5 s, then stores it; the client gives up after 0.5 s
        sim.faults.add(match="POST /v1/notes", kind="latency", latency_ms=1500, times=1)
        with pytest.raises(AmbiguousOutcomeError):
            await client.create_note(conv["id"], "CloudTalk call 1")

        async def find():
            async for page in client.iter_conversation_notes(conv["id"]):
                for note in page:
                    if note["attributes"]["body"].startswith("CloudTalk call 1"):
                        return note
            return None

        sim.faults.add(match="POST /v1/notes", kind="latency", latency_ms=1500, times=1)
        note, found = await create_or_find(
            lambda: client.create_note(conv["id"], "CloudTalk call 1"), find, settle_s=2.0
        )
        assert found is True and note["attributes"]["body"] == "CloudTalk call 1"
        assert len(sim.notes) == 2, "the first, abandoned request also landed: that is why nothing is repeated blindly"
        posts = [e for e in sim.log.entries if e.method == "POST" and e.path == "/v1/notes"]
        assert len(posts) == 2, "one request per create_or_find/create call, no blind retry"


async def test_creates_are_retried_when_they_never_reached_the_target():
    # a 429 announces the window's reset: a short window keeps the wait short
    async with (
        running_kustomer_sim(KustomerSimSettings(window_seconds=1.0), keys={"k": ALL_ROLES}) as (sim, url),
        aiohttp.ClientSession() as http,
    ):
        client = KustomerClient.from_credentials(http, url, "k", policy=RetryPolicy(initial_s=0.01, max_backoff_s=0.05))
        sim.faults.add(match="POST /v1/customers", kind="status", status=429, times=2)
        created = await client.create_customer({"name": "Jana", "phones": [{"phone": "+421905123456"}]})
        assert created["id"] in sim.customers and len(sim.customers) == 1
        dead = KustomerClient.from_credentials(
            http, "http://127.0.0.1:9", "k", policy=RetryPolicy(initial_s=0.01, max_backoff_s=0.02, max_attempts=3)
        )
        from pipeline.clients.http import RetryExhaustedError

        with pytest.raises(RetryExhaustedError):  # connection refused: never sent, so retried, not ambiguous
            await dead.create_customer({"name": "x"})


async def test_cloudtalk_429_waits_for_the_announced_reset_and_spends_no_retry_budget():
    """The company budget is shared (a poller spent it): the sink's write gets a 429, waits until
    X-CloudTalkAPI-ResetTime and then succeeds once — with a policy that allows a single attempt."""
    import time

    from devkit.sim.cloudtalk import CloudTalkSimSettings, running_cloudtalk_sim
    from pipeline.clients.cloudtalk import CloudTalkClient

    settings = CloudTalkSimSettings(key_id="id", key_secret="secret", rate_limit=3, window_seconds=2.0)
    async with running_cloudtalk_sim(settings) as (sim, api), aiohttp.ClientSession() as http:
        poller = CloudTalkClient.from_credentials(http, api, "id", "secret")
        sink = CloudTalkClient.from_credentials(
            http, api, "id", "secret", policy=RetryPolicy(max_attempts=1, initial_s=0.01)
        )
        for _ in range(3):
            await poller.list_contacts(limit=1)
        started = time.monotonic()
        contact_id = await sink.add_contact({"name": "Jana", "ContactNumber": [{"public_number": "+421905123456"}]})
        waited = time.monotonic() - started
        statuses = [e.status for e in sim.log.entries if e.path == "/api/contacts/add.json"]
        assert statuses == [429, 201], statuses
        assert sink.executor.rate_limited == 1
        assert 0.2 < waited < 5.0, waited
        assert (await poller.get_contact(contact_id))["Contact"]["name"] == "Jana"
