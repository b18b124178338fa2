#!/usr/bin/env python3
"""Raw-XMPP load generator for the gateway (DESIGN section 8) and for peers like Prosody.

One trio process opens N client sessions over plain TCP sockets (no XMPP library), each
doing STARTTLS, SASL (SCRAM-SHA-256, else SCRAM-SHA-1, else PLAIN), bind and XEP-0198,
then runs three scenarios:

1. logins: N logins with bounded concurrency -> logins/s, p50/p99 login time, failures.
2. idle memory: server RSS before the logins and with the N sessions idle -> KiB/session
   (needs --server-pid; read from /proc/PID/status VmRSS).
3. messages: P pairs of the logged-in sessions exchange M messages per pair at an offered
   total rate R msgs/s (0: as fast as a per-sender in-flight window allows) -> delivered
   msgs/s, p50/p99 end-to-end latency (send time stamped in the body), lost messages.

Incoming XML is parsed incrementally with expat; SCRAM is gateway.xmpp.sasl.ScramClient
(the repository root is put on sys.path), with its PBKDF2 memoised per salt. Every wait has
a timeout, every loop a bound, and only loopback targets are accepted, so a broken server
yields an error line and the run ends by itself.

Client and server may share cores (they do on a 2-vCPU dev box): with --server-pid each
phase also reports the server's CPU seconds and the count per server CPU-second, the
per-core figure DESIGN section 8 budgets.

Usage: .venv/bin/python scripts/bench.py --help; scripts/prosody_bench.sh runs it on Prosody.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import math
import os
import random
import secrets
import socket
import ssl
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from xml.parsers import expat
from xml.sax.saxutils import quoteattr

import trio

# scripts/ is not a package: make the repository root importable (gateway.xmpp.sasl).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.errors import GatewayError
from gateway.xmpp import sasl

# --- namespaces and expat tag names ("namespace-uri local-name") -----------------------

NS_STREAM: Final = "http://etherx.jabber.org/streams"
NS_CLIENT: Final = "jabber:client"
NS_TLS: Final = "urn:ietf:params:xml:ns:xmpp-tls"
NS_SASL: Final = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND: Final = "urn:ietf:params:xml:ns:xmpp-bind"
NS_SESSION: Final = "urn:ietf:params:xml:ns:xmpp-session"
NS_SM: Final = "urn:xmpp:sm:3"
NS_STANZA_ERRORS: Final = "urn:ietf:params:xml:ns:xmpp-stanzas"

T_STREAM: Final = f"{NS_STREAM} stream"
T_FEATURES: Final = f"{NS_STREAM} features"
T_STREAM_ERROR: Final = f"{NS_STREAM} error"
T_STARTTLS: Final = f"{NS_TLS} starttls"
T_PROCEED: Final = f"{NS_TLS} proceed"
T_MECHANISMS: Final = f"{NS_SASL} mechanisms"
T_CHALLENGE: Final = f"{NS_SASL} challenge"
T_SUCCESS: Final = f"{NS_SASL} success"
T_FAILURE: Final = f"{NS_SASL} failure"
T_BIND: Final = f"{NS_BIND} bind"
T_JID: Final = f"{NS_BIND} jid"
T_SESSION: Final = f"{NS_SESSION} session"
T_OPTIONAL: Final = f"{NS_SESSION} optional"
T_SM: Final = f"{NS_SM} sm"
T_SM_ENABLED: Final = f"{NS_SM} enabled"
T_SM_FAILED: Final = f"{NS_SM} failed"
T_SM_R: Final = f"{NS_SM} r"
T_SM_A: Final = f"{NS_SM} a"
T_MESSAGE: Final = f"{NS_CLIENT} message"
T_PRESENCE: Final = f"{NS_CLIENT} presence"
T_IQ: Final = f"{NS_CLIENT} iq"
T_BODY: Final = f"{NS_CLIENT} body"

SM_REQUEST: Final = b"<r xmlns='urn:xmpp:sm:3'/>"
STREAM_CLOSE: Final = b"</stream:stream>"
RECV_SIZE: Final = 65536
# Most messages one sender puts in one socket write (bounded by its window as well).
MAX_BATCH: Final = 64
# Stand-in for an unknown stream-error / SASL-failure condition.
UNKNOWN: Final = "unknown"


class BenchError(Exception):
    """A protocol or transport failure of one session (becomes a failure count, not a crash)."""


# --- incremental XML --------------------------------------------------------------------


class Node:
    """A parsed element: expat tag ("ns local"), attributes, child elements, text."""

    __slots__ = ("attrs", "children", "tag", "text")

    def __init__(self, tag: str, attrs: dict[str, str]) -> None:
        self.tag = tag
        self.attrs = attrs
        self.children: list[Node] = []
        self.text = ""

    def find(self, tag: str) -> Node | None:
        """Return the first child element with `tag`, or None."""
        for child in self.children:
            if child.tag == tag:
                return child
        return None

    def first_child_name(self) -> str:
        """Local name of the first child element ("" if none): error conditions."""
        if not self.children:
            return ""
        return self.children[0].tag.rpartition(" ")[2]


class StreamParser:
    """Feed bytes of one XML stream; completed top-level stanzas queue up in `events`.

    The `<stream:stream>` start tag is kept in `stream_attrs`; its end sets `closed`.
    DTDs and entity declarations are refused (no entity expansion from the peer).
    """

    def __init__(self) -> None:
        parser = expat.ParserCreate(namespace_separator=" ")
        parser.buffer_text = True
        parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
        parser.StartDoctypeDeclHandler = self._refuse_dtd
        parser.EntityDeclHandler = self._refuse_dtd
        parser.StartElementHandler = self._start
        parser.EndElementHandler = self._end
        parser.CharacterDataHandler = self._text
        self._parser = parser
        self._stack: list[Node] = []
        self.stream_attrs: dict[str, str] | None = None
        self.events: deque[Node] = deque()
        self.closed = False

    def feed(self, data: bytes | bytearray) -> None:
        """Parse `data`; raises BenchError on malformed XML."""
        try:
            self._parser.Parse(data, False)
        except expat.ExpatError as exc:
            raise BenchError(f"malformed XML from server: {exc}") from exc

    def _refuse_dtd(self, *_args: object) -> None:
        raise BenchError("server sent a DTD or entity declaration")

    def _start(self, tag: str, attrs: dict[str, str]) -> None:
        if self.stream_attrs is None:
            if tag != T_STREAM:
                raise BenchError(f"expected <stream:stream>, got {tag!r}")
            self.stream_attrs = attrs
            return
        node = Node(tag, attrs)
        if self._stack:
            self._stack[-1].children.append(node)
        self._stack.append(node)

    def _end(self, _tag: str) -> None:
        if not self._stack:
            self.closed = True
            return
        node = self._stack.pop()
        if not self._stack:
            self.events.append(node)

    def _text(self, data: str) -> None:
        if self._stack:
            self._stack[-1].text += data


# --- SCRAM client: gateway.xmpp.sasl.ScramClient --------------------------------------------

SCRAM_HASHES: Final[dict[str, sasl.HashName]] = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-1": "sha1"}


# One SCRAM key cache per account, as a real client keeps its keys (ScramClient's
# key_cache): a returning client pays HMACs, not PBKDF2, and so does the bench, which stands
# in for N clients on one core and would otherwise measure its own PBKDF2.
KEY_CACHES: Final[dict[str, dict[tuple[str, bytes, int], tuple[bytes, bytes, bytes]]]] = {}


def PBKDF2_RUNS() -> int:
    """How many PBKDF2 derivations the bench's clients have run so far."""
    return sum(len(cache) for cache in KEY_CACHES.values())


# --- statistics helpers -------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of `values` (need not be sorted); NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def read_rss_kib(pid: int) -> int | None:
    """VmRSS of `pid` in KiB from /proc, or None if it cannot be read."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def read_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of `pid` from /proc/PID/stat, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    # After the comm field: state is fields[0], utime fields[11], stime fields[12].
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def fmt_ms(value_ns: float) -> str:
    return "n/a" if math.isnan(value_ns) else f"{value_ns / 1e6:.2f} ms"


def check_loopback(host: str, port: int) -> None:
    """Refuse any target that does not resolve only to loopback addresses."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_loopback:
            raise SystemExit(f"bench: refusing non-loopback target {host} ({address})")


# --- configuration and shared state --------------------------------------------------------


@dataclass(frozen=True)
class Config:
    host: str
    port: int
    domain: str
    prefix: str
    password: str
    clients: int
    pairs: int
    messages: int
    rate: float
    window: int
    ack_every: int
    concurrency: int
    login_timeout: float
    phase_timeout: float
    drain_timeout: float
    idle_seconds: float
    require_tls: bool
    server_pid: int | None
    label: str
    warmup: bool
    no_sm: bool
    ssl_context: ssl.SSLContext

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        """The run's settings from `parse_args`."""
        return cls(
            host=args.host,
            port=args.port,
            domain=args.domain,
            prefix=args.users_prefix,
            password=args.password,
            clients=args.clients,
            pairs=args.pairs,
            messages=args.messages,
            rate=args.rate,
            window=args.window,
            ack_every=args.ack_every,
            concurrency=args.concurrency,
            login_timeout=args.login_timeout,
            phase_timeout=args.timeout,
            drain_timeout=args.drain_timeout,
            idle_seconds=args.idle_seconds,
            require_tls=not args.no_require_tls,
            server_pid=args.server_pid,
            label=args.label,
            warmup=args.warmup,
            no_sm=args.no_sm,
            ssl_context=make_ssl_context(),
        )


@dataclass
class MessageStats:
    planned: int
    sent: int = 0
    unique: int = 0
    duplicates: int = 0
    errors: int = 0
    first_send_ns: int = 0
    last_recv_ns: int = 0
    latencies_ns: list[int] = field(default_factory=list)


def _xml_attr(value: str) -> bytes:
    return quoteattr(value, {'"': "&quot;"}).encode()


# --- one client session ------------------------------------------------------------------


class Session:
    """One client connection: login, then a reader task; optionally a paired sender."""

    def __init__(self, index: int, cfg: Config) -> None:
        self.index = index
        self.cfg = cfg
        self.username = f"{cfg.prefix}{index}"
        self.stream: trio.abc.Stream | None = None
        self.parser = StreamParser()
        self.send_lock = trio.StrictFIFOLock()
        self.jid = ""
        self.mechanism = ""
        self.sm = False
        self.h_in = 0  # stanzas received since <enabled/>
        self.h_out = 0  # stanzas sent since <enabled/>
        self.acks = 0  # <a/> received
        self.acked_h = 0  # the last <a h=''/> value
        self.peer: Session | None = None
        self.window = trio.Semaphore(cfg.window)
        self.seen: bytearray | None = None
        self.stats: MessageStats | None = None
        self.closing = False
        self.reader_error = ""
        self.reader_done = trio.Event()

    # transport --------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        assert self.stream is not None
        async with self.send_lock:
            await self.stream.send_all(data)

    async def next_node(self) -> Node:
        """The next top-level element; raises BenchError on close or stream error."""
        assert self.stream is not None
        while not self.parser.events:
            if self.parser.closed:
                raise BenchError("server closed the stream")
            data = await self.stream.receive_some(RECV_SIZE)
            if not data:
                raise BenchError("server closed the connection")
            self.parser.feed(data)
        node = self.parser.events.popleft()
        if node.tag == T_STREAM_ERROR:
            raise BenchError(f"stream error <{node.first_child_name() or UNKNOWN}/>")
        return node

    async def open_stream(self) -> Node:
        """(Re)start the stream and return the server's <stream:features/>."""
        self.parser = StreamParser()
        await self.send(
            b"<?xml version='1.0'?><stream:stream to="
            + _xml_attr(self.cfg.domain)
            + b" version='1.0' xml:lang='en' xmlns='jabber:client'"
            b" xmlns:stream='http://etherx.jabber.org/streams'>"
        )
        node = await self.next_node()
        if node.tag != T_FEATURES:
            raise BenchError(f"expected <stream:features/>, got {node.tag!r}")
        return node

    # login --------------------------------------------------------------------------

    async def login(self) -> None:
        """Connect, STARTTLS, authenticate, bind, enable SM (no timeout of its own)."""
        cfg = self.cfg
        tcp = await trio.open_tcp_stream(cfg.host, cfg.port)
        self.stream = tcp
        features = await self.open_stream()
        if features.find(T_STARTTLS) is not None:
            await self.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            node = await self.next_node()
            if node.tag != T_PROCEED:
                raise BenchError("STARTTLS refused")
            tls = trio.SSLStream(tcp, cfg.ssl_context, server_hostname=cfg.domain)
            await tls.do_handshake()
            self.stream = tls
            features = await self.open_stream()
        elif cfg.require_tls:
            raise BenchError("server does not offer STARTTLS")
        await self._authenticate(features)
        features = await self.open_stream()
        await self._bind(features)
        if features.find(T_SM) is not None and not cfg.no_sm:
            await self.send(b"<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
            node = await self.next_node()
            if node.tag == T_SM_ENABLED:
                self.sm = True
            elif node.tag != T_SM_FAILED:
                raise BenchError(f"unexpected answer to <enable/>: {node.tag!r}")

    async def _authenticate(self, features: Node) -> None:
        mechanisms_node = features.find(T_MECHANISMS)
        if mechanisms_node is None:
            raise BenchError("no SASL mechanisms offered")
        offered = {child.text.strip() for child in mechanisms_node.children}
        cfg = self.cfg
        for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"):
            if mechanism in offered:
                break
        else:
            raise BenchError(f"no usable SASL mechanism in {sorted(offered)}")
        self.mechanism = mechanism
        if mechanism == "PLAIN":
            initial = f"\0{self.username}\0{cfg.password}".encode()
            await self._send_auth(mechanism, initial)
            node = await self.next_node()
        else:
            client = sasl.ScramClient(
                SCRAM_HASHES[mechanism],
                self.username,
                cfg.password,
                key_cache=KEY_CACHES.setdefault(self.username, {}),
            )
            await self._send_auth(mechanism, client.first())
            node = await self._expect_sasl(T_CHALLENGE)
            final = client.final(base64.b64decode(node.text))
            await self.send(
                b"<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                + base64.b64encode(final)
                + b"</response>"
            )
            node = await self.next_node()
            if node.tag == T_CHALLENGE:  # additional data before an empty <success/>
                client.verify(base64.b64decode(node.text))
                await self.send(b"<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
                node = await self.next_node()
            elif node.tag == T_SUCCESS:
                client.verify(base64.b64decode(node.text))
        if node.tag == T_FAILURE:
            raise BenchError(f"SASL failure <{node.first_child_name() or UNKNOWN}/>")
        if node.tag != T_SUCCESS:
            raise BenchError(f"unexpected SASL answer {node.tag!r}")

    async def _send_auth(self, mechanism: str, initial: bytes) -> None:
        await self.send(
            b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism="
            + _xml_attr(mechanism)
            + b">"
            + base64.b64encode(initial)
            + b"</auth>"
        )

    async def _expect_sasl(self, tag: str) -> Node:
        node = await self.next_node()
        if node.tag == T_FAILURE:
            raise BenchError(f"SASL failure <{node.first_child_name() or UNKNOWN}/>")
        if node.tag != tag:
            raise BenchError(f"expected {tag!r}, got {node.tag!r}")
        return node

    async def _bind(self, features: Node) -> None:
        if features.find(T_BIND) is None:
            raise BenchError("resource binding not offered")
        resource = f"bench-{self.index}-{secrets.token_hex(3)}"
        await self.send(
            b"<iq type='set' id='bind-1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
            b"<resource>" + resource.encode() + b"</resource></bind></iq>"
        )
        node = await self._expect_iq_result("bind-1")
        bind = node.find(T_BIND)
        jid = bind.find(T_JID) if bind is not None else None
        if jid is None or not jid.text.strip():
            raise BenchError("bind result without a JID")
        self.jid = jid.text.strip()
        session = features.find(T_SESSION)
        if session is not None and session.find(T_OPTIONAL) is None:
            await self.send(
                b"<iq type='set' id='sess-1'>"
                b"<session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>"
            )
            await self._expect_iq_result("sess-1")

    async def _expect_iq_result(self, iq_id: str) -> Node:
        node = await self.next_node()
        if node.tag != T_IQ or node.attrs.get("id") != iq_id:
            raise BenchError(f"expected the iq {iq_id!r} answer, got {node.tag!r}")
        if node.attrs.get("type") != "result":
            error = node.find(f"{NS_CLIENT} error")
            condition = error.first_child_name() if error is not None else UNKNOWN
            raise BenchError(f"iq {iq_id!r} failed <{condition}/>")
        return node

    # after login ------------------------------------------------------------------------

    async def run_reader(self) -> None:
        """Consume the stream until it ends: count stanzas, answer <r/>, time messages."""
        assert self.stream is not None
        try:
            while True:
                ack_due = self._drain_events()
                if self.parser.closed:
                    break
                if ack_due and not self.closing:
                    await self.send(b"<a xmlns='urn:xmpp:sm:3' h='%d'/>" % self.h_in)
                data = await self.stream.receive_some(RECV_SIZE)
                if not data:
                    break
                self.parser.feed(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, BenchError, ValueError) as exc:
            # ValueError: a non-numeric h='' or body from a broken server.
            if not self.closing:
                self.reader_error = str(exc) or type(exc).__name__
        finally:
            self.reader_done.set()

    def _drain_events(self) -> bool:
        """Handle the parsed elements; return whether an <a/> answer is due."""
        ack_due = False
        events = self.parser.events
        while events:
            node = events.popleft()
            tag = node.tag
            if tag == T_MESSAGE:
                self.h_in += 1
                self._on_message(node)
            elif tag == T_SM_R:
                ack_due = True
            elif tag == T_SM_A:
                self.acks += 1
                self.acked_h = int(node.attrs.get("h", "0"))
            elif tag in (T_IQ, T_PRESENCE):
                self.h_in += 1
            elif tag == T_STREAM_ERROR and not self.closing:
                self.reader_error = f"stream error <{node.first_child_name() or UNKNOWN}/>"
        return ack_due

    def _on_message(self, node: Node) -> None:
        stats = self.stats
        if stats is None:
            return
        if node.attrs.get("type") == "error":
            # A bounce of one of our own messages: free its window slot.
            stats.errors += 1
            self.window.release()
            return
        body = node.find(T_BODY)
        peer = self.peer
        if body is None or peer is None or self.seen is None:
            return
        parts = body.text.split()
        if len(parts) != 2:
            return
        now = time.perf_counter_ns()
        seq, sent_ns = int(parts[0]), int(parts[1])
        if not 0 <= seq < len(self.seen):
            return
        if self.seen[seq]:
            stats.duplicates += 1
            return
        self.seen[seq] = 1
        stats.unique += 1
        stats.last_recv_ns = now
        stats.latencies_ns.append(now - sent_ns)
        peer.window.release()

    async def run_sender(self, count: int, duration: float, t0: float) -> None:
        """Send `count` messages to the peer: spread over `duration` s, or ASAP when 0."""
        try:
            await self._send_messages(count, duration, t0)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.reader_error = (
                self.reader_error or f"send failed: {str(exc) or type(exc).__name__}"
            )

    async def _send_messages(self, count: int, duration: float, t0: float) -> None:
        assert self.peer is not None
        assert self.stats is not None
        stats = self.stats
        head = b"<message type='chat' to=" + _xml_attr(self.peer.jid) + b"><body>"
        step = duration / count if count else 0.0
        phase = random.random()
        ack_every = self.cfg.ack_every if self.sm else 0
        seq = 0
        while seq < count:
            due = count - seq
            if step > 0:
                await trio.sleep_until(t0 + (seq + phase) * step)
                elapsed = trio.current_time() - t0
                due = max(1, min(count, int(elapsed / step - phase) + 1) - seq)
            await self.window.acquire()
            batch = 1
            while batch < min(due, MAX_BATCH):
                try:
                    self.window.acquire_nowait()
                except trio.WouldBlock:
                    break
                batch += 1
            stamp = time.perf_counter_ns()
            if not stats.first_send_ns:
                stats.first_send_ns = stamp
            parts: list[bytes] = []
            for offset in range(batch):
                parts.append(head + b"%d %d</body></message>" % (seq + offset, stamp))
                self.h_out += 1
                if ack_every and self.h_out % ack_every == 0:
                    parts.append(SM_REQUEST)
            stats.sent += batch
            seq += batch
            await self.send(b"".join(parts))

    async def close(self) -> None:
        """Close the stream politely, then the socket (bounded by the caller's timeout)."""
        self.closing = True
        stream = self.stream
        if stream is None:
            return
        try:
            with trio.move_on_after(2):
                await self.send(STREAM_CLOSE)
                await self.reader_done.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        with trio.move_on_after(1):
            await stream.aclose()


# --- scenarios -----------------------------------------------------------------------------


class Reporter:
    """Human lines to stdout (stderr with --json) and the figures for the JSON object."""

    def __init__(self, as_json: bool, *, quiet: bool = False) -> None:
        self.as_json = as_json
        self.quiet = quiet
        self.figures: dict[str, object] = {}

    def line(self, text: str) -> None:
        if self.quiet:
            return
        print(text, file=sys.stderr if self.as_json else sys.stdout, flush=True)


@dataclass
class LoginResult:
    sessions: list[Session]
    failures: dict[str, int]


async def scenario_logins(cfg: Config, nursery: trio.Nursery, report: Reporter) -> LoginResult:
    limiter = trio.CapacityLimiter(cfg.concurrency)
    times_ns: list[int] = []
    sessions: list[Session] = []
    failures: dict[str, int] = {}
    mechanisms: set[str] = set()
    sm_on = 0

    async def one(index: int) -> None:
        nonlocal sm_on
        async with limiter:
            session = Session(index, cfg)
            start = time.perf_counter_ns()
            try:
                with trio.fail_after(cfg.login_timeout):
                    await session.login()
            except (
                BenchError,
                GatewayError,
                OSError,
                ValueError,
                trio.BrokenResourceError,
                trio.TooSlowError,
            ) as exc:
                reason = "timeout" if isinstance(exc, trio.TooSlowError) else str(exc)
                reason = reason or type(exc).__name__
                failures[reason] = failures.get(reason, 0) + 1
                if session.stream is not None:
                    with trio.move_on_after(1):
                        await session.stream.aclose()
                return
            times_ns.append(time.perf_counter_ns() - start)
            mechanisms.add(session.mechanism)
            sm_on += session.sm
            sessions.append(session)
            nursery.start_soon(session.run_reader)

    cpu0 = time.process_time()
    server_cpu0 = read_cpu_seconds(cfg.server_pid) if cfg.server_pid else None
    start = time.perf_counter()
    async with trio.open_nursery() as logins:
        for index in range(cfg.clients):
            logins.start_soon(one, index)
    wall = time.perf_counter() - start
    client_cpu = time.process_time() - cpu0
    server_cpu = _server_cpu_since(cfg, server_cpu0)
    sessions.sort(key=lambda s: s.index)
    ok = len(sessions)
    rate = ok / wall if wall > 0 else 0.0
    p50, p99 = percentile(times_ns, 50), percentile(times_ns, 99)
    report.figures["logins"] = {
        "attempted": cfg.clients,
        "ok": ok,
        "failed": cfg.clients - ok,
        "failures": failures,
        "concurrency": cfg.concurrency,
        "seconds": round(wall, 3),
        "logins_per_s": round(rate, 1),
        "p50_ms": _ms(p50),
        "p99_ms": _ms(p99),
        "mechanisms": sorted(mechanisms),
        "sm_enabled": sm_on,
        "client_cpu_s": round(client_cpu, 2),
        "client_pbkdf2_runs": PBKDF2_RUNS(),
        "server_cpu_s": server_cpu,
        "logins_per_server_cpu_s": _per_cpu(ok, server_cpu),
    }
    report.line(
        f"logins: {ok}/{cfg.clients} ok in {wall:.2f} s -> {rate:.0f} logins/s; "
        f"login time p50 {fmt_ms(p50)}, p99 {fmt_ms(p99)}; failures {cfg.clients - ok} "
        f"(concurrency {cfg.concurrency}, {'/'.join(sorted(mechanisms)) or '-'}, "
        f"SM on {sm_on}; client CPU {client_cpu:.2f} s, "
        f"server CPU {_fmt_s(server_cpu)}{_fmt_per_cpu(ok, server_cpu, 'logins')})"
    )
    for reason, count in sorted(failures.items(), key=lambda kv: -kv[1])[:5]:
        report.line(f"  login failure x{count}: {reason}")
    return LoginResult(sessions, failures)


def _server_cpu_since(cfg: Config, before: float | None) -> float | None:
    if cfg.server_pid is None or before is None:
        return None
    after = read_cpu_seconds(cfg.server_pid)
    return None if after is None else round(after - before, 2)


def _per_cpu(count: int, cpu_s: float | None) -> float | None:
    """`count` per second of server CPU: the per-core figure when client and server share."""
    return round(count / cpu_s, 1) if cpu_s else None


def _fmt_per_cpu(count: int, cpu_s: float | None, unit: str) -> str:
    per_cpu = _per_cpu(count, cpu_s)
    return "" if per_cpu is None else f" = {per_cpu:.0f} {unit} per server CPU-s"


def _fmt_s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def _ms(value_ns: float) -> float | None:
    return None if math.isnan(value_ns) else round(value_ns / 1e6, 3)


async def scenario_idle_memory(
    cfg: Config, report: Reporter, rss_before: int | None, sessions: int
) -> None:
    if cfg.server_pid is None:
        report.figures["idle_memory"] = {"skipped": "no --server-pid"}
        report.line("idle memory: skipped (no --server-pid given)")
        return
    if rss_before is None:
        report.figures["idle_memory"] = {"skipped": f"cannot read /proc/{cfg.server_pid}"}
        report.line(f"idle memory: skipped (cannot read /proc/{cfg.server_pid}/status)")
        return
    await trio.sleep(cfg.idle_seconds)
    rss_after = read_rss_kib(cfg.server_pid)
    if rss_after is None or sessions == 0:
        reason = "server process gone" if rss_after is None else "no session logged in"
        report.figures["idle_memory"] = {"skipped": reason}
        report.line(f"idle memory: skipped ({reason})")
        return
    per_session = (rss_after - rss_before) / sessions
    report.figures["idle_memory"] = {
        "sessions": sessions,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "kib_per_session": round(per_session, 2),
        "settle_s": cfg.idle_seconds,
    }
    report.line(
        f"idle memory: server RSS {rss_before} KiB before, {rss_after} KiB with {sessions} "
        f"idle sessions -> {per_session:.1f} KiB/session"
    )


async def scenario_messages(cfg: Config, report: Reporter, sessions: list[Session]) -> int:
    """Run the paired-chat scenario; return the number of messages lost."""
    live = [s for s in sessions if not s.reader_done.is_set()]
    pairs = min(cfg.pairs, len(live) // 2)
    if pairs == 0 or cfg.messages == 0:
        reason = (
            "no pairs requested"
            if cfg.pairs == 0 or cfg.messages == 0
            else (f"only {len(live)} live sessions")
        )
        report.figures["messages"] = {"skipped": reason}
        report.line(f"messages: skipped ({reason})")
        return 0
    total = pairs * cfg.messages
    stats = MessageStats(planned=total)
    senders: list[tuple[Session, int]] = []
    for pair in range(pairs):
        a, b = live[2 * pair], live[2 * pair + 1]
        a.peer, b.peer = b, a
        a_count = (cfg.messages + 1) // 2
        b_count = cfg.messages - a_count
        # Each side remembers which of its peer's sequence numbers it has seen.
        a.seen, b.seen = bytearray(b_count), bytearray(a_count)
        a.stats = b.stats = stats
        senders += [(a, a_count), (b, b_count)]
    duration = total / cfg.rate if cfg.rate > 0 else 0.0

    cpu0 = time.process_time()
    server_cpu0 = read_cpu_seconds(cfg.server_pid) if cfg.server_pid else None
    timed_out = False
    with trio.move_on_after(cfg.phase_timeout + duration) as phase:
        t0 = trio.current_time() + 0.05
        async with trio.open_nursery() as nursery:
            for session, count in senders:
                if count:
                    nursery.start_soon(session.run_sender, count, duration, t0)
    timed_out = phase.cancelled_caught
    await poll_until(lambda: stats.unique + stats.errors >= stats.sent, cfg.drain_timeout)
    # Give the last <a/> answers to our <r/> a moment (they follow the deliveries).
    if cfg.ack_every:
        await poll_until(
            lambda: all(s.acked_h >= s.h_out for s, _ in senders if s.sm),
            min(1.0, cfg.drain_timeout),
        )
    client_cpu = time.process_time() - cpu0
    server_cpu = _server_cpu_since(cfg, server_cpu0)

    lost = stats.sent - stats.unique - stats.errors
    span_ns = stats.last_recv_ns - stats.first_send_ns if stats.unique else 0
    rate = stats.unique / (span_ns / 1e9) if span_ns > 0 else 0.0
    p50 = percentile(stats.latencies_ns, 50)
    p99 = percentile(stats.latencies_ns, 99)
    acks = sum(s.acks for s, _ in senders)
    unacked = sum(max(0, s.h_out - s.acked_h) for s, _ in senders if s.sm)
    reader_errors = sorted({s.reader_error for s, _ in senders if s.reader_error})
    offered = f"{cfg.rate:.0f} msgs/s offered" if cfg.rate > 0 else "max rate"
    report.figures["messages"] = {
        "pairs": pairs,
        "messages_per_pair": cfg.messages,
        "planned": total,
        "sent": stats.sent,
        "delivered": stats.unique,
        "lost": lost,
        "errors": stats.errors,
        "duplicates": stats.duplicates,
        "seconds": round(span_ns / 1e9, 3),
        "offered_rate": cfg.rate,
        "window": cfg.window,
        "msgs_per_s": round(rate, 1),
        "p50_ms": _ms(p50),
        "p99_ms": _ms(p99),
        "sm_acks_received": acks,
        "sm_unacked": unacked,
        "timed_out": timed_out,
        "reader_errors": reader_errors,
        "client_cpu_s": round(client_cpu, 2),
        "server_cpu_s": server_cpu,
        "msgs_per_server_cpu_s": _per_cpu(stats.unique, server_cpu),
    }
    report.line(
        f"messages: {pairs} pairs x {cfg.messages} = {total} planned, {stats.sent} sent, "
        f"{stats.unique} delivered in {span_ns / 1e9:.2f} s -> {rate:.0f} msgs/s "
        f"({offered}, window {cfg.window}); latency p50 {fmt_ms(p50)}, p99 {fmt_ms(p99)}; "
        f"lost {lost}, errors {stats.errors}, duplicates {stats.duplicates}; "
        f"SM <a/> received {acks}, unacked {unacked}; client CPU {client_cpu:.2f} s, "
        f"server CPU {_fmt_s(server_cpu)}{_fmt_per_cpu(stats.unique, server_cpu, 'msgs')}"
    )
    if timed_out:
        report.line(f"  messages: senders stopped by the {cfg.phase_timeout:.0f} s timeout")
    for error in reader_errors[:5]:
        report.line(f"  messages: session error: {error}")
    return lost


async def poll_until(predicate: Callable[[], bool], limit_s: float) -> bool:
    """Wait until `predicate()` holds, at most `limit_s` s; return whether it held."""
    with trio.move_on_after(limit_s):
        # A 5 ms poll of a counter is simpler than wiring an Event into every receive path,
        # and it runs once per phase, not per stanza.
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.005)
        return True
    return False


async def close_all(sessions: list[Session]) -> None:
    limiter = trio.CapacityLimiter(200)

    async def one(session: Session) -> None:
        async with limiter:
            await session.close()

    with trio.move_on_after(15):
        async with trio.open_nursery() as nursery:
            for session in sessions:
                nursery.start_soon(one, session)


async def run(cfg: Config, report: Reporter) -> int:
    """All scenarios in order; returns the exit status."""
    report.figures.update(
        label=cfg.label,
        target=f"{cfg.host}:{cfg.port}",
        domain=cfg.domain,
        clients=cfg.clients,
        pairs=cfg.pairs,
        messages=cfg.messages,
        rate=cfg.rate,
        server_pid=cfg.server_pid,
    )
    report.line(
        f"bench {cfg.label}: {cfg.host}:{cfg.port} domain {cfg.domain}, {cfg.clients} clients, "
        f"{cfg.pairs} pairs x {cfg.messages} messages, rate {cfg.rate or 'max'}"
    )
    rss_before = read_rss_kib(cfg.server_pid) if cfg.server_pid else None
    status = 0
    if cfg.warmup:
        # Returning clients: log everyone in once (filling the key caches), then measure.
        async with trio.open_nursery() as warm:
            warmed = await scenario_logins(cfg, warm, Reporter(as_json=True, quiet=True))
            await close_all(warmed.sessions)
            warm.cancel_scope.cancel()
        report.line(f"warm-up: {len(warmed.sessions)} clients logged in once and out again")
    async with trio.open_nursery() as readers:
        result = await scenario_logins(cfg, readers, report)
        if result.failures:
            status = 1
        await scenario_idle_memory(cfg, report, rss_before, len(result.sessions))
        if await scenario_messages(cfg, report, result.sessions):
            status = 1
        await close_all(result.sessions)
        readers.cancel_scope.cancel()
    return status


# --- command line ------------------------------------------------------------------------

EPILOG: Final = """\
scenarios (in this order, on the same sessions):
  logins       N clients log in, at most --concurrency at once: logins/s over the
               phase's wall time, p50/p99 of connect -> SM enabled, failures by reason.
  idle memory  server VmRSS (/proc/PID/status) before any login and after the N
               sessions sat idle --idle-seconds: KiB per idle session. Needs --server-pid.
  messages     P pairs of logged-in sessions chat to each other's full JID: each pair
               carries M messages (ceil(M/2) one way, floor(M/2) back), P*M in all,
               offered at R msgs/s in total (0: as fast as the --window of messages in
               flight per sender allows). delivered msgs/s = delivered / (last receive -
               first send); latency is receive time - send time stamped in the body.
               With SM, a <r/> follows every --ack-every messages; every <r/> from the
               server is answered with <a h=.../>.

The server's CPU seconds per phase (/proc/PID/stat) are shown with --server-pid; the
bench's own CPU seconds are shown too: if they approach the phase's wall time, the bench,
not the server, is the bottleneck.

exit status: 0 all logins succeeded and nothing was lost; 1 otherwise; 2 bad usage.
example:
  .venv/bin/python scripts/bench.py --port 5222 --clients 1000 --pairs 100 --messages 200
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench.py",
        description="Raw-XMPP load generator: logins/s, KiB per idle session, msgs/s and "
        "latency against a c2s server on a loopback address.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="server address, loopback only (127.0.0.1)")
    add("--port", type=int, default=5222, help="c2s port (5222)")
    add("--domain", default="localhost", help="XMPP domain of the accounts (localhost)")
    add("--users-prefix", default="bench", help="accounts are PREFIX0..PREFIX{N-1}@DOMAIN")
    add("--password", default="secret", help="password of every account (secret)")
    add("--clients", "-n", type=int, default=100, help="sessions to log in, N (100)")
    add("--pairs", "-p", type=int, default=10, help="chatting pairs, P <= N/2 (10)")
    add("--messages", "-m", type=int, default=100, help="messages per pair, M (100)")
    add("--rate", "-r", type=float, default=0.0, help="offered total msgs/s, 0 = max (0)")
    add("--window", type=int, default=16, help="max messages in flight per sender (16)")
    add("--ack-every", type=int, default=1, help="send <r/> after every K messages, 0 = never")
    add("--concurrency", type=int, default=50, help="logins in progress at once (50)")
    add("--login-timeout", type=float, default=15.0, help="seconds per login (15)")
    add("--timeout", type=float, default=120.0, help="seconds for the senders (120, +M*P/R)")
    add("--drain-timeout", type=float, default=10.0, help="seconds to await stragglers (10)")
    add("--idle-seconds", type=float, default=2.0, help="idle settle time before RSS (2)")
    add("--no-require-tls", action="store_true", help="accept a server without STARTTLS")
    add("--server-pid", type=int, default=None, help="server PID for RSS and CPU figures")
    add("--label", default="server", help="name of the server in the output")
    add(
        "--no-sm",
        action="store_true",
        help="do not enable XEP-0198 even when offered (compare servers without SM)",
    )
    add(
        "--warmup",
        action="store_true",
        help="log every client in once before measuring (returning clients with cached keys)",
    )
    add("--json", action="store_true", help="print one JSON object on stdout (lines on stderr)")
    args = parser.parse_args(argv)
    for name in ("clients", "concurrency", "window"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    for name in ("pairs", "messages", "rate", "ack_every"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    return args


def make_ssl_context() -> ssl.SSLContext:
    """A client context that accepts the self-signed dev certificates (loopback only)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_loopback(args.host, args.port)
    cfg = Config.from_args(args)
    report = Reporter(args.json)
    started = time.perf_counter()
    status = trio.run(run, cfg, report)
    report.figures["total_seconds"] = round(time.perf_counter() - started, 2)
    report.figures["exit_status"] = status
    if args.json:
        print(json.dumps(report.figures, sort_keys=True))
    return status


if __name__ == "__main__":
    sys.exit(main())
