"""The `SmSessionTable` contract (`sm_session`), run by every implementation: lookups,
replacement, every call a checkpoint, shielded cleanup, concurrent tasks."""

from __future__ import annotations

import trio
import trio.testing

from gateway.storage.base import SmSessionRecord, SmSessionTable


def record(smid: str, jid: str = "juliet@example.com") -> SmSessionRecord:
    return SmSessionRecord(smid=smid, jid=jid, node="local", created=1.0)


async def test_registered_session_is_found_until_removed(sm_sessions: SmSessionTable) -> None:
    await sm_sessions.register(record("a"))
    assert await sm_sessions.lookup("a") == record("a")
    assert await sm_sessions.lookup("b") is None
    assert await sm_sessions.remove("a")
    assert not await sm_sessions.remove("a")
    assert await sm_sessions.lookup("a") is None


async def test_registering_an_smid_again_replaces_the_record(sm_sessions: SmSessionTable) -> None:
    await sm_sessions.register(record("a"))
    await sm_sessions.register(record("b", jid="romeo@example.net"))
    moved = SmSessionRecord(smid="a", jid="juliet@example.com", node="node2", created=2.5)
    await sm_sessions.register(moved)
    assert await sm_sessions.lookup("a") == moved
    assert await sm_sessions.lookup("b") == record("b", jid="romeo@example.net")
    assert await sm_sessions.remove("a")
    assert await sm_sessions.lookup("a") is None  # one record per smid


async def test_sm_table_calls_are_checkpoints_and_do_nothing_when_cancelled(
    sm_sessions: SmSessionTable,
) -> None:
    await sm_sessions.register(record("kept"))
    with trio.CancelScope() as scope:
        scope.cancel()
        await sm_sessions.register(record("a"))
    assert scope.cancelled_caught
    with trio.CancelScope() as scope:
        scope.cancel()
        await sm_sessions.remove("kept")
    assert scope.cancelled_caught
    assert await sm_sessions.lookup("a") is None
    assert await sm_sessions.lookup("kept") is not None
    with trio.testing.assert_checkpoints():
        await sm_sessions.lookup("a")
    with trio.testing.assert_checkpoints():
        await sm_sessions.register(record("b"))
    with trio.testing.assert_checkpoints():
        await sm_sessions.remove("b")


async def test_shielded_cleanup_in_a_cancelled_task_still_removes(
    sm_sessions: SmSessionTable,
) -> None:
    # How a session task ends (STYLE C5, C9): its finally runs shielded.
    await sm_sessions.register(record("a"))
    with trio.CancelScope() as scope:
        try:
            scope.cancel()
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                assert await sm_sessions.remove("a")
    assert await sm_sessions.lookup("a") is None


async def test_many_tasks_registering_and_removing_at_once(sm_sessions: SmSessionTable) -> None:
    async def churn(task: int) -> None:
        for n in range(20):
            await sm_sessions.register(record(f"s{task}-{n}", jid=f"u{task}@example.com"))
            if n % 2:
                assert await sm_sessions.remove(f"s{task}-{n - 1}")

    async with trio.open_nursery() as nursery:
        for task in range(8):
            nursery.start_soon(churn, task)
    for task in range(8):
        for n in range(20):
            found = await sm_sessions.lookup(f"s{task}-{n}")
            expected = record(f"s{task}-{n}", jid=f"u{task}@example.com") if n % 2 else None
            assert found == expected
