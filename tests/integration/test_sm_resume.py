"""XEP-0198 end to end over loopback: enable, acks, park, resume, timeout, stale h."""

from __future__ import annotations

import ssl

import trio

from gateway.core.context import ServerContext
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from tests.helpers.accounts import PASSWORD
from tests.helpers.client import RawClient
from tests.helpers.inprocess import Connect


async def _sm_client(
    connect: Connect, user: str, tls: ssl.SSLContext, *, resource: str = "r", resume: bool = True
) -> tuple[RawClient, Element]:
    client = await connect(0)
    await client.login(user, PASSWORD, tls=tls, resource=resource)
    attrs = " resume='true'" if resume else ""
    await client.send(f"<enable xmlns='{ns.SM}'{attrs}/>")
    enabled = await client.expect(ns.SM, "enabled")
    return client, enabled


async def _resume(
    connect: Connect, user: str, tls: ssl.SSLContext, previd: str, h: int
) -> tuple[RawClient, Element]:
    client = await connect(0)
    await client.open()
    await client.starttls(tls)
    await client.open()
    assert (await client.auth(user, PASSWORD)).name == "success"
    client.parser.reset()
    features = await client.open()
    assert features.find(ns.SM, "sm") is not None
    await client.send(f"<resume xmlns='{ns.SM}' previd='{previd}' h='{h}'/>")
    return client, await client.receive()


async def _bodies(client: RawClient, count: int) -> list[str]:
    bodies: list[str] = []
    while len(bodies) < count:
        element = await client.receive()
        if element.name == "message":
            bodies.append(element.find_text(ns.CLIENT, "body") or "")
        elif element.tag == (ns.SM, "r"):
            continue
    return bodies


async def test_enable_after_bind_answers_enabled_with_id_and_max(
    connect: Connect, client_tls: ssl.SSLContext, gateway: ServerContext
) -> None:
    _client, enabled = await _sm_client(connect, "alice", client_tls)
    assert enabled.get("resume") == "true"
    assert len(enabled.get("id") or "") >= 22  # >= 128 bits, URL-safe
    assert int(enabled.get("max") or 0) == int(
        gateway.config.modules.mod_stream_management.resume_timeout
    )


async def test_abrupt_cut_then_resume_delivers_everything_exactly_once(
    connect: Connect, client_tls: ssl.SSLContext
) -> None:
    with trio.fail_after(20):
        bob, enabled = await _sm_client(connect, "bob", client_tls, resource="phone")
        smid = enabled.get("id")
        assert smid
        alice = await connect(0)
        await alice.login("alice", PASSWORD, tls=client_tls)
        for i in range(3):
            await alice.send(
                f"<message to='bob@localhost/phone' type='chat'><body>m{i}</body></message>"
            )
        assert await _bodies(bob, 3) == ["m0", "m1", "m2"]
        await bob.send(f"<a xmlns='{ns.SM}' h='2'/>")  # acks m0, m1 only
        await trio.aclose_forcefully(bob.stream)  # no </stream:stream>: the phone lost network
        for i in range(3, 6):
            await alice.send(
                f"<message to='bob@localhost/phone' type='chat'><body>m{i}</body></message>"
            )
        # The server still has the session (parked): the messages went into its buffer.
        await alice.send("<iq type='get' id='p' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
        assert (await alice.expect(ns.CLIENT, "iq")).get("id") == "p"
        bob2, answer = await _resume(connect, "bob", client_tls, smid, 2)
        assert answer.tag == (ns.SM, "resumed")
        assert answer.get("previd") == smid
        assert answer.get("h") == "0"  # bob sent no stanza before the cut
        assert await _bodies(bob2, 4) == ["m2", "m3", "m4", "m5"]


async def test_resume_with_unknown_or_foreign_id_is_item_not_found(
    connect: Connect, client_tls: ssl.SSLContext
) -> None:
    with trio.fail_after(20):
        _bob, enabled = await _sm_client(connect, "bob", client_tls)
        _, answer = await _resume(connect, "alice", client_tls, enabled.get("id") or "", 0)
        assert answer.tag == (ns.SM, "failed")
        assert answer.find(ns.STANZAS_ERRORS, "item-not-found") is not None
        _, answer = await _resume(connect, "alice", client_tls, "no-such-id", 0)
        assert answer.find(ns.STANZAS_ERRORS, "item-not-found") is not None


async def test_resume_while_old_transport_attached_closes_it_with_conflict(
    connect: Connect, client_tls: ssl.SSLContext
) -> None:
    with trio.fail_after(20):
        bob, enabled = await _sm_client(connect, "bob", client_tls)
        _bob2, answer = await _resume(connect, "bob", client_tls, enabled.get("id") or "", 0)
        assert answer.tag == (ns.SM, "resumed")
        assert await bob.expect_stream_error() == "conflict"
