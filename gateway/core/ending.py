"""How a session ends (phase 4 of `gateway.core.connection`): normally, with nothing it
holds lost (DESIGN section 3, the ledger), or handed off at shutdown to be resumed after
the restart (DESIGN sections 5 and 6, `gateway.core.handoff`).

Called by the session's own connection task (`Connection.finish`, shielded), never by
another task: these functions read and change the connection's state as its owner would.
"""

from __future__ import annotations

from typing import Protocol

import structlog
import trio

from gateway.core.context import ServerContext
from gateway.core.handoff import encode_for_move, snapshot_of
from gateway.core.metrics import DropPolicy, ResumeFailure
from gateway.core.presence import broadcast_unavailable
from gateway.core.resume import ResumeSlot
from gateway.core.router import Router
from gateway.core.session import Session
from gateway.errors import StanzaErrorCondition, StorageError
from gateway.net.wire import Wire
from gateway.storage.base import StaleH
from gateway.xmpp.element import Element
from gateway.xmpp.stanza import StanzaKind, stanza_kind

log = structlog.get_logger(module=__name__)


class Owner(Protocol):
    """The session's connection task as this module needs it (`gateway.core.connection`)."""

    ctx: ServerContext
    wire: Wire
    session: Session | None
    slot: ResumeSlot | None
    outgoing_receive: trio.MemoryReceiveChannel[Element] | None
    resume_deadline: float | None
    handoff_epoch: int
    snapshot_peer: str | None

    def take_in_flight(self) -> list[Element]: ...


async def end_session(conn: Owner) -> None:
    """The session ends without resumption: nothing it holds is lost (DESIGN 3)."""
    session = conn.session
    if session is None:
        return
    router = conn.ctx.router
    session.mark_ending()
    assert session.close_request is not None
    held: bool | None = None
    if session.close_request.handoff:
        handed, held = await hand_off(conn)
        if handed:
            return
    if held is None:
        held = await router.directory.unbind(session)
    slot = conn.slot
    sm = session.sm
    try:
        await record_stale_h(conn)
    except StorageError as exc:
        # (A shared store is away: the session still ends, and its stanzas below are
        # still handed back; only its h is not remembered.)
        log.warning("stale_h_not_recorded", error=str(exc))
    if slot is not None:
        end_slot(conn, slot)
    if sm is not None and sm.smid is not None:
        try:
            await conn.ctx.sm_sessions.remove(sm.smid)
        except StorageError as exc:
            log.warning("sm_session_not_removed", error=str(exc))
    # A session replaced by a conflict already said goodbye to its own resources.
    await broadcast_unavailable(router, session, own_account=held)
    leftovers: list[Element] = []
    if sm is not None and sm.buffering:
        leftovers = sm.unacked()
    elif conn.outgoing_receive is not None:
        leftovers = [e for e in conn.take_in_flight() if stanza_kind(e) is not None]
        while True:
            try:
                leftovers.append(conn.outgoing_receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
    if session.outgoing is not None:
        session.outgoing.close()
        session.outgoing = None
    await reroute(router, session, leftovers)


async def hand_off(conn: Owner) -> tuple[bool, bool | None]:
    """Shutdown: keep a resumable session for a resume after the restart (or on
    another node) instead of ending it (`gateway.core.handoff`). In a cluster the
    snapshot goes to the node the client resumes on (`migrate_to`, asked by it), or,
    when the node drains, to the cluster's adoptable store, for whichever node the
    client reaches (`gateway.core.migration`); its `sm_session` record stays, naming
    this node, so that node knows where to look.

    The snapshot is taken, the slot ended and the session told to refuse further
    stanzas in one step (they take the router's other paths: offline storage, flushed
    after the resume); then the snapshot is written. Runs shielded (from `finish`).

    Returns (handed off, held): when not handed off (it cannot be, or the write failed)
    the caller ends the session normally, and its buffer, untouched, is rerouted; `held`
    is what the directory answered if the session left it already (else None).
    """
    session, slot, handoff = conn.session, conn.slot, conn.ctx.handoff
    request = session.close_request if session is not None else None
    migrations = conn.ctx.migrations
    adoptable = conn.ctx.adoptable
    if request is not None:
        # Whatever happens below, the session takes no more stanzas: handed off, its
        # snapshot is taken now; ended instead, its buffer is rerouted as it is.
        request.handoff = False
    sm = session.sm if session is not None else None
    if (
        session is None
        or request is None
        or slot is None
        or (
            handoff is None and adoptable is None and (migrations is None or not request.migrate_to)
        )
        or sm is None
        or not sm.resumable
        or sm.smid is None
        or session.full_jid is None
    ):
        return False, None
    smid = sm.smid
    if migrations is not None:
        # From its slot's end until it is stored or sent, a surrender asked for it is
        # answered only afterwards (`Migrations.receive`), so the asker finds it.
        migrations.leaving[smid] = []
    try:
        return await _hand_off(conn, session, slot, request.migrate_to)
    finally:
        if migrations is not None:
            for requester in migrations.leaving.pop(smid, ()):
                migrations.send(smid, b"", requester)


async def _hand_off(
    conn: Owner, session: Session, slot: ResumeSlot, migrate_to: str | None
) -> tuple[bool, bool | None]:
    """`hand_off` once it is known the session can be handed off."""
    sm, handoff, migrations = session.sm, conn.ctx.handoff, conn.ctx.migrations
    adoptable = conn.ctx.adoptable
    assert sm is not None and sm.smid is not None
    now = trio.current_time()
    # A parked session keeps its deadline; a live one gets its whole max from now.
    remaining = (
        max(conn.resume_deadline - now, 0.0)
        if conn.resume_deadline is not None
        else float(sm.max or 0)
    )
    snapshot = snapshot_of(
        session,
        expires_at=(handoff.wall_clock if handoff is not None else conn.ctx.wall_clock)()
        + remaining,
        epoch=conn.handoff_epoch + 1,
        peer=str(conn.wire.peer) if conn.snapshot_peer is None else conn.snapshot_peer,
    )
    data = encode_for_move(snapshot, conn.ctx.metrics)
    if data is None:
        return False, None
    # Only a connection open before the shutdown can have claimed the slot now; it is
    # refused like any claim that races the end.
    end_slot(conn, slot)
    directory = conn.ctx.router.directory
    if migrations is not None and migrate_to is not None:
        # To another node: this node leaves the directory first, so the new owner's bind
        # cannot race a removal from here. The `sm_session` record stays: the new
        # owner's registration replaces it.
        held = await directory.unbind(session)
        if not migrations.send(sm.smid, data, migrate_to):
            return False, held
        log.info("session_moved", to_node=migrate_to, unacked=len(snapshot.buffer))
        return True, held
    if adoptable is not None:
        # Out of the directory first, as above: a node adopting it at once binds its
        # resource as its own, not as a conflict with this one.
        held = await directory.unbind(session)
        try:
            await adoptable.put(sm.smid, data, snapshot.expires_at)
        except StorageError as exc:
            log.warning("session_not_left_for_adoption", error=str(exc))
            return False, held
        log.info("session_left_for_adoption", unacked=len(snapshot.buffer))
        return True, held
    assert handoff is not None
    if not await handoff.write(snapshot, data):
        return False, None
    held = await directory.unbind(session)
    await conn.ctx.sm_sessions.remove(sm.smid)
    if session.outgoing is not None:
        session.outgoing.close()
        session.outgoing = None
    log.info("session_handed_off", unacked=len(snapshot.buffer), remaining=round(remaining, 3))
    return True, held


async def record_stale_h(conn: Owner) -> None:
    """With stale_h on, remember (smid, h, jid) of a session that ends (XEP-0198 5)."""
    session = conn.session
    sm = session.sm if session is not None else None
    if session is None or sm is None or sm.smid is None:
        return
    if conn.ctx.config.modules.mod_stream_management.stale_h.enabled:
        evicted = await conn.ctx.stale_h.put(
            StaleH(sm.smid, sm.counter_in, str(session.bare_jid), conn.ctx.wall_clock())
        )
        conn.ctx.metrics.stale_h_evicted.inc(evicted)


async def reroute(router: Router, session: Session, stanzas: list[Element]) -> None:
    """Stanzas a session took but the client never acknowledged (DESIGN 3, the ledger)."""
    for stanza in stanzas:
        kind = stanza_kind(stanza)
        if kind is None:
            continue
        if kind is StanzaKind.MESSAGE and stanza.get("type", "normal") in (
            "chat",
            "normal",
            "error",
        ):
            state = await router.deliver_message_to_bare(stanza, session.bare_jid, exclude=session)
        elif kind is StanzaKind.IQ and stanza.get("type") in ("get", "set"):
            state = await router.bounce(stanza, StanzaErrorCondition.SERVICE_UNAVAILABLE)
        else:
            state = router.drop(stanza, DropPolicy.UNDELIVERABLE_AFTER_SESSION_END)
        router.metrics.ledger.inc(state=state)


def end_slot(conn: Owner, slot: ResumeSlot) -> None:
    """End the session's resume slot; a resume that claimed it in the meantime is refused
    (its lender answers `<failed/>`), and the slot never lingers claimed."""
    while (raced := conn.ctx.resume.end(slot)) is not None:
        raced.refusal = ResumeFailure.SESSION_ENDED
        raced.resumed = False
        raced.accepted.set()
    conn.slot = None
