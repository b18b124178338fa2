"""XEP-0198 with a real client: slixmpp's xep_0198 plugin loses its network and comes back.

The gateway runs as a subprocess started with its CLI, exactly as in `test_slixmpp.py`
(accounts from `user add`, a certificate from `scripts/make_cert.py`). Between the
resuming client (bob, slixmpp with `xep_0198`) and the gateway sits `CutProxy`
(`tests/helpers/proxy.py`), a tiny asyncio TCP relay that can reset both sides of every
relayed connection at once: no `</stream:stream>`, no TLS close_notify, just an RST each
way, the way a phone that loses its network looks to a server (STARTTLS passes through
the relay unchanged). The partner (alice, a plain slixmpp client connected directly)
sends numbered messages while bob is away.

slixmpp does not reconnect on its own: after `disconnected` the test calls `connect()`
again, as an application does; the plugin then sends `<resume/>` (it kept its SM id and
h because stream management set `end_session_on_disconnect` to False).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from pathlib import Path

import slixmpp

from tests.helpers.accounts import LIVE_PASSWORD
from tests.helpers.live import LiveGateway as LiveServer
from tests.helpers.live import live_gateway, starttls_config
from tests.helpers.logs import event_is, named, wait_for_log_line_asyncio
from tests.helpers.proxy import CutProxy
from tests.helpers.slixmpp_clients import starttls_client

WAIT = 20.0  # seconds: the bound on every single wait below
SHORT_RESUME_TIMEOUT = 2  # seconds (real time: the gateway is a subprocess)
BOB = "bob@localhost/phone"


def _live_server(tmp_path: Path, sm_options: str) -> contextlib.AbstractContextManager[LiveServer]:
    """The gateway subprocess (STARTTLS required), with `sm_options` for stream management."""
    config = starttls_config(modules=f"mod_stream_management: {{{sm_options}}}")
    return live_gateway(tmp_path, config, password=LIVE_PASSWORD, certs=True)


class Phone:
    """bob on slixmpp with XEP-0198 resumption, connecting through the proxy."""

    def __init__(self, server: LiveServer, proxy: CutProxy) -> None:
        self.proxy = proxy
        client = starttls_client(BOB, server.cert, ("xep_0198", "xep_0199", "xep_0203"))
        sm = client.plugin["xep_0198"]
        sm.allow_resume = True
        sm.window = 1  # bob asks for an ack after each stanza it sends
        self.client = client
        self.sm = sm
        self.events: collections.Counter[str] = collections.Counter()
        self.messages: list[slixmpp.Message] = []
        self.changed = asyncio.Event()
        for name in ("session_start", "session_resumed", "sm_enabled", "sm_failed"):
            client.add_event_handler(name, self._counter(name))
        client.add_event_handler("disconnected", self._counter("disconnected"))
        client.add_event_handler("failed_all_auth", self._counter("failed_all_auth"))
        client.add_event_handler("message", self._on_message)

    def _counter(self, name: str) -> Callable[[object], None]:
        def handler(_event: object) -> None:
            self.events[name] += 1
            if name == "session_start":
                # Initial presence: makes bob available (and flushes offline storage).
                self.client.send_presence()
            self.changed.set()

        return handler

    def _on_message(self, message: slixmpp.Message) -> None:
        if message["type"] == "chat" and message["body"].startswith("m"):
            self.messages.append(message)
            self.changed.set()

    async def until(self, what: str, condition: Callable[[], bool]) -> None:
        """Wait (bounded) until `condition()` holds."""
        deadline = asyncio.get_running_loop().time() + WAIT
        while not condition():
            self.changed.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(
                    f"timed out waiting for {what}; events={dict(self.events)} "
                    f"bodies={self.bodies()}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

    def connect(self) -> None:
        self.client.connect("127.0.0.1", self.proxy.port)

    def bodies(self) -> list[str]:
        return [m["body"] for m in self.messages]


async def _partner(server: LiveServer) -> slixmpp.ClientXMPP:
    """alice, a plain slixmpp client connected directly, online (initial presence sent)."""
    alice = starttls_client("alice@localhost/desk", server.cert)
    started: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_start(_event: object) -> None:
        alice.send_presence()
        if not started.done():
            started.set_result(None)

    alice.add_event_handler("session_start", on_start)
    alice.connect("127.0.0.1", server.port)
    await asyncio.wait_for(started, WAIT)
    return alice


async def _send(alice: slixmpp.ClientXMPP, numbers: range) -> None:
    """alice sends m<i> to bob's bare JID; the ping's answer means the gateway routed them."""
    for i in numbers:
        alice.send_message(mto=slixmpp.JID("bob@localhost"), mbody=f"m{i}", mtype="chat")
    await alice.plugin["xep_0199"].ping(jid=slixmpp.JID("localhost"), timeout=WAIT)


async def _bob_online_then_cut(
    server: LiveServer, proxy: CutProxy
) -> tuple[Phone, slixmpp.ClientXMPP]:
    """bob logs in through the proxy with resumption, gets m0..m2 live, then loses network."""
    await proxy.start()
    bob = Phone(server, proxy)
    bob.connect()
    await bob.until("sm enabled", lambda: bob.events["sm_enabled"] == 1)
    assert bob.sm.sm_id, "the gateway granted no resumable SM id"
    await bob.until("session start", lambda: bob.events["session_start"] == 1)
    alice = await _partner(server)
    await _send(alice, range(3))
    await bob.until("m0..m2", lambda: len(bob.messages) >= 3)
    # bob's <a/> for m0..m2 went out as it handled them; its ping round trip makes sure
    # the gateway read those acks before the network goes away.
    await asyncio.sleep(0.2)
    await bob.client.plugin["xep_0199"].ping(jid=slixmpp.JID("localhost"), timeout=WAIT)
    proxy.cut()
    await bob.until("disconnected", lambda: bob.events["disconnected"] >= 1)
    # The gateway noticed the reset and parked the session (it stays available meanwhile).
    await wait_for_log_line_asyncio(
        server, event_is("session_parked", BOB), timeout=WAIT, what="bob's session parked"
    )
    return bob, alice


async def _quiet(bob: Phone, alice: slixmpp.ClientXMPP) -> None:
    """Let anything still in flight (a duplicate, say) arrive before counting."""
    await bob.client.plugin["xep_0199"].ping(jid=slixmpp.JID("localhost"), timeout=WAIT)
    await alice.plugin["xep_0199"].ping(jid=slixmpp.JID("localhost"), timeout=WAIT)
    await asyncio.sleep(0.5)


async def _goodbye(*clients: slixmpp.ClientXMPP) -> None:
    """Disconnect each client (at most 5 s each), whatever goes wrong."""
    for client in clients:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), 5)


def test_slixmpp_resumes_after_network_loss_and_gets_every_message_once(
    tmp_path: Path,
) -> None:
    async def scenario(server: LiveServer) -> None:
        proxy = CutProxy(server.port)
        bob, alice = await _bob_online_then_cut(server, proxy)
        try:
            smid = bob.sm.sm_id
            # While bob is away the gateway buffers m3..m9 in the parked session.
            await _send(alice, range(3, 10))
            bob.connect()
            await bob.until("resumed", lambda: bob.events["session_resumed"] == 1)
            await bob.until("m0..m9", lambda: len(set(bob.bodies())) == 10)
            await _quiet(bob, alice)
            assert bob.sm.sm_id == smid
            assert bob.events["session_start"] == 1, "resumption must not start a new session"
            assert bob.events["sm_failed"] == 0
            counts = collections.Counter(bob.bodies())
            assert counts == {f"m{i}": 1 for i in range(10)}, counts
            assert bob.bodies()[3:] == [f"m{i}" for i in range(3, 10)]  # in order
            assert proxy.accepted == 2
        finally:
            await _goodbye(bob.client, alice)
            await proxy.close()

    with _live_server(tmp_path, "resume_timeout: 600") as server:
        asyncio.run(asyncio.wait_for(scenario(server), 90))
        events = server.log_events()
    resumed = named(events, "session_resumed")
    assert len(resumed) == 1
    assert resumed[0].get("jid") == "bob@localhost/phone"
    assert resumed[0].get("resent") == 7  # m3..m9 came out of the buffer


def test_slixmpp_back_after_resume_timeout_gets_messages_from_offline_storage_once(
    tmp_path: Path,
) -> None:
    async def scenario(server: LiveServer) -> None:
        proxy = CutProxy(server.port)
        bob, alice = await _bob_online_then_cut(server, proxy)
        try:
            # m3..m5 go into the parked session's buffer...
            await _send(alice, range(3, 6))
            await wait_for_log_line_asyncio(
                server,
                event_is("connection_closed", BOB, reason="resume_timeout"),
                timeout=WAIT,
                what="bob's session ended by resume_timeout",
            )
            # ...which the end of the session handed to offline storage; m6..m8 go there
            # directly (bob has no resource now).
            await _send(alice, range(6, 9))
            bob.connect()
            await bob.until("a fresh session", lambda: bob.events["session_start"] == 2)
            await bob.until("m0..m8", lambda: len(set(bob.bodies())) == 9)
            await _quiet(bob, alice)
            assert bob.events["sm_failed"] == 1, "the expired SM id must be refused"
            assert bob.events["session_resumed"] == 0
            counts = collections.Counter(bob.bodies())
            assert counts == {f"m{i}": 1 for i in range(9)}, counts
            offline = bob.messages[3:]
            assert [m["body"] for m in offline] == [f"m{i}" for i in range(3, 9)]
            for message in offline:
                # XEP-0203: each stored message carries when it was stored, and by whom.
                assert message["delay"]["stamp"] is not None, message
                assert str(message["delay"]["from"]) == "localhost", message
            for message in bob.messages[:3]:
                assert message["delay"]["stamp"] is None, message
        finally:
            await _goodbye(bob.client, alice)
            await proxy.close()

    with _live_server(tmp_path, f"resume_timeout: {SHORT_RESUME_TIMEOUT}") as server:
        asyncio.run(asyncio.wait_for(scenario(server), 90))
        events = server.log_events()
    assert not named(events, "session_resumed")
    assert any(e.get("event") == "sm_resume_failed" for e in events)
    granted = {e.get("max") for e in events if e.get("event") == "sm_enabled"}
    assert granted == {SHORT_RESUME_TIMEOUT}  # <enabled max/> is the configured limit
