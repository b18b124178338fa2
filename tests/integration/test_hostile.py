"""Hostile clients against the real gateway process: regressions for the defects they found.

Each test starts the gateway as a subprocess with its CLI (`tests.helpers.live`), on a
plain TCP listener (`tls: none`, so PLAIN is offered without TLS and the attackers stay
cheap), with accounts made by `user import`, and attacks it with raw trio sockets: floods
of tiny elements, stanzas that never end, huge SASL payloads, clients that never read,
offline quotas, WebSocket upgrades without the xmpp subprotocol, connection floods and
password guessing. The assertions are on the bytes and protocol outcomes the attackers and
the honest clients see, and on the gateway's resident memory (`VmRSS`/`VmHWM` of its
process, printed so `pytest -s` shows them), never on timing: every wait is bounded only so
that a hang fails instead of blocking the suite.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import re
import socket
import string
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.errors import RemoteProtocolError
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from gateway.xmpp.parser import ElementReceived, StreamClosed, StreamParser
from tests.helpers.client import HEADER, RawClient, StreamEnd
from tests.helpers.live import LiveGateway, import_users, live_gateway
from tests.helpers.logs import named

pytestmark = pytest.mark.integration

PASSWORD = "hostile-test-pw"
USERS = ("alice", "bob", "carol")
WAIT = 15.0  # seconds: the bound on any single wait for the gateway
TEST_BOUND = 60.0  # seconds: the bound on one whole test (each takes a few)
STREAM_HEADER = HEADER.format(to="localhost").encode()
SASL_AUTH = f"<auth xmlns='{ns.SASL}' mechanism='PLAIN'>"


# -- the gateway ------------------------------------------------------------------------


def _config(
    general: str = "", *, auth: str = "", modules: str = "", websocket: bool = False
) -> str:
    """A `live_gateway` config: one `tls: none` c2s listener (and a ws:// one), JSON logs,
    no drain grace; `general`, `auth` and `modules` are extra YAML flow-mapping items."""
    lines = [
        f"general: {{hosts: [localhost], shutdown_grace: 0{', ' + general if general else ''}}}",
        "listen:",
        "  c2s: [{ip: 127.0.0.1, port: $c2s, tls: none}]",
    ]
    if websocket:
        lines.append("  websocket: [{ip: 127.0.0.1, port: $ws, path: /xmpp-websocket, tls: none}]")
    lines += [
        f"auth: {{database: data/accounts.sqlite{', ' + auth if auth else ''}}}",
        f"modules: {{{modules}}}",
        "logging: {level: info, format: json}",
    ]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _gateway(tmp_path: Path, config: str, *, websocket: bool = False) -> Iterator[LiveGateway]:
    with live_gateway(
        tmp_path,
        config,
        password=PASSWORD,
        ports=("c2s", "ws") if websocket else ("c2s",),
        users=(),
        setup=functools.partial(import_users, users=USERS, password=PASSWORD),
    ) as gateway:
        yield gateway


def _events(gateway: LiveGateway, name: str) -> list[dict[str, Any]]:
    """The gateway's log lines `name` so far."""
    return named(gateway.log_events(), name)


async def _wait_log(gateway: LiveGateway, what: str, done: Callable[[], bool]) -> None:
    """Wait (bounded) until `done()` holds for the gateway's log."""
    with trio.move_on_after(WAIT):
        while not done():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"the log never showed {what}:\n{gateway.log.read_text()[-3000:]}")


# -- the gateway's memory ----------------------------------------------------------------


def _status_mb(pid: int, field: str) -> float:
    """A `/proc/PID/status` memory field (VmRSS, VmHWM) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _reset_peak(pid: int) -> None:
    """Start VmHWM over from the current RSS (Linux 4.0+). Where that is refused, VmHWM
    stays the peak since the start, which only makes the growth measured larger."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


@contextlib.contextmanager
def _memory(gateway: LiveGateway, what: str) -> Iterator[dict[str, float]]:
    """Measure the gateway's RSS before, at its peak during, and after the block; the
    figures (MB) are printed and left in the yielded dict (`growth` = peak - before)."""
    pid = gateway.proc.pid
    figures = {"before": _status_mb(pid, "VmRSS")}
    _reset_peak(pid)
    yield figures
    figures["peak"] = max(_status_mb(pid, "VmHWM"), figures["before"])
    figures["after"] = _status_mb(pid, "VmRSS")
    figures["growth"] = figures["peak"] - figures["before"]
    print(
        f"\n[{what}] gateway RSS before {figures['before']:.1f} MB, "
        f"peak {figures['peak']:.1f} MB, after {figures['after']:.1f} MB "
        f"(growth {figures['growth']:.1f} MB)"
    )


# -- raw clients -------------------------------------------------------------------------


async def _connect(
    port: int, *, source: str = "127.0.0.1", rcvbuf: int | None = None
) -> trio.SocketStream:
    """A TCP connection to the gateway from `source` (any 127/8 address), with a small
    receive buffer when `rcvbuf` is given (a slow reader then stalls the server sooner)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def _send_quietly(stream: trio.abc.SendStream, data: bytes, chunk: int = 16384) -> None:
    """Send `data` in chunks; stop quietly when the server has closed (EPIPE, reset)."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        for start in range(0, len(data), chunk):
            await stream.send_all(data[start : start + chunk])


async def _read_to_end(stream: trio.abc.ReceiveStream, timeout: float = WAIT) -> tuple[bytes, str]:
    """Everything the server sends until it closes the connection, and how it ended:
    "eof" (FIN), "reset" (RST) or "timeout" (still open after `timeout` seconds)."""
    data = bytearray()
    with trio.move_on_after(timeout):
        try:
            while chunk := await stream.receive_some(65536):
                data += chunk
        except trio.BrokenResourceError:
            return bytes(data), "reset"
        return bytes(data), "eof"
    return bytes(data), "timeout"


async def _send_and_read(stream: trio.abc.Stream, data: bytes) -> tuple[bytes, str]:
    """Send `data` (the server may close early) while reading everything it answers."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_send_quietly, stream, data)
        answer = await _read_to_end(stream)
        nursery.cancel_scope.cancel()
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.aclose()
    return answer


def _final_stream_error(data: bytes, client: RawClient | None = None) -> str:
    """What an XMPP parser makes of `data`, the last bytes the server sent: the condition
    of a stream error followed by the end of the stream, else what it found instead.

    `data` is a whole stream (from the server's header on), or the rest of `client`'s
    stream, read with its own parser (which holds the state of what it read before)."""
    parser = client.parser if client is not None else StreamParser(max_stanza_size=10_000_000)
    try:
        events = [*(client.events if client is not None else []), *parser.feed(data)]
    except RemoteProtocolError as exc:
        return f"not well-formed: {exc.condition.value} ({exc.text})"
    if not events or not isinstance(events[-1], StreamClosed):
        return "no end of stream: the bytes stop inside the stream"
    last = events[-2] if len(events) > 1 else None
    if not isinstance(last, ElementReceived) or last.element.tag != (ns.STREAM, "error"):
        return f"the stream ends without a stream error (last: {last})"
    return next(c.name for c in last.element.elements() if c.namespace == ns.STREAMS_ERRORS)


async def _login(
    gateway: LiveGateway,
    user: str,
    *,
    source: str = "127.0.0.1",
    resource: str | None = None,
    rcvbuf: int | None = None,
) -> RawClient:
    """`user` logged in with PLAIN (no TLS, no stream management) and a resource bound."""
    client = RawClient(await _connect(gateway.port, source=source, rcvbuf=rcvbuf))
    with trio.fail_after(WAIT):
        await client.login(user, PASSWORD, mechanism="PLAIN", resource=resource)
    return client


async def _open(gateway: LiveGateway, *, source: str = "127.0.0.1") -> RawClient:
    """A client whose stream is open (features received), not authenticated."""
    client = RawClient(await _connect(gateway.port, source=source))
    with trio.fail_after(WAIT):
        await client.open()
    return client


async def _auth(client: RawClient, user: str, password: str) -> Element:
    with trio.fail_after(WAIT):
        return await client.auth(user, password, "PLAIN")


def _sasl_condition(result: Element) -> str:
    """`success`, or the condition of a SASL `<failure/>`."""
    assert result.namespace == ns.SASL, result
    if result.name == "success":
        return "success"
    assert result.name == "failure", result
    return next(c.name for c in result.elements() if c.name != "text")


class Inbox:
    """Everything a logged-in RawClient receives, read in the background (so the client
    never becomes a slow reader itself)."""

    def __init__(self, client: RawClient) -> None:
        self.client = client
        self.elements: list[Element] = []
        self.ended = False
        self._changed = trio.Event()

    async def run(self) -> None:
        try:
            while True:
                self.elements.append(await self.client.receive())
                self._changed.set()
                self._changed = trio.Event()
        except (StreamEnd, trio.BrokenResourceError, trio.ClosedResourceError):
            self.ended = True
            self._changed.set()

    async def wait(self, done: Callable[[], bool], what: str) -> None:
        with trio.move_on_after(WAIT):
            while not done():
                assert not self.ended, f"the stream ended while waiting for {what}"
                await self._changed.wait()
            return
        raise AssertionError(
            f"no {what} within {WAIT} s; received {len(self.messages())} messages, "
            f"{len(self.elements)} elements, the last: {self.elements[-2:]}"
        )

    async def ping(self, ident: str) -> None:
        """A server ping answered: everything the server did before answering it (what the
        client sent earlier was routed) is done."""
        await self.client.send(
            f"<iq type='get' id='{ident}' to='localhost'><ping xmlns='{ns.PING}'/></iq>"
        )
        await self.wait(
            lambda: any(e.name == "iq" and e.get("id") == ident for e in self.elements),
            f"answer to ping {ident}",
        )

    def messages(self, *, error: bool = False) -> list[Element]:
        return [
            e for e in self.elements if e.name == "message" and (e.get("type") == "error") == error
        ]


def _service_unavailable(bounce: Element) -> bool:
    error = bounce.find(ns.CLIENT, "error")
    return error is not None and error.find(ns.STANZAS_ERRORS, "service-unavailable") is not None


# -- 1. memory of stanzas being built ----------------------------------------------------

FLOOD = b"<message>" + b"<a/>" * 65_000  # 260 KB, under the post-auth max_stanza_size


async def test_unauthenticated_floods_of_empty_elements_get_policy_violation_in_bounded_memory(
    tmp_path: Path,
) -> None:
    with _gateway(tmp_path, _config()) as gateway, trio.fail_after(TEST_BOUND):
        results: list[tuple[bytes, str]] = []

        async def attack() -> None:
            stream = await _connect(gateway.port)
            results.append(await _send_and_read(stream, STREAM_HEADER + FLOOD))

        with _memory(gateway, "100 unauthenticated floods of 65,000 <a/>") as rss:
            async with trio.open_nursery() as nursery:
                for _ in range(100):
                    nursery.start_soon(attack)
        ends = sorted({end for _, end in results})
        print(f"[floods] connection ends seen: {ends}")
        assert len(results) == 100
        for data, end in results:
            assert end != "timeout", data[-300:]
            assert _final_stream_error(data) == "policy-violation", (end, data[-300:])
        assert rss["growth"] < 150, rss

        client = await _login(gateway, "alice")
        assert client.jid is not None and client.jid.startswith("alice@localhost/")


# -- 2. the same after login, and stanzas that never end ---------------------------------


async def test_a_stanza_of_65000_empty_children_after_login_is_a_policy_violation(
    tmp_path: Path,
) -> None:
    with _gateway(tmp_path, _config()) as gateway, trio.fail_after(TEST_BOUND):
        client = await _login(gateway, "alice")
        with _memory(gateway, "one 65,000 <a/> stanza after login") as rss:
            data, end = await _send_and_read(client.stream, FLOOD + b"</message>")
        assert end != "timeout", data[-300:]
        assert _final_stream_error(data, client) == "policy-violation", (end, data[-300:])
        assert rss["growth"] < 150, rss


async def test_a_stanza_unfinished_past_stanza_timeout_is_a_policy_violation_before_and_after_login(
    tmp_path: Path,
) -> None:
    config = _config("stanza_timeout: 2")
    with _gateway(tmp_path, config) as gateway, trio.fail_after(TEST_BOUND):
        # Before login: the header, then the start of an <auth that never ends. (WAIT is
        # below negotiation_timeout, so only the stanza timeout can answer.)
        stream = await _connect(gateway.port)
        await stream.send_all(STREAM_HEADER + b"<auth ")
        data, end = await _read_to_end(stream)
        assert end != "timeout", f"still open after {WAIT} s: {data[-300:]!r}"
        assert _final_stream_error(data) == "policy-violation", (end, data[-300:])

        # After login: half a message.
        client = await _login(gateway, "alice")
        await client.send("<message to='bob@localhost' type='chat'><body>hal")
        data, end = await _read_to_end(client.stream)
        assert end != "timeout", f"still open after {WAIT} s: {data[-300:]!r}"
        assert _final_stream_error(data, client) == "policy-violation", (end, data[-300:])


# -- 3. the small limit before authentication, the full one after ------------------------


async def test_a_9000_byte_auth_is_a_policy_violation_but_a_100_kb_message_after_login_is_delivered(
    tmp_path: Path,
) -> None:
    with _gateway(tmp_path, _config()) as gateway, trio.fail_after(TEST_BOUND):
        auth = SASL_AUTH + "A" * (9000 - len(SASL_AUTH) - len("</auth>")) + "</auth>"
        assert len(auth) == 9000
        stream = await _connect(gateway.port)
        data, end = await _send_and_read(stream, STREAM_HEADER + auth.encode())
        assert end != "timeout", data[-300:]
        assert _final_stream_error(data) == "policy-violation", (end, data[-300:])
        assert b"<success" not in data and b"<failure" not in data

        alice = await _login(gateway, "alice", resource="desk")
        bob = await _login(gateway, "bob", resource="phone")
        body = "".join(string.ascii_letters[i % 52] for i in range(100_000))
        await alice.send(
            f"<message to='bob@localhost/phone' id='big' type='chat'><body>{body}</body></message>"
        )
        with trio.fail_after(WAIT):
            message = await bob.receive()
            while message.name != "message":
                message = await bob.receive()
        assert message.get("id") == "big" and message.get("from") == "alice@localhost/desk"
        assert message.find_text(ns.CLIENT, "body") == body


# -- 4. a client that does not read ------------------------------------------------------

PAYLOAD = "<x/>" * 2000  # 8 KB on the wire, 400 KB in memory: within the 2 MiB budget
SLOW_BODY = "b" * 230_000


def _big_message(ident: str) -> str:
    """238 KB to alice: within max_stanza_size, 630 KB in memory, within its 2 MiB."""
    return (
        f"<message to='alice@localhost' id='{ident}' type='chat'><body>{SLOW_BODY}</body>"
        f"<data xmlns='urn:test:hostile'>{PAYLOAD}</data></message>"
    )


async def test_a_client_that_stops_reading_is_closed_with_resource_constraint_and_loses_nothing(
    tmp_path: Path,
) -> None:
    config = _config("send_queue_bytes: 1048576")
    with _gateway(tmp_path, config) as gateway, trio.fail_after(TEST_BOUND):
        # alice: no stream management, a small receive buffer, and from now on no reads.
        alice = await _login(gateway, "alice", resource="slow", rcvbuf=32768)
        await alice.send("<presence/>")
        bob = await _login(gateway, "bob", resource="b")
        bob_inbox = Inbox(bob)
        sent: list[str] = []

        def alice_closed() -> bool:
            return any(
                e.get("reason") == "resource-constraint"
                for e in _events(gateway, "connection_closed")
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(bob_inbox.run)
            with _memory(gateway, "bob floods alice, who does not read") as rss:
                while not alice_closed() and len(sent) < 200:
                    ident = f"m{len(sent)}"
                    await bob.send(_big_message(ident))
                    sent.append(ident)
                    await bob_inbox.ping(f"p{len(sent)}")  # the message has been routed
                await _wait_log(gateway, "alice's connection closed", alice_closed)
            size = len(_big_message("m0"))
            print(f"[slow reader] bob sent {len(sent)} messages of {size} bytes")
            assert alice_closed(), f"alice still connected after {len(sent)} messages"

            # alice reads at last: what reached her socket, then the stream error.
            data, end = await _read_to_end(alice.stream)
            assert end == "eof", (end, data[-300:])
            final = _final_stream_error(data, alice)
            delivered = [
                re.search(rb"id=[\"'](m\d+)[\"']", piece)
                for piece in data.split(b"<message ")[1:]
                if b"</message>" in piece
            ]
            delivered_ids = [m.group(1).decode() for m in delivered if m is not None]

            await bob_inbox.ping("after")
            bounces = bob_inbox.messages(error=True)
            assert all(_service_unavailable(b) for b in bounces), bounces[:1]
            bounced_ids = [str(b.get("id")) for b in bounces]
            nursery.cancel_scope.cancel()

        # alice again: her offline messages.
        alice = await _login(gateway, "alice", resource="again")
        inbox = Inbox(alice)
        expected = len(sent) - len(delivered_ids) - len(bounced_ids)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(inbox.run)
            await alice.send("<presence/>")
            await inbox.wait(
                lambda: len(inbox.messages()) >= expected, f"{expected} offline messages"
            )
            await inbox.ping("flushed")
            nursery.cancel_scope.cancel()
        offline_ids = [str(m.get("id")) for m in inbox.messages()]
        print(
            f"[slow reader] sent {len(sent)}: delivered {len(delivered_ids)}, "
            f"bounced {len(bounced_ids)}, offline {len(offline_ids)}"
        )
        everything = delivered_ids + bounced_ids + offline_ids
        assert sorted(everything) == sorted(sent), (delivered_ids, bounced_ids, offline_ids)
        assert rss["growth"] < 100, rss
        # Last (the other outcomes say more when this fails): alice's stream, as her XMPP
        # parser reads it, is never corrupt. She read nothing until the gateway had closed:
        # a write that cannot finish within the close grace is cut off, and then nothing
        # follows it (a stream error after half a stanza would be unreadable). Had she
        # read in time, the error would follow the finished stanza.
        cut = final == "no end of stream: the bytes stop inside the stream"
        assert final == "resource-constraint" or (cut and b"<stream:error" not in data), (
            final,
            data[-300:],
        )


# -- 5. the offline quota in bytes ---------------------------------------------------------


async def test_offline_storage_past_max_bytes_per_user_bounces_to_the_sender(
    tmp_path: Path,
) -> None:
    config = _config(modules="mod_offline: {max_bytes_per_user: 1048576}")
    with _gateway(tmp_path, config) as gateway, trio.fail_after(TEST_BOUND):
        bob = await _login(gateway, "bob", resource="b")
        bob_inbox = Inbox(bob)
        body = "c" * 100_000
        sent = [f"m{i}" for i in range(30)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bob_inbox.run)
            for ident in sent:
                await bob.send(
                    f"<message to='carol@localhost' id='{ident}' type='chat'>"
                    f"<body>{body}</body></message>"
                )
            await bob_inbox.ping("stored")
            nursery.cancel_scope.cancel()
        bounces = bob_inbox.messages(error=True)
        assert all(_service_unavailable(b) for b in bounces), bounces[:1]
        bounced = [str(b.get("id")) for b in bounces]
        # 1 MiB holds ten stored messages of 100,000-odd bytes, not eleven: the first ten
        # are stored, every later one is refused.
        assert bounced == sent[10:], bounced

        carol = await _login(gateway, "carol")
        inbox = Inbox(carol)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(inbox.run)
            await carol.send("<presence/>")
            await inbox.wait(lambda: len(inbox.messages()) >= 10, "10 offline messages")
            await inbox.ping("flushed")
            nursery.cancel_scope.cancel()
        received = inbox.messages()
        assert [m.get("id") for m in received] == sent[:10]
        assert all(m.find_text(ns.CLIENT, "body") == body for m in received)


# -- 6. WebSocket upgrades without the xmpp subprotocol -----------------------------------


async def test_websocket_upgrades_without_the_xmpp_subprotocol_get_400_and_the_server_closes(
    tmp_path: Path,
) -> None:
    with (
        _gateway(tmp_path, _config(websocket=True), websocket=True) as gateway,
        trio.fail_after(TEST_BOUND),
    ):
        port = gateway.ports["ws"]
        request = (
            f"GET /xmpp-websocket HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        results: list[tuple[bytes, str]] = []

        async def upgrade() -> None:
            stream = await _connect(port)
            await stream.send_all(request)
            # The client never closes: only the server can end the connection.
            results.append(await _read_to_end(stream, timeout=5))
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(upgrade)
        assert len(results) == 50
        for data, end in results:
            assert data.startswith(b"HTTP/1.1 400 "), data[:200]
            assert end == "eof", (end, data[:200])
        await _wait_log(
            gateway,
            "50 websocket_rejected lines",
            lambda: len(_events(gateway, "websocket_rejected")) >= 50,
        )
        assert len(_events(gateway, "websocket_rejected")) == 50


# -- 7. the connection cap -----------------------------------------------------------------


async def test_connections_over_max_connections_are_closed_with_one_log_line(
    tmp_path: Path,
) -> None:
    with _gateway(tmp_path, _config("max_connections: 20")) as gateway, trio.fail_after(TEST_BOUND):
        streams = [await _connect(gateway.port) for _ in range(40)]
        outcomes: list[str] = []

        async def probe(stream: trio.SocketStream) -> None:
            # Served: a stream header and features come back. Refused: closed at once.
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(STREAM_HEADER)
            data = bytearray()
            with trio.move_on_after(WAIT):
                try:
                    while b"</stream:features>" not in data:
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            break
                        data += chunk
                except trio.BrokenResourceError:
                    pass
                outcomes.append("open" if b"</stream:features>" in data else "closed")
                return
            outcomes.append("timeout")

        async with trio.open_nursery() as nursery:
            for stream in streams:
                nursery.start_soon(probe, stream)
        print(
            f"[max_connections 20] 40 connections: {outcomes.count('open')} served, "
            f"{outcomes.count('closed')} closed by the server"
        )
        assert "timeout" not in outcomes, outcomes
        assert outcomes.count("open") <= 20, outcomes
        assert outcomes.count("closed") >= 20, outcomes
        await _wait_log(
            gateway, "connections_refused", lambda: bool(_events(gateway, "connections_refused"))
        )
        refused = _events(gateway, "connections_refused")
        assert len(refused) == 1, refused

        for stream in streams:
            await stream.aclose()

        def all_closed() -> bool:
            opened = len(_events(gateway, "connection_opened"))
            return opened == len(_events(gateway, "connection_closed"))

        await _wait_log(gateway, "every connection closed", all_closed)
        client = await _login(gateway, "alice")
        assert client.jid is not None


# -- 8. password guessing --------------------------------------------------------------------


async def _guess_until_locked_out(
    gateway: LiveGateway, user: str, source: str
) -> tuple[int, Element]:
    """Guess `user`'s password with PLAIN from `source`, on new connections as each one
    closes after max_auth_failures (3), until the gateway refuses; returns the number of
    not-authorized failures before the refusal and the refusal."""
    failures = 0
    for _ in range(20):
        client = await _open(gateway, source=source)
        for _ in range(3):
            result = await _auth(client, user, "wrong guess")
            condition = _sasl_condition(result)
            if condition == "temporary-auth-failure":
                return failures, result
            assert condition == "not-authorized", result
            failures += 1
        with trio.fail_after(WAIT):
            assert await client.expect_stream_error() == "policy-violation"
    raise AssertionError(f"never locked out after {failures} failures")


def _assert_locked_out(result: Element) -> None:
    assert _sasl_condition(result) == "temporary-auth-failure", result
    text = result.find_text(ns.SASL, "text") or ""
    match = re.fullmatch(r"too many failed attempts; try again in (\d+) seconds", text)
    assert match is not None, text
    assert 0 < int(match.group(1)) <= 900, text


async def _try_login(gateway: LiveGateway, user: str, source: str) -> Element:
    client = await _open(gateway, source=source)
    return await _auth(client, user, PASSWORD)


async def test_an_address_guessing_passwords_is_locked_out_while_the_user_logs_in_elsewhere(
    tmp_path: Path,
) -> None:
    lockout = "lockout: {ip_failures: 5, account_failures: 100, window: 600, duration: 900}"
    with _gateway(tmp_path, _config(auth=lockout)) as gateway, trio.fail_after(TEST_BOUND):
        failures, refusal = await _guess_until_locked_out(gateway, "alice", "127.0.0.1")
        assert failures == 5
        _assert_locked_out(refusal)

        assert _sasl_condition(await _try_login(gateway, "alice", "127.0.0.2")) == "success"
        _assert_locked_out(await _try_login(gateway, "alice", "127.0.0.1"))
        # The address rule covers every account.
        _assert_locked_out(await _try_login(gateway, "bob", "127.0.0.1"))
        assert _events(gateway, "auth_locked_out")


async def test_an_account_under_attack_refuses_the_guessing_address_only(
    tmp_path: Path,
) -> None:
    lockout = "lockout: {ip_failures: 0, account_failures: 5, window: 600, duration: 900}"
    with _gateway(tmp_path, _config(auth=lockout)) as gateway, trio.fail_after(TEST_BOUND):
        failures, refusal = await _guess_until_locked_out(gateway, "alice", "127.0.0.1")
        assert failures == 5
        _assert_locked_out(refusal)

        _assert_locked_out(await _try_login(gateway, "alice", "127.0.0.1"))
        assert _sasl_condition(await _try_login(gateway, "bob", "127.0.0.1")) == "success"
        assert _sasl_condition(await _try_login(gateway, "alice", "127.0.0.3")) == "success"
        assert _events(gateway, "auth_locked_out")


# -- 9. huge PLAIN payloads ------------------------------------------------------------------


async def test_huge_plain_passwords_are_refused(tmp_path: Path) -> None:
    # The pre-auth limit raised to 16 KiB, so that a payload over 12288 base64 characters
    # reaches SASL; 190 KB still does not fit.
    config = _config("pre_auth_max_stanza_size: 16384")
    with _gateway(tmp_path, config) as gateway, trio.fail_after(TEST_BOUND):
        payload = base64.b64encode(b"\0alice\0" + b"p" * 190_000)
        stream = await _connect(gateway.port)
        auth = SASL_AUTH.encode() + payload + b"</auth>"
        data, end = await _send_and_read(stream, STREAM_HEADER + auth)
        assert end != "timeout", data[-300:]
        assert _final_stream_error(data) == "policy-violation", (end, data[-300:])
        assert b"<success" not in data

        client = await _open(gateway)
        assert _sasl_condition(await _auth(client, "alice", "p" * 2000)) == "not-authorized"
        # Over 12288 base64 characters (a 10,000-character password): malformed-request.
        assert _sasl_condition(await _auth(client, "alice", "p" * 10_000)) == "malformed-request"
        # The right password on the same stream still works.
        assert _sasl_condition(await _auth(client, "alice", PASSWORD)) == "success"
