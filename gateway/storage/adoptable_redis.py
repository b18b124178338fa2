"""Sessions left for adoption in Redis, shared by a cluster's nodes: the Redis
`AdoptableStore` (DESIGN section 6).

Schema: `{prefix}adopt:{smid}`, a string per snapshot (its encoded bytes), and
`{prefix}adoptable`, a sorted set of the smids scored by their `expires_at`. Expiry is
judged by the node's clock, passed to each script: `take` of an expired snapshot leaves
it for `take_expired`, which the cluster's sweep calls to end such sessions properly
(their unacknowledged messages are rerouted, not dropped with the snapshot). Each key
also carries a Redis expiry `KEEP_AFTER` past `expires_at` (`SET ... PXAT`): a backstop,
should no node sweep for that long, so memory stays bounded.

Every operation is one Lua script (atomic): two nodes never both get a snapshot. Every
call is a trio checkpoint before it sends anything, so a call in a cancelled scope does
nothing. A call cancelled while it waits for Redis may still take effect (Redis runs what
it received); only its answer is lost, which for the takes loses the snapshot. Every
command goes through `redis_client.command`, so a Redis that is down or refuses a command
is `StorageError`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Final

import trio

from gateway.errors import StorageError
from gateway.storage.redis_client import Redis, Script, command

#: Seconds a snapshot stays in Redis past its `expires_at` when no node sweeps it.
KEEP_AFTER: Final = 86_400.0

_PUT_SCRIPT = """
redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
return 1
"""

# An expired snapshot stays (for take_expired); a key without a score is taken.
_TAKE_SCRIPT = """
local at = redis.call('ZSCORE', KEYS[2], ARGV[1])
if at and tonumber(at) <= tonumber(ARGV[2]) then return false end
redis.call('ZREM', KEYS[2], ARGV[1])
return redis.call('GETDEL', KEYS[1])
"""

# Returns {smids examined, smid, snapshot, smid, snapshot, ...}.
_TAKE_EXPIRED_SCRIPT = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {#ids}
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local snapshot = redis.call('GETDEL', ARGV[3] .. id)
  if snapshot then
    out[#out + 1] = id
    out[#out + 1] = snapshot
  end
end
return out
"""


class RedisAdoptableStore:
    """Encoded session snapshots by SM id in Redis, a key per snapshot and a sorted set of
    their expiries; an `AdoptableStore`.

    Args:
        redis: a client from `redis_client.open_redis`, used only while it is open.
        prefix: the start of every key of the store.
        clock: wall-clock UNIX seconds (`time.time`): a snapshot has expired once
            `clock() >= expires_at`.
    """

    __slots__ = ("_clock", "_index", "_prefix", "_put", "_redis", "_take", "_take_expired")

    def __init__(
        self, redis: Redis, *, prefix: str = "xg:", clock: Callable[[], float] = time.time
    ) -> None:
        self._redis = redis
        self._prefix = f"{prefix}adopt:"
        self._index = f"{prefix}adoptable"
        self._clock = clock
        self._put = redis.register_script(_PUT_SCRIPT)
        self._take = redis.register_script(_TAKE_SCRIPT)
        self._take_expired = redis.register_script(_TAKE_EXPIRED_SCRIPT)

    @property
    def scripts(self) -> tuple[Script[bytes], ...]:
        """The Lua scripts this store runs (for `redis_client.preload`)."""
        return (self._put, self._take, self._take_expired)

    async def put(self, smid: str, snapshot: bytes, expires_at: float) -> None:
        """Store the snapshot, replacing any with the same smid; kept past `expires_at`
        until `take_expired` (or `KEEP_AFTER`)."""
        await trio.lowlevel.checkpoint()
        await command(
            self._put(
                [self._prefix + smid, self._index],
                [
                    bytes(snapshot),
                    str(math.ceil((expires_at + KEEP_AFTER) * 1000)),
                    repr(float(expires_at)),
                    smid,
                ],
            ),
            "adoptable put",
        )

    async def take(self, smid: str) -> bytes | None:
        """Remove and return the snapshot of `smid`; None when there is none or it
        expired (an expired one stays, for `take_expired`)."""
        await trio.lowlevel.checkpoint()
        reply: object = await command(
            self._take([self._prefix + smid, self._index], [smid, repr(self._clock())]),
            "adoptable take",
        )
        if reply is None or isinstance(reply, bytes):
            return reply
        raise StorageError(f"redis adoptable take: unexpected reply {type(reply).__name__}")

    async def take_expired(self, limit: int) -> list[tuple[str, bytes]]:
        """Remove and return up to `limit` expired snapshots (smid, snapshot), soonest
        expired first."""
        await trio.lowlevel.checkpoint()
        taken: list[tuple[str, bytes]] = []
        while len(taken) < limit:
            want = limit - len(taken)
            reply: object = await command(
                self._take_expired([self._index], [repr(self._clock()), str(want), self._prefix]),
                "adoptable take_expired",
            )
            if not isinstance(reply, list) or not reply or not isinstance(reply[0], int):
                raise StorageError("redis adoptable take_expired: unexpected reply")
            examined, rest = reply[0], reply[1:]
            for smid, snapshot in zip(rest[::2], rest[1::2], strict=True):
                if not isinstance(smid, bytes) or not isinstance(snapshot, bytes):
                    raise StorageError("redis adoptable take_expired: unexpected reply")
                taken.append((smid.decode(), snapshot))
            if examined < want:
                break
        return taken
