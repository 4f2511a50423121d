"""Group-fenced transactional offset commits (KIP-447) and stable offset fetches, on aiokafka.

aiokafka's ``send_offsets_to_transaction`` sends TxnOffsetCommit v0: transactional id, group id,
producer id and epoch, offsets — no group generation. The group coordinator accepts such a commit
from anyone whose producer epoch is current, so only the transactional id can fence a zombie, and
the loop needs one transactional producer per input partition. The broker (Apache Kafka 2.5+)
also takes TxnOffsetCommit v3, which carries the committing member's generation id, member id and
group instance id; the coordinator refuses it with ``ILLEGAL_GENERATION``, ``UNKNOWN_MEMBER_ID`` or
``FENCED_INSTANCE_ID`` once that member no longer owns its generation. This module sends that
request on aiokafka's connections and protocol classes:

* :class:`GroupMembership` / :func:`membership`: the consumer's group id, generation id, member id
  and group instance id. Take it when the records of a batch are assigned (``on_partitions_
  assigned``), not when the offsets are committed: aiokafka rejoins the group in a background task,
  and a member that rejoined in between would otherwise vouch with its new generation for records
  of the old one.
* :func:`send_offsets_fenced`: adds the group to the producer's open transaction (AddOffsetsToTxn)
  and commits the offsets in it with TxnOffsetCommit v3. A refusal raises
  :class:`MembershipFenced` and leaves the transaction able only to abort (its commit raises the
  same error). A membership without a generation (-1, no member id: the consumer was removed from
  the group and has not rejoined yet) is refused here, before any request: the broker accepts a
  transactional commit without generation and member id from anyone (what v0 sends).
* :func:`fetch_offsets` / :func:`committed_stable`: OffsetFetch v7 with ``require_stable``. aiokafka's
  consumer fetches committed offsets with OffsetFetch v1–v3, which returns the last committed offset
  even while a transaction holds a newer one for the partition; a new owner that starts from it
  processes again what that transaction will commit. With ``require_stable`` the coordinator answers
  ``UNSTABLE_OFFSET_COMMIT`` until the transaction ends; :func:`committed_stable` retries until then.

The transactional loop uses this module when it runs one producer per process
(``LOOP_PRODUCERS=process``, :class:`pipeline.kafka.loop.SharedProducer`).
``tests/integration/test_kip447_fencing.py`` proves on the broker what it fences and what it does
not; ``tests/integration/test_loop_shared_producer.py`` does the same for the loop.

Every request goes to the coordinator aiokafka's own clients found (the producer's sender caches
the transaction and group coordinators, the consumer's group coordinator its own) and is retried on
the coordinator errors Kafka marks retriable, until ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka import errors as kafka_errors
from aiokafka.client import ConnectionGroup, CoordinationType
from aiokafka.errors import IllegalOperation, KafkaError, KafkaTimeoutError, ProducerFenced
from aiokafka.producer.transaction_manager import TransactionState
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.transaction import AddOffsetsToTxnRequest
from aiokafka.protocol.types import (
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Int64,
    Schema,
    TaggedFields,
)
from aiokafka.structs import OffsetAndMetadata

from pipeline.core.observability import get_logger

log = get_logger(__name__)

# --------------------------------------------------------------------------------------------
# Error codes (aiokafka 0.14 knows no class for the newer ones)
# --------------------------------------------------------------------------------------------

NONE = 0
UNKNOWN_TOPIC_OR_PARTITION = 3
REQUEST_TIMED_OUT = 7
COORDINATOR_LOAD_IN_PROGRESS = 14
COORDINATOR_NOT_AVAILABLE = 15
NOT_COORDINATOR = 16
ILLEGAL_GENERATION = 22
UNKNOWN_MEMBER_ID = 25
GROUP_AUTHORIZATION_FAILED = 30
INVALID_PRODUCER_EPOCH = 47
CONCURRENT_TRANSACTIONS = 51
TRANSACTIONAL_ID_AUTHORIZATION_FAILED = 53
FENCED_INSTANCE_ID = 82
UNSTABLE_OFFSET_COMMIT = 88
PRODUCER_FENCED = 90

ERROR_NAMES = {
    ILLEGAL_GENERATION: "ILLEGAL_GENERATION",
    UNKNOWN_MEMBER_ID: "UNKNOWN_MEMBER_ID",
    FENCED_INSTANCE_ID: "FENCED_INSTANCE_ID",
    UNSTABLE_OFFSET_COMMIT: "UNSTABLE_OFFSET_COMMIT",
}
MEMBERSHIP_ERRORS = frozenset({ILLEGAL_GENERATION, UNKNOWN_MEMBER_ID, FENCED_INSTANCE_ID})
COORDINATOR_MOVED = frozenset({COORDINATOR_NOT_AVAILABLE, NOT_COORDINATOR, REQUEST_TIMED_OUT})
RETRY_IN_PLACE = frozenset({COORDINATOR_LOAD_IN_PROGRESS, UNKNOWN_TOPIC_OR_PARTITION, CONCURRENT_TRANSACTIONS})
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    kafka_errors.KafkaConnectionError,
    kafka_errors.NodeNotReadyError,
    kafka_errors.RequestTimedOutError,
)

DEFAULT_TIMEOUT_S = 30.0
RETRY_BACKOFF_S = 0.1
NO_GENERATION = -1
NO_OFFSET = -1
NO_LEADER_EPOCH = -1


def error_name(code: int) -> str:
    if code in ERROR_NAMES:
        return ERROR_NAMES[code]
    return kafka_errors.for_code(code).__name__


class MembershipFenced(KafkaError):
    """The group refused the offsets: the member no longer owns the generation it committed for
    (or has none). The transaction can only be aborted; its partitions belong to another member."""

    retriable = False

    def __init__(self, reason: str, membership: GroupMembership) -> None:
        super().__init__(f"{reason}: {membership}")
        self.reason, self.membership = reason, membership


# --------------------------------------------------------------------------------------------
# Protocol: TxnOffsetCommit v3, OffsetFetch v7 (both flexible: compact types, tagged fields)
# --------------------------------------------------------------------------------------------


class TxnOffsetCommitResponse_v3(Response):  # noqa: N801 - aiokafka's naming of protocol versions
    API_KEY = 28
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "topics",
            CompactArray(
                ("name", CompactString("utf-8")),
                ("partitions", CompactArray(("partition_index", Int32), ("error_code", Int16), ("tags", TaggedFields))),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class TxnOffsetCommitRequest_v3(RequestStruct):  # noqa: N801
    FLEXIBLE_VERSION = True
    API_KEY = 28
    API_VERSION = 3
    RESPONSE_TYPE = TxnOffsetCommitResponse_v3
    SCHEMA = Schema(
        ("transactional_id", CompactString("utf-8")),
        ("group_id", CompactString("utf-8")),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("generation_id", Int32),
        ("member_id", CompactString("utf-8")),
        ("group_instance_id", CompactString("utf-8")),
        (
            "topics",
            CompactArray(
                ("name", CompactString("utf-8")),
                (
                    "partitions",
                    CompactArray(
                        ("partition_index", Int32),
                        ("committed_offset", Int64),
                        ("committed_leader_epoch", Int32),
                        ("committed_metadata", CompactString("utf-8")),
                        ("tags", TaggedFields),
                    ),
                ),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class TxnOffsetCommitRequestV3(Request[TxnOffsetCommitRequest_v3]):
    """TxnOffsetCommit with the committing member's generation (the only version defined here:
    a broker without v3 cannot fence, and :meth:`prepare` refuses it)."""

    API_KEY = 28

    def __init__(
        self,
        transactional_id: str,
        producer_id: int,
        producer_epoch: int,
        member: GroupMembership,
        offsets: Mapping[TopicPartition, OffsetAndMetadata],
    ) -> None:
        self.transactional_id, self.producer_id, self.producer_epoch = transactional_id, producer_id, producer_epoch
        self.member, self.offsets = member, offsets

    def build(self, request_struct_class: type[TxnOffsetCommitRequest_v3]) -> TxnOffsetCommitRequest_v3:
        by_topic: dict[str, list[tuple[int, int, int, str, dict[int, bytes]]]] = defaultdict(list)
        for tp, om in sorted(self.offsets.items()):
            by_topic[tp.topic].append((tp.partition, om.offset, NO_LEADER_EPOCH, om.metadata, {}))
        return request_struct_class(
            self.transactional_id,
            self.member.group_id,
            self.producer_id,
            self.producer_epoch,
            self.member.generation_id,
            self.member.member_id,
            self.member.group_instance_id,
            [(topic, parts, {}) for topic, parts in by_topic.items()],
            {},
        )


class OffsetFetchResponse_v7(Response):  # noqa: N801
    API_KEY = 9
    API_VERSION = 7
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "topics",
            CompactArray(
                ("name", CompactString("utf-8")),
                (
                    "partitions",
                    CompactArray(
                        ("partition_index", Int32),
                        ("committed_offset", Int64),
                        ("committed_leader_epoch", Int32),
                        ("metadata", CompactString("utf-8")),
                        ("error_code", Int16),
                        ("tags", TaggedFields),
                    ),
                ),
                ("tags", TaggedFields),
            ),
        ),
        ("error_code", Int16),
        ("tags", TaggedFields),
    )


class OffsetFetchRequest_v7(RequestStruct):  # noqa: N801
    FLEXIBLE_VERSION = True
    API_KEY = 9
    API_VERSION = 7
    RESPONSE_TYPE = OffsetFetchResponse_v7
    SCHEMA = Schema(
        ("group_id", CompactString("utf-8")),
        (
            "topics",
            CompactArray(
                ("name", CompactString("utf-8")),
                ("partition_indexes", CompactArray(Int32)),
                ("tags", TaggedFields),
            ),
        ),
        ("require_stable", Boolean),
        ("tags", TaggedFields),
    )


class OffsetFetchRequestV7(Request[OffsetFetchRequest_v7]):
    """OffsetFetch v7: the lowest version with ``require_stable`` (v8+ batch several groups)."""

    API_KEY = 9

    def __init__(self, group_id: str, partitions: Iterable[TopicPartition], require_stable: bool) -> None:
        self.group_id, self.partitions, self.require_stable = group_id, list(partitions), require_stable

    def build(self, request_struct_class: type[OffsetFetchRequest_v7]) -> OffsetFetchRequest_v7:
        by_topic: dict[str, list[int]] = defaultdict(list)
        for tp in sorted(self.partitions):
            by_topic[tp.topic].append(tp.partition)
        topics: list[tuple[str, list[int], dict[int, bytes]]] = [(t, parts, {}) for t, parts in by_topic.items()]
        return request_struct_class(self.group_id, topics, self.require_stable, {})


# --------------------------------------------------------------------------------------------
# Membership
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupMembership:
    group_id: str
    generation_id: int
    member_id: str
    group_instance_id: str | None = None

    @property
    def valid(self) -> bool:
        """A generation the coordinator can check; without one the broker checks nothing."""
        return self.generation_id >= 0 and bool(self.member_id)

    def __str__(self) -> str:
        static = f", instance {self.group_instance_id}" if self.group_instance_id else ""
        return f"group {self.group_id} generation {self.generation_id} member {self.member_id or '-'}{static}"


def membership(consumer: AIOKafkaConsumer) -> GroupMembership:
    """The consumer's group membership as its coordinator knows it now."""
    coordinator = consumer._coordinator  # noqa: SLF001 - aiokafka has no public group metadata
    group_id = getattr(coordinator, "group_id", None)
    if not group_id or not hasattr(coordinator, "generation"):
        raise ValueError("the consumer is not started in a group")
    return GroupMembership(
        group_id=group_id,
        generation_id=coordinator.generation,
        member_id=coordinator.member_id,
        group_instance_id=coordinator._group_instance_id,  # noqa: SLF001
    )


# --------------------------------------------------------------------------------------------
# Fenced transactional offset commit
# --------------------------------------------------------------------------------------------

Offsets: TypeAlias = Mapping[TopicPartition, int | OffsetAndMetadata]


def _as_offsets(offsets: Offsets) -> dict[TopicPartition, OffsetAndMetadata]:
    return {tp: om if isinstance(om, OffsetAndMetadata) else OffsetAndMetadata(om, "") for tp, om in offsets.items()}


def _refuse_commit(txn: Any, exc: BaseException) -> None:
    """Leave the open transaction able only to abort: ``commit_transaction`` raises ``exc``.

    The partitions and the group stay registered, so the abort still ends the broker's
    transaction (aiokafka skips EndTxn for a transaction it believes empty)."""
    if txn.state is not TransactionState.IN_TRANSACTION:
        return
    txn._transition_to(TransactionState.ABORTABLE_ERROR)  # noqa: SLF001
    waiter = txn._transaction_waiter  # noqa: SLF001
    if not waiter.done():
        waiter.set_exception(exc)
        waiter.exception()  # retrieved here; commit_transaction raises it again


class _Deadline:
    def __init__(self, timeout_s: float, what: str) -> None:
        self.end, self.what = time.monotonic() + timeout_s, what

    async def backoff(self, why: str) -> None:
        if time.monotonic() + RETRY_BACKOFF_S > self.end:
            raise KafkaTimeoutError(f"{self.what}: still {why} at the deadline")
        await asyncio.sleep(RETRY_BACKOFF_S)


async def _send_to_coordinator(producer: AIOKafkaProducer, kind: int, key: str, request: Any) -> Any:
    sender = producer._sender  # noqa: SLF001
    node_id = await sender._find_coordinator(kind, key)  # noqa: SLF001 - cached like aiokafka's own requests
    try:
        return await producer.client.send(node_id, request, group=ConnectionGroup.COORDINATION)
    except TRANSPORT_ERRORS:
        sender._coordinator_dead(kind)  # noqa: SLF001
        raise


async def _add_group_to_transaction(producer: AIOKafkaProducer, txn: Any, group_id: str, deadline: _Deadline) -> None:
    if txn._txn_consumer_group == group_id:  # noqa: SLF001 - already part of this transaction
        return
    if txn._txn_consumer_group is not None:  # noqa: SLF001
        raise IllegalOperation(f"the transaction already commits offsets of group {txn._txn_consumer_group}")  # noqa: SLF001
    while True:
        request = AddOffsetsToTxnRequest(
            transactional_id=txn.transactional_id,
            producer_id=txn.producer_id,
            producer_epoch=txn.producer_epoch,
            group_id=group_id,
        )
        try:
            response = await _send_to_coordinator(producer, CoordinationType.TRANSACTION, txn.transactional_id, request)
        except TRANSPORT_ERRORS as exc:
            await deadline.backoff(f"AddOffsetsToTxn: {exc!r}")
            continue
        code = response.error_code
        if code == NONE:
            txn.consumer_group_added(group_id)
            return
        if code in COORDINATOR_MOVED:
            producer._sender._coordinator_dead(CoordinationType.TRANSACTION)  # noqa: SLF001
        if code in COORDINATOR_MOVED or code in RETRY_IN_PLACE:
            await deadline.backoff(f"AddOffsetsToTxn: {error_name(code)}")
            continue
        if code in (INVALID_PRODUCER_EPOCH, PRODUCER_FENCED):
            raise ProducerFenced()
        raise kafka_errors.for_code(code)(f"AddOffsetsToTxn for group {group_id}: {error_name(code)}")


async def send_offsets_fenced(
    producer: AIOKafkaProducer,
    offsets: Offsets,
    member: GroupMembership,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Commit ``offsets`` (the next offset to read, per partition) for ``member``'s group in the
    producer's open transaction, fenced by ``member``'s generation (TxnOffsetCommit v3).

    Raises :class:`MembershipFenced` when the group refuses the generation (the transaction can
    then only be aborted), ``ProducerFenced`` when a newer producer took the transactional id,
    ``KafkaTimeoutError`` when the coordinators do not answer within ``timeout_s``."""
    txn = producer._txn_manager  # noqa: SLF001 - the producer id, epoch and transaction state
    if txn is None or txn.transactional_id is None:
        raise IllegalOperation("the producer is not transactional")
    if not txn.is_in_transaction():
        raise IllegalOperation("no transaction is open")
    committed = _as_offsets(offsets)
    if not committed:
        return
    if not member.valid:
        refused = MembershipFenced("not a member of a generation", member)
        _refuse_commit(txn, refused)
        raise refused
    deadline = _Deadline(timeout_s, f"committing offsets for {member}")
    await _add_group_to_transaction(producer, txn, member.group_id, deadline)
    while True:
        request = TxnOffsetCommitRequestV3(txn.transactional_id, txn.producer_id, txn.producer_epoch, member, committed)
        try:
            response = await _send_to_coordinator(producer, CoordinationType.GROUP, member.group_id, request)
        except TRANSPORT_ERRORS as exc:
            await deadline.backoff(f"TxnOffsetCommit: {exc!r}")
            continue
        codes = {code for _topic, parts, _tags in response.topics for _p, code, _t in parts}
        failed = codes - {NONE}
        if not failed:
            return
        fenced = failed & MEMBERSHIP_ERRORS
        if fenced:
            refused = MembershipFenced(error_name(min(fenced)), member)
            _refuse_commit(txn, refused)
            raise refused
        if failed & {INVALID_PRODUCER_EPOCH, PRODUCER_FENCED}:
            raise ProducerFenced()
        if failed & COORDINATOR_MOVED:
            producer._sender._coordinator_dead(CoordinationType.GROUP)  # noqa: SLF001
        if failed <= COORDINATOR_MOVED | RETRY_IN_PLACE:
            await deadline.backoff("TxnOffsetCommit: " + ", ".join(sorted(map(error_name, failed))))
            continue
        code = min(failed)
        failure = kafka_errors.for_code(code)(f"TxnOffsetCommit for {member}: {error_name(code)}")
        _refuse_commit(txn, failure)
        raise failure


# --------------------------------------------------------------------------------------------
# Stable committed offsets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchedOffsets:
    """One OffsetFetch answer: the committed offset per partition (None: none committed) and the
    partitions the coordinator called unstable (a transaction holds a newer offset for them)."""

    offsets: dict[TopicPartition, int | None]
    unstable: frozenset[TopicPartition]


async def fetch_offsets(
    consumer: AIOKafkaConsumer,
    partitions: Iterable[TopicPartition],
    *,
    require_stable: bool,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> FetchedOffsets:
    """One OffsetFetch v7 for the consumer's group; coordinator errors are retried, an unstable
    partition is reported, not waited for."""
    coordinator = consumer._coordinator  # noqa: SLF001 - the group coordinator connection
    wanted = list(partitions)
    deadline = _Deadline(timeout_s, f"fetching offsets of group {coordinator.group_id}")
    while True:
        await coordinator.ensure_coordinator_known()
        try:
            response = await coordinator._send_req(  # noqa: SLF001 - marks the coordinator dead on failure
                OffsetFetchRequestV7(coordinator.group_id, wanted, require_stable)
            )
        except TRANSPORT_ERRORS as exc:
            await deadline.backoff(f"OffsetFetch: {exc!r}")
            continue
        codes = {response.error_code} | {p[4] for _t, parts, _g in response.topics for p in parts}
        failed = codes - {NONE, UNSTABLE_OFFSET_COMMIT}
        if failed & COORDINATOR_MOVED:
            coordinator.coordinator_dead()
        if failed and failed <= COORDINATOR_MOVED | RETRY_IN_PLACE:
            await deadline.backoff("OffsetFetch: " + ", ".join(sorted(map(error_name, failed))))
            continue
        if failed:
            code = min(failed)
            raise kafka_errors.for_code(code)(f"OffsetFetch for group {coordinator.group_id}: {error_name(code)}")
        offsets: dict[TopicPartition, int | None] = {}
        unstable: set[TopicPartition] = set()
        top_unstable = response.error_code == UNSTABLE_OFFSET_COMMIT
        for topic, parts, _tags in response.topics:
            for partition, offset, _epoch, _metadata, code, _t in parts:
                tp = TopicPartition(topic, partition)
                offsets[tp] = None if offset == NO_OFFSET else offset
                if code == UNSTABLE_OFFSET_COMMIT or top_unstable:
                    unstable.add(tp)
        return FetchedOffsets(offsets, frozenset(unstable))


async def committed_stable(
    consumer: AIOKafkaConsumer, partitions: Iterable[TopicPartition], *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> dict[TopicPartition, int | None]:
    """The committed offsets of ``partitions`` once no transaction holds a pending offset for any
    of them (OffsetFetch v7 ``require_stable``; ``UNSTABLE_OFFSET_COMMIT`` is retried until
    ``timeout_s``). None: the group committed nothing for that partition."""
    wanted = list(partitions)
    deadline = _Deadline(timeout_s, "waiting for stable committed offsets")
    while True:
        fetched = await fetch_offsets(consumer, wanted, require_stable=True, timeout_s=timeout_s)
        if not fetched.unstable:
            return fetched.offsets
        await deadline.backoff(f"unstable: {sorted(fetched.unstable)}")
