"""Parking the sessions taken back from the hand-off store (see `gateway.core.handoff`).

`serve_revived` is a connection task without a transport: it rebuilds the `Session` and
its `SMState` from a snapshot, binds the resource, registers the SM id, and then runs the
same `run_session` as any connection, starting parked. From there everything is the usual
path: a `<resume/>` lends its transport (`<resumed/>`, the buffer resent), stanzas routed
meanwhile enter the buffer, and when the deadline passes the session ends with its
messages rerouted or stored offline and its h in stale_h.
"""

from __future__ import annotations

import structlog
import trio

from gateway.config import TlsMode
from gateway.core.connection import Connection
from gateway.core.context import ServerContext
from gateway.core.ending import reroute
from gateway.core.handoff import Revivable, session_from
from gateway.core.session import Session
from gateway.errors import StorageError
from gateway.logsetup import bind_connection, bind_jid
from gateway.net.transport import PeerInfo
from gateway.net.wire import DetachedWire
from gateway.storage.base import SmSessionRecord, StaleH
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element

log = structlog.get_logger(module=__name__)

#: The peer of a session that has no transport until it is resumed.
NO_PEER = PeerInfo("0.0.0.0", 0)  # noqa: S104 - an address label, nothing binds it


async def serve_revived(
    ctx: ServerContext,
    revivable: Revivable,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Park one handed-off session until it is resumed or its time runs out.

    `task_status.started()` is called once the session is registered (bound, SM id
    claimable), so the caller can start listening knowing every revived session can be
    resumed. If cancelled (shutdown), the session is handed off again or ends like any
    other.
    """
    snapshot, full = revivable.snapshot, revivable.full_jid
    cfg = ctx.config.modules.mod_stream_management
    conn = Connection(ctx, DetachedWire(NO_PEER), tls=TlsMode.NONE)
    bind_connection(conn.conn_id, snapshot.peer or "none", "none")
    bind_jid(str(full))
    structlog.contextvars.bind_contextvars(smid=snapshot.smid)
    reason = "closed"
    started = False
    try:
        session = session_from(revivable, conn.conn_id, cfg)
        wall_now = ctx.handoff.wall_clock() if ctx.handoff is not None else ctx.wall_clock()
        if snapshot.expires_at <= wall_now:
            session.bound(full)
            with trio.CancelScope(shield=True):
                await _end_expired(ctx, session)
            started = True
            task_status.started()
            return
        try:
            with trio.CancelScope(shield=True):
                # (Shielded: once taken, the snapshot exists nowhere else.)
                session.bound(await ctx.router.bind(session, full.bare(), full.resource))
        except StorageError as exc:
            # Cannot be made known to the cluster now: it ends here, its stanzas handed
            # back like any ending session's (another resource, offline, the sender).
            log.warning("session_not_revived", error=str(exc))
            session.bound(full)
            assert session.sm is not None
            with trio.CancelScope(shield=True):
                await reroute(ctx.router, session, session.sm.unacked())
            reason = "storage_unavailable"
            if not started:
                started = True
                task_status.started()
            return
        conn.revived(
            session,
            remaining=snapshot.expires_at - wall_now,
            epoch=snapshot.epoch,
            peer=snapshot.peer,
        )
        ctx.connections.add(conn)
        await ctx.sm_sessions.register(
            SmSessionRecord(
                snapshot.smid,
                str(full.bare()),
                ctx.node,
                ctx.wall_clock(),
                epoch=snapshot.epoch,
            )
        )
        assert conn.resume_deadline is not None
        remaining = round(max(conn.resume_deadline - trio.current_time(), 0.0), 3)
        log.info("session_revived", unacked=len(snapshot.buffer), remaining=remaining)
        unwanted = await _why_not_resumable(ctx, session)
        if unwanted is not None:
            # It cannot be resumed here: it ends at once through the normal end path, so
            # its messages are rerouted or bounced, never dropped with the snapshot.
            log.info("session_revived_to_end", why=unwanted)
            session.close(None, unwanted)
        task_status.started()
        started = True
        reason = await conn.run_session(parked=True)
    except Exception:
        # STYLE C7: the top of a connection task; the session still ends cleanly below.
        log.exception("internal_error")
        reason = "internal-server-error"
        if not started:
            task_status.started()
    finally:
        await conn.finish([], reason)


async def _end_expired(ctx: ServerContext, session: Session) -> None:
    """A session whose resumption time ran out before it could be parked again (swept
    from the cluster's adoptable store, or revived after a long restart) ends without
    being bound again: binding would end, with `conflict`, a newer session its client
    may have opened with the same resource since. Its messages are rerouted (another
    resource, offline storage), its h kept for `<failed h/>`, and its unavailable
    presence sent only if no other session holds its JID now."""
    router, sm, full = ctx.router, session.sm, session.full_jid
    assert sm is not None and sm.smid is not None and full is not None
    holder = await router.directory.resource(full)
    if holder is None and (session.presence is not None or session.directed):
        gone = Element(ns.CLIENT, "presence", {"type": "unavailable", "from": str(full)})
        if session.presence is not None:
            for other in await router.available_resources(session.bare_jid):
                other.handle.send(gone)
        for target in session.directed:
            await router.route(gone.replace_attrs(to=str(target)), session)
    if ctx.config.modules.mod_stream_management.stale_h.enabled:
        try:
            evicted = await ctx.stale_h.put(
                StaleH(sm.smid, sm.counter_in, str(session.bare_jid), ctx.wall_clock())
            )
            ctx.metrics.stale_h_evicted.inc(evicted)
        except StorageError as exc:
            log.warning("stale_h_not_recorded", error=str(exc))
    try:
        await ctx.sm_sessions.remove(sm.smid)
    except StorageError as exc:
        log.warning("sm_session_not_removed", error=str(exc))
    log.info("session_expired_unclaimed", unacked=sm.buffer_size, jid_taken=holder is not None)
    await reroute(router, session, sm.unacked())


async def _why_not_resumable(ctx: ServerContext, session: Session) -> str | None:
    """Why a revived session must end at once (the config or the accounts changed while
    the gateway was down), or None."""
    host, username = session.host or "", session.username or ""
    if host not in ctx.config.general.hosts:
        return "host_not_served"
    if not ctx.config.modules.mod_stream_management.buffer:
        return "resumption_off"  # `buffer: false` now: <resume/> gets feature-not-implemented
    if not await ctx.router.account_exists(host, username):
        return "account_removed"
    return None
