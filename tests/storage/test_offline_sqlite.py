"""Offline messages in SQLite beyond the `OfflineStore` contract
(`test_offline_contract.py`): the shared file and its schema, several connections on one
file, reopening it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.storage.offline_sqlite import SqliteOfflineStore
from gateway.storage.roster_sqlite import SqliteRosterStore
from gateway.storage.sqlite import SqliteAccountStore
from tests.storage.helpers import HOST, STAMP, hammer, message


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "gateway.sqlite"


def test_offline_store_shares_the_file_and_versions_its_schema(path: Path) -> None:
    SqliteAccountStore(path).close()
    SqliteRosterStore(path).close()
    SqliteOfflineStore(path).close()
    SqliteOfflineStore(path).close()  # opening again keeps the schema
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT component, version FROM schema_version ORDER BY 1").fetchall()
    db.close()
    assert rows == [("accounts", 1), ("offline", 1), ("roster", 1)]


def test_two_connections_storing_near_the_cap_never_exceed_it(path: Path) -> None:
    # Separate store objects: separate connections, serialized only by SQLite's write lock.
    stores = [SqliteOfflineStore(path) for _ in range(2)]
    try:
        accepted = hammer(stores, per_thread=30, cap=40)
        assert sum(accepted) == 40
        assert stores[0].count(HOST, "juliet") == 40
    finally:
        for s in stores:
            s.close()


def test_messages_and_their_order_survive_reopening_the_file(path: Path) -> None:
    with SqliteOfflineStore(path) as store:
        for n in range(3):
            store.store(HOST, "juliet", message(n), f"s{n}", max_per_user=10)
        popped = store.pop_all(HOST, "juliet", limit=2)
        store.put_back(HOST, "juliet", popped)
    with SqliteOfflineStore(path) as reopened:
        assert reopened.pop_all(HOST, "juliet") == [(message(n), f"s{n}") for n in range(3)]


def test_put_back_keys_stay_below_every_other_across_accounts(path: Path) -> None:
    # Put-back rows get keys below the table's lowest, whichever account holds it.
    with SqliteOfflineStore(path) as store:
        store.store(HOST, "romeo", message(0), STAMP, max_per_user=10)
        store.store(HOST, "juliet", message(1), STAMP, max_per_user=10)
        store.put_back(HOST, "juliet", [(message(2), STAMP)])
        store.put_back(HOST, "romeo", [(message(3), STAMP)])
        store.put_back(HOST, "juliet", [(message(4), STAMP), (message(5), STAMP)])
        assert [s for s, _ in store.pop_all(HOST, "juliet")] == [
            message(4),
            message(5),
            message(2),
            message(1),
        ]
        assert [s for s, _ in store.pop_all(HOST, "romeo")] == [message(3), message(0)]
