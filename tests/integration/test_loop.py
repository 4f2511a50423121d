"""The transactional loop on the real broker: copies, rejects, kill -9, rebalances, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from pipeline.kafka.loop import LoopSettings, TransactionalLoop, TransformStage
from pipeline.kafka.records import DLQ_HEADERS
from pipeline.ops.copy import copy_transform
from tests.conftest import REPO, KafkaIO, pipeline_env

pytestmark = pytest.mark.kafka


def _settings(bootstrap: str, group: str, src: str, dlq: str, **kw) -> LoopSettings:
    return LoopSettings(
        bootstrap=bootstrap, group_id=group, input_topics=(src,), deadletter_topic=dlq, poll_timeout_ms=100, **kw
    )


async def _run_until(loop: TransactionalLoop, condition, timeout: float = 60.0) -> None:
    await loop.start()
    task = asyncio.create_task(loop.run())
    try:
        deadline = time.monotonic() + timeout
        while not await condition():
            if task.done():
                task.result()
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            await asyncio.sleep(0.2)
    finally:
        loop.request_stop()
        await task
        await loop.stop()


async def _committed_count(kafka: KafkaIO, topic: str) -> int:
    return sum((await kafka.end_offsets(topic)).values())


async def test_ten_thousand_records_copied_exactly_once(kafka: KafkaIO, topic_prefix: str):
    src = await kafka.create_topic(f"{topic_prefix}src", partitions=6)
    dst = await kafka.create_topic(f"{topic_prefix}dst", partitions=6)
    dlq = await kafka.create_topic(f"{topic_prefix}dlq")
    sent = {f"r{i}".encode() for i in range(10_000)}
    await kafka.produce(src, ((v, v) for v in sorted(sent)))
    assert sum((await kafka.end_offsets(src)).values()) == 10_000, "the input itself must hold no duplicates"

    loop = TransactionalLoop(
        _settings(kafka.bootstrap, f"{topic_prefix}g", src, dlq), TransformStage("copy", copy_transform(dst, None))
    )

    async def all_copied() -> bool:
        return loop.stats["out"] >= 10_000

    await _run_until(loop, all_copied, timeout=120)
    got = await kafka.read_all(dst, expect=10_000, timeout=60)
    values = Counter(r.value for r in got)
    assert set(values) == sent
    assert max(values.values()) == 1, "duplicates in read_committed output"
    assert len(got) == 10_000
    assert await kafka.read_all(dlq, timeout=2) == []
    assert loop.stats["committed"] >= 1 and loop.stats["rejected"] == 0


async def test_rejected_records_go_to_deadletter_with_error_headers(kafka: KafkaIO, topic_prefix: str):
    src = await kafka.create_topic(f"{topic_prefix}src", partitions=3)
    dst = await kafka.create_topic(f"{topic_prefix}dst", partitions=3)
    dlq = await kafka.create_topic(f"{topic_prefix}dlq")
    records = [(f"k{i}".encode(), (b"BAD-" if i % 7 == 0 else b"ok-") + str(i).encode()) for i in range(700)]
    await kafka.produce(src, records, headers=[("trace", b"abc")])
    bad = {v for _, v in records if v.startswith(b"BAD-")}
    good = {v for _, v in records if v.startswith(b"ok-")}

    loop = TransactionalLoop(
        _settings(kafka.bootstrap, f"{topic_prefix}g", src, dlq),
        TransformStage("copy", copy_transform(dst, re.compile(rb"^BAD-"))),
    )

    async def done() -> bool:
        return loop.stats["in"] >= 700

    await _run_until(loop, done)
    out = await kafka.read_all(dst, expect=len(good))
    dead = await kafka.read_all(dlq, expect=len(bad))
    assert {r.value for r in out} == good and len(out) == len(good)
    assert {r.value for r in dead} == bad and len(dead) == len(bad)
    for r in dead:
        h = dict(r.headers)
        assert set(DLQ_HEADERS) <= set(h), h.keys()
        assert h["dlq.stage"] == b"copy"
        assert h["dlq.error.class"] == b"RejectedByPattern"
        assert h["dlq.source.topic"] == src.encode()
        assert int(h["dlq.source.offset"]) >= 0 and int(h["dlq.source.partition"]) in range(3)
        assert h["trace"] == b"abc", "original headers are kept"
        assert r.key is not None and r.key.startswith(b"k"), "original key is kept"


# One transactional producer per process (the default), whose offset commits the group fences by
# generation, or one per input partition (tests/integration/test_loop_shared_producer.py has more).
PRODUCERS = pytest.mark.parametrize("producers", ["partition", "process"])


def _producers_env(producers: str, instance: str, **extra: str) -> dict[str, str]:
    """A process's producer settings. A process-wide producer keeps its id across restarts (a
    restart then ends the killed one's open transaction at once); a partner that takes a killed
    member's partitions waits for that transaction's timeout, kept short here."""
    if producers == "partition":
        return {"LOOP_PRODUCERS": "partition", **extra}
    return {"LOOP_PRODUCERS": "process", "LOOP_INSTANCE_ID": instance, "KAFKA_TRANSACTION_TIMEOUT_MS": "5000", **extra}


def _start_copy(kafka: KafkaIO, prefix: str, src: str, dst: str, group: str, log, **extra: str) -> subprocess.Popen:
    env = pipeline_env(kafka.bootstrap, prefix, LOOP_MAX_BATCH="300", **extra)
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "copy", src, dst, "--group", group],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


@PRODUCERS
async def test_sigkill_mid_stream_loses_and_duplicates_nothing(
    kafka: KafkaIO, topic_prefix: str, tmp_path, producers: str
):
    src = await kafka.create_topic(f"{topic_prefix}src", partitions=4)
    dst = await kafka.create_topic(f"{topic_prefix}dst", partitions=4)
    await kafka.create_topic(f"{topic_prefix}deadletter")
    group = f"{topic_prefix}g"
    total = 24_000
    sent = [f"m{i:06d}".encode() for i in range(total)]
    rng = random.Random(int(os.environ.get("KILL_SEED", "7")))
    log = open(tmp_path / "copy.log", "ab")  # noqa: SIM115
    kills = 0
    producer_task = asyncio.create_task(_produce_slowly(kafka, src, sent))
    env = _producers_env(producers, "copy")
    proc = _start_copy(kafka, topic_prefix, src, dst, group, log, **env)
    try:
        for _ in range(4):
            # let it copy for a random while (reading committed output grows), then kill -9
            await asyncio.sleep(rng.uniform(2.5, 5.0))
            before = await _committed_count(kafka, dst)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            kills += 1
            assert before < total, "the kill must land mid-stream"
            proc = _start_copy(kafka, topic_prefix, src, dst, group, log, **env)
        await producer_task
        got = await kafka.read_all(dst, expect=total, timeout=120)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    counts = Counter(r.value for r in got)
    assert kills == 4
    assert set(counts) == set(sent), f"missing {len(set(sent) - set(counts))}"
    dups = {v: c for v, c in counts.items() if c > 1}
    assert not dups, f"{len(dups)} duplicates, e.g. {list(dups.items())[:3]}"
    # the killed transactions really left data behind: visible without read_committed isolation
    uncommitted = await kafka.read_all(dst, isolation="read_uncommitted", expect=total, timeout=30)
    assert len(uncommitted) >= total


async def _produce_slowly(kafka: KafkaIO, topic: str, values: list[bytes]) -> None:
    for i in range(0, len(values), 2000):
        chunk = values[i : i + 2000]
        await kafka.produce(topic, ((v, v) for v in chunk))
        await asyncio.sleep(0.5)


async def test_sigterm_finishes_the_batch_and_leaves_the_group(kafka: KafkaIO, topic_prefix: str, tmp_path):
    src = await kafka.create_topic(f"{topic_prefix}src", partitions=2)
    dst = await kafka.create_topic(f"{topic_prefix}dst", partitions=2)
    await kafka.create_topic(f"{topic_prefix}deadletter")
    values = [f"s{i}".encode() for i in range(5000)]
    await kafka.produce(src, ((v, v) for v in values))
    group = f"{topic_prefix}g"
    with open(tmp_path / "copy.log", "ab") as log:
        proc = _start_copy(kafka, topic_prefix, src, dst, group, log)
        deadline = time.monotonic() + 60
        while await _committed_count(kafka, dst) == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        stopped_in = time.monotonic() - started
    assert rc == 0
    assert stopped_in < 15
    # a second member joins at once and copies the rest: the first one left the group
    with open(tmp_path / "copy2.log", "ab") as log:
        proc = _start_copy(kafka, topic_prefix, src, dst, group, log)
        try:
            got = await kafka.read_all(dst, expect=len(values), timeout=60)
        finally:
            proc.terminate()
            proc.wait(30)
    counts = Counter(r.value for r in got)
    assert set(counts) == set(values) and max(counts.values()) == 1
    text = (tmp_path / "copy.log").read_text()
    assert '"event": "loop_stopped"' in text or '"event":"loop_stopped"' in text


@PRODUCERS
async def test_two_members_share_partitions_and_survive_one_killed(
    kafka: KafkaIO, topic_prefix: str, tmp_path, producers: str
):
    src = await kafka.create_topic(f"{topic_prefix}src", partitions=6)
    dst = await kafka.create_topic(f"{topic_prefix}dst", partitions=6)
    await kafka.create_topic(f"{topic_prefix}deadletter")
    group = f"{topic_prefix}g"
    values = [f"p{i:05d}".encode() for i in range(12_000)]
    producer_task = asyncio.create_task(_produce_slowly(kafka, src, values))
    logs = [open(tmp_path / f"m{i}.log", "ab") for i in range(2)]  # noqa: SIM115
    a = _start_copy(kafka, topic_prefix, src, dst, group, logs[0], **_producers_env(producers, "a"))
    b = _start_copy(kafka, topic_prefix, src, dst, group, logs[1], **_producers_env(producers, "b"))
    try:
        await asyncio.sleep(4)
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        await producer_task
        got = await kafka.read_all(dst, expect=len(values), timeout=120)
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.terminate()
                p.wait(30)
        for f in logs:
            f.close()
    counts = Counter(r.value for r in got)
    assert set(counts) == set(values)
    assert max(counts.values()) == 1
    log_b = (tmp_path / "m1.log").read_text()
    assert "partitions_assigned" in log_b


@PRODUCERS
async def test_members_joining_and_leaving_while_records_flow_lose_and_duplicate_nothing(
    kafka: KafkaIO, topic_prefix: str, producers: str
):
    """Batches that race a rebalance (fetched before, committed after) must be neither dropped nor repeated."""
    src = await kafka.create_topic(f"{topic_prefix}src", partitions=6)
    dst = await kafka.create_topic(f"{topic_prefix}dst", partitions=6)
    dlq = await kafka.create_topic(f"{topic_prefix}dlq")
    group = f"{topic_prefix}g"
    values = [f"j{i:05d}".encode() for i in range(15_000)]

    def member(name: str) -> TransactionalLoop:
        # a long poll: one getmany spans a whole rebalance and returns what was fetched after it
        settings = LoopSettings(
            bootstrap=kafka.bootstrap,
            group_id=group,
            input_topics=(src,),
            deadletter_topic=dlq,
            max_batch=200,
            poll_timeout_ms=3000,
            session_timeout_ms=6000,
            heartbeat_interval_ms=500,
            producers=producers,
            instance_id=name,
        )
        return TransactionalLoop(settings, TransformStage(name, copy_transform(dst, None)))

    steady = member("steady")
    await steady.start()
    steady_task = asyncio.create_task(steady.run())
    producer_task = asyncio.create_task(_produce_slowly(kafka, src, values))
    rebalances = 0
    try:
        for round_ in range(4):  # a second member joins, works a little, leaves: two rebalances each
            await asyncio.sleep(1.0)
            guest = member(f"guest{round_}")
            await guest.start()
            guest_task = asyncio.create_task(guest.run())
            await asyncio.sleep(1.5)
            guest.request_stop()
            await guest_task
            await guest.stop()
            rebalances += 2
        await producer_task
        got = await kafka.read_all(dst, expect=len(values), timeout=90)
    finally:
        steady.request_stop()
        await steady_task
        await steady.stop()
    counts = Counter(r.value for r in got)
    assert rebalances == 8
    assert set(counts) == set(values), f"lost {len(set(values) - set(counts))}"
    assert max(counts.values()) == 1, f"duplicated {sum(1 for c in counts.values() if c > 1)}"


class _BrokenPreparation(TransformStage):
    def __init__(self, dst: str) -> None:
        super().__init__("broken", copy_transform(dst, None))
        self.handled = 0

    async def on_assigned(self, lanes) -> None:
        raise RuntimeError("state store unreachable")

    async def handle(self, lane, records):
        self.handled += len(records)
        return await super().handle(lane, records)


async def test_a_stage_that_cannot_prepare_its_partitions_handles_nothing_and_stops(kafka: KafkaIO, topic_prefix: str):
    src = await kafka.create_topic(f"{topic_prefix}src", partitions=2)
    dst = await kafka.create_topic(f"{topic_prefix}dst", partitions=2)
    dlq = await kafka.create_topic(f"{topic_prefix}dlq")
    await kafka.produce(src, [(b"k", b"v")] * 10)
    stage = _BrokenPreparation(dst)
    loop = TransactionalLoop(_settings(kafka.bootstrap, f"{topic_prefix}g", src, dlq, assign_attempts=2), stage)
    await loop.start()
    await asyncio.wait_for(loop.run(), 30)  # returns by itself: the loop stops
    await loop.stop()
    assert isinstance(loop.fatal, RuntimeError) and "state store unreachable" in str(loop.fatal)
    assert stage.handled == 0
    assert await kafka.read_all(dst, timeout=2, idle=0.5) == []


async def _trickle(kafka: KafkaIO, topic: str, n: int, every_s: float) -> set[bytes]:
    sent = set()
    for i in range(n):
        value = f"t{i}".encode()
        await kafka.produce(topic, [(value, value)])
        sent.add(value)
        await asyncio.sleep(every_s)
    return sent


async def test_records_arriving_one_by_one_share_transactions_within_the_commit_interval(
    kafka: KafkaIO, topic_prefix: str
):
    """40 records, one every 25 ms onto 2 partitions: committing every poll takes about one
    transaction per record; gathered for 500 ms they take one per partition and window of the
    time they took to arrive (a loaded machine stretches it), and each is copied once."""
    results = {}
    took: dict[int, float] = {}
    for interval_ms in (0, 500):
        p = f"{topic_prefix}i{interval_ms}-"
        src = await kafka.create_topic(f"{p}src", partitions=2)
        dst = await kafka.create_topic(f"{p}dst", partitions=2)
        dlq = await kafka.create_topic(f"{p}dlq")
        loop = TransactionalLoop(
            _settings(kafka.bootstrap, f"{p}g", src, dlq, commit_interval_ms=interval_ms),
            TransformStage("copy", copy_transform(dst, None)),
        )
        sent: set[bytes] = set()

        async def produce_then_wait(loop=loop, src=src, sent=sent, interval_ms=interval_ms) -> bool:
            if not sent:
                started = time.monotonic()
                sent |= await _trickle(kafka, src, 40, 0.025)
                took[interval_ms] = time.monotonic() - started
            return loop.stats["out"] >= 40

        await _run_until(loop, produce_then_wait)
        got = await kafka.read_all(dst, expect=40, timeout=30)
        assert sorted(r.value for r in got) == sorted(sent), "every record copied exactly once"
        results[interval_ms] = loop.stats["committed"]
    assert results[0] >= 20, results  # one transaction per poll that found a record
    windows = 2 * (int(took[500] / 0.5) + 1)  # per partition: a window opens with its first record
    assert results[500] <= windows, (results, took)
    assert results[500] * 2 <= results[0], (results, took)


async def test_a_partition_commits_once_it_holds_commit_max_records(kafka: KafkaIO, topic_prefix: str):
    """The size bound closes a transaction long before the interval: 1,000 records in
    transactions of 100 to 129 records (polls of up to 30), with an interval of a minute."""
    src = await kafka.create_topic(f"{topic_prefix}src", partitions=1)
    dst = await kafka.create_topic(f"{topic_prefix}dst", partitions=1)
    dlq = await kafka.create_topic(f"{topic_prefix}dlq")
    await kafka.produce(src, ((f"r{i}".encode(), f"r{i}".encode()) for i in range(1000)))
    loop = TransactionalLoop(
        _settings(
            kafka.bootstrap,
            f"{topic_prefix}g",
            src,
            dlq,
            commit_interval_ms=60_000,
            commit_max_records=100,
            max_batch=30,
        ),
        TransformStage("copy", copy_transform(dst, None)),
    )

    async def copied() -> bool:  # the last < 100 records wait for the interval: the stop commits them
        return loop.stats["out"] >= 900

    await _run_until(loop, copied, timeout=50)  # never waits for the minute
    got = await kafka.read_all(dst, expect=1000, timeout=30)
    assert len({r.value for r in got}) == len(got) == 1000
    assert 9 <= loop.stats["committed"] <= 11, loop.stats  # 100–129 records each (polls of 30), then the rest


async def test_a_stop_commits_what_was_gathered(kafka: KafkaIO, topic_prefix: str):
    """Records waiting for a long commit interval are committed when the loop stops, not dropped:
    a new member of the group starts after them."""
    src = await kafka.create_topic(f"{topic_prefix}src", partitions=2)
    dst = await kafka.create_topic(f"{topic_prefix}dst", partitions=2)
    dlq = await kafka.create_topic(f"{topic_prefix}dlq")
    await kafka.produce(src, ((f"r{i}".encode(), f"r{i}".encode()) for i in range(50)))
    settings = _settings(kafka.bootstrap, f"{topic_prefix}g", src, dlq, commit_interval_ms=600_000)
    loop = TransactionalLoop(settings, TransformStage("copy", copy_transform(dst, None)))

    async def gathered() -> bool:
        return sum(len(v) for v in loop._pending.values()) >= 50  # noqa: SLF001 - what waits for the interval

    await _run_until(loop, gathered)  # stops as soon as all 50 are gathered, none committed yet
    assert loop.stats["committed"] in (1, 2), loop.stats  # one transaction per partition, at the stop
    got = await kafka.read_all(dst, expect=50, timeout=30)
    assert len({r.value for r in got}) == len(got) == 50

    again = TransactionalLoop(settings, TransformStage("copy", copy_transform(dst, None)))

    async def settled() -> bool:
        return again._joined  # noqa: SLF001

    await _run_until(again, settled)
    await asyncio.sleep(0)
    assert again.stats["in"] == 0, "the next member starts after the committed records"
