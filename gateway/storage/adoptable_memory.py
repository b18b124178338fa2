"""Sessions left for adoption, in memory: the in-memory `AdoptableStore`.

Only useful within one process (tests, or a single node that adopts its own sessions); a
cluster shares the Redis store. Like the memory SM tables, the store is owned by the trio
thread: every method is a checkpoint first (so a cancelled call has done nothing) and then
runs without awaiting, so no other task sees a half-done operation and two takers never
both get a snapshot.

An expired snapshot stays until `take_expired` takes it (`take` leaves it). To find those
without scanning, `put` keeps a heap of `(expires_at, sequence, smid)`; an item whose
snapshot was taken or replaced stays in the heap until its time passes (it is then
skipped), and the heap is rebuilt from the stored snapshots when such items make up most
of it.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from typing import Final, NamedTuple

import trio

#: The heap is rebuilt when it holds more than twice the snapshots, plus this many items.
_HEAP_SLACK: Final = 64


class _Entry(NamedTuple):
    """One stored snapshot; `sequence` tells it apart from an earlier one of its smid."""

    sequence: int
    expires_at: float
    snapshot: bytes


class MemoryAdoptableStore:
    """Encoded session snapshots by SM id, each until its `expires_at`; an `AdoptableStore`.

    Args:
        clock: wall-clock UNIX seconds (`time.time`; a test passes a fake one). A snapshot
            has expired once `clock() >= expires_at`.
    """

    __slots__ = ("_clock", "_entries", "_heap", "_sequence")

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._sequence = itertools.count()

    def __len__(self) -> int:
        """Snapshots held, expired ones not yet dropped included."""
        return len(self._entries)

    async def put(self, smid: str, snapshot: bytes, expires_at: float) -> None:
        """Store the snapshot, replacing any with the same smid; kept past `expires_at`
        until `take_expired`."""
        await trio.lowlevel.checkpoint()
        sequence = next(self._sequence)
        self._entries[smid] = _Entry(sequence, expires_at, bytes(snapshot))
        heapq.heappush(self._heap, (expires_at, sequence, smid))
        if len(self._heap) > 2 * len(self._entries) + _HEAP_SLACK:
            self._heap = [(e.expires_at, e.sequence, s) for s, e in self._entries.items()]
            heapq.heapify(self._heap)

    async def take(self, smid: str) -> bytes | None:
        """Remove and return the snapshot of `smid`; None when there is none or it
        expired (an expired one stays, for `take_expired`)."""
        await trio.lowlevel.checkpoint()
        entry = self._entries.get(smid)
        if entry is None or entry.expires_at <= self._clock():
            return None
        del self._entries[smid]
        return entry.snapshot

    async def take_expired(self, limit: int) -> list[tuple[str, bytes]]:
        """Remove and return up to `limit` expired snapshots (smid, snapshot), soonest
        expired first."""
        await trio.lowlevel.checkpoint()
        heap, entries, now = self._heap, self._entries, self._clock()
        taken: list[tuple[str, bytes]] = []
        while heap and heap[0][0] <= now and len(taken) < limit:
            _, sequence, smid = heapq.heappop(heap)
            entry = entries.get(smid)
            if entry is not None and entry.sequence == sequence:
                del entries[smid]
                taken.append((smid, entry.snapshot))
        return taken
