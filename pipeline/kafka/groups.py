"""Consumer groups as the broker's group coordinator sees them: state, members, assignments.

aiokafka 0.14 asks for DescribeGroups v3 when the broker offers it but reads the answer with the
v2 layout (it has no ``authorized_operations``), which fails ("Buffer underrun"); this asks for
v1, which every broker since Kafka 0.11 answers and which carries the same facts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.errors import KafkaError
from aiokafka.protocol.admin import DescribeGroupsRequest_v1

from pipeline.kafka.clients import new_admin


@dataclass(frozen=True)
class Member:
    member_id: str
    client_id: str
    host: str
    partitions: tuple[TopicPartition, ...]


@dataclass
class GroupInfo:
    group: str
    state: str  # Stable, PreparingRebalance, CompletingRebalance, Empty, Dead (unknown group)
    members: list[Member] = field(default_factory=list)
    error_code: int = 0

    @property
    def partitions(self) -> int:
        return sum(len(m.partitions) for m in self.members)

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "members": [
                {
                    "client_id": m.client_id,
                    "host": m.host,
                    "partitions": sorted(f"{tp.topic}:{tp.partition}" for tp in m.partitions),
                }
                for m in self.members
            ],
        }


class _DescribeGroupsV1:
    """A request that is always DescribeGroups v1 (module docstring)."""

    API_KEY = 15

    def __init__(self, groups: list[str]) -> None:
        self.groups = groups

    def prepare(self, versions: Any) -> DescribeGroupsRequest_v1:
        return DescribeGroupsRequest_v1(self.groups)


def _assignment(raw: bytes) -> tuple[TopicPartition, ...]:
    if not raw:
        return ()
    try:
        decoded = ConsumerProtocolMemberAssignment.decode(raw)
    except Exception:  # noqa: BLE001 - not the consumer protocol: no partitions to show
        return ()
    return tuple(decoded.partitions())


async def describe_groups(bootstrap: str, groups: Sequence[str]) -> dict[str, GroupInfo]:
    """State and members of each group; a group the broker does not know is ``Dead``, no members."""
    admin = new_admin(bootstrap_servers=bootstrap)
    await admin.start()
    out: dict[str, GroupInfo] = {}
    try:
        for group in groups:
            for attempt in range(40):  # a fresh broker elects the group coordinator on first use
                try:
                    node = await admin.find_coordinator(group)
                    response = await admin._send_request(_DescribeGroupsV1([group]), node)  # type: ignore[arg-type]  # noqa: SLF001
                    break
                except KafkaError as exc:
                    if not exc.retriable or attempt == 39:
                        raise
                    await asyncio.sleep(0.25)
            for error_code, group_id, state, _ptype, _protocol, members in response.groups:
                out[group_id] = GroupInfo(
                    group_id,
                    state,
                    [Member(m[0], m[1], m[2].lstrip("/"), _assignment(m[4])) for m in members],
                    error_code,
                )
    finally:
        await admin.close()
    return out
