"""Roster items in SQLite (RFC 6121 section 2), in the same file as the accounts.

Component "roster" of the shared `schema_version` table; one connection behind a lock like
the account store (see `gateway.storage.sqlite`), called through `trio.to_thread.run_sync`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

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


@dataclass(frozen=True, slots=True)
class RosterItem:
    contact: str
    name: str | None = None
    subscription: str = "none"
    groups: tuple[str, ...] = ()


class SqliteRosterStore(SqliteDatabase):
    """Roster items per account (host, username)."""

    component = "roster"
    version = 1
    schema = _SCHEMA

    def items(self, host: str, username: str) -> list[RosterItem]:
        rows = self._query(
            "SELECT contact, name, subscription, groups FROM roster"
            " WHERE host = ? AND username = ? ORDER BY contact",
            (host, username),
        )
        return [RosterItem(c, n, s, tuple(json.loads(g))) for c, n, s, g in rows]

    def upsert(self, host: str, username: str, item: RosterItem) -> RosterItem:
        """Add or update an item; the subscription state of an existing item is kept."""
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
        with self._transaction() as db:
            cursor = db.execute(
                "DELETE FROM roster WHERE host = ? AND username = ? AND contact = ?",
                (host, username, contact),
            )
        return cursor.rowcount > 0

    def remove_account(self, host: str, username: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM roster WHERE host = ? AND username = ?", (host, username))
