"""`pipeline topics ensure` against the real broker: creates, is idempotent, reports drift."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.kafka.clients import new_admin
from pipeline.kafka.topics import CATALOGUE, Topics, ensure_topics
from tests.conftest import REPO, KafkaIO, pipeline_env

pytestmark = pytest.mark.kafka


def _ensure_cli(bootstrap: str, prefix: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "topics", "ensure"],
        cwd=REPO,
        env=pipeline_env(bootstrap, prefix),
        capture_output=True,
        text=True,
        timeout=60,
    )


async def _describe(bootstrap: str, names: list[str]) -> dict[str, int]:
    admin = new_admin(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(names)}
    finally:
        await admin.close()


async def test_ensure_twice_changes_nothing_the_second_time(kafka_bootstrap: str, topic_prefix: str):
    first = _ensure_cli(kafka_bootstrap, topic_prefix)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"{len(CATALOGUE)} created, 0 unchanged, 0 differ" in first.stdout
    names = [s.name for s in Topics(topic_prefix).specs()]
    before = await _describe(kafka_bootstrap, names)
    assert before == {s.name: s.partitions for s in Topics(topic_prefix).specs()}

    second = _ensure_cli(kafka_bootstrap, topic_prefix)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"0 created, {len(CATALOGUE)} unchanged, 0 differ" in second.stdout
    assert await _describe(kafka_bootstrap, names) == before


async def test_ensure_reports_a_topic_whose_settings_differ(kafka: KafkaIO, topic_prefix: str):
    topics = Topics(topic_prefix)
    # someone created the ledger by hand: wrong partition count and not compacted
    await kafka.create_topic(topics.kustomer_ledger, partitions=2, config={"cleanup.policy": "delete"})
    report = await ensure_topics(kafka.bootstrap, topics.specs())
    assert topics.kustomer_ledger in report.differs
    problems = " ".join(report.differs[topics.kustomer_ledger])
    assert "partitions 2 (catalogue 6)" in problems
    assert "cleanup.policy=delete (catalogue compact)" in problems
    assert "co-partitioned" in problems
    assert topics.kustomer_ledger not in report.created
    # the CLI says so and exits non-zero; it never alters the topic
    result = _ensure_cli(kafka.bootstrap, topic_prefix)
    assert result.returncode == 1
    assert f"DIFFERS    {topics.kustomer_ledger}" in result.stdout
    assert (await _describe(kafka.bootstrap, [topics.kustomer_ledger]))[topics.kustomer_ledger] == 2
