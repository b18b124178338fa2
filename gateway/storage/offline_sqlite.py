"""Offline messages (XEP-0160) in SQLite, in the same file as the accounts.

Component "offline" of the shared `schema_version` table; one connection behind a lock like
the account store (see `gateway.storage.sqlite`), called through `trio.to_thread.run_sync`.

A row is one message for one account (host, username): the stanza as serialized XML bytes
(`gateway.storage.codec.encode_stanza`) and the XEP-0203 stamp of its arrival,
which the core turns into a `<delay/>` when it delivers the message. Rows are ordered by
their integer key: new rows get keys above every other, rows a flush puts back keys below
every other, so "oldest first" is key order.

Both writers and readers of one account's messages run in one `BEGIN IMMEDIATE` transaction
each, under the store's lock and SQLite's write lock: the per-user cap cannot be exceeded by
two concurrent `store` calls (threads or processes), and a message popped by one `pop_all`
is never returned by another.
"""

from __future__ import annotations

from collections.abc import Sequence
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
        self,
        host: str,
        username: str,
        stanza: bytes,
        stamp: str,
        *,
        max_per_user: int,
        max_bytes_per_user: int | None = None,
    ) -> bool:
        """Append one message unless the account already holds `max_per_user` messages
        or the message would take its stored bytes past `max_bytes_per_user`.

        The count and the insert are one transaction, so concurrent calls never leave more
        than `max_per_user` messages.

        Args:
            host: the account's domainpart.
            username: the account's localpart, normalised.
            stanza: the message, from `encode_stanza`.
            stamp: XEP-0203 UTC timestamp of its arrival (e.g. "2026-11-22T07:00:00.123Z").
            max_per_user: the cap (`modules.mod_offline.max_per_user`); 0 stores nothing.
            max_bytes_per_user: the byte quota (`modules.mod_offline.max_bytes_per_user`);
                None: no quota.

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
            # length() of a BLOB reads the row header, not the stanza itself.
            held, held_bytes = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(length(stanza)), 0) FROM offline"
                " WHERE host = ? AND username = ?",
                (host, username),
            ).fetchone()
            if held >= max_per_user:
                return False
            if max_bytes_per_user is not None and held_bytes + len(stanza) > max_bytes_per_user:
                return False
            db.execute(
                "INSERT INTO offline (host, username, stamp, stanza) VALUES (?, ?, ?, ?)",
                (host, username, stamp, stanza),
            )
        return True

    def pop_all(
        self, host: str, username: str, *, limit: int | None = None, max_bytes: int | None = None
    ) -> list[tuple[bytes, str]]:
        """Remove and return the account's messages, oldest first.

        Selection and deletion are one transaction: a message is returned exactly once.

        Args:
            host: the account's domainpart.
            username: the account's localpart, normalised.
            limit: most messages to take (the oldest); None takes all.
            max_bytes: most stanza bytes to take; the oldest message is taken whatever its
                size. None: no bound.

        Returns:
            `(stanza, stamp)` pairs, oldest first; empty when there are none.

        Raises:
            StorageError: the database failed (nothing is removed).
            ValueError: `limit` is negative.
        """
        if limit is not None and limit < 0:
            raise ValueError("limit must not be negative")
        with self._transaction() as db:
            count = -1 if limit is None else limit
            if max_bytes is not None:
                sizes = db.execute(
                    "SELECT length(stanza) FROM offline WHERE host = ? AND username = ?"
                    " ORDER BY id LIMIT ?",
                    (host, username, count),
                ).fetchall()
                count, total = 0, 0
                for (size,) in sizes:
                    total += size
                    if count and total > max_bytes:
                        break
                    count += 1
            rows = db.execute(
                "SELECT id, stanza, stamp FROM offline WHERE host = ? AND username = ?"
                " ORDER BY id LIMIT ?",
                (host, username, count),
            ).fetchall()
            if rows:
                # The rows are the user's smallest ids, so "id <= last" is exactly them.
                db.execute(
                    "DELETE FROM offline WHERE host = ? AND username = ? AND id <= ?",
                    (host, username, rows[-1][0]),
                )
        return [(bytes(stanza), str(stamp)) for _id, stanza, stamp in rows]

    def put_back(self, host: str, username: str, rows: Sequence[tuple[bytes, str]]) -> None:
        """Return popped messages ahead of the account's others, in order; no cap applies.

        They get keys below every key in the table (keys may be negative), so "oldest
        first" stays key order.

        Raises:
            StorageError: the database failed (nothing is written).
        """
        if not rows:
            return
        with self._transaction() as db:
            (lowest,) = db.execute("SELECT COALESCE(MIN(id), 1) FROM offline").fetchone()
            first = int(lowest) - len(rows)
            db.executemany(
                "INSERT INTO offline (id, host, username, stamp, stanza) VALUES (?, ?, ?, ?, ?)",
                [
                    (first + index, host, username, stamp, stanza)
                    for index, (stanza, stamp) in enumerate(rows)
                ],
            )

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
