"""The producers' partitioner: the Java client's (and aiokafka's ``DefaultPartitioner``), faster.

A record with a key goes to ``all_partitions[toPositive(murmur2(key)) % len(all_partitions)]``
— the partition every Kafka client picks for that key, so a key keeps its partition whichever
client wrote it. A record without a key goes to a random available partition (any partition
when none is available).

What makes it cheaper than aiokafka's pure-Python one: the hash reads the key four bytes at a
time as little-endian words and keeps its state in local variables, and the index of a key is
remembered for the most recently used keys (commands are keyed by integration and number, so
the same keys come back again and again).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence
from functools import lru_cache

__all__ = ["KEY_CACHE_SIZE", "murmur2", "partition_index", "partitioner"]

KEY_CACHE_SIZE = 16_384  # keys whose partition index is remembered (least recently used go first)

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes | bytearray | memoryview) -> int:
    """MurmurHash2 of ``data`` as the Java client computes it (``Utils.murmur2``), as an unsigned
    32-bit integer."""
    length = len(data)
    m, mask = _M, _MASK
    h = (_SEED ^ length) & mask
    words = length >> 2
    if words:
        for k in struct.unpack_from(f"<{words}I", data):
            k = (k * m) & mask
            # h = h * m ^ (k ^ k >>> 24) * m, each product cut to 32 bits: one cut for both
            h = ((h * m) ^ ((k ^ (k >> 24)) * m)) & mask
    extra = length & 3
    if extra:
        tail = words << 2
        if extra == 3:
            h ^= data[tail + 2] << 16
        if extra >= 2:
            h ^= data[tail + 1] << 8
        h ^= data[tail]
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h


@lru_cache(maxsize=KEY_CACHE_SIZE)
def partition_index(key: bytes, partitions: int) -> int:
    """The index of ``key``'s partition among ``partitions`` (remembered for recent keys)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def partitioner(key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]) -> int:
    """The partition of a record: the producer's ``partitioner`` callable (aiokafka calls it
    with the serialized key, all partitions of the topic and those with a leader)."""
    if key is None:
        return random.choice(available) if available else random.choice(all_partitions)
    if type(key) is not bytes:  # bytearray, memoryview: not hashable, or not safely so
        return all_partitions[(murmur2(key) & 0x7FFFFFFF) % len(all_partitions)]
    return all_partitions[partition_index(key, len(all_partitions))]
