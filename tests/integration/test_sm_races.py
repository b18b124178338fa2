"""XEP-0198 resumption races, each driven into one chosen interleaving (STYLE C9, V3).

Every client here talks to the gateway over a trio memory stream (listener 2, no TLS) and
time is virtual (`autojump_clock`), so `trio.fail_after` turns a deadlock into a fast
failure. Interleavings are forced, never hoped for:

- `wait_all_tasks_blocked()` lets the gateway finish everything it can before the next
  step (the old transport is parked, a resume is fully answered, ...);
- `Peer.arrive` puts bytes straight into the server's end of a connection without a
  checkpoint, so several connections wake in the same scheduler tick ("at once"), and
  `Peer.cut` drops a connection within the current step;
- `ClaimHook` runs a callback in the very step a resume claims the parked session, after
  the claim and before the session task can run again, to place a stanza in that window.

Where a race is decided by trio's scheduler (two tasks woken in the same tick run in a
random order), the test asserts what must hold for every order, not which order won.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from gateway.core.connection import serve_connection
from gateway.core.context import ServerContext
from gateway.core.resume import Loan, ResumeRegistry, ResumeSlot, SlotState
from gateway.core.session import Session
from gateway.net.transport import PeerInfo, StreamTransport
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID
from gateway.xmpp.sm import MOD, SMState
from tests.helpers.accounts import PASSWORD
from tests.helpers.client import RawClient, condition_of, read_to_end
from tests.helpers.inprocess import GatewayFactory, local_session

PHONE = "bob@localhost/phone"
R = f"<r xmlns='{ns.SM}'/>"
DEADLINE = 60  # virtual seconds: a deadlock fails fast, real time is not involved


def _msg(to: str, body: str, *, id_: str | None = None) -> str:
    ident = f" id='{id_}'" if id_ else ""
    return f"<message to='{to}' type='chat'{ident}><body>{body}</body></message>"


def _ack(h: int) -> str:
    return f"<a xmlns='{ns.SM}' h='{h % MOD}'/>"


def _resume(smid: str, h: int) -> str:
    return f"<resume xmlns='{ns.SM}' previd='{smid}' h='{h % MOD}'/>"


def _body(element: Element) -> str | None:
    return element.find_text(ns.CLIENT, "body")


def _is_sm(element: Element, name: str) -> bool:
    return element.tag == (ns.SM, name)


# -- connections -----------------------------------------------------------------------------


@dataclass(eq=False)
class Peer:
    """A scripted client, its ends of the memory streams and the server's receiving end."""

    client: RawClient
    client_out: trio.testing.MemorySendStream
    client_in: trio.testing.MemoryReceiveStream
    server_in: trio.testing.MemoryReceiveStream

    def arrive(self, data: str) -> None:
        """Make `data` readable by the server now, without a checkpoint (see module doc)."""
        self.server_in.put_data(data.encode())

    def cut(self) -> None:
        """The network goes away under the client, in this step: no `</stream:stream>`;
        the server reads EOF and its writes fail."""
        self.client_out.close()
        self.client_in.close()


@dataclass(eq=False)
class Net:
    """Opens memory-stream connections to listener 2 (`tls: none`) of one gateway."""

    ctx: ServerContext
    nursery: trio.Nursery
    peers: list[Peer] = field(default_factory=list)

    async def connect(self) -> Peer:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        transport = StreamTransport(server_stream, PeerInfo("192.0.2.7", 40000 + len(self.peers)))
        self.nursery.start_soon(serve_connection, self.ctx, self.ctx.config.c2s[2], transport)
        client_out, client_in = client_stream.send_stream, client_stream.receive_stream
        server_in = server_stream.receive_stream
        assert isinstance(client_out, trio.testing.MemorySendStream)
        assert isinstance(client_in, trio.testing.MemoryReceiveStream)
        assert isinstance(server_in, trio.testing.MemoryReceiveStream)
        peer = Peer(RawClient(client_stream), client_out, client_in, server_in)
        self.peers.append(peer)
        return peer

    async def online(self, user: str, resource: str) -> Peer:
        """A bound, available resource (the presence it gets at login is read)."""
        peer = await self.connect()
        await peer.client.login(user, PASSWORD, resource=resource)
        await peer.client.send("<presence/>")
        await trio.testing.wait_all_tasks_blocked()
        pending = await _sync(peer.client)
        assert pending and all(e.name == "presence" for e in pending), pending
        return peer

    async def resumable(self, user: str = "bob", resource: str = "phone") -> tuple[Peer, str]:
        """An available resource with resumable stream management enabled; its SM id."""
        peer = await self.online(user, resource)
        await peer.client.send(f"<enable xmlns='{ns.SM}' resume='true'/>")
        enabled = await peer.client.expect(ns.SM, "enabled")
        smid = enabled.get("id")
        assert smid
        return peer, smid

    async def authenticated(self, user: str = "bob") -> Peer:
        """A connection after SASL and the stream restart: where `<resume/>` is sent."""
        peer = await self.connect()
        client = peer.client
        await client.open()
        assert (await client.auth(user, PASSWORD)).name == "success"
        client.parser.reset()
        features = await client.open()
        assert features.find(ns.SM, "sm") is not None
        return peer


async def _sync(client: RawClient) -> list[Element]:
    """Ping the server and read up to the pong: what was pending before it (a barrier).

    Use after `wait_all_tasks_blocked()`. For clients without stream management.
    """
    await client.send("<iq type='get' id='sync' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    pending: list[Element] = []
    while True:
        element = await client.receive()
        if element.name == "iq" and element.get("id") == "sync":
            assert element.get("type") == "result", element
            return pending
        pending.append(element)


@pytest.fixture
async def net(nursery: trio.Nursery, gateway: ServerContext) -> Net:
    return Net(gateway, nursery)


# -- reading ---------------------------------------------------------------------------------


async def _until_ack(client: RawClient) -> tuple[list[Element], int]:
    """Ask `<r/>` and read up to the `<a/>`: the stanzas before it, and its h.

    Use after `wait_all_tasks_blocked()`: the answer is queued behind everything the server
    had for this client, so the list is exactly what was pending (a barrier).
    """
    await client.send(R)
    stanzas: list[Element] = []
    while True:
        element = await client.receive()
        if _is_sm(element, "a"):
            return stanzas, int(element.get("h") or -1)
        if not _is_sm(element, "r"):
            stanzas.append(element)


async def _stanzas(client: RawClient, count: int) -> list[Element]:
    """The next `count` stanzas, skipping the server's `<r/>` requests."""
    out: list[Element] = []
    while len(out) < count:
        element = await client.receive()
        if not _is_sm(element, "r"):
            out.append(element)
    return out


def _bodies(elements: Iterable[Element]) -> list[str | None]:
    return [_body(e) for e in elements if e.name == "message"]


async def _until_stream_error(client: RawClient) -> tuple[list[Element], Element]:
    """Read to the stream error: the elements before it and the error (the stream closes)."""
    seen: list[Element] = []
    while (element := await client.receive()).tag != (ns.STREAM, "error"):
        seen.append(element)
    assert await read_to_end(client) == []
    return seen, element


# -- placing a stanza inside the loan ------------------------------------------------------


class ClaimHook(ResumeRegistry):
    """The gateway's registry, running `on_claim` in the step of a successful claim.

    The claim has put the loan into the slot's channel (the session task is woken but
    cannot run before this step ends), so whatever `on_claim` does happens between the
    claim and the session task answering it.
    """

    def __init__(self, registry: ResumeRegistry) -> None:
        super().__init__(
            max_parked_per_user=registry.max_parked_per_user, max_parked=registry.max_parked
        )
        self.on_claim: Callable[[ResumeSlot], None] | None = None
        self.hooked_claims = 0

    def claim(self, smid: str, jid: JID, loan: Loan) -> ResumeSlot | None:
        slot = super().claim(smid, jid, loan)
        hook, self.on_claim = self.on_claim, None
        if slot is not None and hook is not None:
            hook(slot)
            self.hooked_claims += 1
        return slot


def _install_claim_hook(ctx: ServerContext) -> ClaimHook:
    assert not ctx.resume.slots, "install the hook before any session enables SM"
    hook = ClaimHook(ctx.resume)
    ctx.resume = hook
    return hook


def _chat(sender: str, to: str, body: str) -> Element:
    """A chat message as the router sees it from `sender`'s connection (`from` stamped)."""
    return Element(
        ns.CLIENT,
        "message",
        {"from": sender, "to": to, "type": "chat", "id": body},
        [Element(ns.CLIENT, "body", None, [body])],
    )


def _route_now(ctx: ServerContext, stanza: Element) -> None:
    """Route `stanza` through the gateway's router within the current step.

    Delivery to a connected session (parked or not) never suspends, so the router's
    coroutine runs to completion on its first step; anything else fails the test.
    """
    coro = ctx.router.route(stanza)
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
    raise AssertionError("routing suspended: it cannot be placed inside one scheduler step")


# -- 1. a stanza routed while the loan is in flight ------------------------------------------


@pytest.mark.parametrize(
    "moment",
    ["resume_unread", "between_claim_and_answer", "same_tick_as_resume", "answer_unread"],
)
async def test_stanza_routed_during_a_loan_arrives_once_after_the_resent_ones(
    net: Net, autojump_clock: trio.testing.MockClock, moment: str
) -> None:
    """`<resume/>` is sent and `<resumed/>` not read yet when alice's m3 is routed to bob.

    resume_unread: the resume bytes reached the server, its connection has not run yet.
    between_claim_and_answer: the claim is made, the parked session has not answered.
    same_tick_as_resume: m3 (from alice's connection) and the resume arrive at once.
    answer_unread: `<resumed/>` and the resent stanzas are written, the client reads later.
    """
    with trio.fail_after(DEADLINE):
        hook = _install_claim_hook(net.ctx)
        alice = await net.online("alice", "desk")
        bob, smid = await net.resumable()
        for i in range(3):
            await alice.client.send(_msg(PHONE, f"m{i}", id_=f"m{i}"))
        assert _bodies(await _stanzas(bob.client, 3)) == ["m0", "m1", "m2"]
        await bob.client.send(_ack(1))  # m0 handled; m1 and m2 stay unacked
        bob.cut()
        await trio.testing.wait_all_tasks_blocked()  # parked
        bob2 = await net.authenticated()
        m3 = _chat("alice@localhost/desk", PHONE, "m3")
        if moment == "resume_unread":
            bob2.arrive(_resume(smid, 1))
            _route_now(net.ctx, m3)
            assert net.ctx.resume.slots[smid].state is SlotState.PARKED
        elif moment == "between_claim_and_answer":

            def route_m3(slot: ResumeSlot) -> None:
                assert slot.state is SlotState.CLAIMED and slot.session.outgoing is None
                _route_now(net.ctx, m3)

            hook.on_claim = route_m3
            bob2.arrive(_resume(smid, 1))
        elif moment == "same_tick_as_resume":
            bob2.arrive(_resume(smid, 1))
            alice.arrive(_msg(PHONE, "m3", id_="m3"))
        else:
            bob2.arrive(_resume(smid, 1))
            await trio.testing.wait_all_tasks_blocked()
            await alice.client.send(_msg(PHONE, "m3", id_="m3"))
        await trio.testing.wait_all_tasks_blocked()
        assert hook.hooked_claims == (moment == "between_claim_and_answer")
        answer = await bob2.client.receive()
        assert _is_sm(answer, "resumed"), answer
        assert answer.get("h") == "0"
        stanzas, h = await _until_ack(bob2.client)
        assert [(s.get("id"), _body(s)) for s in stanzas] == [
            ("m1", "m1"),
            ("m2", "m2"),
            ("m3", "m3"),
        ]
        assert h == 0
        assert await _sync(alice.client) == []  # no bounce, no error


# -- 2. a pipelined resume ---------------------------------------------------------------------


async def test_stanzas_pipelined_after_resume_are_processed_after_resumed_and_counted(
    net: Net, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(DEADLINE):
        carol = await net.online("carol", "desk")
        alice = await net.online("alice", "desk")
        bob, smid = await net.resumable()
        await bob.client.send(_msg("carol@localhost/desk", "before"))  # bob's h: 1
        bob.cut()
        await trio.testing.wait_all_tasks_blocked()
        await alice.client.send(_msg(PHONE, "parked", id_="p1"))  # buffered while parked
        await trio.testing.wait_all_tasks_blocked()
        bob2 = await net.authenticated()
        # One write: the resume, a message, a ping to the server and an ack request.
        await bob2.client.send(
            _resume(smid, 0)
            + _msg("carol@localhost/desk", "pipelined", id_="pipe")
            + "<iq type='get' id='ping' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
            + R
        )
        answer = await bob2.client.receive()
        assert _is_sm(answer, "resumed"), answer
        assert answer.get("h") == "1"  # counted before the pipelined stanzas
        seen: list[Element] = []
        while not _is_sm(element := await bob2.client.receive(), "a"):
            if not _is_sm(element, "r"):
                seen.append(element)
        assert element.get("h") == "3"  # the message and the ping counted
        assert [(e.name, e.get("id")) for e in seen] == [("message", "p1"), ("iq", "ping")]
        assert seen[1].get("type") == "result"
        await trio.testing.wait_all_tasks_blocked()
        delivered = [e for e in await _sync(carol.client) if e.name == "message"]
        assert _bodies(delivered) == ["before", "pipelined"]
        assert delivered[1].get("from") == PHONE


# -- 3. replies to the parked full JID ---------------------------------------------------------


async def test_reply_to_parked_full_jid_is_buffered_and_delivered_after_resume(
    net: Net, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(DEADLINE):
        alice = await net.online("alice", "desk")
        bob, smid = await net.resumable()
        await bob.client.send(
            "<iq type='get' id='q1' to='alice@localhost/desk'>"
            "<query xmlns='jabber:iq:version'/></iq>"
        )
        await trio.testing.wait_all_tasks_blocked()
        [request] = await _sync(alice.client)
        assert (request.name, request.get("from"), request.get("id")) == ("iq", PHONE, "q1")
        bob.cut()
        await trio.testing.wait_all_tasks_blocked()  # parked
        await alice.client.send(
            f"<iq type='result' id='q1' to='{PHONE}'>"
            "<query xmlns='jabber:iq:version'><name>desk</name></query></iq>"
        )
        await alice.client.send(_msg(PHONE, "are you there?", id_="m1"))
        await trio.testing.wait_all_tasks_blocked()
        assert await _sync(alice.client) == []  # neither bounced
        bob2 = await net.authenticated()
        await bob2.client.send(_resume(smid, 0))
        answer = await bob2.client.receive()
        assert _is_sm(answer, "resumed"), answer
        assert answer.get("h") == "1"
        await trio.testing.wait_all_tasks_blocked()
        stanzas, _h = await _until_ack(bob2.client)
        assert [(s.name, s.get("type"), s.get("id")) for s in stanzas] == [
            ("iq", "result", "q1"),
            ("message", "chat", "m1"),
        ]
        assert all(s.get("from") == "alice@localhost/desk" for s in stanzas)


# -- 4. two resumes of one session at once -----------------------------------------------------


@pytest.mark.parametrize("old_transport", ["parked", "attached"])
async def test_two_resumes_at_once_one_wins_and_gets_every_message_once(
    net: Net, autojump_clock: trio.testing.MockClock, old_transport: str
) -> None:
    with trio.fail_after(DEADLINE):
        alice = await net.online("alice", "desk")
        bob, smid = await net.resumable()
        await alice.client.send(_msg(PHONE, "m0", id_="m0"))
        assert _bodies(await _stanzas(bob.client, 1)) == ["m0"]  # read, never acked
        if old_transport == "parked":
            bob.cut()
            await trio.testing.wait_all_tasks_blocked()
        await alice.client.send(_msg(PHONE, "m1", id_="m1"))
        first, second = await net.authenticated(), await net.authenticated()
        await trio.testing.wait_all_tasks_blocked()
        # Both resumes become readable in the same tick: both claims run before the
        # session task can answer either.
        first.arrive(_resume(smid, 0))
        second.arrive(_resume(smid, 0))
        await trio.testing.wait_all_tasks_blocked()
        answers = {peer: await peer.client.receive() for peer in (first, second)}
        assert sorted(a.name for a in answers.values()) == ["failed", "resumed"], answers
        winner = next(p for p, a in answers.items() if a.name == "resumed")
        loser = next(p for p, a in answers.items() if a.name == "failed")
        assert answers[loser].find(ns.STANZAS_ERRORS, "item-not-found") is not None
        assert answers[winner].get("h") == "0"
        stanzas, _h = await _until_ack(winner.client)
        assert _bodies(stanzas) == ["m0", "m1"]
        if old_transport == "attached":
            _old, error = await _until_stream_error(bob.client)
            assert condition_of(error) == "conflict"
        await alice.client.send(_msg(PHONE, "m2", id_="m2"))
        await trio.testing.wait_all_tasks_blocked()
        stanzas, _h = await _until_ack(winner.client)
        assert _bodies(stanzas) == ["m2"]
        # The loser's stream goes on: a fresh resource of bob, which gets none of them.
        await loser.client.bind("tablet")
        await trio.testing.wait_all_tasks_blocked()
        assert await _sync(loser.client) == []
        assert net.ctx.metrics.offline_stored.value() == 0


# -- 5. the resume timeout and a resume on the same tick ------------------------------------------


@pytest.mark.parametrize(
    "offset", [-0.001, 0.0, 0.001], ids=["just_before", "on_the_tick", "just_after"]
)
async def test_resume_racing_the_resume_timeout_is_all_or_nothing(
    net: Net, autojump_clock: trio.testing.MockClock, offset: float
) -> None:
    with trio.fail_after(DEADLINE + net.ctx.config.modules.mod_stream_management.resume_timeout):
        alice = await net.online("alice", "desk")
        bob, smid = await net.resumable()
        await alice.client.send(_msg(PHONE, "m0", id_="m0"))
        await alice.client.send(_msg(PHONE, "m1", id_="m1"))
        assert _bodies(await _stanzas(bob.client, 2)) == ["m0", "m1"]
        await bob.client.send(_ack(1))  # m0 is acked: the ledger's first entry
        bob.cut()
        await trio.testing.wait_all_tasks_blocked()
        await alice.client.send(_msg(PHONE, "m2", id_="m2"))
        await trio.testing.wait_all_tasks_blocked()
        session = await local_session(net.ctx, PHONE)
        assert session is not None and session.cancel_scope is not None
        deadline = session.cancel_scope.deadline  # the parked task's resume deadline
        assert math.isfinite(deadline)
        await trio.sleep_until(deadline - 5)
        bob2 = await net.authenticated()  # inside its negotiation_timeout (10 s)
        await trio.sleep_until(deadline + offset)
        bob2.arrive(_resume(smid, 1))  # readable in the tick the test task woke in
        await trio.testing.wait_all_tasks_blocked()
        answer = await bob2.client.receive()
        offline = net.ctx.router.offline
        assert offline is not None
        if answer.name == "resumed":
            assert offset <= 0
            stanzas, _h = await _until_ack(bob2.client)
            later = _bodies(stanzas)
            assert offline.metrics.offline_stored.value() == 0
        else:
            assert answer.tag == (ns.SM, "failed"), answer
            assert answer.find(ns.STANZAS_ERRORS, "item-not-found") is not None
            assert offset >= 0
            assert offline.metrics.offline_stored.value() == 2
            # A fresh login on the same stream: initial presence flushes the store.
            await bob2.client.bind("phone")
            await bob2.client.send("<presence/>")
            await trio.testing.wait_all_tasks_blocked()
            flushed = [e for e in await _sync(bob2.client) if e.name == "message"]
            assert all(e.find(ns.DELAY, "delay") is not None for e in flushed)
            later = _bodies(flushed)
        # The ledger: each message exactly once, acked on the old stream or delivered later.
        assert ["m0", *later] == ["m0", "m1", "m2"]
        assert await _sync(alice.client) == []  # nothing bounced


# -- 6. h across 2**32 -------------------------------------------------------------------------

START = MOD - 3  # both counters start here: five stanzas take each h across the wrap


async def test_h_values_wrap_at_2_32_in_acks_answers_and_resume(
    net: Net, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(DEADLINE):
        net.ctx.new_sm_state = functools.partial(SMState, counter_in=START, counter_out=START)
        alice = await net.online("alice", "desk")
        bob, smid = await net.resumable()
        for i in range(5):
            await alice.client.send(_msg(PHONE, f"a{i}", id_=f"a{i}"))
        assert _bodies(await _stanzas(bob.client, 5)) == [f"a{i}" for i in range(5)]
        await bob.client.send(_ack(START + 3))  # h=0: a0..a2, across the wrap
        for i in range(4):
            await bob.client.send(_msg("alice@localhost/desk", f"b{i}"))
        await trio.testing.wait_all_tasks_blocked()
        stanzas, h = await _until_ack(bob.client)
        assert (stanzas, h) == ([], 1)  # the server's h: START + 4, wrapped
        assert _bodies(e for e in await _sync(alice.client) if e.name == "message") == [
            f"b{i}" for i in range(4)
        ]
        await bob.client.send(_ack(START + 4))  # h=1: a3; a4 stays unacked
        bob.cut()
        await trio.testing.wait_all_tasks_blocked()
        await alice.client.send(_msg(PHONE, "a5", id_="a5"))
        await trio.testing.wait_all_tasks_blocked()
        bob2 = await net.authenticated()
        await bob2.client.send(_resume(smid, START + 4))
        answer = await bob2.client.receive()
        assert _is_sm(answer, "resumed"), answer
        assert answer.get("h") == "1"
        assert _bodies(await _stanzas(bob2.client, 2)) == ["a4", "a5"]
        await bob2.client.send(_ack(START + 5))  # h=2: a4
        await bob2.client.send(_ack(START + 4))  # h=1: behind the last ack, ignored
        await bob2.client.send(_msg("alice@localhost/desk", "b4"))
        await trio.testing.wait_all_tasks_blocked()
        stanzas, h = await _until_ack(bob2.client)
        assert (stanzas, h) == ([], 2)
        await bob2.client.send(_ack(START + 6))  # h=3: a5; nothing unacked now
        # One more than was sent, across the wrap: handled-count-too-high, h=4 send-count=3.
        await bob2.client.send(_ack(START + 7))
        seen, error = await _until_stream_error(bob2.client)
        assert all(_is_sm(e, "r") or _is_sm(e, "a") for e in seen), seen
        assert condition_of(error) == "undefined-condition"
        too_high = error.find(ns.SM, "handled-count-too-high")
        assert too_high is not None, error
        assert (too_high.get("h"), too_high.get("send-count")) == ("4", "3")


# -- 7. resume while the old transport is still attached -------------------------------------------


@pytest.mark.parametrize("moment", ["written_unread", "same_tick_as_resume", "at_claim"])
async def test_resume_while_attached_moves_the_in_flight_message_to_the_new_stream_once(
    net: Net, autojump_clock: trio.testing.MockClock, moment: str
) -> None:
    """m1 is on its way to the old transport when bob resumes from a new one.

    written_unread: the old transport has it, the client never read nor acked it.
    same_tick_as_resume: m1 (from alice's connection) and the resume arrive at once.
    at_claim: m1 is routed in the step of the claim, before the session task runs.
    """
    with trio.fail_after(DEADLINE):
        hook = _install_claim_hook(net.ctx)
        alice = await net.online("alice", "desk")
        bob, smid = await net.resumable()
        await alice.client.send(_msg(PHONE, "m0", id_="m0"))
        assert _bodies(await _stanzas(bob.client, 1)) == ["m0"]
        await bob.client.send(_ack(1))
        bob2 = await net.authenticated()
        await trio.testing.wait_all_tasks_blocked()
        if moment == "written_unread":
            await alice.client.send(_msg(PHONE, "m1", id_="m1"))
            await trio.testing.wait_all_tasks_blocked()
            bob2.arrive(_resume(smid, 1))
        elif moment == "same_tick_as_resume":
            bob2.arrive(_resume(smid, 1))
            alice.arrive(_msg(PHONE, "m1", id_="m1"))
        else:
            m1 = _chat("alice@localhost/desk", PHONE, "m1")

            def route_m1(slot: ResumeSlot) -> None:
                assert slot.session.outgoing is not None  # still attached to the old one
                _route_now(net.ctx, m1)

            hook.on_claim = route_m1
            bob2.arrive(_resume(smid, 1))
        await trio.testing.wait_all_tasks_blocked()
        assert hook.hooked_claims == (moment == "at_claim")
        answer = await bob2.client.receive()
        assert _is_sm(answer, "resumed"), answer
        stanzas, _h = await _until_ack(bob2.client)
        assert _bodies(stanzas) == ["m1"]
        old, error = await _until_stream_error(bob.client)
        assert condition_of(error) == "conflict"
        old_bodies = _bodies(old)
        assert old_bodies in ([], ["m1"])  # whatever the dead stream got does not count
        if moment == "written_unread":
            assert old_bodies == ["m1"]
        await alice.client.send(_msg(PHONE, "m2", id_="m2"))
        await trio.testing.wait_all_tasks_blocked()
        stanzas, _h = await _until_ack(bob2.client)
        assert _bodies(stanzas) == ["m2"]
        assert await _sync(alice.client) == []


# -- 8. a parked session overflowing buffer_max ----------------------------------------------------

SMALL_BUFFER = {"mod_stream_management": {"buffer_max": 8}}


@pytest.mark.parametrize("other_resource", [True, False], ids=["to_laptop", "to_offline"])
async def test_parked_session_over_buffer_max_ends_and_every_message_is_rerouted(
    gateway_factory: GatewayFactory,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    other_resource: bool,
) -> None:
    with trio.fail_after(DEADLINE):
        ctx, _connect = await gateway_factory(modules=SMALL_BUFFER)
        net = Net(ctx, nursery)
        laptop = await net.online("bob", "laptop") if other_resource else None
        alice = await net.online("alice", "desk")
        bob, smid = await net.resumable()
        await alice.client.send(_msg(PHONE, "m0", id_="m0"))
        await alice.client.send(_msg(PHONE, "m1", id_="m1"))
        assert _bodies(await _stanzas(bob.client, 2)) == ["m0", "m1"]
        await bob.client.send(_ack(1))  # m1 stays unacked: 1 of 8 buffered
        bob.cut()
        await trio.testing.wait_all_tasks_blocked()
        # 7 fill the buffer, m9 overflows it and ends the session, m10 finds it closing.
        for i in range(2, 11):
            await alice.client.send(_msg(PHONE, f"m{i}", id_=f"m{i}"))
        await trio.testing.wait_all_tasks_blocked()
        bob2 = await net.authenticated()
        await bob2.client.send(_resume(smid, 1))
        answer = await bob2.client.receive()
        assert answer.tag == (ns.SM, "failed"), answer
        assert answer.find(ns.STANZAS_ERRORS, "item-not-found") is not None
        expected = [f"m{i}" for i in range(1, 11)]
        offline = ctx.router.offline
        assert offline is not None
        if laptop is not None:
            got = _bodies(e for e in await _sync(laptop.client) if e.name == "message")
            assert offline.metrics.offline_stored.value() == 0
        else:
            assert offline.metrics.offline_stored.value() == len(expected)
            await bob2.client.bind("phone")
            await bob2.client.send("<presence/>")
            await trio.testing.wait_all_tasks_blocked()
            got = _bodies(e for e in await _sync(bob2.client) if e.name == "message")
        assert Counter(got) == Counter(expected)  # each exactly once, in whatever order
        assert await _sync(alice.client) == []  # nothing bounced


async def test_overflow_in_the_step_of_a_resume_claim_fails_that_resume_cleanly(
    gateway_factory: GatewayFactory, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(DEADLINE):
        ctx, _connect = await gateway_factory(modules=SMALL_BUFFER)
        net = Net(ctx, nursery)
        hook = _install_claim_hook(ctx)
        alice = await net.online("alice", "desk")
        bob, smid = await net.resumable()
        bob.cut()
        await trio.testing.wait_all_tasks_blocked()
        for i in range(8):  # the buffer is full, not over
            await alice.client.send(_msg(PHONE, f"m{i}", id_=f"m{i}"))
        await trio.testing.wait_all_tasks_blocked()
        bob2 = await net.authenticated()
        m8 = _chat("alice@localhost/desk", PHONE, "m8")
        hook.on_claim = lambda _slot: _route_now(ctx, m8)  # the ninth: over buffer_max
        bob2.arrive(_resume(smid, 0))
        await trio.testing.wait_all_tasks_blocked()
        assert hook.hooked_claims == 1
        answer = await bob2.client.receive()
        assert answer.tag == (ns.SM, "failed"), answer
        assert answer.find(ns.STANZAS_ERRORS, "item-not-found") is not None
        offline = ctx.router.offline
        assert offline is not None and offline.metrics.offline_stored.value() == 9


# -- more races around the loan ---------------------------------------------------------------

STALE_H = {"mod_stream_management": {"stale_h": {"enabled": True}}}


@pytest.mark.parametrize(
    "offset",
    [
        pytest.param(
            0.0,
            id="on_the_tick",
        ),
        pytest.param(0.001, id="just_after"),
    ],
)
async def test_resume_on_the_timeout_tick_resumes_whole_or_learns_the_stale_h(
    gateway_factory: GatewayFactory,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    offset: float,
) -> None:
    with trio.fail_after(DEADLINE + 3600):  # resume_timeout is 600 s
        ctx, _connect = await gateway_factory(modules=STALE_H)
        net = Net(ctx, nursery)
        alice = await net.online("alice", "desk")
        bob, smid = await net.resumable()
        await bob.client.send(_msg("alice@localhost/desk", "b0"))  # the server's h: 1
        bob.cut()
        await trio.testing.wait_all_tasks_blocked()
        session = await local_session(ctx, PHONE)
        assert session is not None and session.cancel_scope is not None
        deadline = session.cancel_scope.deadline
        await trio.sleep_until(deadline - 5)
        bob2 = await net.authenticated()
        await trio.sleep_until(deadline + offset)
        bob2.arrive(_resume(smid, 0))
        await trio.testing.wait_all_tasks_blocked()
        answer = await bob2.client.receive()
        if answer.tag == (ns.SM, "resumed"):
            # On the tick the claim may land while the ending session records its h:
            # then the resume wins, whole (all or nothing), counters intact.
            assert offset == 0.0
            assert answer.get("h") == "1"
        else:
            assert answer.tag == (ns.SM, "failed"), answer
            assert answer.find(ns.STANZAS_ERRORS, "item-not-found") is not None
            assert answer.get("h") == "1"  # XEP-0198 section 5: what the server handled
        assert _bodies(e for e in await _sync(alice.client) if e.name == "message") == ["b0"]


async def test_bind_conflict_in_the_step_of_a_resume_claim_leaves_one_holder_of_the_jid(
    net: Net, autojump_clock: trio.testing.MockClock
) -> None:
    """bob/phone is parked; a resume claims it and, before the session task answers, a new
    connection binds the same resource (RFC 6120 7.7.2.2: the newcomer wins, the old
    session ends with `conflict`).

    No connection task can bind inside the claim's step, so the newcomer is a `Session`
    registered with `Router.bind`, the call a bind makes; it reads from its channel.
    """
    with trio.fail_after(DEADLINE):
        hook = _install_claim_hook(net.ctx)
        alice = await net.online("alice", "desk")
        bob, smid = await net.resumable()
        bob.cut()
        await trio.testing.wait_all_tasks_blocked()
        bob2 = await net.authenticated()
        to_newcomer, newcomer_in = trio.open_memory_channel[Element](16)
        newcomer = Session(
            conn_id="newcomer",
            conn="test",
            outgoing=to_newcomer,
            username="bob",
            host="localhost",
        )

        def bind_phone(_slot: ResumeSlot) -> None:
            # Inside the claim's step: the bind runs to its end without waiting (the
            # local directory never waits), as a connection task's bind would.
            binding = net.ctx.router.bind(newcomer, JID.parse("bob@localhost"), "phone")
            with pytest.raises(StopIteration) as done:
                binding.send(None)
            newcomer.bound(done.value.value)

        hook.on_claim = bind_phone
        bob2.arrive(_resume(smid, 0))
        await trio.testing.wait_all_tasks_blocked()
        assert hook.hooked_claims == 1
        assert await local_session(net.ctx, PHONE) is newcomer
        answer = await bob2.client.receive()
        if answer.name == "resumed":
            # Resumed a moment before it was replaced: the replacement still ends it.
            condition = None
            with trio.move_on_after(DEADLINE / 2):
                _seen, error = await _until_stream_error(bob2.client)
                condition = condition_of(error)
            assert condition == "conflict", "a second live session holds bob/phone"
        else:
            assert answer.find(ns.STANZAS_ERRORS, "item-not-found") is not None, answer
        await alice.client.send(_msg(PHONE, "after", id_="after"))
        await trio.testing.wait_all_tasks_blocked()
        assert _body(newcomer_in.receive_nowait()) == "after"


@pytest.mark.parametrize(
    "moment",
    [
        "before_resumed_is_written",
        "after_resumed_is_read",
    ],
)
async def test_new_transport_lost_right_after_resume_parks_the_session_again(
    net: Net, autojump_clock: trio.testing.MockClock, moment: str
) -> None:
    """A flapping network: the resuming connection dies again at once. The session is as
    resumable as before (DESIGN 3: transport lost on a resumable session -> park)."""
    with trio.fail_after(DEADLINE):
        alice = await net.online("alice", "desk")
        bob, smid = await net.resumable()
        await alice.client.send(_msg(PHONE, "m0", id_="m0"))
        assert _bodies(await _stanzas(bob.client, 1)) == ["m0"]  # never acked
        bob.cut()
        await trio.testing.wait_all_tasks_blocked()
        bob2 = await net.authenticated()
        bob2.arrive(_resume(smid, 0))
        if moment == "after_resumed_is_read":
            assert _is_sm(await bob2.client.receive(), "resumed")
        bob2.cut()  # in the first variant, in the same step as the resume arrives
        await trio.testing.wait_all_tasks_blocked()
        bob3 = await net.authenticated()
        await bob3.client.send(_resume(smid, 0))
        answer = await bob3.client.receive()
        assert _is_sm(answer, "resumed"), answer
        assert _bodies(await _stanzas(bob3.client, 1)) == ["m0"]
        offline = net.ctx.router.offline
        assert offline is not None and offline.metrics.offline_stored.value() == 0
