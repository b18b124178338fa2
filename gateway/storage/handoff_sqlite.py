"""Sessions handed off at shutdown, in SQLite (the same file as the accounts).

The single-node backend of `HandoffStore`: a draining gateway writes its resumable
sessions here before it exits and takes them back when it starts again, so a restart
(an upgrade, a new certificate) does not end sessions that clients will resume. Rows are
encoded snapshots (`gateway.storage.snapshot`), opaque here.

`put_many` is one transaction; `take_all` reads and deletes in one `BEGIN IMMEDIATE`
transaction, so two processes opening one file never both take a session.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from gateway.storage.sqlite import SqliteDatabase

_SCHEMA: Final = (
    """CREATE TABLE sm_handoff (
        seq INTEGER PRIMARY KEY,
        smid TEXT NOT NULL UNIQUE,
        snapshot BLOB NOT NULL
    )""",
)


class SqliteHandoffStore(SqliteDatabase):
    """Encoded session snapshots by SM id; a `HandoffStore`.

    Args:
        path: the database file (parent directories are created), or ":memory:".
        busy_timeout: seconds to wait for another process's write lock.

    Raises:
        StorageError: the file cannot be opened, or its schema is another version.
    """

    component = "sm_handoff"
    version = 1
    schema = _SCHEMA

    def put_many(self, snapshots: Sequence[tuple[str, bytes]]) -> None:
        """Store `(smid, snapshot)` pairs in one transaction (replacing equal smids)."""
        if not snapshots:
            return
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO sm_handoff (smid, snapshot) VALUES (?, ?)",
                [(smid, data) for smid, data in snapshots],
            )

    def take_all(self) -> list[bytes]:
        """Remove and return every snapshot, oldest first, in one transaction."""
        with self._transaction() as db:
            rows = db.execute("SELECT snapshot FROM sm_handoff ORDER BY seq").fetchall()
            db.execute("DELETE FROM sm_handoff")
        return [bytes(row[0]) for row in rows]

    def count(self) -> int:
        """How many snapshots are stored."""
        return int(self._query("SELECT COUNT(*) FROM sm_handoff", ())[0][0])
