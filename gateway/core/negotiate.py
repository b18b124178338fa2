"""Driving the c2s negotiation over a wire, and the lender's side of a resume.

Theory of operation
-------------------
`Negotiator.run` reads parser events (with the unfinished-stanza clock), hands each to
the pure `C2SNegotiation` and performs the actions it returns, writing its output after
each step: STARTTLS (the handshake under `TLS_HANDSHAKE_TIMEOUT`, then a stream
restart), the credential check (a worker thread, unless the lockout refuses the address
for the account: `auth.lockout`), the switch to the full stanza size limit once SASL
succeeded, binding (the connection's `bind` callback creates the session), and a
`<resume/>`. It ends with `Negotiated.BOUND`, `RESUMED` or `CLIENT_CLOSED`; the caller
puts the whole negotiation under `negotiation_timeout`.

A `<resume/>` (XEP-0198 section 5, after SASL, before bind) claims the session's slot
and *lends* this connection's transport to the parked session through a `Loan`. While
the session has not answered, `claiming` is set; once it accepted, `lent_to`: the
connection task must then wait until the session is done with the transport. Anything
else (unknown, expired or another user's id, a refused resume) is answered here with
`<failed><item-not-found/>`, with the stale h when known.

Every failed SASL attempt is logged and counted for the lockout, also the one that ends
the stream (`max_auth_failures`); a refusal by the lockout itself is not counted again.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Awaitable, Callable, Sequence

import structlog
import trio

from gateway.core.context import ServerContext
from gateway.core.metrics import ResumeFailure
from gateway.core.reading import StanzaTimer
from gateway.core.resume import Loan
from gateway.core.session import CLOSE_GRACE
from gateway.errors import LocalProtocolError, RemoteProtocolError, StreamErrorCondition
from gateway.logsetup import bind_jid
from gateway.net.wire import Wire
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID
from gateway.xmpp.negotiation import (
    Action,
    Authenticated,
    BindRequested,
    C2SNegotiation,
    ResumeRequested,
    StartTls,
    StreamEnded,
)
from gateway.xmpp.parser import ElementReceived, Event
from gateway.xmpp.sasl_exchange import CheckPassword, LookupCredentials
from gateway.xmpp.sm_elements import SmCondition, SmError, failed, parse_resume

log = structlog.get_logger(module=__name__)

TLS_HANDSHAKE_TIMEOUT = 15.0


class Negotiated(enum.Enum):
    """How a negotiation ended."""

    BOUND = "bound"
    RESUMED = "resumed"
    CLIENT_CLOSED = "client_closed"


class Negotiator:
    """Negotiates one connection's stream (see the module docstring).

    Args:
        ctx: the server context.
        wire: the connection's transport (STARTTLS upgrades it in place).
        negotiation: the pure negotiation state machine.
        timer: the connection's unfinished-stanza clock.
        conn_id: the connection's id (for the loan).
        bind: binds the requested resource (creates the session) and answers the client.
    """

    def __init__(
        self,
        ctx: ServerContext,
        wire: Wire,
        negotiation: C2SNegotiation,
        timer: StanzaTimer,
        conn_id: str,
        bind: Callable[[BindRequested], Awaitable[None]],
    ) -> None:
        self.ctx = ctx
        self.wire = wire
        self.negotiation = negotiation
        self.timer = timer
        self.conn_id = conn_id
        self.bind = bind
        #: Events the client pipelined after its bind request: the session's first.
        self.pending: list[Event] = []
        #: Our transport offered to a parked session, not answered yet.
        self.claiming: Loan | None = None
        #: Our transport, lent to the session that accepted it.
        self.lent_to: Loan | None = None
        self._restarted = False
        self._refused = False

    def release(self) -> None:
        """Drop the callback into the connection (a cycle with it) when the connection
        ends, so both are freed by reference counting."""
        self.bind = _negotiation_over

    async def write_output(self) -> None:
        """Write what the negotiation queued."""
        await self.wire.write(self.negotiation.take_output())

    async def run(self) -> Negotiated:
        """Negotiate until a resource is bound, a session resumed or the client closed."""
        neg = self.negotiation
        while not neg.is_established:
            events = await self.timer.read(self.wire)
            for index in range(len(events)):
                failures = neg.auth_failures
                try:
                    result = await self._step(events, index)
                finally:
                    # Also when the failure ended the stream (max_auth_failures).
                    if neg.auth_failures > failures:
                        self._auth_failed()
                if result is not None:
                    return result
                if self._restarted:
                    break  # the parser was reset: a new stream starts
        return Negotiated.BOUND

    async def _step(self, events: list[Event], index: int) -> Negotiated | None:
        """Handle `events[index]`; a result when negotiation is over."""
        neg = self.negotiation
        self._restarted = False
        event = events[index]
        refused = self._locked_out(event)
        actions = refused if refused is not None else neg.receive(event)
        await self.write_output()
        restart = False
        for action in actions:
            if isinstance(action, StartTls):
                assert self.ctx.ssl_context is not None
                self._check_restart_point(events, index)
                with trio.fail_after(TLS_HANDSHAKE_TIMEOUT):
                    await self.wire.start_tls(self.ctx.ssl_context)
                self.wire.restart()
                self.timer.reset()
                neg.tls_established()
                restart = True
            elif isinstance(action, LookupCredentials | CheckPassword):
                actions_after = await self._check_credentials(action)
                await self.write_output()
                if any(isinstance(a, Authenticated) for a in actions_after):
                    self._check_restart_point(events, index)
                restart = self._after_auth(actions_after)
            elif isinstance(action, Authenticated):
                self._check_restart_point(events, index)
                restart = self._after_auth([action])
            elif isinstance(action, BindRequested):
                await self.bind(action)
                self.pending = events[index + 1 :]
                return Negotiated.BOUND
            elif isinstance(action, ResumeRequested):
                if await self._resume(action.element, events[index + 1 :]):
                    return Negotiated.RESUMED
            elif isinstance(action, StreamEnded):
                return Negotiated.CLIENT_CLOSED
        self._restarted = restart
        return None

    def _locked_out(self, event: Event) -> list[Action] | None:
        """The lockout again before a SASL step of an exchange in progress: a client
        cannot start many exchanges before its failures count, then finish them all."""
        neg, lockout = self.negotiation, self.ctx.lockout
        username = neg.exchange_username
        if (
            lockout is None
            or username is None
            or neg.host is None
            or not isinstance(event, ElementReceived)
            or event.element.tag != (ns.SASL, "response")
        ):
            return None
        account = f"{username}@{neg.host}"
        wait = lockout.refusal(self.wire.peer.ip, account, trio.current_time())
        if wait is None:
            return None
        self._refused = True
        log.info("auth_locked_out", retry_after=math.ceil(wait))
        return neg.refuse_credentials(
            f"too many failed attempts; try again in {math.ceil(wait)} seconds"
        )

    async def _check_credentials(self, action: LookupCredentials | CheckPassword) -> list[Action]:
        """Check SASL credentials, unless the address is locked out for this account."""
        neg = self.negotiation
        lockout = self.ctx.lockout
        if lockout is not None:
            account = f"{action.username}@{action.host}"
            wait = lockout.refusal(self.wire.peer.ip, account, trio.current_time())
            if wait is not None:
                self._refused = True
                log.info("auth_locked_out", retry_after=math.ceil(wait))
                return neg.refuse_credentials(
                    f"too many failed attempts; try again in {math.ceil(wait)} seconds"
                )
        if isinstance(action, CheckPassword):
            return neg.password_checked(await self.ctx.check_password(action))
        return neg.provide_credentials(await self.ctx.lookup_credentials(action))

    def _auth_failed(self) -> None:
        neg = self.negotiation
        log.info("auth_failed", failures=neg.auth_failures)
        refused, self._refused = self._refused, False
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
                # Until now only the small pre-authentication limit applied.
                self.wire.set_max_stanza_size(self.ctx.config.general.max_stanza_size)
                self.wire.restart()
                self.timer.reset()
                bind_jid(str(action.jid))
                log.info("authenticated", mechanism=self.negotiation.mechanism)
                return True
        return False

    async def _resume(self, element: Element, pipelined: list[Event]) -> bool:
        """The lender's side of XEP-0198 section 5: hand this transport to the session."""
        neg = self.negotiation
        assert neg.jid is not None
        try:
            request = parse_resume(element)
        except SmError as exc:
            self.ctx.metrics.resume_failed.inc(reason=ResumeFailure.MALFORMED)
            neg.send(failed(exc.condition))
            await self.write_output()
            return False
        if not self.ctx.config.modules.mod_stream_management.buffer:
            # XEP-0198 section 5: a server that does not support resumption answers
            # feature-not-implemented (without a buffer nothing could be resent).
            self.ctx.metrics.resume_failed.inc(reason=ResumeFailure.RESUMPTION_OFF)
            neg.send(failed(SmCondition.FEATURE_NOT_IMPLEMENTED))
            await self.write_output()
            return False
        loan = Loan(
            wire=self.wire, negotiation=neg, pending=pipelined, h=request.h, conn_id=self.conn_id
        )
        # This node's slots are a cache of the local part of the sm_session table: a slot
        # here is claimed at once (no await between a reconnect storm's steps); on a miss
        # the table says whether another node holds the session. It cannot move here
        # yet: it is answered like an unknown one (and logged and counted as what it is).
        slot = self.ctx.resume.claim(request.previd, neg.jid, loan)
        if slot is None:
            record = await self.ctx.sm_sessions.lookup(request.previd)
            if record is not None and record.jid != str(neg.jid):
                loan.refusal = ResumeFailure.OTHER_USER
            elif record is not None and record.node != self.ctx.node:
                log.info("sm_resume_elsewhere", smid=request.previd, node=record.node)
                loan.refusal = ResumeFailure.OTHER_NODE
                migrations = self.ctx.migrations
                # A cluster moves the session here (gateway.core.migration), then it is
                # claimed like any local one.
                if migrations is not None and await migrations.fetch(request.previd, record.node):
                    slot = self.ctx.resume.claim(request.previd, neg.jid, loan)
        if slot is not None:
            log.info(
                "sm_resume_handover", smid=request.previd, session_conn_id=slot.session.conn_id
            )
            self.claiming = loan
            try:
                # Shielded and bounded: the session answers within its close grace (it
                # may first close its old transport); a negotiation deadline or shutdown
                # meanwhile must not let this connection close a transport the session
                # is about to write to.
                with trio.CancelScope(shield=True), trio.move_on_after(3 * CLOSE_GRACE):
                    await loan.accepted.wait()
            finally:
                self.claiming = None
            if loan.resumed:
                self.lent_to = loan
                return True
        stale = await self._stale_h_for(request.previd, neg.jid)
        log.info("sm_resume_failed", smid=request.previd, stale_h=stale)
        self.ctx.metrics.resume_failed.inc(reason=loan.refusal)
        # XEP-0198 section 5: unknown, expired or another user's id -> item-not-found.
        neg.send(failed(SmCondition.ITEM_NOT_FOUND, stale))
        await self.write_output()
        return False

    async def _stale_h_for(self, smid: str, jid: JID) -> int | None:
        if not self.ctx.config.modules.mod_stream_management.stale_h.enabled:
            return None
        entry = await self.ctx.stale_h.get(smid)
        if entry is None or entry.jid != str(jid):
            return None
        return entry.h


async def _negotiation_over(action: BindRequested) -> None:
    raise LocalProtocolError("the connection has ended; nothing can be bound")
