"""Resumable sessions survive a restart (issue 4: "resumable sessions kept resumable until
they end"; DESIGN sections 5 and 6).

Each test runs one gateway, stops it the way an operator does (SIGTERM: drain, then every
stream closed with system-shutdown), and starts a second gateway on the same database, as
a restart would. Clients are scripted over memory streams with `autojump_clock`, so the
drain grace and resume timeouts pass in virtual time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from gateway.config import GatewayConfig
from gateway.core.context import ServerContext
from gateway.errors import StorageError
from gateway.storage.base import HandoffStore, SessionSnapshot
from gateway.storage.codec import encode_stanza
from gateway.storage.handoff_sqlite import SqliteHandoffStore
from gateway.storage.offline_sqlite import SqliteOfflineStore
from gateway.storage.snapshot import decode_snapshot, encode_snapshot
from gateway.storage.sqlite import SqliteAccountStore
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from tests.helpers.accounts import PASSWORD
from tests.helpers.client import condition_of
from tests.helpers.inprocess import (
    Connect,
    add_accounts,
    local_session,
    make_config,
    serve_memory_client,
    start_connectable,
    start_gateway,
)
from tests.helpers.logs import named
from tests.helpers.sm import (
    LIMIT,
    PLAIN,
    RESUMABLE,
    Peer,
    bodies,
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
    add_accounts(config)
    return config


def sigterm() -> None:
    """What an operator (or systemd, or Kubernetes) sends to stop the gateway."""
    signal.raise_signal(signal.SIGTERM)


@dataclass
class Run:
    """One run of the gateway (see `running()`): its context and a Connect to it."""

    ctx: ServerContext
    connect: Connect
    stopped: bool = False

    def stop(self) -> None:
        """`sigterm()`, once per run: the gateway drains, hands off and returns."""
        if not self.stopped:
            self.stopped = True
            sigterm()


@contextlib.asynccontextmanager
async def running(config: GatewayConfig) -> AsyncIterator[Run]:
    """A gateway on `config` for the duration of the block, as one process run would be:
    at the end of the block it is stopped with SIGTERM (unless `Run.stop()` was called
    already) and the block is left only when it has stopped, its sessions handed off."""
    async with trio.open_nursery() as nursery:
        run = Run(*await start_connectable(nursery, config, []))
        yield run
        run.stop()


def stored(config: GatewayConfig) -> int:
    """How many session snapshots the hand-off table holds."""
    with SqliteHandoffStore(config.auth.database) as store:
        return store.count()


async def alice_and_bob(connect: Connect) -> tuple[Peer, Peer]:
    """alice/phone with resumable stream management, and bob/desk, both available."""
    alice = await online(connect, "alice", "phone", sm=RESUMABLE)
    bob = await online(connect, "bob", "desk")
    return alice, bob


async def park_alice(connect: Connect, *texts: str) -> Peer:
    """alice/phone (resumable) loses its link without closing its stream, and bob sends
    her parked session a message per text (body and id: the text). Returns alice's client
    side (its SM id and h)."""
    alice, bob = await alice_and_bob(connect)
    await alice.cut()  # parked, still available
    for body in texts:
        await bob.send(message(ALICE, body))
    await bob.sync()
    return alice


async def stop_with_alice_parked(config: GatewayConfig, *texts: str) -> Peer:
    """A first run: `park_alice(*texts)`, then SIGTERM stops the gateway. Returns alice's
    client side (its SM id and h)."""
    async with running(config) as first:
        return await park_alice(first.connect, *texts)


async def resumed(connect: Connect, alice: Peer) -> Peer:
    """alice's new stream after `<resume/>`, which must have succeeded."""
    peer, answer = await resume(connect, "alice", alice.smid, alice.h)
    assert answer.tag == (ns.SM, "resumed"), answer
    return peer


async def bodies_after_restart(config: GatewayConfig, alice: Peer) -> list[str]:
    """A second run on the same database: alice resumes (it must succeed); the message
    bodies she then gets, in order; then the gateway stops again."""
    async with running(config) as second:
        return bodies(await (await resumed(second.connect, alice)).drain())


async def test_a_parked_session_is_resumed_after_a_restart_with_every_unacked_stanza(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files)
    with trio.fail_after(LIMIT), capture_logs() as logs:
        alice = await stop_with_alice_parked(config, "m1", "m2", "m3")
        assert stored(config) == 1
        assert [e["unacked"] for e in named(logs, "session_handed_off")] == [3]

        with capture_logs(processors=[merge_contextvars]) as logs:
            async with running(config) as second:
                revived = await local_session(second.ctx, ALICE)
                assert revived is not None and revived.presence is not None  # available
                assert stored(config) == 0  # taken: only this process serves it
                peer, answer = await resume(second.connect, "alice", alice.smid, alice.h)
                assert answer.tag == (ns.SM, "resumed")
                assert answer.get("h") == "1"  # alice's initial presence, counted before
                assert bodies(await peer.drain()) == ["m1", "m2", "m3"]
        # The session's log lines name its client again once resumed (not "none").
        (line,) = named(logs, "session_resumed")
        assert (line["peer"], line["transport"], line["resent"]) == ("192.0.2.7:40000", "tcp", 3)


async def test_a_live_session_gets_system_shutdown_and_resumes_after_the_restart(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files)
    with trio.fail_after(LIMIT):
        async with running(config) as first:
            alice, bob = await alice_and_bob(first.connect)
            await bob.send(message(ALICE, "read-and-acked"))
            await bob.send(message(ALICE, "read-not-acked"))
            await bob.sync()
            got = await alice.sync()
            assert bodies(got) == ["read-and-acked", "read-not-acked"]
            await alice.ack(alice.h - 1)  # the client acks the first only
            await alice.sync()
            first.stop()
            error = await stream_error(alice)
            assert condition_of(error) == "system-shutdown"

        async with running(config) as second:
            peer, answer = await resume(second.connect, "alice", alice.smid, alice.h - 1)
            assert answer.tag == (ns.SM, "resumed")
            # XEP-0198 section 5: what was not acked comes again, with its id.
            resent = [e for e in await peer.drain() if e.name == "message"]
            assert [(e.get("id"), bodies([e])) for e in resent] == [
                ("read-not-acked", ["read-not-acked"])
            ]


async def test_stanzas_routed_to_a_revived_session_are_buffered_for_its_resume(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files)
    with trio.fail_after(LIMIT):
        alice = await stop_with_alice_parked(config, "before")

        async with running(config) as second:
            bob = await online(second.connect, "bob", "desk")
            # To the bare JID: the revived resource is available, so it takes the message.
            await bob.send(message("alice@localhost", "after-bare"))
            await bob.send(message(ALICE, "after-full"))
            await bob.sync()
            peer = await resumed(second.connect, alice)
            assert bodies(await peer.drain()) == ["before", "after-bare", "after-full"]


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

        async with running(config) as second:
            await trio.testing.wait_all_tasks_blocked()
            assert await local_session(second.ctx, ALICE) is None
            # stale_h is on: the late resume learns how many stanzas the server had.
            _peer, answer = await resume(second.connect, "alice", alice.smid, alice.h)
            assert answer == failed("item-not-found", h=1)
            fresh = await online(second.connect, "alice", "laptop", sm=RESUMABLE)
            assert offline_delivery(fresh.at_login) == [("kept", "localhost")]


async def test_with_handoff_off_sessions_end_at_shutdown_and_their_messages_wait_offline(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files, handoff_on_shutdown=False)
    with trio.fail_after(LIMIT):
        alice = await stop_with_alice_parked(config, "stored")
        assert stored(config) == 0

        async with running(config) as second:
            _peer, answer = await resume(second.connect, "alice", alice.smid, alice.h)
            assert answer.tag == (ns.SM, "failed")  # ended at shutdown (stale_h is in memory)
            fresh = await online(second.connect, "alice", "laptop")
            assert offline_delivery(fresh.at_login) == [("stored", "localhost")]


async def test_a_transport_lost_during_the_drain_parks_and_is_handed_off(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files)
    with trio.fail_after(LIMIT):
        async with running(config) as first:
            alice, bob = await alice_and_bob(first.connect)
            first.stop()
            await trio.sleep(1)  # into the drain (general.shutdown_grace, 5 s)
            assert first.ctx.draining
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
            async with running(config) as second:
                _peer, answer = await resume(second.connect, "alice", alice.smid, alice.h)
                assert answer.tag == (ns.SM, "resumed")
        dropped = named(logs, "handoff_snapshot_dropped")
        assert [(e["log_level"], e["reason"]) for e in dropped] == [("warning", "damaged")]
        assert [e["sessions"] for e in named(logs, "sessions_revived")] == [1]


async def test_a_session_without_resumption_ends_at_shutdown_as_before(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files)
    with trio.fail_after(LIMIT):
        async with running(config) as first:
            alice = await online(first.connect, "alice", "phone", sm="")  # SM without resume
            first.stop()
            assert condition_of(await stream_error(alice)) == "system-shutdown"
        assert stored(config) == 0


# -- what the review of the first version found -----------------------------------------------


async def test_what_ending_sessions_hand_back_at_shutdown_reaches_the_kept_session(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files)
    with trio.fail_after(LIMIT):
        async with running(config) as first:
            phone = await online(first.connect, "alice", "phone", sm=RESUMABLE)
            laptop = await online(first.connect, "alice", "laptop", sm="")  # SM without resume
            bob = await online(first.connect, "bob", "desk")
            await phone.drain()  # the laptop's presence, acked
            await bob.send(message("alice@localhost/laptop", "laptop-never-acked"))
            await bob.sync()
            assert bodies(await laptop.sync()) == ["laptop-never-acked"]

        async with running(config) as second:
            peer, answer = await resume(second.connect, "alice", phone.smid, phone.h)
            assert answer.tag == (ns.SM, "resumed")
            got = await peer.drain()
            # The laptop ended first: its unacked message was rerouted to the phone, and
            # its unavailable presence too, so the phone does not show it online.
            assert bodies(got) == ["laptop-never-acked"]
            assert presences(got, "unavailable") == ["alice@localhost/laptop"]


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

        async with running(config) as second:
            await trio.testing.wait_all_tasks_blocked()
            assert await local_session(second.ctx, ALICE) is None
            # The bounce found bob offline: it waits in his offline store.
            bob = await online(second.connect, "bob", "desk")
            errors = [e for e in bob.at_login if e.name == "message" and e.get("type") == "error"]
            assert [e.get("id") for e in errors] == ["to-the-removed"]


async def test_a_second_restart_keeps_the_remaining_resume_time_and_counts_the_epoch(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files)
    with trio.fail_after(LIMIT + 400):  # virtual seconds
        await stop_with_alice_parked(config)
        first_snapshot = _stored_snapshots(config)[0]
        assert first_snapshot.epoch == 1

        async with running(config):
            await trio.sleep(100)  # nobody resumes it
        (second_snapshot,) = _stored_snapshots(config)
        assert second_snapshot.epoch == 2
        # 100 s of its 300 passed on the second node (plus real milliseconds).
        assert abs(second_snapshot.expires_at - (first_snapshot.expires_at - 100)) < 5


async def test_a_failed_write_ends_the_session_normally_so_its_messages_go_offline(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files)
    with trio.fail_after(LIMIT), capture_logs() as logs:
        async with running(config) as first:
            assert first.ctx.handoff is not None
            first.ctx.handoff.store = FailingStore()
            await park_alice(first.connect, "rescued")
        assert [e["sessions"] for e in named(logs, "handoff_write_failed")] == [1]

        async with running(config) as second:
            fresh = await online(second.connect, "alice", "laptop")
            assert offline_delivery(fresh.at_login) == [("rescued", "localhost")]


async def test_parking_limits_at_start_evict_the_session_expiring_first_and_reroute_it(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files, max_parked_per_user=1)
    with trio.fail_after(LIMIT + 400):  # virtual seconds
        async with running(config) as first:
            phone = await online(first.connect, "alice", "phone", sm=RESUMABLE)
            laptop = await online(first.connect, "alice", "laptop", sm=RESUMABLE)
            bob = await online(first.connect, "bob", "desk")
            await phone.drain()
            await bob.send(message(ALICE, "for-the-phone"))
            await bob.sync()
            await phone.cut()  # parked: it expires before the laptop, live at shutdown
            await trio.sleep(10)

        async with running(config) as second:
            _peer, answer = await resume(second.connect, "alice", phone.smid, phone.h)
            assert answer.tag == (ns.SM, "failed")
            peer, answer = await resume(second.connect, "alice", laptop.smid, laptop.h)
            assert answer.tag == (ns.SM, "resumed")
            # The evicted phone's unacked message went to the other resource.
            assert "for-the-phone" in bodies(await peer.drain())


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

        async with running(config) as second:
            await trio.sleep(301)  # resume_timeout is 300
            assert await local_session(second.ctx, ALICE) is None


class FailingStore:
    """A hand-off store whose disk is gone."""

    def put_many(self, snapshots: Sequence[tuple[str, bytes]]) -> None:
        raise StorageError("disk I/O error")

    def take_all(self) -> list[bytes]:
        return []

    def count(self) -> int:
        return 0

    def close(self) -> None:
        pass


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
                await start_gateway(second, blocked)
        assert failure.group_contains(OSError)
    assert stored(config) == 1

    with trio.fail_after(LIMIT):
        async with running(config) as third:
            peer = await resumed(third.connect, alice)
            assert bodies(await peer.drain()) == ["kept-through-a-failed-start"]


async def test_a_resumed_session_gets_system_shutdown_on_its_new_transport(
    tmp_path: Path, cert_files: tuple[Path, Path]
) -> None:
    # Real loopback TCP (no mock clock): the listener closes a connection's socket when
    # its task returns, which memory streams would not show.
    config = setup(tmp_path, cert_files, general={"shutdown_grace": 0})
    with trio.fail_after(LIMIT):
        async with running(config) as first:
            alice = Peer(await first.connect(PLAIN))
            await alice.raw.login("alice", PASSWORD, resource="phone", mechanism="PLAIN")
            assert (await alice.enable()).tag == (ns.SM, "enabled")
            await alice.cut()
            peer, answer = await resume(first.connect, "alice", alice.smid, 0, memory=False)
            assert answer.tag == (ns.SM, "resumed")
            await peer.sync()
            first.stop()
            # Not a bare close: the lending connection waits until the session is done.
            assert condition_of(await stream_error(peer)) == "system-shutdown"
        assert stored(config) == 1


async def test_a_session_the_client_closed_is_not_handed_off(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files, general={"shutdown_grace": 0})
    with trio.fail_after(LIMIT):
        async with running(config) as first:
            # Lockstep: the server's writes wait for the client to read.
            alice = Peer(serve_memory_client(first.ctx, PLAIN, lockstep=True))
            await alice.raw.login("alice", PASSWORD, resource="phone", mechanism="PLAIN")
            assert (await alice.enable()).tag == (ns.SM, "enabled")
            # The client closes cleanly and stops reading: the server's own close waits,
            # and the shutdown comes in the middle of it.
            await alice.send("</stream:stream>")
            await trio.testing.wait_all_tasks_blocked()
            assert await local_session(first.ctx, ALICE) is not None  # still ending
            first.stop()
        # XEP-0198 section 7: a cleanly closed stream ends the session; nothing to keep.
        assert stored(config) == 0


async def test_sessions_stopping_together_are_written_in_a_few_transactions(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files, max_parked_per_user=100)
    with trio.fail_after(LIMIT):
        async with running(config) as first:
            assert first.ctx.handoff is not None
            counting = CountingStore(first.ctx.handoff.store)
            first.ctx.handoff.store = counting
            peers = [
                await online(first.connect, "alice", f"phone{n}", sm=RESUMABLE, priority=None)
                for n in range(40)
            ]
            for peer in peers[::2]:
                await peer.cut()  # half parked, half live
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

    def close(self) -> None:
        self.inner.close()
