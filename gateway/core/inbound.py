"""What a bound session does with what its client sends (RFC 6120 8, RFC 6121, XEP-0198).

Called by the session's connection task (its reader, `gateway.core.pump`) for each
element, one at a time: a stanza passes the intake checks (`gateway.xmpp.intake`), is
routed (presence to the presence service) and only then counted in the XEP-0198 h; a
nonza is performed as `gateway.xmpp.sm.handle_nonza` decides. Enabling resumable stream
management creates the session's resume slot and registers it in `sm_session`.
"""

from __future__ import annotations

import secrets
from typing import Protocol

import structlog

from gateway.core.context import ServerContext
from gateway.core.metrics import LedgerState
from gateway.core.offline import FlushPacer
from gateway.core.presence import handle_presence
from gateway.core.pump import Pump
from gateway.core.resume import ResumeSlot, watch
from gateway.core.session import Session
from gateway.errors import StanzaError
from gateway.storage.base import SmSessionRecord
from gateway.xmpp.element import Element
from gateway.xmpp.intake import Refused, accept_stanza
from gateway.xmpp.sm import Acked, Answer, EnableAsked, handle_nonza
from gateway.xmpp.sm_elements import EnableRequest
from gateway.xmpp.stanza import StanzaKind, error_reply, stanza_kind

log = structlog.get_logger(module=__name__)


class Owner(Protocol):
    """The session's connection task as this module needs it (`gateway.core.connection`)."""

    ctx: ServerContext
    session: Session | None
    slot: ResumeSlot | None
    pump: Pump | None
    flush: FlushPacer | None
    stanzas_in: int


async def handle_element(conn: Owner, element: Element) -> None:
    """Handle one element from the client of a bound session: a stanza is checked,
    routed and counted (XEP-0198 h), a nonza performed."""
    session = conn.session
    assert session is not None and session.full_jid is not None
    kind = stanza_kind(element)
    if kind is None:
        await _on_nonza(conn, session, element)
        return
    conn.stanzas_in += 1
    conn.ctx.metrics.stanzas_in.inc(kind=kind)
    await _on_stanza(conn, session, kind, element)
    # XEP-0198 section 4: h counts the stanzas the server *handled*. Counted once
    # routing is done: a stanza whose routing a close cancelled is not acknowledged,
    # so the client sends it again after resuming (same id) instead of losing it.
    if session.sm is not None:
        session.sm.received()


async def _on_stanza(conn: Owner, session: Session, kind: StanzaKind, element: Element) -> None:
    assert session.full_jid is not None
    stanza = accept_stanza(element, kind, session.full_jid, session.host or "")
    if isinstance(stanza, Refused):
        if stanza.reply is not None:
            session.send(stanza.reply)
        return
    try:
        if kind is StanzaKind.PRESENCE:
            await handle_presence(conn.ctx.router, session, stanza)
        else:
            await conn.ctx.router.route(stanza, session)
    except StanzaError as exc:
        if stanza.get("type") != "error":
            session.send(error_reply(stanza, exc.condition, exc.error_type, exc.text))


async def _on_nonza(conn: Owner, session: Session, element: Element) -> None:
    action = handle_nonza(session.sm, element)
    if isinstance(action, Answer):
        session.send_nonza(action.element)
    elif isinstance(action, EnableAsked):
        await _enable(conn, session, action.request)
    elif isinstance(action, Acked):
        conn.ctx.metrics.ledger.inc(len(action.stanzas), state=LedgerState.ACKED)
        if conn.pump is not None:
            conn.pump.client_alive()
        if conn.flush is not None:
            conn.flush.note_room()
    else:
        log.debug("sm_nonza_ignored", reason=action.reason)


async def _enable(conn: Owner, session: Session, request: EnableRequest) -> None:
    """XEP-0198 section 3 (and 5): stream management on, resumable when asked."""
    cfg = conn.ctx.config.modules.mod_stream_management
    sm = conn.ctx.new_sm_state(
        buffer_max=cfg.buffer_max,
        buffer_max_bytes=cfg.buffer_max_bytes,
        ack_freq=cfg.ack_freq,
        ack=cfg.ack,
        buffering=cfg.buffer,
    )
    assert session.full_jid is not None
    # <enabled/> is queued before any counted stanza: both happen in this one step.
    session.send_nonza(
        sm.enable(
            request,
            resume_timeout=cfg.resume_timeout,
            new_smid=lambda: secrets.token_urlsafe(16),  # 128 bits
        )
    )
    session.sm = sm
    smid, granted = sm.smid, sm.max
    if smid is not None:
        conn.slot = conn.ctx.resume.create(smid, session.bare_jid, session)
        await conn.ctx.sm_sessions.register(
            SmSessionRecord(smid, str(session.bare_jid), conn.ctx.node, conn.ctx.wall_clock())
        )
        pump = conn.pump
        if pump is not None and pump.nursery is not None:
            pump.nursery.start_soon(watch, conn.slot, pump.receive_loan)
        structlog.contextvars.bind_contextvars(smid=smid)
    log.info("sm_enabled", resume=smid is not None, max=granted)
