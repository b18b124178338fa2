"""The stream management tables (`sm_session`, `stale_h`) in SQLite, in the gateway's file.

The tables' protocols are async (`SmSessionTable`, `StaleHTable`: the redis backend does
network I/O), and SQLite blocks, so each table takes a `RunBlocking` runner, as the core's
services do for the sync stores: `gateway.core.blocking.in_threads` in production,
`inline` in tests with a mock clock. The blocking half is this module's private sync
methods, run under the lock and transactions of `SqliteDatabase`; the event loop never
waits for SQLite. Every call is a checkpoint before it does anything (the runner's), so a
call in a cancelled scope does nothing; once a worker thread runs it, it completes.

Times are stored as given: the core passes wall-clock seconds (UNIX time), so a row means
the same to every process that shares the file.

`stale_h` is bounded like the memory table: a put beyond `max_entries` deletes the oldest
entries (lowest `seq`, the insertion order) first. `sweep` deletes in batches of
`_SWEEP_BATCH` rows, one transaction each, so it never holds the write lock for long.
"""

from __future__ import annotations

import os
from typing import Final

from gateway.storage.base import RunBlocking, SmSessionRecord, StaleH
from gateway.storage.sqlite import SqliteDatabase

#: Rows one `sweep` transaction deletes at most.
_SWEEP_BATCH: Final = 1024

_SM_SESSION_SCHEMA: Final = (
    """CREATE TABLE sm_session (
        smid TEXT PRIMARY KEY,
        jid TEXT NOT NULL,
        node TEXT NOT NULL,
        created REAL NOT NULL,
        epoch INTEGER NOT NULL
    ) WITHOUT ROWID""",
)
_STALE_H_SCHEMA: Final = (
    """CREATE TABLE stale_h (
        seq INTEGER PRIMARY KEY,
        smid TEXT NOT NULL UNIQUE,
        h INTEGER NOT NULL CHECK (h >= 0 AND h < 4294967296),
        jid TEXT NOT NULL,
        at REAL NOT NULL
    )""",
    "CREATE INDEX stale_h_by_at ON stale_h (at)",
)


class SqliteSmSessionTable(SqliteDatabase):
    """`sm_session` in an SQLite file; an `SmSessionTable`.

    Args:
        path: the database file (parent directories are created), or ":memory:".
        run_blocking: how the SQLite calls run (worker threads, or inline in tests).
        busy_timeout: seconds to wait for another process's write lock.

    Raises:
        StorageError: the file cannot be opened, or its schema is another version.
    """

    component = "sm_session"
    version = 1
    schema = _SM_SESSION_SCHEMA

    def __init__(
        self,
        path: str | os.PathLike[str],
        run_blocking: RunBlocking,
        *,
        busy_timeout: float = 30.0,
    ) -> None:
        super().__init__(path, busy_timeout=busy_timeout)
        self._run = run_blocking

    async def register(self, record: SmSessionRecord) -> None:
        """Add the record, replacing any record with the same `smid`."""
        await self._run(self._register, record)

    async def lookup(self, smid: str) -> SmSessionRecord | None:
        """The record for `smid`, or None."""
        return await self._run(self._lookup, smid)

    async def remove(self, smid: str) -> bool:
        """Delete the record for `smid`; False when there was none."""
        return await self._run(self._remove, smid)

    def _register(self, record: SmSessionRecord) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO sm_session (smid, jid, node, created, epoch)"
                " VALUES (?, ?, ?, ?, ?)",
                (record.smid, record.jid, record.node, record.created, record.epoch),
            )

    def _lookup(self, smid: str) -> SmSessionRecord | None:
        rows = self._query(
            "SELECT jid, node, created, epoch FROM sm_session WHERE smid = ?", (smid,)
        )
        if not rows:
            return None
        jid, node, created, epoch = rows[0]
        return SmSessionRecord(
            smid=smid, jid=str(jid), node=str(node), created=float(created), epoch=int(epoch)
        )

    def _remove(self, smid: str) -> bool:
        with self._transaction() as db:
            cursor = db.execute("DELETE FROM sm_session WHERE smid = ?", (smid,))
        return cursor.rowcount > 0


class SqliteStaleHTable(SqliteDatabase):
    """`stale_h` in an SQLite file, bounded; a `StaleHTable`.

    Args:
        path: the database file (parent directories are created), or ":memory:".
        run_blocking: how the SQLite calls run (worker threads, or inline in tests).
        max_entries: most entries kept; a put beyond it deletes the oldest entry first
            (that session then gets `<failed/>` without `h`, as after the GC).
        busy_timeout: seconds to wait for another process's write lock.

    Raises:
        StorageError: the file cannot be opened, or its schema is another version.
        ValueError: `max_entries` is not positive.
    """

    component = "stale_h"
    version = 1
    schema = _STALE_H_SCHEMA

    def __init__(
        self,
        path: str | os.PathLike[str],
        run_blocking: RunBlocking,
        *,
        max_entries: int = 100_000,
        busy_timeout: float = 30.0,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        super().__init__(path, busy_timeout=busy_timeout)
        self._run = run_blocking
        self._max_entries = max_entries

    async def put(self, entry: StaleH) -> int:
        """Add the entry as the youngest, replacing any entry with the same `smid`;
        delete the oldest entry when the table is full. Returns how many were deleted."""
        return await self._run(self._put, entry)

    async def get(self, smid: str) -> StaleH | None:
        """The entry for `smid`, or None."""
        return await self._run(self._get, smid)

    async def sweep(self, older_than: float) -> int:
        """Delete entries with `at < older_than`, a batch per transaction; returns how many.

        If cancelled, the batches deleted before the cancellation stay deleted.
        """
        removed = 0
        while True:
            deleted = await self._run(self._sweep_batch, older_than)
            removed += deleted
            if deleted < _SWEEP_BATCH:
                return removed

    def _put(self, entry: StaleH) -> int:
        with self._transaction() as db:
            excess = 0
            replaced = db.execute("DELETE FROM stale_h WHERE smid = ?", (entry.smid,)).rowcount
            if not replaced:
                # seq only grows, so max - min + 1 bounds the row count from above: the
                # exact count (a scan) is only needed near the bound.
                low, high = db.execute("SELECT MIN(seq), MAX(seq) FROM stale_h").fetchone()
                if low is not None and high - low + 1 >= self._max_entries:
                    (held,) = db.execute("SELECT COUNT(*) FROM stale_h").fetchone()
                    excess = max(0, int(held) - self._max_entries + 1)
                    db.execute(
                        "DELETE FROM stale_h WHERE seq IN"
                        " (SELECT seq FROM stale_h ORDER BY seq LIMIT ?)",
                        (excess,),
                    )
            db.execute(
                "INSERT INTO stale_h (smid, h, jid, at) VALUES (?, ?, ?, ?)",
                (entry.smid, entry.h, entry.jid, entry.at),
            )
        return excess

    def _get(self, smid: str) -> StaleH | None:
        rows = self._query("SELECT h, jid, at FROM stale_h WHERE smid = ?", (smid,))
        if not rows:
            return None
        h, jid, at = rows[0]
        return StaleH(smid=smid, h=int(h), jid=str(jid), at=float(at))

    def _sweep_batch(self, older_than: float) -> int:
        with self._transaction() as db:
            cursor = db.execute(
                "DELETE FROM stale_h WHERE seq IN (SELECT seq FROM stale_h WHERE at < ? LIMIT ?)",
                (older_than, _SWEEP_BATCH),
            )
        return cursor.rowcount
