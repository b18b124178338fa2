"""Two gateway nodes of one cluster behind one HAProxy (TCP mode, round robin).

Each node is a gateway subprocess (`tests.helpers.live.live_gateway`, as in
test_cluster_live.py): a real redis-server (`redis_url`) and one SQLite file shared by
both, a distinct `cluster.node` each. Their c2s listeners are `tls: required` (STARTTLS,
with one certificate made by `scripts/make_cert.py` for both, so a client verifies the
same certificate whichever node it reaches) and `proxy_protocol: true`, trusting
127.0.0.1 as in test_reverse_proxies.py: HAProxy relays the bytes (TLS passthrough) and
prefixes each connection with a PROXY v2 header, so the nodes log every connection with
the client's own address and port, `peer="127.0.0.1:<client port> via 127.0.0.1"`. That is
how the tests tell which node a raw connection reached; for slixmpp clients, the
`resource_bound` line of their JID.

HAProxy (Debian's package, as test_reverse_proxies.py runs it; skipped, saying so, when
the binary is missing) listens on one free loopback port with `balance roundrobin` over
both nodes and no health checks (a check would be one more connection to the nodes), so
consecutive client connections alternate between the nodes. It is ready when its admin
socket answers (a probe connection to its port would take a turn of the round robin).

slixmpp runs on asyncio, so its test is a plain (sync) test that runs its scenario with
`asyncio.run`, bounded by `asyncio.timeout` (the counterpart of `trio.fail_after`), as in
test_slixmpp.py; the raw-client test runs on trio, bounded by `trio.fail_after`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import slixmpp
import trio

from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from tests.helpers.accounts import LIVE_PASSWORD
from tests.helpers.client import RawClient
from tests.helpers.live import LiveGateway, free_port, live_gateway, make_certs
from tests.helpers.logs import event_is, wait_for_log_line, wait_for_log_line_asyncio
from tests.helpers.slixmpp_clients import starttls_client
from tests.helpers.sm import RESUMABLE, Peer, body, first, message

pytestmark = pytest.mark.integration

# Where Debian puts the daemon; a non-root PATH often lacks the sbin directories.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
#: Seconds for the bound on every single wait (a stanza crossing nodes, a log line).
WAIT = 15.0
#: Seconds of wall time for a whole scenario (each takes a few).
SCENARIO = 60.0
#: Seconds for HAProxy and the nodes to start.
START = 30.0
#: Messages each slixmpp client sends the other.
COUNT = 5


@dataclass
class Cluster:
    """Two nodes, and the HAProxy in front of them."""

    nodes: tuple[LiveGateway, LiveGateway]
    port: int  # HAProxy's client-facing port
    cert: Path  # the certificate both nodes present (self-signed: its own CA)
    haproxy_log: Path

    def client_tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))

    def name(self, node: LiveGateway) -> str:
        return f"gw{self.nodes.index(node) + 1}"

    def holding(self, match: Callable[[dict[str, Any]], bool]) -> list[LiveGateway]:
        """The nodes whose log has a line that `match` accepts."""
        return [node for node in self.nodes if any(match(e) for e in node.log_events())]


def node_config(node: str, redis_url: str, database: Path, certs: Path) -> str:
    return (
        "general: {hosts: [localhost], shutdown_grace: 0.5}\n"
        "listen:\n"
        "  c2s: [{ip: 127.0.0.1, port: $c2s, tls: required, proxy_protocol: true}]\n"
        "trusted_proxies: [127.0.0.1/32]\n"
        f"tls: {{certfile: {certs / 'localhost.pem'}, keyfile: {certs / 'localhost.key'}}}\n"
        f"auth: {{database: {database}}}\n"
        "modules:\n"
        "  mod_stream_management: {backend: redis, resume_timeout: 300}\n"
        f"cluster: {{redis: '{redis_url}', node: {node}, heartbeat: 0.5}}\n"
        "logging: {level: info, format: json}\n"
    )


def haproxy_config(port: int, stats: Path, backends: tuple[int, int]) -> str:
    """deploy/haproxy.cfg's STARTTLS passthrough, with both nodes and round robin."""
    return f"""
global
    log stdout format raw local0 info
    stats socket {stats} mode 600 level admin
    maxconn 1000

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout client-fin 30s
    timeout server-fin 30s

frontend xmpp_c2s_starttls
    bind 127.0.0.1:{port}
    default_backend cluster

backend cluster
    balance roundrobin
    server gw1 127.0.0.1:{backends[0]} send-proxy-v2
    server gw2 127.0.0.1:{backends[1]} send-proxy-v2
"""


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({path}: {exc})"


def _haproxy_answers(stats: Path) -> bool:
    """HAProxy's admin socket answers `show info`."""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(stats))
            sock.sendall(b"show info\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except OSError:
        return False
    return b"Pid:" in data


def _logged(event: str, node: LiveGateway) -> Callable[[], bool]:
    return lambda: any(e.get("event") == event for e in node.log_events())


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _wait_started(
    ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, log: Path
) -> None:
    """Poll `ready()` (bounded by START) while `proc` runs."""
    deadline = time.monotonic() + START
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what} did not start (exit {proc.poll()}):\n{_tail(log)}")
        time.sleep(0.05)


@pytest.fixture
def cluster(tmp_path: Path, redis_url: str) -> Iterator[Cluster]:
    haproxy = shutil.which("haproxy", path=SEARCH_PATH)
    if haproxy is None:
        pytest.skip("haproxy is needed (apt-get install haproxy; scripts/test.sh installs it)")
    certs = tmp_path / "certs"
    make_certs(certs)
    database = tmp_path / "shared.sqlite"
    (tmp_path / "gw1").mkdir()
    (tmp_path / "gw2").mkdir()
    with (
        live_gateway(
            tmp_path / "gw1",
            node_config("gw1", redis_url, database, certs),
            password=LIVE_PASSWORD,
            users=("alice", "bob"),
        ) as one,
        live_gateway(
            tmp_path / "gw2",
            node_config("gw2", redis_url, database, certs),
            password=LIVE_PASSWORD,
            users=(),
        ) as two,
        contextlib.ExitStack() as cleanup,
    ):
        for node in (one, two):
            _wait_started(_logged("listening", node), node.proc, "a node", node.log)
        port, stats = free_port(), tmp_path / "haproxy.sock"
        config = tmp_path / "haproxy.cfg"
        config.write_text(haproxy_config(port, stats, (one.port, two.port)))
        checked = subprocess.run(
            [haproxy, "-c", "-f", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        haproxy_log = tmp_path / "haproxy.log"
        with haproxy_log.open("wb") as out:
            proc = subprocess.Popen(
                [haproxy, "-f", str(config), "-db"], stdout=out, stderr=subprocess.STDOUT
            )
        cleanup.callback(_stop, proc)  # stopped first, before the nodes
        _wait_started(lambda: _haproxy_answers(stats), proc, "haproxy", haproxy_log)
        yield Cluster((one, two), port, certs / "localhost.pem", haproxy_log)


# -- 1. slixmpp clients land on different nodes and chat ----------------------------------


class Chatter:
    """A slixmpp client through HAProxy, counting every chat message it receives."""

    def __init__(self, jid: str, cluster: Cluster) -> None:
        self.client = starttls_client(jid, cluster.cert)
        self.port = cluster.port
        self.events: collections.Counter[str] = collections.Counter()
        self.received: collections.Counter[tuple[str, str]] = collections.Counter()  # (from, body)
        self.changed = asyncio.Event()
        for name in ("session_start", "disconnected", "failed_all_auth", "connection_failed"):
            self.client.add_event_handler(name, self._counter(name))
        self.client.add_event_handler("message", self._on_message)

    def _counter(self, name: str) -> Callable[[object], None]:
        def handler(_event: object) -> None:
            self.events[name] += 1
            self.changed.set()

        return handler

    def _on_message(self, message: Any) -> None:
        if message["type"] == "chat":
            self.received[(str(message["from"]), str(message["body"]))] += 1
            self.changed.set()

    async def until(self, what: str, condition: Callable[[], bool]) -> None:
        """Wait (bounded by WAIT) until `condition()` holds."""
        try:
            async with asyncio.timeout(WAIT):
                while not condition():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"{self.client.boundjid}: timed out waiting for {what}; "
                f"events={dict(self.events)} received={dict(self.received)}"
            ) from None

    async def ping(self) -> None:
        """A round trip to the node: whatever this client sent before is processed."""
        await self.client.plugin["xep_0199"].ping(jid=slixmpp.JID("localhost"), timeout=WAIT)

    async def online(self) -> None:
        """Connect through HAProxy, wait for the session, send initial presence and make
        sure the node processed it (so messages to the bare JID find this resource)."""
        self.client.connect("127.0.0.1", self.port)
        await self.until("session start", lambda: self.events["session_start"] >= 1)
        self.client.send_presence()
        await self.ping()

    def send(self, to: str, body: str) -> None:
        self.client.send_message(mto=slixmpp.JID(to), mbody=body, mtype="chat")

    async def offline(self) -> None:
        self.client.disconnect()
        await self.until("disconnected", lambda: self.events["disconnected"] >= 1)


def test_slixmpp_clients_through_haproxy_land_on_both_nodes_andmessage(cluster: Cluster) -> None:
    alice_jid, bob_jid = "alice@localhost/desk", "bob@localhost/phone"

    async def scenario() -> tuple[Chatter, Chatter]:
        async with asyncio.timeout(SCENARIO):
            alice = Chatter(alice_jid, cluster)
            bob = Chatter(bob_jid, cluster)
            # One after the other: round robin gives them consecutive turns.
            await alice.online()
            await bob.online()
            for jid in (alice_jid, bob_jid):
                await wait_for_log_line_asyncio(
                    _Either(cluster),
                    event_is("resource_bound", jid),
                    timeout=WAIT,
                    what=f"resource_bound of {jid}",
                )

            # Both ways, to the bare JID (alice) and to the full one (bob), numbered.
            for a, b in zip(_numbered("a"), _numbered("b"), strict=True):
                alice.send("bob@localhost", a)
                bob.send(alice_jid, b)
            await bob.until("alice's messages", lambda: len(bob.received) == COUNT)
            await alice.until("bob's messages", lambda: len(alice.received) == COUNT)
            # A last one each way: sent after the others on the same path, so a repeat of
            # an earlier one would have arrived before it.
            alice.send("bob@localhost", "last")
            bob.send(alice_jid, "last")
            await bob.until("alice's last", lambda: (alice_jid, "last") in bob.received)
            await alice.until("bob's last", lambda: (bob_jid, "last") in alice.received)
            await alice.offline()
            await bob.offline()
            return alice, bob

    alice, bob = asyncio.run(scenario())
    # Every message arrived, once.
    assert bob.received == {(alice_jid, body): 1 for body in [*_numbered("a"), "last"]}
    assert alice.received == {(bob_jid, body): 1 for body in [*_numbered("b"), "last"]}
    # Round robin put them on different nodes: each JID was bound on exactly one node.
    alice_nodes = cluster.holding(event_is("resource_bound", alice_jid))
    bob_nodes = cluster.holding(event_is("resource_bound", bob_jid))
    assert len(alice_nodes) == 1 and len(bob_nodes) == 1, (alice_nodes, bob_nodes)
    assert alice_nodes != bob_nodes
    # Both came through HAProxy (their peers are logged "... via 127.0.0.1").
    for jid in (alice_jid, bob_jid):
        for node in cluster.nodes:
            bound = [e for e in node.log_events() if event_is("resource_bound", jid)(e)]
            assert all(e["peer"].endswith(" via 127.0.0.1") for e in bound), bound


def _numbered(prefix: str) -> list[str]:
    return [f"{prefix}{i}" for i in range(COUNT)]


@dataclass
class _Either:
    """Both nodes' logs as one log source (for the log waiting helpers)."""

    cluster: Cluster

    @property
    def log(self) -> Path:
        return self.cluster.nodes[0].log

    def log_events(self) -> list[dict[str, Any]]:
        return [e for node in self.cluster.nodes for e in node.log_events()]


# -- 2. a raw client resumes on the other node ---------------------------------------------


async def _connect(cluster: Cluster) -> tuple[RawClient, trio.SocketStream, LiveGateway]:
    """A TCP connection through HAProxy, and the node it reached (the one that logs
    `connection_opened` with this client's port in its peer)."""
    tcp = await trio.open_tcp_stream("127.0.0.1", cluster.port)
    peer = f"127.0.0.1:{int(tcp.socket.getsockname()[1])} via 127.0.0.1"
    opened = event_is("connection_opened", peer=peer)
    await wait_for_log_line(_Either(cluster), opened, timeout=WAIT, what=f"{peer} opened")
    (node,) = cluster.holding(opened)
    return RawClient(tcp), tcp, node


async def _login(cluster: Cluster, user: str, resource: str) -> tuple[Peer, LiveGateway]:
    raw, _, node = await _connect(cluster)
    await raw.login(user, LIVE_PASSWORD, tls=cluster.client_tls(), resource=resource)
    return Peer(raw), node


async def _bodies_until(peer: Peer, last: Callable[[Element], bool]) -> list[str]:
    """The bodies of the messages received up to and with the element `last` accepts."""
    bodies: list[str] = []
    with trio.fail_after(WAIT):
        while True:
            element = await peer.receive()
            if element.name == "message":
                bodies.append(body(element) or "")
            if last(element):
                return bodies


async def _until(peer: Peer, wanted: Callable[[Element], bool]) -> Element:
    return await first(peer, wanted, WAIT)


async def test_a_cut_client_resumes_through_haproxy_on_the_other_node(cluster: Cluster) -> None:
    bob_jid = "bob@localhost/phone"
    with trio.fail_after(SCENARIO):
        bob, first = await _login(cluster, "bob", "phone")
        assert (await bob.enable(RESUMABLE)).tag == (ns.SM, "enabled")
        smid = bob.smid
        assert smid
        await bob.send("<presence/>")
        await _until(bob, lambda e: e.name == "presence")  # his own, reflected
        alice, _ = await _login(cluster, "alice", "desk")
        await alice.send("<presence/>")
        await _until(alice, lambda e: e.name == "presence")

        await alice.send(message(bob_jid, "m1"))
        await _until(bob, lambda e: body(e) == "m1")
        handled = bob.h  # his presence, then m1: he acknowledges the presence only
        assert handled == 2

        # The network goes away: no </stream>, no TLS close_notify. HAProxy closes its
        # side to the node, which parks the session.
        await trio.aclose_forcefully(bob.raw.stream)
        await wait_for_log_line(
            first,
            event_is("session_parked", bob_jid),
            timeout=WAIT,
            what="bob's session parked",
        )

        # Back through HAProxy, on the other node: round robin alternates, so at most
        # one connection (kept open, unused) goes to the first node before it.
        dummies: list[trio.SocketStream] = []
        raw, tcp, second = await _connect(cluster)
        while second is first:
            assert len(dummies) < 2, "round robin keeps sending connections to one node"
            dummies.append(tcp)
            raw, tcp, second = await _connect(cluster)
        await raw.open()
        await raw.starttls(cluster.client_tls())
        await raw.open()
        assert (await raw.auth("bob", LIVE_PASSWORD)).name == "success"
        raw.parser.reset()
        await raw.open()
        again = Peer(raw)
        await again.send(f"<resume xmlns='{ns.SM}' previd='{smid}' h='{handled - 1}'/>")
        answer = await _until(again, lambda e: e.namespace == ns.SM)
        assert answer.tag == (ns.SM, "resumed"), answer
        assert answer.get("previd") == smid
        assert answer.get("h") == "1"  # the server had handled his one stanza (presence)
        again.managed, again.h, again.smid = True, handled - 1, smid

        # m1 comes again (unacknowledged); then a message sent after the resume arrives.
        resent = await _until(again, lambda e: e.name == "message")
        assert body(resent) == "m1", resent
        await alice.send(message(bob_jid, "m2"))
        after = await _bodies_until(again, lambda e: body(e) == "m2")
        # Nothing else was queued for him: an <r/> is answered after whatever was.
        await again.send(f"<r xmlns='{ns.SM}'/>")
        after += await _bodies_until(again, lambda e: e.tag == (ns.SM, "a"))
        assert after == ["m2"], after  # no second m1, no second m2
        assert again.server_h == 1
        for dummy in dummies:
            await trio.aclose_forcefully(dummy)

    # The session lives on the second node now, and the first let it go.
    resumed = await wait_for_log_line(
        second, event_is("session_resumed", bob_jid), timeout=WAIT, what="session_resumed"
    )
    assert resumed["resent"] == 1
    moved = await wait_for_log_line(
        first, event_is("session_moved", bob_jid), timeout=WAIT, what="session_moved"
    )
    assert moved["to_node"] == cluster.name(second)
