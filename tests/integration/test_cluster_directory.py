"""The cluster directory (`gateway.core.cluster.ClusterDirectory`) seen from two nodes.

The `Directory` contract itself runs against the cluster directory in
test_directory_contract.py; this suite is about what only a cluster has: gw1 and gw2
(each its own client and relay) share the session's real Redis (`redis_url`, an empty
database per test), see each other's resources as remote ones, take a full JID from each
other, ignore their own stale records, answer what the relay brings them, and keep going
while Redis is away. A third node (gw3, no members) is the cluster's neutral observer of
what Redis holds.

Members are `Peer`s, recording stand-ins for sessions: like a session's owner task, a
test records the full JID `bind` returned in the member and calls `publish` after it
changed the member's fields. Across real sockets the tests wait for what they expect
under a deadline (`CROSSING`); tasks run in a nursery the test closes itself, before the
clients are.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import pytest
import trio
from structlog.testing import capture_logs

from gateway.core.cluster import MISSED_HEARTBEATS, ClusterDirectory, RemoteHandle
from gateway.core.directory import Bound, Handle, Member, Resource
from gateway.core.reaper import reap
from gateway.core.relay import Relay
from gateway.core.relay import stream_key as relay_stream_key
from gateway.errors import StorageError, StreamErrorCondition
from gateway.storage.cluster_codec import Close, Deliver, Record, encode_batch
from gateway.storage.redis_client import Redis, open_redis
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID
from tests.helpers.members import RecordingMember as Peer
from tests.helpers.redis import free_port

PREFIX: Final = "xg:"
#: Seconds a change may take to be seen (real sockets to Redis and back).
CROSSING: Final = 5.0
#: Seconds between two looks at Redis while waiting for a state to be reached.
POLL: Final = 0.01
#: Heartbeat interval of the tests that run one (seconds).
BEAT: Final = 0.05

JULIET: Final = JID.parse("juliet@example.com")
ROMEO: Final = JID.parse("romeo@example.com")
BALCONY: Final = JULIET.with_resource("balcony")
GARDEN: Final = JULIET.with_resource("garden")


def available(show: str | None = None) -> Element:
    """An initial presence (with a `<show/>` when given)."""
    children = [Element(ns.CLIENT, "show", None, [show])] if show else []
    return Element(ns.CLIENT, "presence", None, children)


def chat(to: JID, text: str) -> Element:
    body = Element(ns.CLIENT, "body", None, [text])
    return Element(ns.CLIENT, "message", {"to": str(to), "type": "chat"}, [body])


async def bind(directory: ClusterDirectory, member: Member, bare: JID, resource: str) -> Bound:
    """Bind like a session's owner task: `bind`, then record the full JID in the member."""
    bound = await directory.bind(member, bare, resource)
    member.full_jid = bound.full_jid
    return bound


def fields(resource: Resource | None) -> tuple[JID, str, int, Element | None, bool] | None:
    """A resource's data without its handle (remote handles have no equality)."""
    if resource is None:
        return None
    return (
        resource.full_jid,
        resource.node,
        resource.priority,
        resource.presence,
        resource.interested,
    )


def remote_to(resource: Resource | None, node: str, full: JID, relay: Relay) -> bool:
    """`resource`'s handle is a RemoteHandle posting to `node` for `full` through `relay`."""
    handle = resource.handle if resource is not None else None
    return (
        isinstance(handle, RemoteHandle)
        and handle.node == node
        and handle.full_jid == full
        and handle.relay is relay
    )


def make_node(
    redis: Redis, url: str, node: str, *, max_pending: int = 100, seen_for: float = 0.0
) -> ClusterDirectory:
    """The cluster directory of `node` over `redis`, with a relay of its own; remote
    resources found by full JID are not reused (`seen_for` 0) unless a test says so, so
    that every lookup shows what Redis holds."""
    relay = Relay(url, node, prefix=PREFIX, max_pending=max_pending)
    return ClusterDirectory(redis, relay, node, prefix=PREFIX, seen_for=seen_for)


@pytest.fixture
async def gw1(redis_url: str) -> AsyncIterator[ClusterDirectory]:
    async with open_redis(redis_url) as client:
        node = make_node(client, redis_url, "gw1")
        yield node
        await node.aclose()


@pytest.fixture
async def gw2(redis_url: str) -> AsyncIterator[ClusterDirectory]:
    async with open_redis(redis_url) as client:
        node = make_node(client, redis_url, "gw2")
        yield node
        await node.aclose()


@pytest.fixture
async def gw3(redis_url: str) -> AsyncIterator[ClusterDirectory]:
    async with open_redis(redis_url) as client:
        node = make_node(client, redis_url, "gw3")
        yield node
        await node.aclose()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    """A client of the test's database, to look at (or damage) what the nodes wrote."""
    async with open_redis(redis_url) as client:
        yield client


@contextlib.asynccontextmanager
async def tasks() -> AsyncIterator[trio.Nursery]:
    """A nursery whose tasks (which never return) are cancelled when the block ends."""
    async with trio.open_nursery() as nursery:
        yield nursery
        nursery.cancel_scope.cancel()


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], *, timeout: float = CROSSING
) -> None:
    """Wait until `check` holds (it reads Redis or the logs), at most `timeout` seconds."""
    with trio.fail_after(timeout):
        while True:
            result = check()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await trio.sleep(POLL)


def logged(logs: Sequence[Mapping[str, Any]], event: str) -> bool:
    return any(line["event"] == event for line in logs)


async def stored(redis: Redis, full: JID) -> Record | None:
    """The record Redis holds for `full`, its session token left out (random)."""
    data = await redis.hget(f"{PREFIX}res:{full.bare()}", full.resource or "")
    return dataclasses.replace(Record.decode(data), session="") if data is not None else None


async def held(redis: Redis, node: str) -> set[bytes]:
    """The full JIDs Redis lists as held by `node`."""
    return set(await redis.smembers(f"{PREFIX}held:{node}"))


# -- seeing the other node's resources -----------------------------------------------------


async def test_a_resource_bound_on_one_node_is_seen_by_the_other_with_a_remote_handle(
    gw1: ClusterDirectory, gw2: ClusterDirectory
) -> None:
    presence = available("away")
    peer = Peer(priority=5, presence=presence, interested=True)
    bound = await bind(gw1, peer, JULIET, "balcony")
    assert bound == Bound(BALCONY, None)

    seen = await gw2.resource(BALCONY)
    assert fields(seen) == (BALCONY, "gw1", 5, presence, True)
    assert remote_to(seen, "gw1", BALCONY, gw2.relay)
    listed = await gw2.resources(JULIET)
    assert [fields(r) for r in listed] == [(BALCONY, "gw1", 5, presence, True)]
    assert remote_to(listed[0], "gw1", BALCONY, gw2.relay)
    # The owner still answers from memory, with the member itself as the handle.
    own = await gw1.resource(BALCONY)
    assert own is not None and own.handle is peer


async def test_each_node_lists_its_own_resources_from_memory_and_the_others_as_remote(
    gw1: ClusterDirectory, gw2: ClusterDirectory
) -> None:
    on_gw1, on_gw2 = Peer(priority=1), Peer(priority=2)
    await bind(gw1, on_gw1, JULIET, "balcony")
    await bind(gw2, on_gw2, JULIET, "garden")
    await bind(gw2, Peer(), ROMEO, "orchard")

    from_gw1 = {r.full_jid: r for r in await gw1.resources(JULIET)}
    assert set(from_gw1) == {BALCONY, GARDEN}
    assert from_gw1[BALCONY].handle is on_gw1
    assert fields(from_gw1[GARDEN]) == (GARDEN, "gw2", 2, None, False)
    assert remote_to(from_gw1[GARDEN], "gw2", GARDEN, gw1.relay)

    from_gw2 = {r.full_jid: r for r in await gw2.resources(JULIET)}
    assert set(from_gw2) == {BALCONY, GARDEN}
    assert from_gw2[GARDEN].handle is on_gw2
    assert remote_to(from_gw2[BALCONY], "gw1", BALCONY, gw2.relay)


async def test_a_publish_on_one_node_is_seen_by_the_other(
    gw1: ClusterDirectory, gw2: ClusterDirectory
) -> None:
    peer = Peer()
    await bind(gw1, peer, JULIET, "balcony")
    assert fields(await gw2.resource(BALCONY)) == (BALCONY, "gw1", 0, None, False)

    presence = available("chat")
    peer.priority, peer.presence, peer.interested = -3, presence, True
    await gw1.publish(peer)
    assert fields(await gw2.resource(BALCONY)) == (BALCONY, "gw1", -3, presence, True)
    assert [fields(r) for r in await gw2.resources(JULIET)] == [
        (BALCONY, "gw1", -3, presence, True)
    ]

    peer.presence = None
    await gw1.publish(peer)
    seen = await gw2.resource(BALCONY)
    assert seen is not None and not seen.is_available
    assert fields(seen) == (BALCONY, "gw1", -3, None, True)


async def test_an_unbind_on_one_node_removes_the_resource_for_the_other(
    gw1: ClusterDirectory, gw2: ClusterDirectory, redis: Redis
) -> None:
    peer = Peer()
    await bind(gw1, peer, JULIET, "balcony")
    assert await held(redis, "gw1") == {str(BALCONY).encode()}
    assert await gw1.unbind(peer)
    assert await gw2.resource(BALCONY) is None
    assert list(await gw2.resources(JULIET)) == []
    assert await held(redis, "gw1") == set()


async def test_a_remote_handle_posts_stanzas_and_closes_to_the_holding_nodes_relay(
    gw1: ClusterDirectory, redis: Redis, redis_url: str
) -> None:
    gw2 = make_node(redis, redis_url, "gw2", max_pending=2)
    await bind(gw1, Peer(), JULIET, "balcony")
    seen = await gw2.resource(BALCONY)
    assert seen is not None
    assert seen.handle.send(chat(BALCONY, "hi"))
    seen.handle.close(StreamErrorCondition.CONFLICT, "moved")
    assert gw2.relay.pending == 2
    # A full relay refuses: the caller keeps the stanza.
    assert not seen.handle.send(chat(BALCONY, "one too many"))


async def test_a_stanza_sent_through_a_remote_handle_reaches_the_member_on_its_node(
    gw1: ClusterDirectory, gw2: ClusterDirectory
) -> None:
    peer = Peer()
    await bind(gw1, peer, JULIET, "balcony")
    stanza = chat(BALCONY, "wherefore art thou")
    async with tasks() as nursery:
        await nursery.start(gw1.relay.run_receiver, gw1.deliver)
        await nursery.start(gw2.relay.run_sender)
        seen = await gw2.resource(BALCONY)
        assert seen is not None and seen.handle.send(stanza)
        await peer.wait(lambda: bool(peer.sent))
    assert peer.sent == [stanza]
    assert peer.closed == []


# -- taking a full JID from another node ----------------------------------------------------


async def test_binding_a_full_jid_held_on_another_node_replaces_it_with_a_remote_handle(
    gw1: ClusterDirectory, gw2: ClusterDirectory, gw3: ClusterDirectory
) -> None:
    presence = available()
    old = Peer(priority=4, presence=presence, interested=True)
    await bind(gw1, old, JULIET, "balcony")
    new = Peer(priority=1)
    bound = await bind(gw2, new, JULIET, "balcony")
    assert bound.full_jid == BALCONY
    assert fields(bound.replaced) == (BALCONY, "gw1", 4, presence, True)
    assert remote_to(bound.replaced, "gw1", BALCONY, gw2.relay)

    record = await gw2.resource(BALCONY)
    assert record is not None and record.handle is new
    assert fields(await gw3.resource(BALCONY)) == (BALCONY, "gw2", 1, None, False)
    # Closing the replaced session is the caller's business (through the handle).
    assert old.closed == [] and old.sent == []


async def test_after_a_remote_replacement_the_old_members_publish_and_unbind_change_nothing(
    gw1: ClusterDirectory, gw2: ClusterDirectory, gw3: ClusterDirectory, redis: Redis
) -> None:
    old = Peer()
    await bind(gw1, old, JULIET, "balcony")
    new = Peer(priority=2, presence=available("dnd"))
    await bind(gw2, new, JULIET, "balcony")
    expected = (BALCONY, "gw2", 2, available("dnd"), False)

    old.priority, old.presence, old.interested = 50, available(), True
    await gw1.publish(old)
    assert fields(await gw3.resource(BALCONY)) == expected
    assert fields(await gw1.resource(BALCONY)) == (BALCONY, "gw1", 50, available(), True)

    # gw1 still held it in memory (no close arrived yet): its unbind is true there...
    assert await gw1.unbind(old)
    # ...but the record in Redis is gw2's, and stays.
    assert fields(await gw3.resource(BALCONY)) == expected
    assert await stored(redis, BALCONY) == Record("gw2", "", 2, False, available("dnd"))
    assert await held(redis, "gw1") == set()
    assert await held(redis, "gw2") == {str(BALCONY).encode()}
    gw1_view = await gw1.resource(BALCONY)
    assert fields(gw1_view) == expected
    assert remote_to(gw1_view, "gw2", BALCONY, gw1.relay)


async def test_a_replacement_on_another_node_closes_the_old_session_through_the_relay(
    gw1: ClusterDirectory, gw2: ClusterDirectory
) -> None:
    old = Peer()
    await bind(gw1, old, JULIET, "balcony")
    new = Peer()
    bound = await bind(gw2, new, JULIET, "balcony")
    assert bound.replaced is not None
    async with tasks() as nursery:
        await nursery.start(gw1.relay.run_receiver, gw1.deliver)
        await nursery.start(gw2.relay.run_sender)
        bound.replaced.handle.close(StreamErrorCondition.CONFLICT, "Replaced")
        await old.wait(lambda: bool(old.closed))
    assert old.closed == [(StreamErrorCondition.CONFLICT, "Replaced", False)]
    assert await gw1.local.resource(BALCONY) is None
    assert not await gw1.unbind(old)
    record = await gw1.resource(BALCONY)
    assert record is not None and record.node == "gw2"
    assert new.closed == []


# -- stale records ---------------------------------------------------------------------------


async def test_a_record_naming_this_node_that_it_does_not_hold_is_ignored_by_its_lookups(
    gw1: ClusterDirectory, gw2: ClusterDirectory, redis: Redis
) -> None:
    # A record of gw2 whose unbind never reached Redis (gw2 holds nothing in memory).
    stale = Record("gw2", "old", 3, True, available()).encode()
    await redis.hset(f"{PREFIX}res:{JULIET}", {"balcony": stale})
    assert await gw2.resource(BALCONY) is None
    assert list(await gw2.resources(JULIET)) == []
    # The other nodes cannot know it is stale.
    assert fields(await gw1.resource(BALCONY)) == (BALCONY, "gw2", 3, available(), True)

    # gw2 binding it again takes it without a replacement (there is no session to close).
    peer = Peer()
    assert await bind(gw2, peer, JULIET, "balcony") == Bound(BALCONY, None)
    record = await gw2.resource(BALCONY)
    assert record is not None and record.handle is peer
    assert fields(await gw1.resource(BALCONY)) == (BALCONY, "gw2", 0, None, False)


async def test_a_damaged_record_is_skipped_by_lookups(
    gw1: ClusterDirectory, gw2: ClusterDirectory, redis: Redis
) -> None:
    await bind(gw2, Peer(), JULIET, "garden")
    await redis.hset(f"{PREFIX}res:{JULIET}", {"balcony": b"no separators"})
    assert [r.full_jid for r in await gw1.resources(JULIET)] == [GARDEN]
    assert await gw1.resource(BALCONY) is None
    peer = Peer()
    assert await bind(gw1, peer, JULIET, "balcony") == Bound(BALCONY, None)


# -- what the relay brings -------------------------------------------------------------------


async def test_a_relayed_close_releases_the_local_member_and_closes_it(
    gw1: ClusterDirectory,
) -> None:
    peer, other = Peer(), Peer()
    await bind(gw1, peer, JULIET, "balcony")
    await bind(gw1, other, JULIET, "garden")
    session = gw1.session_of(BALCONY)
    assert session is not None
    await gw1.deliver(Close(BALCONY, StreamErrorCondition.CONFLICT, "Replaced", session))
    assert peer.closed == [(StreamErrorCondition.CONFLICT, "Replaced", False)]
    assert await gw1.local.resource(BALCONY) is None
    assert [r.handle for r in await gw1.local.resources(JULIET)] == [other]
    # Released: its own unbind afterwards finds nothing to remove.
    assert not await gw1.unbind(peer)
    assert other.closed == []


async def test_a_relayed_close_for_a_resource_not_held_here_does_nothing(
    gw1: ClusterDirectory,
) -> None:
    peer = Peer()
    await bind(gw1, peer, JULIET, "garden")
    await gw1.deliver(Close(BALCONY, StreamErrorCondition.CONFLICT))
    assert peer.closed == []
    record = await gw1.resource(GARDEN)
    assert record is not None and record.handle is peer


async def test_a_close_relayed_for_a_replaced_session_spares_a_newer_one_with_the_same_jid(
    gw1: ClusterDirectory, gw2: ClusterDirectory
) -> None:
    first = Peer()
    await bind(gw1, first, JULIET, "balcony")
    taken = await bind(gw2, Peer(), JULIET, "balcony")
    assert taken.replaced is not None  # gw2 posts the close for `first` to gw1...
    handle = taken.replaced.handle
    assert isinstance(handle, RemoteHandle)
    newest = Peer()
    await bind(gw1, newest, JULIET, "balcony")  # ...which binds again before it arrives
    await gw1.deliver(Close(BALCONY, StreamErrorCondition.CONFLICT, "Replaced", handle.session))
    assert newest.closed == []
    assert first.closed == []  # (released by gw1's own replacement: nothing to close)


Call = tuple[Element, JID, Handle | None]


def recording_unavailable(directory: ClusterDirectory) -> list[Call]:
    calls: list[Call] = []

    async def unavailable(stanza: Element, to: JID, exclude: Handle | None) -> None:
        calls.append((stanza, to, exclude))

    directory.unavailable = unavailable
    return calls


async def test_a_relayed_stanza_for_a_held_resource_is_given_to_its_member(
    gw1: ClusterDirectory,
) -> None:
    calls = recording_unavailable(gw1)
    peer = Peer()
    await bind(gw1, peer, JULIET, "balcony")
    stanza = chat(BALCONY, "hello")
    await gw1.deliver(Deliver(BALCONY, stanza))
    assert peer.sent == [stanza]
    assert calls == []


async def test_a_relayed_stanza_for_a_resource_no_longer_held_takes_the_unavailable_rules(
    gw1: ClusterDirectory,
) -> None:
    calls = recording_unavailable(gw1)
    peer = Peer()
    await bind(gw1, peer, JULIET, "balcony")
    assert await gw1.unbind(peer)
    stanza = chat(BALCONY, "too late")
    await gw1.deliver(Deliver(BALCONY, stanza))
    assert calls == [(stanza, BALCONY, None)]
    assert peer.sent == []


async def test_a_relayed_stanza_refused_by_its_member_takes_the_unavailable_rules_without_it(
    gw1: ClusterDirectory,
) -> None:
    calls = recording_unavailable(gw1)
    closing = Peer(accepts=False)
    await bind(gw1, closing, JULIET, "balcony")
    stanza = chat(BALCONY, "while closing")
    await gw1.deliver(Deliver(BALCONY, stanza))
    assert len(calls) == 1
    assert calls[0][:2] == (stanza, BALCONY)
    assert calls[0][2] is closing


async def test_a_relayed_stanza_without_an_unavailable_callback_is_dropped_quietly(
    gw1: ClusterDirectory,
) -> None:
    assert gw1.unavailable is None
    await gw1.deliver(Deliver(BALCONY, chat(BALCONY, "nobody")))


# -- Redis unreachable -----------------------------------------------------------------------


@pytest.fixture
async def dead() -> AsyncIterator[ClusterDirectory]:
    """gw1 over a client for a port where nothing listens."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    async with open_redis(url) as client:
        yield make_node(client, url, "gw1")


async def test_with_redis_unreachable_bind_raises_and_leaves_nothing_bound(
    dead: ClusterDirectory,
) -> None:
    peer = Peer()
    with pytest.raises(StorageError):
        await dead.bind(peer, JULIET, "balcony")
    with pytest.raises(StorageError):
        await dead.bind(Peer(), JULIET, None)
    assert len(dead.local) == 0
    assert await dead.local.resource(BALCONY) is None
    assert list(await dead.resources(JULIET)) == []
    assert await dead.resource(BALCONY) is None


async def test_with_redis_unreachable_lookups_answer_with_local_resources_only(
    dead: ClusterDirectory,
) -> None:
    # Bound while Redis was there (only the memory side can be made now).
    peer = Peer(priority=2)
    await dead.local.bind(peer, JULIET, "balcony")
    peer.full_jid = BALCONY
    with capture_logs() as logs:
        listed = await dead.resources(JULIET)
        record = await dead.resource(BALCONY)
        missing = await dead.resource(GARDEN)
    assert [r.handle for r in listed] == [peer]
    assert record is not None and record.handle is peer
    assert missing is None
    assert logged(logs, "directory_read_failed")


async def test_with_redis_unreachable_publish_and_unbind_are_logged_not_raised(
    dead: ClusterDirectory,
) -> None:
    peer = Peer()
    await dead.local.bind(peer, JULIET, "balcony")
    peer.full_jid = BALCONY
    with capture_logs() as logs:
        peer.priority, peer.presence = 3, available()
        await dead.publish(peer)
        record = await dead.resource(BALCONY)
        assert record is not None and (record.priority, record.presence) == (3, available())
        assert await dead.unbind(peer)
    assert await dead.local.resource(BALCONY) is None
    assert logged(logs, "directory_publish_failed")
    assert logged(logs, "directory_unbind_failed")


async def test_a_bind_refused_for_redis_keeps_the_member_it_would_have_replaced(
    dead: ClusterDirectory,
) -> None:
    holder = Peer()
    await dead.local.bind(holder, JULIET, "balcony")
    holder.full_jid = BALCONY
    with pytest.raises(StorageError):
        await dead.bind(Peer(), JULIET, "balcony")
    record = await dead.resource(BALCONY)
    assert record is not None and record.handle is holder


class Health:
    """An `on_health` callback recording what it hears ("redis unreachable", None)."""

    def __init__(self) -> None:
        self.heard: list[str | None] = []
        self._changed = trio.Event()

    def __call__(self, reason: str | None) -> None:
        self.heard.append(reason)
        self._changed.set()

    async def wait_for(self, count: int) -> None:
        """Wait until `count` reports were heard (at most CROSSING seconds)."""
        with trio.fail_after(CROSSING):
            while len(self.heard) < count:
                self._changed = trio.Event()
                await self._changed.wait()


# -- heartbeat -------------------------------------------------------------------------------


async def test_the_heartbeat_sets_the_node_key_with_a_ttl_and_joins_the_nodes_set(
    gw1: ClusterDirectory, redis: Redis
) -> None:
    key = f"{PREFIX}node:gw1"
    health = Health()
    async with tasks() as nursery:
        # Started once the first beat was written.
        await nursery.start(gw1.run_heartbeat, BEAT, health)
        ttl = await redis.pttl(key)
        assert 0 < ttl <= BEAT * MISSED_HEARTBEATS * 1000
        assert await redis.smembers(f"{PREFIX}nodes") == {b"gw1"}
        # Still there after twice its time to live (time passing is what is tested): the
        # beats renew it.
        await trio.sleep(BEAT * MISSED_HEARTBEATS * 2)
        assert await redis.pttl(key) > 0
    # A healthy node reports nothing.
    assert health.heard == []
    # A node that stops beating is forgotten after MISSED_HEARTBEATS intervals.
    await eventually(lambda: key_gone(redis, key))


async def key_exists(redis: Redis, key: str) -> bool:
    return await redis.exists([key]) == 1


async def key_gone(redis: Redis, key: str) -> bool:
    return await redis.exists([key]) == 0


class RestartableRedis:
    """A redis-server of one test's own on a fixed port, which it can stop and start again
    (empty: nothing is saved), so that an outage is a real one."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        options = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        options += ["--appendonly", "no", "--dir", str(self.directory)]
        options += ["--logfile", str(self.directory / "redis.log")]
        self.process = await trio.lowlevel.open_process(["redis-server", *options])
        with trio.fail_after(10):
            while True:
                done = await trio.run_process(
                    ["redis-cli", "-p", str(self.port), "ping"],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
                if done.stdout.strip() == b"PONG":
                    return
                await trio.sleep(0.02)

    async def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            with trio.CancelScope(shield=True):
                await self.process.wait()
            self.process = None


@pytest.fixture
async def restartable(tmp_path: Path) -> AsyncIterator[RestartableRedis]:
    server = RestartableRedis(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_after_a_redis_outage_the_heartbeat_writes_the_nodes_records_again(
    restartable: RestartableRedis,
) -> None:
    async with open_redis(restartable.url) as one, open_redis(restartable.url) as three:
        await outage_and_return(
            restartable,
            make_node(one, restartable.url, "gw1"),
            make_node(three, restartable.url, "gw3"),
        )


async def outage_and_return(
    restartable: RestartableRedis, gw1: ClusterDirectory, gw3: ClusterDirectory
) -> None:
    juliet, romeo = Peer(priority=1, presence=available()), Peer(interested=True)
    await bind(gw1, juliet, JULIET, "balcony")
    await bind(gw1, romeo, ROMEO, "orchard")
    orchard = ROMEO.with_resource("orchard")
    health = Health()
    with capture_logs() as logs:
        async with tasks() as nursery:
            await nursery.start(gw1.run_heartbeat, BEAT, health)
            await restartable.stop()
            await health.wait_for(1)
            assert health.heard == ["redis unreachable"]

            # Meanwhile: a publish (logged, not raised), lookups from memory.
            juliet.priority, juliet.presence = 9, available("xa")
            await gw1.publish(juliet)
            assert {r.full_jid for r in await gw1.resources(JULIET)} == {BALCONY}

            await restartable.start()  # empty, as after a restart without persistence
            # Well again once the records are written.
            await health.wait_for(2)
            assert health.heard == ["redis unreachable", None]
            assert fields(await gw3.resource(BALCONY)) == (
                BALCONY,
                "gw1",
                9,
                available("xa"),
                False,
            )
            assert fields(await gw3.resource(orchard)) == (orchard, "gw1", 0, None, True)
            gw1_held = await gw3.redis.smembers(f"{PREFIX}held:gw1")
            assert gw1_held == {str(BALCONY).encode(), str(orchard).encode()}
            assert await gw3.redis.pttl(f"{PREFIX}node:gw1") > 0
            assert await gw3.redis.smembers(f"{PREFIX}nodes") == {b"gw1"}
    assert logged(logs, "directory_publish_failed")


async def refuse_heartbeats(redis: Redis) -> None:
    """Make the heartbeat's SADD fail (the nodes set is a string) while Redis stays up for
    everything else: one node's outage, as when only its link to Redis is cut."""
    await redis.delete([f"{PREFIX}nodes"])
    await redis.set(f"{PREFIX}nodes", b"not a set")


async def test_writing_records_again_after_an_outage_keeps_a_resource_another_node_took(
    gw1: ClusterDirectory, gw2: ClusterDirectory, gw3: ClusterDirectory, redis: Redis
) -> None:
    await bind(gw1, Peer(), JULIET, "balcony")
    health = Health()
    async with tasks() as nursery:
        await nursery.start(gw1.run_heartbeat, BEAT, health)
        await refuse_heartbeats(redis)
        await health.wait_for(1)
        # gw2 can reach Redis: a new session there takes the JID (gw1's is replaced).
        bound = await bind(gw2, Peer(priority=7), JULIET, "balcony")
        assert bound.replaced is not None and bound.replaced.node == "gw1"
        await redis.delete([f"{PREFIX}nodes"])
        await health.wait_for(2)
    assert health.heard == ["redis unreachable", None]
    record = await gw3.resource(BALCONY)
    assert record is not None and record.node == "gw2"


async def test_an_unbind_that_failed_during_an_outage_leaves_no_record_after_it(
    gw1: ClusterDirectory, gw3: ClusterDirectory, redis: Redis
) -> None:
    peer = Peer(presence=available())
    await bind(gw1, peer, JULIET, "balcony")
    health = Health()
    with capture_logs() as logs:
        async with tasks() as nursery:
            await nursery.start(gw1.run_heartbeat, BEAT, health)
            await refuse_heartbeats(redis)
            await health.wait_for(1)
            # The unbind script fails too (its held set is a string for now).
            await redis.delete([f"{PREFIX}held:gw1"])
            await redis.set(f"{PREFIX}held:gw1", b"not a set")
            assert await gw1.unbind(peer)
            assert logged(logs, "directory_unbind_failed")
            await redis.delete([f"{PREFIX}nodes", f"{PREFIX}held:gw1"])
            await health.wait_for(2)
    assert health.heard == ["redis unreachable", None]
    assert await gw3.resource(BALCONY) is None


async def test_records_lost_by_redis_between_two_heartbeats_are_written_again(
    gw1: ClusterDirectory, gw3: ClusterDirectory, redis: Redis
) -> None:
    await bind(gw1, Peer(), JULIET, "balcony")
    async with tasks() as nursery:
        await nursery.start(gw1.run_heartbeat, BEAT, Health())
        await redis.flushall()
        await eventually(lambda: key_exists(redis, f"{PREFIX}node:gw1"))
        await eventually(lambda: has_resource(gw3, BALCONY), timeout=BEAT * 20)


async def test_a_node_writing_many_records_again_keeps_beating_meanwhile(
    gw1: ClusterDirectory, redis: Redis
) -> None:
    """Re-registering takes longer than the heartbeat's expiry (three beats) when a node
    holds many resources; its key must not expire meanwhile, or the others would reap it
    and drop the very records it is writing."""
    count = 1500
    for n in range(count):
        await bind(gw1, Peer(), JULIET, f"r{n}")
    key = f"{PREFIX}node:{gw1.node}"
    gaps: list[int] = []
    async with tasks() as nursery:
        await nursery.start(gw1.run_heartbeat, BEAT, Health())
        await redis.flushall()  # Redis lost everything: gw1 writes its records again
        await eventually(lambda: key_exists(redis, key))
        with trio.fail_after(60):
            while await redis.hlen(f"{PREFIX}res:{JULIET}") < count:
                if not await redis.exists([key]):
                    gaps.append(await redis.hlen(f"{PREFIX}res:{JULIET}"))
                await trio.sleep(BEAT / 5)
    assert gaps == []  # (records written when the key was seen missing)


async def has_resource(directory: ClusterDirectory, full: JID) -> bool:
    return await directory.resource(full) is not None


async def test_a_remote_resource_found_by_full_jid_is_reused_for_a_while(
    redis: Redis, redis_url: str
) -> None:
    """Routing a chat asks Redis once per SEEN_FOR, not once per stanza; a change on
    the other node shows after that (the other node's fallbacks cover the gap)."""
    gw1 = make_node(redis, redis_url, "gw1")
    gw2 = make_node(redis, redis_url, "gw2", seen_for=0.3)
    peer = Peer()
    await bind(gw1, peer, JULIET, "balcony")
    first = await gw2.resource(BALCONY)
    assert first is not None and first.node == "gw1"
    assert await gw1.unbind(peer)
    assert await gw2.resource(BALCONY) is first  # reused, no round trip
    await trio.sleep(0.35)
    assert await gw2.resource(BALCONY) is None
    # A bare JID lookup always asks Redis (presence and bare-JID delivery need it fresh).
    await bind(gw1, Peer(), JULIET, "garden")
    assert [r.full_jid for r in await gw2.resources(JULIET)] == [GARDEN]


async def test_the_reaper_reroutes_what_reaches_a_dead_nodes_stream_while_it_reaps(
    redis: Redis, redis_url: str
) -> None:
    """A node that found a resource on the dead node a moment before may still post to
    its stream while the reaper works: the reaper waits out that reuse (`seen_for`) and
    deletes the stream only once it has read it to the end, so that stanza is rerouted
    too, not deleted with the stream."""
    reaper = make_node(redis, redis_url, "gw1", seen_for=0.3)
    key = relay_stream_key(PREFIX, "gw9")
    early = Element(ns.CLIENT, "message", {"to": str(BALCONY), "id": "early"})
    late = Element(ns.CLIENT, "message", {"to": str(BALCONY), "id": "late"})
    await redis.xadd(key, {b"b": encode_batch([Deliver(BALCONY, early)])})
    rerouted: list[str | None] = []

    async def unavailable(stanza: Element, to: JID, exclude: Handle | None) -> None:
        rerouted.append(stanza.get("id"))

    async def post_late() -> None:
        await trio.sleep(0.2)  # (inside the reaper's wait)
        await redis.xadd(key, {b"b": encode_batch([Deliver(BALCONY, late)])})

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(post_late)
            assert await reap(reaper, "gw9", unavailable)
    assert rerouted == ["early", "late"]
    assert await redis.exists([key]) == 0
