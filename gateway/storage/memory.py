"""In-memory stores: the stream management tables (`sm_session`, `stale_h`, the single-node
default) and `MemoryDatabase`, the base of the in-memory durable stores (`*_memory.py`).

The SM tables are plain dicts owned by the trio thread; every method is a checkpoint first (so
a cancelled call has done nothing) and then runs without awaiting, so no other task sees a
half-done operation. `sweep` is the exception: it removes in batches with a checkpoint
between them, so a sweep of 100k entries never holds the event loop for long.

`stale_h` is kept in insertion order. Callers put entries with non-decreasing `at`
(`trio.current_time()` is monotonic), so the oldest entries are at the front: `sweep` pops
from the front until it meets an entry that is young enough, in O(removed), and the size
bound drops from the front too. An entry put with an `at` earlier than the newest one is not
an error; it is swept no later than the entries put before it.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Final

import trio

from gateway.errors import StorageError
from gateway.storage.base import ClosedOnExit, SmSessionRecord, StaleH

#: Entries `MemoryStaleHTable.sweep` removes between two checkpoints (~0.3 ms of work).
_SWEEP_BATCH: Final = 1024


class MemoryDatabase(ClosedOnExit):
    """What the in-memory durable stores share: a lock and `close()`.

    The core calls durable stores from worker threads, so every method of a subclass runs
    under `_locked()`: one lock per store, held for dict and deque operations only (never
    for PBKDF2). The data lives as long as the object: a memory store is for tests and
    for a gateway that keeps nothing across restarts.
    """

    #: Names the store in error messages (like `SqliteDatabase.component`).
    component: str = ""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        """End the store; later calls raise `StorageError`. Idempotent."""
        with self._lock:
            self._closed = True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the lock of an open store."""
        with self._lock:
            if self._closed:
                raise StorageError(f"{self.component} store is closed")
            yield


class MemorySmSessionTable:
    """`sm_session` in a dict: SM id -> `SmSessionRecord`; an `SmSessionTable`.

    Unbounded on purpose: it holds one record per resumable session, and sessions are
    bounded by connections (a session leaves the table when it ends).
    """

    __slots__ = ("_records",)

    def __init__(self) -> None:
        self._records: dict[str, SmSessionRecord] = {}

    def __len__(self) -> int:
        return len(self._records)

    async def register(self, record: SmSessionRecord) -> None:
        """Add the record, replacing any record with the same `smid`."""
        await trio.lowlevel.checkpoint()
        self._records[record.smid] = record

    async def lookup(self, smid: str) -> SmSessionRecord | None:
        """The record for `smid`, or None."""
        await trio.lowlevel.checkpoint()
        return self._records.get(smid)

    async def remove(self, smid: str) -> bool:
        """Delete the record for `smid`; False when there was none."""
        await trio.lowlevel.checkpoint()
        return self._records.pop(smid, None) is not None


class MemoryStaleHTable:
    """`stale_h` in an insertion-ordered dict, bounded; a `StaleHTable`.

    Args:
        max_entries: most entries kept. A put beyond it drops the oldest entry first, so a
            client that churns sessions cannot grow memory without limit (about 350 bytes
            an entry with its strings: 100k entries is ~35 MB). A session whose entry was
            dropped gets `<failed/>` without `h`, as after the GC.

    Raises:
        ValueError: `max_entries` is not positive.
    """

    __slots__ = ("_entries", "_max_entries")

    def __init__(self, *, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self._max_entries = max_entries
        self._entries: OrderedDict[str, StaleH] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def put(self, entry: StaleH) -> int:
        """Add the entry at the young end, replacing any entry with the same `smid`;
        drop the oldest entry when the table is full. Returns how many were dropped."""
        await trio.lowlevel.checkpoint()
        entries = self._entries
        evicted = 0
        if entries.pop(entry.smid, None) is None and len(entries) >= self._max_entries:
            entries.popitem(last=False)
            evicted = 1
        entries[entry.smid] = entry
        return evicted

    async def get(self, smid: str) -> StaleH | None:
        """The entry for `smid`, or None."""
        await trio.lowlevel.checkpoint()
        return self._entries.get(smid)

    async def sweep(self, older_than: float) -> int:
        """Delete entries with `at < older_than` from the old end; returns how many.

        If cancelled, the entries removed before the cancellation stay removed.
        """
        await trio.lowlevel.checkpoint()
        entries = self._entries
        removed = 0
        while True:
            for _ in range(_SWEEP_BATCH):
                if not entries:
                    return removed
                # Pop, and put back the one entry that is young enough: cheaper than
                # peeking at the front of an OrderedDict before every pop.
                smid, entry = entries.popitem(last=False)
                if entry.at >= older_than:
                    entries[smid] = entry
                    entries.move_to_end(smid, last=False)
                    return removed
                removed += 1
            # A put may run here; it appends at the young end, behind what is left.
            await trio.lowlevel.checkpoint()
