"""Accounts in an SQLite file: SCRAM-SHA-1 and SCRAM-SHA-256 credentials only.

The database holds, per account (host, username) and per hash, the salt, the iteration count,
StoredKey and ServerKey (RFC 5802 section 3); never the password. A SCRAM login then costs a
few HMACs; a PLAIN login one PBKDF2 (`gateway.xmpp.sasl.verify_plain`).

Threads: the core calls the lookups through `trio.to_thread.run_sync`, so they run on trio's
worker threads, which come and go (idle ones retire). The store therefore keeps ONE connection
(`check_same_thread=False`) behind a `threading.Lock`, rather than a connection per thread
that would have to be reaped when its thread ends. A keyed lookup holds the lock for a few
microseconds; PBKDF2 (add_user, set_password, import_users) runs outside it. Other processes
(the `user` command while the server runs) share the file through WAL mode and SQLite's own
locking, waiting up to `busy_timeout` seconds for a writer.

Schema: tables `accounts` and `scram_credentials`; the shared table `schema_version` has one
row per component (here "accounts"), so other stores in the same file (roster, offline) can
version their tables there too.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from gateway.errors import StorageError
from gateway.storage.base import ClosedOnExit
from gateway.storage.credentials import (
    HASHES,
    DerivedAccount,
    derive_accounts,
    derive_credentials,
    latest_passwords,
)
from gateway.xmpp.sasl import DEFAULT_ITERATIONS, HashName, ScramCredentials

SCHEMA_COMPONENT: Final = "accounts"
SCHEMA_VERSION: Final = 1

_SCHEMA: Final = (
    """CREATE TABLE accounts (
        host TEXT NOT NULL,
        username TEXT NOT NULL,
        PRIMARY KEY (host, username)
    ) WITHOUT ROWID""",
    """CREATE TABLE scram_credentials (
        host TEXT NOT NULL,
        username TEXT NOT NULL,
        hash_name TEXT NOT NULL CHECK (hash_name IN ('sha1', 'sha256')),
        salt BLOB NOT NULL,
        iterations INTEGER NOT NULL CHECK (iterations > 0),
        stored_key BLOB NOT NULL,
        server_key BLOB NOT NULL,
        PRIMARY KEY (host, username, hash_name),
        FOREIGN KEY (host, username) REFERENCES accounts (host, username) ON DELETE CASCADE
    ) WITHOUT ROWID""",
)
_UPSERT_CREDENTIALS: Final = """
    INSERT INTO scram_credentials
        (host, username, hash_name, salt, iterations, stored_key, server_key)
    VALUES (?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (host, username, hash_name) DO UPDATE SET
        salt = excluded.salt, iterations = excluded.iterations,
        stored_key = excluded.stored_key, server_key = excluded.server_key
"""

_CredentialRow = tuple[str, str, str, bytes, int, bytes, bytes]


class SqliteDatabase(ClosedOnExit):
    """One connection to an SQLite file behind a lock, with a versioned schema component.

    Subclasses are the stores (accounts, roster, ...); each names its `component`, `version`
    and `schema` (the CREATE statements run once, when the component is not there yet).

    Args:
        path: the database file (parent directories are created), or ":memory:".
        busy_timeout: seconds to wait for another process's write lock.

    Raises:
        StorageError: the file cannot be opened, or its schema is another version.
    """

    component: str = ""
    version: int = 0
    schema: tuple[str, ...] = ()

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 30.0) -> None:
        self._lock = threading.Lock()
        try:
            if str(path) != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot open the database {path}: {exc}") from exc
        self._db: sqlite3.Connection | None = db
        try:
            db.execute("PRAGMA journal_mode = WAL")
            # With WAL, NORMAL is durable across application crashes; a power loss can
            # lose the last commits but never corrupts the file.
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except BaseException:
            db.close()
            raise

    def close(self) -> None:
        """Close the connection; later calls raise `StorageError`. Idempotent."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise StorageError(f"{self.component} store is closed")
        return self._db

    def _query(self, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                rows: list[tuple[Any, ...]] = self._connection().execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StorageError(f"{self.component} database query failed: {exc}") from exc
        return rows

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock and a write transaction (BEGIN IMMEDIATE); commit on success."""
        with self._lock:
            db = self._connection()
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StorageError(f"{self.component} database write failed: {exc}") from exc

    def _migrate(self) -> None:
        with self._transaction() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_version"
                " (component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
            )
            row = db.execute(
                "SELECT version FROM schema_version WHERE component = ?", (self.component,)
            ).fetchone()
            if row is None:
                for statement in self.schema:
                    db.execute(statement)
                db.execute(
                    "INSERT INTO schema_version (component, version) VALUES (?, ?)",
                    (self.component, self.version),
                )
            elif row[0] != self.version:
                raise StorageError(
                    f"{self.component} schema version {row[0]} is not {self.version}"
                    " (database written by another gateway version)"
                )


class SqliteAccountStore(SqliteDatabase):
    """Accounts with SCRAM credentials in one SQLite file; an `AccountStore`.

    Args:
        path: the database file (parent directories are created), or ":memory:".
        busy_timeout: seconds to wait for another process's write lock.

    Raises:
        StorageError: the file cannot be opened, or its schema is newer than this code.
    """

    component = SCHEMA_COMPONENT
    version = SCHEMA_VERSION
    schema = _SCHEMA

    # -- login (CredentialStore) ----------------------------------------------------------

    def get_credentials(
        self, host: str, username: str, hash_name: HashName
    ) -> ScramCredentials | None:
        """The stored credentials for one hash, or None when there is no such account."""
        rows = self._query(
            "SELECT salt, iterations, stored_key, server_key FROM scram_credentials"
            " WHERE host = ? AND username = ? AND hash_name = ?",
            (host, username, hash_name),
        )
        if not rows:
            return None
        salt, iterations, stored_key, server_key = rows[0]
        return ScramCredentials(bytes(salt), int(iterations), bytes(stored_key), bytes(server_key))

    def user_exists(self, host: str, username: str) -> bool:
        """Whether the account exists."""
        return bool(
            self._query("SELECT 1 FROM accounts WHERE host = ? AND username = ?", (host, username))
        )

    # -- administration --------------------------------------------------------------------

    def add_user(
        self, host: str, username: str, password: str, *, iterations: int = DEFAULT_ITERATIONS
    ) -> None:
        """Create an account.

        Raises:
            StorageError: the account exists, or the database failed.
            ValueError: the password is not a valid PRECIS OpaqueString (e.g. empty).
        """
        rows = _credential_rows([(host, username, derive_credentials(password, iterations))])
        with self._transaction() as db:
            try:
                db.execute("INSERT INTO accounts (host, username) VALUES (?, ?)", (host, username))
            except sqlite3.IntegrityError as exc:
                raise StorageError(f"account {username}@{host} exists") from exc
            db.executemany(_UPSERT_CREDENTIALS, rows)

    def set_password(
        self, host: str, username: str, password: str, *, iterations: int = DEFAULT_ITERATIONS
    ) -> None:
        """Replace an account's credentials.

        Raises:
            StorageError: there is no such account, or the database failed.
            ValueError: the password is not a valid PRECIS OpaqueString.
        """
        rows = _credential_rows([(host, username, derive_credentials(password, iterations))])
        with self._transaction() as db:
            found = db.execute(
                "SELECT 1 FROM accounts WHERE host = ? AND username = ?", (host, username)
            ).fetchone()
            if found is None:
                raise StorageError(f"no account {username}@{host}")
            db.executemany(_UPSERT_CREDENTIALS, rows)

    def remove_user(self, host: str, username: str) -> bool:
        """Delete an account and its credentials; False when there was none."""
        with self._transaction() as db:
            db.execute(
                "DELETE FROM scram_credentials WHERE host = ? AND username = ?", (host, username)
            )
            cursor = db.execute(
                "DELETE FROM accounts WHERE host = ? AND username = ?", (host, username)
            )
            return cursor.rowcount > 0

    def list_users(self, host: str | None = None) -> list[tuple[str, str]]:
        """`(host, username)` of every account (of one host when given), sorted."""
        if host is None:
            rows = self._query("SELECT host, username FROM accounts ORDER BY host, username", ())
        else:
            rows = self._query(
                "SELECT host, username FROM accounts WHERE host = ? ORDER BY username", (host,)
            )
        return [(str(h), str(u)) for h, u in rows]

    def import_users(
        self,
        entries: Iterable[tuple[str, str, str]],
        *,
        iterations: int = DEFAULT_ITERATIONS,
        workers: int | None = None,
    ) -> int:
        """Create or update many accounts in one transaction.

        PBKDF2 dominates (two derivations per account, ~1.6 ms each at 4096 iterations on
        the reference machine), so it runs in a process pool of `workers` processes
        (default: one per CPU), in chunks; the rows are then written with `executemany` in a
        single transaction. Existing accounts get their password replaced; when one
        (host, username) appears twice, the last password wins.

        Args:
            entries: `(host, username, password)`; usernames already normalised.
            iterations: PBKDF2 iteration count.
            workers: processes to use; 1 derives in this process.

        Returns:
            The number of distinct accounts created or updated.

        Raises:
            StorageError: the database failed (nothing is written).
            ValueError: a password is not a valid PRECIS OpaqueString (nothing is written;
                the message names the account, not the password).
        """
        work = latest_passwords(entries)
        rows = _credential_rows(derive_accounts(work, iterations, workers or os.cpu_count() or 1))
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO accounts (host, username) VALUES (?, ?) ON CONFLICT DO NOTHING",
                [(host, username) for host, username, _password in work],
            )
            db.executemany(_UPSERT_CREDENTIALS, rows)
        return len(work)


def _credential_rows(derived: Iterable[DerivedAccount]) -> list[_CredentialRow]:
    return [
        (host, username, hash_name, c.salt, c.iterations, c.stored_key, c.server_key)
        for host, username, credentials in derived
        for hash_name, c in zip(HASHES, credentials, strict=True)
    ]
