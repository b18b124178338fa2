"""Keeping resumable sessions across a shutdown (DESIGN sections 5 and 6).

Theory of operation
-------------------
When the gateway stops (after the SIGTERM drain), every connection is asked to close with
`system-shutdown`. A session that could still be resumed (stream management enabled with
resume, buffer not overflowed) is *handed off* instead of ended: its connection task turns
it into a `SessionSnapshot` (`snapshot_of`), adds it to `Handoff.pending`, and leaves the
router and `sm_session` without broadcasting unavailable presence, writing stale_h or
rerouting its buffer: the session is not over, it moves. After the last connection task has
finished, `app.py` writes every pending snapshot in one batch to the hand-off store.

When the gateway starts, before it listens, it takes every snapshot from the store (one
atomic step, so only one process gets each) and parks each session again
(`gateway.core.revive`) for what is left of its resumption time: the client that reconnects
resumes it as if the node had never gone, and gets every stanza it had not acked. A session
whose time ran out while the node was down ends at once through the normal end path (its
messages go to offline storage, its h to stale_h).

The snapshot's expiry is wall-clock time (it crosses processes); a parked session keeps
the deadline it had, a live one gets its full granted `max` from the moment of the hand-off
(its transport is lost then).

What this does not cover: a node that dies without a drain (SIGKILL, power loss) hands
nothing off; its sessions are lost as before. That, and moving sessions to *other* nodes
while this one is down, is the cluster's job (DESIGN section 6).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from gateway.core.blocking import RunBlocking
from gateway.core.session import Session
from gateway.errors import JIDError, StorageError
from gateway.storage.base import HandoffStore, SessionSnapshot
from gateway.storage.snapshot import decode_snapshot, encode_snapshot
from gateway.xmpp.jid import JID

log = structlog.get_logger(module=__name__)


def snapshot_of(session: Session, *, expires_at: float, epoch: int) -> SessionSnapshot:
    """The snapshot of a resumable session (its SM state must have an smid and max)."""
    sm = session.sm
    assert sm is not None and sm.smid is not None and sm.max is not None
    assert session.full_jid is not None
    return SessionSnapshot(
        smid=sm.smid,
        full_jid=str(session.full_jid),
        expires_at=expires_at,
        max=sm.max,
        counter_in=sm.counter_in,
        counter_out=sm.counter_out,
        buffer=tuple(sm.unacked()),
        priority=session.priority,
        presence=session.presence,
        interested=session.interested,
        directed=tuple(sorted(str(jid) for jid in session.directed)),
        flush_pending=session.flush_pending,
        epoch=epoch,
    )


@dataclass(frozen=True, slots=True)
class Revivable:
    """A snapshot that passed the checks, with its JID parsed."""

    snapshot: SessionSnapshot
    full_jid: JID
    directed: frozenset[JID]


@dataclass(eq=False)
class Handoff:
    """The hand-off store as the core uses it: collect at shutdown, take at start.

    Args:
        store: where snapshots are kept between processes.
        run_blocking: how store calls run (worker threads, or inline in tests).
        hosts: the served domains; a snapshot of another domain cannot be revived.
        wall_clock: UNIX time in seconds (tests inject their own).
    """

    store: HandoffStore
    run_blocking: RunBlocking
    hosts: frozenset[str]
    wall_clock: Callable[[], float] = time.time
    pending: list[tuple[str, bytes]] = field(default_factory=list)
    #: Stanzas held by the pending snapshots (for the shutdown log line).
    pending_stanzas: int = 0

    def add(self, snapshot: SessionSnapshot) -> bool:
        """Queue a snapshot for the batch write; False when it cannot be encoded (the
        caller then ends the session normally, so nothing is lost)."""
        try:
            data = encode_snapshot(snapshot)
        except ValueError as exc:
            log.warning("handoff_encode_failed", smid=snapshot.smid, error=str(exc))
            return False
        self.pending.append((snapshot.smid, data))
        self.pending_stanzas += len(snapshot.buffer)
        return True

    async def write_pending(self) -> int:
        """Write the collected snapshots in one batch; returns how many.

        Raises:
            StorageError: the store failed; the snapshots (and the stanzas they hold) are
                lost, which the caller logs as an error.
        """
        pending, self.pending = self.pending, []
        stanzas, self.pending_stanzas = self.pending_stanzas, 0
        if pending:
            await self.run_blocking(self.store.put_many, pending)
            log.info("sessions_handed_off", sessions=len(pending), stanzas=stanzas)
        return len(pending)

    async def take_all(self) -> list[Revivable]:
        """Take every stored snapshot (atomically) and keep those that can be revived.

        A damaged record, or one of a domain no longer served, is dropped with a warning
        that says how many stanzas went with it.

        Raises:
            StorageError: the store failed (nothing was taken).
        """
        records = await self.run_blocking(self.store.take_all)
        revivable: list[Revivable] = []
        for data in records:
            try:
                snapshot = decode_snapshot(data)
            except StorageError as exc:
                log.warning("handoff_snapshot_dropped", reason="damaged", error=str(exc))
                continue
            try:
                full = JID.parse(snapshot.full_jid)
                directed = frozenset(JID.parse(text) for text in snapshot.directed)
            except JIDError as exc:
                log.warning(
                    "handoff_snapshot_dropped",
                    reason="bad_jid",
                    smid=snapshot.smid,
                    stanzas=len(snapshot.buffer),
                    error=str(exc),
                )
                continue
            if full.local is None or full.resource is None or full.domain not in self.hosts:
                log.warning(
                    "handoff_snapshot_dropped",
                    reason="host_not_served",
                    smid=snapshot.smid,
                    stanzas=len(snapshot.buffer),
                )
                continue
            revivable.append(Revivable(snapshot, full, directed))
        return revivable
