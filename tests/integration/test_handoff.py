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
import time
from pathlib import Path

import trio
import trio.testing
from structlog.testing import capture_logs

from gateway.app import run_server
from gateway.config import GatewayConfig
from gateway.core.connection import ServerContext
from gateway.storage.handoff_sqlite import SqliteHandoffStore
from gateway.storage.snapshot import decode_snapshot, encode_snapshot
from gateway.storage.sqlite import SqliteAccountStore
from gateway.xmpp import namespaces as ns
from gateway.xmpp.jid import JID
from tests.conftest import PASSWORD, USERS, Connect, connector, make_config
from tests.helpers.client import RawClient
from tests.integration.test_sm_spec import (
    LIMIT,
    RESUMABLE,
    bodies,
    condition_of,
    failed,
    message,
    offline_delivery,
    online,
    resume,
    sm_options,
    stream_error,
)

ALICE = "alice@localhost/phone"


def setup(tmp_path: Path, cert_files: tuple[Path, Path], **sm: object) -> GatewayConfig:
    """One config (and database) shared by the gateway and its restarted successor."""
    options: dict[str, object] = {"resume_timeout": 300, "stale_h": {"enabled": True}}
    options.update(sm)
    config = make_config(tmp_path, cert_files, modules=sm_options(**options))
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

        async with trio.open_nursery() as second:
            ctx, connect = await start(second, config)
            revived = ctx.router.session_for(JID.parse(ALICE))
            assert revived is not None and revived.presence is not None  # still available
            assert stored(config) == 0  # taken: only this process serves it
            peer, answer = await resume(connect, "alice", alice.smid, alice.h)
            assert answer.tag == (ns.SM, "resumed")
            assert answer.get("h") == "1"  # alice's initial presence, counted before
            assert bodies(await peer.drain()) == ["m1", "m2", "m3"]
            sigterm()


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
        async with trio.open_nursery() as first:
            _ctx, connect = await start(first, config)
            alice = await online(connect, "alice", "phone", sm=RESUMABLE)
            bob = await online(connect, "bob", "desk")
            await alice.cut()
            await bob.send(message(ALICE, "before"))
            await bob.sync()
            sigterm()

        async with trio.open_nursery() as second:
            _ctx, connect = await start(second, config)
            bob = await online(connect, "bob", "desk")
            # To the bare JID: the revived resource is available, so it takes the message.
            await bob.send(message("alice@localhost", "after-bare"))
            await bob.send(message(ALICE, "after-full"))
            await bob.sync()
            peer, answer = await resume(connect, "alice", alice.smid, alice.h)
            assert answer.tag == (ns.SM, "resumed")
            assert bodies(await peer.drain()) == ["before", "after-bare", "after-full"]
            sigterm()


async def test_a_session_whose_time_ran_out_while_down_ends_into_offline_storage(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as first:
            _ctx, connect = await start(first, config)
            alice = await online(connect, "alice", "phone", sm=RESUMABLE)
            bob = await online(connect, "bob", "desk")
            await alice.cut()
            await bob.send(message(ALICE, "kept"))
            await bob.sync()
            sigterm()
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
        async with trio.open_nursery() as first:
            _ctx, connect = await start(first, config)
            alice = await online(connect, "alice", "phone", sm=RESUMABLE)
            bob = await online(connect, "bob", "desk")
            await alice.cut()
            await bob.send(message(ALICE, "stored"))
            await bob.sync()
            sigterm()
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
            assert ctx.draining and not ctx.stopping
            await alice.cut()
            await bob.send(message(ALICE, "during-drain"))
            await bob.sync()
        assert stored(config) == 1

        async with trio.open_nursery() as second:
            _ctx, connect = await start(second, config)
            peer, answer = await resume(connect, "alice", alice.smid, alice.h)
            assert answer.tag == (ns.SM, "resumed")
            assert bodies(await peer.drain()) == ["during-drain"]
            sigterm()


async def test_a_damaged_snapshot_is_dropped_with_a_warning_and_the_others_revive(
    tmp_path: Path, cert_files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    config = setup(tmp_path, cert_files)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as first:
            _ctx, connect = await start(first, config)
            alice = await online(connect, "alice", "phone", sm=RESUMABLE)
            await alice.cut()
            sigterm()
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
