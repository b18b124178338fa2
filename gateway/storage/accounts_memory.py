"""Accounts in memory: SCRAM-SHA-1 and SCRAM-SHA-256 credentials only, like the SQLite store.

The in-memory `AccountStore` (tests, and gateways whose accounts come from elsewhere at
start). It derives and keeps the same credentials as `gateway.storage.sqlite`: per account
and per hash the salt, the iteration count, StoredKey and ServerKey, never the password.
PBKDF2 runs before the store's lock is taken.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from gateway.errors import StorageError
from gateway.storage.credentials import (
    HASHES,
    DerivedAccount,
    derive_accounts,
    derive_credentials,
    latest_passwords,
)
from gateway.storage.memory import MemoryDatabase
from gateway.xmpp.sasl import DEFAULT_ITERATIONS, HashName, ScramCredentials


class MemoryAccountStore(MemoryDatabase):
    """Accounts with SCRAM credentials in a dict; an `AccountStore`, thread-safe."""

    component = "accounts"

    def __init__(self) -> None:
        super().__init__()
        self._accounts: dict[tuple[str, str], dict[HashName, ScramCredentials]] = {}

    # -- login (CredentialStore) -----------------------------------------------------------

    def get_credentials(
        self, host: str, username: str, hash_name: HashName
    ) -> ScramCredentials | None:
        """The stored credentials for one hash, or None when there is no such account."""
        with self._locked():
            credentials = self._accounts.get((host, username))
            return None if credentials is None else credentials.get(hash_name)

    def user_exists(self, host: str, username: str) -> bool:
        """Whether the account exists."""
        with self._locked():
            return (host, username) in self._accounts

    # -- administration --------------------------------------------------------------------

    def add_user(
        self, host: str, username: str, password: str, *, iterations: int = DEFAULT_ITERATIONS
    ) -> None:
        """Create an account.

        Raises:
            StorageError: the account exists, or the store is closed.
            ValueError: the password is not a valid PRECIS OpaqueString (e.g. empty).
        """
        credentials = _by_hash(derive_credentials(password, iterations))
        with self._locked():
            if (host, username) in self._accounts:
                raise StorageError(f"account {username}@{host} exists")
            self._accounts[(host, username)] = credentials

    def set_password(
        self, host: str, username: str, password: str, *, iterations: int = DEFAULT_ITERATIONS
    ) -> None:
        """Replace an account's credentials.

        Raises:
            StorageError: there is no such account, or the store is closed.
            ValueError: the password is not a valid PRECIS OpaqueString.
        """
        credentials = _by_hash(derive_credentials(password, iterations))
        with self._locked():
            if (host, username) not in self._accounts:
                raise StorageError(f"no account {username}@{host}")
            self._accounts[(host, username)] = credentials

    def remove_user(self, host: str, username: str) -> bool:
        """Delete an account and its credentials; False when there was none."""
        with self._locked():
            return self._accounts.pop((host, username), None) is not None

    def list_users(self, host: str | None = None) -> list[tuple[str, str]]:
        """`(host, username)` of every account (of one host when given), sorted."""
        with self._locked():
            keys = list(self._accounts)
        return sorted(key for key in keys if host is None or key[0] == host)

    def import_users(
        self,
        entries: Iterable[tuple[str, str, str]],
        *,
        iterations: int = DEFAULT_ITERATIONS,
        workers: int | None = None,
    ) -> int:
        """Create or update many accounts in one step (see `AccountStore.import_users`);
        the keys are derived first, in a pool of `workers` processes for many accounts.

        Raises:
            StorageError: the store is closed (nothing is written).
            ValueError: a password is not a valid PRECIS OpaqueString (nothing is written;
                the message names the account, not the password).
        """
        work = latest_passwords(entries)
        derived: list[DerivedAccount] = derive_accounts(
            work, iterations, workers or os.cpu_count() or 1
        )
        with self._locked():
            for host, username, credentials in derived:
                self._accounts[(host, username)] = _by_hash(credentials)
        return len(work)


def _by_hash(credentials: tuple[ScramCredentials, ...]) -> dict[HashName, ScramCredentials]:
    return dict(zip(HASHES, credentials, strict=True))
