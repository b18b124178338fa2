"""The per-connection task: one nursery per client connection (STYLE C3, C7, C12).

Theory of operation
-------------------
`serve_connection` runs in two phases, both owned by the same task:

1. Negotiation, under the `general.negotiation_timeout` deadline: read bytes, feed the
   parser, hand events to the pure `C2SNegotiation`, perform its actions (STARTTLS, the
   credential lookup in a worker thread, resource binding through the router) and write
   its output. One task, one writer: nothing else writes yet.
2. The session: a nursery with the reader (this task's body) and a single writer task that
   drains the session's bounded outgoing channel, batching what is queued into one socket
   write. The router and other connections only `Session.send()` into that channel or
   `Session.close()`, which cancels the nursery's scope.

When the phase ends (client `</stream:stream>`, transport lost, a close request such as
`conflict` or `system-shutdown`, a protocol error), the session leaves the router, its
unavailable presence is broadcast, stanzas still queued but never written are handed back
to the router (messages rerouted, iq requests answered with an error: nothing vanishes
silently), and the closing bytes are written under a short shielded grace.

Cancellation: a cancelled connection (shutdown) goes through the same `finally` path.
"""

from __future__ import annotations

import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import structlog
import trio

from gateway.config import GatewayConfig, ListenerConfig, TlsMode
from gateway.core.presence import broadcast_unavailable, handle_presence
from gateway.core.router import Router
from gateway.core.session import CloseRequest, Session, SessionType
from gateway.errors import (
    JIDError,
    RemoteProtocolError,
    StanzaError,
    StanzaErrorCondition,
    StreamErrorCondition,
)
from gateway.logsetup import bind_connection, bind_jid
from gateway.net.transport import Transport
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID
from gateway.xmpp.negotiation import (
    Authenticated,
    BindRequested,
    C2SNegotiation,
    LookupCredentials,
    NegotiationSettings,
    StanzaReceived,
    StartTls,
    StreamEnded,
)
from gateway.xmpp.parser import ElementReceived, Event, StreamClosed, StreamOpened, StreamParser
from gateway.xmpp.sasl import ScramCredentials
from gateway.xmpp.serializer import serialize
from gateway.xmpp.stanza import StanzaKind, error_reply, stanza_kind

log = structlog.get_logger(module=__name__)

CLOSE_GRACE = 2.0  # seconds to write the closing bytes to a live transport
TLS_HANDSHAKE_TIMEOUT = 15.0

CredentialLookup = Callable[[LookupCredentials], Awaitable[ScramCredentials | None]]


@dataclass(eq=False)
class ServerContext:
    """What every connection shares: config, router, stores, TLS context, live connections."""

    config: GatewayConfig
    router: Router
    lookup_credentials: CredentialLookup
    ssl_context: ssl.SSLContext | None
    connections: set[Connection] = field(default_factory=set)
    draining: bool = False
    listen_ports: list[int] = field(default_factory=list)


class TransportLost(Exception):
    """The peer went away without closing its stream."""


class Connection:
    """State of one connection task (owned by it; see module docstring)."""

    def __init__(self, ctx: ServerContext, listener: ListenerConfig, transport: Transport) -> None:
        self.ctx = ctx
        self.listener = listener
        self.transport = transport
        self.conn_id = secrets.token_hex(4)
        cfg = ctx.config.general
        self.parser = StreamParser(max_stanza_size=cfg.max_stanza_size, max_depth=cfg.max_depth)
        tls_possible = ctx.ssl_context is not None and listener.tls is not TlsMode.NONE
        self.negotiation = C2SNegotiation(
            NegotiationSettings(
                hosts=frozenset(cfg.hosts),
                tls_available=tls_possible,
                tls_required=listener.tls is TlsMode.REQUIRED,
                secure=transport.peer.secure,
                plain_without_tls=listener.tls is TlsMode.NONE,
                max_auth_failures=cfg.max_auth_failures,
            )
        )
        self.session: Session | None = None
        self.scope = trio.CancelScope()
        self.close_request: CloseRequest | None = None
        self.pending: list[Event] = []
        self.bytes_in = 0
        self.bytes_out = 0
        self.stanzas_in = 0
        self.started = time.monotonic()
        self.transport_lost = False

    def close(self, condition: StreamErrorCondition | None, text: str | None = None) -> None:
        """Ask this connection to end (from any task)."""
        if self.session is not None:
            self.session.close(condition, text)
            return
        if self.close_request is None:
            self.close_request = CloseRequest(condition, text)
        self.scope.cancel()

    # -- I/O helpers ----------

    async def _write(self, data: bytes) -> None:
        if data:
            self.bytes_out += len(data)
            await self.transport.send(data)

    async def _read_events(self) -> list[Event]:
        data = await self.transport.receive()
        if not data:
            raise TransportLost("end of stream")
        self.bytes_in += len(data)
        return self.parser.feed(data)

    # -- phase 1: negotiation ----------

    async def negotiate(self) -> bool:
        """Run the negotiation until a resource is bound. False if the client closed."""
        neg = self.negotiation
        while not neg.is_established:
            events = await self._read_events()
            for index, event in enumerate(events):
                failures = neg.auth_failures
                actions = neg.receive(event)
                await self._write(neg.data_to_send())
                restart = False
                for action in actions:
                    if isinstance(action, StartTls):
                        assert self.ctx.ssl_context is not None
                        with trio.fail_after(TLS_HANDSHAKE_TIMEOUT):
                            await self.transport.start_tls(self.ctx.ssl_context)
                        self.parser.reset()
                        neg.tls_established()
                        log.debug("tls_established")
                        restart = True
                    elif isinstance(action, LookupCredentials):
                        creds = await self.ctx.lookup_credentials(action)
                        actions_after = neg.provide_credentials(creds)
                        await self._write(neg.data_to_send())
                        restart = self._after_auth(actions_after)
                    elif isinstance(action, Authenticated):
                        restart = self._after_auth([action])
                    elif isinstance(action, BindRequested):
                        await self._bind(action)
                        # Stanzas pipelined after the bind request are the session's.
                        self.pending = events[index + 1 :]
                        return True
                    elif isinstance(action, StreamEnded):
                        return False
                if neg.auth_failures > failures:
                    log.info("auth_failed", failures=neg.auth_failures)
                if restart:
                    break  # bytes after a restart point belong to the new stream
        return True

    def _after_auth(self, actions: Sequence[object]) -> bool:
        for action in actions:
            if isinstance(action, Authenticated):
                self.parser.reset()
                bind_jid(str(action.jid))
                log.info("authenticated", mechanism=self.negotiation.mechanism)
                return True
        return False

    async def _bind(self, action: BindRequested) -> None:
        neg = self.negotiation
        assert neg.jid is not None
        send_channel, receive_channel = trio.open_memory_channel[Element](
            # Full means the client is not reading fast enough: the session is closed with
            # resource-constraint and the stanza handed back to the router (Session.send).
            self.ctx.config.general.send_queue_size
        )
        self.outgoing_receive = receive_channel
        session = Session(
            conn_id=self.conn_id,
            conn=f"{self.transport.kind} {self.transport.peer}",
            outgoing=send_channel,
            notopen=False,
            type=SessionType.C2S,
            username=neg.jid.local,
            host=neg.jid.domain,
        )
        session.cancel_scope = self.scope
        if self.close_request is not None:
            session.close_request = self.close_request
        full = self.ctx.router.bind(session, neg.jid, action.resource)
        self.session = session
        neg.bind_result(action.iq, full)
        bind_jid(str(full))
        log.info("resource_bound")
        await self._write(neg.data_to_send())

    # -- phase 2: the session ----------

    async def run_session(self) -> bool:
        """Serve the bound session. Returns True when the client closed its stream."""
        error: Exception | None = None
        closed_by_client = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer)
            try:
                closed_by_client = await self._reader()
            except (RemoteProtocolError, TransportLost, trio.BrokenResourceError) as exc:
                # Re-raised below, outside the nursery: not wrapped in a group.
                error = exc
            nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        return closed_by_client

    async def _reader(self) -> bool:
        events, self.pending = self.pending, []
        while True:
            for event in events:
                if isinstance(event, ElementReceived):
                    await self._on_element(event.element)
                elif isinstance(event, StreamClosed):
                    return True
                elif isinstance(event, StreamOpened):
                    raise RemoteProtocolError(
                        StreamErrorCondition.NOT_WELL_FORMED, "stream header inside the stream"
                    )
            events = await self._read_events()

    async def _writer(self) -> None:
        receive = self.outgoing_receive
        try:
            async for element in receive:
                parts = [serialize(element)]
                while True:
                    try:
                        parts.append(serialize(receive.receive_nowait()))
                    except trio.WouldBlock:
                        break
                await self._write(b"".join(parts))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The reader notices too; end the session now.
            self.transport_lost = True
            self.scope.cancel()

    async def _on_element(self, element: Element) -> None:
        session = self.session
        assert session is not None and session.full_jid is not None
        kind = stanza_kind(element)
        if kind is None:
            actions = self.negotiation.receive(ElementReceived(element))
            for action in actions:
                if isinstance(action, StanzaReceived):
                    # Nonzas (stream management arrives in a later issue).
                    raise RemoteProtocolError(
                        StreamErrorCondition.UNSUPPORTED_STANZA_TYPE,
                        f"<{action.element.name}/> is not supported here",
                    )
            return
        self.stanzas_in += 1
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

    # -- the end ----------

    async def finish(self, reason: str, final: bytes) -> None:
        """Leave the router, hand back unwritten stanzas, write `final`, close."""
        session = self.session
        leftovers: list[Element] = []
        if session is not None:
            router = self.ctx.router
            router.unbind(session)
            await broadcast_unavailable(router, session)
            session.outgoing.close()
            while True:
                try:
                    leftovers.append(self.outgoing_receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
        transport_ok = reason not in ("transport_lost",)
        with trio.move_on_after(CLOSE_GRACE, shield=True):
            if transport_ok:
                try:
                    data = b"".join(serialize(el) for el in leftovers) + final
                    leftovers = []
                    await self._write(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            await self.transport.aclose()
        if session is not None and leftovers:
            await self._hand_back(session, leftovers)
        log.info(
            "connection_closed",
            reason=reason,
            duration=round(time.monotonic() - self.started, 3),
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            stanzas_in=self.stanzas_in,
            stanzas_out=session.stanzas_out if session else 0,
        )

    async def _hand_back(self, session: Session, stanzas: list[Element]) -> None:
        """Stanzas queued for a session that can no longer take them (never silently lost)."""
        router = self.ctx.router
        for stanza in stanzas:
            kind = stanza_kind(stanza)
            if kind is StanzaKind.MESSAGE and stanza.get("type", "normal") in ("chat", "normal"):
                await router.deliver_message_to_bare(stanza, session.bare_jid, exclude=session)
            elif kind is StanzaKind.IQ and stanza.get("type") in ("get", "set"):
                router.bounce(stanza, StanzaErrorCondition.SERVICE_UNAVAILABLE)
            else:
                router.drop(stanza, "undeliverable_after_session_end")


async def serve_connection(
    ctx: ServerContext, listener: ListenerConfig, transport: Transport
) -> None:
    """Serve one client connection from accept to close (the per-connection boundary)."""
    conn = Connection(ctx, listener, transport)
    bind_connection(conn.conn_id, str(transport.peer), transport.kind)
    log.info("connection_opened", listener_port=listener.port)
    ctx.connections.add(conn)
    reason = "closed"
    final = b""
    neg = conn.negotiation
    try:
        with conn.scope:
            if ctx.draining:
                raise RemoteProtocolError(StreamErrorCondition.SYSTEM_SHUTDOWN)
            deadline = trio.current_time() + ctx.config.general.negotiation_timeout
            with trio.CancelScope(deadline=deadline) as negotiation_scope:
                established = await conn.negotiate()
            if negotiation_scope.cancelled_caught:
                raise RemoteProtocolError(
                    StreamErrorCondition.CONNECTION_TIMEOUT, "negotiation took too long"
                )
            if established:
                closed_by_client = await conn.run_session()
                reason = "client_closed" if closed_by_client else "closed"
            else:
                reason = "client_closed"
            final = neg.close_bytes()
        request = conn.session.close_request if conn.session else conn.close_request
        if conn.transport_lost:
            reason = "transport_lost"
        elif request is not None:
            reason = request.condition.value if request.condition else "closed"
            final = (
                neg.stream_error_bytes(request.condition, request.text)
                if request.condition
                else neg.close_bytes()
            )
    except RemoteProtocolError as exc:
        reason = exc.condition.value
        log.info("stream_error", condition=exc.condition.value, text=exc.text)
        final = neg.stream_error_bytes(exc.condition, exc.text)
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
        final = neg.stream_error_bytes(StreamErrorCondition.INTERNAL_SERVER_ERROR)
    finally:
        ctx.connections.discard(conn)
        # Shielded: a cancelled connection (shutdown) still leaves the router, broadcasts
        # unavailable and hands its stanzas back before it goes.
        with trio.CancelScope(shield=True):
            await conn.finish(reason, final)
