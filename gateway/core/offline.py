"""Offline storage (XEP-0160) with XEP-0203 delay stamps, serialized per user.

`store_or_deliver` and `flush` for one account run under that account's lock. Inside the
lock `store_or_deliver` looks for an available resource once more, and `flush` runs after
the session became available, so a message stored while the user's new session sends its
initial presence is either flushed to that session or delivered live, never left in the
store until the next login (DESIGN.md section 3).
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Callable
from typing import Protocol

import structlog
import trio

from gateway.core.blocking import RunBlocking
from gateway.core.session import Session
from gateway.errors import StanzaErrorCondition, StorageError
from gateway.storage.codec import decode_stanza, encode_stanza
from gateway.storage.offline_sqlite import SqliteOfflineStore
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID
from gateway.xmpp.stanza import delay_stamp

log = structlog.get_logger(module=__name__)

MessageTargets = Callable[[Element, JID], list[Session]]


class Bounce(Protocol):
    async def __call__(
        self, stanza: Element, condition: StanzaErrorCondition, *, text: str | None = None
    ) -> None: ...


def utc_stamp(now: datetime.datetime | None = None) -> str:
    """XEP-0082 date-time in UTC with milliseconds."""
    moment = now or datetime.datetime.now(datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class _UserLocks:
    """One trio.Lock per account, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[JID, tuple[trio.Lock, int]] = {}

    def acquire(self, jid: JID) -> _Held:
        lock, users = self._locks.get(jid, (trio.Lock(), 0))
        self._locks[jid] = (lock, users + 1)
        return _Held(self, jid, lock)

    def release(self, jid: JID) -> None:
        lock, users = self._locks[jid]
        if users <= 1:
            del self._locks[jid]
        else:
            self._locks[jid] = (lock, users - 1)


class _Held:
    def __init__(self, owner: _UserLocks, jid: JID, lock: trio.Lock) -> None:
        self.owner, self.jid, self.lock = owner, jid, lock

    async def __aenter__(self) -> None:
        try:
            await self.lock.acquire()
        except BaseException:
            self.owner.release(self.jid)
            raise

    async def __aexit__(self, *exc: object) -> None:
        self.lock.release()
        self.owner.release(self.jid)


class OfflineService:
    """Stores messages for accounts without an available resource and flushes them."""

    def __init__(
        self,
        store: SqliteOfflineStore,
        run_blocking: RunBlocking,
        *,
        max_per_user: int,
        max_bytes_per_user: int | None = None,
    ) -> None:
        self.store = store
        self.run_blocking = run_blocking
        self.max_per_user = max_per_user
        self.max_bytes_per_user = max_bytes_per_user
        self.locks = _UserLocks()
        self.stored = 0
        self.flushed = 0

    async def store_or_deliver(
        self,
        stanza: Element,
        to: JID,
        targets: MessageTargets,
        bounce: Bounce,
    ) -> None:
        """Deliver to a resource that became available meanwhile, else store, else bounce."""
        async with self.locks.acquire(to):
            for session in targets(stanza, to):
                if session.send(stanza):
                    return
            if self.max_per_user == 0:
                await bounce(
                    stanza,
                    StanzaErrorCondition.SERVICE_UNAVAILABLE,
                    text="the recipient is offline",
                )
                return
            stamp = utc_stamp()
            delay = stanza.find(ns.DELAY, "delay")
            if delay is not None and delay.get("from") == to.domain:
                stamped = stanza  # stored before and handed back: keep the first stamp
            else:
                stamped = stanza.append(delay_stamp(stamp, to.domain, "Offline Storage"))
            try:
                stored = await self.run_blocking(self._store, to, encode_stanza(stamped), stamp)
            except StorageError:
                log.exception("offline_store_failed", to=str(to))
                stored = False
            if not stored:
                # The per-user caps (mod_offline.max_per_user, max_bytes_per_user): the
                # sender learns it.
                await bounce(
                    stanza, StanzaErrorCondition.SERVICE_UNAVAILABLE, text="offline storage is full"
                )
                return
            self.stored += 1

    def _store(self, to: JID, data: bytes, stamp: str) -> bool:
        return self.store.store(
            to.domain,
            to.local or "",
            data,
            stamp,
            max_per_user=self.max_per_user,
            max_bytes_per_user=self.max_bytes_per_user,
        )

    async def flush(
        self, session: Session, limit: int, max_bytes: int | None = None
    ) -> tuple[int, bool]:
        """Send up to `limit` stored messages (and `max_bytes` stored bytes, at least one
        message) to `session` (available now), oldest first; a message that does not fit
        the session's byte bounds stays for the next step.

        Returns (messages sent, whether the store may hold more). Popping, sending and
        putting back what the session refused are one shielded unit: a session closing
        in the middle never makes popped messages vanish.
        """
        bare = session.bare_jid
        sent = 0
        async with self.locks.acquire(bare):
            with trio.CancelScope(shield=True):
                rows = await self.run_blocking(
                    functools.partial(
                        self.store.pop_all,
                        bare.domain,
                        bare.local or "",
                        limit=limit,
                        max_bytes=max_bytes,
                    )
                )
                unsent: list[tuple[bytes, str]] = []
                for index, (data, _stamp) in enumerate(rows):
                    try:
                        message = decode_stanza(data)
                    except StorageError:
                        log.exception("offline_row_unreadable", to=str(bare))
                        continue
                    if message.namespace != ns.CLIENT:
                        continue
                    if not session.has_room_for(message) or not session.send(message):
                        unsent = rows[index:]
                        break
                    sent += 1
                if unsent:
                    # The session is closing, or full for now: back into the store ahead
                    # of the rest (the caps already counted them), never dropped.
                    await self.run_blocking(
                        functools.partial(
                            self.store.put_back, bare.domain, bare.local or "", unsent
                        )
                    )
        self.flushed += sent
        if sent:
            log.info("offline_flushed", count=sent)
        return sent, bool(rows)
