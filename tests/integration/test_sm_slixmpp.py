"""XEP-0198 with a real client: slixmpp's xep_0198 plugin loses its network and comes back.

The gateway runs as a subprocess started with its CLI, exactly as in `test_slixmpp.py`
(accounts from `user add`, a certificate from `scripts/make_cert.py`). Between the
resuming client (bob, slixmpp with `xep_0198`) and the gateway sits `CutProxy`, a tiny
asyncio TCP relay that can reset both sides of every relayed connection at once: no
`</stream:stream>`, no TLS close_notify, just an RST each way, the way a phone that
loses its network looks to a server (STARTTLS passes through the relay unchanged). The
partner (alice, a plain slixmpp client connected directly) sends numbered messages while
bob is away.

slixmpp does not reconnect on its own: after `disconnected` the test calls `connect()`
again, as an application does; the plugin then sends `<resume/>` (it kept its SM id and
h because stream management set `end_session_on_disconnect` to False).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import string
import struct
import time
from collections.abc import Callable
from pathlib import Path

import slixmpp

from tests.helpers.live import LiveGateway as LiveServer
from tests.helpers.live import live_gateway
from tests.integration.test_slixmpp import PASSWORD

WAIT = 20.0  # seconds: the bound on every single wait below
SHORT_RESUME_TIMEOUT = 2  # seconds (real time: the gateway is a subprocess)


class CutProxy:
    """A TCP relay to `target_port` whose `cut()` resets every relayed connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.server: asyncio.Server | None = None
        self.pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.pairs.append((writer, up_writer))
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    @staticmethod
    async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
            sink.close()

    def cut(self) -> None:
        """Reset both sides of every relayed connection (SO_LINGER 0: an RST, no FIN)."""
        pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for writer in pair:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                writer.transport.abort()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for task in list(self.tasks):
            task.cancel()


CONFIG = """
general: {hosts: [localhost]}
listen:
  c2s: [{ip: 127.0.0.1, port: $c2s, tls: required}]
tls: {certfile: certs/localhost.pem, keyfile: certs/localhost.key}
auth: {database: data/accounts.sqlite}
modules:
  mod_stream_management: {$sm_options}
logging: {level: info, format: json}
"""


def _live_server(tmp_path: Path, sm_options: str) -> contextlib.AbstractContextManager[LiveServer]:
    """The gateway subprocess (STARTTLS required), with `sm_options` for stream management."""
    config = string.Template(CONFIG).safe_substitute(sm_options=sm_options)
    return live_gateway(tmp_path, config, password=PASSWORD, certs=True)


class Phone:
    """bob on slixmpp with XEP-0198 resumption, connecting through the proxy."""

    def __init__(self, server: LiveServer, proxy: CutProxy) -> None:
        self.proxy = proxy
        client = slixmpp.ClientXMPP("bob@localhost/phone", PASSWORD)
        client.enable_plaintext = False
        client.enable_direct_tls = False
        client.enable_starttls = True
        client.ca_certs = server.cert
        client.register_plugin("xep_0198")
        client.register_plugin("xep_0199")
        client.register_plugin("xep_0203")
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
    alice = slixmpp.ClientXMPP("alice@localhost/desk", PASSWORD)
    alice.enable_plaintext = False
    alice.enable_direct_tls = False
    alice.enable_starttls = True
    alice.ca_certs = server.cert
    alice.register_plugin("xep_0199")
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


async def _log_event(server: LiveServer, match: Callable[[dict[str, object]], bool]) -> None:
    """Wait (bounded) for a gateway log line."""
    deadline = time.monotonic() + WAIT
    while not any(match(e) for e in server.log_events()):
        if time.monotonic() > deadline:
            raise AssertionError(f"log line not seen:\n{server.log.read_text()[-4000:]}")
        await asyncio.sleep(0.05)


def _bob_parked(event: dict[str, object]) -> bool:
    return event.get("event") == "session_parked" and event.get("jid") == "bob@localhost/phone"


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
    await _log_event(server, _bob_parked)
    return bob, alice


async def _quiet(bob: Phone, alice: slixmpp.ClientXMPP) -> None:
    """Let anything still in flight (a duplicate, say) arrive before counting."""
    await bob.client.plugin["xep_0199"].ping(jid=slixmpp.JID("localhost"), timeout=WAIT)
    await alice.plugin["xep_0199"].ping(jid=slixmpp.JID("localhost"), timeout=WAIT)
    await asyncio.sleep(0.5)


async def _goodbye(*clients: slixmpp.ClientXMPP) -> None:
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
    resumed = [e for e in events if e.get("event") == "session_resumed"]
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
            await _log_event(
                server,
                lambda e: (
                    e.get("event") == "connection_closed"
                    and e.get("jid") == "bob@localhost/phone"
                    and e.get("reason") == "resume_timeout"
                ),
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
    assert not [e for e in events if e.get("event") == "session_resumed"]
    assert any(e.get("event") == "sm_resume_failed" for e in events)
    granted = {e.get("max") for e in events if e.get("event") == "sm_enabled"}
    assert granted == {SHORT_RESUME_TIMEOUT}  # <enabled max/> is the configured limit
