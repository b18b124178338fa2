"""Resumable sessions survive a restart (issue 4: "resumable sessions kept resumable until
they end"; DESIGN sections 5 and 6).

Each test runs one gateway, stops it the way an operator does (SIGTERM: drain, then every
stream closed with system-shutdown), and starts a second gateway on the same database, as
a restart would. Clients are scripted over memory streams with `autojump_clock`, so the
drain grace and resume timeouts pass in virtual time.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
import trio.testing
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from gateway.app import run_server
from gateway.config import GatewayConfig
from gateway.core.connection import serve_connection
from gateway.core.context import ServerContext
from gateway.errors import StorageError
from gateway.net.transport import PeerInfo, StreamTransport
from gateway.storage.base import HandoffStore, SessionSnapshot
from gateway.storage.codec import encode_stanza
from gateway.storage.handoff_sqlite import SqliteHandoffStore
from gateway.storage.offline_sqlite import SqliteOfflineStore
from gateway.storage.snapshot import decode_snapshot, encode_snapshot
from gateway.storage.sqlite import SqliteAccountStore
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID
from tests.conftest import PASSWORD, USERS, Connect, connector, make_config
from tests.helpers.client import RawClient
from tests.integration.test_sm_spec import (
    LIMIT,
    PLAIN,
    RESUMABLE,
    Peer,
    bodies,
    condition_of,
    failed,
    message,
    offline_delivery,
    online,
    presences,
    resume,
    sm_options,
    stream_error,
)

ALICE = "alice@localhost/phone"


def setup(
    tmp_path: Path,
    cert_files: tuple[Path, Path],
    general: dict[str, object] | None = None,
    **sm: object,
) -> GatewayConfig:
    """One config (and database) shared by the gateway and its restarted successor."""
    options: dict[str, object] = {"resume_timeout": 300, "stale_h": {"enabled": True}}
    options.update(sm)
    general_section: dict[str, object] = {"hosts": ["localhost"], "negotiation_timeout": 10}
    general_section.update(general or {})
    config = make_config(
        tmp_path, cert_files, general=general_section, modules=sm_options(**options)
    )
    with SqliteAccountStore(config.auth.database) as store:
        for user in USERS:
            store.add_user("localhost", user, PASSWORD)
    return config


async def start(nursery: trio.Nursery, config: GatewayConfig) -> tuple[ServerContext, Connect]:
    clients: list[RawClient] = []
    ctx: ServerContext = await nursery.start(
        functools.partial(run_server, config, inline_storage=True)
    )
    return ctx, connector(nursery, ctx, clients)


def sigterm() -> None:
    """What an operator (or systemd, or Kubernetes) sends to stop the gateway."""
    signal.raise_signal(signal.SIGTERM)


def stored(config: GatewayConfig) -> int:
    with SqliteHandoffStore(config.auth.database) as store:
        return store.count()


async def stop_with_alice_parked(config: GatewayConfig, *bodies: str) -> Peer:
    """A first run: alice/phone (resumable) loses its link without closing its stream,
    bob sends her parked session `bodies` (message ids = bodies), then SIGTERM stops the
    gateway. Returns alice's client side (its SM id and h)."""
    async with trio.open_nursery() as first:
        _ctx, connect = await start(first, config)
        alice = await online(connect, "alice", "phone", sm=RESUMABLE)
        bob = await online(connect, "bob", "desk")
        await alice.cut()
        for body in bodies:
            await bob.send(message(ALICE, body))
        await bob.sync()
        sigterm()
    return alice


async def resumed(connect: Connect, alice: Peer) -> Peer:
    """alice's new stream after `<resume/>`, which must have succeeded."""
    peer, answer = await resume(connect, "alice", alice.smid, alice.h)
    assert answer.tag == (ns.SM, "resumed"), answer
    return peer


async def bodies_after_restart(config: GatewayConfig, alice: Peer) -> list[str]:
    """A second run on the same database: alice resumes (it must succeed); the message
    bodies she then gets, in order; then the gateway stops again."""
    async with trio.open_nursery() as second:
        _ctx, connect = await start(second, config)
        got = bodies(await (await resumed(connect, alice)).drain())
        sigterm()
    return got


async def test_a_parked_session_is_resumed_after_a_restart_with_every_unacked_stanza(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files)
    with trio.fail_after(LIMIT), capture_logs() as logs:
        async with trio.open_nursery() as first:
            _ctx, connect = await start(first, config)
            alice = await online(connect, "alice", "phone", sm=RESUMABLE)
            bob = await online(connect, "bob", "desk")
            await alice.cut()  # parked, still available
            for n in (1, 2, 3):
                await bob.send(message(ALICE, f"m{n}"))
            await bob.sync()
            sigterm()
        assert stored(config) == 1
        handed = [e for e in logs if e["event"] == "session_handed_off"]
        assert [e["unacked"] for e in handed] == [3]

        with capture_logs(processors=[merge_contextvars]) as logs:
            async with trio.open_nursery() as second:
                ctx, connect = await start(second, config)
                revived = ctx.router.session_for(JID.parse(ALICE))
                assert revived is not None and revived.presence is not None  # available
                assert stored(config) == 0  # taken: only this process serves it
                peer, answer = await resume(connect, "alice", alice.smid, alice.h)
                assert answer.tag == (ns.SM, "resumed")
                assert answer.get("h") == "1"  # alice's initial presence, counted before
                assert bodies(await peer.drain()) == ["m1", "m2", "m3"]
                sigterm()
        # The session's log lines name its client again once resumed (not "none").
        (resumed,) = [e for e in logs if e["event"] == "session_resumed"]
        assert (resumed["peer"], resumed["transport"], resumed["resent"]) == (
            "192.0.2.7:40000",
            "tcp",
            3,
        )


async def test_a_live_session_gets_system_shutdown_and_resumes_after_the_restart(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as first:
            _ctx, connect = await start(first, config)
            alice = await online(connect, "alice", "phone", sm=RESUMABLE)
            bob = await online(connect, "bob", "desk")
            await bob.send(message(ALICE, "read-and-acked"))
            await bob.send(message(ALICE, "read-not-acked"))
            await bob.sync()
            got = await alice.sync()
            assert bodies(got) == ["read-and-acked", "read-not-acked"]
            await alice.ack(alice.h - 1)  # the client acks the first only
            await alice.sync()
            sigterm()
            error = await stream_error(alice)
            assert condition_of(error) == "system-shutdown"

        async with trio.open_nursery() as second:
            _ctx, connect = await start(second, config)
            peer, answer = await resume(connect, "alice", alice.smid, alice.h - 1)
            assert answer.tag == (ns.SM, "resumed")
            # XEP-0198 section 5: what was not acked comes again, with its id.
            resent = [e for e in await peer.drain() if e.name == "message"]
            assert [(e.get("id"), bodies([e])) for e in resent] == [
                ("read-not-acked", ["read-not-acked"])
            ]
            sigterm()


async def test_stanzas_routed_to_a_revived_session_are_buffered_for_its_resume(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files)
    with trio.fail_after(LIMIT):
        alice = await stop_with_alice_parked(config, "before")

        async with trio.open_nursery() as second:
            _ctx, connect = await start(second, config)
            bob = await online(connect, "bob", "desk")
            # To the bare JID: the revived resource is available, so it takes the message.
            await bob.send(message("alice@localhost", "after-bare"))
            await bob.send(message(ALICE, "after-full"))
            await bob.sync()
            peer = await resumed(connect, alice)
            assert bodies(await peer.drain()) == ["before", "after-bare", "after-full"]
            sigterm()


async def test_a_session_whose_time_ran_out_while_down_ends_into_offline_storage(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files)
    with trio.fail_after(LIMIT):
        alice = await stop_with_alice_parked(config, "kept")
        # The node stayed down longer than the session's resume time.
        with SqliteHandoffStore(config.auth.database) as store:
            (data,) = store.take_all()
            snapshot = decode_snapshot(data)
            expired = dataclasses.replace(snapshot, expires_at=time.time() - 1)
            store.put_many([(snapshot.smid, encode_snapshot(expired))])

        async with trio.open_nursery() as second:
            ctx, connect = await start(second, config)
            await trio.testing.wait_all_tasks_blocked()
            assert ctx.router.session_for(JID.parse(ALICE)) is None
            # stale_h is on: the late resume learns how many stanzas the server had.
            _peer, answer = await resume(connect, "alice", alice.smid, alice.h)
            assert answer == failed("item-not-found", h=1)
            fresh = await online(connect, "alice", "laptop", sm=RESUMABLE)
            assert offline_delivery(fresh.at_login) == [("kept", "localhost")]
            sigterm()


async def test_with_handoff_off_sessions_end_at_shutdown_and_their_messages_wait_offline(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files, handoff_on_shutdown=False)
    with trio.fail_after(LIMIT):
        alice = await stop_with_alice_parked(config, "stored")
        assert stored(config) == 0

        async with trio.open_nursery() as second:
            _ctx, connect = await start(second, config)
            _peer, answer = await resume(connect, "alice", alice.smid, alice.h)
            assert answer.tag == (ns.SM, "failed")  # ended at shutdown (stale_h is in memory)
            fresh = await online(connect, "alice", "laptop")
            assert offline_delivery(fresh.at_login) == [("stored", "localhost")]
            sigterm()


async def test_a_transport_lost_during_the_drain_parks_and_is_handed_off(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as first:
            ctx, connect = await start(first, config)
            alice = await online(connect, "alice", "phone", sm=RESUMABLE)
            bob = await online(connect, "bob", "desk")
            sigterm()
            await trio.sleep(1)  # into the drain (general.shutdown_grace, 5 s)
            assert ctx.draining
            await alice.cut()
            await bob.send(message(ALICE, "during-drain"))
            await bob.sync()
        assert stored(config) == 1

        assert await bodies_after_restart(config, alice) == ["during-drain"]


async def test_a_damaged_snapshot_is_dropped_with_a_warning_and_the_others_revive(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files)
    with trio.fail_after(LIMIT):
        alice = await stop_with_alice_parked(config)
        with SqliteHandoffStore(config.auth.database) as store:
            store.put_many([("damaged", b"{not json")])

        with capture_logs() as logs:
            async with trio.open_nursery() as second:
                _ctx, connect = await start(second, config)
                _peer, answer = await resume(connect, "alice", alice.smid, alice.h)
                assert answer.tag == (ns.SM, "resumed")
                sigterm()
        dropped = [e for e in logs if e["event"] == "handoff_snapshot_dropped"]
        assert [(e["log_level"], e["reason"]) for e in dropped] == [("warning", "damaged")]
        assert [e["sessions"] for e in logs if e["event"] == "sessions_revived"] == [1]


async def test_a_session_without_resumption_ends_at_shutdown_as_before(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as first:
            _ctx, connect = await start(first, config)
            alice = await online(connect, "alice", "phone", sm="")  # SM without resume
            sigterm()
            assert condition_of(await stream_error(alice)) == "system-shutdown"
        assert stored(config) == 0


# -- what the review of the first version found -----------------------------------------------


async def test_what_ending_sessions_hand_back_at_shutdown_reaches_the_kept_session(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as first:
            _ctx, connect = await start(first, config)
            phone = await online(connect, "alice", "phone", sm=RESUMABLE)
            laptop = await online(connect, "alice", "laptop", sm="")  # SM without resume
            bob = await online(connect, "bob", "desk")
            await phone.drain()  # the laptop's presence, acked
            await bob.send(message("alice@localhost/laptop", "laptop-never-acked"))
            await bob.sync()
            assert bodies(await laptop.sync()) == ["laptop-never-acked"]
            sigterm()

        async with trio.open_nursery() as second:
            _ctx, connect = await start(second, config)
            peer, answer = await resume(connect, "alice", phone.smid, phone.h)
            assert answer.tag == (ns.SM, "resumed")
            got = await peer.drain()
            # The laptop ended first: its unacked message was rerouted to the phone, and
            # its unavailable presence too, so the phone does not show it online.
            assert bodies(got) == ["laptop-never-acked"]
            assert presences(got, "unavailable") == ["alice@localhost/laptop"]
            sigterm()


async def test_offline_messages_stored_while_the_session_moved_are_flushed_after_the_resume(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files)
    with trio.fail_after(LIMIT):
        alice = await stop_with_alice_parked(config)
        # A message that took the offline path while the session was being handed off.
        with SqliteOfflineStore(config.auth.database) as offline:
            stanza = Element(
                ns.CLIENT,
                "message",
                {"to": ALICE, "from": "bob@localhost/desk", "type": "chat", "id": "late"},
                [Element(ns.CLIENT, "body", children=["late"])],
            )
            offline.store(
                "localhost", "alice", encode_stanza(stanza), "2026-11-22T10:00:00Z", max_per_user=10
            )

        assert await bodies_after_restart(config, alice) == ["late"]


async def test_a_session_of_an_account_removed_while_down_ends_and_its_messages_bounce(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files)
    with trio.fail_after(LIMIT):
        await stop_with_alice_parked(config, "to-the-removed")
        with SqliteAccountStore(config.auth.database) as accounts:
            assert accounts.remove_user("localhost", "alice")

        async with trio.open_nursery() as second:
            ctx, connect = await start(second, config)
            await trio.testing.wait_all_tasks_blocked()
            assert ctx.router.session_for(JID.parse(ALICE)) is None
            # The bounce found bob offline: it waits in his offline store.
            bob = await online(connect, "bob", "desk")
            errors = [e for e in bob.at_login if e.name == "message" and e.get("type") == "error"]
            assert [e.get("id") for e in errors] == ["to-the-removed"]
            sigterm()


async def test_a_second_restart_keeps_the_remaining_resume_time_and_counts_the_epoch(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files)
    with trio.fail_after(LIMIT + 400):  # virtual seconds
        await stop_with_alice_parked(config)
        first_snapshot = _stored_snapshots(config)[0]
        assert first_snapshot.epoch == 1

        async with trio.open_nursery() as second:
            await start(second, config)
            await trio.sleep(100)  # nobody resumes it
            sigterm()
        (second_snapshot,) = _stored_snapshots(config)
        assert second_snapshot.epoch == 2
        # 100 s of its 300 passed on the second node (plus real milliseconds).
        assert abs(second_snapshot.expires_at - (first_snapshot.expires_at - 100)) < 5


async def test_a_failed_write_ends_the_session_normally_so_its_messages_go_offline(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files)
    with trio.fail_after(LIMIT), capture_logs() as logs:
        async with trio.open_nursery() as first:
            ctx, connect = await start(first, config)
            assert ctx.handoff is not None
            ctx.handoff.store = FailingStore()
            alice = await online(connect, "alice", "phone", sm=RESUMABLE)
            bob = await online(connect, "bob", "desk")
            await alice.cut()
            await bob.send(message(ALICE, "rescued"))
            await bob.sync()
            sigterm()
        assert [e["sessions"] for e in logs if e["event"] == "handoff_write_failed"] == [1]

        async with trio.open_nursery() as second:
            _ctx, connect = await start(second, config)
            fresh = await online(connect, "alice", "laptop")
            assert offline_delivery(fresh.at_login) == [("rescued", "localhost")]
            sigterm()


async def test_parking_limits_at_start_evict_the_session_expiring_first_and_reroute_it(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files, max_parked_per_user=1)
    with trio.fail_after(LIMIT + 400):  # virtual seconds
        async with trio.open_nursery() as first:
            _ctx, connect = await start(first, config)
            phone = await online(connect, "alice", "phone", sm=RESUMABLE)
            laptop = await online(connect, "alice", "laptop", sm=RESUMABLE)
            bob = await online(connect, "bob", "desk")
            await phone.drain()
            await bob.send(message(ALICE, "for-the-phone"))
            await bob.sync()
            await phone.cut()  # parked: it expires before the laptop, live at shutdown
            await trio.sleep(10)
            sigterm()

        async with trio.open_nursery() as second:
            _ctx, connect = await start(second, config)
            _peer, answer = await resume(connect, "alice", phone.smid, phone.h)
            assert answer.tag == (ns.SM, "failed")
            peer, answer = await resume(connect, "alice", laptop.smid, laptop.h)
            assert answer.tag == (ns.SM, "resumed")
            # The evicted phone's unacked message went to the other resource.
            assert "for-the-phone" in bodies(await peer.drain())
            sigterm()


async def test_a_wall_clock_far_ahead_never_extends_resumption_beyond_resume_timeout(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files)
    with trio.fail_after(LIMIT + 400):  # virtual seconds
        await stop_with_alice_parked(config)
        with SqliteHandoffStore(config.auth.database) as store:
            (data,) = store.take_all()
            snapshot = decode_snapshot(data)
            skewed = dataclasses.replace(snapshot, expires_at=time.time() + 10**9)
            store.put_many([(snapshot.smid, encode_snapshot(skewed))])

        async with trio.open_nursery() as second:
            ctx, _connect = await start(second, config)
            await trio.sleep(301)  # resume_timeout is 300
            assert ctx.router.session_for(JID.parse(ALICE)) is None
            sigterm()


class FailingStore:
    """A hand-off store whose disk is gone."""

    def put_many(self, snapshots: Sequence[tuple[str, bytes]]) -> None:
        raise StorageError("disk I/O error")

    def take_all(self) -> list[bytes]:
        return []

    def count(self) -> int:
        return 0


def _stored_snapshots(config: GatewayConfig) -> list[SessionSnapshot]:
    """What the store holds, put back as it was."""
    with SqliteHandoffStore(config.auth.database) as store:
        records = store.take_all()
        snapshots = [decode_snapshot(data) for data in records]
        store.put_many([(s.smid, data) for s, data in zip(snapshots, records, strict=True)])
    return snapshots


# -- what the second review found -------------------------------------------------------------


async def test_a_start_that_cannot_listen_puts_the_sessions_back_for_the_next_attempt(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files)
    with trio.fail_after(LIMIT):
        alice = await stop_with_alice_parked(config, "kept-through-a-failed-start")
    # The old process still holds the port (an upgrade that started the new one early).
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = dataclasses.replace(config.c2s[0], port=busy.getsockname()[1])
        blocked = dataclasses.replace(config, c2s=(taken, *config.c2s[1:]))
        with pytest.raises(BaseExceptionGroup) as failure, trio.fail_after(LIMIT):
            async with trio.open_nursery() as second:
                await second.start(functools.partial(run_server, blocked, inline_storage=True))
        assert failure.group_contains(OSError)
    assert stored(config) == 1

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as third:
            _ctx, connect = await start(third, config)
            peer = await resumed(connect, alice)
            assert bodies(await peer.drain()) == ["kept-through-a-failed-start"]
            sigterm()


async def test_a_resumed_session_gets_system_shutdown_on_its_new_transport(
    tmp_path: Path, cert_files: tuple[Path, Path]
) -> None:
    # Real loopback TCP (no mock clock): the listener closes a connection's socket when
    # its task returns, which memory streams would not show.
    config = setup(tmp_path, cert_files, general={"shutdown_grace": 0})
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as first:
            _ctx, connect = await start(first, config)
            alice = Peer(await connect(PLAIN))
            await alice.raw.login("alice", PASSWORD, resource="phone", mechanism="PLAIN")
            assert (await alice.enable()).tag == (ns.SM, "enabled")
            await alice.cut()
            peer, answer = await resume(connect, "alice", alice.smid, 0, memory=False)
            assert answer.tag == (ns.SM, "resumed")
            await peer.sync()
            sigterm()
            # Not a bare close: the lending connection waits until the session is done.
            assert condition_of(await stream_error(peer)) == "system-shutdown"
        assert stored(config) == 1


async def test_a_session_the_client_closed_is_not_handed_off(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files, general={"shutdown_grace": 0})
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as first:
            ctx, _connect = await start(first, config)
            # Lockstep: the server's writes wait for the client to read.
            client_stream, server_stream = trio.testing.lockstep_stream_pair()
            transport = StreamTransport(server_stream, PeerInfo("192.0.2.7", 40000))
            assert ctx.handler_nursery is not None
            ctx.handler_nursery.start_soon(serve_connection, ctx, config.c2s[PLAIN], transport)
            alice = Peer(RawClient(client_stream))
            await alice.raw.login("alice", PASSWORD, resource="phone", mechanism="PLAIN")
            assert (await alice.enable()).tag == (ns.SM, "enabled")
            # The client closes cleanly and stops reading: the server's own close waits,
            # and the shutdown comes in the middle of it.
            await alice.send("</stream:stream>")
            await trio.testing.wait_all_tasks_blocked()
            assert ctx.router.session_for(JID.parse(ALICE)) is not None  # still ending
            sigterm()
        # XEP-0198 section 7: a cleanly closed stream ends the session; nothing to keep.
        assert stored(config) == 0


async def test_sessions_stopping_together_are_written_in_a_few_transactions(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files, max_parked_per_user=100)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as first:
            ctx, connect = await start(first, config)
            assert ctx.handoff is not None
            counting = CountingStore(ctx.handoff.store)
            ctx.handoff.store = counting
            peers = [
                await online(connect, "alice", f"phone{n}", sm=RESUMABLE, priority=None)
                for n in range(40)
            ]
            for peer in peers[::2]:
                await peer.cut()  # half parked, half live
            sigterm()
    assert stored(config) == 40
    assert sum(counting.batches) == 40
    assert len(counting.batches) <= 5, counting.batches


class CountingStore:
    """Counts the transactions of the store it wraps."""

    def __init__(self, inner: HandoffStore) -> None:
        self.inner = inner
        self.batches: list[int] = []

    def put_many(self, snapshots: Sequence[tuple[str, bytes]]) -> None:
        self.batches.append(len(snapshots))
        self.inner.put_many(snapshots)

    def take_all(self) -> list[bytes]:
        return self.inner.take_all()

    def count(self) -> int:
        return self.inner.count()
