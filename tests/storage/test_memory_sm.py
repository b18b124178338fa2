"""The in-memory SM tables: sm_session lookups, stale_h sweeps by age and its size bound."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from gateway.storage.base import SmSessionRecord, SmSessionTable, StaleH, StaleHTable
from gateway.storage.memory import MemorySmSessionTable, MemoryStaleHTable


def record(smid: str, jid: str = "juliet@example.com") -> SmSessionRecord:
    return SmSessionRecord(smid=smid, jid=jid, node="local", created=1.0)


def stale(smid: str, at: float, h: int = 7) -> StaleH:
    return StaleH(smid=smid, h=h, jid="juliet@example.com", at=at)


async def test_registered_session_is_found_until_removed() -> None:
    table: SmSessionTable = MemorySmSessionTable()
    await table.register(record("a"))
    assert await table.lookup("a") == record("a")
    assert await table.lookup("b") is None
    assert await table.remove("a")
    assert not await table.remove("a")
    assert await table.lookup("a") is None


async def test_registering_an_smid_again_replaces_the_record() -> None:
    table = MemorySmSessionTable()
    await table.register(record("a"))
    moved = SmSessionRecord(smid="a", jid="juliet@example.com", node="node2", created=2.0)
    await table.register(moved)
    assert await table.lookup("a") == moved
    assert len(table) == 1


async def test_sm_table_calls_are_checkpoints_and_do_nothing_when_cancelled() -> None:
    table = MemorySmSessionTable()
    with trio.CancelScope() as scope:
        scope.cancel()
        await table.register(record("a"))
    assert scope.cancelled_caught
    assert await table.lookup("a") is None
    with trio.testing.assert_checkpoints():
        await table.lookup("a")


async def test_shielded_cleanup_in_a_cancelled_task_still_removes_and_records() -> None:
    # How a session task ends (STYLE C5, C9): its finally runs shielded.
    sessions, stale_h = MemorySmSessionTable(), MemoryStaleHTable()
    await sessions.register(record("a"))
    with trio.CancelScope() as scope:
        try:
            scope.cancel()
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                assert await sessions.remove("a")
                await stale_h.put(stale("a", at=trio.current_time()))
    assert await sessions.lookup("a") is None
    assert await stale_h.get("a") is not None


async def test_stale_h_is_found_until_swept() -> None:
    table: StaleHTable = MemoryStaleHTable()
    await table.put(stale("a", at=10.0, h=2**32 - 1))
    assert await table.get("a") == stale("a", at=10.0, h=2**32 - 1)
    assert await table.get("b") is None


async def test_sweep_removes_only_entries_strictly_older_than_the_cutoff() -> None:
    table = MemoryStaleHTable()
    for i, at in enumerate([1.0, 2.0, 3.0, 3.0, 4.0]):
        await table.put(stale(f"s{i}", at))
    assert await table.sweep(1.0) == 0  # at == cutoff is kept
    assert await table.sweep(3.0) == 2
    assert [await table.get(f"s{i}") is None for i in range(5)] == [True, True, False, False, False]
    assert await table.sweep(3.5) == 2
    assert await table.sweep(100.0) == 1
    assert await table.sweep(100.0) == 0
    assert len(table) == 0


async def test_putting_an_smid_again_replaces_it_and_makes_it_young() -> None:
    table = MemoryStaleHTable()
    await table.put(stale("a", at=1.0, h=1))
    await table.put(stale("b", at=2.0))
    await table.put(stale("a", at=3.0, h=5))
    assert len(table) == 2
    assert await table.sweep(2.5) == 1
    assert await table.get("b") is None
    assert await table.get("a") == stale("a", at=3.0, h=5)


async def test_an_entry_put_out_of_time_order_is_swept_with_the_ones_before_it() -> None:
    table = MemoryStaleHTable()
    await table.put(stale("new", at=10.0))
    await table.put(stale("late", at=5.0))
    assert await table.sweep(8.0) == 0  # kept no longer than "new"
    assert await table.sweep(11.0) == 2


async def test_sweep_of_100k_entries_removes_them_all_and_yields_between_batches() -> None:
    table = MemoryStaleHTable()
    for i in range(100_010):
        await table.put(stale(f"s{i}", at=float(i)))
    assert len(table) == 100_000  # the default bound dropped s0..s9
    with trio.testing.assert_checkpoints():
        assert await table.sweep(100_000.0) == 99_990
    assert len(table) == 10
    assert await table.get("s99999") is None
    assert await table.get("s100000") is not None


async def test_a_put_during_a_long_sweep_is_kept() -> None:
    table = MemoryStaleHTable()
    for i in range(10_000):
        await table.put(stale(f"s{i}", at=0.0))
    removed: list[int] = []

    async def sweep() -> None:
        removed.append(await table.sweep(1.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sweep)
        await table.put(stale("young", at=5.0))
    assert removed == [10_000]
    assert await table.get("young") is not None


async def test_full_stale_h_table_drops_its_oldest_entries() -> None:
    table = MemoryStaleHTable(max_entries=3)
    for i in range(5):
        await table.put(stale(f"s{i}", at=float(i)))
    assert len(table) == 3
    assert table.evicted == 2
    assert await table.get("s0") is None
    assert await table.get("s1") is None
    assert await table.get("s4") is not None
    # Replacing an existing smid at the bound drops nothing else.
    await table.put(stale("s2", at=9.0))
    assert len(table) == 3
    assert table.evicted == 2
    assert await table.get("s3") is not None


async def test_churning_sessions_cannot_grow_stale_h_past_its_bound() -> None:
    table = MemoryStaleHTable(max_entries=1000)
    for i in range(20_000):
        await table.put(stale(f"s{i}", at=float(i)))
    assert len(table) == 1000
    assert table.evicted == 19_000
    assert await table.sweep(19_500.0) == 500


def test_stale_h_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        MemoryStaleHTable(max_entries=0)
