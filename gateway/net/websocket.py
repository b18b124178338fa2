"""WebSocket listeners (RFC 7395) with trio-websocket, and the health endpoint (STYLE T3).

Each accepted TCP connection's HTTP request head is read first (bounded in size and time):
`GET /healthz` is answered here (200 while serving, 503 while draining, for load
balancers); another path than the listener's gets 404; anything else is replayed into
trio-websocket's handshake. The handshake requires the `xmpp` subprotocol (RFC 7395
section 3.1). Behind a trusted proxy the client address comes from `Forwarded` or
`X-Forwarded-For`, walked right to left past trusted hops; from anyone else those headers
are ignored.
"""

from __future__ import annotations

import contextlib
import ipaddress
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Protocol

import structlog
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from gateway.config import GatewayConfig, TlsMode, WebSocketListenerConfig
from gateway.net.limits import ConnectionGate
from gateway.net.tcp import PrefixStream, open_listeners, peer_of
from gateway.net.transport import PeerInfo, release_tls
from gateway.net.wire import MessageWire, Wire
from gateway.xmpp.framing import WebSocketFraming
from gateway.xmpp.proxy_protocol import is_trusted

log = structlog.get_logger(module=__name__)

MAX_REQUEST_HEAD: Final = 8192
REQUEST_HEAD_TIMEOUT: Final = 10.0
SUBPROTOCOL: Final = "xmpp"
# Bounded, small: a full queue stops reading from the socket (backpressure).
MESSAGE_QUEUE_SIZE: Final = 4

Networks = Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
#: Serves one client's XMPP stream on a wire (the core's connection task, wired by app).
ServeWire = Callable[[Wire], Awaitable[None]]


class WebSocketHost(Protocol):
    """What the WebSocket listener needs of the server it belongs to."""

    config: GatewayConfig
    ssl_context: ssl.SSLContext | None
    gate: ConnectionGate
    draining: bool
    unhealthy: str | None


async def read_request_head(stream: trio.abc.Stream) -> bytes | None:
    """The bytes up to the end of the HTTP request head (what follows is kept too)."""
    data = b""
    with trio.move_on_after(REQUEST_HEAD_TIMEOUT):
        while b"\r\n\r\n" not in data:
            if len(data) > MAX_REQUEST_HEAD:
                return None
            chunk = bytes(await stream.receive_some(4096))
            if not chunk:
                return None
            data += chunk
        return data
    return None


def parse_head(data: bytes) -> tuple[str, str, dict[str, str]] | None:
    """(method, path, lower-cased headers) of an HTTP/1.1 request head, or None."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            return None
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return parts[0], parts[1], headers


def client_address(
    tcp_peer: PeerInfo,
    headers: dict[str, str],
    trusted: Networks,
    header: str = "x-forwarded-for",
) -> PeerInfo:
    """The real client behind trusted proxies, from the one configured header
    (`forwarded_header`: X-Forwarded-For, or RFC 7239 Forwarded); the other is ignored."""
    if not is_trusted(tcp_peer.ip, trusted):
        return tcp_peer
    hops: list[str] = []
    if header == "forwarded" and "forwarded" in headers:
        for element in headers["forwarded"].split(","):
            for pair in element.split(";"):
                key, _, value = pair.strip().partition("=")
                if key.lower() == "for":
                    hops.append(_strip_node(value.strip().strip('"')))
    elif header == "x-forwarded-for" and "x-forwarded-for" in headers:
        hops = [h.strip() for h in headers["x-forwarded-for"].split(",") if h.strip()]
    client = None
    for hop in reversed(hops):  # right to left: the nearest hop first
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break  # an obfuscated or garbled hop: stop believing what lies beyond
        client = hop
        if not is_trusted(hop, trusted):
            break
    if client is None:
        return tcp_peer
    secure = headers.get("x-forwarded-proto", "").split(",")[0].strip().lower() == "https"
    return PeerInfo(client, 0, secure=secure, via_proxy=True, proxy_ip=tcp_peer.ip)


def _strip_node(node: str) -> str:
    """RFC 7239 node: "[v6]:port", "v4:port" or an address."""
    if node.startswith("["):
        return node[1:].split("]", 1)[0]
    if node.count(":") == 1:
        return node.split(":", 1)[0]
    return node


def _http_response(status: str, body: bytes, *, head: bool = False) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + (b"" if head else body)


async def serve_websocket(
    ctx: WebSocketHost,
    listener: WebSocketListenerConfig,
    handler_nursery: trio.Nursery,
    serve: ServeWire,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept WebSocket (and health check) connections on one listener until cancelled."""
    listeners = await open_listeners(
        listener.ip,
        listener.port,
        task_status,
        reuse_port=ctx.config.general.workers > 1,
        kind="websocket",
        path=listener.path,
        tls=listener.tls.value,
    )

    async def handle(stream: trio.SocketStream) -> None:
        with ctx.gate.admit() as admitted:
            if admitted:
                await handle_admitted(stream)
            else:
                await trio.aclose_forcefully(stream)

    async def handle_admitted(stream: trio.SocketStream) -> None:
        tcp_peer = peer_of(stream)
        if tcp_peer is None:
            await trio.aclose_forcefully(stream)
            return
        inner: trio.abc.Stream = stream
        try:
            if listener.tls is TlsMode.DIRECT:
                assert ctx.ssl_context is not None
                tls = trio.SSLStream(stream, ctx.ssl_context, server_side=True)
                inner = tls  # closed (and released) below, also after a failed handshake
                with trio.fail_after(REQUEST_HEAD_TIMEOUT):
                    await tls.do_handshake()
                tcp_peer = PeerInfo(tcp_peer.ip, tcp_peer.port, secure=True)
            raw = await read_request_head(inner)
            parsed = parse_head(raw) if raw is not None else None
            if raw is None or parsed is None:
                await inner.send_all(_http_response("400 Bad Request", b"bad request\n"))
                return
            method, target, headers = parsed
            path = target.split("?", 1)[0]
            if path == "/healthz" and "upgrade" not in headers:
                if ctx.draining:
                    status, body = "503 Service Unavailable", b"draining\n"
                elif ctx.unhealthy is not None:
                    status, body = "503 Service Unavailable", f"{ctx.unhealthy}\n".encode()
                else:
                    status, body = "200 OK", b"ok\n"
                # HEAD gets the headers only (RFC 9110 9.3.2).
                await inner.send_all(_http_response(status, body, head=method == "HEAD"))
                return
            if path != listener.path:
                await inner.send_all(_http_response("404 Not Found", b"not found\n"))
                return
            try:
                await _serve_upgrade(
                    ctx, listener, PrefixStream(raw, inner), tcp_peer, headers, serve
                )
            except* (
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                trio.TooSlowError,
                OSError,
                ConnectionClosed,
            ):
                # The handshake runs in trio-websocket's nursery, so a peer that goes away
                # during it (a reset while accepting) arrives in an ExceptionGroup.
                log.info("websocket_handshake_lost")
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.TooSlowError,
            OSError,
            ConnectionClosed,
        ):
            # A peer that went away during the handshake: nothing to answer. (Anything
            # escaping here would end serve_listeners, and the whole gateway with it.)
            pass
        finally:
            with trio.move_on_after(1, shield=True):
                await trio.aclose_forcefully(inner)
            release_tls(inner)

    await trio.serve_listeners(handle, listeners, handler_nursery=handler_nursery)


async def _serve_upgrade(
    ctx: WebSocketHost,
    listener: WebSocketListenerConfig,
    stream: trio.abc.Stream,
    tcp_peer: PeerInfo,
    headers: dict[str, str],
    serve: ServeWire,
) -> None:
    general = ctx.config.general
    async with trio.open_nursery() as ws_nursery:
        request = await wrap_server_stream(
            ws_nursery,
            stream,
            message_queue_size=MESSAGE_QUEUE_SIZE,
            # Frames past this close the socket with 1009; smaller oversized stanzas get
            # the stream error policy-violation from the framing.
            max_message_size=general.max_stanza_size + 1024,
        )
        if SUBPROTOCOL not in request.proposed_subprotocols:
            # RFC 7395 section 3.1: the xmpp subprotocol is required. The library's reader
            # task would wait for the client to leave: end it, and with it the socket.
            log.info("websocket_rejected", reason="no xmpp subprotocol")
            with trio.move_on_after(REQUEST_HEAD_TIMEOUT), contextlib.suppress(ConnectionClosed):
                # (The client may be gone already: nothing to tell it then.)
                await request.reject(400, body=b"the xmpp WebSocket subprotocol is required\n")
            ws_nursery.cancel_scope.cancel()
            return
        ws = await request.accept(subprotocol=SUBPROTOCOL)
        if listener.ping_interval:
            ws_nursery.start_soon(_keepalive, ws, stream, listener.ping_interval)
        peer = client_address(
            tcp_peer, headers, ctx.config.trusted_proxies, ctx.config.forwarded_header
        )
        # Until SASL succeeds only the small pre-authentication limit applies.
        framing = WebSocketFraming(
            max_stanza_size=general.pre_auth_max_stanza_size, max_depth=general.max_depth
        )
        await serve(MessageWire(ws, peer, framing))
        ws_nursery.cancel_scope.cancel()


async def _keepalive(ws: WebSocketConnection, stream: trio.abc.Stream, interval: float) -> None:
    """WebSocket ping/pong: a peer that stops answering is gone (the read side then sees
    the close and a resumable session parks)."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            await trio.sleep(interval)
            with trio.move_on_after(interval) as scope:
                await ws.ping()
            if scope.cancelled_caught:
                log.info("websocket_ping_timeout")
                with trio.move_on_after(interval):  # the peer may not answer the close either
                    await ws.aclose(code=1001, reason="ping timeout")
                await trio.aclose_forcefully(stream)
                return
