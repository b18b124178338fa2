"""Limits against hostile clients, in process over memory streams with a mock clock:
stanza_timeout, the pre-authentication stanza size, the lockout by address and account,
the byte-bounded send queue, and the connection gate (the real-process versions of these
are in test_hostile.py)."""

from __future__ import annotations

import base64

import trio
import trio.testing

from gateway.core.context import ServerContext
from gateway.net.limits import ConnectionGate, connection_cap, raise_descriptor_limit
from gateway.net.transport import PeerInfo
from gateway.xmpp import namespaces as ns
from gateway.xmpp.sasl import ScramClient
from tests.helpers.accounts import PASSWORD
from tests.helpers.client import RawClient, read_to_end
from tests.helpers.inprocess import GatewayFactory, serve_memory_client

NONE = 2  # the tls: none listener of the test config: PLAIN without TLS


def connect_from(ctx: ServerContext, ip: str) -> RawClient:
    """A client over a memory stream that the gateway sees coming from `ip`."""
    return serve_memory_client(ctx, NONE, peer=PeerInfo(ip, 40000))


async def plain(client: RawClient, user: str, password: str) -> str:
    """One PLAIN attempt; the answer's name and condition, e.g. 'failure/not-authorized'."""
    data = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    await client.send(f"<auth xmlns='{ns.SASL}' mechanism='PLAIN'>{data}</auth>")
    answer = await client.receive()
    conditions = [c.name for c in answer.elements() if c.name != "text"]
    return "/".join([answer.name, *conditions])


async def test_a_stanza_left_unfinished_before_login_is_a_policy_violation(
    gateway_factory: GatewayFactory, autojump_clock: trio.testing.MockClock
) -> None:
    ctx, _ = await gateway_factory(
        general={"hosts": ["localhost"], "negotiation_timeout": 600, "stanza_timeout": 5}
    )
    client = connect_from(ctx, "192.0.2.1")
    await client.open()
    start = trio.current_time()
    await client.send(f"<auth xmlns='{ns.SASL}' mechanism='PLAIN'>AG")
    assert await client.expect_stream_error() == "policy-violation"
    assert 5 <= trio.current_time() - start < 6  # long before negotiation_timeout


async def test_a_stanza_trickled_slower_than_stanza_timeout_after_login_is_refused(
    gateway_factory: GatewayFactory, autojump_clock: trio.testing.MockClock
) -> None:
    ctx, _ = await gateway_factory(general={"hosts": ["localhost"], "stanza_timeout": 5})
    client = connect_from(ctx, "192.0.2.1")
    await client.login("alice", PASSWORD, mechanism="PLAIN")
    # Complete stanzas, however many, never trip it; one stanza sent in pieces 2 s apart
    # does, 5 s after its first byte, although bytes keep arriving.
    for _ in range(10):
        await client.send("<presence/>")
        await trio.sleep(2)
    await client.send("<message to='bob@localhost'><body>")
    start = trio.current_time()
    for _ in range(2):
        await trio.sleep(2)
        await client.send("x")
    assert await client.expect_stream_error() == "policy-violation"
    assert 5 <= trio.current_time() - start < 6


async def test_the_pre_auth_limit_applies_until_sasl_succeeds(
    gateway_factory: GatewayFactory, autojump_clock: trio.testing.MockClock
) -> None:
    ctx, _ = await gateway_factory(general={"hosts": ["localhost"]})
    client = connect_from(ctx, "192.0.2.1")
    await client.open()
    await client.send(f"<auth xmlns='{ns.SASL}' mechanism='PLAIN'>{'A' * 9000}</auth>")
    assert await client.expect_stream_error() == "policy-violation"
    alice = connect_from(ctx, "192.0.2.1")
    await alice.login("alice", PASSWORD, mechanism="PLAIN")
    bob = connect_from(ctx, "192.0.2.2")
    await bob.login("bob", PASSWORD, mechanism="PLAIN", resource="b")
    body = "y" * 100_000
    await alice.send(f"<message to='bob@localhost/b' type='chat'><body>{body}</body></message>")
    message = await bob.expect(ns.CLIENT, "message")
    assert message.find_text(ns.CLIENT, "body") == body


async def test_an_address_that_keeps_failing_is_locked_out_but_the_owner_logs_in(
    gateway_factory: GatewayFactory, autojump_clock: trio.testing.MockClock
) -> None:
    ctx, _ = await gateway_factory(
        general={"hosts": ["localhost"], "max_auth_failures": 3},
        auth={
            "database": "accounts.sqlite",
            "lockout": {"ip_failures": 4, "account_failures": 0, "window": 60, "duration": 300},
        },
    )
    answers = []
    for _ in range(2):
        attacker = connect_from(ctx, "203.0.113.9")
        await attacker.open()
        answers += [await plain(attacker, "alice", "guess") for _ in range(2)]
    assert answers == ["failure/not-authorized"] * 4
    attacker = connect_from(ctx, "203.0.113.9")
    await attacker.open()
    # The right password from the locked-out address is not even checked.
    assert await plain(attacker, "alice", PASSWORD) == "failure/temporary-auth-failure"
    owner = connect_from(ctx, "198.51.100.1")
    assert await owner.login("alice", PASSWORD, mechanism="PLAIN", resource="gw") == (
        "alice@localhost/gw"
    )
    await trio.sleep(301)
    attacker = connect_from(ctx, "203.0.113.9")
    await attacker.open()
    assert await plain(attacker, "alice", PASSWORD) == "success"


async def test_an_attacked_account_refuses_the_addresses_that_failed_on_it_only(
    gateway_factory: GatewayFactory, autojump_clock: trio.testing.MockClock
) -> None:
    ctx, _ = await gateway_factory(
        general={"hosts": ["localhost"], "max_auth_failures": 10},
        auth={
            "database": "accounts.sqlite",
            "lockout": {"ip_failures": 0, "account_failures": 3, "window": 60, "duration": 300},
        },
    )
    attacker = connect_from(ctx, "203.0.113.9")
    await attacker.open()
    assert [await plain(attacker, "alice", "guess") for _ in range(3)] == [
        "failure/not-authorized"
    ] * 3
    assert await plain(attacker, "alice", PASSWORD) == "failure/temporary-auth-failure"
    # The same address, another account: allowed. Another address, the attacked one: allowed.
    assert await plain(attacker, "bob", PASSWORD) == "success"
    owner = connect_from(ctx, "198.51.100.1")
    await owner.open()
    assert await plain(owner, "alice", PASSWORD) == "success"
    # A new address that fails once on the attacked account is refused from then on.
    helper = connect_from(ctx, "198.51.100.77")
    await helper.open()
    assert await plain(helper, "alice", "guess") == "failure/not-authorized"
    assert await plain(helper, "alice", PASSWORD) == "failure/temporary-auth-failure"


async def test_scram_failures_count_for_the_lockout_too(
    gateway_factory: GatewayFactory,
) -> None:
    _ctx, connect = await gateway_factory(
        general={"hosts": ["localhost"], "max_auth_failures": 10},
        auth={
            "database": "accounts.sqlite",
            "lockout": {"ip_failures": 2, "account_failures": 0, "window": 60, "duration": 300},
        },
    )
    client = await connect(NONE)
    await client.open()
    for _ in range(2):
        failure = await client.auth("alice", "wrong", "SCRAM-SHA-256")
        assert failure.find(ns.SASL, "not-authorized") is not None
    failure = await client.auth("alice", PASSWORD, "SCRAM-SHA-256")
    assert failure.find(ns.SASL, "temporary-auth-failure") is not None


async def slow_reader(ctx: ServerContext) -> tuple[RawClient, RawClient]:
    """alice over a stream with no buffer at all (a write waits for her to read), and bob;
    bob sends alice three 40 KB messages, past a send queue of 64 KiB of memory."""
    alice = serve_memory_client(ctx, NONE, peer=PeerInfo("192.0.2.1", 40000), lockstep=True)
    await alice.login("alice", PASSWORD, mechanism="PLAIN", resource="slow")
    bob = connect_from(ctx, "192.0.2.2")
    await bob.login("bob", PASSWORD, mechanism="PLAIN", resource="b")
    body = "z" * 40_000
    for n in range(3):
        await bob.send(
            f"<message to='alice@localhost/slow' id='m{n}'><body>{body}</body></message>"
        )
    return alice, bob


async def test_scram_exchanges_started_before_the_lockout_cannot_all_guess(
    gateway_factory: GatewayFactory, autojump_clock: trio.testing.MockClock
) -> None:
    """A client that opens many exchanges (a challenge on each) before any failure counts,
    then sends all the proofs, is refused once the address is locked out: the lockout is
    asked again before each SCRAM step, not only when the exchange starts."""
    ctx, _ = await gateway_factory(
        general={"hosts": ["localhost"], "max_auth_failures": 10},
        auth={
            "database": "accounts.sqlite",
            "lockout": {"ip_failures": 2, "account_failures": 0, "window": 60, "duration": 300},
        },
    )
    exchanges = []
    for _ in range(4):
        client = connect_from(ctx, "203.0.113.9")
        await client.open()
        scram = ScramClient("sha256", "alice", "guess")
        first = base64.b64encode(scram.first()).decode()
        await client.send(f"<auth xmlns='{ns.SASL}' mechanism='SCRAM-SHA-256'>{first}</auth>")
        offered = await client.expect(ns.SASL, "challenge")
        exchanges.append((client, scram, base64.b64decode(offered.text)))
    answers = []
    for client, scram, challenge in exchanges:
        final = base64.b64encode(scram.final(challenge)).decode()
        await client.send(f"<response xmlns='{ns.SASL}'>{final}</response>")
        answer = await client.receive()
        conditions = [c.name for c in answer.elements() if c.name != "text"]
        answers.append("/".join([answer.name, *conditions]))
    assert answers[:2] == ["failure/not-authorized"] * 2
    assert answers[2:] == ["failure/temporary-auth-failure"] * 2


async def test_a_slow_reader_that_reads_within_the_grace_gets_whole_stanzas_then_the_error(
    gateway_factory: GatewayFactory, autojump_clock: trio.testing.MockClock
) -> None:
    ctx, _ = await gateway_factory(general={"hosts": ["localhost"], "send_queue_bytes": 65536})
    alice, _bob = await slow_reader(ctx)
    await trio.sleep(1)  # within the close grace: the write in progress may finish
    received = await read_to_end(alice)
    assert [e.name for e in received] == ["message", "error"]
    assert [c.name for c in received[1].elements()] == ["resource-constraint", "text"]


async def test_a_slow_reader_that_does_not_read_within_the_grace_is_cut_off_cleanly(
    gateway_factory: GatewayFactory, autojump_clock: trio.testing.MockClock
) -> None:
    ctx, _ = await gateway_factory(general={"hosts": ["localhost"], "send_queue_bytes": 65536})
    alice, _bob = await slow_reader(ctx)
    await trio.sleep(10)  # past the close grace
    data = b""
    while chunk := await alice.stream.receive_some():
        data += chunk
    # The write of the first message was cut off when the grace ran out (how much of it
    # a stream without buffer still hands over is its business), and nothing followed.
    assert data.startswith(b"<message") and data.count(b"<message") == 1
    assert b"stream:error" not in data


async def test_the_gate_refuses_past_its_cap_and_logs_once_per_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = ConnectionGate(2)
    with gate.admit() as first, gate.admit() as second:
        assert first and second
        with gate.admit() as third:
            assert not third
        with gate.admit() as fourth:
            assert not fourth
        assert gate.open == 2 and gate.refused == 2
    with gate.admit() as again:
        assert again and gate.open == 1
    assert ConnectionGate(0).cap == 0


def test_the_connection_cap_stays_below_the_descriptor_limit() -> None:
    assert connection_cap(0, 20_000) == 19_000
    assert connection_cap(0, 1024) == 960
    assert connection_cap(500, 1024) == 500
    assert connection_cap(50_000, 20_000) == 19_000
    assert raise_descriptor_limit() >= 1024
