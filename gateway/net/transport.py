"""The transport a connection task reads and writes (STYLE T1).

Nothing inspects sockets for identity: the peer's address is in `PeerInfo`, filled in by
the listener (behind a trusted proxy, from the PROXY header or the forwarded headers).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, replace
from typing import Protocol

import trio

RECEIVE_SIZE = 65536


@dataclass(frozen=True, slots=True)
class PeerInfo:
    ip: str
    port: int
    secure: bool = False
    via_proxy: bool = False
    proxy_ip: str | None = None

    def __str__(self) -> str:
        address = f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"
        return f"{address} via {self.proxy_ip}" if self.via_proxy else address


class Transport(Protocol):
    peer: PeerInfo
    kind: str

    async def receive(self) -> bytes:
        """The next bytes; b"" at end of stream."""
        ...

    async def send(self, data: bytes) -> None: ...

    async def start_tls(self, context: ssl.SSLContext) -> None: ...

    async def aclose(self) -> None: ...


class StreamTransport:
    """A byte stream (TCP, or anything trio.abc.Stream) as a Transport."""

    kind = "tcp"

    def __init__(self, stream: trio.abc.Stream, peer: PeerInfo) -> None:
        self.stream = stream
        self.peer = peer

    async def receive(self) -> bytes:
        return bytes(await self.stream.receive_some(RECEIVE_SIZE))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def start_tls(self, context: ssl.SSLContext) -> None:
        """Wrap the stream in TLS and handshake (the caller sets the deadline)."""
        tls = trio.SSLStream(self.stream, context, server_side=True)
        try:
            await tls.do_handshake()
        except BaseException:
            release_tls(tls)
            raise
        self.stream = tls
        self.peer = replace(self.peer, secure=True)

    async def aclose(self) -> None:
        try:
            await trio.aclose_forcefully(self.stream)
        finally:
            release_tls(self.stream)


def release_tls(stream: trio.abc.Stream) -> None:
    """Let a TLS stream that is done with be freed by reference counting.

    COMPAT trio (up to 0.35 at least): an `SSLStream` keeps a bound method of itself (its
    handshake guard), so every TLS connection is a reference cycle that holds its
    buffers, some 60 KB, until a full cyclic collection: thousands of short TLS
    connections (a flood) piled up hundreds of MB. Dropping that attribute once the
    stream is closed or failed breaks the cycle; a later trio without it makes this a
    no-op.
    """
    if isinstance(stream, trio.SSLStream):
        vars(stream).pop("_handshook", None)
