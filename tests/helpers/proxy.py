"""`CutProxy`: a TCP relay on asyncio that loses the network on demand.

It sits between a slixmpp client and the gateway subprocess; `cut()` resets both sides of
every relayed connection at once: no `</stream:stream>`, no TLS close_notify, just an RST
each way, the way a phone that loses its network looks to a server (STARTTLS passes
through the relay unchanged).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct


class CutProxy:
    """A TCP relay to `target_port` whose `cut()` resets every relayed connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.server: asyncio.Server | None = None
        self.pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0

    async def start(self) -> None:
        """Listen on a free loopback port (then in `port`)."""
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Relay one accepted connection to `target_port` (counted in `accepted`)."""
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.pairs.append((writer, up_writer))
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    @staticmethod
    async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Copy `source` to `sink` until EOF or an error."""
        with contextlib.suppress(OSError, ConnectionError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
            sink.close()

    def cut(self) -> None:
        """Reset both sides of every relayed connection (SO_LINGER 0: an RST, no FIN)."""
        pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for writer in pair:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                writer.transport.abort()

    async def close(self) -> None:
        """`cut()`, stop listening and stop the relaying tasks."""
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for task in list(self.tasks):
            task.cancel()
