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

The batch format is ours and small (`encode_batch`): per item an operation byte, the
target JID and a payload (the stanza's stored form, or a close condition).
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import structlog
import trio
from coredis.response.types import StreamEntry

from gateway.errors import JIDError, StorageError, StreamErrorCondition
from gateway.storage.codec import decode_stanza, decode_stanzas, encode_stanza
from gateway.storage.redis_client import REDIS_ERRORS, Redis, command
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID

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

_DELIVER: Final = b"d"
_CLOSE: Final = b"c"
_SURRENDER: Final = b"s"
_MOVED: Final = b"m"
_HEAD: Final = struct.Struct("!cHI")  # operation, JID length, payload length
#: Stands for a stanza while a batch is read (all its stanzas are parsed together).
_PENDING: Final = Element("", "pending")


@dataclass(frozen=True, slots=True)
class Deliver:
    """Give `stanza` to the resource `to` (held by the receiving node)."""

    to: JID
    stanza: Element


@dataclass(frozen=True, slots=True)
class Close:
    """End the session of resource `to` with `condition` (a conflict elsewhere), if it is
    still binding `session` (`gateway.core.cluster.Record.session`)."""

    to: JID
    condition: StreamErrorCondition | None
    text: str | None = None
    session: str = ""


@dataclass(frozen=True, slots=True)
class Surrender:
    """Give up session `smid` to node `requester` (a client resumes it there)."""

    smid: str
    requester: str


@dataclass(frozen=True, slots=True)
class Moved:
    """Session `smid` as a snapshot (`gateway.storage.snapshot`); empty: refused (the
    owner no longer had it)."""

    smid: str
    snapshot: bytes


Item = Deliver | Close | Surrender | Moved


def encode_batch(items: list[Item]) -> bytes:
    """The stream entry for `items`.

    Raises:
        ValueError: a stanza holds a character XML cannot carry (see `encode_stanza`).
    """
    parts: list[bytes] = []
    for item in items:
        if isinstance(item, Deliver):
            jid, op, payload = str(item.to).encode(), _DELIVER, encode_stanza(item.stanza)
        elif isinstance(item, Close):
            condition = item.condition.value if item.condition is not None else ""
            jid, op = str(item.to).encode(), _CLOSE
            payload = f"{condition}\n{item.session}\n{item.text or ''}".encode()
        elif isinstance(item, Surrender):
            jid, op, payload = item.smid.encode(), _SURRENDER, item.requester.encode()
        else:
            jid, op, payload = item.smid.encode(), _MOVED, item.snapshot
        parts.append(_HEAD.pack(op, len(jid), len(payload)))
        parts.append(jid)
        parts.append(payload)
    return b"".join(parts)


def decode_batch(data: bytes) -> list[Item]:
    """The items of a stream entry.

    Raises:
        StorageError: the entry is damaged (nothing of it is returned).
    """
    items: list[Item | bytes] = []
    offset = 0
    try:
        while offset < len(data):
            op, jid_length, payload_length = _HEAD.unpack_from(data, offset)
            offset += _HEAD.size
            end = offset + jid_length + payload_length
            if end > len(data):
                raise StorageError("relay batch: truncated item")
            target = data[offset : offset + jid_length].decode()
            payload = data[offset + jid_length : end]
            offset = end
            if op == _DELIVER:
                # (The stanza is parsed below, with the batch's others.)
                items.append(Deliver(JID.parse(target), _PENDING))
                items.append(payload)
            elif op == _CLOSE:
                condition, session, text = payload.decode().split("\n", 2)
                items.append(
                    Close(
                        JID.parse(target),
                        StreamErrorCondition(condition) if condition else None,
                        text or None,
                        session,
                    )
                )
            elif op == _SURRENDER:
                items.append(Surrender(target, payload.decode()))
            elif op == _MOVED:
                items.append(Moved(target, payload))
            else:
                raise StorageError(f"relay batch: unknown operation {op!r}")
    except (struct.error, UnicodeDecodeError, ValueError, JIDError) as exc:
        raise StorageError(f"relay batch: {exc}") from exc
    payloads = [part for part in items if isinstance(part, bytes)]
    try:
        stanzas = iter(decode_stanzas(payloads))
    except StorageError:
        stanzas = iter([decode_stanza(p) for p in payloads])  # raises for the damaged one
    return [
        Deliver(part.to, next(stanzas)) if isinstance(part, Deliver) else part
        for part in items
        if not isinstance(part, bytes)
    ]


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
