"""WebSocket listeners (RFC 7395): login, chat with a TCP client, resume across transports,
the health endpoint, and the errors for malformed WebSocket traffic."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator

import pytest
import trio
from structlog.testing import capture_logs
from trio_websocket import ConnectionClosed, open_websocket_url
from trio_websocket import HandshakeError as WsHandshakeError

from gateway.core.context import ServerContext
from gateway.xmpp import namespaces as ns
from tests.helpers.accounts import PASSWORD
from tests.helpers.inprocess import GatewayFactory
from tests.helpers.websocket import FRAMING, OPEN, WsClient

WS = {
    "listen": {
        "c2s": [{"ip": "127.0.0.1", "port": 0, "tls": "none"}],
        "websocket": [{"ip": "127.0.0.1", "port": 0, "path": "/xmpp-websocket"}],
    }
}


@contextlib.asynccontextmanager
async def _ws(
    ctx: ServerContext, *, subprotocols: list[str] | None = None
) -> AsyncIterator[WsClient]:
    """A WsClient on the gateway's first WebSocket listener (the server must agree to
    the "xmpp" subprotocol)."""
    url = f"ws://127.0.0.1:{ctx.websocket_ports[0]}/xmpp-websocket"
    async with open_websocket_url(url, subprotocols=subprotocols or ["xmpp"]) as ws:
        assert ws.subprotocol == "xmpp"
        yield WsClient(ws)


async def test_websocket_client_logs_in_and_chats_with_a_tcp_client(
    gateway_factory: GatewayFactory,
) -> None:
    with trio.fail_after(10):
        ctx, connect = await gateway_factory(**WS)
        tcp = await connect(0)
        await tcp.login("bob", PASSWORD, mechanism="PLAIN", resource="desk")
        async with _ws(ctx) as browser:
            await browser.login("alice", "browser")
            await browser.send(
                "<message xmlns='jabber:client' to='bob@localhost/desk' type='chat'>"
                "<body>from the web</body></message>"
            )
            msg = await tcp.expect(ns.CLIENT, "message")
            assert msg.get("from") == "alice@localhost/browser"
            await tcp.send(
                "<message to='alice@localhost/browser' type='chat'><body>hi web</body></message>"
            )
            back = await browser.element()
            assert back.find_text(ns.CLIENT, "body") == "hi web"
            await browser.send(f"<close xmlns='{FRAMING}'/>")
            assert await browser.receive() == "close"


async def test_session_resumes_from_websocket_to_tcp_and_back(
    gateway_factory: GatewayFactory,
) -> None:
    with trio.fail_after(15):
        ctx, connect = await gateway_factory(**WS)
        bob = await connect(0)
        await bob.login("bob", PASSWORD, mechanism="PLAIN", resource="desk")
        smid = ""
        async with _ws(ctx) as browser:
            await browser.login("alice", "phone")
            await browser.send(f"<enable xmlns='{ns.SM}' resume='true'/>")
            smid = (await browser.element()).get("id") or ""
            await bob.send(
                "<message to='alice@localhost/phone' type='chat'><body>m1</body></message>"
            )
            assert (await browser.element()).find_text(ns.CLIENT, "body") == "m1"
            await trio.aclose_forcefully(browser.ws._stream)  # the network is gone, no close
        await bob.send("<message to='alice@localhost/phone' type='chat'><body>m2</body></message>")
        # Resume over TCP with h=0: m1 and m2 come again (m1 was never acked).
        tcp = await connect(0)
        await tcp.open()
        assert (await tcp.auth("alice", PASSWORD, "PLAIN")).name == "success"
        tcp.parser.reset()
        await tcp.open()
        await tcp.send(f"<resume xmlns='{ns.SM}' previd='{smid}' h='0'/>")
        assert (await tcp.expect(ns.SM, "resumed")).get("previd") == smid
        bodies: list[str | None] = []
        while len(bodies) < 2:
            element = await tcp.receive()
            if element.name == "message":
                bodies.append(element.find_text(ns.CLIENT, "body"))
        assert bodies == ["m1", "m2"]
        await tcp.send(f"<a xmlns='{ns.SM}' h='2'/>")
        await trio.aclose_forcefully(tcp.stream)
        # ...and back to WebSocket.
        async with _ws(ctx) as browser:
            await browser.send(OPEN)
            assert await browser.receive() == "open"
            await browser.element()
            plain = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
            await browser.send(f"<auth xmlns='{ns.SASL}' mechanism='PLAIN'>{plain}</auth>")
            assert (await browser.element()).name == "success"
            await browser.send(OPEN)
            assert await browser.receive() == "open"
            await browser.element()
            await browser.send(f"<resume xmlns='{ns.SM}' previd='{smid}' h='2'/>")
            assert (await browser.element()).name == "resumed"


async def test_health_endpoint_answers_load_balancers(gateway_factory: GatewayFactory) -> None:
    with trio.fail_after(10):
        ctx, _ = await gateway_factory(**WS)
        for draining, status in ((False, b"200"), (True, b"503")):
            ctx.draining = draining
            stream = await trio.open_tcp_stream("127.0.0.1", ctx.websocket_ports[0])
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            response = b""
            while chunk := await stream.receive_some():
                response += chunk
            assert response.split(b" ")[1] == status
        ctx.draining = False


async def test_handshake_without_the_xmpp_subprotocol_is_refused(
    gateway_factory: GatewayFactory,
) -> None:
    with trio.fail_after(10):
        ctx, _ = await gateway_factory(**WS)
        url = f"ws://127.0.0.1:{ctx.websocket_ports[0]}/xmpp-websocket"
        with pytest.raises(WsHandshakeError):
            async with open_websocket_url(url, subprotocols=["chat"]):
                pass


@pytest.mark.parametrize(
    ("message", "condition"),
    [
        (b"<message xmlns='jabber:client'/>", "bad-format"),  # a binary frame
        ("<message xmlns='jabber:client'/><message xmlns='jabber:client'/>", "not-well-formed"),
        ("x" * 300_000, "policy-violation"),
    ],
    ids=["binary-frame", "two-stanzas-in-one-frame", "oversized"],
)
async def test_malformed_websocket_traffic_gets_rfc7395_errors(
    gateway_factory: GatewayFactory, message: str | bytes, condition: str
) -> None:
    with trio.fail_after(10):
        ctx, _ = await gateway_factory(**WS)
        async with _ws(ctx) as browser:
            await browser.send(OPEN)
            assert await browser.receive() == "open"
            await browser.element()
            await browser.ws.send_message(message)
            try:
                error = await browser.element()
            except ConnectionClosed:
                assert condition == "policy-violation"  # beyond the frame limit: 1009
                return
            assert error.tag == (ns.STREAM, "error")
            assert error.elements().__next__().name == condition
            assert await browser.receive() == "close"


# -- a WebSocket peer that vanishes while the gateway writes (found by review) -----------------


async def test_a_websocket_client_gone_before_the_stream_error_is_written_harms_no_one(
    gateway_factory: GatewayFactory,
) -> None:
    with capture_logs() as logs:
        ctx, _connect = await gateway_factory(**WS)
        url = f"ws://127.0.0.1:{ctx.websocket_ports[0]}/xmpp-websocket"
        with trio.fail_after(20):
            for _ in range(20):
                # host-unknown is written while the client is already closing.
                async with open_websocket_url(url, subprotocols=["xmpp"]) as ws:
                    await ws.send_message(
                        f"<open xmlns='{FRAMING}' to='nowhere.invalid' version='1.0'/>"
                    )
            async with open_websocket_url(url, subprotocols=["xmpp"]) as ws:
                client = WsClient(ws)
                await client.login("alice", "after")  # the listener still serves
    assert [e for e in logs if e["event"] in ("internal_error", "session_end_failed")] == []


async def test_a_websocket_client_gone_while_messages_are_written_to_it_harms_no_one(
    gateway_factory: GatewayFactory,
) -> None:
    with capture_logs() as logs:
        ctx, connect = await gateway_factory(**WS)
        bob = await connect(0)
        await bob.login("bob", PASSWORD, mechanism="PLAIN", resource="desk")
        url = f"ws://127.0.0.1:{ctx.websocket_ports[0]}/xmpp-websocket"
        with trio.fail_after(30):
            for round_ in range(10):
                async with open_websocket_url(url, subprotocols=["xmpp"]) as ws:
                    await WsClient(ws).login("alice", f"web{round_}")
                    await bob.send(
                        "".join(
                            f"<message to='alice@localhost/web{round_}' type='chat'>"
                            f"<body>{n}</body></message>"
                            for n in range(200)
                        )
                    )
                    await trio.sleep(0.001 * round_)
            async with open_websocket_url(url, subprotocols=["xmpp"]) as ws:
                await WsClient(ws).login("alice", "after")
    assert [e for e in logs if e["event"] in ("internal_error", "session_end_failed")] == []
