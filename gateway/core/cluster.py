"""The session directory of a cluster: this node's resources in memory, every node's in
Redis (DESIGN section 6).

Theory of operation
-------------------
`ClusterDirectory` keeps this node's sessions in a `LocalDirectory` (so a stanza for a
local full JID never touches Redis) and mirrors each of them into Redis when its owner
binds, publishes or unbinds it: one hash per account, `{prefix}res:{bare}`, field =
resource, value = the owning node, priority, interest and last presence. Each node also
keeps the set of full JIDs it holds, `{prefix}held:{node}`, so a dead node's entries can
be found. Changes are Lua scripts, so two nodes never interleave inside one: `bind`
takes the field and returns who held it (a resource held on another node is closed
there with `conflict`, RFC 6120 7.7.2.2, cluster-wide); `publish` and `unbind` change
the field only while it still names this node (a session replaced elsewhere cannot
overwrite or delete its successor).

A lookup for a bare JID reads the hash: this node's entries come from memory, the others
become `Resource`s whose handle is a `RemoteHandle`, which posts the stanza (or the close
request) to the `Relay` for the node that holds it; the router applies the same rules
to both. An entry in Redis naming this node but unknown in memory is stale (a write lost
while Redis was away) and ignored.

Redis unreachable: lookups answer with this node's resources only, publishes and
unbinds are logged and retried by `run_heartbeat`'s re-registration when Redis is back;
`bind` raises `StorageError` (a new session cannot be made visible to the cluster, so
the caller refuses it).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import structlog
import trio

from gateway.core.directory import Bound, Handle, LocalDirectory, Member, Resource
from gateway.core.relay import Relay
from gateway.errors import StorageError, StreamErrorCondition
from gateway.storage.cluster_codec import Close, Deliver, Record, node_prefix
from gateway.storage.redis_client import Redis, Script, command
from gateway.storage.resp import RespConnection
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID

log = structlog.get_logger(module=__name__)

#: Heartbeats a node may miss before the others treat it as dead.
MISSED_HEARTBEATS: Final = 3
#: Seconds a remote resource found by its full JID is used without asking Redis again.
#: A chat sends many stanzas to one full JID: asking Redis for each cost more CPU than
#: the rest of their routing. Within this time a resource that moved or ended is
#: still tried where it was; that node hands the stanza on by the rules for an
#: unavailable full JID (another resource, offline storage), so nothing is lost.
SEEN_FOR: Final = 1.0
#: Records written again between two heartbeats when a node re-registers (after an
#: outage): one beat per this many, well within the heartbeat's expiry.
REGISTER_BEAT_EVERY: Final = 100
#: Remote resources remembered at most (the table is emptied when it is full).
SEEN_MAX: Final = 100_000

# KEYS: the account's hash, this node's held set. ARGV: resource, full JID, record.
# Returns the record that held the field before (any node), or false.
_BIND: Final = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[2])
return old
"""
# KEYS: the account's hash. ARGV: resource, this node's record prefix, new record.
_PUBLISH: Final = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and string.sub(cur, 1, string.len(ARGV[2])) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"""
# KEYS: the account's hash, this node's held set. ARGV: resource, record prefix, full JID,
# record. Writes the record only where the field is free or already this node's.
_CLAIM: Final = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and string.sub(cur, 1, string.len(ARGV[2])) ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
redis.call('SADD', KEYS[2], ARGV[3])
return 1
"""
# KEYS: the account's hash, this node's held set. ARGV: resource, record prefix, full JID.
_UNBIND: Final = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[3])
if cur and string.sub(cur, 1, string.len(ARGV[2])) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
return 0
"""


class RemoteHandle:
    """A resource held by another node: what is sent goes through the relay."""

    __slots__ = ("full_jid", "node", "relay", "session")

    def __init__(self, relay: Relay, node: str, full_jid: JID, session: str) -> None:
        self.relay = relay
        self.node = node
        self.full_jid = full_jid
        self.session = session

    def send(self, stanza: Element) -> bool:
        return self.relay.post(self.node, Deliver(self.full_jid, stanza))

    def close(
        self,
        condition: StreamErrorCondition | None = None,
        text: str | None = None,
        *,
        handoff: bool = False,
    ) -> None:
        if not self.relay.post(self.node, Close(self.full_jid, condition, text, self.session)):
            log.warning("remote_close_not_posted", to=str(self.full_jid), node=self.node)


Unavailable = Callable[[Element, JID, Handle | None], Awaitable[None]]


class ClusterDirectory:
    """A `Directory` over this node's memory and the cluster's Redis (module docstring).

    Args:
        redis: the cluster's client.
        relay: this node's relay (remote handles post to it).
        node: this node's id.
        prefix: the cluster's key prefix.
        seen_for: seconds a remote resource found by full JID is reused (SEEN_FOR).
    """

    def __init__(
        self, redis: Redis, relay: Relay, node: str, *, prefix: str, seen_for: float = SEEN_FOR
    ) -> None:
        self.node = node
        self.redis = redis
        self.relay = relay
        self.prefix = prefix
        self.local = LocalDirectory(node)
        #: Reads on the routing path (a stanza for another node's resource) go through
        #: a thin connection of their own: coredis' cost per command was more than the
        #: rest of such a stanza's routing (see `gateway.storage.resp`).
        self._reads = RespConnection(relay.url)
        self._own = node_prefix(node)
        self._bind = redis.register_script(_BIND)
        self._publish = redis.register_script(_PUBLISH)
        self._unbind = redis.register_script(_UNBIND)
        self._claim = redis.register_script(_CLAIM)
        #: The session token of each resource bound here (see `Record.session`).
        self._sessions: dict[JID, str] = {}
        #: Resources unbound here while Redis refused the unbind: removed when it is back.
        self._unbind_later: set[JID] = set()
        #: Remote resources found by full JID lately, until when (see SEEN_FOR).
        self._seen: dict[JID, tuple[float, Resource]] = {}
        self.seen_for = seen_for
        #: Nodes found alive lately, until when (see `is_alive`).
        self._alive: dict[str, float] = {}
        #: Where a relayed stanza goes when its resource has gone (the router's rules for
        #: an unavailable full JID); set by the app once the router exists.
        self.unavailable: Unavailable | None = None

    def session_of(self, full: JID) -> str | None:
        """The session token of the resource `full` bound here (see `Record.session`)."""
        return self._sessions.get(full)

    def _account_key(self, bare: JID) -> str:
        return f"{self.prefix}res:{bare}"

    def held_key(self, node: str) -> str:
        return f"{self.prefix}held:{node}"

    def _record(self, full: JID, member: Member) -> bytes:
        session = self._sessions.get(full, "")
        return Record(
            self.node, session, member.priority, member.interested, member.presence
        ).encode()

    # -- the owner's side --------------------------------------------------------------------

    async def bind(self, member: Member, bare: JID, resource: str | None) -> Bound:
        # Redis first: a bind it refuses changes nothing here (the holder stays).
        full = bare.with_resource(resource or self.local.fresh_resource(bare))
        session = secrets.token_hex(6)
        record = Record(self.node, session, member.priority, member.interested, member.presence)
        old: object = await command(
            self._bind(
                keys=[self._account_key(bare), self.held_key(self.node)],
                args=[full.resource or "", str(full), record.encode()],
            ),
            "directory bind",
        )
        self._unbind_later.discard(full)
        self._seen.pop(full, None)
        bound = await self.local.bind(member, bare, full.resource)
        self._sessions[full] = session
        if not isinstance(old, bytes):
            return bound
        try:
            record = Record.decode(old)
        except StorageError:
            log.warning("directory_record_damaged", jid=str(full))
            return bound
        if record.node == self.node:
            return bound  # this node held it: the local replacement, if any, says who
        remote = self._remote(full, record)
        if bound.replaced is None:
            return Bound(full, remote)
        # Held here and (stale) elsewhere at once: the remote one is ended here, the
        # caller ends the local one.
        remote.handle.close(StreamErrorCondition.CONFLICT, "replaced by a new connection")
        return bound

    async def publish(self, member: Member) -> None:
        await self.local.publish(member)
        full = member.full_jid
        held = await self.local.resource(full) if full is not None else None
        if full is None or held is None or held.handle is not member:
            return
        try:
            await command(
                self._publish(
                    keys=[self._account_key(full.bare())],
                    args=[full.resource or "", self._own, self._record(full, member)],
                ),
                "directory publish",
            )
        except StorageError as exc:
            log.warning("directory_publish_failed", error=str(exc))

    async def unbind(self, member: Member) -> bool:
        held = await self.local.unbind(member)
        full = member.full_jid
        if held and full is not None:
            self._sessions.pop(full, None)
            try:
                await self._unbind_record(full)
            except StorageError as exc:
                log.warning("directory_unbind_failed", error=str(exc))
                self._unbind_later.add(full)
        return held

    async def _unbind_record(self, full: JID) -> None:
        await command(
            self._unbind(
                keys=[self._account_key(full.bare()), self.held_key(self.node)],
                args=[full.resource or "", self._own, str(full)],
            ),
            "directory unbind",
        )

    @property
    def scripts(self) -> tuple[Script[bytes], ...]:
        """The Lua scripts the directory runs (for `redis_client.preload`)."""
        return (self._bind, self._publish, self._unbind, self._claim)

    async def aclose(self) -> None:
        """Close the connection of the lookups (the rest belongs to its owners)."""
        await self._reads.aclose()

    # -- lookups --------------------------------------------------------------------------

    async def resources(self, bare: JID) -> Sequence[Resource]:
        local = await self.local.resources(bare)
        try:
            reply = await self._reads.execute("HGETALL", self._account_key(bare))
        except StorageError as exc:
            log.warning("directory_read_failed", error=str(exc))
            return local
        found = list(local)
        flat = reply if isinstance(reply, list) else []
        for field, data in zip(flat[::2], flat[1::2], strict=False):
            if not isinstance(field, bytes) or not isinstance(data, bytes):
                continue
            try:
                record = Record.decode(data)
            except StorageError:
                continue
            if record.node == self.node:
                continue  # ours come from memory; one missing there is stale
            found.append(self._remote(bare.with_resource(field.decode()), record))
        return found

    async def resource(self, full: JID) -> Resource | None:
        local = await self.local.resource(full)
        if local is not None:
            return local
        now = trio.current_time()
        cached = self._seen.get(full)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            data = await self._reads.execute(
                "HGET", self._account_key(full.bare()), full.resource or ""
            )
        except StorageError as exc:
            log.warning("directory_read_failed", error=str(exc))
            return None
        if not isinstance(data, bytes):
            return None
        try:
            record = Record.decode(data)
        except StorageError:
            return None
        if record.node == self.node:
            return None
        remote = self._remote(full, record)
        if len(self._seen) >= SEEN_MAX:
            self._seen.clear()
        if self.seen_for > 0:
            self._seen[full] = (now + self.seen_for, remote)
        return remote

    def _remote(self, full: JID, record: Record) -> Resource:
        return Resource(
            full,
            record.node,
            RemoteHandle(self.relay, record.node, full, record.session),
            record.priority,
            record.presence,
            record.interested,
        )

    # -- what other nodes relay here ------------------------------------------------------

    async def deliver(self, item: Deliver | Close) -> None:
        """Deliver an item relayed from another node to this node's resource; a stanza
        whose resource has gone takes the router's rules for an unavailable full JID."""
        local = await self.local.resource(item.to)
        if isinstance(item, Close):
            if local is not None and self._sessions.get(item.to) == item.session:
                # Replaced on another node: the JID is no longer this session's from now
                # on (as a local replacement does), so stanzas for it find the new holder
                # and the ending session does not announce itself gone a second time.
                self.local.release(item.to, local.handle)
                self._sessions.pop(item.to, None)
                local.handle.close(item.condition, item.text)
                try:
                    await command(
                        self.redis.srem(self.held_key(self.node), [str(item.to)]), "directory"
                    )
                except StorageError as exc:
                    log.warning("directory_release_failed", error=str(exc))
            return
        if local is not None and local.handle.send(item.stanza):
            return
        if self.unavailable is not None:
            await self.unavailable(item.stanza, item.to, local.handle if local else None)

    # -- liveness ---------------------------------------------------------------------------

    async def is_alive(self, node: str) -> bool:
        """Whether `node`'s heartbeat key is there (it beat within its last three
        intervals); False when Redis cannot say. A node found alive is taken to be for
        `seen_for` seconds more (a reconnect storm's resumptions ask about the same
        node hundreds of times a second; its death takes three heartbeats to show anyway).
        """
        now = trio.current_time()
        if self._alive.get(node, 0.0) > now:
            return True
        try:
            count = await command(self.redis.exists([f"{self.prefix}node:{node}"]), "liveness")
        except StorageError:
            return False
        if count > 0 and self.seen_for > 0:
            self._alive[node] = now + self.seen_for
        return count > 0

    async def run_heartbeat(
        self,
        interval: float,
        on_health: Callable[[str | None], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Say every `interval` seconds that this node lives (a key that expires after
        `MISSED_HEARTBEATS` intervals); after Redis was unreachable, write this node's
        resources again (what changed meanwhile was only logged). `on_health` hears
        why the node is unhealthy ("redis unreachable") and when it is well again
        (None). Never returns."""
        key = f"{self.prefix}node:{self.node}"
        ttl_ms = int(interval * MISSED_HEARTBEATS * 1000)
        healthy = True
        started = False
        while True:
            try:
                # The key missing (first beat, or Redis lost its data: a restart, a
                # failover, FLUSHALL) or an outage behind us: write our records again.
                previous = await command(
                    self.redis.set(key, b"1", px=ttl_ms, get=True), "heartbeat"
                )
                await command(self.redis.sadd(f"{self.prefix}nodes", [self.node]), "heartbeat")
                if previous is None or not healthy:

                    async def beat() -> None:
                        await command(self.redis.set(key, b"1", px=ttl_ms), "heartbeat")

                    await self._register_again(beat)
                if not healthy:
                    log.info("cluster_redis_back")
                    on_health(None)
                healthy = True
            except StorageError as exc:
                if healthy:
                    log.warning("cluster_redis_unreachable", error=str(exc))
                    on_health("redis unreachable")
                healthy = False
            if not started:
                started = True
                task_status.started()
            await trio.sleep(interval)

    async def _register_again(self, beat: Callable[[], Awaitable[None]]) -> None:
        """Make Redis say again what this node holds (after an outage, or after Redis lost
        its data): the unbinds it refused, then every local resource's record, where the
        field is free or still ours. A resource another node took meanwhile is ended
        here with `conflict`: the newer session keeps the JID, as with any bind."""
        for full in list(self._unbind_later):
            await self._unbind_record(full)
            self._unbind_later.discard(full)
        for count, resource in enumerate(self.local.all(), 1):
            if count % REGISTER_BEAT_EVERY == 0:
                # Tens of thousands of records take longer than the heartbeat's expiry:
                # the node must not look dead (and be reaped) while it writes them.
                await beat()
            full = resource.full_jid
            session = self._sessions.get(full, "")
            record = Record(
                self.node, session, resource.priority, resource.interested, resource.presence
            )
            claimed: object = await command(
                self._claim(
                    keys=[self._account_key(full.bare()), self.held_key(self.node)],
                    args=[full.resource or "", self._own, str(full), record.encode()],
                ),
                "directory register",
            )
            if not claimed:
                log.info("session_replaced_elsewhere", jid=str(full))
                self.local.release(full, resource.handle)
                self._sessions.pop(full, None)
                resource.handle.close(StreamErrorCondition.CONFLICT, "replaced by a new connection")
