"""The `AdoptableStore` contract, run by every implementation: a snapshot taken once,
replacement, expiry and the sweep's `take_expired`, concurrent takers, large and binary
snapshots, every call a checkpoint. Then what only one implementation shows: the memory
store on a fake clock and its bound, the Redis store's keys, nodes sharing it, and Redis
failures as `StorageError`."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from gateway.errors import StorageError
from gateway.storage.adoptable_memory import MemoryAdoptableStore
from gateway.storage.adoptable_redis import KEEP_AFTER, RedisAdoptableStore
from gateway.storage.base import AdoptableStore
from gateway.storage.redis_client import Redis, open_redis
from tests.helpers.redis import free_port

#: Opaque bytes, NUL and non-UTF-8 included.
SNAPSHOT = b"snapshot\x00\xff"


def later(seconds: float = 3600.0) -> float:
    """A wall-clock `expires_at` `seconds` from now."""
    return time.time() + seconds


async def test_a_snapshot_is_taken_once(adoptable: AdoptableStore) -> None:
    await adoptable.put("a", SNAPSHOT, later())
    assert await adoptable.take("a") == SNAPSHOT
    assert await adoptable.take("a") is None


async def test_taking_an_unknown_smid_is_none(adoptable: AdoptableStore) -> None:
    assert await adoptable.take("nobody") is None
    await adoptable.put("a", SNAPSHOT, later())
    assert await adoptable.take("b") is None
    assert await adoptable.take("a") == SNAPSHOT  # the miss took nothing else


async def test_putting_an_smid_again_replaces_its_snapshot(adoptable: AdoptableStore) -> None:
    await adoptable.put("a", b"old", later())
    await adoptable.put("b", b"other", later())
    await adoptable.put("a", b"new", later(7200.0))
    assert await adoptable.take("a") == b"new"
    assert await adoptable.take("a") is None  # one snapshot per smid
    assert await adoptable.take("b") == b"other"


async def test_a_put_already_past_waits_for_take_expired(adoptable: AdoptableStore) -> None:
    await adoptable.put("a", SNAPSHOT, time.time() - 0.5)
    assert await adoptable.take("a") is None  # too late to resume...
    assert await adoptable.take_expired(10) == [("a", SNAPSHOT)]  # ...but not lost
    assert await adoptable.take_expired(10) == []
    assert await adoptable.take("a") is None


async def test_an_expired_snapshot_is_left_to_take_expired(adoptable: AdoptableStore) -> None:
    await adoptable.put("short", SNAPSHOT, later(0.2))
    await adoptable.put("long", b"kept", later())
    assert await adoptable.take_expired(10) == []
    await trio.sleep(0.4)
    assert await adoptable.take("short") is None
    assert await adoptable.take_expired(10) == [("short", SNAPSHOT)]
    assert await adoptable.take("long") == b"kept"


async def test_take_expired_takes_the_soonest_expired_first_up_to_its_limit(
    adoptable: AdoptableStore,
) -> None:
    now = time.time()
    for n in range(5):
        await adoptable.put(f"s{n}", str(n).encode(), now - 10 + n)
    await adoptable.put("live", b"live", later())
    assert await adoptable.take_expired(2) == [("s0", b"0"), ("s1", b"1")]
    assert await adoptable.take_expired(10) == [("s2", b"2"), ("s3", b"3"), ("s4", b"4")]
    assert await adoptable.take("live") == b"live"


async def test_a_snapshot_put_again_expires_by_its_new_time(adoptable: AdoptableStore) -> None:
    await adoptable.put("a", b"old", time.time() - 1)
    await adoptable.put("a", b"new", later())
    await adoptable.put("b", b"live", later())
    await adoptable.take("b")
    await adoptable.put("b", b"gone", time.time() - 1)
    assert await adoptable.take_expired(10) == [("b", b"gone")]
    assert await adoptable.take("a") == b"new"


async def test_of_concurrent_sweepers_each_expired_snapshot_goes_to_one(
    adoptable: AdoptableStore,
) -> None:
    for n in range(30):
        await adoptable.put(f"s{n}", str(n).encode(), time.time() - 1)
    got: list[tuple[str, bytes]] = []

    async def sweeper() -> None:
        while taken := await adoptable.take_expired(3):
            got.extend(taken)

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(sweeper)
    assert sorted(got) == sorted((f"s{n}", str(n).encode()) for n in range(30))


async def test_of_many_concurrent_takers_exactly_one_gets_the_snapshot(
    adoptable: AdoptableStore,
) -> None:
    await adoptable.put("a", SNAPSHOT, later())
    got: list[bytes | None] = []

    async def taker() -> None:
        got.append(await adoptable.take("a"))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(taker)
    assert len(got) == 20
    assert [found for found in got if found is not None] == [SNAPSHOT]


async def test_a_large_snapshot_round_trips(adoptable: AdoptableStore) -> None:
    large = bytes(range(256)) * 4096  # 1 MiB
    await adoptable.put("a", large, later())
    assert await adoptable.take("a") == large


async def test_every_byte_value_round_trips(adoptable: AdoptableStore) -> None:
    every = bytes(range(256))
    await adoptable.put("a", every, later())
    await adoptable.put("b", b"", later())
    assert await adoptable.take("a") == every
    assert await adoptable.take("b") == b""  # an empty snapshot is not "none"


async def test_adoptable_calls_are_checkpoints_and_do_nothing_when_cancelled(
    adoptable: AdoptableStore,
) -> None:
    await adoptable.put("kept", SNAPSHOT, later())
    with trio.CancelScope() as scope:
        scope.cancel()
        await adoptable.put("a", SNAPSHOT, later())
    assert scope.cancelled_caught
    with trio.CancelScope() as scope:
        scope.cancel()
        await adoptable.take("kept")
    assert scope.cancelled_caught
    with trio.testing.assert_checkpoints():
        await adoptable.put("b", SNAPSHOT, later())
    with trio.testing.assert_checkpoints():
        assert await adoptable.take("b") == SNAPSHOT
    with trio.CancelScope() as scope:
        scope.cancel()
        await adoptable.put("c", SNAPSHOT, time.time() - 1)
        await adoptable.take_expired(10)
    with trio.testing.assert_checkpoints():
        assert await adoptable.take_expired(10) == []
    assert await adoptable.take("a") is None
    assert await adoptable.take("kept") == SNAPSHOT


# -- the memory store ------------------------------------------------------------------------


class FakeClock:
    """Wall-clock seconds that move only when a test says so."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_memory_snapshots_expire_by_the_injected_clock() -> None:
    clock = FakeClock()
    store = MemoryAdoptableStore(clock)
    await store.put("a", b"a", clock.now + 10)
    await store.put("b", b"b", clock.now + 10)
    clock.now += 9.999
    assert await store.take("a") == b"a"
    assert await store.take_expired(10) == []
    clock.now += 0.001  # at expires_at: expired
    assert await store.take("b") is None
    assert len(store) == 1  # kept, for the sweep
    assert await store.take_expired(10) == [("b", b"b")]
    assert len(store) == 0


async def test_memory_heap_stays_bounded_when_snapshots_are_replaced_and_taken() -> None:
    clock = FakeClock()
    store = MemoryAdoptableStore(clock)
    for n in range(10_000):  # nothing expires, yet every put leaves a dead heap item
        await store.put("same", str(n).encode(), clock.now + 3600)
        if n % 2:
            assert await store.take("same") == str(n).encode()
    assert len(store) == 0
    assert len(store._heap) <= 2 * 1 + 64  # rebuilt past twice the snapshots plus 64
    clock.now += 3600
    assert await store.take_expired(10) == []
    assert store._heap == []


# -- the Redis store -------------------------------------------------------------------------


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    async with open_redis(redis_url) as client:
        yield client


@pytest.fixture
async def other(redis_url: str) -> AsyncIterator[Redis]:
    """A second client on the same database: another node of the cluster."""
    async with open_redis(redis_url) as client:
        yield client


async def test_a_redis_snapshot_is_one_key_scored_by_its_expiry_and_kept_a_day_more(
    client: Redis,
) -> None:
    store = RedisAdoptableStore(client)
    expires_at = later(600.0) + 0.0004
    await store.put("abc", SNAPSHOT, expires_at)
    assert await client.keys("*") == {b"xg:adopt:abc", b"xg:adoptable"}
    assert await client.get("xg:adopt:abc") == SNAPSHOT
    assert await client.zscore("xg:adoptable", "abc") == expires_at
    expiry = await client.pexpiretime("xg:adopt:abc")  # coredis gives a datetime
    assert round(expiry.timestamp() * 1000) == math.ceil((expires_at + KEEP_AFTER) * 1000)
    assert await store.take("abc") == SNAPSHOT
    assert await client.keys("*") == set()


async def test_redis_expiry_follows_the_node_s_clock(client: Redis) -> None:
    # The node's clock runs a minute slow: for it, a snapshot past by real time is not.
    slow = RedisAdoptableStore(client, clock=lambda: time.time() - 60)
    await slow.put("a", SNAPSHOT, time.time() - 1)
    assert await slow.take_expired(10) == []
    assert await slow.take("a") == SNAPSHOT


async def test_two_nodes_share_snapshots_and_only_one_takes_each(
    client: Redis, other: Redis
) -> None:
    draining = RedisAdoptableStore(client)
    nodes = [RedisAdoptableStore(client), RedisAdoptableStore(other)]
    for n in range(10):
        await draining.put(f"s{n}", str(n).encode(), later())
    got: list[bytes] = []

    async def adopt(store: RedisAdoptableStore) -> None:
        for n in range(10):
            snapshot = await store.take(f"s{n}")
            if snapshot is not None:
                got.append(snapshot)

    async with trio.open_nursery() as nursery:
        for store in nodes:
            nursery.start_soon(adopt, store)
    assert sorted(got) == sorted(str(n).encode() for n in range(10))


async def test_redis_prefixes_keep_stores_apart(client: Redis) -> None:
    first = RedisAdoptableStore(client, prefix="one:")
    second = RedisAdoptableStore(client, prefix="two:")
    await first.put("a", b"1", later())
    await second.put("a", b"2", later())
    assert await client.keys("*") == {
        b"one:adopt:a",
        b"one:adoptable",
        b"two:adopt:a",
        b"two:adoptable",
    }
    assert await second.take("a") == b"2"
    assert await first.take("a") == b"1"


async def test_a_command_redis_refuses_is_a_storage_error(client: Redis) -> None:
    await client.hset("xg:adopt:a", {"not": "a string"})
    with pytest.raises(StorageError, match=r"redis adoptable take: .*wrong kind of value"):
        await RedisAdoptableStore(client).take("a")


async def test_an_unreachable_redis_is_a_storage_error_from_every_call() -> None:
    with trio.fail_after(30):  # a hang fails the test; refusals come at once
        async with open_redis(f"redis://127.0.0.1:{free_port()}/0") as client:
            store = RedisAdoptableStore(client)
            with pytest.raises(StorageError, match=r"redis adoptable put: .*connection"):
                await store.put("a", SNAPSHOT, later())
            with pytest.raises(StorageError, match=r"redis adoptable take_expired: .*connection"):
                await store.take_expired(10)
            with pytest.raises(StorageError, match=r"redis adoptable take: .*connection"):
                await store.take("a")
