"""Offline messages (XEP-0160) in SQLite, in the same file as the accounts.

Component "offline" of the shared `schema_version` table; one connection behind a lock like
the account store (see `gateway.storage.sqlite`), called through `trio.to_thread.run_sync`.

A row is one message for one account (host, username): the stanza as serialized XML bytes
(`gateway.storage.codec.encode_stanza`) and the XEP-0203 stamp of its arrival,
which the core turns into a `<delay/>` when it delivers the message. Rows are ordered by
their integer key, which only grows while a user has rows, so "oldest first" is key order.

Both writers and readers of one account's messages run in one `BEGIN IMMEDIATE` transaction
each, under the store's lock and SQLite's write lock: the per-user cap cannot be exceeded by
two concurrent `store` calls (threads or processes), and a message popped by one `pop_all`
is never returned by another.
"""

from __future__ import annotations

from typing import Final

from gateway.storage.sqlite import SqliteDatabase

_SCHEMA: Final = (
    """CREATE TABLE offline (
        id INTEGER PRIMARY KEY,
        host TEXT NOT NULL,
        username TEXT NOT NULL,
        stamp TEXT NOT NULL,
        stanza BLOB NOT NULL
    )""",
    "CREATE INDEX offline_by_user ON offline (host, username, id)",
)


class SqliteOfflineStore(SqliteDatabase):
    """Offline messages per account (host, username); an `OfflineStore`.

    Args:
        path: the database file (parent directories are created), or ":memory:".
        busy_timeout: seconds to wait for another process's write lock.

    Raises:
        StorageError: the file cannot be opened, or its schema is another version.
    """

    component = "offline"
    version = 1
    schema = _SCHEMA

    def store(
        self, host: str, username: str, stanza: bytes, stamp: str, *, max_per_user: int
    ) -> bool:
        """Append one message unless the account already holds `max_per_user` messages.

        The count and the insert are one transaction, so concurrent calls never leave more
        than `max_per_user` messages.

        Args:
            host: the account's domainpart.
            username: the account's localpart, normalised.
            stanza: the message, from `encode_stanza`.
            stamp: XEP-0203 UTC timestamp of its arrival (e.g. "2026-11-22T07:00:00.123Z").
            max_per_user: the cap (`modules.mod_offline.max_per_user`); 0 stores nothing.

        Returns:
            True when stored; False (nothing written) when the account is at the cap.

        Raises:
            StorageError: the database failed (nothing is written).
            ValueError: `max_per_user` is negative.
        """
        if max_per_user < 0:
            raise ValueError("max_per_user must not be negative")
        with self._transaction() as db:
            # The index's (host, username) prefix makes this O(messages of the user).
            (held,) = db.execute(
                "SELECT COUNT(*) FROM offline WHERE host = ? AND username = ?", (host, username)
            ).fetchone()
            if held >= max_per_user:
                return False
            db.execute(
                "INSERT INTO offline (host, username, stamp, stanza) VALUES (?, ?, ?, ?)",
                (host, username, stamp, stanza),
            )
        return True

    def pop_all(
        self, host: str, username: str, *, limit: int | None = None
    ) -> list[tuple[bytes, str]]:
        """Remove and return the account's messages, oldest first.

        Selection and deletion are one transaction: a message is returned exactly once.

        Args:
            host: the account's domainpart.
            username: the account's localpart, normalised.
            limit: most messages to take (the oldest); None takes all.

        Returns:
            `(stanza, stamp)` pairs, oldest first; empty when there are none.

        Raises:
            StorageError: the database failed (nothing is removed).
            ValueError: `limit` is negative.
        """
        if limit is not None and limit < 0:
            raise ValueError("limit must not be negative")
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id, stanza, stamp FROM offline WHERE host = ? AND username = ?"
                " ORDER BY id LIMIT ?",
                (host, username, -1 if limit is None else limit),
            ).fetchall()
            if rows:
                # The rows are the user's smallest ids, so "id <= last" is exactly them.
                db.execute(
                    "DELETE FROM offline WHERE host = ? AND username = ? AND id <= ?",
                    (host, username, rows[-1][0]),
                )
        return [(bytes(stanza), str(stamp)) for _id, stanza, stamp in rows]

    def count(self, host: str, username: str) -> int:
        """How many messages the account holds.

        Raises:
            StorageError: the database failed.
        """
        rows = self._query(
            "SELECT COUNT(*) FROM offline WHERE host = ? AND username = ?", (host, username)
        )
        return int(rows[0][0])

    def remove_account(self, host: str, username: str) -> int:
        """Delete every message of the account; returns how many there were.

        Raises:
            StorageError: the database failed (nothing is removed).
        """
        with self._transaction() as db:
            cursor = db.execute(
                "DELETE FROM offline WHERE host = ? AND username = ?", (host, username)
            )
        return cursor.rowcount
