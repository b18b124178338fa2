"""A scripted raw XMPP client for tests (STYLE V4).

It writes XML text as given and reads the server's answer through the gateway's own
parser, so assertions compare Elements structurally. `login()` walks STARTTLS (optional),
SCRAM or PLAIN, the restart and bind, like a real client does.
"""

from __future__ import annotations

import base64
import ssl
from typing import Literal

import trio

from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from gateway.xmpp.parser import Event, StreamClosed, StreamOpened, StreamParser
from gateway.xmpp.sasl import ScramClient

HEADER = (
    "<?xml version='1.0'?><stream:stream to='{to}' version='1.0' xml:lang='en' "
    "xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
)


class StreamEnd(Exception):
    """The server closed its stream or the connection."""


class RawClient:
    """A scripted XMPP client on any trio stream: XML out as given, Elements in."""

    def __init__(self, stream: trio.abc.Stream, domain: str = "localhost") -> None:
        self.stream = stream
        self.domain = domain
        self.parser = StreamParser(max_stanza_size=10_000_000)
        self.events: list[Event] = []
        self.header: StreamOpened | None = None
        self.jid: str | None = None
        self.closed = False

    async def send(self, xml: str | bytes) -> None:
        """Write `xml` as it is (text is UTF-8 encoded)."""
        await self.stream.send_all(xml.encode() if isinstance(xml, str) else xml)

    async def _next_event(self) -> Event:
        """The next parser event, reading from the stream when none is pending."""
        while not self.events:
            data = bytes(await self.stream.receive_some(65536))
            if not data:
                self.closed = True
                raise StreamEnd("connection closed")
            self.events.extend(self.parser.feed(data))
        return self.events.pop(0)

    async def open(self, to: str | None = None) -> Element:
        """Send a stream header; return the server's features."""
        await self.send(HEADER.format(to=to or self.domain))
        event = await self._next_event()
        assert isinstance(event, StreamOpened), event
        self.header = event
        return await self.expect(ns.STREAM, "features")

    async def receive(self) -> Element:
        """The next element; StreamEnd when the stream closes."""
        event = await self._next_event()
        if isinstance(event, StreamClosed):
            self.closed = True
            raise StreamEnd("stream closed")
        if isinstance(event, StreamOpened):
            self.header = event
            return await self.receive()
        return event.element

    async def expect(self, namespace: str, name: str) -> Element:
        """The next element, which must be `{namespace}name`."""
        element = await self.receive()
        assert (element.namespace, element.name) == (namespace, name), element
        return element

    async def expect_stream_error(self) -> str:
        """Read until a stream error; return its condition and check the stream closes."""
        while True:
            element = await self.receive()
            if element.namespace == ns.STREAM and element.name == "error":
                break
        condition = condition_of(element)
        try:
            while True:
                await self.receive()
        except StreamEnd:
            pass
        return condition

    async def starttls(self, context: ssl.SSLContext) -> None:
        """Ask for STARTTLS and run the TLS handshake (the stream is then reopened)."""
        await self.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        await self.expect(ns.TLS, "proceed")
        tls = trio.SSLStream(self.stream, context, server_hostname=self.domain)
        await tls.do_handshake()
        self.stream = tls
        self.parser.reset()

    async def auth(
        self,
        username: str,
        password: str,
        mechanism: Literal["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"] = "SCRAM-SHA-256",
    ) -> Element:
        """Run SASL; return the final <success/> or <failure/>."""
        if mechanism == "PLAIN":
            payload = base64.b64encode(f"\0{username}\0{password}".encode()).decode()
            await self.send(f"<auth xmlns='{ns.SASL}' mechanism='PLAIN'>{payload}</auth>")
            return await self.receive()
        scram = ScramClient(
            "sha256" if mechanism == "SCRAM-SHA-256" else "sha1", username, password
        )
        first = base64.b64encode(scram.first()).decode()
        await self.send(f"<auth xmlns='{ns.SASL}' mechanism='{mechanism}'>{first}</auth>")
        challenge = await self.receive()
        if challenge.name != "challenge":
            return challenge
        final = scram.final(base64.b64decode(challenge.text))
        await self.send(
            f"<response xmlns='{ns.SASL}'>{base64.b64encode(final).decode()}</response>"
        )
        result = await self.receive()
        if result.name == "success":
            scram.verify(base64.b64decode(result.text))
        return result

    async def bind(self, resource: str | None = None) -> str:
        """Bind `resource` (or let the server pick one); return the full JID."""
        inner = f"<resource>{resource}</resource>" if resource else ""
        await self.send(f"<iq type='set' id='bind1'><bind xmlns='{ns.BIND}'>{inner}</bind></iq>")
        reply = await self.expect(ns.CLIENT, "iq")
        assert reply.get("type") == "result", reply
        bind = reply.find(ns.BIND, "bind")
        assert bind is not None
        self.jid = bind.find_text(ns.BIND, "jid")
        assert self.jid
        return self.jid

    async def login(
        self,
        username: str,
        password: str,
        *,
        tls: ssl.SSLContext | None = None,
        resource: str | None = None,
        mechanism: Literal["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"] = "SCRAM-SHA-256",
    ) -> str:
        """Open, STARTTLS (with `tls`), authenticate, restart and bind: the full JID."""
        await self.open()
        if tls is not None:
            await self.starttls(tls)
            await self.open()
        result = await self.auth(username, password, mechanism)
        assert result.name == "success", result
        self.parser.reset()
        await self.open()
        return await self.bind(resource)

    async def close(self) -> None:
        """A clean close: `</stream:stream>`, read to the server's, close the stream."""
        await self.send("</stream:stream>")
        try:
            while True:
                await self.receive()
        except StreamEnd:
            pass
        await self.stream.aclose()


def condition_of(error: Element) -> str:
    """The defined condition of a `<stream:error/>`."""
    return next(c.name for c in error.elements() if c.namespace == ns.STREAMS_ERRORS)


def mechanisms(features: Element) -> list[str]:
    """The SASL mechanisms offered in stream `features` (none: an empty list)."""
    offered = features.find(ns.SASL, "mechanisms")
    return [] if offered is None else [m.text for m in offered.elements()]


async def read_to_end(client: RawClient) -> list[Element]:
    """Every element until the server closes the stream or the connection."""
    received: list[Element] = []
    try:
        while True:
            received.append(await client.receive())
    except StreamEnd:
        return received
