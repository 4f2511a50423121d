"""Pollers and backfills: the source APIs paged into the raw topics.

* ``pipeline poll contacts`` — CloudTalk contacts (initial export, reconciliation; see ContactsPoller).
* ``pipeline poll customers`` — Kustomer customers per integration (initial import when an
  integration has no cursor yet, then every ``reconcile_interval_seconds`` by ``updatedAt``).
* ``pipeline poll calls`` — the CloudTalk call history (``GET /calls/index.json`` by date window)
  every ``calls_poll_interval_seconds``, from the cursor minus an overlap to now minus
  ``calls_poll_lag_seconds``. It finds calls whose webhook never arrived; calls already ingested
  get the same event id and are recognised downstream. With each call goes a snapshot of its
  details (``call.modified``), published again whenever the details in the history change; and
  when an integration has ``calls.conversation_intelligence``, the summary, smart notes and
  transcription link of recent answered calls (:meth:`CallHistoryPoller.publish_insights`).
* ``pipeline backfill calls --from T --to T`` — the same for any window, once, with progress.

Cursors live in the compacted ``poller.cursors`` topic (key = poller name), never on local disk.
Pollers leave ``poller_reserve`` requests of CloudTalk's company-wide window to the sink.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import aiohttp
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from pipeline.clients.cloudtalk import CloudTalkClient
from pipeline.clients.http import RateWindow, RetryPolicy
from pipeline.clients.kustomer import kustomer_clients
from pipeline.core.call_details import SOURCE_FIELDS, details_of
from pipeline.core.config import PipelineConfig
from pipeline.core.envelope import Envelope, parse_time, record_key
from pipeline.core.live_config import LiveConfig
from pipeline.core.observability import HealthServer, get_logger, metrics
from pipeline.core.progress import Progress
from pipeline.core.schemas import SchemaError
from pipeline.core.settings import ServiceSettings, env_int
from pipeline.ingest.cloudtalk import cloudtalk_envelope
from pipeline.ingest.kustomer import kustomer_envelope
from pipeline.kafka.clients import (
    connect_backoff_from_env,
    durable_producer,
    start_when_reachable,
    started,
    stop_quietly,
)
from pipeline.kafka.cursors import CursorStore
from pipeline.kafka.service import install_stop_handlers, start_logging, watch_config
from pipeline.kafka.topics import Topics

log = get_logger(__name__)

ACCOUNT = "*"  # envelope integration of account-wide sources


# --------------------------------------------------------------------------------------------
# CDR → canonical call-ended body (pure)
# --------------------------------------------------------------------------------------------


def _int(value: Any) -> int | None:
    if value in (None, ""):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _digits(value: Any) -> int | str | None:
    if value in (None, ""):
        return None
    text = str(value).strip()
    return int(text) if text.isdigit() else text


def cdr_to_call_ended(item: dict[str, Any]) -> dict[str, Any] | None:
    """A call-history record as the canonical call-ended body; None for calls still active."""
    cdr = item.get("Cdr") or {}
    if not cdr.get("ended_at"):
        return None
    contact = item.get("Contact") or {}
    agent = item.get("Agent") or {}
    number = item.get("CallNumber") or {}
    talking = _int(cdr.get("talking_time"))
    answered_at = cdr.get("answered_at") or None
    ratings = item.get("Ratings") or []
    rating = next(
        (_int(r.get("rating")) for r in ratings if r.get("type") == "agent"),
        _int(ratings[0].get("rating")) if ratings else None,
    )
    recorded = bool(cdr.get("recorded"))
    link = cdr.get("recording_link")
    body = {
        "event": "call.ended",
        "call_id": int(cdr["id"]),
        "call_uuid": cdr.get("uuid"),
        "direction": cdr.get("type") or "incoming",
        "status": "answered" if answered_at and (talking or 0) > 0 else "missed",
        "internal_number": _digits(cdr.get("public_internal")) or _digits(number.get("caller_id_e164")),
        "internal_number_name": number.get("internal_name") or None,
        "external_number": _digits(cdr.get("public_external")),
        "contact_id": _int(contact.get("id")),
        "contact_name": contact.get("name") or None,
        "agent_id": _int(agent.get("id") or cdr.get("user_id")),
        "agent_first_name": agent.get("firstname") or None,
        "agent_last_name": agent.get("lastname") or None,
        "agent_email": agent.get("email") or None,
        "started_at": cdr.get("started_at"),
        "answered_at": answered_at,
        "ended_at": cdr["ended_at"],
        "waiting_time": _int(cdr.get("waiting_time")),
        "talking_time": talking,
        "wrapup_time": _int(cdr.get("wrapup_time")),
        "is_voicemail": bool(cdr.get("is_voicemail")),
        "recording_url": link if recorded and isinstance(link, str) and link else None,
        "call_tags": [t["name"] for t in item.get("Tags") or [] if t.get("name")],
        "call_notes": [
            n.get("name") or n.get("note") for n in item.get("Notes") or [] if n.get("name") or n.get("note")
        ],
        "rating": rating,
    }
    return body


def details_snapshot(call_ended: dict[str, Any]) -> dict[str, Any] | None:
    """The call's details as the history shows them now, as a canonical call-modified body; None
    when the record states none (no tags, notes, rating or recording)."""
    details = details_of(call_ended)
    if not any(details.values()):
        return None
    body = {k: call_ended.get(k) for k in ("call_id", "call_uuid", "direction", "internal_number", "external_number")}
    return {"event": "call.modified", **body, **{SOURCE_FIELDS[k]: call_ended.get(SOURCE_FIELDS[k]) for k in details}}


def show_to_contact_event(shown: dict[str, Any], event: str) -> dict[str, Any]:
    """A contact ``show`` ``responseData`` as the canonical contact body (same as the workflow's)."""
    c = shown.get("Contact") or {}
    numbers = [_digits(str(n).lstrip("+")) for n in c.get("contact_numbers") or []]
    return {
        "event": event,
        "contact_id": int(c["id"]),
        "name": c.get("name") or None,
        **{
            k: (c.get(k) or None)
            for k in ("title", "company", "industry", "website", "address", "city", "zip", "state")
        },
        "country_id": _int(c.get("country_id")),
        "favorite_agent": _int(c.get("favorite_agent")),
        "contact_numbers": [n for n in numbers if n is not None],
        "contact_emails": list(c.get("contact_emails") or []),
        "tags": [t.get("name") for t in c.get("tags") or [] if t.get("name")],
        "external_urls": [{"name": u.get("name", ""), "url": u.get("url", "")} for u in shown.get("ExternalUrl") or []],
        "created_at": c.get("created") or None,
        "modified_at": c.get("modified") or c.get("created"),
    }


def index_digest(item: dict[str, Any]) -> str:
    """What the contacts index shows of a contact (name, first number, first e-mail)."""
    c, n, e = item.get("Contact") or {}, item.get("ContactNumber") or {}, item.get("ContactEmail") or {}
    raw = f"{c.get('name')}|{c.get('company')}|{n.get('public_number')}|{e.get('email')}"
    return hashlib.sha1(raw.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# Call history
# --------------------------------------------------------------------------------------------


async def send_event(producer: AIOKafkaProducer, topic: str, env: Envelope) -> asyncio.Future[Any]:
    """Send one event to its raw topic under its record key, counted in ``events_in``; the
    future resolves when the broker acknowledged it."""
    future = await producer.send(
        topic,
        key=record_key(env.id),
        value=env.to_json(),
        headers=[("event_id", env.id.encode()), ("type", env.type.encode())],
    )
    metrics().events_in.labels(env.source, env.type, env.via).inc()
    return future


def _utc(dt: datetime) -> datetime:
    return dt.astimezone(UTC) if dt.tzinfo else dt.replace(tzinfo=UTC)


class Poller(Protocol):
    producer: AIOKafkaProducer

    async def poll_once(self) -> dict[str, Any]:
        """One pass: publish what is new since the cursor, then move the cursor."""


class CallHistoryPoller:
    CURSOR = "cloudtalk.calls"

    def __init__(
        self,
        client: Any,
        producer: AIOKafkaProducer,
        topics: Topics,
        cursors: CursorStore,
        *,
        lag_s: int,
        overlap_s: int = 3600,
        initial_lookback_s: int = 3600,
        insights: bool = False,
        insights_window_s: int = 7200,
        insights_per_pass: int = 10,
        insights_retry_s: float = 60.0,
    ) -> None:
        self.client, self.producer, self.topics, self.cursors = client, producer, topics, cursors
        self.lag_s, self.overlap_s, self.initial_lookback_s = lag_s, overlap_s, initial_lookback_s
        self.insights, self.insights_window_s, self.insights_per_pass = insights, insights_window_s, insights_per_pass
        self.insights_retry_s = insights_retry_s
        self._pages = metrics().poller_pages.labels("calls")

    async def publish_window(
        self,
        date_from: datetime,
        date_to: datetime,
        via: str,
        progress: bool = False,
        skip: dict[int, str | None] | None = None,
        published: list[tuple[int, str, str | None]] | None = None,
        finished: list[dict[str, Any]] | None = None,
        for_integration: str | None = None,
    ) -> dict[str, int]:
        """Every finished call started in [date_from, date_to] into the raw calls topic, and with
        it a snapshot of its details (a ``call.modified`` event, when the record has any), except
        what ``skip`` (call id → details event id last published) says was published already:
        a call seen before whose details changed gets only a new snapshot. ``published``
        collects (call id, started_at, details event id) of what was sent, ``finished`` the
        call-ended body of every finished call of the window. ``for_integration``: the events are
        for that integration alone (a backfill for a newly added integration)."""
        counts = {
            "pages": 0,
            "calls": 0,
            "published": 0,  # calls
            "details": 0,  # snapshots of their details
            "details_changed": 0,  # of calls seen before
            "active": 0,
            "invalid": 0,
            "seen_before": 0,
        }
        shown = (
            Progress(f"{via} calls", unit="pages", items_unit="calls published", rate_unit="calls")
            if progress
            else None
        )
        async for page in self.client.iter_calls(
            date_from=_utc(date_from).replace(tzinfo=None), date_to=_utc(date_to).replace(tzinfo=None)
        ):
            counts["pages"] += 1
            self._pages.inc()
            futures = []
            for item in page.get("data") or []:
                counts["calls"] += 1
                body = cdr_to_call_ended(item)
                if body is None:
                    counts["active"] += 1
                    continue
                if finished is not None:
                    finished.append(body)
                snapshot = details_snapshot(body)
                seen = skip is not None and body["call_id"] in skip
                try:
                    envs: list[Envelope] = [] if seen else [cloudtalk_envelope(body, ACCOUNT, via)]
                    details = cloudtalk_envelope(snapshot, ACCOUNT, via) if snapshot else None
                except SchemaError as exc:
                    counts["invalid"] += 1
                    log.warning("call_record_invalid", call_id=body.get("call_id"), error=str(exc))
                    continue
                details_id = details.id if details else None
                if seen:
                    counts["seen_before"] += 1
                    if details is None or (skip or {}).get(body["call_id"]) == details_id:
                        continue
                    counts["details_changed"] += 1
                if details is not None:
                    envs.append(details)
                if for_integration:
                    envs = [replace(e, meta={"for_integration": for_integration}) for e in envs]
                for env in envs:
                    futures.append(await send_event(self.producer, self.topics.raw_calls, env))
                counts["published"] += 0 if seen else 1
                counts["details"] += 1 if details is not None else 0
                if published is not None:
                    published.append((body["call_id"], body["started_at"], details_id))
            await asyncio.gather(*futures)
            if shown is not None:
                pages = page.get("pageCount")
                shown.update(
                    counts["pages"], total=pages if isinstance(pages, int) else None, items=counts["published"]
                )
        if shown is not None:
            shown.close()
        return counts

    async def poll_once(self, now: datetime | None = None) -> dict[str, Any]:
        now = _utc(now or datetime.now(UTC))
        cursor = await self.cursors.read(self.CURSOR)
        if cursor and cursor.get("date_to"):
            date_from = parse_time(cursor["date_to"]) - timedelta(seconds=self.overlap_s)
        else:
            date_from = now - timedelta(seconds=self.initial_lookback_s)
        date_to = now - timedelta(seconds=self.lag_s)
        if date_to <= date_from:
            return {"skipped": "window empty"}
        # calls of the overlap this poller already published are not published again, unless
        # their details changed: call id -> [started_at, details event id] (a cursor written
        # before details were followed holds started_at alone)
        recent: dict[int, tuple[str, str | None]] = {}
        for c, v in ((cursor or {}).get("recent") or {}).items():
            recent[int(c)] = (v, None) if isinstance(v, str) else (v[0], v[1])
        sent: list[tuple[int, str, str | None]] = []
        finished: list[dict[str, Any]] = []
        counts: dict[str, Any] = await self.publish_window(
            date_from,
            date_to,
            "poller",
            skip={c: d for c, (_, d) in recent.items()},
            published=sent,
            finished=finished,
        )
        recent.update({c: (t, d) for c, t, d in sent})
        keep_after = date_to - timedelta(seconds=self.overlap_s)
        recent = {c: v for c, v in recent.items() if parse_time(v[0]) >= keep_after}
        insights = dict((cursor or {}).get("insights") or {})
        if self.insights:
            counts.update(await self.publish_insights(finished, insights, now))
        await self.cursors.write(
            self.producer,
            self.CURSOR,
            {
                "date_to": date_to.isoformat(),
                "polled_at": now.isoformat(),
                "recent": {str(c): list(v) for c, v in recent.items()},
                "insights": insights,
                **counts,
            },
        )
        log.info("calls_polled", date_from=date_from.isoformat(), date_to=date_to.isoformat(), **counts)
        return {"date_from": date_from.isoformat(), "date_to": date_to.isoformat(), **counts}

    async def publish_insights(
        self, finished: list[dict[str, Any]], state: dict[str, Any], now: datetime
    ) -> dict[str, int]:
        """Conversation intelligence of answered calls that ended within ``insights_window_s``:
        at most ``insights_per_pass`` calls asked per pass (one request while CloudTalk has
        nothing yet, three once it has), each published once as a ``call.modified`` body. A call
        without it yet is asked again after 1, 2, 4 … times ``insights_retry_s`` (at most 30
        times) until the window has passed. ``state`` (in the cursor): call id → ``{"ended_at",
        "attempts", "next_at", "done"}``."""
        counts = {"insights_published": 0, "insights_not_yet": 0}
        oldest = now - timedelta(seconds=self.insights_window_s)
        for body in finished:
            if body.get("status") != "answered" or body.get("direction") == "internal":
                continue
            key = str(body["call_id"])
            if key not in state and parse_time(body["ended_at"]) >= oldest:
                state[key] = {"ended_at": body["ended_at"], "attempts": 0, "next_at": None, "done": False}
        due = [
            (key, entry)
            for key, entry in state.items()
            if not entry["done"] and (entry["next_at"] is None or parse_time(entry["next_at"]) <= now)
        ]
        bodies = {str(b["call_id"]): b for b in finished}
        for key, entry in due[: self.insights_per_pass]:
            call = bodies.get(key)
            if call is None:  # out of this pass's window: asked again when it is in one
                continue
            found = await self.client.call_insights(key)
            entry["attempts"] += 1
            if found is None:
                wait_s = min(self.insights_retry_s * 2 ** (entry["attempts"] - 1), 30 * self.insights_retry_s)
                entry["next_at"] = (now + timedelta(seconds=wait_s)).isoformat()
                counts["insights_not_yet"] += 1
                continue
            snapshot = {
                "event": "call.modified",
                **{k: call.get(k) for k in ("call_id", "call_uuid", "direction", "internal_number", "external_number")},
                **found,
            }
            env = cloudtalk_envelope(snapshot, ACCOUNT, "poller")
            await (await send_event(self.producer, self.topics.raw_calls, env))
            entry["done"] = True
            counts["insights_published"] += 1
        for key in [k for k, e in state.items() if parse_time(e["ended_at"]) < oldest]:
            del state[key]  # done, or given up: the window has passed
        return counts


class ContactsPoller:
    """CloudTalk contacts (index + show) for the initial export and the reconciliation.

    The index shows only a contact's name, company, first number and first e-mail and has no
    modified filter, so the cursor keeps a digest of that summary per contact and only changed or
    new contacts are fetched (``show``). Other edits reach the pipeline through the contact
    workflow. The first pass publishes every contact (``via: import``).
    """

    CURSOR = "cloudtalk.contacts"

    def __init__(
        self,
        client: Any,
        producer: AIOKafkaProducer,
        topics: Topics,
        cursors: CursorStore,
        initial_for: tuple[str, ...] = (),
    ) -> None:
        """``initial_for``: integrations added since the service started, whose initial export
        the next pass makes: every contact once more, for them alone (``meta.for_integration``)."""
        self.client, self.producer, self.topics, self.cursors = client, producer, topics, cursors
        self.initial_for = initial_for
        self._pages = metrics().poller_pages.labels("contacts")

    async def poll_once(self) -> dict[str, Any]:
        cursor = await self.cursors.read(self.CURSOR)
        for_integrations = self.initial_for
        seen: dict[str, str] = {} if for_integrations else (cursor or {}).get("seen") or {}
        via = "poller" if cursor and not for_integrations else "import"
        counts = {"pages": 0, "contacts": 0, "published": 0, "unchanged": 0}
        fresh: dict[str, str] = {}
        async for page in self.client.iter_contacts(limit=1000):
            counts["pages"] += 1
            self._pages.inc()
            futures = []
            for item in page.get("data") or []:
                counts["contacts"] += 1
                cid = str(item["Contact"]["id"])
                digest = fresh[cid] = index_digest(item)
                if seen.get(cid) == digest:
                    counts["unchanged"] += 1
                    continue
                shown = await self.client.get_contact(cid)
                if shown is None:
                    fresh.pop(cid, None)
                    continue
                body = show_to_contact_event(shown, "contact.updated" if cid in seen else "contact.created")
                try:
                    env = cloudtalk_envelope(body, ACCOUNT, via)
                except SchemaError as exc:
                    log.warning("contact_record_invalid", contact_id=cid, error=str(exc))
                    continue
                targets = [replace(env, meta={"for_integration": n}) for n in for_integrations] or [env]
                for e in targets:
                    futures.append(await send_event(self.producer, self.topics.raw_contacts, e))
            await asyncio.gather(*futures)
            counts["published"] += len(futures)
        if for_integrations:  # the others' digests are the cursor's, kept as they were
            fresh = {**((cursor or {}).get("seen") or {}), **fresh} if cursor else fresh
            self.initial_for = ()
        await self.cursors.write(
            self.producer, self.CURSOR, {"seen": fresh, "polled_at": datetime.now(UTC).isoformat(), **counts}
        )
        log.info("contacts_polled", via=via, initial_export_for=list(for_integrations), **counts)
        return counts


class CustomersPoller:
    """Kustomer customers by ``updatedAt`` cursor: the initial full import of an integration
    (no cursor yet: every customer, ``via: import``) and the periodic reconciliation.
    Each customer version becomes the same event (and id) its webhook would have produced."""

    def __init__(
        self,
        integration: str,
        client: Any,
        producer: AIOKafkaProducer,
        topics: Topics,
        cursors: CursorStore,
        overlap_s: int = 300,
    ) -> None:
        self.integration, self.client, self.producer = integration, client, producer
        self.topics, self.cursors, self.overlap_s = topics, cursors, overlap_s
        self.cursor_name = f"kustomer.customers.{integration}"
        self._pages = metrics().poller_pages.labels("customers")

    async def poll_once(self) -> dict[str, Any]:

        cursor = await self.cursors.read(self.cursor_name)
        since = None
        if cursor and cursor.get("updated_since"):
            since = (parse_time(cursor["updated_since"]) - timedelta(seconds=self.overlap_s)).isoformat()
        via = "poller" if cursor else "import"
        counts = {"pages": 0, "customers": 0, "published": 0}
        newest = cursor.get("updated_since") if cursor else None
        async for page in self.client.iter_customers(updated_since=since, sort="updatedAt"):
            counts["pages"] += 1
            self._pages.inc()
            futures = []
            for customer in page:
                counts["customers"] += 1
                attrs = customer.get("attributes") or {}
                updated = attrs.get("updatedAt") or attrs.get("createdAt")
                event = {
                    "id": f"poll:{customer['id']}:{attrs.get('rev', updated)}",
                    "name": "kustomer.customer.update",
                    "createdAt": updated,
                    "client": "poller",
                    "dataId": customer["id"],
                    "data": customer,
                }
                try:
                    env = kustomer_envelope(event, self.integration, via)
                except SchemaError as exc:
                    log.warning("customer_record_invalid", customer_id=customer.get("id"), error=str(exc))
                    continue
                futures.append(await send_event(self.producer, self.topics.raw_customers, env))
                if updated and (newest is None or updated > newest):
                    newest = updated
            await asyncio.gather(*futures)
            counts["published"] += len(futures)
        await self.cursors.write(
            self.producer,
            self.cursor_name,
            {"updated_since": newest, "polled_at": datetime.now(UTC).isoformat(), **counts},
        )
        log.info("customers_polled", integration=self.integration, via=via, **counts)
        return counts


def cloudtalk_poller_client(session: aiohttp.ClientSession, config: PipelineConfig) -> Any:

    ct = config.cloudtalk
    window = RateWindow(reserve=ct.poller_reserve, fallback_per_minute=ct.rate_limit_per_minute)
    return CloudTalkClient.from_credentials(
        session,
        ct.base_url,
        ct.key_id.value(),
        ct.key_secret.value(),
        window=window,
        policy=RetryPolicy(deadline_s=300.0),
    )


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("poll", help="run a poller: calls | contacts (CloudTalk) | customers (Kustomer)")
    p.add_argument("source", choices=["calls", "contacts", "customers"])
    p.add_argument("--config", help="integrations file (env PIPELINE_CONFIG)")
    p.add_argument("--once", action="store_true", help="poll once and exit")
    p.set_defaults(func=run_poll)


def run_poll(args: argparse.Namespace) -> int:
    settings = ServiceSettings.from_env()
    start_logging(f"poll-{args.source}", settings)
    reads = PipelineConfig.kustomer_keys if args.source == "customers" else PipelineConfig.cloudtalk_keys
    live = LiveConfig(args.config or settings.config_path, reads=reads)
    config = live.current
    topics = Topics(settings.kafka.topic_prefix)
    env = os.environ
    cursors = CursorStore(settings.kafka.bootstrap, topics.cursors)

    def interval_of(config: PipelineConfig) -> float:
        return {
            "calls": config.cloudtalk.calls_poll_interval_seconds,
            "contacts": config.cloudtalk.contacts_poll_interval_seconds,
            "customers": min((i.contacts.reconcile_interval_seconds for i in config.active), default=900),
        }[args.source]

    pace = {"interval": interval_of(config)}  # seconds between passes (the file may change it)

    backoff_max_s = connect_backoff_from_env()

    async def main() -> None:
        last_ok = {"at": 0.0}
        connected = {"broker": False}

        async def ready() -> tuple[bool, dict[str, Any]]:
            if not connected["broker"]:
                return False, {"broker": "unreachable"}
            age = time.monotonic() - last_ok["at"]
            return age < pace["interval"] * 3 + 60, {"last_poll_age_s": round(age, 1)}

        health = HealthServer(settings.metrics_host, settings.metrics_port, ready)
        await health.start()
        stop = asyncio.Event()
        install_stop_handlers(stop.set)

        async def connect() -> AIOKafkaProducer | None:
            """A started producer; a broker that cannot be reached is waited for (not ready
            meanwhile); None when a stop came first."""
            connected["broker"] = False
            producer = await start_when_reachable(
                lambda: started(
                    durable_producer(settings.kafka.bootstrap, f"{settings.kafka.client_id}-poll-{args.source}")
                ),
                bootstrap=settings.kafka.bootstrap,
                what=f"poll {args.source}",
                stopping=stop,
                backoff_max_s=backoff_max_s,
            )
            connected["broker"] = producer is not None
            return producer

        producer = await connect()
        if producer is None:
            await health.stop()
            return
        if args.source != "calls":  # a first pass (an initial import) may take long: ready from here
            last_ok["at"] = time.monotonic()
        async with aiohttp.ClientSession() as session:

            def build(config: PipelineConfig, added: tuple[str, ...] = ()) -> list[Poller]:
                """The pollers of ``config``; ``added``: integrations new since the start."""
                if args.source == "calls":
                    return [
                        CallHistoryPoller(
                            cloudtalk_poller_client(session, config),
                            producer,
                            topics,
                            cursors,
                            lag_s=config.cloudtalk.calls_poll_lag_seconds,
                            overlap_s=env_int(env, "CALLS_POLL_OVERLAP_S", 3600, minimum=0),
                            initial_lookback_s=env_int(env, "CALLS_POLL_INITIAL_LOOKBACK_S", 3600, minimum=0),
                            insights=any(i.calls.conversation_intelligence for i in config.active),
                            insights_window_s=env_int(env, "CALLS_INSIGHTS_WINDOW_S", 7200, minimum=60),
                            insights_per_pass=env_int(env, "CALLS_INSIGHTS_PER_PASS", 10, minimum=1),
                            insights_retry_s=env_int(env, "CALLS_INSIGHTS_RETRY_S", 60, minimum=1),
                        )
                    ]
                if args.source == "contacts":
                    exporting = tuple(
                        n for n in added if (i := config.get(n)) and i.active and i.contacts.export_enabled
                    )
                    return [
                        ContactsPoller(
                            cloudtalk_poller_client(session, config), producer, topics, cursors, initial_for=exporting
                        )
                    ]
                clients = kustomer_clients(session, config, RetryPolicy(deadline_s=300.0))
                # an integration without a cursor yet (a new one too) starts with its initial import
                return [
                    CustomersPoller(
                        i.name,
                        clients[i.name],
                        producer,
                        topics,
                        cursors,
                        overlap_s=env_int(env, "CUSTOMERS_POLL_OVERLAP_S", 300, minimum=0),
                    )
                    for i in config.active
                    if i.contacts.import_enabled
                ]

            pollers = build(live.current)
            changes: list[tuple[PipelineConfig, PipelineConfig]] = []
            changed = asyncio.Event()

            def on_change(old: PipelineConfig, new: PipelineConfig) -> None:
                changes.append((old, new))
                changed.set()  # the wait between passes ends: a new integration starts now

            live.on_change(on_change)
            watching = watch_config(live, stop)
            try:
                while not stop.is_set():
                    if changes:  # a changed integrations file: new pollers, at a pass boundary
                        first, latest = changes[0][0], changes[-1][1]
                        changes.clear()
                        added = tuple(
                            sorted({i.name for i in latest.integrations} - {i.name for i in first.integrations})
                        )
                        pollers = build(latest, added)
                        pace["interval"] = interval_of(latest)
                        log.info("pollers_rebuilt", source=args.source, pollers=len(pollers), added=list(added))
                    for poller in pollers:
                        # a stop interrupts a pass (e.g. one retrying an unreachable API): its cursor
                        # is written only at the end of a pass, so the next start repeats it — the
                        # events it publishes again carry the same ids and are recognised downstream
                        poll = asyncio.ensure_future(poller.poll_once())
                        stopping = asyncio.ensure_future(stop.wait())
                        await asyncio.wait({poll, stopping}, return_when=asyncio.FIRST_COMPLETED)
                        stopping.cancel()
                        if not poll.done():
                            poll.cancel()
                            await asyncio.gather(poll, return_exceptions=True)
                            log.info("poll_interrupted", source=args.source)
                            break
                        try:
                            poll.result()
                            last_ok["at"] = time.monotonic()
                        except KafkaError as exc:
                            log.error("poll_failed", source=args.source, error=f"{type(exc).__name__}: {exc}")
                            # After a broker outage an idempotent producer can stay unusable (its
                            # sequence numbers no longer match the broker's: OutOfOrderSequenceNumber
                            # on every send): a fresh one, once the broker answers again.
                            await stop_quietly(producer)
                            fresh = await connect()
                            if fresh is None:
                                break
                            producer = fresh
                            for p in pollers:
                                p.producer = producer
                        except Exception as exc:  # noqa: BLE001 - the next poll tries again
                            log.error("poll_failed", source=args.source, error=f"{type(exc).__name__}: {exc}")
                    if args.once or stop.is_set():
                        break
                    changed.clear()
                    waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(changed.wait())}
                    _, pending = await asyncio.wait(
                        waits, timeout=pace["interval"], return_when=asyncio.FIRST_COMPLETED
                    )
                    for w in pending:
                        w.cancel()
            finally:
                stop.set()
                await watching
                await stop_quietly(producer)
                await health.stop()

    asyncio.run(main())
    return 0
