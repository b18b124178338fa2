"""A WebSocket listener outlives clients that reset during the upgrade (loopback TCP).

trio-websocket accepts the upgrade in a nursery of its own, so a reset while it does
arrives as an ExceptionGroup; one escaping the listener's handler ended serve_listeners
and with it the whole gateway."""

from __future__ import annotations

import socket
import ssl
import struct

import trio

from gateway.config import GatewayConfig, WebSocketListenerConfig
from gateway.net.limits import ConnectionGate
from gateway.net.websocket import serve_websocket
from gateway.net.wire import Wire

REQUEST = (
    b"GET /xmpp-websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: xmpp\r\n\r\n"
)


class Host:
    """The listener's host: what `serve_websocket` asks of the server."""

    def __init__(self) -> None:
        self.config = GatewayConfig()
        self.ssl_context: ssl.SSLContext | None = None
        self.gate = ConnectionGate()
        self.draining = False


async def test_resets_during_the_upgrade_leave_the_listener_serving() -> None:
    served = 0

    async def serve(wire: Wire) -> None:
        nonlocal served
        served += 1
        await trio.sleep(0.1)

    with trio.fail_after(30):
        async with trio.open_nursery() as handlers, trio.open_nursery() as listening:
            listener = WebSocketListenerConfig(ip="127.0.0.1", port=0)
            sockets = await listening.start(serve_websocket, Host(), listener, handlers, serve)
            port = sockets[0].socket.getsockname()[1]
            for _ in range(200):
                sock = trio.socket.socket()
                await sock.connect(("127.0.0.1", port))
                # SO_LINGER 0: close() resets the connection instead of closing it.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                await sock.send(REQUEST)
                sock.close()
            await trio.sleep(1)
            # Still listening: a well-behaved client is upgraded.
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(REQUEST)
            answer = await stream.receive_some()
            assert answer.startswith(b"HTTP/1.1 101 "), answer[:100]
            await stream.aclose()
            listening.cancel_scope.cancel()
            handlers.cancel_scope.cancel()
