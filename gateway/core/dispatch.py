"""The wiring of a cluster node's inbox (DESIGN section 6): where the items other nodes
relay here go, and where items for a node that has gone go instead."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog

from gateway.core.cluster import ClusterDirectory
from gateway.core.context import ServerContext
from gateway.core.handoff import read_snapshot
from gateway.core.migration import Migrations
from gateway.core.relay import Relay
from gateway.core.revive import serve_revived
from gateway.storage.cluster_codec import Close, Deliver, Item, Moved

log = structlog.get_logger(module=__name__)


def cluster_dispatcher(
    ctx: ServerContext, relay: Relay, cluster: ClusterDirectory
) -> Callable[[Item], Awaitable[None]]:
    """Where the items other nodes relay here go: stanzas and closes to the directory,
    session moves to this node's `Migrations` (made here: it parks arriving sessions in
    the connection handlers' nursery)."""

    async def adopt(data: bytes) -> bool:
        revivable = read_snapshot(data)
        if revivable is None:
            return False
        smid = revivable.snapshot.smid
        if smid in ctx.resume.slots:
            # Delivered twice (the relay is at least once): this node has it already.
            log.info("sm_move_duplicate", smid=smid)
            return True
        if ctx.handler_nursery is None or ctx.draining:
            # Not serving (starting, or stopping): left for whichever node the client
            # reaches, not dropped.
            assert ctx.adoptable is not None
            await ctx.adoptable.put(smid, data, revivable.snapshot.expires_at)
            return False
        await ctx.handler_nursery.start(serve_revived, ctx, revivable)
        return smid in ctx.resume.slots

    assert ctx.adoptable is not None
    ctx.migrations = migrations = Migrations(
        relay, ctx.node, ctx.resume, adopt, adoptable=ctx.adoptable, alive=cluster.is_alive
    )

    async def dispatch(item: Item) -> None:
        if isinstance(item, Deliver | Close):
            await cluster.deliver(item)
        else:
            await migrations.receive(item)

    async def undeliverable(item: Item) -> None:
        # For a node gone since it was posted: a stanza takes the rules for an
        # unavailable resource, a session waits in the adoptable store.
        if isinstance(item, Deliver) and cluster.unavailable is not None:
            await cluster.unavailable(item.stanza, item.to, None)
        elif isinstance(item, Moved):
            await migrations.keep(item)

    relay.undeliverable = undeliverable

    return dispatch
