"""A thin Redis connection for the cluster's hot path: RESP2 over one trio stream, replies
read by hiredis' `Reader` (the sans-I/O parser the Redis project maintains).

Why not coredis here: the relay (`gateway.core.relay`) makes one or two round trips per
batch of stanzas between nodes, and under moderate load batches are small, so the cost
per round trip is what counts. coredis spent about 240 µs of CPU per command on trio
(its request objects, retry policy, connection pool and anyio task group); this
connection spends about 50 µs (mostly the socket's send and receive), measured on the
same machine with the same `GET`. The rest of the cluster's Redis work (directory
scripts, stores, the reaper) stays on coredis: it is not per stanza.

A `RespConnection` is one connection, opened on first use and again after any failure;
commands are sent in order and their replies read in order, one caller at a time (a
lock). A failure of the connection (refused, reset, timed out, or a reply that cannot be
parsed) closes it and raises `StorageError`; whether Redis ran what was sent is then
unknown, as with any client. A command Redis refuses is a `ReplyError` in the replies of
`pipeline`, and a `StorageError` from `execute`.
"""

from __future__ import annotations

import ssl
import urllib.parse
from collections.abc import Sequence
from typing import Final

import hiredis
import trio

from gateway.errors import StorageError

#: Seconds a connection or a round trip may take before it fails (a blocking command
#: gets its own blocking time on top).
COMMAND_TIMEOUT: Final = 5.0

Arg = bytes | str | int
Command = Sequence[Arg]
ReplyError = hiredis.ReplyError


def pack(command: Command) -> bytes:
    """`command` in RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n" % len(data))
        parts.append(data)
        parts.append(b"\r\n")
    return b"".join(parts)


class RespConnection:
    """One connection to the Redis of `url` (`redis://[user:password@]host[:port][/db]`,
    `rediss://...` with TLS, `unix://[:password@]/path[?db=N]`), opened when first used.

    Raises:
        StorageError: (from the constructor) the URL cannot be used.
    """

    def __init__(self, url: str, *, timeout: float = COMMAND_TIMEOUT) -> None:
        try:
            parts = urllib.parse.urlsplit(url)
            self._scheme = parts.scheme.lower()
            if self._scheme == "unix":
                self._path = urllib.parse.unquote(parts.path)
                db = urllib.parse.parse_qs(parts.query).get("db", ["0"])[0]
            elif self._scheme in ("redis", "rediss"):
                self._host = parts.hostname or "localhost"
                self._port = parts.port or 6379
                db = parts.path.strip("/") or "0"
            else:
                raise ValueError(f"unknown scheme {self._scheme!r}")
            self._db = int(db)
        except ValueError as exc:
            raise StorageError(f"cannot use the Redis URL: {exc}") from None
        self._username = urllib.parse.unquote(parts.username) if parts.username else None
        self._password = urllib.parse.unquote(parts.password) if parts.password else None
        self._timeout = timeout
        self._stream: trio.abc.Stream | None = None
        self._reader = hiredis.Reader()
        self._lock = trio.Lock()

    async def execute(self, *command: Arg, block: float = 0.0) -> object:
        """Send one command and return its reply.

        Raises:
            StorageError: the connection failed, or Redis refused the command.
        """
        (reply,) = await self.pipeline([command], block=block)
        if isinstance(reply, ReplyError):
            raise StorageError(f"redis {command[0]!s}: {reply}")
        return reply

    async def pipeline(self, commands: Sequence[Command], *, block: float = 0.0) -> list[object]:
        """Send `commands` in one write and return their replies, in order (a command
        Redis refused is its `ReplyError`). `block`: seconds the last command may block
        in Redis (`XREADGROUP ... BLOCK`), added to the timeout.

        Raises:
            StorageError: the connection failed (what Redis ran is unknown).
        """
        async with self._lock:
            done = False
            try:
                with trio.fail_after(self._timeout + block):
                    if self._stream is None:
                        await self._open()
                    assert self._stream is not None
                    await self._stream.send_all(b"".join(pack(c) for c in commands))
                    replies = [await self._reply() for _ in commands]
                done = True
                return replies
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError) as exc:
                raise StorageError(f"redis connection: {str(exc) or type(exc).__name__}") from exc
            except hiredis.ProtocolError as exc:
                raise StorageError(f"redis connection: unreadable reply: {exc}") from exc
            finally:
                if not done:
                    # Cancelled or failed in the middle: what is on the wire is unknown.
                    await self._drop()

    async def aclose(self) -> None:
        async with self._lock:
            await self._drop()

    async def _reply(self) -> object:
        assert self._stream is not None
        while (reply := self._reader.gets()) is False:
            data = await self._stream.receive_some(65536)
            if not data:
                raise trio.BrokenResourceError("closed by redis")
            self._reader.feed(bytes(data))
        return reply

    async def _open(self) -> None:
        stream: trio.abc.Stream
        if self._scheme == "unix":
            stream = await trio.open_unix_socket(self._path)
        else:
            stream = await trio.open_tcp_stream(self._host, self._port)
            if self._scheme == "rediss":
                stream = trio.SSLStream(
                    stream, ssl.create_default_context(), server_hostname=self._host
                )
        self._stream = stream
        self._reader = hiredis.Reader()
        setup: list[Command] = []
        if self._password is not None:
            if self._username is not None:
                setup.append(("AUTH", self._username, self._password))
            else:
                setup.append(("AUTH", self._password))
        if self._db:
            setup.append(("SELECT", self._db))
        if setup:
            await stream.send_all(b"".join(pack(c) for c in setup))
            for command in setup:
                reply = await self._reply()
                if isinstance(reply, ReplyError):
                    # (The reply never quotes the password; the command's name only.)
                    raise trio.BrokenResourceError(f"{command[0]!s} refused: {reply}")

    async def _drop(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await trio.aclose_forcefully(stream)
