"""Roster items in SQLite (RFC 6121 section 2), beside the accounts.

Methods are synchronous and called through `trio.to_thread.run_sync`; each worker thread
gets its own connection (sqlite3 connections are not shared across threads).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS roster (
    host TEXT NOT NULL,
    username TEXT NOT NULL,
    contact TEXT NOT NULL,
    name TEXT,
    subscription TEXT NOT NULL DEFAULT 'none',
    groups TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (host, username, contact)
)
"""


@dataclass(frozen=True, slots=True)
class RosterItem:
    contact: str
    name: str | None = None
    subscription: str = "none"
    groups: tuple[str, ...] = ()


class SqliteRosterStore:
    """Roster items per account (host, username)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._db() as db:
            db.execute(SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            self._local.db = db
        return db

    def items(self, host: str, username: str) -> list[RosterItem]:
        rows = self._db().execute(
            "SELECT contact, name, subscription, groups FROM roster"
            " WHERE host=? AND username=? ORDER BY contact",
            (host, username),
        )
        return [RosterItem(c, n, s, tuple(json.loads(g))) for c, n, s, g in rows]

    def upsert(self, host: str, username: str, item: RosterItem) -> RosterItem:
        """Add or update an item; the subscription state is kept for existing items."""
        with self._db() as db:
            row = db.execute(
                "SELECT subscription FROM roster WHERE host=? AND username=? AND contact=?",
                (host, username, item.contact),
            ).fetchone()
            subscription = row[0] if row else "none"
            db.execute(
                "INSERT OR REPLACE INTO roster VALUES (?, ?, ?, ?, ?, ?)",
                (host, username, item.contact, item.name, subscription, json.dumps(item.groups)),
            )
        return RosterItem(item.contact, item.name, subscription, item.groups)

    def remove(self, host: str, username: str, contact: str) -> bool:
        with self._db() as db:
            cur = db.execute(
                "DELETE FROM roster WHERE host=? AND username=? AND contact=?",
                (host, username, contact),
            )
        return cur.rowcount > 0

    def remove_account(self, host: str, username: str) -> None:
        with self._db() as db:
            db.execute("DELETE FROM roster WHERE host=? AND username=?", (host, username))
