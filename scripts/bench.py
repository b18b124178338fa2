#!/usr/bin/env python3
"""Raw-XMPP load generator for the gateway (DESIGN section 8) and for peers like Prosody.

One trio process opens N client sessions over plain TCP sockets (no XMPP library), each
doing STARTTLS, SASL (SCRAM-SHA-256, else SCRAM-SHA-1, else PLAIN), bind and XEP-0198,
then runs up to four scenarios:

1. logins: N logins with bounded concurrency -> logins/s, p50/p99 login time, failures.
2. idle memory: server RSS before the logins and with the N sessions idle -> KiB/session
   (needs --server-pid; read from /proc/PID/status VmRSS).
3. messages: P pairs of the logged-in sessions exchange M messages per pair at an offered
   total rate R msgs/s (0: as fast as a per-sender in-flight window allows) -> delivered
   msgs/s, p50/p99 end-to-end latency (send time stamped in the body), lost messages;
   with SM, the <a/> received and the stanzas still unacknowledged at the end.
4. resumption (--resume K): K sessions with resumable SM receive numbered messages (some
   acked, some handled but not acked, some received but never handled), lose their
   transports abruptly, receive more while parked, then all K reconnect at once and send
   <resume previd h/> -> p50/p99/max of <resume/> -> <resumed/>, failures, and whether
   every message was handled exactly once across the old and the new stream.

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
import contextlib
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
T_SM_RESUMED: Final = f"{NS_SM} resumed"
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
# XEP-0198 counters wrap at 2**32 (section 4).
H_MOD: Final = 2**32
# Body prefix of the resumption scenario's messages ("R <seq> <stamp>").
RESUME_TAG: Final = "R"


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


def read_rss_kib(pid: int, extra: tuple[int, ...] = ()) -> int | None:
    """VmRSS of `pid` (plus the `extra` processes) in KiB from /proc, or None if one
    cannot be read."""
    if extra:
        parts = [read_rss_kib(p) for p in (pid, *extra)]
        return None if None in parts else sum(p for p in parts if p is not None)
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def read_cpu_seconds(pid: int, extra: tuple[int, ...] = ()) -> float | None:
    """User + system CPU seconds of `pid` (plus the `extra` processes) from
    /proc/PID/stat, or None if one cannot be read."""
    if extra:
        parts = [read_cpu_seconds(p) for p in (pid, *extra)]
        return None if None in parts else sum(p for p in parts if p is not None)
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
    resume: int
    resume_messages: int
    resume_parked: int
    resume_concurrency: int
    ssl_context: ssl.SSLContext
    # More processes whose CPU and memory count as the server's (the workers of a
    # cluster, its Redis).
    extra_pids: tuple[int, ...] = ()

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
            extra_pids=tuple(args.extra_pid or ()),
            label=args.label,
            warmup=args.warmup,
            no_sm=args.no_sm,
            resume=args.resume,
            resume_messages=args.resume_messages,
            resume_parked=args.resume_parked,
            resume_concurrency=args.resume_concurrency,
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


def resume_groups(messages: int) -> tuple[int, int, int]:
    """Split the M_r messages sent before the cut: (acked, handled not acked, unhandled).

    The first group is handled and acknowledged with <a h/>, the second handled while <r/>
    goes unanswered (only the <resume h/> tells the server), the third received but not
    handled (h excludes it: the server must resend it on the new stream).
    """
    third = messages // 3
    return messages - 2 * third, third, third


@dataclass
class ResumeTrack:
    """One resuming session's view of its partner's numbered messages ("R seq stamp").

    Sequence numbers below `before` are sent while the session is connected, the others
    while it is parked. `old` and `new` count how often each was *handled* on the stream
    before the cut and on the resumed one. While `drop` is set, stanzas arrive but are not
    handled: a client that read the bytes and died before processing them leaves them out
    of its h, so the server must resend them after <resume/>.
    """

    before: int
    old: bytearray
    new: bytearray
    resumed: bool = False
    drop: bool = False
    dropped: int = 0
    foreign: int = 0  # messages of no scenario seq (bounces, unparsable bodies)

    @classmethod
    def create(cls, before: int, parked: int) -> ResumeTrack:
        return cls(before, bytearray(before + parked), bytearray(before + parked))

    @property
    def total(self) -> int:
        return len(self.old)

    def handled_old(self) -> int:
        """Distinct sequence numbers handled on the old stream."""
        return self.total - self.old.count(0)

    def on_message(self, node: Node) -> None:
        """Record a handled message (the caller has counted it in h)."""
        body = node.find(T_BODY)
        parts = body.text.split() if body is not None else []
        if node.attrs.get("type") == "error" or len(parts) != 3 or parts[0] != RESUME_TAG:
            self.foreign += 1
            return
        seq = int(parts[1])
        if not 0 <= seq < self.total:
            self.foreign += 1
            return
        counts = self.new if self.resumed else self.old
        counts[seq] = min(255, counts[seq] + 1)

    def complete(self) -> bool:
        """Every sequence number handled at least once."""
        return all(a or b for a, b in zip(self.old, self.new, strict=True))

    def tally(self) -> dict[str, int]:
        """Exactly-once check across both streams."""
        lost = duplicates = resent_handled = resent = parked = 0
        for seq, (old, new) in enumerate(zip(self.old, self.new, strict=True)):
            if old + new == 0:
                lost += 1
            duplicates += max(0, old + new - 1)
            if old and new:
                resent_handled += 1  # handled before the cut (in h), sent again anyway
            if new and seq < self.before:
                resent += 1
            if new and seq >= self.before:
                parked += 1
        return {
            "lost": lost,
            "duplicates": duplicates,
            "resent_after_handled": resent_handled,
            "resent": resent,
            "parked_delivered": parked,
        }


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
        self.r_sent_h = 0  # h_out when we last sent <r/>
        self.r_answered = 0  # the server's <r/> we answered
        self.sm_id = ""  # <enabled id=''/> when resumable
        self.sm_max = ""  # <enabled max=''/>
        self.mute_acks = False  # leave the server's <r/> unanswered
        self.track: ResumeTrack | None = None
        self.bounces = 0  # <message type='error'/> received
        self.tcp: trio.SocketStream | None = None
        self.reader_scope = trio.CancelScope()
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
        features = await self._connect_authenticated()
        await self._bind(features)
        if features.find(T_SM) is not None and not self.cfg.no_sm:
            await self.send(b"<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
            node = await self.next_node()
            if node.tag == T_SM_ENABLED:
                self.sm = True
                if node.attrs.get("resume") in ("true", "1"):
                    self.sm_id = node.attrs.get("id", "")
                    self.sm_max = node.attrs.get("max", "")
            elif node.tag != T_SM_FAILED:
                raise BenchError(f"unexpected answer to <enable/>: {node.tag!r}")

    async def resume(self) -> tuple[int, int]:
        """Reconnect and resume the SM session.

        Returns ns from sending <resume/> to receiving <resumed/>, and the server's h in
        <resumed/> (-1 when missing). The resent stanzas that follow <resumed/> stay queued
        in the parser for the reader.
        """
        features = await self._connect_authenticated()
        if features.find(T_SM) is None:
            raise BenchError("no <sm/> offered after SASL")
        h = self.h_in % H_MOD
        request = (
            b"<resume xmlns='urn:xmpp:sm:3' previd=" + _xml_attr(self.sm_id) + b" h='%d'/>" % h
        )
        start = time.perf_counter_ns()
        await self.send(request)
        node = await self.next_node()
        elapsed = time.perf_counter_ns() - start
        if node.tag == T_SM_FAILED:
            raise BenchError(f"<failed><{node.first_child_name() or UNKNOWN}/></failed>")
        if node.tag != T_SM_RESUMED:
            raise BenchError(f"unexpected answer to <resume/>: {node.tag!r}")
        return elapsed, int(node.attrs.get("h", "-1"))

    async def cut(self) -> None:
        """Lose the transport abruptly: stop reading, close the TCP socket (no TLS
        close_notify, no </stream:stream>), as when a phone drops off the network."""
        self.closing = True
        self.reader_scope.cancel()
        await self.reader_done.wait()
        if self.tcp is not None:
            await self.tcp.aclose()
        self.stream = None

    async def _connect_authenticated(self) -> Node:
        """Connect, STARTTLS, SASL; return the features of the restarted stream."""
        cfg = self.cfg
        self.closing = False
        tcp = await trio.open_tcp_stream(cfg.host, cfg.port)
        self.stream = self.tcp = tcp
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
        return await self.open_stream()

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
        """Consume the stream until it ends: count stanzas, answer <r/>, time messages.

        `cut()` cancels it through `reader_scope`; each stream gets a fresh scope/event.
        """
        stream = self.stream
        assert stream is not None
        try:
            with self.reader_scope:
                while True:
                    ack_due = self._drain_events()
                    if self.parser.closed:
                        break
                    if ack_due and not self.closing and not self.mute_acks:
                        self.r_answered += 1
                        await self.send_ack()
                    data = await stream.receive_some(RECV_SIZE)
                    if not data:
                        break
                    self.parser.feed(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, BenchError, ValueError) as exc:
            # ValueError: a non-numeric h='' or body from a broken server.
            if not self.closing:
                self.reader_error = str(exc) or type(exc).__name__
        finally:
            self.reader_done.set()

    def start_reader(self, nursery: trio.Nursery) -> None:
        """Run a reader for the current stream in `nursery`."""
        self.reader_scope = trio.CancelScope()
        self.reader_done = trio.Event()
        self.reader_error = ""
        nursery.start_soon(self.run_reader)

    async def send_ack(self) -> None:
        await self.send(b"<a xmlns='urn:xmpp:sm:3' h='%d'/>" % (self.h_in % H_MOD))

    async def send_numbered(self, to: str, seqs: range) -> None:
        """Send the resumption scenario's messages `seqs` to `to`, then one <r/> with SM."""
        head = b"<message type='chat' to=" + _xml_attr(to) + b"><body>R "
        stamp = time.perf_counter_ns()
        parts = [head + b"%d %d</body></message>" % (seq, stamp) for seq in seqs]
        self.h_out += len(parts)
        if self.sm:
            parts.append(SM_REQUEST)
            self.r_sent_h = self.h_out
        await self.send(b"".join(parts))

    def _drain_events(self) -> bool:
        """Handle the parsed elements; return whether an <a/> answer is due."""
        ack_due = False
        events = self.parser.events
        while events:
            node = events.popleft()
            tag = node.tag
            track = self.track
            if track is not None and track.drop:
                # Received but never handled: not in h, no <a/> (the client "crashed").
                track.dropped += tag in (T_MESSAGE, T_IQ, T_PRESENCE)
                continue
            if tag == T_MESSAGE:
                self.h_in += 1
                if track is not None:
                    track.on_message(node)
                else:
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
            self.bounces += node.attrs.get("type") == "error"
            return
        if node.attrs.get("type") == "error":
            self.bounces += 1
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
                    self.r_sent_h = self.h_out
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
            session.start_reader(nursery)

    cpu0 = time.process_time()
    server_cpu0 = read_cpu_seconds(cfg.server_pid, cfg.extra_pids) if cfg.server_pid else None
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
    after = read_cpu_seconds(cfg.server_pid, cfg.extra_pids)
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
    rss_after = read_rss_kib(cfg.server_pid, cfg.extra_pids)
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
    server_cpu0 = read_cpu_seconds(cfg.server_pid, cfg.extra_pids) if cfg.server_pid else None
    timed_out = False
    with trio.move_on_after(cfg.phase_timeout + duration) as phase:
        t0 = trio.current_time() + 0.05
        async with trio.open_nursery() as nursery:
            for session, count in senders:
                if count:
                    nursery.start_soon(session.run_sender, count, duration, t0)
    timed_out = phase.cancelled_caught
    await poll_until(lambda: stats.unique + stats.errors >= stats.sent, cfg.drain_timeout)
    sm_senders = [s for s, _ in senders if s.sm]
    if cfg.ack_every:
        # A sender whose count is not a multiple of --ack-every never asked about its last
        # messages: ask once now, so "unacked" means unacknowledged, not unasked.
        async with trio.open_nursery() as requests:
            for s in sm_senders:
                if s.r_sent_h != s.h_out and not s.reader_done.is_set():
                    s.r_sent_h = s.h_out
                    requests.start_soon(_send_quietly, s, SM_REQUEST)
        # Give the last <a/> answers to our <r/> a moment (they follow the deliveries).
        await poll_until(
            lambda: all(_h_behind(s.h_out, s.acked_h) == 0 for s in sm_senders),
            min(2.0, cfg.drain_timeout),
        )
    client_cpu = time.process_time() - cpu0
    server_cpu = _server_cpu_since(cfg, server_cpu0)

    lost = stats.sent - stats.unique - stats.errors
    span_ns = stats.last_recv_ns - stats.first_send_ns if stats.unique else 0
    rate = stats.unique / (span_ns / 1e9) if span_ns > 0 else 0.0
    p50 = percentile(stats.latencies_ns, 50)
    p99 = percentile(stats.latencies_ns, 99)
    sm_figures = _sm_figures(cfg, sm_senders)
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
        **sm_figures,
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
        f"{_fmt_sm(sm_figures, len(senders))}; client CPU {client_cpu:.2f} s, "
        f"server CPU {_fmt_s(server_cpu)}{_fmt_per_cpu(stats.unique, server_cpu, 'msgs')}"
    )
    if timed_out:
        report.line(f"  messages: senders stopped by the {cfg.phase_timeout:.0f} s timeout")
    for error in reader_errors[:5]:
        report.line(f"  messages: session error: {error}")
    return lost


def _h_behind(sent: int, acked: int) -> int:
    """Stanzas sent but not yet acknowledged, with XEP-0198's 2**32 wrap-around."""
    return (sent - acked) % H_MOD


async def _send_quietly(session: Session, data: bytes) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await session.send(data)


def _sm_figures(cfg: Config, sm_senders: list[Session]) -> dict[str, object]:
    """Stream-management figures of the senders that enabled SM (None when none did)."""
    if not sm_senders:
        return {
            "sm_senders": 0,
            "sm_acks_received": None,
            "sm_unacked": None,
            "sm_r_answered": None,
        }
    return {
        "sm_senders": len(sm_senders),
        "sm_acks_received": sum(s.acks for s in sm_senders),
        # Without --ack-every nothing is ever requested: unacked says nothing then.
        "sm_unacked": (
            sum(_h_behind(s.h_out, s.acked_h) for s in sm_senders) if cfg.ack_every else None
        ),
        "sm_r_answered": sum(s.r_answered for s in sm_senders),
    }


def _fmt_sm(figures: dict[str, object], senders: int) -> str:
    if not figures["sm_senders"]:
        return "SM off"
    return (
        f"SM on {figures['sm_senders']}/{senders} senders: <a/> received "
        f"{figures['sm_acks_received']}, unacked at the end {figures['sm_unacked']}, "
        f"server <r/> answered {figures['sm_r_answered']}"
    )


@dataclass
class ResumeRun:
    """Outcome of the reconnect phase of the resumption scenario."""

    resume_ns: list[int] = field(default_factory=list)
    reconnect_ns: list[int] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    resumed: list[Session] = field(default_factory=list)
    h_mismatches: list[str] = field(default_factory=list)


async def scenario_resume(
    cfg: Config, report: Reporter, sessions: list[Session], nursery: trio.Nursery
) -> int:
    """Run the resumption scenario; return failures + lost + duplicates + h mismatches."""
    if cfg.resume == 0:
        report.figures["resume"] = {"skipped": "not requested (--resume 0)"}
        return 0
    live = [s for s in sessions if not s.reader_done.is_set()]
    resumable = [s for s in live if s.sm_id]
    count = min(cfg.resume, len(resumable), len(live) // 2)
    if count == 0:
        reason = (
            "SM off (--no-sm)"
            if cfg.no_sm
            else f"{len(resumable)} of {len(live)} live sessions enabled resumable SM"
        )
        report.figures["resume"] = {"skipped": reason}
        report.line(f"resume: skipped ({reason})")
        return 0 if cfg.no_sm else 1
    # The last resumable sessions (not the message pairs when N allows), each paired with
    # a partner among the other live sessions.
    targets = resumable[-count:]
    chosen = set(targets)
    partners = [s for s in live if s not in chosen][:count]
    pairs = list(zip(targets, partners, strict=True))
    acked_n, unacked_n, unhandled_n = resume_groups(cfg.resume_messages)
    before, parked_n = cfg.resume_messages, cfg.resume_parked
    tracks: dict[Session, ResumeTrack] = {}
    for target, partner in pairs:
        target.stats = partner.stats = None
        target.peer = partner.peer = None
        tracks[target] = target.track = ResumeTrack.create(before, parked_n)
    incomplete: list[str] = []

    async def send_range(low: int, high: int) -> None:
        if high > low:
            async with trio.open_nursery() as senders:
                for target, partner in pairs:
                    senders.start_soon(_send_numbered_quietly, partner, target.jid, low, high)

    async def phase(name: str, ready: Callable[[], bool]) -> None:
        if not await poll_until(ready, cfg.drain_timeout):
            incomplete.append(name)

    # 1. Connected: handled and acknowledged (an unsolicited <a/>, XEP-0198 section 4).
    await send_range(0, acked_n)
    await phase("acked", lambda: all(t.handled_old() >= acked_n for t in tracks.values()))
    async with trio.open_nursery() as acks:
        for target in targets:
            acks.start_soon(_send_ack_quietly, target)
    # 2. Handled, but the server's <r/> goes unanswered: only <resume h/> will say so.
    for target in targets:
        target.mute_acks = True
    await send_range(acked_n, acked_n + unacked_n)
    await phase(
        "handled", lambda: all(t.handled_old() >= acked_n + unacked_n for t in tracks.values())
    )
    # 3. Received, never handled (left out of h): the server must resend them.
    for track in tracks.values():
        track.drop = True
    await send_range(acked_n + unacked_n, before)
    await phase("unhandled", lambda: all(t.dropped >= unhandled_n for t in tracks.values()))
    # 4. Cut every transport, let the server notice, then send to the parked sessions.
    async with trio.open_nursery() as cuts:
        for target in targets:
            cuts.start_soon(target.cut)
    await trio.sleep(0.5)
    await send_range(before, before + parked_n)
    await phase(
        "parked sends acked",
        lambda: all(_h_behind(p.h_out, p.acked_h) == 0 for p in partners if p.sm),
    )
    # 5. Reconnect all at once (bounded) and resume.
    cpu0 = time.process_time()
    server_cpu0 = read_cpu_seconds(cfg.server_pid, cfg.extra_pids) if cfg.server_pid else None
    start = time.perf_counter()
    run = await _reconnect_all(cfg, targets, nursery)
    wall = time.perf_counter() - start
    client_cpu = time.process_time() - cpu0
    server_cpu = _server_cpu_since(cfg, server_cpu0)
    # 6. Wait for the resent and parked messages, then a moment for any duplicates.
    await phase("delivery", lambda: all(tracks[t].complete() for t in run.resumed))
    await trio.sleep(0.25)
    return _report_resume(
        cfg,
        report,
        pairs,
        tracks,
        run,
        incomplete,
        wall=wall,
        client_cpu=client_cpu,
        server_cpu=server_cpu,
    )


async def _send_numbered_quietly(partner: Session, to: str, low: int, high: int) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await partner.send_numbered(to, range(low, high))


async def _send_ack_quietly(session: Session) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await session.send_ack()


async def _reconnect_all(cfg: Config, targets: list[Session], nursery: trio.Nursery) -> ResumeRun:
    run = ResumeRun()
    limiter = trio.CapacityLimiter(cfg.resume_concurrency)

    async def one(target: Session) -> None:
        async with limiter:
            assert target.track is not None
            target.track.drop = False
            target.track.resumed = True
            target.mute_acks = False
            start = time.perf_counter_ns()
            try:
                with trio.fail_after(cfg.login_timeout):
                    elapsed, server_h = await target.resume()
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
                run.failures[reason] = run.failures.get(reason, 0) + 1
                target.closing = True
                if target.tcp is not None:
                    with trio.move_on_after(1):
                        await target.tcp.aclose()
                target.stream = None
                return
            run.reconnect_ns.append(time.perf_counter_ns() - start)
            run.resume_ns.append(elapsed)
            if server_h != target.h_out % H_MOD:
                # Everything we sent before the cut was handled (its <a/> came back).
                run.h_mismatches.append(f"<resumed h='{server_h}'/>, sent {target.h_out}")
            run.resumed.append(target)
            target.start_reader(nursery)

    async with trio.open_nursery() as reconnects:
        for target in targets:
            reconnects.start_soon(one, target)
    return run


def _report_resume(
    cfg: Config,
    report: Reporter,
    pairs: list[tuple[Session, Session]],
    tracks: dict[Session, ResumeTrack],
    run: ResumeRun,
    incomplete: list[str],
    *,
    wall: float,
    client_cpu: float,
    server_cpu: float | None,
) -> int:
    count = len(pairs)
    acked_n, unacked_n, unhandled_n = resume_groups(cfg.resume_messages)
    totals = dict.fromkeys(
        ("lost", "duplicates", "resent_after_handled", "resent", "parked_delivered"), 0
    )
    for target in run.resumed:
        for key, value in tracks[target].tally().items():
            totals[key] += value
    resumed_set = set(run.resumed)
    # Messages to sessions that failed to resume and that they had not handled: where they
    # went (offline storage, bounce) is the server's business, not checked here.
    unverified = sum(t.total - t.handled_old() for s, t in tracks.items() if s not in resumed_set)
    foreign = sum(t.foreign for t in tracks.values())
    bounces = sum(p.bounces for _, p in pairs)
    reader_errors = sorted({s.reader_error for s in run.resumed if s.reader_error})
    ok = len(run.resumed)
    p50, p99 = percentile(run.resume_ns, 50), percentile(run.resume_ns, 99)
    worst = max(run.resume_ns) if run.resume_ns else math.nan
    rc50, rc99 = percentile(run.reconnect_ns, 50), percentile(run.reconnect_ns, 99)
    per_session = cfg.resume_messages + cfg.resume_parked
    report.figures["resume"] = {
        "requested": cfg.resume,
        "sessions": count,
        "resumed": ok,
        "failed": count - ok,
        "failures": run.failures,
        "concurrency": cfg.resume_concurrency,
        "seconds": round(wall, 3),
        "resumptions_per_s": round(ok / wall, 1) if wall > 0 else 0.0,
        "p50_ms": _ms(p50),
        "p99_ms": _ms(p99),
        "max_ms": _ms(worst),
        "reconnect_p50_ms": _ms(rc50),
        "reconnect_p99_ms": _ms(rc99),
        "messages_per_session": per_session,
        "acked_before_cut": acked_n,
        "handled_unacked_before_cut": unacked_n,
        "unhandled_before_cut": unhandled_n,
        "sent_while_parked": cfg.resume_parked,
        "planned": count * per_session,
        "lost": totals["lost"],
        "duplicates": totals["duplicates"],
        "resent_after_handled": totals["resent_after_handled"],
        "resent": totals["resent"],
        "resent_expected": ok * unhandled_n,
        "parked_delivered": totals["parked_delivered"],
        "parked_expected": ok * cfg.resume_parked,
        "unverified": unverified,
        "foreign_messages": foreign,
        "partner_bounces": bounces,
        "h_mismatches": len(run.h_mismatches),
        "incomplete_phases": incomplete,
        "reader_errors": reader_errors,
        "client_cpu_s": round(client_cpu, 2),
        "server_cpu_s": server_cpu,
    }
    report.line(
        f"resume: {ok}/{count} sessions resumed in {wall:.2f} s "
        f"({cfg.resume_concurrency} in flight); <resume/> -> <resumed/> p50 {fmt_ms(p50)}, "
        f"p99 {fmt_ms(p99)}, max {fmt_ms(worst)}; reconnect (TCP+TLS+SASL+resume) "
        f"p50 {fmt_ms(rc50)}, p99 {fmt_ms(rc99)}; failures {count - ok}; client CPU "
        f"{client_cpu:.2f} s, server CPU {_fmt_s(server_cpu)}"
    )
    report.line(
        f"  resume messages: {count} x {per_session} (before the cut {acked_n} acked, "
        f"{unacked_n} handled unacked, {unhandled_n} unhandled; {cfg.resume_parked} while "
        f"parked): lost {totals['lost']}, duplicates {totals['duplicates']} (handled before "
        f"the cut and resent: {totals['resent_after_handled']}), resent "
        f"{totals['resent']}/{ok * unhandled_n}, parked delivered "
        f"{totals['parked_delivered']}/{ok * cfg.resume_parked}; unverified {unverified} "
        f"(failed sessions), partner bounces {bounces}, h mismatches {len(run.h_mismatches)}"
    )
    for reason, n in sorted(run.failures.items(), key=lambda kv: -kv[1])[:5]:
        report.line(f"  resume failure x{n}: {reason}")
    for mismatch in run.h_mismatches[:3]:
        report.line(f"  resume h mismatch: {mismatch}")
    if incomplete:
        report.line(f"  resume phases that timed out: {', '.join(incomplete)}")
    for error in reader_errors[:5]:
        report.line(f"  resume: session error after resuming: {error}")
    return count - ok + totals["lost"] + totals["duplicates"] + len(run.h_mismatches)


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
        + (f", resume {cfg.resume}" if cfg.resume else "")
    )
    rss_before = read_rss_kib(cfg.server_pid, cfg.extra_pids) if cfg.server_pid else None
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
        if await scenario_resume(cfg, report, result.sessions, readers):
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
               With SM, a <r/> follows every --ack-every messages (and one after a
               sender's last message); every <r/> from the server is answered with
               <a h=.../>; "unacked" is what the server had not acknowledged at the end.
  resume       (--resume K, needs resumable SM) K sessions that got <enabled resume/>,
               each with a partner among the other sessions. The partner sends it
               --resume-messages numbered messages: the first third (rounded up) are
               handled and acked (<a h/>), the next third handled while the server's
               <r/> goes unanswered, the last third received but not handled (as if the
               client died before processing them: not in its h). Then the K TCP
               sockets are closed (no TLS close_notify, no </stream:stream>), the
               partners send --resume-parked more, and all K reconnect at once (at most
               --resume-concurrency in flight): STARTTLS, SASL, <resume previd h/>.
               Reported: <resume/> -> <resumed/> p50/p99/max, the whole reconnect, and
               whether every message was handled exactly once across the old and new
               streams (the unhandled third and the parked ones are expected once on the
               new stream, nothing handled before the cut may come again).

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
    add(
        "--extra-pid",
        type=int,
        action="append",
        help="another process counted as the server (a cluster's workers, Redis); repeatable",
    )
    add("--label", default="server", help="name of the server in the output")
    add(
        "--no-sm",
        action="store_true",
        help="do not enable XEP-0198 even when offered (compare servers without SM)",
    )
    add("--resume", type=int, default=0, help="sessions in the resumption scenario, 0 = skip")
    add("--resume-messages", type=int, default=6, help="messages per session before the cut")
    add("--resume-parked", type=int, default=3, help="messages per session while parked (3)")
    add("--resume-concurrency", type=int, default=100, help="resumptions in flight (100)")
    add(
        "--warmup",
        action="store_true",
        help="log every client in once before measuring (returning clients with cached keys)",
    )
    add("--json", action="store_true", help="print one JSON object on stdout (lines on stderr)")
    args = parser.parse_args(argv)
    for name in ("clients", "concurrency", "window", "resume_concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in (
        "pairs",
        "messages",
        "rate",
        "ack_every",
        "resume",
        "resume_messages",
        "resume_parked",
    ):
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
