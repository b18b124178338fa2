"""The SQLite SM tables beyond the contracts (`test_sm_session_contract.py`,
`test_stale_h_contract.py`): the shared file and its schema, reopening it, two
connections on one file, the inline runner under a mock clock, the bound's counter, batched
sweeps, and database errors."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio
import trio.testing

from gateway.core.blocking import in_threads, inline
from gateway.errors import StorageError
from gateway.storage.base import SmSessionRecord, StaleH
from gateway.storage.sm_sqlite import SqliteSmSessionTable, SqliteStaleHTable
from gateway.storage.sqlite import SqliteAccountStore


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "gateway.sqlite"


def record(smid: str, node: str = "gw1") -> SmSessionRecord:
    return SmSessionRecord(smid=smid, jid="juliet@example.com", node=node, created=12.5)


def stale(smid: str, at: float, h: int = 7) -> StaleH:
    return StaleH(smid=smid, h=h, jid="juliet@example.com", at=at)


def test_sm_tables_share_the_file_and_version_their_schemas(path: Path) -> None:
    SqliteAccountStore(path).close()
    for _ in range(2):  # opening again keeps the schema
        SqliteSmSessionTable(path, inline).close()
        SqliteStaleHTable(path, inline).close()
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT component, version FROM schema_version ORDER BY 1").fetchall()
    db.close()
    assert rows == [("accounts", 1), ("sm_session", 1), ("stale_h", 1)]


@pytest.mark.parametrize("table", [SqliteSmSessionTable, SqliteStaleHTable])
def test_a_file_with_another_schema_version_is_refused(
    path: Path, table: type[SqliteSmSessionTable | SqliteStaleHTable]
) -> None:
    table(path, inline).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE schema_version SET version = 2 WHERE component = ?", (table.component,))
    db.close()
    with pytest.raises(StorageError, match=f"{table.component} schema version 2"):
        table(path, inline)


async def test_records_survive_reopening_the_file(path: Path) -> None:
    with SqliteSmSessionTable(path, inline) as sessions, SqliteStaleHTable(path, inline) as h:
        await sessions.register(record("a"))
        await h.put(stale("b", at=3.25, h=2**32 - 1))
    with SqliteSmSessionTable(path, inline) as sessions, SqliteStaleHTable(path, inline) as h:
        assert await sessions.lookup("a") == record("a")
        assert await h.get("b") == stale("b", at=3.25, h=2**32 - 1)


async def test_two_table_objects_on_one_file_see_each_others_writes(path: Path) -> None:
    run = in_threads(2)
    with SqliteSmSessionTable(path, run) as one, SqliteSmSessionTable(path, run) as two:
        await one.register(record("a", node="gw1"))
        assert await two.lookup("a") == record("a", node="gw1")
        await two.register(record("a", node="gw2"))
        assert await one.lookup("a") == record("a", node="gw2")
        assert await one.remove("a")
        assert not await two.remove("a")


async def test_the_inline_runner_needs_no_threads_under_a_mock_clock(
    path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with SqliteStaleHTable(path, inline) as table:
        await table.put(stale("a", at=trio.current_time()))
        await trio.sleep(3600)  # the clock jumps; nothing waits on a thread
        assert await table.sweep(trio.current_time()) == 1


async def test_full_table_counts_what_it_dropped_and_keeps_its_bound(path: Path) -> None:
    with SqliteStaleHTable(path, inline, max_entries=10) as table:
        evicted = 0
        for i in range(30):
            evicted += await table.put(stale(f"s{i}", at=float(i)))
            # A replacement leaves a gap in seq, and drops nothing else.
            assert await table.put(stale(f"s{i}", at=float(i))) == 0
        assert evicted == 20
        assert [await table.get(f"s{i}") is not None for i in range(30)] == [False] * 20 + [
            True
        ] * 10


async def test_a_sweep_of_several_batches_deletes_everything_older(path: Path) -> None:
    with SqliteStaleHTable(path, inline) as table:
        await table.put(stale("first", at=0.0))
    with sqlite3.connect(path) as db:  # quicker than 5000 puts
        db.executemany(
            "INSERT INTO stale_h (smid, h, jid, at) VALUES (?, 1, 'j@example.com', ?)",
            [(f"s{i}", float(i % 100)) for i in range(5000)],
        )
    db.close()
    with SqliteStaleHTable(path, inline) as table:
        with trio.testing.assert_checkpoints():
            assert await table.sweep(50.0) == 2501
        assert await table.get("s49") is None
        assert await table.get("s50") is not None
        assert await table.sweep(1000.0) == 2500


async def test_an_h_out_of_range_is_a_storage_error(path: Path) -> None:
    with SqliteStaleHTable(path, inline) as table:
        with pytest.raises(StorageError, match="write failed"):
            await table.put(stale("a", at=1.0, h=2**32))
        assert await table.get("a") is None


async def test_closed_tables_raise_storage_error(path: Path) -> None:
    sessions, stale_h = SqliteSmSessionTable(path, inline), SqliteStaleHTable(path, inline)
    sessions.close()
    stale_h.close()
    stale_h.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        await sessions.lookup("a")
    with pytest.raises(StorageError, match="closed"):
        await stale_h.put(stale("a", at=1.0))
