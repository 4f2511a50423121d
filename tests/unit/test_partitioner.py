"""The producers' partitioner picks the partition the Java client (and aiokafka) picks."""

from __future__ import annotations

import random

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from pipeline.kafka.partitioner import KEY_CACHE_SIZE, murmur2, partition_index, partitioner

# Apache Kafka's UtilsTest.testMurmur2 (the Java client's hash, as signed 32-bit integers)
JAVA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize(("key", "signed"), JAVA_MURMUR2.items())
def test_murmur2_is_the_java_clients(key, signed):
    assert murmur2(key) == signed & 0xFFFFFFFF
    assert murmur2(key) == aiokafka_murmur2(key)


def test_same_partition_as_aiokafka_for_random_keys():
    rng = random.Random(20260302)
    reference = DefaultPartitioner()
    partition_index.cache_clear()
    for _ in range(5000):
        key = rng.randbytes(rng.randint(0, 100))
        count = rng.randint(1, 64)
        partitions = list(range(count))
        available = partitions[: rng.randint(0, count)]
        assert murmur2(key) == aiokafka_murmur2(key), key
        expected = reference(key, partitions, available)
        assert partitioner(key, partitions, available) == expected, (key, count)
        assert partitioner(key, partitions, available) == expected, (key, count)  # remembered
        assert partitioner(bytearray(key), partitions, available) == expected, (key, count)


def test_same_partition_as_aiokafka_for_the_pipelines_keys():
    reference = DefaultPartitioner()
    keys = [f"cloudtalk:call:{1_002_409_191 + i}".encode() for i in range(500)]
    keys += [f"team{i % 3}|+4477009{i:05d}".encode() for i in range(500)]
    for count in (1, 2, 3, 6, 12, 32):
        partitions = list(range(count))
        for key in keys:
            assert partitioner(key, partitions, partitions) == reference(key, partitions, partitions)


def test_the_partition_comes_from_the_given_list():
    """The index of the key's partition is taken in the list given, as aiokafka does."""
    key = b"team0|+447700900123"
    partitions = [5, 3, 9, 1]
    assert partitioner(key, partitions, []) == DefaultPartitioner()(key, partitions, [])


def test_remembered_keys_are_bounded():
    partition_index.cache_clear()
    for i in range(KEY_CACHE_SIZE + 100):
        partitioner(f"k{i}".encode(), [0, 1, 2], [0, 1, 2])
    assert partition_index.cache_info().currsize == KEY_CACHE_SIZE


def test_a_record_without_key_goes_to_an_available_partition():
    rng_state = random.getstate()
    try:
        seen = {partitioner(None, [0, 1, 2, 3], [1, 3]) for _ in range(200)}
        assert seen == {1, 3}
        seen = {partitioner(None, [0, 1, 2], []) for _ in range(200)}  # none available: any
        assert seen == {0, 1, 2}
    finally:
        random.setstate(rng_state)
