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

The batch format is ours and small (`gateway.storage.cluster_codec`). The relay talks to
Redis over two connections of its own (`gateway.storage.resp`: the sender's, and the
receiver's, which blocks in `XREADGROUP`); a round's acknowledgements go in the same
write as the next read.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

import structlog
import trio

from gateway.errors import StorageError
from gateway.storage.cluster_codec import Item, Moved, Surrender, decode_batch, encode_batch
from gateway.storage.resp import Arg, Command, ReplyError, RespConnection

log = structlog.get_logger(module=__name__)

#: The consumer group every node's stream is read in.
GROUP: Final = b"gateway"
#: Entries one read takes at most.
READ_COUNT: Final = 64
#: Milliseconds one blocking read waits for entries (then it reads again).
READ_BLOCK_MS: Final = 1000
#: Bytes one stream entry holds at most (several entries when more is waiting).
ENTRY_MAX_BYTES: Final = 1024 * 1024
#: Seconds between attempts while Redis refuses, growing to `MAX_BACKOFF`.
FIRST_BACKOFF: Final = 0.1
MAX_BACKOFF: Final = 5.0


def entry_items(identifier: bytes, data: bytes | None) -> list[Item]:
    """The items of one stream entry (its `b` field); a damaged entry is logged and
    yields none (the receiver acknowledges it: reading it again would not repair it)."""
    try:
        return decode_batch(data) if data is not None else []
    except StorageError as exc:
        log.warning("relay_entry_damaged", entry=identifier.decode(), error=str(exc))
        return []


def read_entries(answer: object) -> list[tuple[bytes, bytes | None]]:
    """(id, `b` field) of each entry of an `XREADGROUP` answer (RESP2: nil, or
    `[[stream, [[id, [field, value, ...]], ...]]]`); the field is None for an entry
    deleted while pending.

    Raises:
        StorageError: the answer is not shaped as Redis answers `XREADGROUP`.
    """
    found: list[tuple[bytes, bytes | None]] = []
    if answer is None:
        return found
    try:
        for _stream, entries in answer:  # type: ignore[attr-defined]
            for identifier, fields in entries:
                if not isinstance(identifier, bytes):
                    raise TypeError("an entry id that is not a string")
                data = (
                    dict(zip(fields[::2], fields[1::2], strict=True)).get(b"b") if fields else None
                )
                found.append((identifier, data if isinstance(data, bytes) else None))
    except (TypeError, ValueError) as exc:
        raise StorageError(f"redis relay: unexpected XREADGROUP answer: {exc}") from exc
    return found


def stream_key(prefix: str, node: str) -> str:
    return f"{prefix}stream:{node}"


class Relay:
    """This node's outbox to the other nodes and its inbox from them (module docstring).

    Args:
        url: the cluster's Redis (`cluster.redis`).
        node: this node's id.
        prefix: the cluster's key prefix.
        max_pending: most items waiting to be written (all destinations); past it
            `post` refuses.
    """

    def __init__(
        self,
        url: str,
        node: str,
        *,
        prefix: str,
        max_pending: int,
        entry_max_bytes: int = ENTRY_MAX_BYTES,
    ) -> None:
        self.url = url
        self.node = node
        self.prefix = prefix
        self.max_pending = max_pending
        self.entry_max_bytes = entry_max_bytes
        self._pending: dict[str, list[Item]] = {}
        self._count = 0
        self._wakeup = trio.Event()
        self._written = trio.Event()
        #: Where an item goes when its destination's stream is gone (set by the app:
        #: the router's fallbacks for a stanza, the adoptable store for a session).
        self.undeliverable: Callable[[Item], Awaitable[None]] | None = None
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
        connection = RespConnection(self.url)
        try:
            task_status.started()
            await self._send(connection)
        finally:
            await connection.aclose()

    async def _send(self, connection: RespConnection) -> None:
        backoff = FIRST_BACKOFF
        while True:
            if not self._pending:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            # What is posted while this round is written goes in the next one.
            rounds, self._pending = self._pending, {}
            gone: set[str] = set()
            try:
                failed, gone = await self._write(connection, rounds)
                error = "refused by redis"
            except StorageError as exc:
                # (Whether any destination was written is unknown: all are written
                # again, and a receiver may get an entry twice: at least once.)
                failed, error = set(rounds), str(exc)
            for node in gone:
                await self._give_back(node, rounds[node])
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

    async def _give_back(self, node: str, items: list[Item]) -> None:
        """Items for a node whose stream is gone (it left or was reaped after they were
        posted): each takes `self.undeliverable` (the router's fallbacks), never a
        stream nobody reads."""
        log.info("relay_destination_gone", to_node=node, items=len(items))
        for item in items:
            if self.undeliverable is None:
                log.warning("relay_item_dropped", to_node=node)
                continue
            try:
                await self.undeliverable(item)
            except StorageError as exc:
                log.warning("relay_item_dropped", to_node=node, error=str(exc))

    async def _write(
        self, connection: RespConnection, rounds: dict[str, list[Item]]
    ) -> tuple[set[str], set[str]]:
        """Write each destination's items, in entries of at most `entry_max_bytes` (a
        long outage's backlog is not one huge entry), all pipelined (`NOMKSTREAM`: a
        stream that is gone is not made again, where nobody would read it); the
        destinations Redis refused (written again later: whole, so an entry of theirs
        written before the refusal arrives twice, at least once), and those whose
        stream is gone.

        Raises:
            StorageError: Redis could not be reached (nothing known of what was written).
        """
        targets: list[str] = []
        commands: list[Command] = []
        for node, items in rounds.items():
            for entry in self._entries(self._encoded(node, items)):
                targets.append(node)
                commands.append(
                    ("XADD", stream_key(self.prefix, node), "NOMKSTREAM", "*", "b", entry)
                )
        replies = await connection.pipeline(commands)
        pairs = list(zip(targets, replies, strict=True))
        failed = {node for node, reply in pairs if isinstance(reply, ReplyError)}
        gone = {node for node, reply in pairs if reply is None} - failed
        return failed, gone

    def _entries(self, parts: list[bytes]) -> list[bytes]:
        """`parts` joined into entries of at most `entry_max_bytes` (one part larger
        than that is an entry of its own)."""
        entries: list[bytes] = []
        chunk: list[bytes] = []
        size = 0
        for part in parts:
            if chunk and size + len(part) > self.entry_max_bytes:
                entries.append(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(part)
            size += len(part)
        if chunk:
            entries.append(b"".join(chunk))
        return entries

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
        connection = RespConnection(self.url)
        try:
            key = stream_key(self.prefix, self.node)
            await self._create_group(connection, key)
            task_status.started()
            await self._receive_all(connection, key, deliver)
        finally:
            await connection.aclose()

    async def _receive_all(
        self, connection: RespConnection, key: str, deliver: Callable[[Item], Awaitable[None]]
    ) -> None:
        backlog = True  # our pending entries first ("0"), then new ones (">")
        backoff = FIRST_BACKOFF
        done: list[bytes] = []  # delivered, acknowledged with the next read
        while True:
            try:
                entries = await self._read(connection, key, done, backlog=backlog)
            except StorageError as exc:
                # (An entry delivered but not acknowledged comes again: at least once.)
                log.warning("relay_read_failed", error=str(exc), retry_in=backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                await self._create_group(connection, key)
                backlog, done = True, []
                continue
            if backlog and not entries:
                backlog = False
            try:
                await self._deliver_round(entries, deliver)
            except StorageError as exc:
                # A store the delivery needs is away (offline storage for a resource
                # that has gone): the round stays unacknowledged and is read again.
                log.warning("relay_delivery_failed", error=str(exc), retry_in=backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                backlog, done = True, []
                continue
            backoff = FIRST_BACKOFF
            done = [identifier for identifier, _ in entries]

    async def _read(
        self, connection: RespConnection, key: str, done: list[bytes], *, backlog: bool
    ) -> list[tuple[bytes, bytes | None]]:
        """Acknowledge (`XACK` + `XDEL`) the entries of the last round and read the next
        ones, in one write."""
        commands: list[Command] = []
        if done:
            commands.append(("XACK", key, GROUP, *done))
            commands.append(("XDEL", key, *done))
        read: list[Arg] = ["XREADGROUP", "GROUP", GROUP, self.node, "COUNT", READ_COUNT]
        if not backlog:
            read += ["BLOCK", READ_BLOCK_MS]
        commands.append((*read, "STREAMS", key, "0" if backlog else ">"))
        replies = await connection.pipeline(commands, block=READ_BLOCK_MS / 1000)
        for reply in replies:
            if isinstance(reply, ReplyError):
                raise StorageError(f"redis relay read: {reply}")
        return read_entries(replies[-1])

    async def _deliver_round(
        self, entries: list[tuple[bytes, bytes | None]], deliver: Callable[[Item], Awaitable[None]]
    ) -> None:
        """Deliver the items of a round. Stanzas and closes in order, one after the other
        (their order is the order a client sees); session moves each on their own, so a
        burst of resumptions from another node is not served one at a time. All are done
        before the round is acknowledged."""
        moves: list[Item] = []
        for identifier, data in entries:
            items = entry_items(identifier, data)
            for item in items:
                if isinstance(item, Surrender | Moved):
                    moves.append(item)
                    continue
                try:
                    await deliver(item)
                except StorageError:
                    raise
                except Exception:
                    # A defect in delivering one item must not stop the stream (nor,
                    # read again after a restart, stop the node each time): logged.
                    log.exception("relay_item_failed", entry=identifier.decode())
            self.received += len(items)
        if moves:
            lost: list[StorageError] = []
            async with trio.open_nursery() as nursery:
                for item in moves:
                    nursery.start_soon(_deliver_move, deliver, item, lost)
            if lost:
                # A session that could be kept nowhere: the round is read again.
                raise lost[0]

    async def _create_group(self, connection: RespConnection, key: str) -> None:
        """Create the stream and its group if missing (idempotent)."""
        try:
            await connection.execute("XGROUP", "CREATE", key, GROUP, "0", "MKSTREAM")
        except StorageError as exc:
            if "BUSYGROUP" not in str(exc):
                log.warning("relay_group_failed", error=str(exc))


async def _deliver_move(
    deliver: Callable[[Item], Awaitable[None]], item: Item, lost: list[StorageError]
) -> None:
    """Deliver a session move. A store failure is logged: for a surrender, the resume it
    serves fails and the client tries again; for a session (`Moved`), which exists
    nowhere else, it goes into `lost`, so that the round is not acknowledged."""
    try:
        await deliver(item)
    except StorageError as exc:
        log.warning("relay_move_failed", error=str(exc))
        if isinstance(item, Moved):
            lost.append(exc)
