"""A wire: a transport plus how XMPP is framed on it (STYLE T1, T3).

The connection task reads parser events from a wire and writes output units to it
(Elements, our stream start and end), never caring whether the peer speaks a TCP byte
stream (RFC 6120: one XML document, `StreamWire`) or WebSocket messages (RFC 7395: one
element per text message, `MessageWire`). A resuming connection lends its whole wire to
the parked session, so a session resumes across transports (WebSocket -> TCP and back).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Protocol

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from gateway.errors import LocalProtocolError, RemoteProtocolError, StreamErrorCondition
from gateway.net.transport import PeerInfo, StreamTransport
from gateway.xmpp.element import Element
from gateway.xmpp.framing import WebSocketFraming, close_message, element_message, open_message
from gateway.xmpp.negotiation import Output, StreamStart, render_stream
from gateway.xmpp.parser import Event, StreamParser


class TransportLost(trio.BrokenResourceError):
    """The peer went away without closing its stream.

    A `trio.BrokenResourceError`, so every place that handles a broken socket (the
    writer, closing a transport, a resume's first write) handles a closed WebSocket the
    same way: anything else escaping them would end the listener.
    """


class Wire(Protocol):
    kind: str
    bytes_in: int
    bytes_out: int
    supports_starttls: bool

    @property
    def peer(self) -> PeerInfo: ...

    async def read_events(self) -> list[Event]:
        """The next parser events; TransportLost at the end of the transport."""
        ...

    async def write(self, units: Sequence[Output]) -> None: ...

    def restart(self) -> None:
        """A stream restart (after STARTTLS or SASL success)."""
        ...

    @property
    def has_partial_data(self) -> bool: ...

    @property
    def unfinished_at(self) -> int | None:
        """Where the stanza still being received starts (an offset; the same on two reads
        means the same stanza), or None between stanzas."""
        ...

    def set_max_stanza_size(self, max_stanza_size: int) -> None:
        """The size limit for stanzas from now on (small before authentication)."""
        ...

    async def start_tls(self, context: ssl.SSLContext) -> None: ...

    async def aclose(self) -> None: ...


class StreamWire:
    """RFC 6120 over a byte stream (TCP, TLS, a PROXY-unwrapped stream)."""

    supports_starttls = True

    def __init__(self, transport: StreamTransport, parser: StreamParser) -> None:
        self.transport = transport
        self.parser = parser
        self.kind = transport.kind
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def peer(self) -> PeerInfo:
        return self.transport.peer

    async def read_events(self) -> list[Event]:
        data = await self.transport.receive()
        if not data:
            raise TransportLost("end of stream")
        self.bytes_in += len(data)
        return self.parser.feed(data)

    async def write(self, units: Sequence[Output]) -> None:
        if units:
            data = render_stream(list(units))
            self.bytes_out += len(data)
            await self.transport.send(data)

    def restart(self) -> None:
        self.parser.reset()

    @property
    def has_partial_data(self) -> bool:
        return self.parser.has_partial_data

    @property
    def unfinished_at(self) -> int | None:
        return self.parser.unfinished_at

    def set_max_stanza_size(self, max_stanza_size: int) -> None:
        self.parser.set_max_stanza_size(max_stanza_size)

    async def start_tls(self, context: ssl.SSLContext) -> None:
        await self.transport.start_tls(context)

    async def aclose(self) -> None:
        try:
            await self.transport.aclose()
        finally:
            # Frees a half-received stanza now, not at the next cyclic collection.
            self.parser.close()


class MessageWire:
    """RFC 7395 over a WebSocket connection: one element per text message."""

    kind = "websocket"
    supports_starttls = False  # RFC 7395 section 3.9: TLS is the wss:// layer

    def __init__(self, ws: WebSocketConnection, peer: PeerInfo, framing: WebSocketFraming) -> None:
        self.ws = ws
        self.peer = peer
        self.framing = framing
        self.bytes_in = 0
        self.bytes_out = 0

    async def read_events(self) -> list[Event]:
        try:
            message = await self.ws.get_message()
        except ConnectionClosed as exc:
            raise TransportLost("websocket closed") from exc
        if isinstance(message, bytes):
            # RFC 7395 section 3.2: XMPP goes in text frames only.
            raise RemoteProtocolError(
                StreamErrorCondition.BAD_FORMAT, "binary WebSocket frames are not allowed"
            )
        self.bytes_in += len(message)
        return self.framing.receive_message(message)

    async def write(self, units: Sequence[Output]) -> None:
        for unit in units:
            if isinstance(unit, Element):
                message = element_message(unit)
            elif isinstance(unit, StreamStart):
                message = open_message(from_=unit.from_, id_=unit.id_, lang=unit.lang)
            else:
                message = close_message()
            self.bytes_out += len(message)
            try:
                await self.ws.send_message(message)
            except ConnectionClosed as exc:
                raise TransportLost("websocket closed") from exc

    def restart(self) -> None:
        """RFC 7395 section 3.7: a restart is just a new <open/>; nothing to reset."""

    @property
    def has_partial_data(self) -> bool:
        return False

    @property
    def unfinished_at(self) -> int | None:
        return None  # a message is parsed whole

    def set_max_stanza_size(self, max_stanza_size: int) -> None:
        self.framing.set_max_stanza_size(max_stanza_size)

    async def start_tls(self, context: ssl.SSLContext) -> None:
        raise LocalProtocolError("STARTTLS is never offered over WebSocket")

    async def aclose(self) -> None:
        try:
            await self.ws.aclose()
        finally:
            self.framing.close()


class DetachedWire:
    """The wire of a session that has no transport: one taken back from a hand-off
    snapshot waits parked for a resume. Reading or writing is a lost transport."""

    kind = "none"
    supports_starttls = False
    bytes_in = 0
    bytes_out = 0

    def __init__(self, peer: PeerInfo) -> None:
        self.peer = peer

    async def read_events(self) -> list[Event]:
        raise TransportLost("no transport")

    async def write(self, units: Sequence[Output]) -> None:
        if units:
            raise TransportLost("no transport")

    def restart(self) -> None:
        """Nothing to reset."""

    @property
    def has_partial_data(self) -> bool:
        return False

    @property
    def unfinished_at(self) -> int | None:
        return None

    def set_max_stanza_size(self, max_stanza_size: int) -> None:
        """Nothing is received."""

    async def start_tls(self, context: ssl.SSLContext) -> None:
        raise LocalProtocolError("a detached wire has no transport to secure")

    async def aclose(self) -> None:
        """Nothing to close."""
