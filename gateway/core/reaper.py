"""Accounting for a node of the cluster that died (SIGKILL, power loss) (DESIGN section 6).

Theory of operation
-------------------
Every node beats (`ClusterDirectory.run_heartbeat`: a key that expires after three missed
intervals) and lists itself in `{prefix}nodes`. `run_reaper` looks, every interval, for
listed nodes whose key has expired. The first live node to take the dead one's reaping
lock (`SET NX` with an expiry, so a reaper that dies too is replaced) accounts for it:

1. Its resources: each record that still names the dead node is deleted from its
   account's hash, and the account's other available resources (on any node) get its
   unavailable presence, as they would have from a session that ended.
2. What other nodes had relayed to it and it never acknowledged (its stream): every
   stanza takes the router's rules for an unavailable full JID (another resource of the
   account, offline storage, or an error to its sender); close requests are moot. This
   waits until the others' reuse of the resources they found there has run out
   (`seen_for`, twice), and the stream is deleted only once read to its end, atomically.
3. Its listing (`nodes`, `held:NODE`, the stream) is removed.

A node that stops on purpose (drained) deletes its heartbeat key as it goes (`leave`),
marked as left: it is reaped at once the same way, reported as left, not dead.

Guarantee: nothing another node handed over for delivery to the dead node is lost. What
the dead node's own clients had not acknowledged (its SM buffers) died with it; their
SM ids answer `<failed/>` (item-not-found) on any node.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

import structlog
import trio
from coredis.tokens import PureToken

from gateway.core.cluster import ClusterDirectory
from gateway.core.relay import entry_items, stream_key
from gateway.errors import StorageError
from gateway.storage.cluster_codec import Deliver, Record
from gateway.storage.redis_client import command
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID

log = structlog.get_logger(module=__name__)

#: Milliseconds a node's "left on purpose" mark lasts (the others reap it well before).
LEFT_FOR_MS: Final = 60_000

#: Seconds a reaper holds a dead node's lock (another takes over if it dies meanwhile).
REAP_LOCK: Final = 60.0
#: Stream entries read per round while accounting for a dead node's backlog.
REAP_BATCH: Final = 100

Unavailable = Callable[[Element, JID, None], Awaitable[None]]


async def run_reaper(
    cluster: ClusterDirectory,
    interval: float,
    unavailable: Unavailable,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Every `interval` seconds, account for the nodes that stopped beating; never
    returns. Redis failures are logged and the round tried again later."""
    task_status.started()
    while True:
        await trio.sleep(interval)
        try:
            for node in await dead_nodes(cluster):
                await reap(cluster, node, unavailable)
        except StorageError as exc:
            log.warning("reaper_failed", error=str(exc))


async def dead_nodes(cluster: ClusterDirectory) -> list[str]:
    """The listed nodes (other than this one) whose heartbeat key has expired."""
    listed = await command(cluster.redis.smembers(f"{cluster.prefix}nodes"), "reaper nodes")
    dead = []
    for raw in listed:
        node = raw.decode()
        if node != cluster.node and not await _beats(cluster, node):
            dead.append(node)
    return dead


async def _beats(cluster: ClusterDirectory, node: str) -> bool:
    """Whether `node`'s heartbeat key is there; a Redis failure raises (never "dead")."""
    key = f"{cluster.prefix}node:{node}"
    return await command(cluster.redis.exists([key]), "reaper liveness") > 0


async def reap(cluster: ClusterDirectory, node: str, unavailable: Unavailable) -> bool:
    """Account for dead `node` (module docstring) unless another reaper holds its lock;
    True when this one did it."""
    redis, prefix = cluster.redis, cluster.prefix
    lock = f"{prefix}reap:{node}"
    taken = await command(
        redis.set(lock, cluster.node.encode(), px=int(REAP_LOCK * 1000), condition=PureToken.NX),
        "reaper lock",
    )
    if not taken:
        return False
    if await _beats(cluster, node):
        # It beat again meanwhile (a slow node, or one restarted under its id): alive.
        await command(redis.delete([lock]), "reaper unlock")
        return False
    if await command(redis.exists([left_key(prefix, node)]), "reaper liveness"):
        log.info("node_left", node=node)  # stopped on purpose (`leave`): no alarm
    else:
        log.warning("node_dead", node=node)
    resources = await _drop_resources(cluster, node)
    # Other nodes reuse a remote resource they found for `seen_for` seconds: once those
    # have expired, nothing is sent to the dead node's stream any more.
    await trio.sleep(2 * cluster.seen_for)
    if await _beats(cluster, node):
        # Restarted under its id meanwhile: its stream and listing are its own again.
        log.info("node_back", node=node, resources=resources)
        await command(redis.delete([lock]), "reaper unlock")
        return False
    stanzas = await _reroute_stream(cluster, node, unavailable)
    await command(redis.srem(f"{prefix}nodes", [node]), "reaper forget")
    await command(redis.delete([cluster.held_key(node), left_key(prefix, node)]), "reaper forget")
    log.info("node_reaped", node=node, resources=resources, stanzas=stanzas)
    return True


def left_key(prefix: str, node: str) -> str:
    """Set by a node that stops on purpose, so its reaping is not reported as a death."""
    return f"{prefix}left:{node}"


async def leave(cluster: ClusterDirectory) -> None:
    """This node stops on purpose (drained, its sessions handed over): its heartbeat key
    goes at once, so the others stop asking it for sessions and reap it at their next
    look (rerouting whatever still reaches its stream) instead of three heartbeats
    later, and without calling it dead. Called after the heartbeat stopped."""
    prefix = cluster.prefix
    try:
        await command(
            cluster.redis.set(left_key(prefix, cluster.node), b"1", px=LEFT_FOR_MS), "leave"
        )
        await command(cluster.redis.delete([f"{prefix}node:{cluster.node}"]), "leave")
    except StorageError as exc:
        log.warning("cluster_leave_failed", error=str(exc))  # (then reaped as dead)
        return
    log.info("cluster_left")


async def _drop_resources(cluster: ClusterDirectory, node: str) -> int:
    """Delete the dead node's records and announce each available one gone."""
    redis, prefix = cluster.redis, cluster.prefix
    held = await command(redis.smembers(cluster.held_key(node)), "reaper held")
    dropped = 0
    for raw in held:
        try:
            full = JID.parse(raw.decode())
        except (UnicodeDecodeError, ValueError):
            continue
        key = f"{prefix}res:{full.bare()}"
        data = await command(redis.hget(key, full.resource or ""), "reaper record")
        if data is None:
            continue
        try:
            record = Record.decode(data)
        except StorageError:
            continue
        if record.node != node:
            continue  # another node took the JID since
        await command(redis.hdel(key, [full.resource or ""]), "reaper drop")
        dropped += 1
        if record.presence is not None:
            gone = Element(ns.CLIENT, "presence", {"type": "unavailable", "from": str(full)})
            for other in await cluster.resources(full.bare()):
                if other.is_available:
                    other.handle.send(gone)
    return dropped


async def _reroute_stream(cluster: ClusterDirectory, node: str, unavailable: Unavailable) -> int:
    """Every stanza waiting in the dead node's stream takes the fallbacks of an
    unavailable full JID (another resource, offline storage, an error to its sender)."""
    key = stream_key(cluster.prefix, node)
    start = "-"
    rerouted = 0
    finish = cluster.redis.register_script(_DELETE_IF_DONE)
    while True:
        entries = await command(
            cluster.redis.xrange(key, start=start, end="+", count=REAP_BATCH), "reaper stream"
        )
        for entry in entries:
            data = entry.field_values.get(b"b") if entry.field_values else None
            identifier = entry.identifier
            items = entry_items(
                identifier if isinstance(identifier, bytes) else identifier.encode(),
                data if isinstance(data, bytes) else None,
            )
            for item in items:
                if isinstance(item, Deliver):
                    await unavailable(item.stanza, item.to, None)
                    rerouted += 1
        if entries:
            last = entries[-1].identifier
            start = "(" + (last.decode() if isinstance(last, bytes) else str(last))
        if len(entries) < REAP_BATCH:
            # Deleted only if nothing came after what was read (a node that posted to
            # the dead one just before its records went): else that is read too.
            done: object = await command(finish(keys=[key], args=[start]), "reaper stream")
            if done:
                return rerouted


#: KEYS: a dead node's stream. ARGV: where reading it would go on ("-" or "(ID").
#: Deletes it and returns 1 when nothing is there from that point; else 0.
_DELETE_IF_DONE = """
local more = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', 1)
if #more > 0 then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""


async def forget_previous_run(cluster: ClusterDirectory) -> None:
    """At start: drop what a previous process with this node id left in Redis (a worker
    restarted by its supervisor keeps its id), announcing its resources gone. What other
    nodes relayed to that process and it never acknowledged is read again by this one's
    relay (its backlog first) and takes the fallbacks of an unavailable full JID."""
    try:
        dropped = await _drop_resources(cluster, cluster.node)
        await command(cluster.redis.delete([cluster.held_key(cluster.node)]), "reaper forget")
    except StorageError as exc:
        log.warning("previous_run_not_forgotten", error=str(exc))
        return
    if dropped:
        log.info("previous_run_forgotten", resources=dropped)
