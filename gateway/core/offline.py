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
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog
import trio

from gateway.core.blocking import RunBlocking
from gateway.core.metrics import LedgerState, Metrics
from gateway.core.session import Session
from gateway.errors import StanzaErrorCondition, StorageError
from gateway.storage.base import OfflineStore
from gateway.storage.codec import decode_stanza, encode_stanza
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID
from gateway.xmpp.stanza import delay_stamp

log = structlog.get_logger(module=__name__)

# Delivers a message to a bare JID's resources by the router's rules; False: none took it.
DeliverToBare = Callable[[Element, JID], Awaitable[bool]]


class Bounce(Protocol):
    async def __call__(
        self, stanza: Element, condition: StanzaErrorCondition, *, text: str | None = None
    ) -> LedgerState: ...


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
        store: OfflineStore,
        run_blocking: RunBlocking,
        *,
        max_per_user: int,
        max_bytes_per_user: int | None = None,
        metrics: Metrics,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.run_blocking = run_blocking
        self.max_per_user = max_per_user
        self.max_bytes_per_user = max_bytes_per_user
        self.locks = _UserLocks()

    async def store_or_deliver(
        self,
        stanza: Element,
        to: JID,
        deliver: DeliverToBare,
        bounce: Bounce,
    ) -> LedgerState:
        """Deliver to a resource that became available meanwhile, else store, else bounce.

        Returns:
            DELIVERED, STORED_OFFLINE, or what `bounce` answered.
        """
        async with self.locks.acquire(to):
            if await deliver(stanza, to):
                return LedgerState.DELIVERED
            if self.max_per_user == 0:
                return await bounce(
                    stanza,
                    StanzaErrorCondition.SERVICE_UNAVAILABLE,
                    text="the recipient is offline",
                )
            stamp = utc_stamp()
            delay = stanza.find(ns.DELAY, "delay")
            if delay is not None and delay.get("from") == to.domain:
                stamped = stanza  # stored before and rerouted: keep the first stamp
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
                return await bounce(
                    stanza, StanzaErrorCondition.SERVICE_UNAVAILABLE, text="offline storage is full"
                )
            self.metrics.offline_stored.inc()
            return LedgerState.STORED_OFFLINE

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

        Returns (rows consumed: sent, or dropped as unreadable; whether the store may hold
        more). Popping, sending and putting back what the session refused are one shielded
        unit: a session closing in the middle never makes popped messages vanish.
        """
        bare = session.bare_jid
        sent = skipped = 0
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
                        skipped += 1
                        continue
                    if message.namespace != ns.CLIENT:
                        log.warning("offline_row_not_a_client_stanza", to=str(bare))
                        skipped += 1
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
        self.metrics.offline_flushed.inc(sent)
        if sent:
            log.info("offline_flushed", count=sent)
        # Unreadable rows are gone too: progress, so the pacer does not wait for room.
        return sent + skipped, bool(rows)


#: Offline messages popped per step of a flush.
FLUSH_CHUNK = 100
#: Memory per stored byte assumed when pacing a flush (stored bytes are wire bytes).
FLUSH_MEMORY_FACTOR = 4


class FlushPacer:
    """The XEP-0160 flush of one session, paced by its client: only what fits in its
    outgoing queue and SM buffer now (a quarter of each is left to live traffic), more as
    it reads and acks. Owned by the session's connection task; one flush at a time.

    Args:
        offline: the offline service, or None when there is none.
        session: the session flushed to.
    """

    def __init__(self, offline: OfflineService | None, session: Session) -> None:
        self.offline = offline
        self.session = session
        self.flushing = False
        #: Set when the writer wrote or the client acked: there may be room again.
        self.room_changed = trio.Event()

    def start(self, nursery: trio.Nursery | None) -> None:
        """Start the flush on `nursery` (the serving one) unless it runs already; with no
        nursery (not serving) it starts when serving (re)starts."""
        if self.flushing or nursery is None or self.offline is None:
            return
        self.flushing = True
        nursery.start_soon(self._run, self.offline)

    def note_room(self) -> None:
        """The writer wrote or the client acked."""
        self.room_changed.set()

    def room(self) -> tuple[int, int]:
        """How many messages, and how many stored bytes of them, fit now."""
        session = self.session
        if session.outgoing is None:
            return 0, 0
        stats = session.outgoing.statistics()
        room = int(stats.max_buffer_size) - stats.current_buffer_used - 1
        room_bytes = session.max_queued_bytes * 3 // 4 - session.queued_bytes
        sm = session.sm
        if sm is not None and sm.buffering:
            if sm.buffer_max is not None:
                room = min(room, sm.buffer_max - sm.buffer_size - sm.buffer_max // 4)
            if sm.buffer_max_bytes is not None:
                room_bytes = min(room_bytes, sm.buffer_max_bytes * 3 // 4 - sm.buffer_bytes)
        return min(room, FLUSH_CHUNK), room_bytes // FLUSH_MEMORY_FACTOR

    async def _run(self, offline: OfflineService) -> None:
        session = self.session
        try:
            while session.flush_pending:
                room, room_bytes = self.room()
                if room <= 0 or room_bytes <= 0:
                    self.room_changed = trio.Event()
                    await self.room_changed.wait()
                    continue
                # Made before the flush: the writer may make room while it runs.
                room_changed = self.room_changed = trio.Event()
                sent, more = await offline.flush(session, room, room_bytes)
                if not more and session.close_request is None:
                    # (A closing session refused some: they went back to the store, and
                    # a hand-off must still flush them after the resume.)
                    session.flush_pending = False
                elif more and not sent:
                    # The next message does not fit yet: wait for the client to read.
                    await room_changed.wait()
        finally:
            self.flushing = False
