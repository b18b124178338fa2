"""Two gateway processes as nodes of one cluster (a real redis-server, one SQLite file
shared by both, as the worker processes of one machine do): a node that is drained with
SIGTERM leaves its resumable sessions to the cluster, and their clients resume on the
other node with nothing lost."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from tests.helpers.client import RawClient, read_to_end
from tests.helpers.live import LiveGateway, live_gateway
from tests.helpers.redis import RedisServer
from tests.helpers.sm import RESUMABLE, Peer, body, first, message

pytestmark = pytest.mark.integration

PASSWORD = "cluster-secret"
#: Seconds a stanza may take to cross nodes, and a node to drain.
CROSSING = 10.0


def node_config(node: str, redis_url: str, database: Path) -> str:
    return (
        "general: {hosts: [localhost], shutdown_grace: 0.5}\n"
        "listen:\n"
        "  c2s: [{ip: 127.0.0.1, port: $c2s, tls: none}]\n"
        f"auth: {{database: {database}}}\n"
        "modules:\n"
        "  mod_stream_management: {backend: redis, resume_timeout: 300,"
        " stale_h: {enabled: true}}\n"
        f"cluster: {{redis: '{redis_url}', node: {node}, heartbeat: 0.5}}\n"
        "logging: {level: info, format: json}\n"
    )


@pytest.fixture
def nodes(tmp_path: Path, redis_url: str) -> Iterator[tuple[LiveGateway, LiveGateway]]:
    database = tmp_path / "shared.sqlite"
    (tmp_path / "gw1").mkdir()
    (tmp_path / "gw2").mkdir()
    with (
        live_gateway(
            tmp_path / "gw1",
            node_config("gw1", redis_url, database),
            password=PASSWORD,
            users=("alice", "bob"),
        ) as one,
        live_gateway(
            tmp_path / "gw2", node_config("gw2", redis_url, database), password=PASSWORD, users=()
        ) as two,
    ):
        yield one, two


async def login(node: LiveGateway, user: str, resource: str, *, sm: bool = False) -> Peer:
    raw = RawClient(await trio.open_tcp_stream("127.0.0.1", node.port))
    await raw.login(user, PASSWORD, resource=resource, mechanism="PLAIN")
    peer = Peer(raw)
    if sm:
        assert (await peer.enable(RESUMABLE)).tag == (ns.SM, "enabled")
    await peer.send("<presence/>")
    return peer


async def until(peer: Peer, wanted: Callable[[Element], bool]) -> Element:
    """The first element `wanted` accepts, within CROSSING seconds."""
    return await first(peer, wanted, CROSSING)


async def test_a_drained_node_leaves_its_sessions_and_they_resume_on_the_other_node(
    nodes: tuple[LiveGateway, LiveGateway],
) -> None:
    one, two = nodes
    alice = await login(two, "alice", "desk")
    bob = await login(one, "bob", "phone", sm=True)
    smid = bob.smid
    await until(bob, lambda e: e.name == "presence")  # its own, reflected
    await alice.send(message("bob@localhost/phone", "m1"))
    await alice.send(message("bob@localhost/phone", "m2"))
    await until(bob, lambda e: body(e) == "m2")
    handled = bob.h
    await bob.ack(handled - 1)  # m1 acknowledged; m2 handled, not acknowledged

    one.terminate()  # SIGTERM: gw1 drains
    error = await until(bob, lambda e: e.tag == (ns.STREAM, "error"))
    assert error.find(ns.STREAMS_ERRORS, "system-shutdown") is not None
    with trio.fail_after(CROSSING):
        while one.proc.poll() is None:
            await trio.sleep(0.05)
    assert one.proc.returncode == 0
    left = [e for e in one.log_events() if e.get("event") == "session_left_for_adoption"]
    assert len(left) == 1
    # While bob is between nodes, alice writes again: it waits offline for him.
    await alice.send(message("bob@localhost/phone", "m3"))

    raw = RawClient(await trio.open_tcp_stream("127.0.0.1", two.port))
    await raw.open()
    assert (await raw.auth("bob", PASSWORD, "PLAIN")).name == "success"
    raw.parser.reset()
    await raw.open()
    again = Peer(raw)
    await again.send(f"<resume xmlns='{ns.SM}' previd='{smid}' h='{handled - 1}'/>")
    answer = await until(again, lambda e: e.namespace == ns.SM)
    assert answer.tag == (ns.SM, "resumed"), answer
    assert answer.get("h") == "1"  # the server had handled his one stanza (presence)
    seen: list[str] = []
    with trio.fail_after(CROSSING):
        while len(seen) < 2:
            element = await again.receive()
            if element.name == "message":
                seen.append(body(element) or "")
    assert seen == ["m2", "m3"]  # resent, then flushed from offline storage
    # And the session lives on gw2 now.
    await alice.send(message("bob@localhost/phone", "m4"))
    assert body(await until(again, lambda e: e.name == "message")) == "m4"
    # gw1 said it was leaving: gw2 accounts for it at once, as left, not as dead.
    assert any(e.get("event") == "cluster_left" for e in one.log_events())
    with trio.fail_after(CROSSING):
        while not any(e.get("event") == "node_left" for e in two.log_events()):
            await trio.sleep(0.05)
    assert not any(e.get("event") == "node_dead" for e in two.log_events())


async def test_a_killed_node_is_accounted_for_and_nothing_relayed_to_it_is_lost(
    nodes: tuple[LiveGateway, LiveGateway],
) -> None:
    one, two = nodes
    desk = await login(two, "alice", "desk")
    phone = await login(one, "alice", "phone")  # (kept: its session lives until the kill)
    await until(desk, lambda e: e.name == "presence" and e.get("from") == "alice@localhost/phone")
    bob = await login(one, "bob", "phone")
    await until(bob, lambda e: e.name == "presence")

    one.proc.kill()  # SIGKILL: no drain, no goodbye
    one.proc.wait()
    # Sent at once: the directory still names gw1, so it goes into gw1's stream, where
    # nobody reads it any more.
    await desk.send(message("bob@localhost/phone", "while dead"))

    # Within three heartbeats (0.5 s each) and a reaper round, gw2 accounts for gw1:
    # alice's desk hears that her phone is gone...
    gone = await until(
        desk,
        lambda e: (
            e.name == "presence"
            and e.get("from") == "alice@localhost/phone"
            and e.get("type") == "unavailable"
        ),
    )
    assert gone is not None
    # ...and the stanza relayed to the dead node was rerouted: bob has no other
    # resource, so it waits offline and reaches his next session.
    with trio.fail_after(CROSSING):
        while not (reaped := [e for e in two.log_events() if e.get("event") == "node_reaped"]):
            await trio.sleep(0.05)
    laptop = await login(two, "bob", "laptop")
    stored = await until(laptop, lambda e: e.name == "message")
    assert body(stored) == "while dead"
    assert stored.find(ns.DELAY, "delay") is not None  # from offline storage
    assert len(reaped) == 1
    assert reaped[0]["node"] == "gw1" and reaped[0]["resources"] == 2
    assert reaped[0]["stanzas"] == 1
    # The dead node's own clients saw their connections end.
    for client in (phone, bob):
        with trio.fail_after(CROSSING):
            await read_to_end(client.raw)


def workers_config(redis_url: str) -> str:
    return (
        "general: {hosts: [localhost], shutdown_grace: 0.5, workers: 2}\n"
        "listen:\n"
        "  c2s: [{ip: 127.0.0.1, port: $c2s, tls: none}]\n"
        "auth: {database: data/accounts.sqlite}\n"
        "modules:\n"
        "  mod_stream_management: {backend: redis}\n"
        f"cluster: {{redis: '{redis_url}', node: gw, heartbeat: 0.5}}\n"
        "logging: {level: info, format: json}\n"
    )


async def test_two_workers_share_one_port_and_a_killed_worker_is_restarted(
    tmp_path: Path, redis_url: str, redis_server: RedisServer
) -> None:
    users = tuple(f"user{i}" for i in range(12))
    with live_gateway(
        tmp_path, workers_config(redis_url), password=PASSWORD, users=users, assert_clean_exit=True
    ) as supervisor:
        # The port answers once one worker listens; wait for both.
        with trio.fail_after(CROSSING):
            while sum(e.get("event") == "listening" for e in supervisor.log_events()) < 2:
                await trio.sleep(0.05)
        peers = [await login(supervisor, user, "r") for user in users]
        with trio.fail_after(CROSSING):
            while not (
                redis_server.cli("scard", "xg:held:gw-0") not in ("", "0")
                and redis_server.cli("scard", "xg:held:gw-1") not in ("", "0")
            ):
                await trio.sleep(0.05)
        # Both workers took connections (the kernel spreads them: SO_REUSEPORT), and
        # users on different workers chat through the cluster.
        held_by_0 = redis_server.cli("smembers", "xg:held:gw-0").split()
        held_by_1 = redis_server.cli("smembers", "xg:held:gw-1").split()
        assert len(held_by_0) + len(held_by_1) == len(users)
        first = next(
            p for p, u in zip(peers, users, strict=True) if f"{u}@localhost/r" in held_by_0
        )
        second_user = next(u for u in users if f"{u}@localhost/r" in held_by_1)
        second = peers[users.index(second_user)]
        await first.send(message(f"{second_user}@localhost/r", "across workers"))
        assert body(await until(second, lambda e: e.name == "message")) == "across workers"

        # SIGHUP reaches both workers (which log it and go on serving).
        supervisor.proc.send_signal(signal.SIGHUP)
        with trio.fail_after(CROSSING):
            while sum(e.get("event") == "sighup_ignored" for e in supervisor.log_events()) < 2:
                await trio.sleep(0.05)
        await first.send(message(f"{second_user}@localhost/r", "after SIGHUP"))
        assert body(await until(second, lambda e: e.name == "message")) == "after SIGHUP"

        # SIGKILL worker 0: the supervisor starts it again; worker 1 keeps serving.
        started = [e for e in supervisor.log_events() if e.get("event") == "worker_started"]
        victim = next(e["pid"] for e in started if e["worker"] == 0)
        os.kill(victim, signal.SIGKILL)
        with trio.fail_after(CROSSING):
            while not any(
                e.get("event") == "worker_started" and e["worker"] == 0 and e["pid"] != victim
                for e in supervisor.log_events()
            ):
                await trio.sleep(0.05)
        assert any(e.get("event") == "worker_died" for e in supervisor.log_events())
        await second.send(message(f"{second_user}@localhost/r", "still serving"))
        assert body(await until(second, lambda e: e.name == "message")) == "still serving"
        # New logins work, on whichever worker the kernel picks.
        again = await login(supervisor, users[0], "again")
        await again.send(message(f"{second_user}@localhost/r", "after the restart"))
        assert body(await until(second, lambda e: e.name == "message")) == "after the restart"


async def test_a_killed_nodes_sessions_answer_failed_with_the_h_redis_knew(
    nodes: tuple[LiveGateway, LiveGateway], redis_server: RedisServer
) -> None:
    one, two = nodes
    bob = await login(one, "bob", "phone", sm=True)  # its presence: the server's h is 1
    await bob.send(message("bob@localhost/phone", "one more"))  # h 2
    await until(bob, lambda e: body(e) == "one more")
    # The node mirrors its sessions' h into Redis every heartbeat (0.5 s).
    with trio.fail_after(CROSSING):
        while redis_server.cli("hget", f"xg:stale_h:{bob.smid}", "h") != "2":
            await trio.sleep(0.05)
    one.proc.kill()
    one.proc.wait()

    raw = RawClient(await trio.open_tcp_stream("127.0.0.1", two.port))
    await raw.open()
    assert (await raw.auth("bob", PASSWORD, "PLAIN")).name == "success"
    raw.parser.reset()
    await raw.open()
    await raw.send(f"<resume xmlns='{ns.SM}' previd='{bob.smid}' h='0'/>")
    with trio.fail_after(CROSSING):
        answer = await raw.receive()
    assert answer.tag == (ns.SM, "failed"), answer
    assert answer.find(ns.STANZAS_ERRORS, "item-not-found") is not None
    assert answer.get("h") == "2"  # XEP-0198 section 5: what the dead node had handled
