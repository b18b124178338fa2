"""Roster items in SQLite (RFC 6121 section 2), in the same file as the accounts.

Component "roster" of the shared `schema_version` table; one connection behind a lock like
the account store (see `gateway.storage.sqlite`), called from worker threads. Groups are
stored as a JSON array, in the user's order.
"""

from __future__ import annotations

import json
from typing import Final

# COMPAT: tests/integration/test_cli.py imports RosterItem from here; it is defined in
# gateway.storage.base (drop the re-export when that import moves).
from gateway.storage.base import RosterItem as RosterItem
from gateway.storage.sqlite import SqliteDatabase

_SCHEMA: Final = (
    """CREATE TABLE roster (
        host TEXT NOT NULL,
        username TEXT NOT NULL,
        contact TEXT NOT NULL,
        name TEXT,
        subscription TEXT NOT NULL DEFAULT 'none',
        groups TEXT NOT NULL DEFAULT '[]',
        PRIMARY KEY (host, username, contact)
    ) WITHOUT ROWID""",
)


class SqliteRosterStore(SqliteDatabase):
    """Roster items per account (host, username); a `RosterStore`.

    Args:
        path: the database file (parent directories are created), or ":memory:".
        busy_timeout: seconds to wait for another process's write lock.

    Raises:
        StorageError: the file cannot be opened, or its schema is another version.
    """

    component = "roster"
    version = 1
    schema = _SCHEMA

    def items(self, host: str, username: str) -> list[RosterItem]:
        """The account's items, sorted by contact."""
        rows = self._query(
            "SELECT contact, name, subscription, groups FROM roster"
            " WHERE host = ? AND username = ? ORDER BY contact",
            (host, username),
        )
        return [RosterItem(c, n, s, tuple(json.loads(g))) for c, n, s, g in rows]

    def upsert(self, host: str, username: str, item: RosterItem) -> RosterItem:
        """Add or update an item; the subscription state of an existing item is kept
        ("none" for a new one)."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT subscription FROM roster WHERE host = ? AND username = ? AND contact = ?",
                (host, username, item.contact),
            ).fetchone()
            subscription = row[0] if row else "none"
            db.execute(
                "INSERT OR REPLACE INTO roster VALUES (?, ?, ?, ?, ?, ?)",
                (host, username, item.contact, item.name, subscription, json.dumps(item.groups)),
            )
        return RosterItem(item.contact, item.name, subscription, item.groups)

    def remove(self, host: str, username: str, contact: str) -> bool:
        """Delete one item; False when there was none."""
        with self._transaction() as db:
            cursor = db.execute(
                "DELETE FROM roster WHERE host = ? AND username = ? AND contact = ?",
                (host, username, contact),
            )
        return cursor.rowcount > 0

    def remove_account(self, host: str, username: str) -> int:
        """Delete every item of the account; returns how many there were."""
        with self._transaction() as db:
            cursor = db.execute(
                "DELETE FROM roster WHERE host = ? AND username = ?", (host, username)
            )
        return cursor.rowcount
