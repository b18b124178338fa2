#!/usr/bin/env python3
"""How other clients fare while the gateway is attacked ("Defects found by hostile clients").

The run drives the gateway itself (`xmpp-gateway serve`, as scripts/bench_restart.py does) in
a throwaway directory: a certificate from scripts/make_cert.py, a generated config (STARTTLS
c2s and a ws:// WebSocket listener on 127.0.0.1, JSON logs), accounts from
`xmpp-gateway user import -`. Each attack gets a fresh gateway, so one attack's leftovers
(memory, stuck tasks, a crash) do not blur the next one's figures:

1. start the gateway; start the legitimate traffic, a separate process (this script with
   --legit-worker, so the attack's own CPU work never delays its timers): alice and bob log
   in over STARTTLS + SCRAM with XEP-0198 on, alice sends bob a numbered, time-stamped
   message every --interval-ms, bob's client sends each one back, alice times the round trip;
2. quiet phase (--quiet-seconds): the baseline round trips;
3. the attack (--attack-seconds) while the gateway's VmRSS is sampled every 0.2 s; then
   its connections close;
4. the gap (--gap-seconds, at least until the RSS settles, at most --settle-seconds): the
   gateway's RSS after the attack, round trips after it;
5. alice and bob stop (replies still under way get a few seconds), the gateway gets SIGTERM.

Per attack: round trip p50/p99 quiet, under attack and after, messages lost (sent by alice,
never answered), gateway RSS before / peak / after, gateway CPU seconds during the attack,
how its connections ended (from its log) and an outcome line of the attack itself. The
script prints figures and asserts nothing. It ends by itself when the gateway crashes or
hangs (every wait is bounded), cuts an attack short when the gateway's RSS passes
--rss-limit-mib (this machine has no swap), and always stops the gateway and removes its
directory (unless --keep).

Attacks (--attacks, default all, in this order):
  parser            unauthenticated connections send a stream header, then <message> with
                    --parser-children <a/> children and never close it; held, then closed.
  slow_reader       trudy logs in without SM and never reads; mallory sends her messages of
                    --slow-message-bytes (a <body> and 4,000 <x/>) as fast as it can.
                    Outcome: how the gateway ended trudy's stream.
  offline_flood     mallory sends messages of --flood-message-bytes to carol, who is
                    offline, as fast as it can. Outcome: accepted vs bounced (by condition),
                    growth of the SQLite files (auth.database and its -wal).
  websocket_reject  --ws-conns WebSocket upgrade requests without `Sec-WebSocket-Protocol:
                    xmpp`. Outcome: closed by the gateway within 2 s vs still open.
  mass_timeout      --timeout-conns idle TCP connections opened as fast as possible, with
                    general.negotiation_timeout = --negotiation-timeout so that they expire
                    together during the attack; fresh logins are timed right then. Outcome:
                    login times, refused connections, EMFILE in the gateway's log.
  plain_password    --plain-conns connections: STARTTLS, then SASL PLAIN with a password of
                    --plain-password-bytes, again and again (reconnecting when closed).
  guessing          --guess-conns connections guess alice's password (PLAIN over TLS,
                    reconnecting when closed) while the real alice logs in from 127.0.0.2
                    every second.

Only loopback addresses are used. The gateway runs on CPU 0 and this script (with the
legitimate clients) on CPU 1 when taskset and two CPUs are there (bench_common.sh's rule).
New limits can be tried without editing the script: --extra-general 'key: value, ...' is
appended inside the config's `general:` flow mapping (a key given twice: the last wins).

Usage: .venv/bin/python scripts/bench_attacks.py [--attacks a,b] [--json FILE] (see --help)
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from xml.sax.saxutils import escape

import trio

# scripts/ is not a package: bench.py and bench_restart.py sit next to this file (bench.py
# adds the repository root).
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench
import bench_restart

from gateway import __version__
from gateway.config import load_config
from gateway.errors import GatewayError

SCRIPT: Final = Path(__file__).resolve()
ROOT: Final = SCRIPT.parent.parent
DEFAULT_GATEWAY: Final = str(ROOT / ".venv" / "bin" / "xmpp-gateway")
HOST: Final = "127.0.0.1"
# The real alice's second address in the guessing attack (all of 127.0.0.0/8 is loopback).
OTHER_HOST: Final = "127.0.0.2"
DOMAIN: Final = bench_restart.DOMAIN
PASSWORD: Final = bench_restart.PASSWORD
WS_PATH: Final = "/xmpp-websocket"
ALICE: Final = "alice"  # legitimate, sends and times
BOB: Final = "bob"  # legitimate, echoes
MALLORY: Final = "mallory"  # attacker: floods, huge PLAIN passwords
TRUDY: Final = "trudy"  # attacker: the slow reader
CAROL: Final = "carol"  # never logged in: the offline flood's target
DAVE: Final = "dave"  # fresh logins while the idle connections expire
ACCOUNTS: Final = (ALICE, BOB, MALLORY, TRUDY, CAROL, DAVE)

STREAM_HEADER: Final = (
    b"<?xml version='1.0'?><stream:stream to='" + DOMAIN.encode() + b"' version='1.0'"
    b" xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
)
STARTTLS: Final = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
STREAM_ERROR_RE: Final = re.compile(rb"<stream:error><([a-z-]+)")
STREAM_TEXT_RE: Final = re.compile(rb"<text[^>]*>([^<]*)</text>")
UNKNOWN: Final = bench.UNKNOWN

# Timing (seconds).
RSS_EVERY_S: Final = 0.2  # the gateway's VmRSS sampling period
SETTLE_SAMPLES: Final = 5  # RSS settled: this many samples within 1% (or 1 MiB)
CONNECT_LIMIT_S: Final = 5.0  # one TCP connect
LOGIN_LIMIT_S: Final = 10.0  # one login (TCP, STARTTLS, SASL, bind)
ATTACK_OVERRUN_S: Final = 20.0  # an attack's clean-up after its time, before it is cut
SEND_LIMIT_S: Final = 5.0  # one flood message (the gateway stopped reading the sender)
DRAIN_S: Final = 3.0  # replies to alice still under way when she stops; the slow reader's drain
BOUNCE_WAIT_S: Final = 2.0  # the offline flood's bounces still under way
WORKER_SLACK_S: Final = 60.0  # the legitimate clients' process ends itself this much late
# The legitimate clients' niceness when allowed (root): the attack's own client work on
# the same CPU must not delay their timers and reads.
LEGIT_NICE: Final = -10
GATEWAY_WAIT_S: Final = 10.0  # start: log stalled this long; stop: beyond the close deadline
REAL_LOGIN_EVERY_S: Final = 1.0  # the real alice's logins during the guessing attack
WS_CLOSE_WITHIN_S: Final = 2.0  # a rejected WebSocket upgrade should be closed by then
EXPIRY_MARGIN_S: Final = 3.0  # mass_timeout: the attack lasts this long past the expiry

# Bounds of loops that the deadlines end anyway (the rule: every loop bounded in count).
MAX_READS: Final = 1_000_000
MAX_SENDS: Final = 1_000_000
MAX_RECONNECTS: Final = 100_000
MAX_TRIES_PER_CONNECTION: Final = 1000
MAX_FRESH_LOGINS: Final = 50
MAX_LINE_CHUNKS: Final = 10_000
# Bob's replies waiting to go out; full means bob drops the reply (counted, alice sees a loss).
ECHO_QUEUE: Final = 1000
# What a connection's description keeps of the bytes it received.
HEAD_BYTES: Final = 256
TAIL_BYTES: Final = 4096

# Failures of one client session: counted with their reason, never a crash of the run.
SESSION_ERRORS: Final = (
    bench.BenchError,
    GatewayError,
    OSError,
    ValueError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
)


class AttackBenchError(Exception):
    """The run cannot go on (no certificate, a config the gateway refuses, no accounts)."""


# --- small helpers ----------------------------------------------------------------------------


def describe(exc: BaseException) -> str:
    """A short reason for a counted failure."""
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def tally_text(counts: Counter[str], most: int = 4) -> str:
    """'a x3, b x1' (the most frequent first), or 'none'."""
    if not counts:
        return "none"
    parts = [f"{what} x{n}" for what, n in counts.most_common(most)]
    if len(counts) > most:
        parts.append(f"{len(counts) - most} more kinds")
    return ", ".join(parts)


def mib(kib: float | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f} MiB"


def ms(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float | int) else "n/a"


def busy_cpu_seconds() -> float:
    """CPU seconds every process on the machine has used since boot (/proc/stat)."""
    with Path("/proc/stat").open() as stat:
        fields = [int(value) for value in stat.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OthersCpu:
    """How much CPU the machine's other processes used between two readings (the
    gateway, this script and the legitimate clients' process left out): a shared machine
    makes every latency noisier."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.last = dict.fromkeys(pids, 0.0)  # a process that exited keeps its last reading
        self.at = (time.monotonic(), busy_cpu_seconds(), self._ours())

    def _ours(self) -> float:
        for pid, seconds in self.last.items():
            self.last[pid] = bench.read_cpu_seconds(pid) or seconds
        return sum(self.last.values())

    def share(self) -> float:
        """Percent of one CPU used by other processes since the last call (or creation)."""
        now = (time.monotonic(), busy_cpu_seconds(), self._ours())
        (t0, busy0, ours0), self.at = self.at, now
        wall = now[0] - t0
        return round(100 * max(0.0, (now[1] - busy0) - (now[2] - ours0)) / wall, 0) if wall else 0.0


def stream_error_of(data: bytes) -> str | None:
    """'<condition/> text' of a <stream:error> in `data`, or None."""
    found = STREAM_ERROR_RE.search(data)
    if found is None:
        return None
    condition = f"<{found.group(1).decode()}/>"
    text = STREAM_TEXT_RE.search(data, found.end())
    return f"{condition} '{text.group(1).decode(errors='replace')}'" if text else condition


def database_bytes(path: Path) -> int:
    """Bytes of an SQLite database with its write-ahead log."""
    total = 0
    for part in (path, path.with_name(path.name + "-wal")):
        with contextlib.suppress(OSError):
            total += part.stat().st_size
    return total


#: `<x/>` children of a stuffed message: about 800 KB of objects in the gateway, within the
#: memory a stanza may take under the default limits (a message past them is refused
#: at once and would feed nobody).
STUFFED_CHILDREN = 4000


def stuffed_message(to: str, size: int, *, children: bool) -> bytes:
    """A chat <message> of about `size` bytes: `STUFFED_CHILDREN` `<x/>` children and a
    <body> filling the rest, or one long <body>."""
    head = b"<message type='chat' to=" + bench._xml_attr(to) + b"><body>"
    tail = b"</body></message>"
    if children:
        tail = b"</body>" + b"<x/>" * STUFFED_CHILDREN + b"</message>"
    return head + b"x" * max(0, size - len(head) - len(tail)) + tail


def websocket_upgrade(port: int) -> bytes:
    """An RFC 6455 upgrade request for the XMPP path without `Sec-WebSocket-Protocol`."""
    key = base64.b64encode(secrets.token_bytes(16)).decode()
    return (
        f"GET {WS_PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def client_config(port: int, *, sm: bool) -> bench.Config:
    """bench.py's client settings (STARTTLS required, SCRAM first) for this run's gateway."""
    args = ["--host", HOST, "--port", str(port), "--domain", DOMAIN, "--password", PASSWORD]
    return bench.Config.from_args(bench.parse_args(args if sm else [*args, "--no-sm"]))


async def connect(port: int, local_ip: str | None = None) -> trio.SocketStream:
    """A TCP connection to the gateway on 127.0.0.1, from `local_ip` when given."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if local_ip is not None:
            await sock.bind((local_ip, 0))
        await sock.connect((HOST, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


class Received:
    """The first and last bytes a connection received (bounded), to tell how it ended."""

    def __init__(self) -> None:
        self.head = b""
        self.tail = b""
        self.total = 0

    def add(self, data: bytes | bytearray) -> None:
        if len(self.head) < HEAD_BYTES:
            self.head += data[: HEAD_BYTES - len(self.head)]
        self.tail = (self.tail + data)[-TAIL_BYTES:]
        self.total += len(data)

    def describe(self, how: str) -> str:
        """`how` ("closed", "reset"...) with the HTTP status or stream error received."""
        if self.head.startswith(b"HTTP/"):
            status = self.head.split(b"\r\n", 1)[0].decode(errors="replace")
            return f"{status} then {how}"
        error = stream_error_of(self.tail)
        if error is not None:
            return f"stream error {error} then {how}"
        return f"{how} after {self.total} bytes" if self.total else how


@dataclass
class ConnTally:
    """How an attack's raw connections ended."""

    opened: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    # (connected at, closed at, how), trio times
    closed: list[tuple[float, float, str]] = field(default_factory=list)
    # connected at, closed at (by us, at the end), of those the gateway never closed
    unclosed: list[tuple[float, float]] = field(default_factory=list)

    @property
    def still_open(self) -> int:
        return len(self.unclosed)

    @property
    def attempts(self) -> int:
        return self.opened + self.refused.total()

    def closed_within(self, seconds: float) -> int:
        return sum(end - start <= seconds for start, end, _ in self.closed)

    def open_longer(self, seconds: float) -> int:
        """Connections still open `seconds` after they were made (closed later, or never)."""
        spans = [(start, end) for start, end, _ in self.closed] + self.unclosed
        return sum(end - start > seconds for start, end in spans)

    def endings(self) -> Counter[str]:
        return Counter(how for _, _, how in self.closed)

    def figures(self) -> dict[str, object]:
        return {
            "opened": self.opened,
            "refused": dict(self.refused),
            "closed_by_gateway": len(self.closed),
            "endings": dict(self.endings()),
            "still_open_at_end": self.still_open,
        }


async def hold(port: int, payload: bytes, tally: ConnTally) -> None:
    """Connect, send `payload`, then read until the gateway closes the connection.

    The caller's cancel scope ends the wait; the connection then counts as still open and
    is closed (so is it on any exit).
    """
    try:
        with trio.fail_after(CONNECT_LIMIT_S):
            tcp = await connect(port)
    except (OSError, trio.TooSlowError) as exc:
        tally.refused[describe(exc)] += 1
        return
    tally.opened += 1
    opened_at = trio.current_time()
    received = Received()
    how = ""
    try:
        if payload:
            await tcp.send_all(payload)
        for _ in range(MAX_READS):
            data = await tcp.receive_some(bench.RECV_SIZE)
            if not data:
                how = "closed"
                break
            received.add(data)
    except (trio.BrokenResourceError, OSError) as exc:
        how = f"reset ({describe(exc.__cause__ or exc)})"
    finally:
        if how:
            tally.closed.append((opened_at, trio.current_time(), received.describe(how)))
        else:
            tally.unclosed.append((opened_at, trio.current_time()))
        await trio.aclose_forcefully(tcp)


async def hold_slot(port: int, payload: Callable[[], bytes], tally: ConnTally) -> None:
    """hold() a connection, and a new one each time the gateway closes it: the pressure
    lasts until the caller's scope ends, whatever the gateway does."""
    for _ in range(MAX_RECONNECTS):
        opened = tally.opened
        await hold(port, payload(), tally)
        if tally.opened == opened:
            await trio.sleep(0.1)  # refused: do not spin while the gateway is down


# --- client sessions ------------------------------------------------------------------------


class Attacker(bench.Session):
    """bench.py's raw client session with what the attacks add: an account by name, a
    source address, TLS before (or without) SASL, floods, and the conditions of the
    messages bounced back to it. Its reader (bench.Session.run_reader) counts bounces."""

    def __init__(self, cfg: bench.Config, username: str, *, local_ip: str | None = None) -> None:
        super().__init__(0, cfg)
        self.username = username
        self.local_ip = local_ip
        self.sent = 0
        self.send_error = ""
        self.bounce_conditions: Counter[str] = Counter()

    def _on_message(self, node: bench.Node) -> None:
        if node.attrs.get("type") == "error":
            error = node.find(f"{bench.NS_CLIENT} error")
            self.bounce_conditions[(error.first_child_name() if error else "") or UNKNOWN] += 1

    async def connect_tls(self) -> bench.Node:
        """TCP, stream, STARTTLS; returns the features of the stream over TLS."""
        tcp = await connect(self.cfg.port, self.local_ip)
        self.stream = self.tcp = tcp
        features = await self.open_stream()
        if features.find(bench.T_STARTTLS) is None:
            raise bench.BenchError("STARTTLS not offered")
        await self.send(STARTTLS)
        if (await self.next_node()).tag != bench.T_PROCEED:
            raise bench.BenchError("STARTTLS refused")
        tls = trio.SSLStream(tcp, self.cfg.ssl_context, server_hostname=self.cfg.domain)
        await tls.do_handshake()
        self.stream = tls
        return await self.open_stream()

    async def login_tls(self) -> None:
        """connect_tls, SASL (SCRAM-SHA-256 first, as bench.py), bind; no stream management."""
        await self._authenticate(await self.connect_tls())
        await self._bind(await self.open_stream())

    async def sasl_plain(self, password: bytes) -> str:
        """One SASL PLAIN attempt: "success" or the failure's condition.

        Raises:
            bench.BenchError: the stream ended (its error condition in the message).
        """
        await self._send_auth("PLAIN", b"\0" + self.username.encode() + b"\0" + password)
        node = await self.next_node()
        if node.tag == bench.T_FAILURE:
            return node.first_child_name() or "failure"
        return "success" if node.tag == bench.T_SUCCESS else node.tag.rpartition(" ")[2]

    async def flood(self, data: bytes) -> None:
        """Send `data` again and again, until the caller's scope ends or sending fails.

        Each message goes out whole (shielded, at most SEND_LIMIT_S): a send cancelled
        midway would break the TLS stream and lose the bounces still on their way.
        """
        for _ in range(MAX_SENDS):
            limit = trio.current_time() + SEND_LIMIT_S
            with trio.CancelScope(deadline=limit, shield=True) as one:
                try:
                    await self.send(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self.send_error = f"send failed: {describe(exc.__cause__ or exc)}"
                    return
            if one.cancelled_caught:
                self.send_error = f"one message took over {SEND_LIMIT_S:g} s to send"
                return
            self.sent += 1
            await trio.lowlevel.checkpoint()  # where the caller's cancellation lands

    def state(self) -> str:
        """How this client's stream stands: its errors, or "open"."""
        return " and ".join(e for e in (self.reader_error, self.send_error) if e) or "open"

    async def leave(self) -> None:
        """</stream:stream> (best effort), then close the socket (also when cancelled)."""
        try:
            if self.stream is not None:
                with (
                    trio.move_on_after(0.5),
                    contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
                ):
                    await self.send(bench.STREAM_CLOSE)
        finally:
            await bench_restart.close_transport(self)


async def timed_login(cfg: bench.Config, username: str, local_ip: str | None = None) -> float | str:
    """Milliseconds from connect to a bound resource, or why the login failed."""
    session = Attacker(cfg, username, local_ip=local_ip)
    start = time.perf_counter()
    try:
        with trio.fail_after(LOGIN_LIMIT_S):
            await session.login_tls()
        return round((time.perf_counter() - start) * 1000, 2)
    except SESSION_ERRORS as exc:
        return describe(exc)
    finally:
        await session.leave()


async def record_login(
    results: list[float | str], cfg: bench.Config, username: str, local_ip: str | None = None
) -> None:
    """timed_login() into `results`; a login that the attack's end cuts short counts too,
    as unfinished (a gateway that never answers must not vanish from the figures)."""
    start = trio.current_time()
    count = len(results)
    try:
        results.append(await timed_login(cfg, username, local_ip))
    finally:
        if len(results) == count:
            results.append(f"unfinished after {trio.current_time() - start:.1f} s")


def login_text(results: Sequence[float | str]) -> str:
    """'3/3 ok, p50 12.0 ms, max 30.1 ms' and the failures."""
    times = [r for r in results if isinstance(r, float)]
    text = f"{len(times)}/{len(results)} ok"
    if times:
        text += f", p50 {bench.percentile(times, 50):.1f} ms, max {max(times):.1f} ms"
    failures = Counter(r for r in results if isinstance(r, str))
    return text + (f", failed: {tally_text(failures)}" if failures else "")


# --- the legitimate clients (a process of their own) -----------------------------------------


class LegitClient(bench.Session):
    """alice or bob (bench.py's session, with SM): bob sends every message back to its
    sender, alice times the round trips of her numbered messages."""

    def __init__(
        self,
        cfg: bench.Config,
        username: str,
        echo: trio.MemorySendChannel[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(0, cfg)
        self.username = username
        self.echo = echo
        self.sent_ns: list[int] = []  # alice: when message `seq` went out (monotonic ns)
        self.rtt_ns: dict[int, int] = {}  # alice: seq -> round trip
        self.echo_dropped = 0
        self.send_error = ""
        self.lag_max_s = 0.0  # how late alice's sends were against her schedule

    def _on_message(self, node: bench.Node) -> None:
        body = node.find(bench.T_BODY)
        if node.attrs.get("type") == "error" or body is None:
            self.bounces += 1
            return
        if self.echo is not None:
            try:
                self.echo.send_nowait((node.attrs.get("from", ""), body.text))
            except trio.WouldBlock:
                self.echo_dropped += 1
            return
        seq, _, stamp = body.text.partition(" ")
        if not (seq.isdigit() and stamp.isdigit()) or int(seq) >= len(self.sent_ns):
            self.bounces += 1
            return
        self.rtt_ns.setdefault(int(seq), time.monotonic_ns() - int(stamp))

    async def run_echo(self, replies: trio.MemoryReceiveChannel[tuple[str, str]]) -> None:
        """bob: send each received message back to its sender."""
        async for to, text in replies:
            message = b"<message type='chat' to=" + bench._xml_attr(to) + b"><body>"
            try:
                await self.send(message + escape(text).encode() + b"</body></message>")
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.send_error = f"echo failed: {describe(exc)}"
                return

    async def run_pings(self, to: str, interval: float, count: int) -> None:
        """alice: message `seq` to `to` at start + seq * interval, "seq send-time-ns"."""
        head = b"<message type='chat' to=" + bench._xml_attr(to) + b"><body>"
        start = time.monotonic()
        for seq in range(count):
            due = start + seq * interval
            await trio.sleep(max(0.0, due - time.monotonic()))
            self.lag_max_s = max(self.lag_max_s, time.monotonic() - due)
            stamp = time.monotonic_ns()
            self.sent_ns.append(stamp)
            try:
                await self.send(head + b"%d %d</body></message>" % (seq, stamp))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.sent_ns.pop()
                self.send_error = f"send failed: {describe(exc)}"
                return

    def answered(self) -> bool:
        return len(self.rtt_ns) >= len(self.sent_ns) or self.reader_done.is_set()


def emit(obj: dict[str, object]) -> None:
    """One JSON line to the parent process."""
    print(json.dumps(obj), flush=True)


async def wait_for_stop() -> None:
    """Return when the parent writes a line or closes our stdin (when it died, too)."""
    async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
        await stdin.receive_some(64)


async def legit_worker(opts: argparse.Namespace) -> int:
    """The legitimate clients' process: a "ready" line, the pings until told to stop,
    then one line with every message's send time and round trip (-1: no reply)."""
    cfg = client_config(opts.port, sm=True)
    # Bounded: a full channel drops bob's reply (counted), it never blocks his reader.
    echo_send, echo_receive = trio.open_memory_channel[tuple[str, str]](ECHO_QUEUE)
    bob = LegitClient(cfg, BOB, echo=echo_send)
    alice = LegitClient(cfg, ALICE)
    async with trio.open_nursery() as nursery:
        try:
            with trio.fail_after(LOGIN_LIMIT_S):
                await bob.login()
                await alice.login()
        except SESSION_ERRORS as exc:
            emit({"ready": False, "error": describe(exc)})
            return 1
        bob.start_reader(nursery)
        alice.start_reader(nursery)
        nursery.start_soon(bob.run_echo, echo_receive)
        emit({"ready": True, "sm": alice.sm and bob.sm})
        interval = opts.interval_ms / 1000
        with trio.move_on_after(opts.worker_limit):
            async with trio.open_nursery() as pinging:
                count = int(opts.worker_limit / interval) + 1
                pinging.start_soon(alice.run_pings, bob.jid, interval, count)
                await wait_for_stop()
                pinging.cancel_scope.cancel()
        await bench.poll_until(alice.answered, DRAIN_S)
        errors = [
            f"{who.username}: {error}"
            for who in (alice, bob)
            for error in (who.reader_error, who.send_error)
            if error
        ]
        emit(
            {
                "pings": [[at, alice.rtt_ns.get(seq, -1)] for seq, at in enumerate(alice.sent_ns)],
                "lag_max_ms": round(alice.lag_max_s * 1000, 2),
                "errors": errors,
                "echo_dropped": bob.echo_dropped,
                "bounces": alice.bounces + bob.bounces,
            }
        )
        await bench.close_all([alice, bob])
        nursery.cancel_scope.cancel()
    return 0


class LineReader:
    """Lines from a process's stdout."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def line(self) -> bytes | None:
        """The next line, or None at EOF (no timeout of its own)."""
        for _ in range(MAX_LINE_CHUNKS):
            if b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                return line
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.buffer += data
        return None


class LegitTraffic:
    """The parent's handle on the legitimate clients' process."""

    def __init__(self, process: trio.Process, errors: Path) -> None:
        self.process = process
        self.errors = errors
        assert process.stdout is not None
        self.lines = LineReader(process.stdout)
        self.nice = 0
        self.sm = False
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, process.pid, LEGIT_NICE)
            self.nice = LEGIT_NICE

    @classmethod
    async def start(cls, env: Env, port: int, limit_s: float) -> LegitTraffic:
        """Spawn the process and wait for its logins.

        Raises:
            AttackBenchError: alice and bob could not log in.
        """
        errors = env.work / f"legit-{env.runner.starts}.err"
        command = [
            sys.executable,
            str(SCRIPT),
            "--legit-worker",
            "--port",
            str(port),
            "--interval-ms",
            str(env.opts.interval_ms),
            "--worker-limit",
            str(round(limit_s, 1)),
        ]
        with errors.open("wb") as err:
            process = await trio.lowlevel.open_process(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err
            )
        env.processes.append(process)
        traffic = cls(process, errors)
        answer = await traffic.message(LOGIN_LIMIT_S + 5)
        if not answer.get("ready"):
            raise AttackBenchError(
                f"alice and bob did not log in: {answer.get('error', 'no answer')}"
                + traffic.stderr_tail()
            )
        traffic.sm = bool(answer.get("sm"))
        return traffic

    async def message(self, limit_s: float) -> dict[str, object]:
        """The next JSON line ({} when none came in time)."""
        with trio.move_on_after(limit_s):
            line = await self.lines.line()
            if line:
                with contextlib.suppress(ValueError):
                    loaded = json.loads(line)
                    if isinstance(loaded, dict):
                        return loaded
        return {}

    def stderr_tail(self) -> str:
        text = self.errors.read_text(errors="replace").strip().splitlines()
        return ("; its stderr ends with: " + " | ".join(text[-3:])) if text else ""

    async def finish(self) -> dict[str, object]:
        """Tell the clients to stop; their results ({} when none came)."""
        assert self.process.stdin is not None
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.process.stdin.send_all(b"stop\n")
        results = await self.message(DRAIN_S + 20)
        with trio.move_on_after(5):
            await self.process.wait()
        if self.process.poll() is None:
            self.process.kill()
        return results


@dataclass
class Phase:
    """Alice's messages sent in one phase: how many, answered, lost, round trips."""

    messages: int
    lost: int
    rtt_ns: list[int]

    @classmethod
    def of(cls, pings: Sequence[Sequence[int]], start_ns: int, end_ns: int) -> Phase:
        inside = [rtt for at, rtt in pings if start_ns <= at < end_ns]
        answered = [rtt for rtt in inside if rtt >= 0]
        return cls(len(inside), len(inside) - len(answered), answered)

    def ms(self, pct: float) -> float | None:
        return bench._ms(bench.percentile(self.rtt_ns, pct))

    def figures(self) -> dict[str, object]:
        return {
            "messages": self.messages,
            "lost": self.lost,
            "p50_ms": self.ms(50),
            "p99_ms": self.ms(99),
            "max_ms": bench._ms(max(self.rtt_ns) if self.rtt_ns else math.nan),
        }


# --- the gateway ----------------------------------------------------------------------------


def gateway_config(opts: argparse.Namespace, *, negotiation_timeout: float | None) -> str:
    """The YAML config of one gateway start (paths relative to the file)."""
    general = [f"hosts: [{DOMAIN}]", "shutdown_grace: 0"]
    if negotiation_timeout is not None:
        general.append(f"negotiation_timeout: {negotiation_timeout:g}")
    if opts.extra_general:
        general.append(opts.extra_general)
    return (
        f"general: {{{', '.join(general)}}}\n"
        "listen:\n"
        f"  c2s: [{{ip: {HOST}, port: {opts.port}, tls: starttls}}]\n"
        f"  websocket: [{{ip: {HOST}, port: {opts.ws_port}, path: {WS_PATH}, tls: none}}]\n"
        f"tls: {{certfile: certs/{DOMAIN}.pem, keyfile: certs/{DOMAIN}.key}}\n"
        "auth: {database: data/gateway.sqlite}\n"
        # alice and bob close their streams before each stop: nothing to hand off.
        "modules:\n  mod_stream_management: {handoff_on_shutdown: false}\n"
        "logging: {level: info, format: json}\n"
    )


def run_tool(command: Sequence[str], cwd: Path, stdin: str | None = None) -> None:
    """Run a setup command; AttackBenchError with its output when it fails."""
    done = subprocess.run(
        command, input=stdin, text=True, capture_output=True, cwd=cwd, check=False
    )
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()
        raise AttackBenchError(f"{' '.join(command[:3])} failed ({done.returncode}): {output}")


def prepare(opts: argparse.Namespace, runner: bench_restart.Runner) -> None:
    """Certificate, config check, accounts (the database outlives each gateway start)."""
    work = runner.work
    run_tool([sys.executable, str(ROOT / "scripts" / "make_cert.py"), "--out", "certs"], work)
    runner.config.write_text(gateway_config(opts, negotiation_timeout=None))
    run_tool([opts.gateway, "check-config", "--config", str(runner.config)], work)
    lines = "".join(f"{name}@{DOMAIN} {PASSWORD}\n" for name in ACCOUNTS)
    run_tool([opts.gateway, "user", "import", "-", "--config", str(runner.config)], work, lines)


@dataclass
class GatewayLog:
    """What one gateway start logged: how connections closed, warning/error events."""

    closed: Counter[str] = field(default_factory=Counter)
    problems: Counter[str] = field(default_factory=Counter)
    closed_by_user: dict[str, Counter[str]] = field(default_factory=dict)
    emfile: int = 0
    # the last lines that are not JSON: a traceback printed on a crash
    other: deque[str] = field(default_factory=lambda: deque(maxlen=60))

    @classmethod
    def read(cls, path: Path) -> GatewayLog:
        log = cls()
        with contextlib.suppress(OSError), path.open(errors="replace") as lines:
            for line in lines:
                if "EMFILE" in line or "Too many open files" in line:
                    log.emfile += 1
                try:
                    entry = json.loads(line)
                except ValueError:
                    log.other.append(line)
                    continue
                if isinstance(entry, dict):
                    log.feed(entry)
        return log

    def crash(self) -> str:
        """The end of the traceback the gateway printed, or ""."""
        lines = [stripped for line in self.other if (stripped := line.strip(" |+-\n"))]
        if not lines:
            return ""
        where = next((line for line in reversed(lines) if line.startswith("File ")), "")
        return f"{lines[-1]} ({where})" if where else lines[-1]

    def feed(self, entry: dict[str, object]) -> None:
        event = str(entry.get("event"))
        if entry.get("level") not in ("debug", "info"):
            self.problems[f"{entry.get('level')} {event}"] += 1
        if event == "connection_closed":
            reason = str(entry.get("reason"))
            self.closed[reason] += 1
            user = str(entry.get("jid", "")).partition("@")[0]
            self.closed_by_user.setdefault(user, Counter())[reason] += 1


class RssMonitor:
    """Samples the gateway's VmRSS every 0.2 s during an attack; ends the attack early
    when the gateway exits or passes the RSS limit."""

    def __init__(self, gateway: bench_restart.Gateway, limit_kib: int) -> None:
        self.gateway = gateway
        self.limit_kib = limit_kib
        self.peak: int | None = None
        self.cut_short = ""
        self.exit_status: int | None = None  # when the gateway exited during the attack

    def sample(self) -> int | None:
        rss = bench.read_rss_kib(self.gateway.pid)
        if rss is not None:
            self.peak = max(self.peak or 0, rss)
        return rss

    async def run(self, attack: trio.CancelScope, samples: int) -> None:
        for _ in range(samples):
            status = self.gateway.process.poll()
            if status is not None:
                self.exit_status = status
                self.cut_short = f"the gateway exited with status {status} during the attack"
                attack.cancel()
                return
            rss = self.sample()
            if rss is not None and rss > self.limit_kib:
                self.cut_short = f"gateway RSS {mib(rss)} passed --rss-limit-mib"
                attack.cancel()
                return
            await trio.sleep(RSS_EVERY_S)

    async def settle(self, limit_s: float) -> tuple[int | None, float]:
        """Sample until the RSS holds still (or `limit_s`); the last sample, seconds taken."""
        start = trio.current_time()
        recent: list[int] = []
        for _ in range(int(limit_s / RSS_EVERY_S) + 1):
            rss = self.sample()
            if rss is None:
                break
            recent = [*recent[-(SETTLE_SAMPLES - 1) :], rss]
            if len(recent) == SETTLE_SAMPLES and max(recent) - min(recent) <= max(1024, rss // 100):
                break
            await trio.sleep(RSS_EVERY_S)
        return (recent[-1] if recent else None), round(trio.current_time() - start, 1)


# --- the attacks ------------------------------------------------------------------------------


@dataclass
class AttackContext:
    """What an attack gets: the run's options, the gateway, the client settings, and the
    cancel scope of its working time (its deadline, or the RSS monitor, ends it)."""

    opts: argparse.Namespace
    gateway: bench_restart.Gateway
    client: bench.Config  # SCRAM/PLAIN over STARTTLS, no stream management
    database: Path
    negotiation_timeout: float
    scope: trio.CancelScope
    figures: dict[str, object] = field(default_factory=dict)
    work_ended_ns: int = 0

    @property
    def port(self) -> int:
        return int(self.opts.port)

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        """The attack's working time: ends at the scope's deadline or when cancelled."""
        try:
            with self.scope:
                yield
        finally:
            self.work_ended_ns = time.monotonic_ns()


async def logged_in(ctx: AttackContext, username: str) -> Attacker | str:
    """An attacker session with a bound resource, or why the login failed."""
    session = Attacker(ctx.client, username)
    try:
        with trio.fail_after(LOGIN_LIMIT_S):
            await session.login_tls()
    except SESSION_ERRORS as exc:
        await session.leave()
        return describe(exc)
    return session


async def hold_slots(
    ctx: AttackContext, port: int, count: int, payload: Callable[[], bytes]
) -> ConnTally:
    """`count` connections kept by hold_slot for the attack's working time."""
    tally = ConnTally()
    with ctx.working():
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(hold_slot, port, payload, tally)
    ctx.figures.update(tally.figures())
    return tally


async def attack_parser(ctx: AttackContext) -> str:
    """Unauthenticated streams with a never-ending <message> of many children (a closed
    connection is replaced at once)."""
    opts = ctx.opts
    payload = STREAM_HEADER + b"<message>" + b"<a/>" * opts.parser_children
    tally = await hold_slots(ctx, ctx.port, opts.parser_conns, lambda: payload)
    ctx.figures.update(bytes_per_connection=len(payload))
    return (
        f"{tally.opened} connections ({opts.parser_conns} at a time) of {len(payload):,} "
        f"bytes; closed by the gateway {len(tally.closed)} "
        f"({tally_text(tally.endings())}); still open at the end {tally.still_open}; "
        f"refused {tally.refused.total()}"
    )


async def read_ending(session: Attacker) -> str:
    """Read what the gateway queued for a client that did not read: how its stream ended."""
    stream = session.stream
    if stream is None:
        return "no stream"
    received = Received()
    how = ""
    start = trio.current_time()
    with trio.move_on_after(DRAIN_S):
        try:
            for _ in range(MAX_READS):
                data = await stream.receive_some(bench.RECV_SIZE)
                if not data:
                    how = "closed"
                    break
                received.add(data)
        except (trio.BrokenResourceError, OSError) as exc:
            how = f"reset ({describe(exc.__cause__ or exc)})"
    if how:
        return received.describe(how) + f" after {received.total / 2**20:.1f} MiB"
    return (
        f"still open ({received.total / 2**20:.1f} MiB read in "
        f"{trio.current_time() - start:.1f} s, no end)"
    )


class Flood:
    """mallory sending one message again and again for the attack's working time, logging
    in again each time the gateway ends her stream; each session's reader counts bounces."""

    def __init__(self, ctx: AttackContext, message: bytes) -> None:
        self.ctx = ctx
        self.message = message
        self.senders: list[Attacker] = []
        self.login_failures: Counter[str] = Counter()
        self.seconds = 0.0

    async def run(self, readers: trio.Nursery) -> None:
        """Flood until the working scope ends (the readers stay in `readers`)."""
        start = trio.current_time()
        try:
            with self.ctx.working():
                for _ in range(MAX_RECONNECTS):
                    sender = await logged_in(self.ctx, MALLORY)
                    if isinstance(sender, str):
                        self.login_failures[sender] += 1
                        await trio.sleep(0.1)
                        continue
                    self.senders.append(sender)
                    sender.start_reader(readers)
                    await sender.flood(self.message)
                    # Ended by the gateway: let the reader see the stream error, go again.
                    await bench.poll_until(sender.reader_done.is_set, 0.5)
                    await sender.leave()
        finally:
            self.seconds = trio.current_time() - start

    async def close(self) -> None:
        for sender in self.senders:
            await sender.leave()

    @property
    def sent(self) -> int:
        return sum(sender.sent for sender in self.senders)

    def bounces(self) -> Counter[str]:
        return sum((sender.bounce_conditions for sender in self.senders), Counter[str]())

    def endings(self) -> Counter[str]:
        """How the gateway ended the senders' streams (the last one may still be open)."""
        ended = Counter(sender.state() for sender in self.senders)
        ended.pop("open", None)
        ended.update(f"login: {reason}" for reason in self.login_failures.elements())
        return ended

    def figures(self) -> dict[str, object]:
        return {
            "messages_sent": self.sent,
            "message_bytes": len(self.message),
            "seconds": round(self.seconds, 1),
            "sender_sessions": len(self.senders),
            "sender_endings": dict(self.endings()),
            "bounces": dict(self.bounces()),
        }

    def text(self) -> str:
        return (
            f"{self.sent} messages of {len(self.message):,} bytes sent in {self.seconds:.1f} s "
            f"by {len(self.senders)} sender sessions, ended by: {tally_text(self.endings())}"
        )


async def attack_slow_reader(ctx: AttackContext) -> str:
    """trudy never reads; mallory sends her big messages of many small children."""
    reader = await logged_in(ctx, TRUDY)
    if isinstance(reader, str):
        return f"{TRUDY} could not log in: {reader}"
    flood = Flood(ctx, stuffed_message(reader.jid, ctx.opts.slow_message_bytes, children=True))
    try:
        async with trio.open_nursery() as readers:
            await flood.run(readers)
            ending = await read_ending(reader)
            readers.cancel_scope.cancel()
    finally:
        await flood.close()
        await reader.leave()
    logged = GatewayLog.read(ctx.gateway.log.path).closed_by_user.get(TRUDY, Counter())
    ctx.figures.update(
        flood.figures(), slow_reader_ending=ending, slow_reader_log_reasons=dict(logged)
    )
    return (
        f"slow reader: {ending}; its connection_closed reason: {tally_text(logged)}; "
        f"{flood.text()}; bounces {tally_text(flood.bounces())}"
    )


async def attack_offline_flood(ctx: AttackContext) -> str:
    """mallory sends big messages to carol, who is offline: stored or bounced?"""
    to = f"{CAROL}@{DOMAIN}"
    flood = Flood(ctx, stuffed_message(to, ctx.opts.flood_message_bytes, children=False))
    size_before = database_bytes(ctx.database)
    try:
        async with trio.open_nursery() as readers:
            await flood.run(readers)
            await trio.sleep(BOUNCE_WAIT_S)
            readers.cancel_scope.cancel()
    finally:
        await flood.close()
    growth = database_bytes(ctx.database) - size_before
    bounces = flood.bounces()
    accepted = flood.sent - bounces.total()
    ctx.figures.update(flood.figures(), accepted=accepted, database_growth_bytes=growth)
    return (
        f"accepted {accepted}, bounced {bounces.total()} ({tally_text(bounces)}), database "
        f"+{growth / 2**20:.1f} MiB; {flood.text()}"
    )


async def attack_websocket_reject(ctx: AttackContext) -> str:
    """WebSocket upgrades without the xmpp subprotocol: closed at once, or left hanging?
    (A closed connection is replaced at once.)"""
    port = ctx.opts.ws_port
    tally = await hold_slots(ctx, port, ctx.opts.ws_conns, lambda: websocket_upgrade(port))
    quick = tally.closed_within(WS_CLOSE_WITHIN_S)
    slow = tally.open_longer(WS_CLOSE_WITHIN_S)
    ctx.figures.update(closed_within_2s=quick, open_after_2s=slow)
    return (
        f"{quick} of {tally.opened} upgrade requests ({ctx.opts.ws_conns} at a time) closed "
        f"by the gateway within {WS_CLOSE_WITHIN_S:g} s, {slow} still open after "
        f"{WS_CLOSE_WITHIN_S:g} s ({tally.still_open} open at the end, "
        f"{tally.opened - quick - slow} of them younger); answers: "
        f"{tally_text(tally.endings())}; refused {tally.refused.total()}"
    )


async def attack_mass_timeout(ctx: AttackContext) -> str:
    """Idle connections that all reach negotiation_timeout together; fresh logins then."""
    opts = ctx.opts
    expiry = ctx.negotiation_timeout
    before = await timed_login(ctx.client, DAVE)
    tally = ConnTally()
    logins: list[float | str] = []
    opened_in = math.nan
    with ctx.working():
        async with trio.open_nursery() as nursery:
            start = trio.current_time()
            for _ in range(opts.timeout_conns):
                nursery.start_soon(hold, ctx.port, b"", tally)
            await bench.poll_until(lambda: tally.attempts >= opts.timeout_conns, CONNECT_LIMIT_S)
            opened_in = trio.current_time() - start
            last_expiry = start + opened_in + expiry
            ctx.scope.deadline = max(ctx.scope.deadline, last_expiry + EXPIRY_MARGIN_S)
            await trio.sleep_until(start + expiry)
            for _ in range(MAX_FRESH_LOGINS):
                await record_login(logins, ctx.client, DAVE)
                if trio.current_time() > last_expiry + 1 or len(tally.closed) >= tally.opened:
                    break
    closes = sorted(end for _, end, _ in tally.closed)
    spread = closes[-1] - closes[0] if closes else math.nan
    emfile = GatewayLog.read(ctx.gateway.log.path).emfile
    ctx.figures.update(
        tally.figures(),
        open_seconds=None if math.isnan(opened_in) else round(opened_in, 2),
        close_spread_s=None if math.isnan(spread) else round(spread, 2),
        login_before=before,
        logins_at_expiry=logins,
        emfile_log_lines=emfile,
    )
    return (
        f"fresh login at the expiry: {login_text(logins)} (before the attack: "
        f"{login_text([before])}); {tally.opened} connections opened in {opened_in:.1f} s, "
        f"refused {tally.refused.total()} ({tally_text(tally.refused)}); closed by the "
        f"gateway {len(tally.closed)} over {spread:.1f} s ({tally_text(tally.endings())}), "
        f"still open {tally.still_open}; EMFILE in the gateway log: "
        + (f"yes ({emfile} lines)" if emfile else "no")
    )


@dataclass
class SaslTally:
    """SASL attempts of a PLAIN attack: answers by condition, how connections ended."""

    answers: Counter[str] = field(default_factory=Counter)
    endings: Counter[str] = field(default_factory=Counter)
    answer_s: list[float] = field(default_factory=list)
    connections: int = 0

    async def attempts(
        self, ctx: AttackContext, username: str, password: Callable[[], bytes]
    ) -> None:
        """Connect, try PLAIN until the gateway closes the stream, reconnect (until the
        caller's scope ends)."""
        for _ in range(MAX_RECONNECTS):
            session = Attacker(ctx.client, username)
            connected = False
            try:
                with trio.fail_after(LOGIN_LIMIT_S):
                    await session.connect_tls()
                connected = True
                self.connections += 1
                for _ in range(MAX_TRIES_PER_CONNECTION):
                    start = trio.current_time()
                    answer = await session.sasl_plain(password())
                    self.answer_s.append(trio.current_time() - start)
                    self.answers[answer] += 1
            except SESSION_ERRORS as exc:
                self.endings[describe(exc) if connected else f"connect: {describe(exc)}"] += 1
            finally:
                await session.leave()
            if not connected:
                await trio.sleep(0.1)  # refused: do not spin while the gateway is down

    def figures(self, seconds: float) -> dict[str, object]:
        return {
            "answers": dict(self.answers),
            "connection_endings": dict(self.endings),
            "connections": self.connections,
            "seconds": round(seconds, 1),
            "answered_per_s": round(self.answers.total() / seconds, 1) if seconds else None,
            "answer_p50_ms": bench._ms(bench.percentile(self.answer_s, 50) * 1e9),
            "answer_max_ms": bench._ms(max(self.answer_s, default=math.nan) * 1e9),
        }

    def text(self, seconds: float) -> str:
        answered = self.answers.total()
        rate = answered / seconds if seconds else math.nan
        timing = ""
        if self.answer_s:
            timing = (
                f", answer p50 {bench.percentile(self.answer_s, 50) * 1000:.1f} ms, max "
                f"{max(self.answer_s) * 1000:.1f} ms"
            )
        return (
            f"{answered} attempts answered in {seconds:.1f} s ({rate:.1f}/s{timing}) on "
            f"{self.connections} connections: {tally_text(self.answers)}; streams ended by: "
            f"{tally_text(self.endings)}"
        )


async def attack_plain_password(ctx: AttackContext) -> str:
    """SASL PLAIN with a huge password, again and again."""
    password = b"p" * ctx.opts.plain_password_bytes
    tally = SaslTally()
    start = trio.current_time()
    with ctx.working():
        async with trio.open_nursery() as nursery:
            for _ in range(ctx.opts.plain_conns):
                nursery.start_soon(tally.attempts, ctx, MALLORY, lambda: password)
    seconds = trio.current_time() - start
    ctx.figures.update(tally.figures(seconds), password_bytes=len(password))
    return tally.text(seconds)


async def attack_guessing(ctx: AttackContext) -> str:
    """Password guessing on alice's account while the real alice logs in elsewhere."""
    tally = SaslTally()
    real: list[float | str] = []
    counter = iter(range(10**9))

    def guess() -> bytes:
        return b"guess-%d" % next(counter)

    async def real_alice() -> None:
        limit = int(ctx.opts.attack_seconds / REAL_LOGIN_EVERY_S) + 1
        for _ in range(limit):
            await record_login(real, ctx.client, ALICE, OTHER_HOST)
            await trio.sleep(REAL_LOGIN_EVERY_S)

    start = trio.current_time()
    with ctx.working():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(real_alice)
            for _ in range(ctx.opts.guess_conns):
                nursery.start_soon(tally.attempts, ctx, ALICE, guess)
    seconds = trio.current_time() - start
    wrong = tally.answers["not-authorized"]
    other = tally.answers.total() - wrong
    ctx.figures.update(
        tally.figures(seconds),
        not_authorized=wrong,
        other_answers=other,
        real_alice_logins=real,
    )
    return (
        f"real alice from {OTHER_HOST}: {login_text(real)}; guesses answered "
        f"not-authorized {wrong}, otherwise {other}; {tally.text(seconds)}"
    )


Attack = Callable[[AttackContext], Awaitable[str]]
ATTACKS: Final[dict[str, Attack]] = {
    "parser": attack_parser,
    "slow_reader": attack_slow_reader,
    "offline_flood": attack_offline_flood,
    "websocket_reject": attack_websocket_reject,
    "mass_timeout": attack_mass_timeout,
    "plain_password": attack_plain_password,
    "guessing": attack_guessing,
}


def attack_title(name: str, opts: argparse.Namespace) -> str:
    what = {
        "parser": f"{opts.parser_conns} connections x {opts.parser_children:,} <a/>",
        "slow_reader": f"messages of {opts.slow_message_bytes:,} bytes to a reader that stalls",
        "offline_flood": f"messages of {opts.flood_message_bytes:,} bytes to an offline account",
        "websocket_reject": f"{opts.ws_conns} upgrades without the xmpp subprotocol",
        "mass_timeout": f"{opts.timeout_conns} idle connections, negotiation_timeout "
        f"{opts.negotiation_timeout:g} s",
        "plain_password": f"{opts.plain_conns} connections, PLAIN with "
        f"{opts.plain_password_bytes:,}-byte passwords",
        "guessing": f"{opts.guess_conns} connections guessing alice's password",
    }[name]
    return f"{name}: {what}"


# --- one attack from start to stop ------------------------------------------------------------


@dataclass
class Env:
    """The run: options, the gateway runner, the work directory, spawned processes."""

    opts: argparse.Namespace
    runner: bench_restart.Runner
    report: bench.Reporter
    processes: list[trio.Process] = field(default_factory=list)

    @property
    def work(self) -> Path:
        return self.runner.work

    def kill_all(self) -> None:
        """Kill every child process of the run still running, on any exit path.

        Runs after trio.run, so it uses no trio.Process method: a child not reaped yet
        keeps its PID (no reuse), one that trio reaped raises ChildProcessError.
        """
        for process in [*self.runner.running, *self.processes]:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(process.pid, os.WNOHANG) == (0, 0):
                    os.kill(process.pid, signal.SIGKILL)
                    os.waitpid(process.pid, 0)


async def run_attack(env: Env, name: str) -> dict[str, object]:
    """Gateway start, legitimate traffic, quiet phase, attack, gap, stop; the figures."""
    opts, runner = env.opts, env.runner
    figures: dict[str, object] = {"attack": name}
    timeout = opts.negotiation_timeout if name == "mass_timeout" else None
    runner.config.write_text(gateway_config(opts, negotiation_timeout=timeout))
    negotiation_timeout = load_config(runner.config).general.negotiation_timeout
    longest = opts.attack_seconds + (negotiation_timeout + 10 if timeout else 0)
    limit_s = opts.quiet_seconds + longest + ATTACK_OVERRUN_S + opts.settle_seconds
    limit_s += opts.gap_seconds + WORKER_SLACK_S
    try:
        gateway = await runner.start()
    except bench_restart.RestartBenchError as exc:
        figures["error"] = str(exc)
        await runner.kill_leftovers()
        return figures
    legit: LegitTraffic | None = None
    try:
        legit = await LegitTraffic.start(env, opts.port, limit_s)
        others = OthersCpu([os.getpid(), gateway.pid, legit.process.pid])
        quiet_start = time.monotonic_ns()
        await trio.sleep(opts.quiet_seconds)
        others_quiet = others.share()
        monitor = RssMonitor(gateway, opts.rss_limit_mib * 1024)
        rss_before = monitor.sample()
        cpu_before = bench.read_cpu_seconds(gateway.pid)
        scope = trio.CancelScope(deadline=trio.current_time() + opts.attack_seconds)
        ctx = AttackContext(
            opts=opts,
            gateway=gateway,
            client=client_config(opts.port, sm=False),
            database=runner.work / "data" / "gateway.sqlite",
            negotiation_timeout=negotiation_timeout,
            scope=scope,
        )
        attack_start = time.monotonic_ns()
        outcome = "overran its time and was cut (figures partial)"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(monitor.run, scope, int((longest + ATTACK_OVERRUN_S) / RSS_EVERY_S))
            with trio.move_on_after(longest + ATTACK_OVERRUN_S):
                try:
                    outcome = await ATTACKS[name](ctx)
                except* SESSION_ERRORS as group:
                    failures = "; ".join(describe(exc) for exc in group.exceptions)
                    outcome = f"the attack itself failed: {failures} (figures partial)"
            nursery.cancel_scope.cancel()
        cpu_after = bench.read_cpu_seconds(gateway.pid)
        others_attack = others.share()
        attack_end = ctx.work_ended_ns or time.monotonic_ns()
        alive = gateway.process.poll() is None
        rss_after, settle_s = await monitor.settle(opts.settle_seconds) if alive else (None, 0.0)
        await trio.sleep(max(0.0, opts.gap_seconds - settle_s))
        gap_end = time.monotonic_ns()
        results = await legit.finish()
        exited = gateway.process.poll()
        if monitor.exit_status is not None:
            figures["gateway_died"] = f"exited with status {monitor.exit_status} during the attack"
        elif exited is not None:
            figures["gateway_died"] = f"exited with status {exited} after the attack"
        pings = results.get("pings")
        pings = pings if isinstance(pings, list) else []
        phases = {
            "quiet": Phase.of(pings, quiet_start, attack_start),
            "attack": Phase.of(pings, attack_start, attack_end),
            "after": Phase.of(pings, attack_end, gap_end),
        }
        figures.update(
            outcome=outcome,
            details=ctx.figures,
            cut_short=monitor.cut_short or None,
            legit={key: phase.figures() for key, phase in phases.items()},
            lost=sum(phase.lost for phase in phases.values()),
            legit_errors=results.get("errors", ["no results from the legitimate clients"]),
            legit_send_lag_max_ms=results.get("lag_max_ms"),
            legit_setup=f"XEP-0198 {'on' if legit.sm else 'OFF'}, nice {legit.nice}",
            rss_kib={
                "before": rss_before,
                "peak": monitor.peak,
                "after": rss_after,
                "settle_s": settle_s,
            },
            gateway_cpu_s=(
                None
                if cpu_before is None or cpu_after is None
                else round(cpu_after - cpu_before, 2)
            ),
            others_cpu_pct={"quiet": others_quiet, "attack": others_attack},
        )
    except AttackBenchError as exc:
        figures["error"] = str(exc)
    finally:
        with trio.CancelScope(shield=True):
            if legit is not None and legit.process.poll() is None:
                legit.process.kill()
            status = gateway.process.poll()
            if status is None:
                stop = await runner.stop(gateway)
                status = stop.returncode
                figures["stop"] = "exited" if stop.exit_at is not None else "killed (no exit)"
            else:
                figures["stop"] = "had exited before the stop"
            figures["exit_status"] = status
    log = GatewayLog.read(gateway.log.path)
    if figures.get("gateway_died") or figures["exit_status"] not in (0, None):
        figures["gateway_crash"] = log.crash()
    figures["gateway_log"] = {
        "connection_closed": dict(log.closed),
        "problems": dict(log.problems),
        "emfile_lines": log.emfile,
    }
    return figures


def section_rows(figures: dict[str, object]) -> list[tuple[str, str]]:
    """The `name value` lines of one attack's section."""
    rows: list[tuple[str, str]] = []
    if "error" in figures:
        rows.append(("error", str(figures["error"])))
    legit = figures.get("legit")
    if isinstance(legit, dict):
        for key in ("quiet", "attack", "after"):
            phase = legit[key]
            rows.append(
                (
                    f"{key} round trip",
                    f"p50 {ms(phase['p50_ms'])} ms, p99 {ms(phase['p99_ms'])} ms, max "
                    f"{ms(phase['max_ms'])} ms ({phase['messages']} messages, "
                    f"{phase['lost']} lost)",
                )
            )
        rows.append(
            ("messages lost", f"{figures['lost']} (no reply {DRAIN_S:g} s after alice stopped)")
        )
        errors = figures.get("legit_errors")
        errors = errors if isinstance(errors, list) else []
        problems = "; ".join(map(str, errors)) or "no errors"
        rows.append(("legit clients", f"{problems} ({figures.get('legit_setup')})"))
        rows.append(
            ("alice's sends late", f"by {ms(figures.get('legit_send_lag_max_ms'))} ms at most")
        )
    rss = figures.get("rss_kib")
    if isinstance(rss, dict):
        rows.append(("rss before", mib(rss["before"])))
        rows.append(("rss peak", mib(rss["peak"])))
        rows.append(("rss after", f"{mib(rss['after'])} (settled in {rss['settle_s']} s)"))
        cpu = figures.get("gateway_cpu_s")
        rows.append(("gateway cpu", f"{'n/a' if cpu is None else cpu} s during the attack"))
        others = figures.get("others_cpu_pct")
        if isinstance(others, dict):
            rows.append(
                (
                    "other processes",
                    f"{others['quiet']:.0f}% of a CPU while quiet, {others['attack']:.0f}% "
                    "during the attack (not ours: another load on this machine)",
                )
            )
    if figures.get("gateway_died"):
        rows.append(("GATEWAY DIED", str(figures["gateway_died"])))
    if figures.get("gateway_crash"):
        rows.append(("gateway traceback", str(figures["gateway_crash"])))
    if figures.get("cut_short"):
        rows.append(("cut short", str(figures["cut_short"])))
    if "outcome" in figures:
        rows.append(("outcome", str(figures["outcome"])))
    log = figures.get("gateway_log")
    if isinstance(log, dict):
        rows.append(("connections closed", tally_text(Counter(log["connection_closed"]), 6)))
        rows.append(("log warnings/errors", tally_text(Counter(log["problems"]), 6)))
    if "stop" in figures:
        rows.append(("gateway stop", f"{figures['stop']}, status {figures.get('exit_status')}"))
    return rows


def print_section(report: bench.Reporter, title: str, rows: list[tuple[str, str]]) -> None:
    report.line(f"== {title}")
    width = max((len(name) for name, _ in rows), default=0)
    for name, value in rows:
        report.line(f"  {name:<{width}}  {value}")


def summary_rows(results: list[dict[str, object]]) -> list[list[str]]:
    rows = [["attack", "quiet p50/p99 ms", "attack p99 ms", "lost", "RSS MiB before/peak/after"]]
    for figures in results:
        legit, rss = figures.get("legit"), figures.get("rss_kib")
        if not isinstance(legit, dict) or not isinstance(rss, dict):
            rows.append([str(figures["attack"]), "-", "-", "-", "-", str(figures.get("error"))])
            continue
        quiet, attack = legit["quiet"], legit["attack"]
        memory = "/".join(
            "n/a" if rss[k] is None else f"{rss[k] / 1024:.0f}" for k in ("before", "peak", "after")
        )
        headline = str(figures.get("outcome", "")).split(";")[0]
        if figures.get("cut_short"):
            headline = f"CUT SHORT: {figures['cut_short']}; {headline}"
        elif figures.get("gateway_died"):
            headline = f"GATEWAY DIED: {figures['gateway_died']}; {headline}"
        rows.append(
            [
                str(figures["attack"]),
                f"{ms(quiet['p50_ms'])}/{ms(quiet['p99_ms'])}",
                ms(attack["p99_ms"]),
                str(figures["lost"]),
                memory,
                headline,
            ]
        )
    rows[0].append("outcome")
    return rows


def print_table(report: bench.Reporter, rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        report.line("  ".join([*cells, row[-1]]).rstrip())


async def run_all(env: Env) -> list[dict[str, object]]:
    """Every selected attack in turn (SIGINT, SIGTERM, SIGHUP end the run early: the
    attack under way is cancelled, its gateway stopped, the results so far reported)."""
    results: list[dict[str, object]] = []

    async def watch_signals(scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                env.report.figures["interrupted"] = signal.Signals(signum).name
                scope.cancel()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals, nursery.cancel_scope)
        for name in env.opts.attacks:
            figures = await run_attack(env, name)
            results.append(figures)
            print_section(env.report, attack_title(name, env.opts), section_rows(figures))
        nursery.cancel_scope.cancel()
    return results


# --- command line -----------------------------------------------------------------------------


def positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench_attacks.py",
        description="Run attacks against a gateway of its own and report how a legitimate "
        "client's round trips, lost messages and the gateway's RSS fare.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    add = parser.add_argument
    add("--attacks", default=",".join(ATTACKS), help="comma-separated attacks (all)")
    add("--quiet-seconds", type=positive(float), default=5.0, help="quiet phase (5)")
    add("--attack-seconds", type=positive(float), default=10.0, help="each attack (10)")
    add("--gap-seconds", type=float, default=2.0, help="after each attack, at least (2)")
    add("--settle-seconds", type=float, default=3.0, help="most wait for the RSS to settle (3)")
    add("--interval-ms", type=positive(float), default=20.0, help="alice's message interval (20)")
    add("--parser-conns", type=positive(int), default=100, help="parser: connections (100)")
    add("--parser-children", type=positive(int), default=65000, help="parser: <a/> (65000)")
    add("--slow-message-bytes", type=positive(int), default=240_000, help="(240000)")
    add("--flood-message-bytes", type=positive(int), default=256_000, help="(256000)")
    add("--ws-conns", type=positive(int), default=200, help="websocket_reject: upgrades (200)")
    add("--timeout-conns", type=positive(int), default=3000, help="mass_timeout: idle (3000)")
    add(
        "--negotiation-timeout",
        type=positive(float),
        default=8.0,
        help="mass_timeout: general.negotiation_timeout (8)",
    )
    add("--plain-conns", type=positive(int), default=20, help="plain_password: conns (20)")
    add("--plain-password-bytes", type=positive(int), default=190_000, help="(190000)")
    add("--guess-conns", type=positive(int), default=50, help="guessing: connections (50)")
    add(
        "--extra-general",
        default="",
        metavar="'KEY: VALUE, ...'",
        help="appended inside the config's general: {...} mapping (new limits)",
    )
    add("--rss-limit-mib", type=positive(int), default=3072, help="cut an attack above (3072)")
    add("--gateway-nofile", type=int, default=0, help="the gateway's RLIMIT_NOFILE (inherit)")
    add(
        "--gateway",
        default=DEFAULT_GATEWAY,
        help="the xmpp-gateway executable (.venv/bin/xmpp-gateway)",
    )
    add("--no-pin", action="store_true", help="do not pin gateway/bench to CPU 0/1")
    add("--keep", action="store_true", help="keep the work directory (configs, logs, database)")
    add("--json", metavar="FILE", help="also write the figures to FILE")
    # The legitimate clients' process (this script, started by itself).
    add("--legit-worker", action="store_true", help=argparse.SUPPRESS)
    add("--port", type=int, default=0, help=argparse.SUPPRESS)
    add("--worker-limit", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.attacks = [name.strip() for name in args.attacks.split(",") if name.strip()]
    unknown = [name for name in args.attacks if name not in ATTACKS]
    if unknown or not args.attacks:
        parser.error(f"--attacks: unknown {unknown}; choose from {', '.join(ATTACKS)}")
    if "\n" in args.extra_general or "}" in args.extra_general:
        parser.error("--extra-general: one line of 'key: value' pairs, no braces")
    # bench_restart.Runner reads these: the log stall / stop slack, and the drain time.
    args.timeout = GATEWAY_WAIT_S
    args.grace = 0.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.legit_worker:
        return trio.run(legit_worker, opts)
    report = bench.Reporter(as_json=False)
    opts.port, opts.ws_port = bench_restart.free_port(), bench_restart.free_port()
    work = Path(tempfile.mkdtemp(prefix="bench-attacks."))
    runner = bench_restart.Runner(opts, work)
    pinned = bool(runner.pin)  # taskset -c 0 (Runner's rule), before any other prefix
    if opts.gateway_nofile > 0:
        runner.pin += ["prlimit", f"--nofile={opts.gateway_nofile}", "--"]
    env = Env(opts, runner, report)
    started = time.perf_counter()
    results: list[dict[str, object]] = []
    status = 1
    try:
        prepare(opts, runner)
        if pinned:
            os.sched_setaffinity(0, {1})  # the gateway gets CPU 0 through taskset
        report.line(
            f"bench_attacks: xmpp-gateway {__version__} on {HOST}:{opts.port} (starttls) and "
            f"ws://{HOST}:{opts.ws_port}{WS_PATH}; attacks {', '.join(opts.attacks)}; quiet "
            f"{opts.quiet_seconds:g} s, attack {opts.attack_seconds:g} s, gap "
            f"{opts.gap_seconds:g} s; alice -> bob -> alice every {opts.interval_ms:g} ms; "
            + ("gateway on CPU 0, clients on CPU 1" if pinned else "unpinned")
            + (f"; gateway RLIMIT_NOFILE {opts.gateway_nofile}" if opts.gateway_nofile else "")
            + (f"; general += {{{opts.extra_general}}}" if opts.extra_general else "")
            + ("" if opts.gateway == DEFAULT_GATEWAY else f"; gateway {opts.gateway}")
        )
        results = trio.run(run_all, env)
        status = 0
    except AttackBenchError as exc:
        report.line(f"bench_attacks: {exc}")
        report.figures["error"] = str(exc)
    except KeyboardInterrupt:  # during the setup, before trio.run took over SIGINT
        report.figures["interrupted"] = "SIGINT"
    finally:
        try:
            env.kill_all()
        finally:
            if opts.keep:
                report.line(f"bench_attacks: work directory kept: {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
    if results:
        report.line("== summary")
        print_table(report, summary_rows(results))
    total = round(time.perf_counter() - started, 1)
    report.line(f"bench_attacks: {len(results)} attacks in {total} s")
    if "interrupted" in report.figures:
        report.line(f"bench_attacks: interrupted by {report.figures['interrupted']}")
        status = 1
    if opts.json:
        report.figures.update(
            label=f"xmpp-gateway {__version__}",
            attacks=results,
            total_seconds=total,
            extra_general=opts.extra_general,
            gateway=opts.gateway,
            pinned=pinned,
            gateway_nofile=opts.gateway_nofile or None,
        )
        Path(opts.json).write_text(json.dumps(report.figures, indent=1, sort_keys=True) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
