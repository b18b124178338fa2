"""The SQLite account store: SCRAM credentials only, thread-safe lookups, bulk import."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.errors import StorageError
from gateway.storage.base import CredentialStore
from gateway.storage.sqlite import SqliteAccountStore
from gateway.xmpp.sasl import HashName, ScramClient, ScramServer, verify_plain

# PBKDF2 at 4096 iterations costs ~1.6 ms; tests that do not check the count use fewer.
FAST = 8


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteAccountStore]:
    with SqliteAccountStore(tmp_path / "accounts.sqlite") as store:
        yield store


def scram_login(store: CredentialStore, host: str, username: str, password: str) -> None:
    for hash_name in ("sha1", "sha256"):
        client = ScramClient(hash_name, username, password)
        server = ScramServer(hash_name)
        user = server.client_first(client.first())
        challenge = server.server_first(store.get_credentials(host, user, hash_name))
        client.verify(server.client_final(client.final(challenge)))


def test_new_database_has_parent_dirs_wal_and_a_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "accounts.sqlite"
    SqliteAccountStore(path).close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("SELECT component, version FROM schema_version").fetchall() == [
            ("accounts", 1)
        ]
    db.close()


def test_added_user_logs_in_with_both_scram_hashes(store: SqliteAccountStore) -> None:
    store.add_user("example.com", "juliet", "r0m30")
    assert store.user_exists("example.com", "juliet")
    scram_login(store, "example.com", "juliet", "r0m30")
    creds = store.get_credentials("example.com", "juliet", "sha256")
    assert creds is not None
    assert creds.iterations == 4096
    assert verify_plain("r0m30", creds, "sha256")
    assert not verify_plain("r0m31", creds, "sha256")


@pytest.mark.parametrize("hash_name", ["sha1", "sha256"])
def test_unknown_accounts_have_no_credentials(
    store: SqliteAccountStore, hash_name: HashName
) -> None:
    store.add_user("example.com", "juliet", "pw", iterations=FAST)
    assert store.get_credentials("example.com", "romeo", hash_name) is None
    assert store.get_credentials("example.net", "juliet", hash_name) is None
    assert not store.user_exists("example.net", "juliet")


def test_the_password_is_never_stored(tmp_path: Path) -> None:
    path = tmp_path / "accounts.sqlite"
    with SqliteAccountStore(path) as store:
        store.add_user("example.com", "juliet", "UniquePasswordMarker", iterations=FAST)
        store.set_password("example.com", "juliet", "OtherPasswordMarker", iterations=FAST)
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert b"PasswordMarker" not in data
    assert b"juliet" in data


def test_adding_an_existing_user_is_a_storage_error(store: SqliteAccountStore) -> None:
    store.add_user("example.com", "juliet", "one", iterations=FAST)
    with pytest.raises(StorageError, match="exists"):
        store.add_user("example.com", "juliet", "two", iterations=FAST)
    scram_login(store, "example.com", "juliet", "one")


def test_set_password_replaces_credentials(store: SqliteAccountStore) -> None:
    store.add_user("example.com", "juliet", "old", iterations=FAST)
    store.set_password("example.com", "juliet", "new", iterations=FAST + 1)
    scram_login(store, "example.com", "juliet", "new")
    creds = store.get_credentials("example.com", "juliet", "sha1")
    assert creds is not None
    assert creds.iterations == FAST + 1
    with pytest.raises(StorageError, match="no account"):
        store.set_password("example.com", "romeo", "pw", iterations=FAST)
    assert not store.user_exists("example.com", "romeo")


def test_invalid_password_is_a_value_error_and_writes_nothing(
    store: SqliteAccountStore,
) -> None:
    with pytest.raises(ValueError, match="OpaqueString"):
        store.add_user("example.com", "juliet", "", iterations=FAST)
    assert not store.user_exists("example.com", "juliet")


def test_remove_user_deletes_the_account_and_its_credentials(
    store: SqliteAccountStore,
) -> None:
    store.add_user("example.com", "juliet", "pw", iterations=FAST)
    assert store.remove_user("example.com", "juliet")
    assert not store.user_exists("example.com", "juliet")
    assert store.get_credentials("example.com", "juliet", "sha256") is None
    assert not store.remove_user("example.com", "juliet")


def test_list_users_is_sorted_and_filters_by_host(store: SqliteAccountStore) -> None:
    for host, user in [("b.example", "zed"), ("a.example", "romeo"), ("b.example", "amy")]:
        store.add_user(host, user, "pw", iterations=FAST)
    assert store.list_users() == [
        ("a.example", "romeo"),
        ("b.example", "amy"),
        ("b.example", "zed"),
    ]
    assert store.list_users("b.example") == [("b.example", "amy"), ("b.example", "zed")]
    assert store.list_users("c.example") == []


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


def test_a_closed_store_raises_storage_error(tmp_path: Path) -> None:
    store = SqliteAccountStore(tmp_path / "accounts.sqlite")
    store.close()
    store.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        store.user_exists("example.com", "juliet")
    with pytest.raises(StorageError, match="closed"):
        store.remove_user("example.com", "juliet")


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


@pytest.mark.parametrize("workers", [1, 2])
def test_import_users_creates_and_replaces_accounts(
    store: SqliteAccountStore, workers: int
) -> None:
    store.add_user("example.com", "user0", "old", iterations=FAST)
    entries = [("example.com", f"user{i}", f"pw{i}") for i in range(100)]
    entries.append(("example.com", "user1", "last wins"))
    assert store.import_users(entries, iterations=FAST, workers=workers) == 100
    assert len(store.list_users("example.com")) == 100
    scram_login(store, "example.com", "user0", "pw0")
    scram_login(store, "example.com", "user99", "pw99")
    scram_login(store, "example.com", "user1", "last wins")
    creds = store.get_credentials("example.com", "user50", "sha1")
    assert creds is not None
    assert creds.iterations == FAST


@pytest.mark.parametrize("workers", [1, 2])
def test_import_with_an_invalid_password_writes_nothing(
    store: SqliteAccountStore, workers: int
) -> None:
    entries = [("example.com", f"user{i}", f"pw{i}") for i in range(99)]
    entries.append(("example.com", "bad", "tab\there"))
    with pytest.raises(ValueError, match=r"bad@example\.com") as error:
        store.import_users(entries, iterations=FAST, workers=workers)
    assert "tab" not in str(error.value)
    assert store.list_users() == []


def test_import_of_nothing_is_zero(store: SqliteAccountStore) -> None:
    assert store.import_users([], iterations=FAST) == 0


def test_lookups_from_many_threads_at_once(store: SqliteAccountStore) -> None:
    store.import_users(
        [("example.com", f"user{i}", "pw") for i in range(20)], iterations=FAST, workers=1
    )
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(200):
                name = f"user{(n + i) % 25}"
                exists = store.user_exists("example.com", name)
                creds = store.get_credentials("example.com", name, "sha256")
                assert exists == (creds is not None) == ((n + i) % 25 < 20)
                if i % 50 == 0:
                    store.set_password("example.com", "user0", "pw", iterations=1)
        except BaseException as exc:
            errors.append(exc)
            raise

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_store_satisfies_the_credential_store_protocol(store: SqliteAccountStore) -> None:
    as_protocol: CredentialStore = store
    assert not as_protocol.user_exists("example.com", "juliet")
