"""A scripted XMPP-over-WebSocket client (RFC 7395) on a trio-websocket connection.

Like `RawClient` for TCP: it sends text frames as given and reads each server frame
through the gateway's own `WebSocketFraming`, so answers compare as Elements.
"""

from __future__ import annotations

import base64
from typing import Final

from trio_websocket import WebSocketConnection

from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from gateway.xmpp.framing import WebSocketFraming
from gateway.xmpp.parser import ElementReceived, StreamClosed, StreamOpened
from tests.helpers.accounts import PASSWORD
from tests.helpers.client import mechanisms

FRAMING: Final = "urn:ietf:params:xml:ns:xmpp-framing"
OPEN: Final = f"<open xmlns='{FRAMING}' to='localhost' version='1.0'/>"


class WsClient:
    """An XMPP client on an open WebSocket (subprotocol "xmpp")."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.framing = WebSocketFraming(max_stanza_size=10_000_000, max_depth=64)

    async def send(self, text: str) -> None:
        """Send `text` as one text frame."""
        await self.ws.send_message(text)

    async def receive(self) -> Element | str:
        """The next element, or "open"/"close" for the framing elements."""
        events = self.framing.receive_message(str(await self.ws.get_message()))
        event = events[0]
        if isinstance(event, StreamOpened):
            return "open"
        if isinstance(event, StreamClosed):
            return "close"
        assert isinstance(event, ElementReceived)
        return event.element

    async def element(self) -> Element:
        """The next frame, which must be an element (not `<open/>` or `<close/>`)."""
        got = await self.receive()
        assert isinstance(got, Element), got
        return got

    async def login(self, user: str, resource: str) -> None:
        """Open, authenticate `user` (PASSWORD) with PLAIN, reopen and bind `resource`."""
        await self.send(OPEN)
        assert await self.receive() == "open"
        features = await self.element()
        assert "PLAIN" in mechanisms(features)
        assert features.find(ns.TLS, "starttls") is None  # RFC 7395 3.9
        plain = base64.b64encode(f"\0{user}\0{PASSWORD}".encode()).decode()
        await self.send(f"<auth xmlns='{ns.SASL}' mechanism='PLAIN'>{plain}</auth>")
        assert (await self.element()).name == "success"
        await self.send(OPEN)  # RFC 7395 3.7: the restart is a new <open/>
        assert await self.receive() == "open"
        await self.element()  # features
        await self.send(
            f"<iq xmlns='jabber:client' type='set' id='b'><bind xmlns='{ns.BIND}'>"
            f"<resource>{resource}</resource></bind></iq>"
        )
        assert (await self.element()).get("type") == "result"
