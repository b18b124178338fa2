"""A real browser library against the real program: @xmpp/client (xmpp.js) over WebSocket.

`tests/js/client.mjs` runs @xmpp/client (the version pinned in `tests/js/package.json`,
installed here with `npm ci` into `tests/js/node_modules` when missing, kept afterwards)
under Node.js and speaks JSON lines with this test over its stdin and stdout: it reports
"online", "sm_enabled", "available", "resumed" and every message it receives, and sends
messages and pings on command (the protocol is at the top of client.mjs). It uses the
library's own stream management (XEP-0198, `resume="true"`) and its reconnect module,
which reconnects a second after the socket drops and then resumes.

Two quirks of xmpp.js 0.14.0's h counting (not the gateway's) shape the scenarios: the
results of its own iq requests are left out of its h (so alice sends no iq before a cut
that she resumes from), and its h is reset to 0 only in a promise continuation after
<enabled/>, so client.mjs sends initial presence (and with it the offline flush) only
after <enabled/> (details in client.mjs).

The gateway runs as a subprocess started with its CLI (as in `test_slixmpp.py`) with a
plain c2s listener and a WebSocket listener (`tls: none`; @xmpp/client accepts PLAIN
over ws:// to 127.0.0.1, but prefers SCRAM-SHA-1). The partner is a `RawClient` over TCP.
For resumption a trio TCP relay sits between Node and the WebSocket port: `cut()` resets
both sides (an RST each way, no WebSocket close frame), and holds reconnecting clients
until `restore()`, so the partner's messages certainly go to the parked session.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import shutil
import socket
import string
import struct
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from tests.helpers.accounts import LIVE_PASSWORD
from tests.helpers.client import RawClient, StreamEnd
from tests.helpers.live import ROOT, LiveGateway, live_gateway
from tests.helpers.logs import event_is, named, wait_for_log_line

JS_DIR = ROOT / "tests" / "js"
NODE = shutil.which("node")
NPM = shutil.which("npm")
WAIT = 20.0  # seconds: the bound on every single wait below
NPM_TIMEOUT = 300  # seconds for `npm ci` on a cold cache
ALICE = "alice@localhost/browser"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        NODE is None or NPM is None,
        reason="Node.js (node and npm) is not installed: the @xmpp/client tests need it",
    ),
]


# --- Node.js and @xmpp/client ---------------------------------------------------------


def _pinned_version() -> str:
    package = json.loads((JS_DIR / "package.json").read_text())
    return str(package["dependencies"]["@xmpp/client"])


def _installed_version() -> str | None:
    manifest = JS_DIR / "node_modules" / "@xmpp" / "client" / "package.json"
    if not manifest.exists():
        return None
    return str(json.loads(manifest.read_text())["version"])


@pytest.fixture(scope="module")
def node_command() -> list[str]:
    """`node [flags] client.mjs`, with @xmpp/client installed (once, then cached)."""
    assert NODE is not None and NPM is not None
    # A lock across processes (on the directory itself: `npm ci` deletes node_modules):
    # two suites running at once must not both run `npm ci`.
    lock = os.open(JS_DIR, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed_version() != _pinned_version():
            command = "ci" if (JS_DIR / "package-lock.json").exists() else "install"
            installed = subprocess.run(
                [NPM, command, "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=JS_DIR,
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT,
                check=False,
            )
            assert installed.returncode == 0, f"npm {command} failed:\n{installed.stderr}"
            assert _installed_version() == _pinned_version()
    finally:
        os.close(lock)  # releases the lock
    # @xmpp/websocket uses the global WebSocket: built in from Node 22, behind a flag on 20.
    probe = subprocess.run(
        [NODE, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    flags = [] if probe.returncode == 0 else ["--experimental-websocket"]
    return [NODE, *flags, str(JS_DIR / "client.mjs")]


class JsClient:
    """One `client.mjs` process: its events as they come, commands to its stdin."""

    def __init__(self, proc: trio.Process, stderr: Path) -> None:
        self.proc = proc
        self.stderr = stderr
        self.events: list[dict[str, Any]] = []
        self._changed = trio.Event()

    async def read_events(self) -> None:
        assert self.proc.stdout is not None
        buffer = b""
        while data := await self.proc.stdout.receive_some(65536):
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line.strip():
                    self.events.append(json.loads(line))
            self._changed.set()
            self._changed = trio.Event()

    async def command(self, cmd: str, **fields: object) -> None:
        assert self.proc.stdin is not None
        line = json.dumps({"cmd": cmd, **fields}) + "\n"
        await self.proc.stdin.send_all(line.encode())

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]

    def count(self, name: str) -> int:
        return len(self.named(name))

    def bodies(self) -> list[str]:
        return [e["body"] for e in self.named("message")]

    async def until(self, what: str, condition: Callable[[], bool]) -> None:
        """Wait (bounded) until `condition()` holds; the events and stderr on failure."""
        with trio.move_on_after(WAIT):
            while not condition():
                await self._changed.wait()
            return
        raise AssertionError(
            f"@xmpp/client: timed out waiting for {what}\nevents: {self.events}\n"
            f"stderr: {self.stderr.read_text()[-3000:]}"
        )

    async def send(self, to: str, body: str, msg_id: str) -> None:
        await self.command("send", to=to, body=body, id=msg_id)
        await self.until(f"sent {msg_id}", lambda: {"event": "sent", "id": msg_id} in self.events)

    async def ping(self, ping_id: str) -> None:
        """A round trip to the server: whatever was sent before has been read by then."""
        await self.command("ping", id=ping_id)
        await self.until(f"pong {ping_id}", lambda: {"event": "pong", "id": ping_id} in self.events)

    def errors(self) -> list[dict[str, Any]]:
        return self.named("error")


@contextlib.asynccontextmanager
async def js_client(
    command: list[str], tmp_path: Path, name: str, **options: object
) -> AsyncIterator[JsClient]:
    """Run client.mjs; on the way out stop it (`stop`, then kill) whatever happened."""
    stderr = tmp_path / f"{name}.stderr"
    with stderr.open("wb") as stderr_file:
        proc = await trio.lowlevel.open_process(
            [*command, json.dumps(options)],
            cwd=JS_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr_file,
        )
    try:
        async with trio.open_nursery() as nursery:
            client = JsClient(proc, stderr)
            nursery.start_soon(client.read_events)
            try:
                yield client
            finally:
                with trio.move_on_after(5, shield=True):
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await client.command("stop")
                    await proc.wait()
                nursery.cancel_scope.cancel()
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.move_on_after(5, shield=True):
            await proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                await trio.aclose_forcefully(pipe)


# --- the gateway ----------------------------------------------------------------------


WsServer = LiveGateway  # ports "c2s" (plain TCP) and "ws" (ws://, /xmpp-websocket)

CONFIG = """
# No load balancer to drain from: stop at once on SIGTERM.
general: {hosts: [localhost], shutdown_grace: 0}
listen:
  c2s: [{ip: 127.0.0.1, port: $c2s, tls: none}]
  websocket: [{ip: 127.0.0.1, port: $ws, path: /xmpp-websocket, tls: none}]
auth: {database: data/accounts.sqlite}
modules:
  mod_stream_management: {$sm_options}
logging: {level: info, format: json}
"""


def _ws_url(server: WsServer) -> str:
    return f"ws://127.0.0.1:{server.ports['ws']}/xmpp-websocket"


@pytest.fixture
def ws_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[WsServer]:
    """The gateway subprocess: c2s without TLS and a ws:// listener, alice and bob.
    Indirect parametrization gives the stream management options."""
    sm_options = getattr(request, "param", "resume_timeout: 600")
    config = string.Template(CONFIG).safe_substitute(sm_options=sm_options)
    with live_gateway(
        tmp_path, config, password=LIVE_PASSWORD, ports=("c2s", "ws"), assert_clean_exit=True
    ) as server:
        yield server


# --- the partner over TCP -------------------------------------------------------------


class Partner:
    """bob on a RawClient over TCP; a reader task collects messages and iq results."""

    def __init__(self, client: RawClient) -> None:
        self.client = client
        self.messages: list[Element] = []
        self.results: set[str] = set()
        self._changed = trio.Event()

    async def read(self) -> None:
        with contextlib.suppress(StreamEnd, trio.ClosedResourceError, trio.BrokenResourceError):
            while True:
                element = await self.client.receive()
                if element.name == "message":
                    self.messages.append(element)
                elif element.name == "iq" and element.get("type") == "result":
                    self.results.add(element.get("id") or "")
                self._changed.set()
                self._changed = trio.Event()

    async def until(self, what: str, condition: Callable[[], bool]) -> None:
        with trio.move_on_after(WAIT):
            while not condition():
                await self._changed.wait()
            return
        raise AssertionError(f"partner: timed out waiting for {what}; bodies={self.bodies()}")

    def bodies(self) -> list[str | None]:
        return [m.find_text(ns.CLIENT, "body") for m in self.messages]

    async def send(self, to: str, body: str, msg_id: str) -> None:
        await self.client.send(
            f"<message to='{to}' type='chat' id='{msg_id}'><body>{body}</body></message>"
        )

    async def ping(self, ping_id: str) -> None:
        """The answer means the gateway has routed everything bob sent before."""
        await self.client.send(
            f"<iq type='get' to='localhost' id='{ping_id}'><ping xmlns='urn:xmpp:ping'/></iq>"
        )
        await self.until(f"pong {ping_id}", lambda: ping_id in self.results)


@contextlib.asynccontextmanager
async def partner(server: WsServer) -> AsyncIterator[Partner]:
    stream = await trio.open_tcp_stream("127.0.0.1", server.ports["c2s"])
    try:
        client = RawClient(stream)
        with trio.fail_after(WAIT):
            assert await client.login("bob", LIVE_PASSWORD, mechanism="PLAIN", resource="desk")
            await client.send("<presence/>")
        bob = Partner(client)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bob.read)
            try:
                yield bob
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


# --- a TCP relay that can lose the network --------------------------------------------


class CutProxy:
    """A TCP relay to `target_port`, with a network that can fail.

    `drop(direction)` silently discards, from then on, the bytes relayed towards the
    server or towards the client (a link that went dead one way: nobody notices yet).
    `cut()` resets both sides of every relayed connection (an RST each way, no WebSocket
    close frame) and holds new connections, accepted but not relayed, until `restore()`.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.accepted = 0
        self.network = trio.Event()
        self.network.set()
        self.dropping: set[str] = set()
        self.live: dict[trio.CancelScope, tuple[trio.SocketStream, trio.SocketStream]] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = int(listeners[0].socket.getsockname()[1])
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        try:
            await self.network.wait()
            server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            await trio.aclose_forcefully(client)
            return
        try:
            with trio.CancelScope() as scope:
                self.live[scope] = (client, server)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, server, "to_server")
                    nursery.start_soon(self._pump, server, client, "to_client")
        finally:
            self.live.pop(scope, None)
            await trio.aclose_forcefully(client)
            await trio.aclose_forcefully(server)

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream, to: str) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            while data := await source.receive_some(65536):
                if to not in self.dropping:
                    await sink.send_all(data)
            await sink.send_eof()

    def drop(self, direction: str) -> None:
        assert direction in ("to_server", "to_client")
        self.dropping.add(direction)

    def cut(self) -> None:
        """Reset both sides of every relayed connection (SO_LINGER 0: an RST, no FIN)."""
        self.network = trio.Event()
        for scope, pair in list(self.live.items()):
            for stream in pair:
                with contextlib.suppress(OSError):
                    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            scope.cancel()
        self.dropping.clear()

    def restore(self) -> None:
        self.network.set()


# --- the tests ------------------------------------------------------------------------


async def test_xmpp_js_logs_in_over_websocket_and_chats_with_a_tcp_client(
    ws_server: WsServer, node_command: list[str], tmp_path: Path
) -> None:
    with trio.fail_after(60):
        async with (
            partner(ws_server) as bob,
            js_client(
                node_command,
                tmp_path,
                "alice",
                service=_ws_url(ws_server),
                domain="localhost",
                username="alice",
                password=LIVE_PASSWORD,
                resource="browser",
            ) as alice,
        ):
            await alice.until("online", lambda: alice.count("online") == 1)
            assert alice.named("online")[0]["jid"] == "alice@localhost/browser"
            await alice.until("sm enabled", lambda: alice.count("sm_enabled") == 1)
            assert alice.named("sm_enabled")[0]["resume"] is True
            await alice.until("available", lambda: alice.count("available") == 1)

            # Browser -> TCP: bodies with markup characters and non-ASCII text.
            sent = [f"from the web {i} <&> ü €" for i in range(3)]
            for i, body in enumerate(sent):
                await alice.send("bob@localhost/desk", body, f"w{i}")
            await bob.until("w0..w2", lambda: len(bob.messages) >= 3)
            assert bob.bodies() == sent
            assert [m.get("id") for m in bob.messages] == ["w0", "w1", "w2"]
            assert {m.get("from") for m in bob.messages} == {"alice@localhost/browser"}

            # TCP -> browser, to the full and to the bare JID.
            await bob.send("alice@localhost/browser", "hi web &amp; co", "t0")
            await bob.send("alice@localhost", "to the bare jid", "t1")
            await alice.until("t0, t1", lambda: len(alice.named("message")) >= 2)
            got = alice.named("message")
            assert [(m["id"], m["body"], m["from"]) for m in got] == [
                ("t0", "hi web & co", "bob@localhost/desk"),
                ("t1", "to the bare jid", "bob@localhost/desk"),
            ]
            await alice.ping("p0")
            assert not alice.errors(), alice.errors()
        assert alice.count("stopped") == 1, alice.events

    events = ws_server.log_events()
    logins = named(events, "authenticated")
    by_jid = {e.get("jid"): e for e in logins}
    assert by_jid["alice@localhost"].get("transport") == "websocket", by_jid
    assert by_jid["alice@localhost"].get("mechanism") == "SCRAM-SHA-1"  # xmpp.js prefers it
    assert LIVE_PASSWORD not in ws_server.log.read_text()


@contextlib.asynccontextmanager
async def alice_behind_proxy(
    ws_server: WsServer, node_command: list[str], tmp_path: Path
) -> AsyncIterator[tuple[CutProxy, Partner, JsClient]]:
    """alice (@xmpp/client) reaching the WebSocket port through a CutProxy; bob over TCP."""
    proxy = CutProxy(ws_server.ports["ws"])
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        async with (
            partner(ws_server) as bob,
            js_client(
                node_command,
                tmp_path,
                "alice",
                service=f"ws://127.0.0.1:{proxy.port}/xmpp-websocket",
                domain="localhost",
                username="alice",
                password=LIVE_PASSWORD,
                resource="browser",
            ) as alice,
        ):
            yield proxy, bob, alice
        nursery.cancel_scope.cancel()


async def test_xmpp_js_resumes_after_the_websocket_drops_and_every_message_arrives_once(
    ws_server: WsServer, node_command: list[str], tmp_path: Path
) -> None:
    with trio.fail_after(60):
        async with alice_behind_proxy(ws_server, node_command, tmp_path) as (proxy, bob, alice):
            await alice.until("online", lambda: alice.count("online") == 1)
            await alice.until("sm enabled", lambda: alice.count("sm_enabled") == 1)
            smid = alice.named("sm_enabled")[0]["id"]
            assert smid and alice.named("sm_enabled")[0]["resume"] is True
            await alice.until("available", lambda: alice.count("available") == 1)

            # m0..m2 arrive live; alice's n0..n2 reach bob.
            for i in range(3):
                await bob.send("alice@localhost", f"m{i}", f"m{i}")
                await alice.send("bob@localhost/desk", f"n{i}", f"n{i}")
            await alice.until("m0..m2", lambda: len(alice.bodies()) >= 3)
            await bob.until("n0..n2", lambda: len(bob.messages) >= 3)
            # No iq request from alice before the cut: xmpp.js 0.14.0 does not count
            # the results its iqCaller consumes into its h (the stream-management
            # middleware runs after iqCaller's, which does not call next()), so the
            # gateway would rightly send such a result again after the resumption.

            # The link dies towards alice first: the gateway still reads her, so n3 is
            # routed, but its <a/> for n3 is lost, and so are m3..m5 (sent, unacked).
            proxy.drop("to_client")
            await alice.send("bob@localhost/desk", "n3", "n3")
            await bob.until("n3", lambda: "n3" in bob.bodies())
            for i in range(3, 6):
                await bob.send("alice@localhost", f"m{i}", f"m{i}")
            await bob.ping("b0")
            # Then the other way too: n4 (and xmpp.js's <r/> after it) never arrive.
            proxy.drop("to_server")
            await alice.send("bob@localhost/desk", "n4", "n4")
            await trio.sleep(0.5)  # xmpp.js sends its <r/> 250 ms after a stanza
            # Then the network goes away: an RST each way, no close frame, no <close/>.
            proxy.cut()
            await alice.until(
                "disconnect",
                lambda: {"event": "status", "status": "disconnect"} in alice.events,
            )
            await wait_for_log_line(
                ws_server, event_is("session_parked", ALICE), timeout=WAIT, what="alice parked"
            )
            # While alice is away the gateway buffers m6..m9 in the parked session.
            for i in range(6, 10):
                await bob.send("alice@localhost", f"m{i}", f"m{i}")
            await bob.ping("b1")
            # xmpp.js reconnects on its own, a second after the drop; the proxy holds
            # that connection until the network is back.
            await alice.until("reconnecting", lambda: alice.count("reconnecting") >= 1)
            proxy.restore()
            await alice.until("resumed", lambda: alice.count("resumed") == 1)
            await alice.until("m0..m9", lambda: len(set(alice.bodies())) == 10)
            # <resumed h/> told xmpp.js that n3 was handled; it sends n4 again.
            await bob.until("n4", lambda: "n4" in bob.bodies())

            # After the resumption alice still talks on the same session.
            await alice.send("bob@localhost/desk", "n5", "n5")
            await bob.until("n5", lambda: "n5" in bob.bodies())
            # Let anything still in flight (a duplicate, say) arrive before counting.
            await alice.ping("p1")
            await bob.ping("b2")
            await trio.sleep(0.5)

            assert alice.count("online") == 1, "resumption must not start a new session"
            assert alice.count("sm_failed") == 0, alice.events
            assert alice.named("resumed")[0]["id"] == smid
            counts = collections.Counter(alice.bodies())
            assert counts == {f"m{i}": 1 for i in range(10)}, counts
            assert alice.bodies() == [f"m{i}" for i in range(10)]  # in order
            assert bob.bodies() == [f"n{i}" for i in range(6)]  # each once, in order
            # Only n4 was sent twice by xmpp.js, stamped with XEP-0203 the second time.
            delayed = [m.find_text(ns.CLIENT, "body") for m in bob.messages if _delayed(m)]
            assert delayed == ["n4"]
            assert proxy.accepted == 2
            assert not alice.errors(), alice.errors()

    resumed = named(ws_server.log_events(), "session_resumed")
    assert len(resumed) == 1, resumed
    assert resumed[0].get("jid") == "alice@localhost/browser"
    assert resumed[0].get("h") == 4  # alice had handled her own presence and m0..m2
    assert resumed[0].get("resent") == 7  # m3..m9 came out of the buffer


SHORT_RESUME_TIMEOUT = 2  # seconds (real time: the gateway is a subprocess)


@pytest.mark.parametrize("ws_server", [f"resume_timeout: {SHORT_RESUME_TIMEOUT}"], indirect=True)
async def test_xmpp_js_back_after_resume_timeout_starts_afresh_and_gets_offline_messages(
    ws_server: WsServer, node_command: list[str], tmp_path: Path
) -> None:
    with trio.fail_after(60):
        async with alice_behind_proxy(ws_server, node_command, tmp_path) as (proxy, bob, alice):
            await alice.until("sm enabled", lambda: alice.count("sm_enabled") == 1)
            assert alice.named("sm_enabled")[0]["max"] == SHORT_RESUME_TIMEOUT
            await alice.until("available", lambda: alice.count("available") == 1)
            await bob.send("alice@localhost", "m0", "m0")
            await alice.until("m0", lambda: alice.bodies() == ["m0"])
            # xmpp.js acks m0 when the gateway's <r/> after it comes; the ping's answer
            # means the gateway has read that <a/> (else m0, unacked, would rightly be
            # stored offline and come again). The iq result xmpp.js leaves out of its h
            # (see the test above) does not matter: this session is not resumed.
            await trio.sleep(0.2)
            await alice.ping("p0")
            proxy.cut()
            await wait_for_log_line(
                ws_server, event_is("session_parked", ALICE), timeout=WAIT, what="alice parked"
            )
            # m1 goes into the parked session's buffer, which its end hands to offline
            # storage; m2 goes there directly (alice has no resource then).
            await bob.send("alice@localhost", "m1", "m1")
            await bob.ping("b0")
            await wait_for_log_line(
                ws_server,
                event_is("connection_closed", ALICE, reason="resume_timeout"),
                timeout=WAIT,
                what="alice's session ended by resume_timeout",
            )
            await bob.send("alice@localhost", "m2", "m2")
            await bob.ping("b1")
            await alice.until("reconnecting", lambda: alice.count("reconnecting") >= 1)
            proxy.restore()
            # <failed/>, then xmpp.js binds afresh, enables SM again and sends initial
            # presence, which flushes offline storage.
            await alice.until("a fresh session", lambda: alice.count("online") == 2)
            await alice.until("m0..m2", lambda: len(alice.bodies()) >= 3)
            await alice.until("sm enabled again", lambda: alice.count("sm_enabled") == 2)
            await alice.until("available again", lambda: alice.count("available") == 2)
            await alice.ping("p1")
            await bob.ping("b2")
            await trio.sleep(0.5)

            assert alice.count("sm_failed") == 1, alice.events
            assert alice.count("resumed") == 0
            assert alice.bodies() == ["m0", "m1", "m2"]  # each once, in order
            assert [m["delay"] for m in alice.named("message")] == [False, True, True]
            assert not alice.errors(), alice.errors()

    events = ws_server.log_events()
    assert not named(events, "session_resumed")
    assert any(e.get("event") == "sm_resume_failed" for e in events)


def _delayed(message: Element) -> bool:
    return message.find("urn:xmpp:delay", "delay") is not None
