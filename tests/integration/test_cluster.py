"""Two nodes of a cluster in one process, sharing a real Redis: stanzas, presence and
resource conflicts cross from one node to the other (DESIGN section 6).

Each node is a whole gateway (its own listeners, connection tasks and SQLite file with
the same accounts) joined to the cluster by `cluster.redis`; clients talk to a node over
memory streams. Delivery across nodes goes through Redis (real sockets), so the tests
wait for what they expect with a deadline instead of for all tasks to block.
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from gateway.core.context import ServerContext
from gateway.core.handoff import snapshot_of
from gateway.errors import StreamErrorCondition
from gateway.storage.adoptable_redis import RedisAdoptableStore
from gateway.storage.cluster_codec import Moved
from gateway.storage.redis_client import open_redis
from gateway.storage.snapshot import encode_snapshot
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from tests.helpers.accounts import PASSWORD
from tests.helpers.client import RawClient
from tests.helpers.inprocess import (
    Connect,
    add_accounts,
    local_session,
    make_config,
    start_connectable,
)
from tests.helpers.redis import run_redis
from tests.helpers.sm import RESUMABLE, Peer, body, first, message, online, resume

#: Seconds a stanza may take to cross (real sockets to Redis and back).
CROSSING = 5.0

Start = Callable[..., Awaitable[tuple[ServerContext, Connect]]]


@pytest.fixture
async def start_node(
    nursery: trio.Nursery, tmp_path: Path, cert_files: tuple[Path, Path], redis_url: str
) -> Start:
    clients: list[RawClient] = []

    async def start(node: str, **sm: object) -> tuple[ServerContext, Connect]:
        directory = tmp_path / node
        directory.mkdir()
        config = make_config(
            directory,
            cert_files,
            cluster={"redis": redis_url, "node": node, "heartbeat": 1},
            modules={"mod_stream_management": {"backend": "redis", **sm}},
        )
        add_accounts(config)
        return await start_connectable(nursery, config, clients)

    return start


async def until(peer: Peer, wanted: Callable[[Element], bool]) -> Element:
    """The first element `wanted` accepts, within CROSSING seconds."""
    return await first(peer, wanted, CROSSING)


async def test_a_message_to_a_full_jid_on_another_node_arrives_and_the_answer_comes_back(
    start_node: Start,
) -> None:
    _one, connect_one = await start_node("gw1")
    _two, connect_two = await start_node("gw2")
    alice = await online(connect_one, "alice", "desk")
    bob = await online(connect_two, "bob", "phone")
    await alice.send(message("bob@localhost/phone", "hello"))
    got = await until(bob, lambda e: body(e) == "hello")
    assert got.get("from") == "alice@localhost/desk"
    await bob.send(message("alice@localhost/desk", "hi back"))
    back = await until(alice, lambda e: body(e) == "hi back")
    assert back.get("from") == "bob@localhost/phone"


async def test_a_message_to_a_bare_jid_goes_to_the_top_priority_resource_on_any_node(
    start_node: Start,
) -> None:
    _one, connect_one = await start_node("gw1")
    _two, connect_two = await start_node("gw2")
    alice = await online(connect_one, "alice", "desk")
    bob_desk = await online(connect_one, "bob", "desk", priority=1)
    bob_phone = await online(connect_two, "bob", "phone", priority=5)
    await alice.send(message("bob@localhost", "to the phone"))
    got = await until(bob_phone, lambda e: body(e) == "to the phone")
    assert got.get("to") == "bob@localhost"
    # The desk (lower priority, other node) did not get it: its next message is this one.
    await alice.send(message("bob@localhost/desk", "to the desk"))
    first = await until(bob_desk, lambda e: e.name == "message")
    assert body(first) == "to the desk"


async def test_presence_crosses_between_the_resources_of_one_account(start_node: Start) -> None:
    _one, connect_one = await start_node("gw1")
    _two, connect_two = await start_node("gw2")
    desk = await online(connect_one, "alice", "desk")
    phone = await online(connect_two, "alice", "phone", priority=None)
    await phone.send("<presence><show>away</show></presence>")
    seen = await until(
        desk, lambda e: e.name == "presence" and e.get("from") == "alice@localhost/phone"
    )
    assert seen.find_text(ns.CLIENT, "show") == "away"
    # RFC 6121 4.4.2: the new resource learns the presence of the account's others.
    told = await until(
        phone, lambda e: e.name == "presence" and e.get("from") == "alice@localhost/desk"
    )
    assert told.get("type") is None
    await phone.send("<presence type='unavailable'/>")
    gone = await until(
        desk, lambda e: e.name == "presence" and e.get("from") == "alice@localhost/phone"
    )
    assert gone.get("type") == "unavailable"


async def test_binding_a_resource_held_on_another_node_ends_the_older_session_with_conflict(
    start_node: Start,
) -> None:
    _one, connect_one = await start_node("gw1")
    _two, connect_two = await start_node("gw2")
    watcher = await online(connect_one, "alice", "phone")
    old = await online(connect_one, "alice", "desk")
    new = await online(connect_two, "alice", "desk", priority=None)
    error = await until(old, lambda e: e.tag == (ns.STREAM, "error"))
    assert error.find(ns.STREAMS_ERRORS, "conflict") is not None
    # Its unavailable reached the account's other resource, once.
    gone = await until(
        watcher,
        lambda e: e.name == "presence" and e.get("type") == "unavailable",
    )
    assert gone.get("from") == "alice@localhost/desk"
    # And the new holder of the JID gets what is sent to it, from either node.
    await watcher.send(message("alice@localhost/desk", "to the new desk"))
    assert body(await until(new, lambda e: e.name == "message")) == "to the new desk"


async def test_a_session_parked_on_one_node_resumes_on_the_other_with_nothing_lost(
    start_node: Start,
) -> None:
    one, connect_one = await start_node("gw1")
    two, connect_two = await start_node("gw2")
    alice = await online(connect_two, "alice", "desk")
    bob = await online(connect_one, "bob", "phone", sm=RESUMABLE)
    smid = bob.smid
    await alice.send(message("bob@localhost/phone", "m1"))
    await alice.send(message("bob@localhost/phone", "m2"))
    await until(bob, lambda e: body(e) == "m2")
    await bob.ack(bob.h - 1)  # m1 acknowledged, m2 handled but not acknowledged
    await bob.cut()
    await alice.send(message("bob@localhost/phone", "m3"))  # for the parked session on gw1
    with trio.fail_after(CROSSING):
        while (parked := await local_session(one, "bob@localhost/phone")) is None or (
            parked.sm is None or parked.sm.buffer_size < 2
        ):
            await trio.sleep(0.01)

    again, answer = await resume(connect_two, "bob", smid, bob.h - 1)
    assert answer.tag == (ns.SM, "resumed"), answer
    resent = [body(e) for e in await collect(again, 2)]
    assert resent == ["m2", "m3"]  # every unacked stanza, once, in order
    assert await local_session(one, "bob@localhost/phone") is None  # gone from gw1
    moved = await local_session(two, "bob@localhost/phone")
    assert moved is not None and moved.sm is not None and moved.sm.smid == smid
    # The session lives on gw2 now: what is sent to it arrives there.
    await alice.send(message("bob@localhost/phone", "m4"))
    assert body(await until(again, lambda e: e.name == "message")) == "m4"
    # The relay is at least once: the same snapshot arriving again changes nothing.
    assert two.migrations is not None
    copy = encode_snapshot(snapshot_of(moved, expires_at=2e9, epoch=9, peer="copy"))
    await two.migrations.receive(Moved(smid or "", copy))
    assert await local_session(two, "bob@localhost/phone") is moved
    # A session arriving after its lender gave up is kept for a later resume, not
    # parked: parking would end, with conflict, the session now holding its JID.
    late = encode_snapshot(
        dataclasses.replace(
            snapshot_of(moved, expires_at=2e9, epoch=9, peer="late"), smid="late-session-0000000"
        )
    )
    await two.migrations.receive(Moved("late-session-0000000", late))
    assert await local_session(two, "bob@localhost/phone") is moved
    assert two.adoptable is not None
    assert await two.adoptable.take("late-session-0000000") == late
    await alice.send(message("bob@localhost/phone", "m5"))
    assert body(await until(again, lambda e: e.name in ("message", "error"))) == "m5"


async def test_a_session_left_for_adoption_that_nobody_takes_ends_with_nothing_lost(
    start_node: Start,
) -> None:
    sm = {"resume_timeout": 3, "stale_h": {"enabled": True}}
    one, connect_one = await start_node("gw1", **sm)
    _two, connect_two = await start_node("gw2", **sm)
    desk = await online(connect_two, "bob", "desk")
    alice = await online(connect_two, "alice", "desk")
    phone = await online(connect_one, "bob", "phone", sm=RESUMABLE)
    await until(desk, lambda e: e.name == "presence" and e.get("from") == "bob@localhost/phone")
    await alice.send(message("bob@localhost/phone", "m1"))
    await alice.send(message("bob@localhost/phone", "m2"))
    await until(phone, lambda e: body(e) == "m2")
    await phone.cut()  # nothing acknowledged
    with trio.fail_after(CROSSING):
        while (parked := await local_session(one, "bob@localhost/phone")) is None or (
            parked.sm is None or parked.sm.buffer_size < 2
        ):
            await trio.sleep(0.01)
    # gw1 drains: the parked session goes to the adoptable store (as at SIGTERM)...
    parked.close(StreamErrorCondition.SYSTEM_SHUTDOWN, "draining", handoff=True)
    with trio.fail_after(CROSSING):
        while await local_session(one, "bob@localhost/phone") is not None:
            await trio.sleep(0.01)
    # ...and no client comes back for it: when its time is up, a node's sweep ends it
    # as a parked session ends. Its messages reach bob's other resource, its
    # unavailable presence goes out, and its h is remembered cluster-wide.
    seen = await collect(desk, 3)
    assert [body(e) for e in seen if e.name == "message"] == ["m1", "m2"]
    assert [(e.get("from"), e.get("type")) for e in seen if e.name == "presence"] == [
        ("bob@localhost/phone", "unavailable")
    ]
    _peer, answer = await resume(connect_two, "bob", phone.smid, 0)
    assert answer.tag == (ns.SM, "failed"), answer
    assert answer.get("h") == "1"  # the initial presence it sent


async def test_a_session_swept_after_its_time_leaves_a_newer_session_on_its_jid_alone(
    start_node: Start,
) -> None:
    sm = {"resume_timeout": 3, "stale_h": {"enabled": True}}
    one, connect_one = await start_node("gw1", **sm)
    _two, connect_two = await start_node("gw2", **sm)
    alice = await online(connect_two, "alice", "desk")
    phone = await online(connect_one, "bob", "phone", sm=RESUMABLE)
    await alice.send(message("bob@localhost/phone", "m1"))
    await until(phone, lambda e: body(e) == "m1")
    await phone.cut()
    with trio.fail_after(CROSSING):
        while (parked := await local_session(one, "bob@localhost/phone")) is None:
            await trio.sleep(0.01)
    parked.close(StreamErrorCondition.SYSTEM_SHUTDOWN, "draining", handoff=True)
    with trio.fail_after(CROSSING):
        while await local_session(one, "bob@localhost/phone") is not None:
            await trio.sleep(0.01)
    # The client gives up on resuming and opens a new session with the same resource.
    newer = await online(connect_two, "bob", "phone")
    # The old one is swept when its time is up: its message reaches the new session,
    # which is neither ended (no conflict) nor announced gone.
    rerouted = await until(newer, lambda e: e.name == "message")
    assert body(rerouted) == "m1"
    await newer.send(f"<iq type='get' id='alive' to='localhost'><ping xmlns='{ns.PING}'/></iq>")
    answer = await until(newer, lambda e: e.name == "iq" or e.tag == (ns.STREAM, "error"))
    assert answer.get("id") == "alive", answer


async def test_a_node_loads_the_clusters_scripts_into_redis_when_it_starts(
    start_node: Start, redis_url: str
) -> None:
    # (Else the first uses, a reconnect storm's, each fail with NOSCRIPT and load them.)
    async with open_redis(redis_url) as redis:
        await redis.script_flush()  # (the cache outlives FLUSHALL: earlier tests loaded them)
        one, _connect = await start_node("gw1")
        assert isinstance(one.adoptable, RedisAdoptableStore)
        shas = [script.sha for script in one.adoptable.scripts]
        assert await redis.script_exists(shas) == (True,) * len(shas)


async def test_a_resume_on_another_node_by_another_user_is_item_not_found(
    start_node: Start,
) -> None:
    one, connect_one = await start_node("gw1")
    _two, connect_two = await start_node("gw2")
    bob = await online(connect_one, "bob", "phone", sm=RESUMABLE)
    await bob.cut()
    _peer, answer = await resume(connect_two, "alice", bob.smid, 0)
    assert answer.tag == (ns.SM, "failed")
    assert answer.find(ns.STANZAS_ERRORS, "item-not-found") is not None
    assert await local_session(one, "bob@localhost/phone") is not None  # still parked


async def collect(peer: Peer, count: int) -> list[Element]:
    """The next `count` stanzas (nonzas skipped), within CROSSING seconds."""
    found: list[Element] = []
    with trio.fail_after(CROSSING):
        while len(found) < count:
            element = await peer.receive()
            if element.name in ("message", "presence", "iq"):
                found.append(element)
    return found


async def test_with_redis_gone_a_node_serves_its_sessions_refuses_new_ones_and_recovers(
    nursery: trio.Nursery, tmp_path: Path, cert_files: tuple[Path, Path]
) -> None:
    servers = run_redis(tmp_path)  # a Redis of this test's own: it is stopped mid-test
    redis = next(servers)
    config = make_config(
        tmp_path,
        cert_files,
        cluster={"redis": redis.url, "node": "gw1", "heartbeat": 0.2},
        modules={"mod_stream_management": {"backend": "redis"}},
    )
    add_accounts(config)
    clients: list[RawClient] = []
    ctx, connect = await start_connectable(nursery, config, clients)
    alice = await online(connect, "alice", "desk")
    bob = await online(connect, "bob", "phone")

    redis.process.terminate()
    redis.process.wait()
    await health_becomes(ctx, "redis unreachable")
    # Sessions of this node keep chatting.
    await alice.send(message("bob@localhost/phone", "still here"))
    assert body(await until(bob, lambda e: e.name == "message")) == "still here"
    # A new session cannot be made known to the cluster: refused, clearly.
    late = await connect(2, memory=True)
    await late.open()
    assert (await late.auth("carol", PASSWORD, "PLAIN")).name == "success"
    late.parser.reset()
    await late.open()
    await late.send("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
    assert await late.expect_stream_error() == "internal-server-error"

    # Redis comes back (empty, on the same port): the node registers its sessions again.
    command: list[str] = list(redis.process.args)  # type: ignore[arg-type]  # a list there
    again = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await health_becomes(ctx, None)
        assert "desk" in redis.cli("hkeys", "xg:res:alice@localhost")
        carol = await online(connect, "carol", "laptop")
        await carol.send(message("alice@localhost/desk", "back"))
        assert body(await until(alice, lambda e: e.name == "message")) == "back"
    finally:
        again.terminate()
        again.wait()
        servers.close()


async def health_becomes(ctx: ServerContext, unhealthy: str | None) -> None:
    """Wait (real time, bounded) until the node's health says `unhealthy`."""
    with trio.fail_after(CROSSING):
        while ctx.unhealthy != unhealthy:
            await trio.sleep(0.05)


async def test_an_ended_session_answers_failed_with_its_h_on_any_node(
    nursery: trio.Nursery, tmp_path: Path, cert_files: tuple[Path, Path], redis_url: str
) -> None:
    clients: list[RawClient] = []
    nodes = []
    for node in ("gw1", "gw2"):
        directory = tmp_path / node
        directory.mkdir()
        config = make_config(
            directory,
            cert_files,
            cluster={"redis": redis_url, "node": node, "heartbeat": 1},
            modules={"mod_stream_management": {"backend": "redis", "stale_h": {"enabled": True}}},
        )
        add_accounts(config)
        nodes.append(await start_connectable(nursery, config, clients))
    (_one, connect_one), (_two, connect_two) = nodes
    bob = await online(connect_one, "bob", "phone", sm=RESUMABLE)
    await bob.send(message("bob@localhost", "to myself"))  # the server's h: 2 (presence, this)
    await until(bob, lambda e: body(e) == "to myself")
    await bob.close()  # ends the session: its h goes to stale_h, in Redis
    _peer, answer = await resume(connect_two, "bob", bob.smid, 0)
    assert answer.tag == (ns.SM, "failed"), answer
    assert answer.find(ns.STANZAS_ERRORS, "item-not-found") is not None
    assert answer.get("h") == "2"  # XEP-0198 section 5: what gw1 had handled
