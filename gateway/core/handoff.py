"""Keeping resumable sessions across a shutdown (DESIGN sections 5 and 6).

Theory of operation
-------------------
When the gateway stops (after the SIGTERM drain), `app.shutdown` closes streams in two
steps: first every session that will end (no resumption), so what they reroute (their
unacked messages, their unavailable presence) can still reach the kept sessions; then
every resumable session (live or parked) with `handoff=True`. Such a session keeps taking
stanzas into its buffer until its connection task, in `gateway.core.ending.hand_off`,
turns it into a `SessionSnapshot` (`snapshot_of`), ends its resume slot, and writes the
snapshot to the store (`Handoff.write`, grouped into few transactions, shielded). It then
leaves the router and `sm_session` without broadcasting unavailable presence, writing
stale_h or rerouting its buffer: the session is not over, it moves. If the write fails, the session
ends the normal way instead (its buffer rerouted or stored offline).

When the gateway starts, before it listens, it takes every snapshot from the store (one
atomic step, so only one process gets each) and parks each session again
(`gateway.core.revive`) for what is left of its resumption time: the client that reconnects
resumes it as if the node had never gone, and gets every stanza it had not acked. A session
whose time ran out while the node was down (or whose account or domain is gone) ends at
once through the normal end path (messages rerouted, stored offline or bounced; its h in
stale_h). If the start then fails (a port in use), the revived sessions are handed off
again for the next attempt.

`snapshot_of` (out) and `read_snapshot` with `session_from` (back in) are the one way a
session's state leaves a process and re-enters one, with the codec of
`gateway.storage.snapshot` in between: the restart uses them through the hand-off store,
and moving a session to another node of a cluster is the same three steps with the bytes
carried across.

The snapshot's expiry is wall-clock time (it crosses processes); a parked session keeps
the deadline it had, a live one gets its full granted `max` from the moment of the hand-off
(its transport is lost then); revival never grants more than `max` nor `resume_timeout`.

What this does not cover: a node that dies without a drain (SIGKILL, power loss, a stop
timeout that runs out) hands off only the sessions already written; the others are lost
with their buffers. That, and moving sessions to *other* nodes while this one is down, is
the cluster's job (DESIGN section 6).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
import trio

from gateway.config import StreamManagementConfig
from gateway.core.blocking import RunBlocking
from gateway.core.metrics import HandoffResult, Metrics
from gateway.core.session import Session
from gateway.errors import JIDError, StorageError
from gateway.storage.base import HandoffStore, SessionSnapshot
from gateway.storage.snapshot import decode_snapshot, encode_snapshot
from gateway.xmpp.jid import JID
from gateway.xmpp.sm import SMState

log = structlog.get_logger(module=__name__)


def snapshot_of(session: Session, *, expires_at: float, epoch: int, peer: str) -> SessionSnapshot:
    """The snapshot of a resumable session.

    Args:
        session: a bound session whose `SMState` has an smid and a granted max.
        expires_at: wall-clock time its resumption ends.
        epoch: the hand-off count, this one included.
        peer: its last client's address (for log lines after the restart).

    Returns:
        The snapshot; `flush_pending` is set for an available session, so the offline
        messages that arrived while it moved are flushed to it after the resume.
    """
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
        # (A negative priority gets no offline messages, RFC 6121 8.5.2.1.1.)
        flush_pending=session.flush_pending or (session.is_available and session.priority >= 0),
        epoch=epoch,
        peer=peer,
    )


def encode_for_move(snapshot: SessionSnapshot, metrics: Metrics) -> bytes | None:
    """The bytes a session moves as (to the hand-off store or another node); None
    (logged, counted) when it cannot be encoded, and the caller ends the session
    normally, so nothing is lost."""
    try:
        return encode_snapshot(snapshot)
    except ValueError as exc:
        log.warning("handoff_encode_failed", error=str(exc))
        metrics.handoff_sessions.inc(result=HandoffResult.ENCODE_FAILED)
        return None


@dataclass(frozen=True, slots=True)
class Revivable:
    """A snapshot that passed the checks, with its JIDs parsed."""

    snapshot: SessionSnapshot
    full_jid: JID
    directed: frozenset[JID]


def session_from(revivable: Revivable, conn_id: str, config: StreamManagementConfig) -> Session:
    """The session a snapshot describes, for the connection task `conn_id` that takes it
    over: the inverse of `snapshot_of` (the session is not bound yet, and has no
    transport; the SM limits are this process's config)."""
    snapshot, full = revivable.snapshot, revivable.full_jid
    session = Session(
        conn_id=conn_id,
        conn=f"detached (handed off, last {snapshot.peer or 'unknown'})",
        outgoing=None,
        username=full.local,
        host=full.domain,
        priority=snapshot.priority,
        presence=snapshot.presence,
        interested=snapshot.interested,
        directed=set(revivable.directed),
        flush_pending=snapshot.flush_pending,
    )
    session.sm = SMState.restored(
        smid=snapshot.smid,
        max_=snapshot.max,
        counter_in=snapshot.counter_in,
        counter_out=snapshot.counter_out,
        buffer=snapshot.buffer,
        buffer_max=config.buffer_max,
        buffer_max_bytes=config.buffer_max_bytes,
        ack_freq=config.ack_freq,
        ack=config.ack,
    )
    return session


@dataclass(eq=False)
class _Batch:
    """Snapshots written in one transaction, and its outcome."""

    items: list[tuple[str, bytes]] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)
    ok: bool = False


@dataclass(eq=False)
class Handoff:
    """The hand-off store as the core uses it: write at shutdown, take at start.

    Args:
        store: where snapshots are kept between processes.
        run_blocking: how store calls run (worker threads, or inline in tests).
        wall_clock: UNIX time in seconds (tests inject their own).
        metrics: the gateway's registry: sessions handed off (`handoff_sessions`, by
            result: the failed ones ended normally instead) and their stanzas.
    """

    store: HandoffStore
    run_blocking: RunBlocking
    wall_clock: Callable[[], float] = time.time
    metrics: Metrics = field(kw_only=True)
    _open: _Batch | None = field(default=None, init=False)
    _write_lock: trio.Lock = field(default_factory=trio.Lock, init=False)

    def encode(self, snapshot: SessionSnapshot) -> bytes | None:
        """The stored form of `snapshot` (see `encode_for_move`)."""
        return encode_for_move(snapshot, self.metrics)

    async def write(self, snapshot: SessionSnapshot, data: bytes) -> bool:
        """Store one snapshot; False (logged) when the store failed.

        Writes are grouped: while one batch is being written (in a worker thread), the
        snapshots that arrive wait together and go in the next transaction, so 10,000
        sessions stopping at once cost a few transactions and thread hops, not 10,000.
        The first caller of a batch writes it; the others wait for its outcome.

        If cancelled, the snapshot may or may not be stored; callers run it shielded.
        """
        batch = self._open
        leader = batch is None
        if batch is None:
            batch = self._open = _Batch()
        batch.items.append((snapshot.smid, data))
        if leader:
            async with self._write_lock:
                self._open = None  # later snapshots start the next batch
                try:
                    await self.run_blocking(self.store.put_many, batch.items)
                    batch.ok = True
                except StorageError as exc:
                    log.error(  # noqa: TRY400 - a storage fault, not our bug: no traceback
                        "handoff_write_failed", error=str(exc), sessions=len(batch.items)
                    )
                finally:
                    batch.done.set()
        else:
            await batch.done.wait()
        if not batch.ok:
            self.metrics.handoff_sessions.inc(result=HandoffResult.WRITE_FAILED)
            return False
        self.metrics.handoff_sessions.inc(result=HandoffResult.WRITTEN)
        self.metrics.handoff_stanzas.inc(len(snapshot.buffer))
        return True

    async def take_all(self) -> list[Revivable]:
        """Take every stored snapshot (atomically) and keep those that can be revived,
        soonest to expire first (so parking limits evict the ones with the least time).

        A damaged record, or one whose JID is not a full JID, is dropped with a warning
        that says how many stanzas went with it; a malformed directed-presence JID only
        loses that entry; a second record of one SM id is dropped.

        Raises:
            StorageError: the store failed (nothing was taken).
        """
        records = await self.run_blocking(self.store.take_all)
        revivable: dict[str, Revivable] = {}
        for data in records:
            taken = read_snapshot(data)
            if taken is None:
                continue
            smid = taken.snapshot.smid
            if smid in revivable:
                log.warning(
                    "handoff_snapshot_dropped",
                    reason="duplicate_smid",
                    smid=smid,
                    stanzas=len(taken.snapshot.buffer),
                )
                continue
            revivable[smid] = taken
        return sorted(revivable.values(), key=lambda r: r.snapshot.expires_at)


def read_snapshot(data: bytes) -> Revivable | None:
    """Decode a stored snapshot and parse its JIDs: None (logged, with how many stanzas
    went with it) for a damaged record or one whose JID is not a full JID; a malformed
    directed-presence JID only loses that entry."""
    try:
        snapshot = decode_snapshot(data)
    except StorageError as exc:
        log.warning("handoff_snapshot_dropped", reason="damaged", error=str(exc))
        return None
    try:
        full: JID | None = JID.parse(snapshot.full_jid)
    except JIDError:
        full = None
    if full is None or full.local is None or full.resource is None:
        log.warning(
            "handoff_snapshot_dropped",
            reason="bad_jid",
            smid=snapshot.smid,
            stanzas=len(snapshot.buffer),
        )
        return None
    directed: set[JID] = set()
    for text in snapshot.directed:
        try:
            directed.add(JID.parse(text))
        except JIDError:
            log.warning("handoff_directed_dropped", smid=snapshot.smid)
    return Revivable(snapshot, full, frozenset(directed))
