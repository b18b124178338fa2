"""Sessions handed off at shutdown, in SQLite: order, replacement, surviving a restart, and
a take that is atomic across store objects and threads."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.errors import StorageError
from gateway.storage.base import HandoffStore, SessionSnapshot
from gateway.storage.handoff_sqlite import SqliteHandoffStore
from gateway.storage.snapshot import decode_snapshot, encode_snapshot
from gateway.storage.sqlite import SqliteAccountStore
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "gateway.sqlite"


@pytest.fixture
def store(path: Path) -> Iterator[SqliteHandoffStore]:
    with SqliteHandoffStore(path) as store:
        yield store


def snap(n: int) -> tuple[str, bytes]:
    """An `(smid, encoded snapshot)` pair; opaque bytes, NUL and non-UTF-8 included."""
    return (f"sm{n}", b"snapshot\x00\xff" + str(n).encode())


def test_take_all_returns_snapshots_in_insertion_order_and_empties_the_store(
    store: SqliteHandoffStore,
) -> None:
    checked: HandoffStore = store
    checked.put_many([snap(n) for n in range(3)])
    checked.put_many([snap(n) for n in range(3, 5)])
    assert checked.count() == 5
    assert checked.take_all() == [snap(n)[1] for n in range(5)]
    assert checked.count() == 0
    assert checked.take_all() == []


def test_an_empty_store_takes_nothing(store: SqliteHandoffStore) -> None:
    assert store.count() == 0
    assert store.take_all() == []


def test_putting_an_smid_again_replaces_its_snapshot(store: SqliteHandoffStore) -> None:
    store.put_many([snap(1), snap(2)])
    store.put_many([("sm1", b"newer")])
    assert store.count() == 2
    taken = store.take_all()
    assert sorted(taken) == sorted([b"newer", snap(2)[1]])
    assert snap(1)[1] not in taken


def test_an_smid_twice_in_one_batch_keeps_the_last_snapshot(store: SqliteHandoffStore) -> None:
    store.put_many([("sm1", b"first"), ("sm1", b"second")])
    assert store.count() == 1
    assert store.take_all() == [b"second"]


def test_putting_nothing_is_a_no_op(store: SqliteHandoffStore) -> None:
    store.put_many([])
    assert store.count() == 0
    store.put_many([snap(1)])
    store.put_many([])
    assert store.take_all() == [snap(1)[1]]


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


def test_encoded_snapshots_round_trip_through_the_store(store: SqliteHandoffStore) -> None:
    snapshot = SessionSnapshot(
        smid="sm1-0123456789abcdef",
        full_jid="juliet@example.com/balcony",
        expires_at=1_790_000_000.5,
        max=300,
        counter_in=2**32 - 1,
        counter_out=5,
        buffer=(Element(ns.CLIENT, "message", {"id": "m1"}, [Element(ns.CLIENT, "body")]),),
    )
    store.put_many([(snapshot.smid, encode_snapshot(snapshot))])
    (data,) = store.take_all()
    assert decode_snapshot(data) == snapshot


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


def test_a_closed_store_raises_storage_error(path: Path) -> None:
    store = SqliteHandoffStore(path)
    store.put_many([snap(1)])
    store.close()
    store.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        store.put_many([snap(2)])
    with pytest.raises(StorageError, match="closed"):
        store.take_all()
    with pytest.raises(StorageError, match="closed"):
        store.count()
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
