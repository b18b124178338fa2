"""The per-connection task: one nursery per client connection (STYLE C3, C7, C9, C12).

Theory of operation
-------------------
`serve_connection` owns one accepted transport and, once a resource is bound, the
`Session` and its XEP-0198 `SMState` for the session's whole life.

1. Negotiation, under `general.negotiation_timeout` (`gateway.core.negotiate`): the pure
   `C2SNegotiation` driven over the wire until a resource is bound (the session is made
   here, `_bind`), a session resumed (this transport is lent to it) or the stream closed.
2. Serving, one `Pump` per transport (`gateway.core.pump`): the reader (this task's
   body), a single writer draining the session's bounded outgoing channel into batched
   socket writes, the ack timer, and companions: the offline flush (`FlushPacer`) and,
   for a resumable session, the `watch` for a loan from a newer connection. Others
   only `Session.send()` (into the SM buffer and the channel) or `Session.close()`
   (cancels the serving scope).
3. When the transport is lost (EOF, socket error, or an `<r/>` unanswered for
   `ack_timeout`: the writer sets a deadline on the reader's scope) and the session is
   resumable, the task parks in `resume_session` (`gateway.core.resume`): the session stays
   in the router, stanzas keep going into its SM buffer, and it waits up to the granted
   `max` for a `Loan` on its slot's channel. A loan is adopted: `<resumed/>`, the
   client's h applied, the rest of the buffer resent in order, then back to 2 on the lent
   transport.
4. Otherwise the session ends (`gateway.core.ending`): it leaves the router and `sm_session`,
   records its h in `stale_h` when enabled, broadcasts unavailable presence, and hands
   every unacked stanza back to the router (messages rerouted or stored offline, iq
   requests answered `service-unavailable`, presence dropped): nothing vanishes.

5. At shutdown a resumable session is *handed off* instead (`ending.hand_off`, see
   `gateway.core.handoff`): snapshotted with its buffer for the next start, no unavailable
   presence, no rerouting. A session taken back from a snapshot runs `run_session` from
   step 3 with no transport (`gateway.core.revive`).

A connection whose `<resume/>` is accepted *lends* its transport to the parked session and
waits until that session is done with it (`Loan.done`), outside the negotiation
deadline; it never touches the transport again. Cancellation (shutdown) goes through the
same end path, shielded, so stanzas are rerouted before the task exits.
"""

from __future__ import annotations

import contextlib
import functools
import random
import secrets
import ssl
import time
from collections.abc import Sequence

import structlog
import trio

from gateway.config import ListenerConfig, TlsMode
from gateway.core.context import ServerContext
from gateway.core.ending import end_session, record_stale_h
from gateway.core.inbound import handle_element
from gateway.core.negotiate import TLS_HANDSHAKE_TIMEOUT, Negotiated, Negotiator
from gateway.core.offline import FlushPacer
from gateway.core.pump import Outcome, Pump
from gateway.core.reading import StanzaTimer
from gateway.core.resume import Loan, ResumeSlot, accept_loan, wait_parked, watch
from gateway.core.session import ACK_REQUEST, CLOSE_GRACE, CloseRequest, Session
from gateway.errors import RemoteProtocolError, StorageError, StreamErrorCondition
from gateway.logsetup import bind_connection, bind_jid
from gateway.net.transport import StreamTransport
from gateway.net.wire import StreamWire, TransportLost, Wire
from gateway.xmpp.element import Element
from gateway.xmpp.negotiation import BindRequested, C2SNegotiation, NegotiationSettings, Output
from gateway.xmpp.parser import Event, StreamParser
from gateway.xmpp.sm_elements import resumed

log = structlog.get_logger(module=__name__)

NEGOTIATION_JITTER = 0.2  # part of negotiation_timeout added at random to each deadline


class Connection:
    """State of one connection task (owned by it; see module docstring)."""

    def __init__(self, ctx: ServerContext, wire: Wire, *, tls: TlsMode) -> None:
        self.ctx = ctx
        self.wire = wire
        self.conn_id = secrets.token_hex(4)
        cfg = ctx.config.general
        tls_possible = (
            ctx.ssl_context is not None
            and wire.supports_starttls
            and tls in (TlsMode.STARTTLS, TlsMode.REQUIRED)
        )
        self.negotiation = C2SNegotiation(
            NegotiationSettings(
                hosts=frozenset(cfg.hosts),
                tls_available=tls_possible,
                tls_required=tls_possible and tls is TlsMode.REQUIRED,
                secure=wire.peer.secure,
                plain_without_tls=tls is TlsMode.NONE,
                max_auth_failures=cfg.max_auth_failures,
                stream_management=True,
            )
        )
        self.timer = StanzaTimer(cfg.stanza_timeout)
        self.negotiator = Negotiator(
            ctx, wire, self.negotiation, self.timer, self.conn_id, self._bind
        )
        self.session: Session | None = None
        self.slot: ResumeSlot | None = None
        self.scope = trio.CancelScope()
        self.close_request: CloseRequest | None = None
        # Events for the next pump: pipelined after the bind request or the <resume/>.
        self.pending: list[Event] = []
        self.outgoing_receive: trio.MemoryReceiveChannel[Element] | None = None
        self.pump: Pump | None = None  # while a transport is served
        self.flush: FlushPacer | None = None  # once bound
        self.lent_from: Loan | None = None  # the loan whose transport we use
        # When the <r/> after a resend on resumption was written (the next pump's timer).
        self.request_sent_at: float | None = None
        self.stanzas_in = 0
        self.started = time.monotonic()
        # While parked: when resumption ends (trio clock). Set before parking to override
        # the granted max (a session taken back from a hand-off keeps its deadline).
        self.resume_deadline: float | None = None
        # Hand-offs this session went through before (the snapshot's epoch).
        self.handoff_epoch = 0
        # The client address of a session taken back from a snapshot (its wire has none).
        self.snapshot_peer: str | None = None
        # Set when this connection task is completely done (see `finish`).
        self.finished = trio.Event()

    @property
    def lent_to(self) -> Loan | None:
        """Our transport, lent to the resumed session that accepted it."""
        return self.negotiator.lent_to

    @property
    def is_lending(self) -> bool:
        """Our transport is (or may be about to be) used by a resumed session: this task
        must not return before that session is done with it (the listener closes the
        socket when the task returns)."""
        return self.negotiator.lent_to is not None or self.negotiator.claiming is not None

    @property
    def is_resumable(self) -> bool:
        """The session could be resumed by a new connection now (or after a hand-off)."""
        session = self.session
        sm = session.sm if session is not None else None
        return self.slot is not None and sm is not None and sm.resumable

    def take_in_flight(self) -> list[Element]:
        """What the writer was writing when serving ended (rerouted without SM)."""
        pump = self.pump
        if pump is None:
            return []
        batch, pump.in_flight = pump.in_flight, []
        return batch

    def _hands_off_at_shutdown(self) -> bool:
        return (
            self.ctx.handoff is not None
            and self.ctx.config.modules.mod_stream_management.handoff_on_shutdown
        )

    def revived(self, session: Session, *, remaining: float, epoch: int, peer: str) -> None:
        """Take over a session rebuilt from a hand-off snapshot; it starts parked
        (`run_session(parked=True)`) and may be resumed for `remaining` seconds, at most
        its granted max and the configured `resume_timeout`.

        Args:
            session: bound in the router, with a restored resumable `SMState`.
            remaining: seconds left of its resumption time (wall clock at the hand-off).
            epoch: hand-offs it went through.
            peer: its last client's address, for log lines.
        """
        sm = session.sm
        assert sm is not None and sm.smid is not None and sm.max is not None
        self._own(session)
        self.slot = self.ctx.resume.create(sm.smid, session.bare_jid, session)
        self.handoff_epoch = epoch
        self.snapshot_peer = peer
        cap = min(float(sm.max), self.ctx.config.modules.mod_stream_management.resume_timeout)
        self.resume_deadline = trio.current_time() + min(max(remaining, 0.0), cap)

    def close(
        self,
        condition: StreamErrorCondition | None,
        text: str | None = None,
        *,
        handoff: bool = False,
    ) -> None:
        """Ask this connection to end (from any task); with `handoff`, a resumable
        session is handed off instead of ended (shutdown)."""
        if self.session is not None:
            self.session.close(condition, text, handoff=handoff)
            return
        if self.close_request is None:
            self.close_request = CloseRequest(condition, text)
        self.scope.cancel()

    async def _close_transport(self, final: Sequence[Output]) -> None:
        """Write `final` (best effort, bounded) and close the current wire; never raises
        for a transport that is already gone."""
        cut = self.pump is not None and self.pump.write_cut
        try:
            with (
                trio.move_on_after(CLOSE_GRACE, shield=True),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
            ):
                try:
                    if final and not cut:
                        await self.wire.write(final)
                finally:
                    await self.wire.aclose()
        finally:
            # The lender waits for this, whatever happened to its transport.
            if self.lent_from is not None:
                self.lent_from.done.set()
                self.lent_from = None

    # -- phase 1: negotiation (gateway.core.negotiate); binding makes the session ----------

    def _own(self, session: Session) -> None:
        """Become the owner task of `session` (bound now, or taken back from a snapshot)."""
        self.session = session
        session.metrics = self.ctx.metrics
        self.flush = FlushPacer(self.ctx.router.offline, session)
        session.on_flush_request = self._start_flush

    def _new_outgoing(self, session: Session) -> None:
        send_channel, receive_channel = trio.open_memory_channel[Element](
            # Full means the client is not reading fast enough: the session is closed with
            # resource-constraint (Session.send); with SM the stanza stays in the buffer.
            self.ctx.config.general.send_queue_size
        )
        session.outgoing = send_channel
        session.queued_bytes = 0
        session.max_queued_bytes = self.ctx.config.general.send_queue_bytes
        self.outgoing_receive = receive_channel

    async def _bind(self, action: BindRequested) -> None:
        neg = self.negotiation
        assert neg.jid is not None
        session = Session(
            conn_id=self.conn_id,
            conn=f"{self.wire.kind} {self.wire.peer}",
            outgoing=None,
            username=neg.jid.local,
            host=neg.jid.domain,
        )
        self._new_outgoing(session)
        if self.close_request is not None:
            session.close_request = self.close_request
        full = await self.ctx.router.bind(session, neg.jid, action.resource)
        session.bound(full)
        self._own(session)
        neg.bind_result(action.iq, full)
        bind_jid(str(full))
        log.info("resource_bound")
        await self.negotiator.write_output()

    # -- phase 2: serving a transport (gateway.core.pump) ----------

    async def _serve_transport(self) -> Outcome:
        """Serve the session on the current transport until something ends it."""
        session, receive = self.session, self.outgoing_receive
        assert session is not None and receive is not None
        pending, self.pending = self.pending, []
        request_sent_at, self.request_sent_at = self.request_sent_at, None
        pacer = self.flush
        pump = Pump(
            self.ctx.config,
            self.wire,
            session,
            receive,
            self.timer,
            functools.partial(handle_element, self),
            pacer.note_room if pacer is not None else _nothing,
            pending=pending,
            request_sent_at=request_sent_at,
        )
        self.pump = pump

        def start(nursery: trio.Nursery) -> None:
            if session.flush_pending:
                self._start_flush()
            if self.slot is not None:
                nursery.start_soon(watch, self.slot, pump.receive_loan)

        return await pump.serve(start)

    def _start_flush(self) -> None:
        """Start the offline flush on the serving nursery (one at a time per session)."""
        if self.flush is not None:
            self.flush.start(self.pump.nursery if self.pump is not None else None)

    # -- phase 3: resume_session (gateway.core.resume) ----------

    async def _park(self) -> Loan | None:
        """Wait (up to the granted max) for a resuming connection's loan."""
        session, slot = self.session, self.slot
        assert session is not None and slot is not None and session.sm is not None
        self.outgoing_receive = None
        deadline = self.resume_deadline
        if deadline is None:
            deadline = trio.current_time() + (session.sm.max or 0)
        self.resume_deadline = deadline
        return await wait_parked(self.ctx.resume, slot, session, deadline)

    async def _adopt(self, loan: Loan) -> bool:
        """Serve `loan`'s transport: <resumed/>, apply h, resend the rest (section 5)."""
        session, slot = self.session, self.slot
        assert session is not None and slot is not None and session.sm is not None
        resend = await accept_loan(session, loan, self.ctx.metrics)
        if resend is None:
            return False
        sm, neg = session.sm, loan.negotiation
        # Switch this task to the lent stream (wire, negotiation state); from now on its
        # log lines carry the new peer (children spawned later inherit it).
        old_peer = str(self.wire.peer) if self.snapshot_peer is None else self.snapshot_peer
        self.wire, self.negotiation = loan.wire, neg
        self.snapshot_peer = None
        session.conn = f"{loan.wire.kind} {loan.wire.peer}"
        structlog.contextvars.bind_contextvars(peer=str(loan.wire.peer), transport=loan.wire.kind)
        self.pending = loan.pending
        self.lent_from = loan
        assert session.full_jid is not None
        neg.resumed(session.full_jid)
        self._new_outgoing(session)
        self.ctx.resume.serving(slot)
        neg.send(resumed(slot.smid, sm.counter_in))
        for stanza in resend:
            neg.send(stanza)
        if resend and sm.ack:
            neg.send(ACK_REQUEST)
            self.request_sent_at = trio.current_time()
        loan.resumed = True
        loan.accepted.set()
        self.resume_deadline = None
        self.ctx.metrics.resumed.inc()
        log.info(
            "session_resumed",
            new_conn_id=loan.conn_id,
            h=loan.h,
            resent=len(resend),
            old_peer=old_peer,
        )
        try:
            await self.wire.write(neg.take_output())
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            # The new transport died at once: the reader notices and the session parks
            # again with everything still in its buffer.
            log.info("resumed_transport_lost")
        return True

    async def run_session(self, *, parked: bool = False) -> str:
        """Serve, park, resume... until the session ends; returns the end reason.

        With `parked`, the session has no transport yet (taken back from a hand-off): it
        starts by waiting for a resume.
        """
        session = self.session
        assert session is not None
        while True:
            if parked:
                parked = False
                outcome = Outcome.TRANSPORT_LOST
            else:
                outcome = await self._serve_transport()
            sm = session.sm
            resumable = self.slot is not None and sm is not None and sm.resumable
            loan: Loan | None = None
            if outcome is Outcome.HANDOVER:
                # XEP-0198 section 5: the old transport is still attached: close it first.
                assert self.pump is not None
                loan = self.pump.loan_in
                self.negotiation.queue_stream_error(
                    StreamErrorCondition.CONFLICT, "the session was resumed elsewhere"
                )
                await self._close_transport(self.negotiation.take_output())
            elif (
                outcome in (Outcome.TRANSPORT_LOST, Outcome.ACK_TIMEOUT)
                and resumable
                and (not self.ctx.draining or self._hands_off_at_shutdown())
            ):
                # While draining only when the session will be handed off at shutdown;
                # otherwise it would only wait to be ended there.
                await self._close_transport([])
                loan = await self._park()
                if loan is None and session.close_request is None:
                    # Timed out. The h goes into stale_h before the slot ends, so a resume
                    # that finds no slot can always learn it; a claim that raced the
                    # deadline still wins (end() returns it).
                    assert self.slot is not None
                    await record_stale_h(self)
                    loan = self.ctx.resume.end(self.slot)
                    if loan is None:
                        self.slot = None  # ended; stale_h recorded in end_session
                        return "resume_timeout"
            else:
                final, reason = self._final_units(outcome), self._reason(outcome)
                session.mark_ending()
                await self._close_transport(final)
                return reason
            if loan is None:
                return "closed"
            if not await self._adopt(loan):
                session.mark_ending()
                return "resume_failed"

    def _final_units(self, outcome: Outcome) -> list[Output]:
        neg = self.negotiation
        session = self.session
        request = session.close_request if session is not None else self.close_request
        error = self.pump.protocol_error if self.pump is not None else None
        if outcome is Outcome.PROTOCOL_ERROR and error is not None:
            log.info("stream_error", condition=error.condition.value, text=error.text)
            neg.queue_stream_error(error.condition, error.text, error.extra)
            return neg.take_output()
        if outcome is Outcome.CLOSE_REQUESTED and request is not None and request.condition:
            neg.queue_stream_error(request.condition, request.text)
            return neg.take_output()
        if outcome in (Outcome.TRANSPORT_LOST, Outcome.ACK_TIMEOUT):
            return []
        neg.queue_close()
        return neg.take_output()

    def _reason(self, outcome: Outcome) -> str:
        session = self.session
        request = session.close_request if session is not None else None
        error = self.pump.protocol_error if self.pump is not None else None
        if outcome is Outcome.PROTOCOL_ERROR and error is not None:
            return error.condition.value
        if outcome is Outcome.CLOSE_REQUESTED and request is not None:
            return request.condition.value if request.condition else "closed"
        return outcome.value

    # -- phase 4: the end (gateway.core.ending) ----------

    async def finish(self, final: Sequence[Output], reason: str) -> None:
        """The last step of a connection task, however it ended: close the transport,
        end (or hand off) the session, log the canonical line."""
        self.ctx.connections.discard(self)
        # Shielded: a cancelled connection (shutdown) still leaves the router, broadcasts
        # unavailable and hands its stanzas back before it goes.
        try:
            with trio.CancelScope(shield=True):
                if self.lent_to is None:
                    try:
                        await self._close_transport(final)
                    except Exception:
                        # The per-connection boundary (C7): whatever a dying transport
                        # raises, the session still ends and the listener lives on.
                        log.exception("transport_close_failed")
                try:
                    await end_session(self)
                except StorageError as exc:
                    log.warning("session_end_storage_failed", error=str(exc))
                except Exception:
                    # Still the per-connection boundary (C7): a storage fault while
                    # handing stanzas back must not take the listener and every other
                    # client down.
                    log.exception("session_end_failed")
                self.log_closed(reason)
        finally:
            self.finished.set()
            self._release()

    def _release(self) -> None:
        """Drop the references that make this connection and its session a cycle (the
        session's callbacks into this object, the pump's into it, a kept exception and
        its traceback), so both are freed by reference counting as soon as the task
        ends: with thousands of connections, waiting for the cyclic collector means
        holding their memory."""
        session = self.session
        if session is not None:
            session.on_flush_request = None
            session.cancel_scope = None
        self.pump = None
        self.flush = None
        self.negotiator.release()

    def log_closed(self, reason: str) -> None:
        session = self.session
        log.info(
            "connection_closed",
            reason=reason,
            duration=round(time.monotonic() - self.started, 3),
            bytes_in=self.wire.bytes_in,
            bytes_out=self.wire.bytes_out,
            stanzas_in=self.stanzas_in,
            stanzas_out=session.stanzas_out if session else 0,
        )


def _nothing() -> None:
    """No offline flush to wake (a session without one)."""


async def serve_connection(
    ctx: ServerContext, listener: ListenerConfig, transport: StreamTransport
) -> None:
    """Serve one accepted TCP connection (plain, STARTTLS, direct TLS, PROXY-unwrapped)."""
    cfg = ctx.config.general
    # Until SASL succeeds only the small pre-authentication limit applies.
    parser = StreamParser(max_stanza_size=cfg.pre_auth_max_stanza_size, max_depth=cfg.max_depth)
    await serve_wire(ctx, StreamWire(transport, parser), tls=listener.tls, port=listener.port)


async def serve_wire(ctx: ServerContext, wire: Wire, *, tls: TlsMode, port: int) -> None:
    """Serve one client connection from accept to close (the per-connection boundary)."""
    conn = Connection(ctx, wire, tls=tls)
    bind_connection(conn.conn_id, str(wire.peer), wire.kind)
    log.info("connection_opened", listener_port=port)
    ctx.connections.add(conn)
    reason = "closed"
    final: list[Output] = []
    neg = conn.negotiation
    try:
        with conn.scope:
            if ctx.draining:
                raise RemoteProtocolError(StreamErrorCondition.SYSTEM_SHUTDOWN)
            if tls is TlsMode.DIRECT and wire.supports_starttls:
                # XEP-0368: TLS from the first byte; the stream that follows is secure.
                assert ctx.direct_tls_context is not None
                with trio.fail_after(TLS_HANDSHAKE_TIMEOUT):
                    await wire.start_tls(ctx.direct_tls_context)
                neg.secure = True
            # Spread over a fifth of the timeout: connections opened in a burst (a flood)
            # do not all time out in the same instant.
            timeout = ctx.config.general.negotiation_timeout
            jitter = NEGOTIATION_JITTER * random.random()  # noqa: S311 - not a secret
            deadline = trio.current_time() + timeout * (1 + jitter)
            result = Negotiated.CLIENT_CLOSED
            with trio.CancelScope(deadline=deadline) as negotiation_scope:
                result = await conn.negotiator.run()
            if negotiation_scope.cancelled_caught:
                raise RemoteProtocolError(
                    StreamErrorCondition.CONNECTION_TIMEOUT, "negotiation took too long"
                )
            if result is Negotiated.RESUMED:
                assert conn.lent_to is not None
                log.info("transport_lent")
                await conn.lent_to.done.wait()
                reason = "lent_to_resumed_session"
            elif result is Negotiated.BOUND:
                reason = await conn.run_session()
            else:
                reason = "client_closed"
                neg.queue_close()
                final = neg.take_output()
        if conn.close_request is not None and conn.session is None and conn.lent_to is None:
            request = conn.close_request
            reason = request.condition.value if request.condition else "closed"
            if request.condition:
                neg.queue_stream_error(request.condition, request.text)
            else:
                neg.queue_close()
            final = neg.take_output()
    except RemoteProtocolError as exc:
        reason = exc.condition.value
        log.info("stream_error", condition=exc.condition.value, text=exc.text)
        neg.queue_stream_error(exc.condition, exc.text, exc.extra)
        final = neg.take_output()
    except (TransportLost, trio.BrokenResourceError, trio.ClosedResourceError):
        reason = "transport_lost"
    except trio.TooSlowError:
        reason = "tls_handshake_timeout"
    except (ssl.SSLError, OSError) as exc:
        reason = "tls_failed" if isinstance(exc, ssl.SSLError) else "socket_error"
        log.info("transport_error", error=str(exc))
    except StorageError as exc:
        # A store (a cluster's Redis, the database) failed: the client is told to come
        # back later, the operator gets one line naming the store, not a traceback.
        reason = "storage_unavailable"
        log.warning("storage_unavailable", error=str(exc))
        neg.queue_stream_error(
            StreamErrorCondition.INTERNAL_SERVER_ERROR, "the server's storage is unavailable"
        )
        final = neg.take_output()
    except Exception:
        # STYLE C7: the one place allowed to catch everything; our bug, not the client's.
        log.exception("internal_error")
        reason = "internal-server-error"
        neg.queue_stream_error(StreamErrorCondition.INTERNAL_SERVER_ERROR)
        final = neg.take_output()
    finally:
        if conn.session is None and not conn.is_lending:
            # Connections that never bound a resource end in crowds (thousands reaching
            # negotiation_timeout together): a few at a time, so that every other client
            # keeps getting its turns meanwhile. Shielded: waiting here is no way out.
            with trio.CancelScope(shield=True):
                async with ctx.closing:
                    await conn.finish(final, reason)
        else:
            await conn.finish(final, reason)
