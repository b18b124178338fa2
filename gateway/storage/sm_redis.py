"""The stream management tables (`sm_session`, `stale_h`) in Redis, shared by a cluster's
nodes (DESIGN section 6).

Schema (every key starts with the table's `prefix`, "xg:" by default, so several gateways
or tests can share one database):

* `{prefix}sm:{smid}`: a hash per resumable session, the `SmSessionRecord` field by field
  (`smid`, `jid`, `node`, `created`, `epoch`). A hash, not an encoded blob, so an operator
  can read it with `HGETALL`, and a later field is one more `HSET` argument.
* `{prefix}stale_h:{smid}`: a hash per ended session, the `StaleH` (`smid`, `h`, `jid`,
  `at`); `get` is one `HMGET`.
* `{prefix}stale_h`: a sorted set of the smids in `stale_h`, scored by `at`. `sweep` takes
  the lowest scores below the cutoff (`ZRANGEBYSCORE`) in batches, and the size bound
  drops the lowest scores (`ZPOPMIN`): both in O(log n) per entry, without scanning keys.

Numbers are stored as text: floats as `repr`, which reads back exactly (a score too:
Redis parses it with `strtod`), `h` and `epoch` as decimal integers.

A `stale_h` entry is two keys that change together, so `put` and each `sweep` batch are Lua
scripts: Redis runs a script atomically, so another node never sees an entry in the set
without its hash (or the reverse), and the bound's count and eviction cannot race a
concurrent put. The scripts compute the hash keys of the entries they drop from the prefix,
which one Redis (with replicas, the deployment of DESIGN 6) allows; Redis Cluster would also
need a hash tag in the prefix (`"{xg}:"`) to keep every key in one slot. `sm_session` needs
no script: each method is one command on one key.

Unlike the memory table, which keeps insertion order, `stale_h` here is ordered by `at`:
`sweep` deletes exactly the entries with `at < older_than` whatever order they were put
in, and the bound drops the entries with the lowest `at` (the oldest, as callers put `at`
in non-decreasing order).

Every call is a trio checkpoint before it sends anything, so a call in a cancelled scope
does nothing. A call cancelled while it waits for Redis may still take effect (Redis runs
what it received); only its answer is lost. Every command goes through
`redis_client.command`, so a Redis that is down or refuses a command is `StorageError`.
"""

from __future__ import annotations

from typing import Final

import trio

from gateway.errors import StorageError
from gateway.storage.base import SmSessionRecord, StaleH
from gateway.storage.redis_client import Redis, Script, command

#: Entries one `sweep` script deletes at most (one script holds Redis for ~2 ms).
_SWEEP_BATCH: Final = 1024

#: KEYS: the set, the entry's hash. ARGV: smid, h, jid, at, max_entries, hash key prefix.
#: Drops the lowest-scored entries when a new smid would take the table past the bound;
#: returns how many were dropped.
_PUT_SCRIPT: Final = """
local dropped = 0
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
    local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[5]) + 1
    if excess > 0 then
        local popped = redis.call('ZPOPMIN', KEYS[1], excess)
        for i = 1, #popped, 2 do
            redis.call('DEL', ARGV[6] .. popped[i])
            dropped = dropped + 1
        end
    end
end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
redis.call('HSET', KEYS[2], 'smid', ARGV[1], 'h', ARGV[2], 'jid', ARGV[3], 'at', ARGV[4])
return dropped
"""

#: KEYS: the set. ARGV: exclusive score bound ("(<at>"), batch size, hash key prefix.
#: The victims are the lowest-ranked members, so ZREMRANGEBYRANK removes exactly them.
_SWEEP_SCRIPT: Final = """
local victims = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, smid in ipairs(victims) do
    redis.call('DEL', ARGV[3] .. smid)
end
if #victims > 0 then
    redis.call('ZREMRANGEBYRANK', KEYS[1], 0, #victims - 1)
end
return #victims
"""


def _text(value: float) -> str:
    """A float as text that reads back as the same float (Redis scores included)."""
    return repr(float(value))


def _count(reply: object, what: str) -> int:
    """A script's integer reply."""
    if not isinstance(reply, int):
        raise StorageError(f"redis {what}: unexpected reply {reply!r}")
    return reply


class RedisSmSessionTable:
    """`sm_session` in Redis, a hash per smid; an `SmSessionTable`.

    Unbounded like the memory table: it holds one record per resumable session.

    Args:
        redis: a client from `redis_client.open_redis`, used only while it is open.
        prefix: the start of every key of the table.
    """

    __slots__ = ("_prefix", "_redis")

    def __init__(self, redis: Redis, *, prefix: str = "xg:") -> None:
        self._redis = redis
        self._prefix = f"{prefix}sm:"

    async def register(self, record: SmSessionRecord) -> None:
        """Add the record, replacing any record with the same `smid` (every field is
        written by one `HSET`, so a reader sees the old record or the new one)."""
        await trio.lowlevel.checkpoint()
        fields: dict[str, str | int] = {
            "smid": record.smid,
            "jid": record.jid,
            "node": record.node,
            "created": _text(record.created),
            "epoch": record.epoch,
        }
        await command(self._redis.hset(self._prefix + record.smid, fields), "sm_session register")

    async def lookup(self, smid: str) -> SmSessionRecord | None:
        """The record for `smid`, or None."""
        await trio.lowlevel.checkpoint()
        fields = await command(self._redis.hgetall(self._prefix + smid), "sm_session lookup")
        if not fields:
            return None
        try:
            return SmSessionRecord(
                smid=smid,
                jid=fields[b"jid"].decode(),
                node=fields[b"node"].decode(),
                created=float(fields[b"created"]),
                epoch=int(fields[b"epoch"]),
            )
        except (KeyError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
            raise StorageError(f"redis sm_session record {smid!r} is malformed") from exc

    async def remove(self, smid: str) -> bool:
        """Delete the record for `smid`; False when there was none."""
        await trio.lowlevel.checkpoint()
        deleted = await command(self._redis.delete([self._prefix + smid]), "sm_session remove")
        return deleted > 0


class RedisStaleHTable:
    """`stale_h` in Redis, a hash per smid and a set ordered by `at`, bounded; a
    `StaleHTable`.

    Args:
        redis: a client from `redis_client.open_redis`, used only while it is open.
        prefix: the start of every key of the table.
        max_entries: most entries kept; a put of a new smid beyond it deletes the entries
            with the lowest `at` first (those sessions then get `<failed/>` without `h`,
            as after the GC). Nodes that share the table should agree on it: a put by a
            node with a lower bound trims the table down to that bound.

    Raises:
        ValueError: `max_entries` is not positive.
    """

    __slots__ = ("_hash_prefix", "_index", "_max_entries", "_put", "_redis", "_sweep")

    def __init__(self, redis: Redis, *, prefix: str = "xg:", max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self._redis = redis
        self._max_entries = max_entries
        self._index = f"{prefix}stale_h"
        self._hash_prefix = f"{prefix}stale_h:"
        # Sent with EVALSHA; loaded into Redis (SCRIPT LOAD) on first use or after a flush.
        self._put = redis.register_script(_PUT_SCRIPT)
        self._sweep = redis.register_script(_SWEEP_SCRIPT)

    @property
    def scripts(self) -> tuple[Script[bytes], ...]:
        """The Lua scripts this table runs (for `redis_client.preload`)."""
        return (self._put, self._sweep)

    async def put(self, entry: StaleH) -> int:
        """Add the entry, replacing any entry with the same `smid`; when a new smid finds
        the table full, delete the entries with the lowest `at` first. Returns how many
        were deleted. One atomic script."""
        await trio.lowlevel.checkpoint()
        reply: object = await command(
            self._put(
                [self._index, self._hash_prefix + entry.smid],
                [
                    entry.smid,
                    str(entry.h),
                    entry.jid,
                    _text(entry.at),
                    str(self._max_entries),
                    self._hash_prefix,
                ],
            ),
            "stale_h put",
        )
        return _count(reply, "stale_h put")

    async def get(self, smid: str) -> StaleH | None:
        """The entry for `smid`, or None."""
        await trio.lowlevel.checkpoint()
        h, jid, at = await command(
            self._redis.hmget(self._hash_prefix + smid, ["h", "jid", "at"]), "stale_h get"
        )
        if h is None and jid is None and at is None:
            return None
        try:
            if h is None or jid is None or at is None:
                raise ValueError("a field is missing")
            return StaleH(smid=smid, h=int(h), jid=jid.decode(), at=float(at))
        except ValueError as exc:
            raise StorageError(f"redis stale_h entry {smid!r} is malformed") from exc

    async def sweep(self, older_than: float) -> int:
        """Delete entries with `at < older_than`, `_SWEEP_BATCH` per atomic script;
        returns how many.

        If cancelled, the batches deleted before the cancellation stay deleted (and the
        batch in flight, if Redis received it).
        """
        await trio.lowlevel.checkpoint()
        bound = "(" + _text(older_than)
        removed = 0
        while True:
            reply: object = await command(
                self._sweep([self._index], [bound, str(_SWEEP_BATCH), self._hash_prefix]),
                "stale_h sweep",
            )
            deleted = _count(reply, "stale_h sweep")
            removed += deleted
            if deleted < _SWEEP_BATCH:
                return removed
