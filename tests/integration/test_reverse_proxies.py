"""The gateway behind the real HAProxy and nginx, configured from deploy/.

One set of processes serves the whole module: the gateway (a subprocess started with its
CLI, as in test_slixmpp.py), a second gateway that trusts no local proxy, a third that one
test drains, HAProxy running deploy/haproxy.cfg and nginx running
deploy/nginx-xmpp-websocket.conf. The deploy files are
used as they are, with only their addresses, ports and file paths replaced (each replaced
text must be present, so the files cannot drift away from what is tested); a few test-only
HAProxy sections are appended. Everything listens on free loopback ports, in temporary
directories, as child processes that are stopped even when a test fails.

HAProxy and nginx come from Debian's packages (scripts/test.sh installs them); the tests
are skipped, saying so, only when the binaries cannot be found.
"""

from __future__ import annotations

import contextlib
import csv
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import wrap_client_stream

from gateway.net.tcp import unwrap_proxy
from gateway.net.transport import PeerInfo
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from tests.helpers.accounts import PASSWORD
from tests.helpers.client import RawClient, StreamEnd, mechanisms
from tests.helpers.live import ROOT, free_port, import_users, make_certs
from tests.helpers.logs import LogLine, event_is, named, parse_json_lines, wait_for_log_line
from tests.helpers.websocket import FRAMING, WsClient

pytestmark = pytest.mark.integration

DEPLOY = ROOT / "deploy"
# Where Debian puts the daemons; a non-root PATH often lacks the sbin directories.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
# The address a test WebSocket client claims in its own X-Forwarded-For (TEST-NET-2).
CLAIMED_ADDRESS = "198.51.100.7"
# What it claims in a Forwarded header, which nginx must drop (TEST-NET-3).
SPOOFED_ADDRESS = "203.0.113.66"


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


IPV6 = _has_ipv6()


def _render(text: str, replacements: dict[str, str]) -> str:
    """`text` with every key replaced; a key that is missing is a test failure."""
    for old, new in replacements.items():
        assert old in text, f"the deploy file no longer contains {old!r}"
        text = text.replace(old, new)
    return text


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({path}: {exc})"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _spawn(cleanup: contextlib.ExitStack, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    cleanup.callback(_stop, proc)
    return proc


def _wait(ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what} did not start (exit {proc.poll()}):\n{_tail(log)}")
        time.sleep(0.05)


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    log: Path
    listeners: int

    def wait_started(self) -> None:
        """Wait (bounded) until every listener has logged "listening"."""

        def ready() -> bool:
            return len(named(self.log_events(), "listening")) == self.listeners

        _wait(ready, self.proc, "the gateway", self.log)

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (a line still being written is left out)."""
        return parse_json_lines(self.log.read_bytes())

    async def wait_for(
        self, what: str, predicate: Callable[[LogLine], bool], timeout: float = 10
    ) -> dict[str, Any]:
        """The first log line matching `predicate`, waiting for it to be written."""
        return await wait_for_log_line(self, predicate, timeout=timeout, what=what)


@dataclass
class Stack:
    gateway: Gateway
    untrusted: Gateway
    draining: Gateway
    cert: Path
    # HAProxy frontends: deploy's STARTTLS passthrough (:5222) and TLS offload (:5223), and
    # the test-only ones.
    c2s_port: int
    offload_port: int
    untrusted_port: int
    probe_frontend_port: int
    probe_port: int
    haproxy_stats: Path
    haproxy_log: Path
    # nginx's wss:// server (deploy's :443).
    nginx_port: int
    nginx_log: Path

    def client_tls(self, alpn: str | None = None) -> ssl.SSLContext:
        """Verifies the development certificate (self-signed, so it is its own CA)."""
        context = ssl.create_default_context(cafile=str(self.cert))
        if alpn is not None:
            context.set_alpn_protocols([alpn])
        return context


def _start_gateway(
    cleanup: contextlib.ExitStack,
    directory: Path,
    config_text: str,
    *,
    listeners: int,
    users: tuple[str, ...] = (),
) -> Gateway:
    """A gateway subprocess (not waited for: see `Gateway.wait_started`)."""
    directory.mkdir()
    config = directory / "config.yaml"
    config.write_text(config_text)
    if users:
        import_users(config, users, PASSWORD)
    log = directory / "gateway.log"
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    return Gateway(_spawn(cleanup, argv, log), log, listeners)


def _haproxy_stat(stats: Path) -> list[dict[str, str]]:
    """HAProxy's `show stat` CSV from its admin socket."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(stats))
        sock.sendall(b"show stat\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    text = data.decode().removeprefix("# ")
    return list(csv.DictReader(line for line in text.splitlines() if line))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    haproxy = shutil.which("haproxy", path=SEARCH_PATH)
    nginx = shutil.which("nginx", path=SEARCH_PATH)
    if haproxy is None or nginx is None:
        pytest.skip(
            "haproxy and nginx are needed (apt-get install haproxy nginx; scripts/test.sh "
            f"installs them): haproxy={haproxy}, nginx={nginx}"
        )
    tmp = tmp_path_factory.mktemp("proxies")
    certs = tmp / "certs"
    make_certs(certs)
    cert, key = certs / "localhost.pem", certs / "localhost.key"
    # HAProxy's `crt`: the chain followed by the key, in one file.
    bundle = certs / "haproxy.pem"
    bundle.write_text(cert.read_text() + key.read_text())
    bundle.chmod(0o600)

    names = ("c2s", "offload", "ws", "untrusted", "draining", "draining_ws")
    ports = {name: free_port() for name in names}
    with contextlib.ExitStack() as cleanup:
        # The gateway as deploy/haproxy.cfg and deploy/nginx-xmpp-websocket.conf describe it.
        gateway = _start_gateway(
            cleanup,
            tmp / "gateway",
            f"""
general: {{hosts: [localhost], shutdown_grace: 1}}
listen:
  c2s:
    - {{ip: 127.0.0.1, port: {ports["c2s"]}, tls: starttls, proxy_protocol: true}}
    - {{ip: 127.0.0.1, port: {ports["offload"]}, tls: none, proxy_protocol: true}}
  websocket:
    - {{ip: 127.0.0.1, port: {ports["ws"]}, path: /xmpp-websocket, tls: none}}
trusted_proxies: [127.0.0.1/32]
tls: {{certfile: {cert}, keyfile: {key}}}
auth: {{database: accounts.sqlite}}
logging: {{level: info, format: json}}
""",
            listeners=3,
            users=("alice", "bob", "carol", "dave"),
        )
        # A gateway that believes PROXY headers from 10.0.0.0/8 only, not from HAProxy.
        untrusted = _start_gateway(
            cleanup,
            tmp / "untrusted",
            f"""
general: {{hosts: [localhost], shutdown_grace: 1}}
listen:
  c2s: [{{ip: 127.0.0.1, port: {ports["untrusted"]}, tls: none, proxy_protocol: true}}]
trusted_proxies: [10.0.0.0/8]
auth: {{database: accounts.sqlite}}
logging: {{level: info, format: json}}
""",
            listeners=1,
        )
        # A gateway that is told to stop (SIGTERM) by a test, to see HAProxy's health
        # checks take it out of rotation while it drains.
        draining = _start_gateway(
            cleanup,
            tmp / "draining",
            f"""
general: {{hosts: [localhost], shutdown_grace: 10}}
listen:
  c2s: [{{ip: 127.0.0.1, port: {ports["draining"]}, tls: none, proxy_protocol: true}}]
  websocket: [{{ip: 127.0.0.1, port: {ports["draining_ws"]}, tls: none}}]
trusted_proxies: [127.0.0.1/32]
auth: {{database: accounts.sqlite}}
logging: {{level: info, format: json}}
""",
            listeners=2,
        )
        for started in (gateway, untrusted, draining):
            started.wait_started()

        c2s_port, offload_port = free_port(), free_port()
        untrusted_port, probe_frontend_port, probe_port = free_port(), free_port(), free_port()
        stats = tmp / "haproxy.sock"
        haproxy_cfg = _render(
            (DEPLOY / "haproxy.cfg").read_text(),
            {
                "\nglobal\n": f"\nglobal\n    stats socket {stats} mode 600 level admin\n",
                # A test machine's file descriptor limit may be far below production's.
                "maxconn 100000": "maxconn 1000",
                # IPv6 on ::1 when the machine has it; without, the lines go (see the file).
                "    bind :::5222 v6only\n": (f"    bind ::1:{c2s_port} v6only\n" if IPV6 else ""),
                "    bind :::5223 v6only ssl crt /etc/haproxy/certs/xmpp.pem alpn xmpp-client\n": (
                    f"    bind ::1:{offload_port} v6only ssl crt {bundle} alpn xmpp-client\n"
                    if IPV6
                    else ""
                ),
                "bind :5222\n": f"bind 127.0.0.1:{c2s_port}\n",
                "bind :5223 ssl crt /etc/haproxy/certs/xmpp.pem ": (
                    f"bind 127.0.0.1:{offload_port} ssl crt {bundle} "
                ),
                "127.0.0.1:15222 ": f"127.0.0.1:{ports['c2s']} ",
                "127.0.0.1:15223 ": f"127.0.0.1:{ports['offload']} ",
                "check port 5280": f"check port {ports['ws']}",
                # Faster checks, so that the tests need not wait seconds for them.
                "default-server inter 2s ": "default-server inter 200ms ",
            },
        )
        haproxy_cfg += f"""
# Test only: the same relay to a gateway that does not trust this HAProxy.
frontend test_untrusted
    bind 127.0.0.1:{untrusted_port}
    default_backend test_untrusted
backend test_untrusted
    server gw2 127.0.0.1:{ports["untrusted"]} send-proxy-v2

# Test only: a gateway that a test drains; checked like the others (defaults).
backend test_draining
    server gw3 127.0.0.1:{ports["draining"]} send-proxy-v2 check port {ports["draining_ws"]}

# Test only: the TLS offload relay to a probe in the test, which reads the PROXY header.
frontend test_offload_probe
    bind 127.0.0.1:{probe_frontend_port} ssl crt {bundle} alpn xmpp-client
    default_backend test_offload_probe
backend test_offload_probe
    server probe 127.0.0.1:{probe_port} send-proxy-v2-ssl
"""
        (tmp / "haproxy.cfg").write_text(haproxy_cfg)
        haproxy_log = tmp / "haproxy.log"
        checked = subprocess.run(
            [haproxy, "-c", "-f", str(tmp / "haproxy.cfg")],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        proc = _spawn(cleanup, [haproxy, "-f", str(tmp / "haproxy.cfg"), "-db"], haproxy_log)

        def haproxy_ready() -> bool:
            try:
                return bool(_haproxy_stat(stats))
            except OSError:
                return False

        _wait(haproxy_ready, proc, "haproxy", haproxy_log)

        nginx_dir = tmp / "nginx"
        nginx_dir.mkdir()
        nginx_port = free_port()
        (nginx_dir / "xmpp-websocket.conf").write_text(
            _render(
                (DEPLOY / "nginx-xmpp-websocket.conf").read_text(),
                {
                    "listen 443 ssl;": f"listen 127.0.0.1:{nginx_port} ssl;",
                    "    listen [::]:443 ssl;  # drop on a host without IPv6\n": "",
                    "/etc/ssl/xmpp/fullchain.pem": str(cert),
                    "/etc/ssl/xmpp/privkey.pem": str(key),
                    "server 127.0.0.1:5280 ": f"server 127.0.0.1:{ports['ws']} ",
                },
            )
        )
        nginx_log = nginx_dir / "error.log"
        # Started by root (CI), the workers would switch to `nobody`, who cannot enter the
        # private temporary directory: keep them as the user running the tests.
        user = "user root;\n" if os.geteuid() == 0 else ""
        (nginx_dir / "nginx.conf").write_text(
            f"""{user}worker_processes 1;
pid {nginx_dir}/nginx.pid;
error_log {nginx_log} info;
events {{ worker_connections 256; }}
http {{
    access_log {nginx_dir}/access.log;
    client_body_temp_path {nginx_dir}/client_body;
    proxy_temp_path {nginx_dir}/proxy;
    fastcgi_temp_path {nginx_dir}/fastcgi;
    uwsgi_temp_path {nginx_dir}/uwsgi;
    scgi_temp_path {nginx_dir}/scgi;
    include {nginx_dir}/xmpp-websocket.conf;
}}
"""
        )
        nginx_argv = [nginx, "-p", str(nginx_dir), "-e", str(nginx_log)]
        nginx_argv += ["-c", str(nginx_dir / "nginx.conf")]
        checked = subprocess.run(
            [*nginx_argv, "-t"], capture_output=True, text=True, timeout=30, check=False
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        proc = _spawn(cleanup, [*nginx_argv, "-g", "daemon off;"], nginx_dir / "stdout.log")

        def nginx_ready() -> bool:
            try:
                socket.create_connection(("127.0.0.1", nginx_port), timeout=1).close()
            except OSError:
                return False
            return True

        _wait(nginx_ready, proc, "nginx", nginx_log)

        yield Stack(
            gateway=gateway,
            untrusted=untrusted,
            draining=draining,
            cert=cert,
            c2s_port=c2s_port,
            offload_port=offload_port,
            untrusted_port=untrusted_port,
            probe_frontend_port=probe_frontend_port,
            probe_port=probe_port,
            haproxy_stats=stats,
            haproxy_log=haproxy_log,
            nginx_port=nginx_port,
            nginx_log=nginx_log,
        )


async def _via_haproxy(stack: Stack) -> tuple[RawClient, trio.SocketStream, int]:
    """A client connected to HAProxy's STARTTLS port, its TCP stream and its local port."""
    tcp = await trio.open_tcp_stream("127.0.0.1", stack.c2s_port)
    return RawClient(tcp), tcp, int(tcp.socket.getsockname()[1])


async def _message(client: RawClient) -> Element:
    """The next <message/>, skipping XEP-0198 requests and presence."""
    while True:
        element = await client.receive()
        if element.tag == (ns.CLIENT, "message"):
            return element


async def test_client_through_haproxy_starttls_passthrough_is_logged_with_its_address(
    stack: Stack,
) -> None:
    with trio.fail_after(20):
        alice, _, alice_port = await _via_haproxy(stack)
        bob, _, _ = await _via_haproxy(stack)
        # STARTTLS with the gateway's own certificate, verified: HAProxy only relays bytes.
        await alice.login("alice", PASSWORD, tls=stack.client_tls(), resource="desk")
        await bob.login("bob", PASSWORD, tls=stack.client_tls(), resource="phone")
        await alice.send(
            "<message to='bob@localhost/phone' type='chat'><body>via haproxy</body></message>"
        )
        msg = await _message(bob)
        assert msg.get("from") == "alice@localhost/desk"
        assert msg.find_text(ns.CLIENT, "body") == "via haproxy"
        await bob.send("<message to='alice@localhost/desk' type='chat'><body>back</body></message>")
        assert (await _message(alice)).find_text(ns.CLIENT, "body") == "back"
        await alice.close()
        await bob.close()

        # The PROXY v2 header carried the client's own address and port: the gateway logs
        # them, with the proxy's address, on every line of the connection.
        peer = f"127.0.0.1:{alice_port} via 127.0.0.1"
        authenticated = await stack.gateway.wait_for(
            f"authenticated with peer={peer}",
            lambda e: e.get("event") == "authenticated" and e.get("peer") == peer,
        )
        assert authenticated["jid"] == "alice@localhost"
        await stack.gateway.wait_for(
            "connection_closed of alice",
            lambda e: (
                e.get("event") == "connection_closed"
                and e.get("conn_id") == authenticated["conn_id"]
            ),
        )
    lines = [e for e in stack.gateway.log_events() if e.get("conn_id") == authenticated["conn_id"]]
    assert {e["event"] for e in lines} >= {"connection_opened", "authenticated", "resource_bound"}
    assert {e["peer"] for e in lines} == {peer}


@pytest.mark.skipif(not IPV6, reason="this machine has no IPv6 loopback (::1)")
async def test_ipv6_client_through_haproxy_is_logged_with_its_ipv6_address(
    stack: Stack,
) -> None:
    with trio.fail_after(20):
        tcp = await trio.open_tcp_stream("::1", stack.c2s_port)
        local_port = int(tcp.socket.getsockname()[1])
        client = RawClient(tcp)
        await client.login("carol", PASSWORD, tls=stack.client_tls(), resource="v6")
        await client.close()
        # HAProxy reached the gateway over IPv4; the header carried the IPv6 client.
        peer = f"[::1]:{local_port} via 127.0.0.1"
        await stack.gateway.wait_for(
            f"authenticated with peer={peer}",
            lambda e: e.get("event") == "authenticated" and e.get("peer") == peer,
        )


async def test_haproxy_tls_offload_offers_plain_and_logs_in(stack: Stack) -> None:
    with trio.fail_after(20):
        tcp = await trio.open_tcp_stream("127.0.0.1", stack.offload_port)
        local_port = int(tcp.socket.getsockname()[1])
        # XEP-0368: TLS from the first byte, with HAProxy (the gateway's listener is plain).
        tls = trio.SSLStream(tcp, stack.client_tls("xmpp-client"), server_hostname="localhost")
        await tls.do_handshake()
        assert tls.selected_alpn_protocol() == "xmpp-client"
        carol = RawClient(tls)
        features = await carol.open()
        assert "PLAIN" in mechanisms(features)
        assert features.find(ns.TLS, "starttls") is None
        assert (await carol.auth("carol", PASSWORD, "PLAIN")).name == "success"
        carol.parser.reset()
        await carol.open()
        assert await carol.bind("offload") == "carol@localhost/offload"
        await carol.close()
        peer = f"127.0.0.1:{local_port} via 127.0.0.1"
        authenticated = await stack.gateway.wait_for(
            f"authenticated with peer={peer}",
            lambda e: e.get("event") == "authenticated" and e.get("peer") == peer,
        )
        assert authenticated["mechanism"] == "PLAIN"


async def test_haproxy_tls_offload_sends_the_ssl_tlv_the_gateway_reads(stack: Stack) -> None:
    """The same frontend/backend pair as deploy's :5223, relayed to a probe instead of the
    gateway: the gateway's own unwrap sees HAProxy's PP2 SSL TLV and marks the peer secure."""
    peers: list[PeerInfo] = []
    received: list[bytes] = []
    with trio.fail_after(15):
        listeners = await trio.open_tcp_listeners(stack.probe_port, host="127.0.0.1")
        async with trio.open_nursery() as nursery:

            async def probe(stream: trio.SocketStream) -> None:
                host, port, *_ = stream.socket.getpeername()
                unwrapped = await unwrap_proxy(
                    stream, PeerInfo(str(host), int(port)), [ipaddress.ip_network("127.0.0.1/32")]
                )
                assert unwrapped is not None
                inner, peer = unwrapped
                peers.append(peer)
                received.append(bytes(await inner.receive_some(100)))
                await inner.send_all(b"done")
                await inner.aclose()

            await nursery.start(trio.serve_listeners, probe, listeners)
            tcp = await trio.open_tcp_stream("127.0.0.1", stack.probe_frontend_port)
            local_port = int(tcp.socket.getsockname()[1])
            tls = trio.SSLStream(tcp, stack.client_tls("xmpp-client"), server_hostname="localhost")
            await tls.send_all(b"<stream")
            assert await tls.receive_some(100) == b"done"
            nursery.cancel_scope.cancel()
    assert peers == [
        PeerInfo("127.0.0.1", local_port, secure=True, via_proxy=True, proxy_ip="127.0.0.1")
    ]
    assert received == [b"<stream"]


async def test_session_resumes_through_haproxy_after_the_connection_is_cut(
    stack: Stack,
) -> None:
    with trio.fail_after(30):
        bob, _, _ = await _via_haproxy(stack)
        await bob.login("bob", PASSWORD, tls=stack.client_tls(), resource="resumer")
        dave, dave_tcp, _ = await _via_haproxy(stack)
        await dave.login("dave", PASSWORD, tls=stack.client_tls(), resource="phone")
        await dave.send(f"<enable xmlns='{ns.SM}' resume='true'/>")
        smid = (await dave.expect(ns.SM, "enabled")).get("id")
        assert smid
        await bob.send("<message to='dave@localhost/phone' type='chat'><body>m1</body></message>")
        assert (await _message(dave)).find_text(ns.CLIENT, "body") == "m1"

        # The client's network goes away: its TCP connection to HAProxy is cut (no
        # </stream>, no TLS close_notify). HAProxy closes its side to the gateway, which
        # parks the session.
        await trio.aclose_forcefully(dave_tcp)
        await stack.gateway.wait_for(
            "session_parked for dave",
            lambda e: e.get("event") == "session_parked" and e.get("jid", "").startswith("dave@"),
        )
        await bob.send("<message to='dave@localhost/phone' type='chat'><body>m2</body></message>")

        again, _, again_port = await _via_haproxy(stack)
        await again.open()
        await again.starttls(stack.client_tls())
        await again.open()
        assert (await again.auth("dave", PASSWORD)).name == "success"
        again.parser.reset()
        await again.open()
        await again.send(f"<resume xmlns='{ns.SM}' previd='{smid}' h='0'/>")
        assert (await again.expect(ns.SM, "resumed")).get("previd") == smid
        # m1 was never acked, so it comes again, then m2 that arrived while parked.
        bodies = [(await _message(again)).find_text(ns.CLIENT, "body") for _ in range(2)]
        assert bodies == ["m1", "m2"]
        await again.send(f"<a xmlns='{ns.SM}' h='2'/>")
        await again.close()
        await bob.close()
        # The resuming connection is logged with its own real address.
        await stack.gateway.wait_for(
            "connection_opened of the resuming client",
            lambda e: (
                e.get("event") == "connection_opened"
                and e.get("peer") == f"127.0.0.1:{again_port} via 127.0.0.1"
            ),
        )
        await stack.gateway.wait_for("session_resumed", event_is("session_resumed"))


async def test_websocket_client_through_nginx_chats_and_is_logged_with_forwarded_address(
    stack: Stack,
) -> None:
    with trio.fail_after(20):
        bob, _, _ = await _via_haproxy(stack)
        await bob.login("bob", PASSWORD, tls=stack.client_tls(), resource="desk")
        tcp = await trio.open_tcp_stream("127.0.0.1", stack.nginx_port)
        tls = trio.SSLStream(tcp, stack.client_tls(), server_hostname="localhost")
        await tls.do_handshake()
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(
                nursery,
                tls,
                "localhost",
                "/xmpp-websocket",
                subprotocols=["xmpp"],
                extra_headers=[
                    # A client may send its own X-Forwarded-For: nginx appends the address
                    # it sees (here 127.0.0.1, as the client is local).
                    (b"X-Forwarded-For", CLAIMED_ADDRESS.encode()),
                    # ...and a Forwarded header, which the gateway would prefer: the deploy
                    # config has nginx drop it, so it must not show up below.
                    (b"Forwarded", f"for={SPOOFED_ADDRESS}".encode()),
                ],
            )
            assert ws.subprotocol == "xmpp"
            browser = WsClient(ws)
            await browser.login("alice", "browser")
            await browser.send(
                "<message xmlns='jabber:client' to='bob@localhost/desk' type='chat'>"
                "<body>from the web, via nginx</body></message>"
            )
            msg = await _message(bob)
            assert msg.get("from") == "alice@localhost/browser"
            assert msg.find_text(ns.CLIENT, "body") == "from the web, via nginx"
            await bob.send(
                "<message to='alice@localhost/browser' type='chat'><body>hi web</body></message>"
            )
            while True:
                back = await browser.element()
                if back.name == "message":
                    break
            assert back.find_text(ns.CLIENT, "body") == "hi web"
            await browser.send(f"<close xmlns='{FRAMING}'/>")
            assert await browser.receive() == "close"
            await ws.aclose()
        await bob.close()
    # nginx sends "X-Forwarded-For: 198.51.100.7, 127.0.0.1" from 127.0.0.1. The gateway
    # believes the header because its TCP peer (nginx) is in trusted_proxies, then walks
    # it right to left: 127.0.0.1 (the address nginx saw) is itself a trusted proxy, so the
    # walk goes on to 198.51.100.7, the first address that is not, and stops there. A
    # real client on the Internet has an untrusted address, so the walk would stop at it
    # and its own claims further left would count for nothing; only because this test's
    # client shares the proxies' loopback address is its claim believed. No port: HTTP
    # forwarding headers carry none.
    events = stack.gateway.log_events()
    opened = [
        e for e in events if e.get("event") == "authenticated" and e.get("transport") == "websocket"
    ]
    assert [e["peer"] for e in opened] == [f"{CLAIMED_ADDRESS}:0 via 127.0.0.1"]
    assert SPOOFED_ADDRESS not in stack.gateway.log.read_text()


async def test_proxy_header_from_an_untrusted_haproxy_is_refused_with_a_log_line(
    stack: Stack,
) -> None:
    with trio.fail_after(15):
        tcp = await trio.open_tcp_stream("127.0.0.1", stack.untrusted_port)
        client = RawClient(tcp)
        # The gateway closes without answering; HAProxy then closes the client's side.
        with pytest.raises((StreamEnd, trio.BrokenResourceError)):
            await client.open()
        refused = await stack.untrusted.wait_for("proxy_refused", event_is("proxy_refused"))
    assert "trusted_proxies" in refused["reason"]
    assert refused["proxy"].startswith("127.0.0.1:")
    assert not named(stack.untrusted.log_events(), "connection_opened")


async def _https_get(stack: Stack, path: str) -> tuple[int, bytes]:
    tcp = await trio.open_tcp_stream("127.0.0.1", stack.nginx_port)
    tls = trio.SSLStream(tcp, stack.client_tls(), server_hostname="localhost")
    await tls.send_all(
        f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
    )
    response = b""
    with contextlib.suppress(trio.BrokenResourceError):
        while chunk := await tls.receive_some():
            response += chunk
    await trio.aclose_forcefully(tls)
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def test_healthz_answers_200_through_nginx(stack: Stack) -> None:
    with trio.fail_after(10):
        assert await _https_get(stack, "/healthz") == (200, b"ok\n")
        status, _ = await _https_get(stack, "/elsewhere")
        assert status == 404


async def test_haproxy_health_checks_see_the_gateway_up(stack: Stack) -> None:
    """deploy/haproxy.cfg checks GET /healthz on the WebSocket port: layer 7 OK, 200."""
    with trio.fail_after(15):
        while True:
            rows = {
                (row["pxname"], row["svname"]): row for row in _haproxy_stat(stack.haproxy_stats)
            }
            checked = [
                rows[(backend, "gw1")]
                for backend in ("gateway_c2s_starttls", "gateway_c2s_offload")
            ]
            if all(row["check_status"] == "L7OK" for row in checked):
                break
            await trio.sleep(0.2)
    assert all(row["status"] == "UP" and row["check_code"] == "200" for row in checked), checked


async def test_haproxy_takes_a_draining_gateway_out_of_rotation(stack: Stack) -> None:
    """SIGTERM: the gateway drains for shutdown_grace, /healthz answers 503, and HAProxy's
    checks (deploy's defaults: 2 failures) mark the server DOWN before the grace ends."""

    def gw3() -> dict[str, str]:
        rows = _haproxy_stat(stack.haproxy_stats)
        return next(row for row in rows if row["svname"] == "gw3")

    with trio.fail_after(15):
        while gw3()["check_status"] != "L7OK":
            await trio.sleep(0.1)
        stack.draining.proc.send_signal(signal.SIGTERM)
        await stack.draining.wait_for("draining", event_is("draining"))
        while gw3()["status"] != "DOWN":
            await trio.sleep(0.1)
    row = gw3()
    assert (row["check_status"], row["check_code"]) == ("L7STS", "503"), row
    # Still inside the grace: the gateway stopped because of the signal, not a crash.
    assert stack.draining.proc.poll() is None
