"""The Redis client of a cluster (DESIGN section 6): coredis, running on trio.

coredis runs its connection pool in a task group of its own (anyio on trio), so a client
is used only inside `open_redis`, opened by whoever owns the nursery it lives in (the app,
a test). Connections are made lazily: opening never waits for Redis, and a Redis that is
down shows as `StorageError` from the first command, which the callers turn into clear
refusals (never a traceback).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Final, TypeVar

import coredis
import coredis.exceptions
from coredis.commands.script import Script

from gateway.errors import StorageError

T = TypeVar("T")

#: Seconds a command may wait for a connection or an answer before it fails.
COMMAND_TIMEOUT: Final = 5.0
#: The errors a Redis command raises when the server is unreachable or refuses it.
REDIS_ERRORS: Final = (coredis.exceptions.RedisError, OSError, TimeoutError)

Redis = coredis.Redis[bytes]
__all__ = ["REDIS_ERRORS", "Redis", "Script", "command", "open_redis", "preload"]


@contextlib.asynccontextmanager
async def open_redis(url: str) -> AsyncIterator[Redis]:
    """A client for `url` (`redis://host:port/db`, `unix:///path`), closed on exit.

    Raises:
        StorageError: the URL cannot be used.
    """
    try:
        client = coredis.Redis.from_url(
            url,
            decode_responses=False,
            stream_timeout=COMMAND_TIMEOUT,
            connect_timeout=COMMAND_TIMEOUT,
        )
    except (ValueError, coredis.exceptions.RedisError) as exc:
        raise StorageError(f"cannot use the Redis URL {url!r}: {exc}") from exc
    try:
        async with client:
            yield client
    except BaseExceptionGroup as group:
        # coredis runs its connections in a task group of its own, which wraps whatever
        # our code inside the block raised. A group of one (our exception) is given back
        # as itself, so callers see the StorageError or ConfigError they would see
        # without a cluster; a group of several is a real concurrent failure and stays.
        if len(group.exceptions) == 1 and not isinstance(group.exceptions[0], BaseExceptionGroup):
            raise group.exceptions[0] from None
        raise


async def command(result: Awaitable[T], what: str) -> T:
    """Await one Redis command; its failures become `StorageError` naming `what`."""
    try:
        return await result
    except REDIS_ERRORS as exc:
        raise StorageError(f"redis {what}: {exc}") from exc


async def preload(redis: Redis, scripts: Iterable[Script[bytes]]) -> None:
    """Load `scripts` into Redis' script cache (`SCRIPT LOAD`, idempotent), so that their
    first uses do not each fail with NOSCRIPT and load them again: a reconnect storm on a
    node whose scripts Redis had not seen yet made a `SCRIPT LOAD` per concurrent caller.

    Raises:
        StorageError: Redis refused or could not be reached.
    """
    for script in scripts:
        await command(redis.script_load(script.script), "script load")
