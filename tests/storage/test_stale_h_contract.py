"""The `StaleHTable` contract (`stale_h`), run by every implementation: lookups, sweeps by
age, the size bound, every call a checkpoint, shielded cleanup."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from gateway.storage.base import StaleH, StaleHTable
from tests.storage.helpers import OpenStaleH


def stale(smid: str, at: float, h: int = 7) -> StaleH:
    return StaleH(smid=smid, h=h, jid="juliet@example.com", at=at)


async def test_stale_h_is_found_until_swept(stale_h: StaleHTable) -> None:
    await stale_h.put(stale("a", at=10.0, h=2**32 - 1))
    await stale_h.put(stale("z", at=11.0, h=0))
    assert await stale_h.get("a") == stale("a", at=10.0, h=2**32 - 1)
    assert await stale_h.get("z") == stale("z", at=11.0, h=0)
    assert await stale_h.get("b") is None
    assert await stale_h.sweep(10.5) == 1
    assert await stale_h.get("a") is None
    assert await stale_h.get("z") is not None


async def test_sweep_removes_only_entries_strictly_older_than_the_cutoff(
    stale_h: StaleHTable,
) -> None:
    for i, at in enumerate([1.0, 2.0, 3.0, 3.0, 4.0]):
        await stale_h.put(stale(f"s{i}", at))
    assert await stale_h.sweep(1.0) == 0  # at == cutoff is kept
    assert await stale_h.sweep(3.0) == 2
    assert [await stale_h.get(f"s{i}") is None for i in range(5)] == [
        True,
        True,
        False,
        False,
        False,
    ]
    assert await stale_h.sweep(3.5) == 2
    assert await stale_h.sweep(100.0) == 1
    assert await stale_h.sweep(100.0) == 0
    assert [await stale_h.get(f"s{i}") for i in range(5)] == [None] * 5


async def test_putting_an_smid_again_replaces_it_and_makes_it_young(stale_h: StaleHTable) -> None:
    await stale_h.put(stale("a", at=1.0, h=1))
    await stale_h.put(stale("b", at=2.0))
    await stale_h.put(stale("a", at=3.0, h=5))
    assert await stale_h.sweep(2.5) == 1
    assert await stale_h.get("b") is None
    assert await stale_h.get("a") == stale("a", at=3.0, h=5)


async def test_a_put_during_a_long_sweep_is_kept(stale_h: StaleHTable) -> None:
    # More entries than one sweep batch of either implementation (1024), so it yields.
    for i in range(2000):
        await stale_h.put(stale(f"s{i}", at=0.0))
    removed: list[int] = []

    async def sweep() -> None:
        removed.append(await stale_h.sweep(1.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sweep)
        await stale_h.put(stale("young", at=5.0))
    assert removed == [2000]
    assert await stale_h.get("young") is not None


async def test_full_stale_h_table_drops_its_oldest_entries(open_stale_h: OpenStaleH) -> None:
    async with open_stale_h(max_entries=3) as table:
        for i in range(5):
            await table.put(stale(f"s{i}", at=float(i)))
        assert [await table.get(f"s{i}") is not None for i in range(5)] == [
            False,
            False,
            True,
            True,
            True,
        ]
        # Replacing an existing smid at the bound drops nothing else.
        await table.put(stale("s2", at=9.0))
        assert [await table.get(f"s{i}") is not None for i in range(2, 5)] == [True] * 3
        # The replaced entry became the youngest: s3 goes first now.
        await table.put(stale("s5", at=10.0))
        assert await table.get("s3") is None
        assert await table.get("s2") is not None


async def test_stale_h_bound_must_be_positive(open_stale_h: OpenStaleH) -> None:
    with pytest.raises(ValueError, match="max_entries"):
        async with open_stale_h(max_entries=0):
            pass


async def test_stale_h_calls_are_checkpoints_and_do_nothing_when_cancelled(
    stale_h: StaleHTable,
) -> None:
    await stale_h.put(stale("kept", at=1.0))
    with trio.CancelScope() as scope:
        scope.cancel()
        await stale_h.put(stale("a", at=1.0))
    assert scope.cancelled_caught
    with trio.CancelScope() as scope:
        scope.cancel()
        await stale_h.sweep(100.0)
    assert scope.cancelled_caught
    assert await stale_h.get("a") is None
    assert await stale_h.get("kept") is not None
    with trio.testing.assert_checkpoints():
        await stale_h.get("a")
    with trio.testing.assert_checkpoints():
        await stale_h.put(stale("b", at=2.0))
    with trio.testing.assert_checkpoints():
        await stale_h.sweep(0.0)


async def test_shielded_cleanup_in_a_cancelled_task_still_records(stale_h: StaleHTable) -> None:
    # How a session task ends (STYLE C5, C9): its finally runs shielded.
    with trio.CancelScope() as scope:
        try:
            scope.cancel()
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await stale_h.put(stale("a", at=trio.current_time()))
    assert await stale_h.get("a") is not None
