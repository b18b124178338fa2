"""The in-memory SM tables beyond the contracts (`test_sm_session_contract.py`,
`test_stale_h_contract.py`): sizes, the stale_h bound's counter, sweeping from the old end
in batches, and entries put out of time order."""

from __future__ import annotations

import trio
import trio.testing

from gateway.storage.base import SmSessionRecord, StaleH
from gateway.storage.memory import MemorySmSessionTable, MemoryStaleHTable


def record(smid: str) -> SmSessionRecord:
    return SmSessionRecord(smid=smid, jid="juliet@example.com", node="local", created=1.0)


def stale(smid: str, at: float, h: int = 7) -> StaleH:
    return StaleH(smid=smid, h=h, jid="juliet@example.com", at=at)


async def test_the_tables_count_their_entries() -> None:
    sessions, stale_h = MemorySmSessionTable(), MemoryStaleHTable()
    await sessions.register(record("a"))
    await sessions.register(record("a"))
    await sessions.register(record("b"))
    assert len(sessions) == 2
    await stale_h.put(stale("a", at=1.0))
    await stale_h.put(stale("a", at=2.0))
    assert len(stale_h) == 1
    assert await stale_h.sweep(3.0) == 1
    assert len(stale_h) == 0


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


async def test_full_stale_h_table_counts_what_it_dropped() -> None:
    table = MemoryStaleHTable(max_entries=3)
    evicted = [await table.put(stale(f"s{i}", at=float(i))) for i in range(5)]
    assert len(table) == 3
    assert evicted == [0, 0, 0, 1, 1]
    # Replacing an existing smid at the bound drops nothing else.
    assert await table.put(stale("s2", at=9.0)) == 0
    assert len(table) == 3


async def test_churning_sessions_cannot_grow_stale_h_past_its_bound() -> None:
    table = MemoryStaleHTable(max_entries=1000)
    evicted = 0
    for i in range(20_000):
        evicted += await table.put(stale(f"s{i}", at=float(i)))
    assert len(table) == 1000
    assert evicted == 19_000
    assert await table.sweep(19_500.0) == 500
