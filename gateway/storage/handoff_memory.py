"""Sessions handed off, in memory: the in-memory `HandoffStore`.

Only useful within one process (tests, or a node that hands sessions to itself); the
SQLite store is what carries sessions across a restart. Snapshots are opaque bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.storage.memory import MemoryDatabase


class MemoryHandoffStore(MemoryDatabase):
    """Encoded session snapshots by SM id, oldest first; a `HandoffStore`, thread-safe.

    Unbounded like the SQLite store: it holds at most one snapshot per resumable session.
    """

    component = "sm_handoff"

    def __init__(self) -> None:
        super().__init__()
        # Insertion ordered: a replaced snapshot moves to the young end, as in SQLite.
        self._snapshots: dict[str, bytes] = {}

    def put_many(self, snapshots: Sequence[tuple[str, bytes]]) -> None:
        """Store `(smid, snapshot)` pairs in one step (replacing equal smids)."""
        with self._locked():
            for smid, data in snapshots:
                self._snapshots.pop(smid, None)
                self._snapshots[smid] = bytes(data)

    def take_all(self) -> list[bytes]:
        """Remove and return every snapshot, oldest first, in one step."""
        with self._locked():
            taken = list(self._snapshots.values())
            self._snapshots.clear()
        return taken

    def count(self) -> int:
        """How many snapshots are stored."""
        with self._locked():
            return len(self._snapshots)
