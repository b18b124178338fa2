"""Offline messages (XEP-0160) in memory: the in-memory `OfflineStore`.

One deque of `(stanza, stamp)` per account, oldest first, with the sum of its stanza
bytes, so both per-user caps are checked in O(1). Every method runs under the store's lock
(it is called from worker threads): the cap cannot be exceeded by two concurrent `store`
calls, and a message popped by one `pop_all` is never returned by another. An account
whose last message goes is dropped from the dict, so memory follows what is stored.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.storage.memory import MemoryDatabase


@dataclass(slots=True)
class _Mailbox:
    """One account's messages, oldest first, and the bytes of their stanzas."""

    rows: deque[tuple[bytes, str]] = field(default_factory=deque)
    size: int = 0


class MemoryOfflineStore(MemoryDatabase):
    """Offline messages per account (host, username); an `OfflineStore`, thread-safe.

    Bounded per account by the caps its callers pass (`max_per_user`, `max_bytes_per_user`),
    like the SQLite store.
    """

    component = "offline"

    def __init__(self) -> None:
        super().__init__()
        self._mailboxes: dict[tuple[str, str], _Mailbox] = {}

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

        Returns:
            True when stored; False (nothing written) when the account is at a cap.

        Raises:
            StorageError: the store is closed.
            ValueError: `max_per_user` is negative.
        """
        if max_per_user < 0:
            raise ValueError("max_per_user must not be negative")
        key = (host, username)
        with self._locked():
            mailbox = self._mailboxes.get(key)
            held, held_bytes = (0, 0) if mailbox is None else (len(mailbox.rows), mailbox.size)
            if held >= max_per_user:
                return False
            if max_bytes_per_user is not None and held_bytes + len(stanza) > max_bytes_per_user:
                return False
            if mailbox is None:
                mailbox = self._mailboxes[key] = _Mailbox()
            mailbox.rows.append((bytes(stanza), stamp))
            mailbox.size += len(stanza)
        return True

    def pop_all(
        self, host: str, username: str, *, limit: int | None = None, max_bytes: int | None = None
    ) -> list[tuple[bytes, str]]:
        """Remove and return the account's messages, oldest first: at most `limit`, and at
        most `max_bytes` of stanzas, but always the oldest one when there is one.

        Raises:
            StorageError: the store is closed.
            ValueError: `limit` is negative.
        """
        if limit is not None and limit < 0:
            raise ValueError("limit must not be negative")
        key = (host, username)
        taken: list[tuple[bytes, str]] = []
        with self._locked():
            mailbox = self._mailboxes.get(key)
            if mailbox is None:
                return taken
            rows, total = mailbox.rows, 0
            while rows and (limit is None or len(taken) < limit):
                size = len(rows[0][0])
                if taken and max_bytes is not None and total + size > max_bytes:
                    break
                taken.append(rows.popleft())
                total += size
            mailbox.size -= total
            if not rows:
                del self._mailboxes[key]
        return taken

    def put_back(self, host: str, username: str, rows: Sequence[tuple[bytes, str]]) -> None:
        """Return popped messages ahead of the account's others, in order; no cap applies.

        Raises:
            StorageError: the store is closed (nothing is written).
        """
        if not rows:
            return
        returned = [(bytes(stanza), stamp) for stanza, stamp in rows]
        with self._locked():
            mailbox = self._mailboxes.setdefault((host, username), _Mailbox())
            mailbox.rows.extendleft(reversed(returned))
            mailbox.size += sum(len(stanza) for stanza, _stamp in returned)

    def count(self, host: str, username: str) -> int:
        """How many messages the account holds."""
        with self._locked():
            mailbox = self._mailboxes.get((host, username))
            return 0 if mailbox is None else len(mailbox.rows)

    def remove_account(self, host: str, username: str) -> int:
        """Delete every message of the account; returns how many there were."""
        with self._locked():
            mailbox = self._mailboxes.pop((host, username), None)
            return 0 if mailbox is None else len(mailbox.rows)
