"""The records that let a session's state leave this process: `sm_session` rows carry the
node, wall-clock time and epoch; resumption asks the table first; stale_h is stamped with
the wall clock."""

from __future__ import annotations

import trio
import trio.testing
from structlog.testing import capture_logs

from gateway.core.context import ServerContext
from gateway.storage.base import SmSessionRecord
from gateway.xmpp import namespaces as ns
from tests.helpers.inprocess import Connect, GatewayFactory
from tests.helpers.sm import LIMIT, RESUMABLE, authenticated, failed, online, sm_options

WALL = 1_800_000_000.0  # a wall clock the test controls (UNIX seconds)


async def test_enabling_resumption_registers_the_node_the_wall_clock_and_epoch_zero(
    gateway: ServerContext, connect: Connect
) -> None:
    gateway.wall_clock = lambda: WALL
    with trio.fail_after(LIMIT):
        peer = await online(connect, "alice", "phone", sm=RESUMABLE)
        assert peer.smid is not None
        record = await gateway.sm_sessions.lookup(peer.smid)
    assert record == SmSessionRecord(peer.smid, "alice@localhost", gateway.node, WALL, 0)
    assert gateway.node != "local"  # host name and process id when cluster.node is unset


async def test_a_resume_of_a_session_another_node_holds_is_item_not_found(
    gateway: ServerContext, connect: Connect
) -> None:
    await gateway.sm_sessions.register(
        SmSessionRecord("elsewhere-id", "alice@localhost", "gw2", WALL, 3)
    )
    with trio.fail_after(LIMIT), capture_logs() as logs:
        peer = await authenticated(connect, "alice")
        await peer.send(f"<resume xmlns='{ns.SM}' previd='elsewhere-id' h='0'/>")
        assert await peer.receive() == failed("item-not-found")
        assert await peer.raw.bind("laptop") == "alice@localhost/laptop"
    assert any(e["event"] == "sm_resume_elsewhere" and e["node"] == "gw2" for e in logs)


async def test_a_resume_of_another_users_record_is_item_not_found(
    gateway: ServerContext, connect: Connect
) -> None:
    with trio.fail_after(LIMIT):
        alice = await online(connect, "alice", "phone", sm=RESUMABLE)
        bob = await authenticated(connect, "bob")
        await bob.send(f"<resume xmlns='{ns.SM}' previd='{alice.smid}' h='0'/>")
        assert await bob.receive() == failed("item-not-found")


async def test_stale_h_is_stamped_with_the_wall_clock_and_the_node_is_configurable(
    gateway_factory: GatewayFactory, autojump_clock: trio.testing.MockClock
) -> None:
    ctx, connect = await gateway_factory(
        modules=sm_options(stale_h={"enabled": True}),
        cluster={"node": "gw1"},
    )
    assert ctx.node == "gw1"
    ctx.wall_clock = lambda: WALL
    with trio.fail_after(LIMIT):
        peer = await online(connect, "alice", "phone", sm=RESUMABLE)
        await peer.close()
    assert peer.smid is not None
    entry = await ctx.stale_h.get(peer.smid)
    assert entry is not None and entry.at == WALL
    assert await ctx.sm_sessions.lookup(peer.smid) is None
