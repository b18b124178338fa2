"""Sessions handed off in SQLite beyond the `HandoffStore` contract
(`test_handoff_contract.py`): surviving a restart, the shared file and its schema, and a
take that is atomic across store objects (connections) and threads."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from gateway.errors import StorageError
from gateway.storage.handoff_sqlite import SqliteHandoffStore
from gateway.storage.sqlite import SqliteAccountStore
from tests.storage.helpers import snap


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "gateway.sqlite"


def test_snapshots_survive_closing_and_reopening_the_file(path: Path) -> None:
    with SqliteHandoffStore(path) as draining:
        draining.put_many([snap(n) for n in range(3)])
    with SqliteHandoffStore(path) as restarted:
        assert restarted.count() == 3
        assert restarted.take_all() == [snap(n)[1] for n in range(3)]
    with SqliteHandoffStore(path) as again:
        assert again.take_all() == []


def test_two_stores_on_one_file_never_both_take_a_snapshot(path: Path) -> None:
    with SqliteHandoffStore(path) as first, SqliteHandoffStore(path) as second:
        first.put_many([snap(1), snap(2)])
        assert second.count() == 2
        assert second.take_all() == [snap(1)[1], snap(2)[1]]
        assert first.take_all() == []
        assert first.count() == 0


def test_handoff_store_shares_the_file_and_versions_its_schema(path: Path) -> None:
    SqliteAccountStore(path).close()
    SqliteHandoffStore(path).close()
    SqliteHandoffStore(path).close()  # opening again keeps the schema
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT component, version FROM schema_version ORDER BY 1").fetchall()
    db.close()
    assert rows == [("accounts", 1), ("sm_handoff", 1)]


def test_a_file_with_another_schema_version_is_refused(path: Path) -> None:
    SqliteHandoffStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE schema_version SET version = 2 WHERE component = 'sm_handoff'")
    db.close()
    with pytest.raises(StorageError, match="sm_handoff schema version 2"):
        SqliteHandoffStore(path)


def test_an_in_memory_store_works() -> None:
    with SqliteHandoffStore(":memory:") as store:
        store.put_many([snap(1)])
        assert store.take_all() == [snap(1)[1]]


def test_closing_the_store_loses_nothing_in_the_file(path: Path) -> None:
    store = SqliteHandoffStore(path)
    store.put_many([snap(1)])
    store.close()
    with pytest.raises(StorageError, match="closed"):
        store.take_all()
    with SqliteHandoffStore(path) as reopened:  # nothing was lost or taken
        assert reopened.take_all() == [snap(1)[1]]


def test_threads_taking_at_once_take_each_snapshot_exactly_once(path: Path) -> None:
    # Separate store objects: separate connections, serialized only by SQLite's write lock.
    stores = [SqliteHandoffStore(path) for _ in range(4)]
    try:
        stores[0].put_many([snap(n) for n in range(200)])
        barrier = threading.Barrier(len(stores))
        got: list[list[bytes]] = [[] for _ in stores]

        def work(index: int) -> None:
            barrier.wait()
            got[index] = stores[index].take_all()

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(stores))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        everything = [data for batch in got for data in batch]
        assert sorted(everything) == sorted(snap(n)[1] for n in range(200))
        # One taker got them all, oldest first; the others got nothing.
        assert sorted(len(batch) for batch in got) == [0, 0, 0, 200]
        assert max(got, key=len) == [snap(n)[1] for n in range(200)]
        assert stores[1].count() == 0
    finally:
        for s in stores:
            s.close()
