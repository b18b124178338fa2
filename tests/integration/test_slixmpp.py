"""A real client against the real program: slixmpp logs in through STARTTLS + SCRAM and chats.

The gateway runs as a subprocess started with its CLI (`python -m gateway serve`), with
accounts created by the CLI (`user add`, `user import`) and a certificate made by
`scripts/make_cert.py`, exactly as an operator would set it up.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import slixmpp

from tests.helpers.accounts import LIVE_PASSWORD
from tests.helpers.live import LiveGateway as LiveServer
from tests.helpers.live import gateway_cli as _gateway
from tests.helpers.live import live_gateway, starttls_config
from tests.helpers.logs import named
from tests.helpers.slixmpp_clients import starttls_client


def _add_users(config: Path) -> None:
    added = _gateway(
        "user", "add", "alice@localhost", "--password", LIVE_PASSWORD, "--config", str(config)
    )
    assert added.returncode == 0, added.stderr
    # Password on stdin, as an operator's script would pass it.
    added = _gateway(
        "user", "add", "bob@localhost", "--config", str(config), stdin=LIVE_PASSWORD + "\n"
    )
    assert added.returncode == 0, added.stderr
    imported = _gateway(
        "user", "import", "-", "--config", str(config), stdin=f"carol@localhost {LIVE_PASSWORD}\n"
    )
    assert imported.returncode == 0, imported.stderr
    listed = _gateway("user", "list", "--config", str(config))
    assert listed.stdout.split() == ["alice@localhost", "bob@localhost", "carol@localhost"]


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[LiveServer]:
    with live_gateway(
        tmp_path,
        starttls_config(),
        password=LIVE_PASSWORD,
        users=(),
        certs=True,
        check_config=False,
        setup=_add_users,
    ) as server:
        yield server


async def _online(client: slixmpp.ClientXMPP, server: LiveServer) -> None:
    started: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def on_start(_event: object) -> None:
        await client.get_roster()
        client.send_presence()
        if not started.done():
            started.set_result(None)

    def on_failure(_event: object) -> None:
        if not started.done():
            started.set_exception(AssertionError("authentication failed"))

    client.add_event_handler("session_start", on_start)
    client.add_event_handler("failed_all_auth", on_failure)
    client.connect("127.0.0.1", server.port)
    await asyncio.wait_for(started, 20)


def test_slixmpp_clients_log_in_with_starttls_and_scram_and_chat(live_server: LiveServer) -> None:
    async def scenario() -> None:
        alice = starttls_client("alice@localhost/desk", live_server.cert)
        bob = starttls_client("bob@localhost/phone", live_server.cert)
        inbox: asyncio.Queue[slixmpp.Message] = asyncio.Queue()
        presences: asyncio.Queue[slixmpp.Presence] = asyncio.Queue()
        bob.add_event_handler("message", inbox.put_nowait)
        bob.add_event_handler("presence_available", presences.put_nowait)
        await _online(alice, live_server)
        await _online(bob, live_server)

        for i in range(5):
            alice.send_message(
                mto=slixmpp.JID("bob@localhost"), mbody=f"hello {i} <&>", mtype="chat"
            )
        bodies = []
        for _ in range(5):
            msg = await asyncio.wait_for(inbox.get(), 10)
            assert str(msg["from"]) == "alice@localhost/desk"
            bodies.append(msg["body"])
        assert bodies == [f"hello {i} <&>" for i in range(5)]

        # Directed presence reaches bob's resource.
        alice.send_presence(pto="bob@localhost/phone", pstatus="here")
        while True:
            presence = await asyncio.wait_for(presences.get(), 10)
            if str(presence["from"]) == "alice@localhost/desk":
                break
        assert presence["status"] == "here"

        # And the server answers XEP-0199 pings (an error reply would raise).
        await alice.plugin["xep_0199"].ping(jid=slixmpp.JID("localhost"), timeout=10)
        alice.disconnect()
        bob.disconnect()
        await asyncio.sleep(0.2)

    asyncio.run(asyncio.wait_for(scenario(), 60))
    events = live_server.log_events()
    authenticated = named(events, "authenticated")
    assert {e.get("jid") for e in authenticated} >= {"alice@localhost", "bob@localhost"}
    assert {e.get("mechanism") for e in authenticated} <= {"SCRAM-SHA-256", "SCRAM-SHA-1"}
    # Every connection line carries its id and the peer; no password anywhere in the log.
    assert all("conn_id" in e and "peer" in e for e in authenticated)
    assert LIVE_PASSWORD not in live_server.log.read_text()


def test_sigterm_closes_streams_with_system_shutdown_and_exits_zero(
    live_server: LiveServer,
) -> None:
    async def scenario() -> str:
        carol = starttls_client("carol@localhost/x", live_server.cert)
        errors: asyncio.Queue[str] = asyncio.Queue()
        carol.add_event_handler("stream_error", lambda err: errors.put_nowait(err["condition"]))
        await _online(carol, live_server)
        live_server.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(errors.get(), 20)

    condition = asyncio.run(scenario())
    assert condition == "system-shutdown"
    assert live_server.proc.wait(timeout=30) == 0
