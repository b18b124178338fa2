"""Sessions left for adoption in Redis, shared by a cluster's nodes: the Redis
`AdoptableStore` (DESIGN section 6).

Schema: `{prefix}adopt:{smid}`, a string per snapshot (its encoded bytes), with the
snapshot's `expires_at` as the key's expiry (`SET ... PXAT`, in milliseconds, rounded up
so that Redis never drops a snapshot before its time). Redis removes an expired key itself,
so memory stays bounded by the live snapshots without a sweep, and `take` is one `GETDEL`
(Redis >= 6.2): atomic, so two nodes never both get a snapshot.

Expiry is judged by the Redis server's clock. `put` also reads the node's clock: an
`expires_at` already past by it is a `DEL` of the smid (nothing is stored, and no older
snapshot stays behind), and one that is past only by the server's clock is a `SET` that
Redis drops at once, with the same result.

Every call is a trio checkpoint before it sends anything, so a call in a cancelled scope
does nothing. A call cancelled while it waits for Redis may still take effect (Redis runs
what it received); only its answer is lost, which for `take` loses the snapshot. Every
command goes through `redis_client.command`, so a Redis that is down or refuses a command
is `StorageError`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import trio

from gateway.storage.redis_client import Redis, command


class RedisAdoptableStore:
    """Encoded session snapshots by SM id in Redis, a key per snapshot that expires with
    it; an `AdoptableStore`.

    Args:
        redis: a client from `redis_client.open_redis`, used only while it is open.
        prefix: the start of every key of the store.
        clock: wall-clock UNIX seconds (`time.time`), to tell a put already past.
    """

    __slots__ = ("_clock", "_prefix", "_redis")

    def __init__(
        self, redis: Redis, *, prefix: str = "xg:", clock: Callable[[], float] = time.time
    ) -> None:
        self._redis = redis
        self._prefix = f"{prefix}adopt:"
        self._clock = clock

    async def put(self, smid: str, snapshot: bytes, expires_at: float) -> None:
        """Store the snapshot until `expires_at` (one `SET ... PXAT`), replacing any with
        the same smid; an `expires_at` already past deletes the smid's snapshot instead."""
        await trio.lowlevel.checkpoint()
        key = self._prefix + smid
        if expires_at <= self._clock():
            await command(self._redis.delete([key]), "adoptable put")
            return
        await command(
            self._redis.set(key, bytes(snapshot), pxat=math.ceil(expires_at * 1000)),
            "adoptable put",
        )

    async def take(self, smid: str) -> bytes | None:
        """Remove and return the snapshot of `smid` (one `GETDEL`); None when there is none
        or it expired."""
        await trio.lowlevel.checkpoint()
        return await command(self._redis.getdel(self._prefix + smid), "adoptable take")
