"""The `AccountStore` contract, run by every implementation: SCRAM credentials only (a
login works with both hashes), administration, bulk import, closing, thread safety."""

from __future__ import annotations

import threading

import pytest

from gateway.errors import StorageError
from gateway.storage.base import AccountStore, CredentialStore
from gateway.xmpp.sasl import HashName, verify_plain
from tests.storage.helpers import FAST, scram_login


def test_added_user_logs_in_with_both_scram_hashes(accounts: AccountStore) -> None:
    accounts.add_user("example.com", "juliet", "r0m30")
    assert accounts.user_exists("example.com", "juliet")
    scram_login(accounts, "example.com", "juliet", "r0m30")
    creds = accounts.get_credentials("example.com", "juliet", "sha256")
    assert creds is not None
    assert creds.iterations == 4096
    assert verify_plain("r0m30", creds, "sha256")
    assert not verify_plain("r0m31", creds, "sha256")


def test_each_hash_has_its_own_keys_and_each_account_its_own_salt(
    accounts: AccountStore,
) -> None:
    accounts.add_user("example.com", "juliet", "same", iterations=FAST)
    accounts.add_user("example.com", "romeo", "same", iterations=FAST)
    sha1 = accounts.get_credentials("example.com", "juliet", "sha1")
    sha256 = accounts.get_credentials("example.com", "juliet", "sha256")
    other = accounts.get_credentials("example.com", "romeo", "sha256")
    assert sha1 is not None and sha256 is not None and other is not None
    assert len(sha1.stored_key) == 20
    assert len(sha256.stored_key) == 32
    assert sha256.salt != other.salt
    assert sha256.stored_key != other.stored_key


@pytest.mark.parametrize("hash_name", ["sha1", "sha256"])
def test_unknown_accounts_have_no_credentials(accounts: AccountStore, hash_name: HashName) -> None:
    accounts.add_user("example.com", "juliet", "pw", iterations=FAST)
    assert accounts.get_credentials("example.com", "romeo", hash_name) is None
    assert accounts.get_credentials("example.net", "juliet", hash_name) is None
    assert not accounts.user_exists("example.net", "juliet")


def test_adding_an_existing_user_is_a_storage_error(accounts: AccountStore) -> None:
    accounts.add_user("example.com", "juliet", "one", iterations=FAST)
    with pytest.raises(StorageError, match="exists"):
        accounts.add_user("example.com", "juliet", "two", iterations=FAST)
    scram_login(accounts, "example.com", "juliet", "one")


def test_set_password_replaces_credentials(accounts: AccountStore) -> None:
    accounts.add_user("example.com", "juliet", "old", iterations=FAST)
    accounts.set_password("example.com", "juliet", "new", iterations=FAST + 1)
    scram_login(accounts, "example.com", "juliet", "new")
    creds = accounts.get_credentials("example.com", "juliet", "sha1")
    assert creds is not None
    assert creds.iterations == FAST + 1
    with pytest.raises(StorageError, match="no account"):
        accounts.set_password("example.com", "romeo", "pw", iterations=FAST)
    assert not accounts.user_exists("example.com", "romeo")


def test_invalid_password_is_a_value_error_and_writes_nothing(accounts: AccountStore) -> None:
    with pytest.raises(ValueError, match="OpaqueString"):
        accounts.add_user("example.com", "juliet", "", iterations=FAST)
    assert not accounts.user_exists("example.com", "juliet")
    accounts.add_user("example.com", "juliet", "pw", iterations=FAST)
    with pytest.raises(ValueError, match="OpaqueString"):
        accounts.set_password("example.com", "juliet", "", iterations=FAST)
    scram_login(accounts, "example.com", "juliet", "pw")


def test_remove_user_deletes_the_account_and_its_credentials(accounts: AccountStore) -> None:
    accounts.add_user("example.com", "juliet", "pw", iterations=FAST)
    assert accounts.remove_user("example.com", "juliet")
    assert not accounts.user_exists("example.com", "juliet")
    assert accounts.get_credentials("example.com", "juliet", "sha256") is None
    assert not accounts.remove_user("example.com", "juliet")
    accounts.add_user("example.com", "juliet", "again", iterations=FAST)  # the name is free
    scram_login(accounts, "example.com", "juliet", "again")


def test_list_users_is_sorted_and_filters_by_host(accounts: AccountStore) -> None:
    for host, user in [("b.example", "zed"), ("a.example", "romeo"), ("b.example", "amy")]:
        accounts.add_user(host, user, "pw", iterations=FAST)
    assert accounts.list_users() == [
        ("a.example", "romeo"),
        ("b.example", "amy"),
        ("b.example", "zed"),
    ]
    assert accounts.list_users("b.example") == [("b.example", "amy"), ("b.example", "zed")]
    assert accounts.list_users("c.example") == []


@pytest.mark.parametrize("workers", [1, 2])
def test_import_users_creates_and_replaces_accounts(accounts: AccountStore, workers: int) -> None:
    accounts.add_user("example.com", "user0", "old", iterations=FAST)
    entries = [("example.com", f"user{i}", f"pw{i}") for i in range(100)]
    entries.append(("example.com", "user1", "last wins"))
    assert accounts.import_users(entries, iterations=FAST, workers=workers) == 100
    assert len(accounts.list_users("example.com")) == 100
    scram_login(accounts, "example.com", "user0", "pw0")
    scram_login(accounts, "example.com", "user99", "pw99")
    scram_login(accounts, "example.com", "user1", "last wins")
    creds = accounts.get_credentials("example.com", "user50", "sha1")
    assert creds is not None
    assert creds.iterations == FAST


@pytest.mark.parametrize("workers", [1, 2])
def test_import_with_an_invalid_password_writes_nothing(
    accounts: AccountStore, workers: int
) -> None:
    entries = [("example.com", f"user{i}", f"pw{i}") for i in range(99)]
    entries.append(("example.com", "bad", "tab\there"))
    with pytest.raises(ValueError, match=r"bad@example\.com") as error:
        accounts.import_users(entries, iterations=FAST, workers=workers)
    assert "tab" not in str(error.value)
    assert accounts.list_users() == []


def test_import_of_nothing_is_zero(accounts: AccountStore) -> None:
    assert accounts.import_users([], iterations=FAST) == 0


def test_a_closed_store_raises_storage_error(accounts: AccountStore) -> None:
    accounts.add_user("example.com", "juliet", "pw", iterations=FAST)
    accounts.close()
    accounts.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        accounts.user_exists("example.com", "juliet")
    with pytest.raises(StorageError, match="closed"):
        accounts.get_credentials("example.com", "juliet", "sha1")
    with pytest.raises(StorageError, match="closed"):
        accounts.remove_user("example.com", "juliet")
    with pytest.raises(StorageError, match="closed"):
        accounts.add_user("example.com", "romeo", "pw", iterations=FAST)
    with pytest.raises(StorageError, match="closed"):
        accounts.list_users()


def test_lookups_from_many_threads_at_once(accounts: AccountStore) -> None:
    accounts.import_users(
        [("example.com", f"user{i}", "pw") for i in range(20)], iterations=FAST, workers=1
    )
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(200):
                name = f"user{(n + i) % 25}"
                exists = accounts.user_exists("example.com", name)
                creds = accounts.get_credentials("example.com", name, "sha256")
                assert exists == (creds is not None) == ((n + i) % 25 < 20)
                if i % 50 == 0:
                    accounts.set_password("example.com", "user0", "pw", iterations=1)
        except BaseException as exc:
            errors.append(exc)
            raise

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_store_satisfies_the_credential_store_protocol(accounts: AccountStore) -> None:
    as_protocol: CredentialStore = accounts
    assert not as_protocol.user_exists("example.com", "juliet")
