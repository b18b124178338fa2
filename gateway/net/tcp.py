"""TCP listener edge: the PROXY protocol unwrap (STYLE T2) and the prefix stream.

A listener with `proxy_protocol: true` serves only peers in `trusted_proxies`: anything
else is refused with one log line. From a trusted proxy it reads the PROXY v1/v2 header
under `PROXY_HEADER_TIMEOUT`, takes the real client address from it (a LOCAL header, as
HAProxy's health checks send, keeps the proxy's address), and replays the bytes that came
after the header through `PrefixStream`, so the XML stream parser sees them first.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Final

import structlog
import trio

from gateway.net.transport import RECEIVE_SIZE, PeerInfo
from gateway.xmpp.proxy_protocol import ProxyHeaderError, ProxyHeaderParser, is_trusted

log = structlog.get_logger(module=__name__)

PROXY_HEADER_TIMEOUT: Final = 5.0
#: Pending connections per listening socket (what trio's own listeners use: the most
#: the kernel allows, capped by net.core.somaxconn).
LISTEN_BACKLOG: Final = 65535

Networks = Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]


def peer_of(stream: trio.SocketStream) -> PeerInfo | None:
    """The TCP peer of an accepted stream (None if it is already gone)."""
    try:
        host, port, *_ = stream.socket.getpeername()
    except OSError:
        return None
    return PeerInfo(str(host), int(port))


def addresses(listeners: Sequence[trio.SocketListener]) -> list[str]:
    """'ip:port' / '[ip6]:port' of listening sockets, for the `listening` log line."""
    found = []
    for sock in listeners:
        host, port, *_ = sock.socket.getsockname()
        found.append(f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}")
    return found


async def open_listeners(
    ip: str,
    port: int,
    task_status: trio.TaskStatus[list[trio.SocketListener]],
    *,
    reuse_port: bool = False,
    **fields: object,
) -> list[trio.SocketListener]:
    """Bind a listener, report it started (nursery.start), and log one `listening` line.

    With `reuse_port` (several worker processes on the same port) the socket sets
    SO_REUSEPORT: the kernel spreads new connections over every process listening.
    """
    if not reuse_port:
        listeners = await trio.open_tcp_listeners(port, host=ip)
    else:
        listeners = await _open_shared_listeners(ip, port)
    task_status.started(listeners)
    log.info("listening", address=addresses(listeners), **fields)
    return listeners


async def _open_shared_listeners(ip: str, port: int) -> list[trio.SocketListener]:
    """`trio.open_tcp_listeners` with SO_REUSEPORT on each socket."""
    infos = await trio.socket.getaddrinfo(
        ip, port, type=trio.socket.SOCK_STREAM, flags=trio.socket.AI_PASSIVE
    )
    listeners = []
    try:
        for family, kind, proto, _name, address in infos:
            sock = trio.socket.socket(family, kind, proto)
            try:
                sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
                sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEPORT, 1)
                if family == trio.socket.AF_INET6:
                    sock.setsockopt(trio.socket.IPPROTO_IPV6, trio.socket.IPV6_V6ONLY, 1)
                await sock.bind(address)
                sock.listen(LISTEN_BACKLOG)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
        raise
    return listeners


class PrefixStream(trio.abc.Stream):
    """A stream that first returns `prefix`, then reads from `stream`."""

    def __init__(self, prefix: bytes, stream: trio.abc.Stream) -> None:
        self._prefix = prefix
        self.stream = stream

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            await trio.lowlevel.checkpoint()
            return data
        return bytes(await self.stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        send_eof = getattr(self.stream, "send_eof", None)
        if send_eof is None:
            raise trio.ClosedResourceError("the inner stream cannot half-close")
        await send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def unwrap_proxy(
    stream: trio.abc.Stream, tcp_peer: PeerInfo, trusted: Networks
) -> tuple[trio.abc.Stream, PeerInfo] | None:
    """Read a PROXY header from a trusted proxy; None (after a log line) when refused."""
    if not is_trusted(tcp_peer.ip, trusted):
        log.warning("proxy_refused", reason="peer is not in trusted_proxies", proxy=str(tcp_peer))
        return None
    parser = ProxyHeaderParser()
    info = None
    try:
        with trio.fail_after(PROXY_HEADER_TIMEOUT):
            while info is None:
                info = parser.feed(bytes(await stream.receive_some(RECEIVE_SIZE)))
    except ProxyHeaderError as exc:
        log.warning("proxy_refused", reason=str(exc), proxy=str(tcp_peer))
        return None
    except trio.TooSlowError:
        log.warning("proxy_refused", reason="no PROXY header in time", proxy=str(tcp_peer))
        return None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return None
    if info.command == "local" or info.source_ip is None or info.source_port is None:
        peer = PeerInfo(
            tcp_peer.ip, tcp_peer.port, secure=info.ssl, via_proxy=True, proxy_ip=tcp_peer.ip
        )
    else:
        peer = PeerInfo(
            info.source_ip,
            info.source_port,
            secure=info.ssl,
            via_proxy=True,
            proxy_ip=tcp_peer.ip,
        )
    remainder = parser.remainder
    return (PrefixStream(remainder, stream) if remainder else stream), peer
