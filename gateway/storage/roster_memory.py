"""Roster items in memory (RFC 6121 section 2): the in-memory `RosterStore`."""

from __future__ import annotations

from gateway.storage.base import RosterItem
from gateway.storage.memory import MemoryDatabase


class MemoryRosterStore(MemoryDatabase):
    """Roster items per account (host, username) in dicts; a `RosterStore`, thread-safe.

    Unbounded like the SQLite store: the core bounds each item (name length, groups).
    """

    component = "roster"

    def __init__(self) -> None:
        super().__init__()
        self._rosters: dict[tuple[str, str], dict[str, RosterItem]] = {}

    def items(self, host: str, username: str) -> list[RosterItem]:
        """The account's items, sorted by contact."""
        with self._locked():
            roster = self._rosters.get((host, username), {})
            return [roster[contact] for contact in sorted(roster)]

    def upsert(self, host: str, username: str, item: RosterItem) -> RosterItem:
        """Add or update an item; the subscription state of an existing item is kept
        ("none" for a new one)."""
        with self._locked():
            roster = self._rosters.setdefault((host, username), {})
            old = roster.get(item.contact)
            stored = RosterItem(
                item.contact,
                item.name,
                "none" if old is None else old.subscription,
                tuple(item.groups),
            )
            roster[item.contact] = stored
        return stored

    def remove(self, host: str, username: str, contact: str) -> bool:
        """Delete one item; False when there was none."""
        with self._locked():
            roster = self._rosters.get((host, username))
            if roster is None or roster.pop(contact, None) is None:
                return False
            if not roster:
                del self._rosters[(host, username)]
            return True

    def remove_account(self, host: str, username: str) -> int:
        """Delete every item of the account; returns how many there were."""
        with self._locked():
            return len(self._rosters.pop((host, username), {}))
