"""The Redis SM tables beyond the contracts (`test_sm_session_contract.py`,
`test_stale_h_contract.py`): the keys they write, two nodes sharing them, prefixes, sweeps
and bounds over many entries, scripts lost by Redis, and Redis failures as `StorageError`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from coredis.tokens import PureToken

from gateway.errors import StorageError
from gateway.storage.base import SmSessionRecord, StaleH
from gateway.storage.redis_client import Redis, open_redis
from gateway.storage.sm_redis import RedisSmSessionTable, RedisStaleHTable
from tests.helpers.redis import free_port, run_redis


def record(smid: str, node: str = "gw1", epoch: int = 0) -> SmSessionRecord:
    return SmSessionRecord(
        smid=smid, jid="juliet@example.com", node=node, created=1700000000.125, epoch=epoch
    )


def stale(smid: str, at: float, h: int = 7) -> StaleH:
    return StaleH(smid=smid, h=h, jid="juliet@example.com", at=at)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    async with open_redis(redis_url) as client:
        yield client


@pytest.fixture
async def other(redis_url: str) -> AsyncIterator[Redis]:
    """A second client on the same database: another node of the cluster."""
    async with open_redis(redis_url) as client:
        yield client


async def keys(client: Redis) -> list[bytes]:
    return sorted(await client.keys("*"))


async def test_a_session_record_is_one_hash_of_its_fields(client: Redis) -> None:
    sessions = RedisSmSessionTable(client)
    await sessions.register(record("abc", epoch=3))
    assert await keys(client) == [b"xg:sm:abc"]
    assert await client.hgetall("xg:sm:abc") == {
        b"smid": b"abc",
        b"jid": b"juliet@example.com",
        b"node": b"gw1",
        b"created": b"1700000000.125",
        b"epoch": b"3",
    }
    assert await sessions.remove("abc")
    assert await keys(client) == []


async def test_a_stale_h_entry_is_a_hash_and_a_member_scored_by_at(client: Redis) -> None:
    table = RedisStaleHTable(client)
    await table.put(stale("abc", at=1700000000.1, h=2**32 - 1))
    assert await keys(client) == [b"xg:stale_h", b"xg:stale_h:abc"]
    assert await client.hgetall("xg:stale_h:abc") == {
        b"smid": b"abc",
        b"h": b"4294967295",
        b"jid": b"juliet@example.com",
        b"at": b"1700000000.1",
    }
    [member] = await client.zrange("xg:stale_h", 0, -1, withscores=True)
    assert (member.member, member.score) == (b"abc", 1700000000.1)
    assert await table.get("abc") == stale("abc", at=1700000000.1, h=2**32 - 1)
    assert await table.sweep(1700000000.2) == 1
    assert await keys(client) == []  # the empty set is gone too


async def test_two_nodes_see_each_others_writes(client: Redis, other: Redis) -> None:
    one, two = RedisSmSessionTable(client), RedisSmSessionTable(other)
    await one.register(record("a", node="gw1"))
    assert await two.lookup("a") == record("a", node="gw1")
    await two.register(record("a", node="gw2", epoch=1))  # the session moved
    assert await one.lookup("a") == record("a", node="gw2", epoch=1)
    assert await two.remove("a")
    assert not await one.remove("a")

    h_one, h_two = RedisStaleHTable(client), RedisStaleHTable(other)
    await h_one.put(stale("b", at=5.0))
    assert await h_two.get("b") == stale("b", at=5.0)
    assert await h_two.sweep(6.0) == 1
    assert await h_one.get("b") is None


async def test_tables_with_other_prefixes_do_not_see_each_other(client: Redis) -> None:
    blue, green = RedisSmSessionTable(client), RedisSmSessionTable(client, prefix="green:")
    await blue.register(record("a"))
    assert await green.lookup("a") is None
    assert not await green.remove("a")
    h_blue, h_green = RedisStaleHTable(client), RedisStaleHTable(client, prefix="green:")
    await h_green.put(stale("a", at=1.0))
    assert await h_blue.sweep(100.0) == 0
    assert await h_blue.get("a") is None
    assert await h_green.get("a") == stale("a", at=1.0)


async def test_sweep_removes_every_old_entry_across_many_batches(client: Redis) -> None:
    table = RedisStaleHTable(client)
    for i in range(2100):
        await table.put(stale(f"s{i}", at=float(i)))
    assert await table.sweep(2050.0) == 2050  # two full batches of 1024, and 2
    assert await client.zcard("xg:stale_h") == 50
    assert len(await client.keys("xg:stale_h:*")) == 50
    assert await table.get("s2049") is None
    assert await table.get("s2050") == stale("s2050", at=2050.0)
    assert await table.sweep(float("inf")) == 50
    assert await keys(client) == []


async def test_sweep_goes_by_at_even_for_entries_put_out_of_order(client: Redis) -> None:
    # The memory table may keep such an entry until those put before it are swept; here
    # the set is ordered by `at`, so the sweep is exact.
    table = RedisStaleHTable(client)
    await table.put(stale("late", at=10.0))
    await table.put(stale("early", at=1.0))
    assert await table.sweep(5.0) == 1
    assert await table.get("early") is None
    assert await table.get("late") is not None


async def test_the_bound_drops_the_oldest_others_and_counts_them(client: Redis) -> None:
    table = RedisStaleHTable(client, max_entries=10)
    assert [await table.put(stale(f"s{i}", at=float(10 + i))) for i in range(11)] == [0] * 10 + [1]
    # An entry put with the lowest `at` still drops another one, never itself.
    assert await table.put(stale("early", at=0.0)) == 1
    assert await table.get("early") is not None
    assert await table.get("s1") is None
    # A node with a lower bound trims the shared table down to it, and says how many.
    smaller = RedisStaleHTable(client, max_entries=4)
    assert await smaller.put(stale("new", at=30.0)) == 7
    assert await client.zcard("xg:stale_h") == 4
    assert len(await client.keys("xg:stale_h:*")) == 4
    assert [await table.get(s) is not None for s in ("s8", "s9", "s10", "new")] == [True] * 4


async def test_scripts_flushed_from_redis_are_loaded_again(client: Redis) -> None:
    table = RedisStaleHTable(client)
    await table.put(stale("a", at=1.0))
    await client.script_flush()  # as after a Redis restart
    await table.put(stale("b", at=2.0))
    await client.script_flush()
    assert await table.sweep(3.0) == 2


async def test_malformed_records_are_storage_errors(client: Redis) -> None:
    await client.hset("xg:sm:a", {"jid": "juliet@example.com"})
    with pytest.raises(StorageError, match="sm_session record 'a' is malformed"):
        await RedisSmSessionTable(client).lookup("a")
    await client.hset("xg:stale_h:b", {"h": "x", "jid": "juliet@example.com", "at": "1.0"})
    with pytest.raises(StorageError, match="stale_h entry 'b' is malformed"):
        await RedisStaleHTable(client).get("b")


async def test_a_command_redis_refuses_is_a_storage_error(client: Redis) -> None:
    await client.set("xg:stale_h", "not a sorted set")
    table = RedisStaleHTable(client)
    with pytest.raises(StorageError, match=r"redis stale_h put: .*wrong kind of value"):
        await table.put(stale("a", at=1.0))
    with pytest.raises(StorageError, match=r"redis stale_h sweep: .*wrong kind of value"):
        await table.sweep(2.0)


async def test_a_put_cancelled_while_waiting_still_happens_and_the_client_stays_usable(
    client: Redis, other: Redis
) -> None:
    table = RedisStaleHTable(client)
    # Connected, and the script loaded (else the put below would wait for NOSCRIPT and
    # be cancelled before it is sent again): the put waits for its answer only.
    await table.put(stale("first", at=0.5))
    await other.client_pause(2000, PureToken.WRITE)  # Redis holds writes until the unpause
    with trio.CancelScope() as scope:

        async def cancel_when_waiting() -> None:
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_when_waiting)
            await table.put(stale("a", at=1.0))
    assert scope.cancelled_caught
    await other.client_unpause()
    # Redis ran the put it had received; only the answer was lost. The next call on the
    # client is answered after it.
    assert await table.get("a") == stale("a", at=1.0)
    assert await table.put(stale("b", at=2.0)) == 0
    assert await table.sweep(3.0) == 3


def calls(client: Redis) -> list[tuple[str, Callable[[], Awaitable[object]]]]:
    """Every method of both tables, with the name its errors carry."""
    sessions, table = RedisSmSessionTable(client), RedisStaleHTable(client)
    return [
        ("sm_session register", lambda: sessions.register(record("a"))),
        ("sm_session lookup", lambda: sessions.lookup("a")),
        ("sm_session remove", lambda: sessions.remove("a")),
        ("stale_h put", lambda: table.put(stale("a", at=1.0))),
        ("stale_h get", lambda: table.get("a")),
        ("stale_h sweep", lambda: table.sweep(2.0)),
    ]


async def test_an_unreachable_redis_is_a_storage_error_from_every_call() -> None:
    with trio.fail_after(30):  # a hang fails the test; refusals come at once
        async with open_redis(f"redis://127.0.0.1:{free_port()}/0") as client:
            for what, call in calls(client):
                with pytest.raises(StorageError, match=rf"redis {what}: .*connection"):
                    await call()


async def test_redis_stopping_between_calls_is_a_storage_error(tmp_path: Path) -> None:
    # A server of its own, since this one is stopped.
    with contextlib.contextmanager(run_redis)(tmp_path) as server, trio.fail_after(30):
        async with open_redis(server.url) as client:
            await RedisSmSessionTable(client).register(record("a"))
            server.process.terminate()
            server.process.wait()
            for what, call in calls(client):
                with pytest.raises(StorageError, match=f"redis {what}: "):
                    await call()
