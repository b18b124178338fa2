"""The per-connection task: one nursery per client connection (STYLE C3, C7, C9, C12).

Theory of operation
-------------------
`serve_connection` owns one accepted transport and, once a resource is bound, the
`Session` and its XEP-0198 `SMState` for the session's whole life.

1. Negotiation, under `general.negotiation_timeout`: read bytes, feed the parser, hand
   events to the pure `C2SNegotiation`, perform its actions (STARTTLS, the credential lookup
   in a worker thread, binding through the router, a `<resume/>`) and write its output.
2. Serving (`_serve_transport`): a nursery with the reader (this task's body), a single
   writer task draining the session's bounded outgoing channel into batched socket writes,
   and, for a resumable session, the `watch` task that receives a handover from a newer
   connection. Others only `Session.send()` (into the SM buffer and the channel) or
   `Session.close()` (cancels the serving scope).
3. When the transport is lost (EOF, socket error, or an `<r/>` unanswered for
   `ack_timeout`: the writer sets a deadline on the reader's scope) and the session is
   resumable, the task parks in `resume_session`: the session stays in the router, stanzas
   keep going into its SM buffer, and it waits up to the granted `max` for a `Handover` on
   its slot's channel. A handover is adopted: `<resumed/>`, the client's h applied, the rest
   of the buffer resent in order, then back to 2 on the lent transport.
4. Otherwise the session ends (`gateway.core.ending`): it leaves the router and `sm_session`,
   records its h in `stale_h` when enabled, broadcasts unavailable presence, and hands
   every unacked stanza back to the router (messages rerouted or stored offline, iq
   requests answered `service-unavailable`, presence dropped): nothing vanishes.

5. At shutdown a resumable session is *handed off* instead (`ending.hand_off`, see
   `gateway.core.handoff`): snapshotted with its buffer for the next start, no unavailable
   presence, no rerouting. A session taken back from a snapshot runs `run_session` from
   step 3 with no transport (`gateway.core.revive`).

A connection whose `<resume/>` is accepted *lends* its transport to the parked session and
waits until that session is done with it (`Handover.done`), outside the negotiation
deadline; it never touches the transport again. Cancellation (shutdown) goes through the
same end path, shielded, so stanzas are handed back before the task exits.
"""

from __future__ import annotations

import contextlib
import enum
import math
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
from gateway.core.presence import handle_presence
from gateway.core.resume import Handover, ResumeSlot
from gateway.core.session import ACK_REQUEST, CloseRequest, Session, SessionType
from gateway.errors import (
    JIDError,
    RemoteProtocolError,
    StanzaError,
    StanzaErrorCondition,
    StreamErrorCondition,
)
from gateway.logsetup import bind_connection, bind_jid
from gateway.net.transport import StreamTransport
from gateway.net.wire import StreamWire, TransportLost, Wire
from gateway.storage.base import SmSessionRecord
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID
from gateway.xmpp.negotiation import (
    Action,
    Authenticated,
    BindRequested,
    C2SNegotiation,
    CheckPassword,
    LookupCredentials,
    NegotiationSettings,
    Output,
    ResumeRequested,
    StartTls,
    StreamEnded,
)
from gateway.xmpp.parser import ElementReceived, Event, StreamClosed, StreamOpened, StreamParser
from gateway.xmpp.sm import (
    AckBehind,
    HandledCountTooHigh,
    SmCondition,
    SmError,
    failed,
    handled_count_too_high,
    parse_ack,
    parse_enable,
    parse_resume,
    resumed,
)
from gateway.xmpp.stanza import IQ_TYPES, StanzaKind, error_reply, stanza_kind

log = structlog.get_logger(module=__name__)

CLOSE_GRACE = 2.0  # seconds to write the closing bytes to a live transport
TLS_HANDSHAKE_TIMEOUT = 15.0
NEGOTIATION_JITTER = 0.2  # part of negotiation_timeout added at random to each deadline
FLUSH_CHUNK = 100  # offline messages popped per step of a flush
FLUSH_MEMORY_FACTOR = 4  # memory per stored byte assumed when pacing a flush


class Outcome(enum.Enum):
    """How serving one transport ended."""

    CLIENT_CLOSED = "client_closed"
    TRANSPORT_LOST = "transport_lost"
    ACK_TIMEOUT = "ack_timeout"
    CLOSE_REQUESTED = "close_requested"
    PROTOCOL_ERROR = "protocol_error"
    HANDOVER = "handover"


class Negotiated(enum.Enum):
    BOUND = "bound"
    RESUMED = "resumed"
    CLIENT_CLOSED = "client_closed"


class Connection:
    """State of one connection task (owned by it; see module docstring)."""

    def __init__(self, ctx: ServerContext, wire: Wire, *, tls: TlsMode, port: int) -> None:
        self.ctx = ctx
        self.wire = wire
        self.tls = tls
        self.port = port
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
        self.session: Session | None = None
        self.slot: ResumeSlot | None = None
        self.scope = trio.CancelScope()
        self.close_request: CloseRequest | None = None
        self.pending: list[Event] = []
        self.outgoing_receive: trio.MemoryReceiveChannel[Element] | None = None
        self.serve_nursery: trio.Nursery | None = None
        self.ack_scope: trio.CancelScope | None = None
        self.handover_in: Handover | None = None  # received while serving
        self.lent_from: Handover | None = None  # the handover whose transport we use
        self.lent_to: Handover | None = None  # our transport, lent to a parked session
        self.claiming: Handover | None = None  # offered, waiting for the session's answer
        self.writer_lost = False
        self.in_flight: list[Element] = []
        # The writer's write in progress, and whether one was cut off mid-way (see _writer).
        self.write_scope: trio.CancelScope | None = None
        self.write_cut = False
        self.request_sent_at: float | None = None
        self.flushing = False
        # Set when the writer wrote or the client acked: room for more offline messages.
        self.room_changed = trio.Event()
        self.protocol_error: RemoteProtocolError | None = None
        self.stanzas_in = 0
        self.restarted = False  # the last negotiation event restarted the stream
        self.auth_refused = False  # the last SASL failure was the lockout's refusal
        # The unfinished stanza being timed: (wire, its offset, since when), see _read_events.
        self.unfinished: tuple[Wire, int, float] | None = None
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
    def is_lending(self) -> bool:
        """Our transport is (or may be about to be) used by a resumed session: this task
        must not return before that session is done with it (the listener closes the
        socket when the task returns)."""
        return self.lent_to is not None or self.claiming is not None

    @property
    def is_resumable(self) -> bool:
        """The session could be resumed by a new connection now (or after a hand-off)."""
        session = self.session
        sm = session.sm if session is not None else None
        return self.slot is not None and sm is not None and sm.resumable

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
        self.session = session
        session.on_flush_request = self._start_flush
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

    # -- I/O helpers ----------

    async def _flush(self) -> None:
        """Write what the negotiation queued."""
        await self.wire.write(self.negotiation.take_output())

    async def _close_transport(self, final: Sequence[Output]) -> None:
        """Write `final` (best effort, bounded) and close the current wire; never raises
        for a transport that is already gone."""
        try:
            with (
                trio.move_on_after(CLOSE_GRACE, shield=True),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
            ):
                try:
                    if final and not self.write_cut:
                        await self.wire.write(final)
                finally:
                    await self.wire.aclose()
        finally:
            # The lender waits for this, whatever happened to its transport.
            if self.lent_from is not None:
                self.lent_from.done.set()
                self.lent_from = None

    # -- phase 1: negotiation ----------

    async def negotiate(self) -> Negotiated:
        """Run the negotiation until a resource is bound or a session resumed."""
        neg = self.negotiation
        while not neg.is_established:
            events = await self._read_events()
            for index in range(len(events)):
                failures = neg.auth_failures
                try:
                    result = await self._negotiate_event(events, index)
                finally:
                    # Also when the failure ended the stream (max_auth_failures).
                    if neg.auth_failures > failures:
                        self._auth_failed()
                if result is not None:
                    return result
                if self.restarted:
                    break  # the parser was reset: a new stream starts
        return Negotiated.BOUND

    async def _negotiate_event(self, events: list[Event], index: int) -> Negotiated | None:
        """Handle `events[index]`; a result when negotiation is over. Sets `restarted`
        when the stream restarts (the rest of `events` is then not the new stream's)."""
        neg = self.negotiation
        self.restarted = False
        actions = neg.receive(events[index])
        await self._flush()
        restart = False
        for action in actions:
            if isinstance(action, StartTls):
                assert self.ctx.ssl_context is not None
                self._check_restart_point(events, index)
                with trio.fail_after(TLS_HANDSHAKE_TIMEOUT):
                    await self.wire.start_tls(self.ctx.ssl_context)
                self.wire.restart()
                self.unfinished = None
                neg.tls_established()
                restart = True
            elif isinstance(action, LookupCredentials | CheckPassword):
                actions_after = await self._check_credentials(action)
                await self._flush()
                if any(isinstance(a, Authenticated) for a in actions_after):
                    self._check_restart_point(events, index)
                restart = self._after_auth(actions_after)
            elif isinstance(action, Authenticated):
                self._check_restart_point(events, index)
                restart = self._after_auth([action])
            elif isinstance(action, BindRequested):
                await self._bind(action)
                # Stanzas pipelined after the bind request are the session's.
                self.pending = events[index + 1 :]
                return Negotiated.BOUND
            elif isinstance(action, ResumeRequested):
                if await self._resume(action.element, events[index + 1 :]):
                    return Negotiated.RESUMED
            elif isinstance(action, StreamEnded):
                return Negotiated.CLIENT_CLOSED
        self.restarted = restart
        return None

    async def _check_credentials(self, action: LookupCredentials | CheckPassword) -> list[Action]:
        """Check SASL credentials, unless the address is locked out for this account."""
        neg = self.negotiation
        lockout = self.ctx.lockout
        if lockout is not None:
            account = f"{action.username}@{action.host}"
            wait = lockout.refusal(self.wire.peer.ip, account, trio.current_time())
            if wait is not None:
                self.auth_refused = True
                log.info("auth_locked_out", retry_after=math.ceil(wait))
                return neg.refuse_credentials(
                    f"too many failed attempts; try again in {math.ceil(wait)} seconds"
                )
        if isinstance(action, CheckPassword):
            return neg.password_checked(await self.ctx.check_password(action))
        return neg.provide_credentials(await self.ctx.lookup_credentials(action))

    def _auth_failed(self) -> None:
        """A SASL attempt failed: log it and count it for the lockout (a refusal by the
        lockout itself is not counted again)."""
        neg = self.negotiation
        log.info("auth_failed", failures=neg.auth_failures)
        refused, self.auth_refused = self.auth_refused, False
        username = neg.failed_username
        if refused or username is None or neg.host is None or self.ctx.lockout is None:
            return
        self.ctx.lockout.failed(self.wire.peer.ip, f"{username}@{neg.host}", trio.current_time())

    def _check_restart_point(self, events: list[Event], index: int) -> None:
        """RFC 6120 5.4.3.3 / 6.4.6: nothing may follow <starttls/> or a successful SASL
        exchange before the stream restart; say so instead of hanging on lost bytes."""
        if index + 1 < len(events) or self.wire.has_partial_data:
            raise RemoteProtocolError(
                StreamErrorCondition.POLICY_VIOLATION, "data was pipelined across a stream restart"
            )

    def _after_auth(self, actions: Sequence[object]) -> bool:
        for action in actions:
            if isinstance(action, Authenticated):
                if self.ctx.lockout is not None:
                    self.ctx.lockout.succeeded(
                        self.wire.peer.ip, str(action.jid), trio.current_time()
                    )
                self.wire.set_max_stanza_size(self.ctx.config.general.max_stanza_size)
                self.wire.restart()
                self.unfinished = None
                bind_jid(str(action.jid))
                log.info("authenticated", mechanism=self.negotiation.mechanism)
                return True
        return False

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
            notopen=False,
            type=SessionType.C2S,
            username=neg.jid.local,
            host=neg.jid.domain,
        )
        self._new_outgoing(session)
        if self.close_request is not None:
            session.close_request = self.close_request
        full = self.ctx.router.bind(session, neg.jid, action.resource)
        self.session = session
        session.on_flush_request = self._start_flush
        neg.bind_result(action.iq, full)
        bind_jid(str(full))
        log.info("resource_bound")
        await self._flush()

    async def _resume(self, element: Element, pipelined: list[Event]) -> bool:
        """The lender's side of XEP-0198 section 5: hand this transport to the session."""
        neg = self.negotiation
        assert neg.jid is not None
        try:
            request = parse_resume(element)
        except SmError as exc:
            neg.send(failed(exc.condition))
            await self._flush()
            return False
        if not self.ctx.config.modules.mod_stream_management.buffer:
            # XEP-0198 section 5: a server that does not support resumption answers
            # feature-not-implemented (without a buffer nothing could be resent).
            neg.send(failed(SmCondition.FEATURE_NOT_IMPLEMENTED))
            await self._flush()
            return False
        handover = Handover(
            wire=self.wire,
            negotiation=neg,
            pending=pipelined,
            h=request.h,
            conn_id=self.conn_id,
        )
        slot = self.ctx.resume.claim(request.previd, neg.jid, handover)
        if slot is not None:
            log.info(
                "sm_resume_handover", smid=request.previd, session_conn_id=slot.session.conn_id
            )
            self.claiming = handover
            try:
                await handover.accepted.wait()
            finally:
                self.claiming = None
            if handover.resumed:
                self.lent_to = handover
                return True
        stale = await self._stale_h_for(request.previd, neg.jid)
        log.info("sm_resume_failed", smid=request.previd, stale_h=stale)
        # XEP-0198 section 5: unknown, expired or another user's id -> item-not-found.
        neg.send(failed(SmCondition.ITEM_NOT_FOUND, stale))
        await self._flush()
        return False

    async def _stale_h_for(self, smid: str, jid: JID) -> int | None:
        if not self.ctx.config.modules.mod_stream_management.stale_h.enabled:
            return None
        entry = await self.ctx.stale_h.get(smid)
        if entry is None or entry.jid != str(jid):
            return None
        return entry.h

    # -- phase 2: serving a transport ----------

    async def _serve_transport(self) -> Outcome:
        """Serve the session on the current transport until something ends it."""
        session = self.session
        assert session is not None
        self.writer_lost = False
        self.write_cut = False
        self.protocol_error = None
        self.handover_in = None
        outcome = Outcome.CLOSE_REQUESTED
        with trio.CancelScope() as serve_scope:
            session.cancel_scope = serve_scope
            if session.close_request is not None:
                serve_scope.cancel()
            async with trio.open_nursery() as nursery:
                self.serve_nursery = nursery
                nursery.start_soon(self._writer)
                if session.flush_pending:
                    self._start_flush()
                if self.slot is not None:
                    nursery.start_soon(self._watch, self.slot)
                try:
                    outcome = await self._reader()
                except RemoteProtocolError as exc:
                    self.protocol_error = exc
                    outcome = Outcome.PROTOCOL_ERROR
                except (TransportLost, trio.BrokenResourceError, trio.ClosedResourceError):
                    outcome = Outcome.TRANSPORT_LOST
                except OSError:
                    outcome = Outcome.TRANSPORT_LOST
                finally:
                    self._bound_write()
                nursery.cancel_scope.cancel()
        self.serve_nursery = None
        if self._received_handover() is not None:
            return Outcome.HANDOVER
        if session.close_request is not None:
            return Outcome.CLOSE_REQUESTED
        if self.writer_lost:
            return Outcome.TRANSPORT_LOST
        return outcome

    def _received_handover(self) -> Handover | None:
        # A method, so type checkers do not narrow the attribute the watch task sets.
        return self.handover_in

    async def _reader(self) -> Outcome:
        outcome = Outcome.ACK_TIMEOUT
        with trio.CancelScope() as ack_scope:
            # Only the ack deadline (set by the writer after an <r/>) cancels this scope.
            self.ack_scope = ack_scope
            ack_timeout = self.ctx.config.modules.mod_stream_management.ack_timeout
            if self.request_sent_at is not None and ack_timeout:
                # The <r/> that followed a resend on resumption was written before this
                # reader existed.
                ack_scope.deadline = self.request_sent_at + ack_timeout
            self.request_sent_at = None
            outcome = await self._read_loop()
        self.ack_scope = None
        return outcome

    async def _read_loop(self) -> Outcome:
        events, self.pending = self.pending, []
        while True:
            for event in events:
                if isinstance(event, ElementReceived):
                    await self._on_element(event.element)
                elif isinstance(event, StreamClosed):
                    return Outcome.CLIENT_CLOSED
                elif isinstance(event, StreamOpened):
                    raise RemoteProtocolError(
                        StreamErrorCondition.NOT_WELL_FORMED, "stream header inside the stream"
                    )
            events = await self._read_events()

    async def _read_events(self) -> list[Event]:
        """The next parser events from the wire. A stanza that stays unfinished for
        `general.stanza_timeout` (a peer holding memory with a half stanza) is a
        `policy-violation`, before and after authentication."""
        wire = self.wire
        offset = wire.unfinished_at
        if offset is None:
            self.unfinished = None
            return await wire.read_events()
        since = trio.current_time()
        if self.unfinished is not None and self.unfinished[:2] == (wire, offset):
            since = self.unfinished[2]
        self.unfinished = (wire, offset, since)
        with trio.move_on_at(since + self.ctx.config.general.stanza_timeout):
            return await wire.read_events()
        raise RemoteProtocolError(
            StreamErrorCondition.POLICY_VIOLATION, "a stanza stayed unfinished too long"
        )

    async def _writer(self) -> None:
        receive = self.outgoing_receive
        assert receive is not None
        ack_timeout = self.ctx.config.modules.mod_stream_management.ack_timeout
        try:
            async for element in receive:
                batch = [element]
                while True:
                    try:
                        batch.append(receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                # Until the write returns, the batch is in flight: handed back (without SM)
                # if the session ends meanwhile, so nothing vanishes mid-write.
                self.in_flight = batch
                requested = any(e is ACK_REQUEST for e in batch)
                # A write is not cut short when serving ends (half a stanza would make the
                # stream error that follows unreadable); _bound_write gives it a deadline.
                with trio.CancelScope(shield=True) as write_scope:
                    self.write_scope = write_scope
                    await self.wire.write(batch)
                self.write_scope = None
                if write_scope.cancelled_caught:
                    # The grace ran out mid-write: nothing more may go on this stream.
                    self.write_cut = True
                    return
                self.in_flight = []
                if self.session is not None:
                    self.session.queued_bytes -= sum(e.size for e in batch)
                self.room_changed.set()
                scope = self.ack_scope
                if requested and ack_timeout and scope is not None and scope.deadline == math.inf:
                    scope.deadline = trio.current_time() + ack_timeout
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.writer_lost = True
            if self.session is not None and self.session.cancel_scope is not None:
                self.session.cancel_scope.cancel()

    def _bound_write(self) -> None:
        """Serving ends: a write in progress may finish within CLOSE_GRACE, no longer."""
        scope = self.write_scope
        if scope is not None and scope.deadline == math.inf:
            scope.deadline = trio.current_time() + CLOSE_GRACE

    def _start_flush(self) -> None:
        """Start the offline flush on the serving nursery (one at a time per session)."""
        if self.flushing or self.serve_nursery is None or self.ctx.router.offline is None:
            return  # already running, or it starts when serving (re)starts
        self.flushing = True
        self.serve_nursery.start_soon(self._flush_offline)

    def _flush_room(self) -> tuple[int, int]:
        """How many offline messages, and how many stored bytes of them, fit now without
        overflowing the queue or the SM buffer (a quarter of each is left to live traffic)."""
        session = self.session
        if session is None or session.outgoing is None:
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
        # Stored bytes are wire bytes; in memory a message takes a few times more.
        return min(room, FLUSH_CHUNK), room_bytes // FLUSH_MEMORY_FACTOR

    async def _flush_offline(self) -> None:
        """XEP-0160 flush paced by the client: only what fits, more as it acks/reads."""
        session = self.session
        offline = self.ctx.router.offline
        assert session is not None and offline is not None
        try:
            while session.flush_pending:
                room, room_bytes = self._flush_room()
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

    async def _watch(self, slot: ResumeSlot) -> None:
        """Receive a handover while still serving; only cancels the serving scope (C9)."""
        handover = await slot.receive_channel.receive()
        self.handover_in = handover
        assert self.session is not None and self.session.cancel_scope is not None
        self.session.cancel_scope.cancel()

    async def _on_element(self, element: Element) -> None:
        session = self.session
        assert session is not None and session.full_jid is not None
        kind = stanza_kind(element)
        if kind is None:
            await self._on_nonza(session, element)
            return
        self.stanzas_in += 1
        await self._on_stanza(session, kind, element)
        # XEP-0198 section 4: h counts the stanzas the server *handled*. Counted once
        # routing is done: a stanza whose routing a close cancelled is not acknowledged,
        # so the client sends it again after resuming (same id) instead of losing it.
        if session.sm is not None:
            session.sm.received()

    async def _on_stanza(self, session: Session, kind: StanzaKind, element: Element) -> None:
        assert session.full_jid is not None
        if kind is StanzaKind.IQ and (
            element.get("id") is None or element.get("type") not in IQ_TYPES
        ):
            # RFC 6120 8.1.3 / 8.2.3: an iq needs an id and a known type.
            if element.get("type") != "error":
                session.send(
                    error_reply(
                        element.replace_attrs(**{"from": str(session.full_jid)}),
                        StanzaErrorCondition.BAD_REQUEST,
                        text="an iq needs an id and a type of get, set, result or error",
                        from_=session.host or "",
                    )
                )
            return
        full = str(session.full_jid)
        claimed = element.get("from")
        if claimed is not None and claimed != full:
            try:
                claimed_jid = JID.parse(claimed)
            except JIDError as exc:
                raise RemoteProtocolError(StreamErrorCondition.INVALID_FROM) from exc
            if claimed_jid not in (session.full_jid, session.full_jid.bare()):
                # RFC 6120 section 8.1.2.1: a client may not send as another entity.
                raise RemoteProtocolError(StreamErrorCondition.INVALID_FROM)
        stanza = element.replace_attrs(**{"from": full})
        to = stanza.get("to")
        if to is not None:
            try:
                JID.parse(to)
            except JIDError:
                if stanza.get("type") != "error":
                    session.send(
                        error_reply(
                            stanza, StanzaErrorCondition.JID_MALFORMED, from_=session.host or ""
                        )
                    )
                return
        try:
            if kind is StanzaKind.PRESENCE:
                await handle_presence(self.ctx.router, session, stanza)
            else:
                await self.ctx.router.route(stanza, session)
        except StanzaError as exc:
            if stanza.get("type") != "error":
                session.send(error_reply(stanza, exc.condition, exc.error_type, exc.text))

    async def _on_nonza(self, session: Session, element: Element) -> None:
        if element.namespace != ns.SM:
            raise RemoteProtocolError(
                StreamErrorCondition.UNSUPPORTED_STANZA_TYPE, f"<{element.name}/> is not supported"
            )
        sm = session.sm
        name = element.name
        if name == "enable":
            await self._enable(session, element)
        elif name == "r":
            if sm is None:
                log.debug("sm_request_without_enable")  # <failed/> is not defined for it
            else:
                session.send_nonza(sm.answer())
        elif name == "a":
            if sm is None:
                return
            h = parse_ack(element)
            try:
                sm.acked(h)
            except HandledCountTooHigh as exc:
                raise RemoteProtocolError(
                    StreamErrorCondition.UNDEFINED_CONDITION,
                    "you acknowledged more stanzas than were sent",
                    extra=handled_count_too_high(exc.h, exc.send_count),
                ) from exc
            except AckBehind:
                log.debug("sm_ack_behind", h=h)
            if self.ack_scope is not None:
                self.ack_scope.deadline = math.inf  # the client is alive
            self.room_changed.set()
        elif name == "resume":
            # XEP-0198 section 5: resumption comes instead of binding, not after it.
            session.send_nonza(failed(SmCondition.UNEXPECTED_REQUEST))
        else:
            raise RemoteProtocolError(
                StreamErrorCondition.UNSUPPORTED_STANZA_TYPE, f"<{name}/> is not supported"
            )

    async def _enable(self, session: Session, element: Element) -> None:
        cfg = self.ctx.config.modules.mod_stream_management
        if session.sm is not None:
            # XEP-0198 section 3: a second <enable/> is an unexpected request.
            session.send_nonza(failed(SmCondition.UNEXPECTED_REQUEST))
            return
        try:
            request = parse_enable(element)
        except SmError as exc:
            session.send_nonza(failed(exc.condition))
            return
        sm = self.ctx.new_sm_state(
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
            self.slot = self.ctx.resume.create(smid, session.bare_jid, session)
            await self.ctx.sm_sessions.register(
                SmSessionRecord(smid, str(session.bare_jid), "local", trio.current_time())
            )
            if self.serve_nursery is not None:
                self.serve_nursery.start_soon(self._watch, self.slot)
            structlog.contextvars.bind_contextvars(smid=smid)
        log.info("sm_enabled", resume=smid is not None, max=granted)

    # -- phase 3: resume_session ----------

    async def _park(self) -> Handover | None:
        """Wait (up to the granted max) for a resuming connection's handover."""
        session, slot = self.session, self.slot
        assert session is not None and slot is not None and session.sm is not None
        session.outgoing = None  # stanzas now only enter the SM buffer
        self.outgoing_receive = None
        now = trio.current_time()
        for victim in self.ctx.resume.park(slot, now):
            log.info(
                "sm_parked_session_evicted", smid=victim.smid, victim_conn_id=victim.session.conn_id
            )
            victim.session.close(None, "too many parked sessions")
        deadline = self.resume_deadline
        if deadline is None:
            deadline = now + (session.sm.max or 0)
        self.resume_deadline = deadline
        log.info(
            "session_parked",
            timeout=round(max(deadline - now, 0.0), 3),
            unacked=session.sm.buffer_size,
        )
        with trio.CancelScope(deadline=deadline) as park_scope:
            session.cancel_scope = park_scope
            if session.close_request is not None:
                park_scope.cancel()
            return await slot.receive_channel.receive()
        return None

    async def _adopt(self, handover: Handover) -> bool:
        """Serve `handover`'s transport: <resumed/>, apply h, resend the rest (section 5)."""
        session, slot = self.session, self.slot
        assert session is not None and slot is not None and session.sm is not None
        sm = session.sm
        neg = handover.negotiation
        if session.close_request is not None:
            # Someone ended this session (a bind conflict, shutdown, eviction, overflow)
            # in the same step as the claim: the resume fails, the session ends.
            handover.resumed = False
            handover.accepted.set()
            return False
        try:
            resend = sm.resume(handover.h)
        except AckBehind:
            resend = sm.unacked()
        except SmError:
            # No longer resumable (its buffer overflowed while parked): the lender answers
            # <failed/>, and this session ends and reroutes.
            handover.resumed = False
            handover.accepted.set()
            return False
        except HandledCountTooHigh as exc:
            log.info("sm_resume_bad_h", h=exc.h, send_count=exc.send_count)
            handover.resumed = False
            neg.queue_stream_error(
                StreamErrorCondition.UNDEFINED_CONDITION,
                "you acknowledged more stanzas than were sent",
                handled_count_too_high(exc.h, exc.send_count),
            )
            with trio.move_on_after(CLOSE_GRACE, shield=True):
                with contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, OSError
                ):
                    await handover.wire.write(neg.take_output())
                await handover.wire.aclose()
            handover.lost_transport = True
            handover.accepted.set()
            handover.done.set()
            return False
        # Switch this task to the lent stream (wire, negotiation state); from now on its
        # log lines carry the new peer (children spawned later inherit it).
        old_peer = str(self.wire.peer) if self.snapshot_peer is None else self.snapshot_peer
        self.wire, self.negotiation = handover.wire, neg
        self.snapshot_peer = None
        session.conn = f"{handover.wire.kind} {handover.wire.peer}"
        structlog.contextvars.bind_contextvars(
            peer=str(handover.wire.peer), transport=handover.wire.kind
        )
        self.pending = handover.pending
        self.lent_from = handover
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
        handover.resumed = True
        handover.accepted.set()
        self.resume_deadline = None
        self.ctx.resume.resumed += 1
        log.info(
            "session_resumed",
            new_conn_id=handover.conn_id,
            h=handover.h,
            resent=len(resend),
            old_peer=old_peer,
        )
        try:
            await self._flush()
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
            handover: Handover | None = None
            if outcome is Outcome.HANDOVER:
                # XEP-0198 section 5: the old transport is still attached: close it first.
                handover = self.handover_in
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
                handover = await self._park()
                if handover is None and session.close_request is None:
                    # Timed out. The h goes into stale_h before the slot ends, so a resume
                    # that finds no slot can always learn it; a claim that raced the
                    # deadline still wins (end() returns it).
                    assert self.slot is not None
                    await record_stale_h(self)
                    handover = self.ctx.resume.end(self.slot)
                    if handover is None:
                        self.slot = None  # ended; stale_h recorded in end_session
                        return "resume_timeout"
            else:
                final, reason = self._final_units(outcome), self._reason(outcome)
                session.mark_ending()
                await self._close_transport(final)
                return reason
            if handover is None:
                return "closed"
            if not await self._adopt(handover):
                session.mark_ending()
                return "resume_failed"

    def _final_units(self, outcome: Outcome) -> list[Output]:
        neg = self.negotiation
        session = self.session
        request = session.close_request if session is not None else self.close_request
        if outcome is Outcome.PROTOCOL_ERROR and self.protocol_error is not None:
            exc = self.protocol_error
            log.info("stream_error", condition=exc.condition.value, text=exc.text)
            neg.queue_stream_error(exc.condition, exc.text, exc.extra)
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
        if outcome is Outcome.PROTOCOL_ERROR and self.protocol_error is not None:
            return self.protocol_error.condition.value
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
        session's callbacks into this object, a kept exception and its traceback), so
        both are freed by reference counting as soon as the task ends: with thousands
        of connections, waiting for the cyclic collector means holding their memory."""
        session = self.session
        if session is not None:
            session.on_flush_request = None
            session.cancel_scope = None
        self.protocol_error = None

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


async def serve_connection(
    ctx: ServerContext, listener: ListenerConfig, transport: StreamTransport
) -> None:
    """Serve one accepted TCP connection (plain, STARTTLS, direct TLS, PROXY-unwrapped)."""
    cfg = ctx.config.general
    # Until SASL succeeds only the small pre-authentication limit applies (_after_auth).
    parser = StreamParser(max_stanza_size=cfg.pre_auth_max_stanza_size, max_depth=cfg.max_depth)
    await serve_wire(ctx, StreamWire(transport, parser), tls=listener.tls, port=listener.port)


async def serve_wire(ctx: ServerContext, wire: Wire, *, tls: TlsMode, port: int) -> None:
    """Serve one client connection from accept to close (the per-connection boundary)."""
    conn = Connection(ctx, wire, tls=tls, port=port)
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
                result = await conn.negotiate()
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
