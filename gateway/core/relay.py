"""Stanzas between the nodes of a cluster, through Redis Streams (DESIGN section 6).

Theory of operation
-------------------
Every node reads one stream, `{prefix}stream:{node}`, as consumer `node` of the group
`gateway`. A stanza for a resource held by another node (or a request to close it) is
posted to this node's `Relay` without waiting: it joins the items pending for that
node. The sender task writes everything pending in one `XADD` per destination node, the
destinations of one round pipelined together, so under load one round trip carries many
stanzas, and when idle a stanza leaves at once (no timer). A stanza posted is the
relay's responsibility: if Redis refuses the write, the batch is kept and written again
(with backoff) when Redis is back, in order; past `max_pending` items waiting, posting
refuses and the caller keeps the stanza (its usual fallbacks: another resource, offline
storage, a bounce).

The receiving node reads batches, hands each item to its `deliver` callback (local
delivery, with the usual fallbacks when the resource has gone meanwhile), and only then
acknowledges the entry (`XACK` + `XDEL`). A node that stops between the two gets the
entry again when it starts reading (its pending entries are read first), so delivery
between nodes is at least once; a stanza accepted by the sender's node is not lost in
transit while Redis keeps its data.

The batch format is ours and small (`gateway.storage.cluster_codec`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

import structlog
import trio
from coredis.response.types import StreamEntry

from gateway.errors import StorageError
from gateway.storage.cluster_codec import Item, Moved, Surrender, decode_batch, encode_batch
from gateway.storage.redis_client import REDIS_ERRORS, Redis, command

log = structlog.get_logger(module=__name__)

#: The consumer group every node's stream is read in.
GROUP: Final = b"gateway"
#: Entries one read takes at most.
READ_COUNT: Final = 64
#: Milliseconds one blocking read waits for entries (then it reads again).
READ_BLOCK_MS: Final = 1000
#: Seconds between attempts while Redis refuses, growing to `MAX_BACKOFF`.
FIRST_BACKOFF: Final = 0.1
MAX_BACKOFF: Final = 5.0


def entry_items(entry: StreamEntry) -> list[Item]:
    """The items of one stream entry; a damaged entry is logged and yields none (the
    receiver acknowledges it: reading it again would not repair it)."""
    data = entry.field_values.get(b"b") if entry.field_values else None
    try:
        return decode_batch(data) if isinstance(data, bytes) else []
    except StorageError as exc:
        log.warning("relay_entry_damaged", entry=str(entry.identifier), error=str(exc))
        return []


def stream_key(prefix: str, node: str) -> str:
    return f"{prefix}stream:{node}"


class Relay:
    """This node's outbox to the other nodes and its inbox from them (module docstring).

    Args:
        redis: the cluster's client.
        node: this node's id.
        prefix: the cluster's key prefix.
        max_pending: most items waiting to be written (all destinations); past it
            `post` refuses.
    """

    def __init__(self, redis: Redis, node: str, *, prefix: str, max_pending: int) -> None:
        self.redis = redis
        self.node = node
        self.prefix = prefix
        self.max_pending = max_pending
        self._pending: dict[str, list[Item]] = {}
        self._count = 0
        self._wakeup = trio.Event()
        self._written = trio.Event()
        #: Items written to Redis and items delivered from it (for the metrics and tests).
        self.sent = 0
        self.received = 0

    @property
    def pending(self) -> int:
        return self._count

    async def wait_flushed(self) -> None:
        """Wait until nothing posted is waiting to be written (at shutdown, before the
        sender stops: what other nodes must get is not left behind)."""
        while self._count:
            self._written = trio.Event()
            await self._written.wait()

    def post(self, node: str, item: Item) -> bool:
        """Queue `item` for `node` without waiting; False (the caller keeps the stanza)
        when `max_pending` items are waiting already."""
        if self._count >= self.max_pending:
            return False
        self._pending.setdefault(node, []).append(item)
        self._count += 1
        self._wakeup.set()
        return True

    async def run_sender(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Write what is posted, batched per destination; never returns."""
        task_status.started()
        backoff = FIRST_BACKOFF
        while True:
            if not self._pending:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            # What is posted while this round is written goes in the next one.
            rounds, self._pending = self._pending, {}
            try:
                failed = await self._write(rounds)
                error = "refused by redis"
            except StorageError as exc:
                # (Whether any destination was written is unknown: all are written
                # again, and a receiver may get an entry twice: at least once.)
                failed, error = set(rounds), str(exc)
            written = sum(len(items) for node, items in rounds.items() if node not in failed)
            self._count -= written
            self.sent += written
            self._written.set()
            if not failed:
                backoff = FIRST_BACKOFF
                continue
            log.warning("relay_write_failed", error=error, nodes=sorted(failed), retry_in=backoff)
            # Back in front of what came meanwhile, order kept per destination.
            again = {node: rounds[node] for node in rounds if node in failed}
            for node, items in self._pending.items():
                again.setdefault(node, []).extend(items)
            self._pending = again
            await trio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _write(self, rounds: dict[str, list[Item]]) -> set[str]:
        """Write one entry per destination, pipelined; the destinations Redis refused
        (written again later).

        Raises:
            StorageError: Redis could not be reached (nothing known of what was written).
        """
        entries: list[tuple[str, bytes]] = []
        for node, items in rounds.items():
            entries.append((node, b"".join(self._encoded(node, items))))
        try:
            async with self.redis.pipeline(transaction=False, raise_on_error=False) as pipe:
                for node, data in entries:
                    pipe.xadd(stream_key(self.prefix, node), {b"b": data})
        except REDIS_ERRORS as exc:
            raise StorageError(f"redis relay xadd: {exc}") from exc
        results = pipe.results or ()
        return {
            node
            for (node, _data), result in zip(entries, results, strict=False)
            if isinstance(result, BaseException)
        }

    @staticmethod
    def _encoded(node: str, items: list[Item]) -> list[bytes]:
        """Each item's bytes; one that cannot be encoded (a character XML cannot carry,
        which the parser never lets in) is logged and left out, not the whole batch."""
        parts = []
        for item in items:
            try:
                parts.append(encode_batch([item]))
            except ValueError:
                log.exception("relay_encode_failed", to_node=node)
        return parts

    async def run_receiver(
        self,
        deliver: Callable[[Item], Awaitable[None]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Read this node's stream and `deliver` every item, then acknowledge; never
        returns. Entries left unacknowledged by an earlier run are read first."""
        key = stream_key(self.prefix, self.node)
        await self._create_group(key)
        task_status.started()
        backlog = True  # our pending entries first ("0"), then new ones (">")
        backoff = FIRST_BACKOFF
        while True:
            try:
                backlog = await self._receive(key, deliver, backlog=backlog)
            except StorageError as exc:
                # (An entry delivered but not acknowledged comes again: at least once.)
                log.warning("relay_read_failed", error=str(exc), retry_in=backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                await self._create_group(key)
                backlog = True
                continue
            backoff = FIRST_BACKOFF

    async def _receive(
        self, key: str, deliver: Callable[[Item], Awaitable[None]], *, backlog: bool
    ) -> bool:
        """Read, deliver and acknowledge one round of entries; whether the backlog is
        still being read."""
        answer = await command(
            self.redis.xreadgroup(
                GROUP,
                self.node.encode(),
                streams={key: "0" if backlog else ">"},
                count=READ_COUNT,
                block=None if backlog else READ_BLOCK_MS,
            ),
            "relay xreadgroup",
        )
        entries = [entry for stream in (answer or {}).values() for entry in stream]
        if backlog and not entries:
            return False
        # Stanzas and closes in order, one after the other (their order is the order a
        # client sees); session moves each on their own, so a burst of resumptions from
        # another node is not served one at a time. All are done before the round is
        # acknowledged.
        moves: list[Item] = []
        for entry in entries:
            items = entry_items(entry)
            for item in items:
                if isinstance(item, Surrender | Moved):
                    moves.append(item)
                else:
                    await deliver(item)
            self.received += len(items)
        if moves:
            async with trio.open_nursery() as nursery:
                for item in moves:
                    nursery.start_soon(_deliver_move, deliver, item)
        if entries:
            # Every entry of the round at once, after all were delivered: one round trip.
            done = [entry.identifier for entry in entries]
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.xack(key, GROUP, done)
                    pipe.xdel(key, done)
            except REDIS_ERRORS as exc:
                raise StorageError(f"redis relay xack: {exc}") from exc
        return backlog

    async def _create_group(self, key: str) -> None:
        """Create the stream and its group if missing (idempotent)."""
        try:
            await command(
                self.redis.xgroup_create(key, GROUP, "0", mkstream=True), "relay xgroup create"
            )
        except StorageError as exc:
            if "BUSYGROUP" not in str(exc):
                log.warning("relay_group_failed", error=str(exc))


async def _deliver_move(deliver: Callable[[Item], Awaitable[None]], item: Item) -> None:
    """Deliver a session move; a store failure there is logged (the resume it serves
    fails, the client tries again), not a reason to stop reading the stream."""
    try:
        await deliver(item)
    except StorageError as exc:
        log.warning("relay_move_failed", error=str(exc))
