"""The sinks as services: ``pipeline sink kustomer`` and ``pipeline sink cloudtalk``.

Each consumes its command topic in a consumer group (replicas share partitions), keeps its
ledger partitions, and performs the effects through the typed API clients. Requests to one
Kustomer org share one rate window (integrations on the same org share its budget).

The two sinks are separate processes: CloudTalk's company-wide budget and the Kustomer orgs'
budgets never hold each other's commands. Inside a sink, a batch waits on a target for at most
``SINK_BATCH_BUDGET_S``; what would wait longer is parked (see :mod:`pipeline.sink.base`) and a
:class:`~pipeline.sink.wake.Waker` brings its partition back when it is due. The CloudTalk sink
keeps the company's contacts index (:mod:`pipeline.sink.contact_index`; loaded with its first
command, ``CLOUDTALK_INDEX_REFRESH_S``, ``CLOUDTALK_INDEX_TAIL_S``) and writes bulk work (an import,
a reconciliation) through CloudTalk's bulk endpoint, ``CLOUDTALK_BULK_MAX`` contacts per request
(1: one request per contact), counting a bulk request as one operation per contact against the
company's window unless ``CLOUDTALK_BULK_COUNTS_PER_ITEM=off``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Awaitable, Callable

import aiohttp

from pipeline.clients.cloudtalk import BULK_MAX
from pipeline.clients.http import RateWindow, retry_policy_from_env, settle_from_env
from pipeline.clients.kustomer import KustomerClients
from pipeline.core.config import PipelineConfig, Secret
from pipeline.core.live_config import LiveConfig
from pipeline.core.observability import get_logger
from pipeline.core.settings import ServiceSettings, env_float, env_int, env_switch
from pipeline.kafka.loop import LoopSettings, TransactionalLoop
from pipeline.kafka.service import run_loop_service, start_logging
from pipeline.kafka.topics import Topics
from pipeline.sink.base import SinkStage
from pipeline.sink.cloudtalk import CloudTalkEffects, cloudtalk_sink_client
from pipeline.sink.contact_index import ContactIndexStore
from pipeline.sink.kustomer import KustomerEffects
from pipeline.sink.ledger import Ledger
from pipeline.sink.wake import Waker

log = get_logger(__name__)


def batch_budget_from_env() -> float:
    """``SINK_BATCH_BUDGET_S``: the longest a batch waits on a target before parking what waits."""
    return env_float(os.environ, "SINK_BATCH_BUDGET_S", 0.5, minimum=0.0)


async def build_kustomer_stage(
    session: aiohttp.ClientSession, live: LiveConfig, settings: ServiceSettings, topics: Topics
) -> SinkStage:
    settle_s = settle_from_env()
    clients = KustomerClients(session, retry_policy_from_env(), live.current)
    live.on_change(lambda _old, new: _rebuilt(clients.update(new)))
    effects = KustomerEffects(
        clients.clients,
        per_customer_per_minute=env_int(os.environ, "KUSTOMER_PER_CUSTOMER_PER_MINUTE", 120, minimum=1),
        settle_s=settle_s,
        reread_secrets=live.reload,
        customer_recheck_s=env_float(os.environ, "KUSTOMER_CUSTOMER_RECHECK_S", 86_400.0, minimum=0.0),
    )
    return SinkStage(
        "sink-kustomer",
        effects,
        Ledger(settings.kafka.bootstrap, topics.kustomer_ledger),
        topics.audit,
        concurrency=env_int(os.environ, "SINK_CONCURRENCY", 16, minimum=1),
        settle_s=settle_s,
        budget_s=batch_budget_from_env(),
        waker=Waker(settings.kafka.bootstrap, f"{settings.kafka.client_id}-sink-kustomer"),
    )


async def build_cloudtalk_stage(
    session: aiohttp.ClientSession, live: LiveConfig, settings: ServiceSettings, topics: Topics
) -> SinkStage:
    settle_s = settle_from_env()
    policy = retry_policy_from_env()
    clients = KustomerClients(session, policy, live.current)
    window = RateWindow(reserve=0, fallback_per_minute=live.current.cloudtalk.rate_limit_per_minute)
    index = (
        None
        if not env_switch(os.environ, "CLOUDTALK_INDEX", True)
        else ContactIndexStore(
            settings.kafka.bootstrap,
            topics.contacts_index,
            topics.raw_contacts,
            client_id=f"{settings.kafka.client_id}-sink-cloudtalk",
            refresh_s=env_float(os.environ, "CLOUDTALK_INDEX_REFRESH_S", 86_400.0, minimum=0.0),
            tail_s=env_float(os.environ, "CLOUDTALK_INDEX_TAIL_S", 30.0, minimum=0.0),
        )
    )
    effects = CloudTalkEffects(
        cloudtalk_sink_client(session, live.current, policy, window),
        clients.clients,
        settle_s=settle_s,
        index=index,
        live_reserve=env_int(os.environ, "CLOUDTALK_LIVE_RESERVE", 10, minimum=0),
        bulk_max=env_int(os.environ, "CLOUDTALK_BULK_MAX", BULK_MAX, minimum=1, maximum=BULK_MAX),
        bulk_counts_per_item=env_switch(os.environ, "CLOUDTALK_BULK_COUNTS_PER_ITEM", True),
        complete_max=env_int(os.environ, "CLOUDTALK_INDEX_COMPLETE", 1000, minimum=0),
    )

    def changed(_old: PipelineConfig, new: PipelineConfig) -> None:
        for name in _rebuilt(clients.update(new)):
            effects.forget(name)  # its API user may have changed with its key
        effects.ct = cloudtalk_sink_client(session, new, policy, window)  # the company's key, maybe rotated

    live.on_change(changed)
    return SinkStage(
        "sink-cloudtalk",
        effects,
        Ledger(settings.kafka.bootstrap, topics.cloudtalk_ledger),
        topics.audit,
        concurrency=1,
        settle_s=settle_s,
        budget_s=batch_budget_from_env(),
        waker=Waker(settings.kafka.bootstrap, f"{settings.kafka.client_id}-sink-cloudtalk"),
    )


# what each sink reads (and mounts): the Kustomer keys; the CloudTalk sink the company's key too
SECRETS_READ: dict[str, Callable[[PipelineConfig], list[Secret]]] = {
    "kustomer": PipelineConfig.kustomer_keys,
    "cloudtalk": lambda c: [*c.cloudtalk_keys(), *c.kustomer_keys()],
}


def _rebuilt(names: list[str]) -> list[str]:
    if names:
        log.info("clients_rebuilt", integrations=names)
    return names


SINKS: dict[str, tuple[str, Callable[..., Awaitable[SinkStage]]]] = {
    "kustomer": ("kustomer_commands", build_kustomer_stage),
    "cloudtalk": ("cloudtalk_commands", build_cloudtalk_stage),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sink", help="run a sink: kustomer | cloudtalk")
    p.add_argument("target", choices=sorted(SINKS))
    p.add_argument("--config", help="integrations file (env PIPELINE_CONFIG)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = ServiceSettings.from_env()
    start_logging(f"sink-{args.target}", settings)
    live = LiveConfig(args.config or settings.config_path, reads=SECRETS_READ[args.target])
    topics = Topics(settings.kafka.topic_prefix)
    input_attr, build = SINKS[args.target]
    env = os.environ

    async def main() -> None:
        session = aiohttp.ClientSession()
        stage: SinkStage | None = None
        try:
            stage = await build(session, live, settings, topics)
            max_batch = env_int(env, "SINK_MAX_BATCH", 200, minimum=1)
            loop = TransactionalLoop(
                LoopSettings.of(
                    settings.kafka,
                    group_id=f"{settings.kafka.topic_prefix}sink-{args.target}",
                    input_topics=(getattr(topics, input_attr),),
                    deadletter_topic=topics.deadletter,
                    max_batch=max_batch,
                    commit_max_records=max_batch,  # a sink's batch is bounded by its effects' time
                    max_poll_interval_ms=env_int(env, "SINK_MAX_POLL_INTERVAL_MS", 900_000, minimum=10_000),
                    session_timeout_ms=env_int(env, "KAFKA_SESSION_TIMEOUT_MS", 10_000, minimum=1000),
                ),
                stage,
            )
            await run_loop_service(f"sink-{args.target}", loop, settings, live=live)
        finally:
            if stage is not None and stage.waker is not None:
                await stage.waker.close()
            index = getattr(stage.effects, "index", None) if stage is not None else None
            if isinstance(index, ContactIndexStore):
                await index.close()
            await session.close()

    asyncio.run(main())
    return 0
