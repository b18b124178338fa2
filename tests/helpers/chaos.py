"""Seeded chaos clients and their ledger, shared by the single-node chaos test (in virtual
time, memory streams) and its cluster mode (real processes, TCP, real time).

`ChaosClient` is one resource that implements both halves of XEP-0198 honestly: it
counts what it handled (its h) and answers `<r/>`, keeps what it sent until the server
acks it, resumes with its h and resends what the server's h says was not handled, and
when resumption fails it learns the old session's h from `<failed h/>` (stale_h on) and
sends the unhandled messages again in a fresh session, after its initial presence (which
flushes offline storage). It reaches the gateway through a `Dial`, which also names the
node the connection went to, so the client knows where its SM session lives.

`World` holds the clients and the `Ledger` of everything sent, delivered and bounced;
`run_chaos` is one client's random walk (messages, syncs, transport cuts), `drain` brings
everyone back until nothing moves, and `tally` checks the ledger: every message
delivered to its addressee (possibly via offline storage) or bounced to its sender, and
duplicates honest: never two deliveries within one SM session (resumption with h must
not resend what was handled), and never a delivery after one the server provably had the
ack for (the client sent `<a h/>` and then saw the answer to a later iq on that stream).
Messages a client sent again without knowing whether the server had handled them are
exempt (`Ledger.ambiguous`), as are those resent after `<failed h/>` for a session whose
node was killed (`Ledger.resent_after_kill`: that h is the one the node last mirrored
into Redis, a lower bound of what it had handled).

A transport the server ends is counted by cause as far as the client can tell
(`transport_lost_after_<stream error>`, `..._node_killed`, `..._unprovoked`), and
`Ledger.trace` keeps each client's story (sent, got, connections, resumptions) so a
failure can be reproduced from it.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import trio
import trio.testing

from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from tests.helpers.accounts import PASSWORD
from tests.helpers.client import RawClient, StreamEnd

USERS: Final = tuple(f"u{i}" for i in range(8))
GHOST: Final = "ghost"  # no such account: messages to it bounce
LOST: Final = (StreamEnd, trio.BrokenResourceError, trio.ClosedResourceError)

Dial = Callable[[random.Random], Awaitable[tuple[RawClient, str]]]
"""`await dial(rng)`: a new connection to the gateway (a node picked with `rng`, when
there are several) and the name of the node it reached."""


@dataclass(frozen=True)
class Timing:
    """Seconds (virtual under `autojump_clock`, real against subprocesses)."""

    resume_timeout: float  # the server's; `away` cuts stay away longer than this
    away_extra: tuple[float, float] = (1, 10)  # how much longer
    clean_stay: float = 5  # at most this long away after a clean close
    burst_gap: float = 0.3  # at most this between the messages of one burst
    think_mean: float = 2  # mean pause between two actions
    negotiate: float = 30  # a (re)connection's deadline
    enabled_wait: float = 10  # for <enabled/>
    retry_pause: float = 1  # between two failed connection attempts
    close_wait: float = 30  # for the server's stream end after ours
    bury_wait: float = 1  # reading an abandoned transport
    leave_wait: float = 10  # for the server's stream end at the very end
    quiet: float = 15  # nothing moved for this long: settled
    drain_rounds: int = 8


@dataclass
class Delivery:
    client: str
    session: int  # the client's SM session serial (sessions start at 1)
    index: int  # the client's h when it handled this stanza (0: before <enabled/>)
    offline: bool  # carried a XEP-0203 delay from offline storage


@dataclass
class Outgoing:
    seq: int  # the client's count of stanzas sent in this SM session
    xml: str
    msg_id: str | None


@dataclass(frozen=True)
class Kill:
    """A node killed (SIGKILL) during the chaos, and what its clients had there."""

    node: str
    at: float  # trio.current_time() of the kill
    held: dict[str, str]  # client -> its session there: connected, parked or moving
    users: frozenset[str]  # their accounts
    connected: int  # transports that were open to the node


@dataclass
class Ledger:
    sent: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (sender, to user)
    sent_at: dict[str, float] = field(default_factory=dict)  # id -> first sent
    deliveries: dict[tuple[str, str], list[Delivery]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )
    bounces: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))
    # ids a client sent again without knowing whether the server had handled them
    ambiguous: set[str] = field(default_factory=set)
    # ids sent again after <failed h/> for a session on a killed node (h: a lower bound)
    resent_after_kill: set[str] = field(default_factory=set)
    # SM session serial -> the highest h of that client the server provably received
    confirmed: dict[int, int] = field(default_factory=lambda: collections.defaultdict(int))
    events: collections.Counter[str] = field(default_factory=collections.Counter)
    kills: list[Kill] = field(default_factory=list)
    down: set[str] = field(default_factory=set)  # nodes killed and not restarted yet
    # (time, client, what happened): the clients' story, for reproducing a failure
    trace: list[tuple[float, str, str]] = field(default_factory=list)
    serials: int = 0
    progress: trio.Event = field(default_factory=trio.Event)

    def new_serial(self) -> int:
        self.serials += 1
        return self.serials

    def confirm(self, serial: int, h: int) -> None:
        self.confirmed[serial] = max(self.confirmed[serial], h)

    def moved(self) -> None:
        self.progress.set()
        self.progress = trio.Event()

    def note(self, client: str, what: str) -> None:
        self.trace.append((trio.current_time(), client, what))

    def story(self, words: set[str], start: float = 0.0, *, every: bool = False) -> list[str]:
        """The trace lines that name any of `words` (clients, message ids, nodes), or
        `every` line; times from `start`."""
        return [
            f"{at - start:8.3f} {client:6} {what}"
            for at, client, what in self.trace
            if every or client in words or words & set(what.split())
        ]


class ChaosClient:
    """One resource: both halves of XEP-0198 (see module docstring)."""

    def __init__(
        self,
        user: str,
        resource: str,
        priority: int,
        dial: Dial,
        ledger: Ledger,
        rng: random.Random,
        nursery: trio.Nursery,
        timing: Timing,
    ) -> None:
        self.user, self.resource, self.priority = user, resource, priority
        self.name = f"{user}/{resource}"
        self.dial = dial
        self.ledger = ledger
        self.rng = rng
        self.nursery = nursery
        self.timing = timing
        self.conn: RawClient | None = None
        self.where: str | None = None  # the node of `conn`
        self.closing = False  # we sent </stream:stream> on `conn`
        self.stream_error: str | None = None  # the server's on `conn`
        self.reader_scope: trio.CancelScope | None = None
        self.reader_done = trio.Event()
        self.lock = trio.Lock()
        self.abandoned: list[RawClient] = []
        self.pings = 0
        self.pending_pings: dict[str, tuple[int, int]] = {}
        # <r/> sent and <a/> received on the current stream; the server answers them in
        # order, so the answer to an <r/> written after our <a h/> proves it read that h.
        self.requests = self.answers = 0
        self.pending_acks: list[tuple[int, int, int]] = []  # (answers needed, serial, h)
        # The SM session (survives transports while resumable).
        self.smid: str | None = None
        self.serial = 0
        self.active = False  # <enabled/> or <resumed/> seen on the current stream
        self.enabled = trio.Event()
        self.h_in = 0
        self.out_seq = 0
        self.out_queue: collections.deque[Outgoing] = collections.deque()
        self.unhandled: list[Outgoing] = []  # messages to send again in the next session
        # Where the session lives: the node it was bound or last resumed on; and the node
        # a <resume/> is waiting on (the session may be moving there).
        self.session_where: str | None = None
        self.resuming_at: str | None = None
        # The node holding the session was killed ("held"), or the one a resumption was
        # waiting on ("moving": the session may have been moving there, or not).
        self.session_killed: str | None = None

    def holds_session_on(self, node: str) -> str | None:
        """Whether this client's session is on `node` right now ("held"), or may be
        moving there or away from there (a resumption is under way: "moving"), or
        neither (None)."""
        if self.resuming_at is not None and node in (self.resuming_at, self.session_where):
            return "moving"
        if self.session_where == node and (self.smid is not None or self.conn is not None):
            return "held"
        return None

    # -- the outgoing half ----------

    async def _write(self, xml: str) -> None:
        conn = self.conn
        if conn is None:
            return
        try:
            async with self.lock:
                await conn.send(xml)
        except LOST:
            pass  # the reader notices; what was counted stays in out_queue

    async def send_counted(self, xml: str, msg_id: str | None = None) -> None:
        self.out_seq += 1
        self.out_queue.append(Outgoing(self.out_seq, xml, msg_id))
        await self._write(xml)

    def _acked(self, h: int) -> None:
        while self.out_queue and self.out_queue[0].seq <= h:
            self.out_queue.popleft()

    def _session_over(self, h: int | None) -> None:
        """The SM session is gone; `h` is its server h when known (<failed h/>)."""
        if h is None:
            self.ledger.events["failed_without_h"] += 1
            for item in self.out_queue:
                if item.msg_id is not None:
                    self.ledger.ambiguous.add(item.msg_id)
        else:
            if h > self.out_seq:
                self.ledger.events["failed_h_beyond_sent"] += 1
            self._acked(h)
            self.ledger.note(self.name, f"session over at h {h}")
            if self.session_killed:
                # The h its node last mirrored: it may have handled more of these.
                self.ledger.resent_after_kill.update(
                    item.msg_id for item in self.out_queue if item.msg_id is not None
                )
        self.unhandled.extend(item for item in self.out_queue if item.msg_id is not None)
        if self.unhandled:
            resend = " ".join(str(item.msg_id) for item in self.unhandled)
            self.ledger.note(self.name, f"to send again: {resend}")
        self.out_queue.clear()
        self.smid = None
        self.active = False
        self.session_where = None

    async def send_message(self, to: str, msg_id: str) -> None:
        xml = f"<message to='{to}' type='chat' id='{msg_id}'><body>{msg_id}</body></message>"
        self.ledger.note(self.name, f"send {msg_id} to {to} seq {self.out_seq + 1}")
        await self.send_counted(xml, msg_id)

    async def ack_and_request(self) -> None:
        """`<a h/><r/>`: the answer to that `<r/>` confirms the server read our h."""
        self.requests += 1
        self.pending_acks.append((self.requests, self.serial, self.h_in))
        await self._write(f"<a xmlns='{ns.SM}' h='{self.h_in}'/><r xmlns='{ns.SM}'/>")

    async def sync(self) -> None:
        """`<a h/>`, a ping (its answer proves the server read that ack), then `<r/>`."""
        conn = self.conn
        if conn is None or not self.active:
            return
        self.pings += 1
        ping_id = f"sync-{self.name}-{self.pings}"
        self.pending_pings[ping_id] = (self.serial, self.h_in)
        await self._write(f"<a xmlns='{ns.SM}' h='{self.h_in}'/>")
        await self.send_counted(
            f"<iq type='get' id='{ping_id}' to='localhost'><ping xmlns='{ns.PING}'/></iq>"
        )
        self.requests += 1
        await self._write(f"<r xmlns='{ns.SM}'/>")

    # -- the incoming half ----------

    async def _read(self, conn: RawClient, *, task_status: trio.TaskStatus[None]) -> None:
        done = self.reader_done = trio.Event()
        with trio.CancelScope() as scope:
            self.reader_scope = scope
            task_status.started()
            try:
                while True:
                    element = await conn.receive()
                    if scope.cancel_called:
                        # Detached (a cut) while this read completed: what is left on
                        # that transport is never handled, so never counted in h.
                        self.ledger.events["read_after_cut_dropped"] += 1
                        break
                    await self._on_element(element)
            except LOST:
                pass
        if self.conn is conn and not scope.cancel_called:
            self.conn = None
            if not self.closing:  # the server ended it: say why, as far as we can tell
                if self.stream_error is not None:
                    why = f"after_{self.stream_error}"
                elif self.where in self.ledger.down:
                    why = "node_killed"
                else:
                    why = "unprovoked"
                self.ledger.events[f"transport_lost_{why}"] += 1
                self.ledger.note(self.name, f"transport lost ({why}) on {self.where}")
        done.set()
        self.ledger.moved()

    async def _on_element(self, element: Element) -> None:
        self.ledger.moved()
        if element.namespace == ns.SM:
            if element.name == "r":
                self.ledger.note(self.name, f"r: answering h {self.h_in}")
                await self._write(f"<a xmlns='{ns.SM}' h='{self.h_in}'/>")
                self.ledger.note(self.name, f"r: answered h {self.h_in}")
            elif element.name == "a":
                self._acked(int(element.get("h") or 0))
                self.answers += 1
                for needed, serial, h in list(self.pending_acks):
                    if self.answers >= needed:
                        self.ledger.confirm(serial, h)
                        self.pending_acks.remove((needed, serial, h))
            elif element.name == "enabled":
                self.ledger.note(self.name, f"enabled session {self.serial} on {self.where}")
                self.smid = element.get("id")
                self.active = True
                self.enabled.set()
            else:
                self.ledger.events[f"unexpected_sm_{element.name}"] += 1
            return
        if element.namespace == ns.STREAM and element.name == "error":
            condition = next(c.name for c in element.elements())
            self.ledger.events[f"stream_error_{condition}"] += 1
            self.stream_error = condition
            self.ledger.note(self.name, f"stream error {condition} on {self.where}")
            return
        if element.namespace != ns.CLIENT:
            return
        if self.active:
            self.h_in += 1
        stanza_id = element.get("id") or ""
        if element.name == "message":
            if element.get("type") == "error":
                self.ledger.bounces[stanza_id].append(self.name)
            elif stanza_id in self.ledger.sent:
                offline = element.find(ns.DELAY, "delay") is not None
                self.ledger.note(
                    self.name,
                    f"got {stanza_id} session {self.serial} h {self.h_in if self.active else 0}"
                    f" on {self.where}{' (offline)' if offline else ''}",
                )
                self.ledger.deliveries[(self.user, stanza_id)].append(
                    Delivery(self.name, self.serial, self.h_in if self.active else 0, offline)
                )
        elif element.name == "iq" and stanza_id in self.pending_pings:
            serial, h = self.pending_pings.pop(stanza_id)
            self.ledger.confirm(serial, h)

    # -- transports ----------

    async def connect(self) -> bool:
        """Resume, or log in fresh; False when the transport failed on the way."""
        conn, where = await self.dial(self.rng)
        self.closing, self.stream_error = False, None
        try:
            with trio.fail_after(self.timing.negotiate):
                return await self._negotiate(conn, where)
        except LOST:
            self.ledger.events["connect_failed"] += 1
            self.ledger.note(self.name, f"connection to {where} failed")
            self._detach()
            if self.smid is None:
                self.session_where = None  # bound at most: that session ends with it
            await trio.aclose_forcefully(conn.stream)
            return False
        finally:
            self.resuming_at = None

    async def _negotiate(self, conn: RawClient, where: str) -> bool:
        await conn.open()
        result = await conn.auth(self.user, PASSWORD, "PLAIN")
        assert result.name == "success", result
        conn.parser.reset()
        await conn.open()
        self.requests = self.answers = 0
        self.pending_acks.clear()
        if self.smid is not None:
            self.resuming_at = where
            self.ledger.note(self.name, f"resume on {where} h {self.h_in}")
            await conn.send(f"<resume xmlns='{ns.SM}' previd='{self.smid}' h='{self.h_in}'/>")
            answer = await conn.receive()
            if answer.tag == (ns.SM, "resumed"):
                self.ledger.events["resumed"] += 1
                self.ledger.note(self.name, f"resumed on {where} h {answer.get('h')}")
                if where != self.session_where:
                    self.ledger.events["resumed_on_another_node"] += 1
                self.session_where, self.resuming_at = where, None
                if self.session_killed == "held":
                    self.ledger.events["resumed_a_killed_session"] += 1
                self.session_killed = None  # it lives on: nothing died with a node
                self.ledger.confirm(self.serial, self.h_in)
                self._acked(int(answer.get("h") or 0))
                self.conn, self.where = conn, where
                self.active = True
                await self.nursery.start(self._read, conn)
                for item in list(self.out_queue):  # XEP-0198 section 5: resend the rest
                    await self._write(item.xml)
                return True
            assert answer.tag == (ns.SM, "failed"), answer
            self.ledger.events["resume_failed"] += 1
            self.ledger.note(self.name, f"resume failed on {where} h {answer.get('h')}")
            if self.session_killed:
                self.ledger.events["resume_failed_node_killed"] += 1
            h = answer.get("h")
            self._session_over(int(h) if h is not None else None)
            self.resuming_at = None
        await conn.bind(self.resource)
        self.ledger.note(self.name, f"bound on {where}")
        self.session_where, self.session_killed = where, None
        self.serial = self.ledger.new_serial()
        self.h_in = 0
        self.out_seq = 0
        self.active = False
        self.enabled = trio.Event()
        self.conn, self.where = conn, where
        await self.nursery.start(self._read, conn)
        await self._write(f"<enable xmlns='{ns.SM}' resume='true'/>")
        with trio.move_on_after(self.timing.enabled_wait):
            await self.enabled.wait()
        if not self.enabled.is_set():
            return False  # the stream died before <enabled/>: try again
        self.ledger.events["fresh_sessions"] += 1
        await self.send_counted(f"<presence><priority>{self.priority}</priority></presence>")
        resend, self.unhandled = self.unhandled, []
        for item in resend:
            await self.send_counted(item.xml, item.msg_id)
        return True

    def _detach(self) -> RawClient | None:
        conn, self.conn = self.conn, None
        if self.reader_scope is not None:
            self.reader_scope.cancel()
        self.active = False
        return conn

    async def reconnect(self) -> None:
        for _ in range(10):
            if self.conn is not None:
                return
            if await self.connect():
                await self.bury()
                return
            await trio.sleep(self.timing.retry_pause)
        raise AssertionError(f"{self.name} could not reconnect")

    async def cut(self, how: str) -> float:
        """Lose the transport; returns how long to stay away."""
        timing = self.timing
        self.ledger.events[f"cut_{how}"] += 1
        self.ledger.note(self.name, f"cut {how} on {self.where}")
        if how == "clean":
            conn = self.conn
            assert conn is not None
            await self.ack_and_request()
            self.closing = True
            await self._write("</stream:stream>")
            with trio.move_on_after(timing.close_wait):
                await self.reader_done.wait()
            self._detach()
            await trio.aclose_forcefully(conn.stream)
            if not self.out_queue:
                self._session_over(self.out_seq)
            # else: keep the SM id; <resume/> answers <failed h/> with the server's h
            return self.rng.uniform(0, timing.clean_stay)
        conn = self._detach()
        assert conn is not None
        if how == "silent":
            self.abandoned.append(conn)
        else:
            await trio.aclose_forcefully(conn.stream)
        if how == "away":
            return timing.resume_timeout + self.rng.uniform(*timing.away_extra)
        return self.rng.uniform(0, timing.resume_timeout * 0.8)

    async def bury(self) -> None:
        """Close the transports left silent; note how the server let go of each."""
        for conn in self.abandoned:
            data, how = b"", "still_open"
            with trio.move_on_after(self.timing.bury_wait):
                try:
                    while chunk := await conn.stream.receive_some(65536):
                        data += chunk
                except trio.BrokenResourceError:
                    how = "reset"  # (TCP) its node was killed
                else:
                    # Closed without a word: the server gave up on its own (ack_timeout).
                    how = "ack_timeout"
                    if b"<conflict " in data:
                        how = "conflict"  # a resumption found it still attached
                    elif b"stream:error" in data or b"streams:error" in data:
                        how = "stream_error"
            self.ledger.events[f"silent_then_{how}"] += 1
            await trio.aclose_forcefully(conn.stream)
        self.abandoned.clear()

    async def leave(self) -> None:
        """`</stream:stream>` at the very end, so no session outlives the test's gateway."""
        conn = self.conn
        if conn is None:
            return
        self.closing = True
        await self._write("</stream:stream>")
        with trio.move_on_after(self.timing.leave_wait):
            await self.reader_done.wait()
        self._detach()
        await trio.aclose_forcefully(conn.stream)


@dataclass
class World:
    clients: list[ChaosClient]
    ledger: Ledger
    rng: random.Random
    timing: Timing
    next_id: int = 0

    def addressee(self, sender: ChaosClient) -> tuple[str, str]:
        """(address, user) of a random other account: bare, full, or a ghost."""
        roll = self.rng.random()
        if roll < 0.03:
            return f"{GHOST}@localhost", GHOST
        user = self.rng.choice([u for u in USERS if u != sender.user])
        if roll < 0.5:
            return f"{user}@localhost", user
        # A full JID; r2 never exists, so it is handled as the bare JID (RFC 6121 8.5.3.2.1).
        return f"{user}@localhost/r{self.rng.randrange(3)}", user

    def new_id(self, sender: ChaosClient, to_user: str) -> str:
        self.next_id += 1
        msg_id = f"m{self.next_id}"
        self.ledger.sent[msg_id] = (sender.name, to_user)
        self.ledger.sent_at[msg_id] = trio.current_time()
        return msg_id


def make_clients(
    dial: Dial, ledger: Ledger, rng: random.Random, nursery: trio.Nursery, timing: Timing
) -> list[ChaosClient]:
    """Every account with one or two resources (r0 priority 1, r1 priority 0: a bare JID
    reaches one resource), each with its own rng seeded from `rng`."""
    return [
        ChaosClient(
            user, f"r{r}", 1 - r, dial, ledger, random.Random(rng.random()), nursery, timing
        )
        for user in USERS
        for r in range(rng.choice((1, 2)))
    ]


async def run_chaos(world: World, client: ChaosClient, until: float) -> None:
    """One client's random walk until `until`: bursts of messages, syncs, cuts."""
    rng, timing = client.rng, world.timing
    while trio.current_time() < until:
        if client.conn is None:
            await client.reconnect()
        roll = rng.random()
        if roll < 0.72:
            for _ in range(rng.randint(1, 4)):
                address, user = world.addressee(client)
                await client.send_message(address, world.new_id(client, user))
                await trio.sleep(rng.uniform(0, timing.burst_gap))
        elif roll < 0.80:
            await client.sync()
        else:
            how = rng.choice(("reset", "reset", "silent", "silent", "clean", "away"))
            if client.conn is not None:
                await trio.sleep(await client.cut(how))
        await trio.sleep(rng.expovariate(1 / timing.think_mean))


async def drain(world: World) -> str:
    """Everyone comes back, gets its acks, and reads until nothing moves for a while;
    "" when settled, else what is still open."""
    clients, ledger, quiet = world.clients, world.ledger, world.timing.quiet
    for _ in range(world.timing.drain_rounds):
        for client in clients:
            if client.conn is None:
                await client.reconnect()
            await client.bury()
            if client.out_queue:
                await client.ack_and_request()
        while True:
            with trio.move_on_after(quiet) as still:
                await ledger.progress.wait()
            if still.cancelled_caught:
                break
        for client in clients:
            await client.sync()
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(quiet):
            while any(c.pending_pings or c.out_queue for c in clients if c.conn is not None):
                await ledger.progress.wait()
        settled = all(
            c.conn is not None and not c.out_queue and not c.unhandled and not c.pending_pings
            for c in clients
        )
        if settled:
            return ""
        ledger.events["drain_rounds_extra"] += 1
    state = [
        (c.name, "online" if c.conn else "offline", len(c.out_queue), len(c.unhandled))
        for c in clients
        if c.conn is None or c.out_queue or c.unhandled or c.pending_pings
    ]
    return f"clients never settled (name, state, unacked, unsent): {state}"


@dataclass
class Tally:
    """The ledger checked (module docstring): what is wrong, and the counts."""

    counts: dict[str, int]
    missing: list[str]  # neither delivered nor bounced
    misdelivered: list[tuple[str, set[str]]]
    same_session_dups: list[tuple[str, list[Delivery]]]
    dups_after_ack: list[tuple[str, list[Delivery]]]


def tally(ledger: Ledger) -> Tally:
    """Account for every message sent (see the module docstring)."""
    missing: list[str] = []
    misdelivered: list[tuple[str, set[str]]] = []
    same_session_dups: list[tuple[str, list[Delivery]]] = []
    dups_after_ack: list[tuple[str, list[Delivery]]] = []
    delivered = via_offline = bounced = duplicates = 0
    exempt = ledger.ambiguous | ledger.resent_after_kill
    receivers: dict[str, set[str]] = collections.defaultdict(set)
    for user, msg_id in ledger.deliveries:
        receivers[msg_id].add(user)
    for msg_id, (sender, to_user) in ledger.sent.items():
        sender_user = sender.split("/")[0]
        got = ledger.deliveries.get((to_user, msg_id), [])
        bounce_users = {name.split("/")[0] for name in ledger.bounces.get(msg_id, [])}
        others = receivers[msg_id] - {to_user}
        if others:
            misdelivered.append((msg_id, others))
        if to_user == GHOST or not got:
            if sender_user in bounce_users:
                bounced += 1
            else:
                missing.append(msg_id)
            continue
        delivered += 1
        via_offline += any(d.offline for d in got)
        duplicates += len(got) - 1
        sessions = [d.session for d in got]
        if len(set(sessions)) != len(sessions) and msg_id not in exempt:
            same_session_dups.append((msg_id, got))
        for i, first in enumerate(got):
            acked = first.index > 0 and first.index <= ledger.confirmed[first.session]
            if acked and got[i + 1 :] and msg_id not in exempt:
                dups_after_ack.append((msg_id, got))
                break
    counts = {
        "sent": len(ledger.sent),
        "delivered": delivered,
        "via_offline": via_offline,
        "bounced": bounced,
        "duplicates": duplicates,
        "duplicates_before_ack": duplicates - len(dups_after_ack),
        "ambiguous_resends": len(ledger.ambiguous),
        **dict(ledger.events),
    }
    return Tally(counts, missing, misdelivered, same_session_dups, dups_after_ack)


def assert_honest(result: Tally, ledger: Ledger) -> None:
    """No misdelivery, no dishonest duplicate, every ghost message bounced."""
    assert not result.misdelivered, result.misdelivered[:10]
    assert not result.same_session_dups, (
        f"resent within one SM session: {result.same_session_dups[:5]}"
    )
    assert not result.dups_after_ack, f"delivered again after the ack: {result.dups_after_ack[:5]}"
    ghosts = sum(1 for _, to in ledger.sent.values() if to == GHOST)
    assert result.counts["bounced"] == ghosts, (result.counts["bounced"], ghosts)
