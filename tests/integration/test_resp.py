"""`RespConnection` against a real redis-server: replies in order, refusals as replies,
authentication and databases, a Unix socket, and every failure of the connection as
`StorageError` after which the next call connects again."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

from gateway.errors import StorageError
from gateway.storage.resp import ReplyError, RespConnection, pack
from tests.helpers.redis import RedisServer, free_port


def test_pack_writes_bulk_strings() -> None:
    assert pack(("SET", b"k\r\n", 5)) == b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$1\r\n5\r\n"


async def test_replies_come_in_order_with_a_refusal_as_its_reply(redis_url: str) -> None:
    connection = RespConnection(redis_url)
    try:
        replies = await connection.pipeline(
            [("SET", "k", b"\x00\xff"), ("GET", "k"), ("INCR", "k"), ("GET", "missing")]
        )
        assert replies[:2] == [b"OK", b"\x00\xff"]
        assert isinstance(replies[2], ReplyError)
        assert replies[3] is None
        assert await connection.execute("RPUSH", "list", "a", "b") == 2
        assert await connection.execute("LRANGE", "list", 0, -1) == [b"a", b"b"]
        with pytest.raises(StorageError, match=r"redis INCR: .*not an integer"):
            await connection.execute("INCR", "k")
        assert await connection.execute("PING") == b"PONG"  # still usable
    finally:
        await connection.aclose()


async def test_a_user_with_a_password_and_a_database_number_are_used(
    redis_url: str, redis_server: RedisServer
) -> None:
    redis_server.cli("acl", "setuser", "relay", "on", ">s3cr/t", "~*", "&*", "+@all")
    port = redis_server.port
    connection = RespConnection(f"redis://relay:s3cr%2Ft@127.0.0.1:{port}/3")
    try:
        await connection.execute("SET", "in-three", "yes")
        assert redis_server.cli("-n", "3", "get", "in-three") == "yes"
        assert await connection.execute("ACL", "WHOAMI") == b"relay"
    finally:
        await connection.aclose()
        redis_server.cli("-n", "3", "flushdb")
    wrong = RespConnection(f"redis://relay:wrong@127.0.0.1:{port}/0")
    with pytest.raises(StorageError, match="AUTH refused") as refused:
        await wrong.execute("PING")
    assert "wrong" not in str(refused.value)  # never the password


@pytest.fixture
def unix_redis(tmp_path: Path) -> Iterator[Path]:
    binary = shutil.which("redis-server")
    assert binary is not None
    socket_path = tmp_path / "redis.sock"
    process = subprocess.Popen(
        [
            binary,
            "--port",
            "0",
            "--unixsocket",
            str(socket_path),
            "--save",
            "",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield socket_path
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_a_unix_socket_url_with_a_database(unix_redis: Path) -> None:
    connection = RespConnection(f"unix://{unix_redis}?db=2")
    try:
        await connection.execute("SET", "k", "v")
        assert await connection.execute("GET", "k") == b"v"
        assert await connection.execute("CLIENT", "INFO") is not None
        info = await connection.execute("CLIENT", "INFO")
        assert isinstance(info, bytes) and b" db=2 " in info
    finally:
        await connection.aclose()


async def test_nothing_listening_is_a_storage_error_at_once() -> None:
    connection = RespConnection(f"redis://127.0.0.1:{free_port()}/0")
    with trio.fail_after(5), pytest.raises(StorageError, match="redis connection"):
        await connection.execute("PING")


async def test_a_server_that_never_answers_is_a_storage_error_after_the_timeout(
    nursery: trio.Nursery,
) -> None:
    held: list[trio.SocketStream] = []

    async def mute(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, mute, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    connection = RespConnection(f"redis://127.0.0.1:{port}/0", timeout=0.3)
    with trio.fail_after(5), pytest.raises(StorageError, match="TooSlowError"):
        await connection.execute("PING")


async def test_after_the_connection_is_killed_the_next_call_connects_again(
    redis_url: str, redis_server: RedisServer
) -> None:
    connection = RespConnection(redis_url)
    try:
        await connection.execute("CLIENT", "SETNAME", "victim")
        redis_server.cli("client", "kill", "skipme", "yes", "type", "normal")
        with pytest.raises(StorageError, match="redis connection"):
            await connection.execute("PING")
        assert await connection.execute("PING") == b"PONG"
    finally:
        await connection.aclose()


async def test_a_call_cancelled_midway_leaves_no_reply_behind_for_the_next(
    redis_url: str,
) -> None:
    connection = RespConnection(redis_url)
    try:
        with trio.move_on_after(0.2):
            # Blocks in Redis for a second: cancelled while waiting for its reply.
            await connection.execute("BLPOP", "nothing", 1, block=1)
        # The next call does not read the cancelled call's late reply as its own.
        await connection.execute("SET", "k", "v")
        assert await connection.execute("GET", "k") == b"v"
    finally:
        await connection.aclose()


def test_an_unusable_url_is_a_storage_error() -> None:
    with pytest.raises(StorageError, match="cannot use the Redis URL"):
        RespConnection("redis://127.0.0.1:notaport/0")
    with pytest.raises(StorageError, match="cannot use the Redis URL"):
        RespConnection("http://127.0.0.1/0")
