"""The SQLite account store beyond the `AccountStore` contract
(`test_accounts_contract.py`): the file, its schema, reopening it, database errors."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.errors import StorageError
from gateway.storage.sqlite import SqliteAccountStore
from tests.storage.helpers import FAST, scram_login


def test_new_database_has_parent_dirs_wal_and_a_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "accounts.sqlite"
    SqliteAccountStore(path).close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("SELECT component, version FROM schema_version").fetchall() == [
            ("accounts", 1)
        ]
    db.close()


def test_the_password_is_never_stored(tmp_path: Path) -> None:
    path = tmp_path / "accounts.sqlite"
    with SqliteAccountStore(path) as store:
        store.add_user("example.com", "juliet", "UniquePasswordMarker", iterations=FAST)
        store.set_password("example.com", "juliet", "OtherPasswordMarker", iterations=FAST)
        store.import_users(
            [("example.com", "romeo", "ThirdPasswordMarker")], iterations=FAST, workers=1
        )
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert b"PasswordMarker" not in data
    assert b"juliet" in data


def test_accounts_persist_across_reopening(tmp_path: Path) -> None:
    path = tmp_path / "accounts.sqlite"
    with SqliteAccountStore(path) as store:
        store.add_user("example.com", "juliet", "pw", iterations=FAST)
    with SqliteAccountStore(path) as store:
        scram_login(store, "example.com", "juliet", "pw")


def test_a_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "accounts.sqlite"
    SqliteAccountStore(path).close()
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE schema_version SET version = 2 WHERE component = 'accounts'")
    db.close()
    with pytest.raises(StorageError, match="schema version 2"):
        SqliteAccountStore(path)


def test_an_unopenable_path_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError):
        SqliteAccountStore(blocker / "accounts.sqlite")


def test_database_errors_become_storage_errors(tmp_path: Path) -> None:
    path = tmp_path / "accounts.sqlite"
    with SqliteAccountStore(path) as store:
        store.add_user("example.com", "juliet", "pw", iterations=FAST)
        db = sqlite3.connect(path)
        db.execute("DROP TABLE scram_credentials")
        db.close()
        with pytest.raises(StorageError, match="query failed"):
            store.get_credentials("example.com", "juliet", "sha1")
        with pytest.raises(StorageError, match="write failed"):
            store.add_user("example.com", "romeo", "pw", iterations=FAST)
        assert store.list_users() == [("example.com", "juliet")]  # rolled back


def test_in_memory_database_works() -> None:
    with SqliteAccountStore(":memory:") as store:
        store.add_user("example.com", "juliet", "pw", iterations=FAST)
        assert store.list_users() == [("example.com", "juliet")]


def test_a_second_process_sees_accounts_written_by_the_first(tmp_path: Path) -> None:
    # Two store objects on one file are two connections, as the `user` command and a
    # running server are.
    path = tmp_path / "accounts.sqlite"
    with SqliteAccountStore(path) as server, SqliteAccountStore(path) as command:
        assert not server.user_exists("example.com", "juliet")
        command.add_user("example.com", "juliet", "pw", iterations=FAST)
        scram_login(server, "example.com", "juliet", "pw")
        assert command.remove_user("example.com", "juliet")
        assert server.get_credentials("example.com", "juliet", "sha1") is None
