"""C2S over loopback TCP and memory streams: negotiation, errors, routing, shutdown."""

from __future__ import annotations

import base64
import ssl

import pytest
import trio
import trustme

from gateway.core.context import ServerContext
from gateway.xmpp import namespaces as ns
from tests.helpers.accounts import PASSWORD
from tests.helpers.client import RawClient, StreamEnd, mechanisms
from tests.helpers.inprocess import Connect


async def _logged_in(connect: Connect, user: str, tls: ssl.SSLContext, **kw: object) -> RawClient:
    client = await connect(0)
    await client.login(user, PASSWORD, tls=tls, **kw)  # type: ignore[arg-type]
    return client


async def test_starttls_listener_offers_tls_and_scram_but_not_plain_before_tls(
    connect: Connect,
) -> None:
    client = await connect(0)
    features = await client.open()
    assert features.find(ns.TLS, "starttls") is not None
    assert mechanisms(features) == ["SCRAM-SHA-256", "SCRAM-SHA-1"]


async def test_plain_is_offered_after_tls(connect: Connect, client_tls: ssl.SSLContext) -> None:
    client = await connect(0)
    await client.open()
    await client.starttls(client_tls)
    features = await client.open()
    assert features.find(ns.TLS, "starttls") is None
    assert "PLAIN" in mechanisms(features)


async def test_login_with_each_mechanism_binds_a_resource(
    connect: Connect, client_tls: ssl.SSLContext
) -> None:
    for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"):
        client = await connect(0)
        jid = await client.login(
            "alice", PASSWORD, tls=client_tls, resource="r1", mechanism=mechanism
        )
        assert jid == "alice@localhost/r1"
        await client.close()


async def test_server_generates_a_resource_when_none_is_asked(
    connect: Connect, client_tls: ssl.SSLContext
) -> None:
    client = await _logged_in(connect, "alice", client_tls)
    assert client.jid is not None and client.jid.startswith("alice@localhost/")
    assert len(client.jid) > len("alice@localhost/")


async def test_required_listener_refuses_auth_before_tls(connect: Connect) -> None:
    client = await connect(1)
    features = await client.open()
    starttls = features.find(ns.TLS, "starttls")
    assert starttls is not None and starttls.find(ns.TLS, "required") is not None
    assert features.find(ns.SASL, "mechanisms") is None
    failure = await client.auth("alice", PASSWORD)
    assert failure.name == "failure"
    assert failure.find(ns.SASL, "encryption-required") is not None


async def test_plain_refused_without_tls_on_starttls_listener(connect: Connect) -> None:
    client = await connect(0)
    await client.open()
    failure = await client.auth("alice", PASSWORD, "PLAIN")
    assert failure.find(ns.SASL, "encryption-required") is not None


async def test_plain_allowed_on_tls_none_listener(connect: Connect) -> None:
    client = await connect(2)
    features = await client.open()
    assert "PLAIN" in mechanisms(features)
    assert (await client.auth("bob", PASSWORD, "PLAIN")).name == "success"


async def test_wrong_password_fails_and_too_many_failures_close_the_stream(
    connect: Connect, client_tls: ssl.SSLContext
) -> None:
    client = await connect(0)
    await client.open()
    await client.starttls(client_tls)
    await client.open()
    for _ in range(2):
        failure = await client.auth("alice", "wrong")
        assert failure.find(ns.SASL, "not-authorized") is not None
    failure = await client.auth("alice", "wrong")
    assert failure.name == "failure"
    assert await client.expect_stream_error() == "policy-violation"


async def test_unknown_user_fails_like_a_wrong_password(
    connect: Connect, client_tls: ssl.SSLContext
) -> None:
    client = await connect(0)
    await client.open()
    await client.starttls(client_tls)
    await client.open()
    failure = await client.auth("nobody", "whatever")
    assert failure.find(ns.SASL, "not-authorized") is not None


@pytest.mark.parametrize(
    ("header", "condition"),
    [
        (
            "<stream:stream to='localhost' version='1.0' xmlns='jabber:client' "
            "xmlns:stream='urn:wrong'>",
            "invalid-namespace",
        ),
        (
            "<stream:stream to='localhost' version='1.0' xmlns='jabber:server' "
            "xmlns:stream='http://etherx.jabber.org/streams'>",
            "invalid-namespace",
        ),
        (
            "<stream:stream to='elsewhere.example' version='1.0' xmlns='jabber:client' "
            "xmlns:stream='http://etherx.jabber.org/streams'>",
            "host-unknown",
        ),
        (
            "<stream:stream to='localhost' xmlns='jabber:client' "
            "xmlns:stream='http://etherx.jabber.org/streams'>",
            "unsupported-version",
        ),
        ("this is not xml <<<", "not-well-formed"),
        ("<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'b'>]><x/>", "restricted-xml"),
    ],
)
async def test_bad_stream_headers_get_stream_errors(
    connect: Connect, header: str, condition: str
) -> None:
    client = await connect(0)
    await client.send(header)
    assert await client.expect_stream_error() == condition


async def test_stanza_before_auth_is_not_authorized(connect: Connect) -> None:
    client = await connect(0)
    await client.open()
    await client.send("<message to='bob@localhost'><body>hi</body></message>")
    assert await client.expect_stream_error() == "not-authorized"


async def test_oversized_stanza_is_a_policy_violation_and_others_keep_working(
    connect: Connect, client_tls: ssl.SSLContext, gateway: ServerContext
) -> None:
    alice = await _logged_in(connect, "alice", client_tls)
    bob = await _logged_in(connect, "bob", client_tls)
    big = "x" * (gateway.config.general.max_stanza_size + 10)
    await alice.send(f"<message to='bob@localhost'><body>{big}</body></message>")
    assert await alice.expect_stream_error() == "policy-violation"
    # The server still serves bob.
    await bob.send("<iq type='get' id='p1' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    pong = await bob.expect(ns.CLIENT, "iq")
    assert pong.get("type") == "result" and pong.get("id") == "p1"


async def test_garbage_after_login_is_not_well_formed(
    connect: Connect, client_tls: ssl.SSLContext
) -> None:
    client = await _logged_in(connect, "alice", client_tls)
    await client.send("<message><body>unterminated</message>")
    assert await client.expect_stream_error() == "not-well-formed"


async def test_two_users_exchange_messages_and_presence(
    connect: Connect, client_tls: ssl.SSLContext
) -> None:
    alice = await _logged_in(connect, "alice", client_tls, resource="phone")
    bob = await _logged_in(connect, "bob", client_tls, resource="laptop")
    await bob.send("<presence/>")
    reflected = await bob.expect(ns.CLIENT, "presence")
    assert reflected.get("from") == "bob@localhost/laptop"

    await alice.send(
        "<message to='bob@localhost' type='chat' id='m1'><body>hello &amp; welcome</body></message>"
    )
    msg = await bob.expect(ns.CLIENT, "message")
    assert msg.get("from") == "alice@localhost/phone"
    assert msg.get("id") == "m1"
    assert msg.find_text(ns.CLIENT, "body") == "hello & welcome"

    # Directed presence from alice reaches bob's full JID.
    await alice.send("<presence to='bob@localhost/laptop'/>")
    presence = await bob.expect(ns.CLIENT, "presence")
    assert presence.get("from") == "alice@localhost/phone"
    # And alice's unavailable follows it when she leaves.
    await alice.close()
    gone = await bob.expect(ns.CLIENT, "presence")
    assert gone.get("type") == "unavailable" and gone.get("from") == "alice@localhost/phone"


async def test_initial_presence_is_broadcast_to_own_resources(
    connect: Connect, client_tls: ssl.SSLContext
) -> None:
    one = await _logged_in(connect, "carol", client_tls, resource="one")
    await one.send("<presence><priority>5</priority></presence>")
    await one.expect(ns.CLIENT, "presence")  # reflection
    two = await _logged_in(connect, "carol", client_tls, resource="two")
    await two.send("<presence/>")
    got = {(await two.expect(ns.CLIENT, "presence")).get("from") for _ in range(2)}
    assert got == {"carol@localhost/one", "carol@localhost/two"}
    seen_by_one = await one.expect(ns.CLIENT, "presence")
    assert seen_by_one.get("from") == "carol@localhost/two"
    await two.send("<presence type='unavailable'/>")
    gone = await one.expect(ns.CLIENT, "presence")
    assert gone.get("type") == "unavailable" and gone.get("from") == "carol@localhost/two"


async def test_message_to_bare_jid_goes_to_highest_priority_resource(
    connect: Connect, client_tls: ssl.SSLContext
) -> None:
    low = await _logged_in(connect, "carol", client_tls, resource="low")
    await low.send("<presence><priority>1</priority></presence>")
    await low.expect(ns.CLIENT, "presence")
    high = await _logged_in(connect, "carol", client_tls, resource="high")
    await high.send("<presence><priority>10</priority></presence>")
    for _ in range(2):
        await high.expect(ns.CLIENT, "presence")
    await low.expect(ns.CLIENT, "presence")
    alice = await _logged_in(connect, "alice", client_tls)
    await alice.send("<message to='carol@localhost' type='chat'><body>x</body></message>")
    msg = await high.expect(ns.CLIENT, "message")
    assert msg.find_text(ns.CLIENT, "body") == "x"
    # low got nothing: its next element is the answer to a ping we send now.
    await low.send("<iq type='get' id='p' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    assert (await low.receive()).name == "iq"


async def test_message_to_offline_user_is_stored_and_delivered_with_delay_on_login(
    connect: Connect, client_tls: ssl.SSLContext
) -> None:
    alice = await _logged_in(connect, "alice", client_tls)
    await alice.send("<message to='bob@localhost' type='chat' id='x1'><body>hi</body></message>")
    # XEP-0160: stored, no error; bob gets it with a XEP-0203 stamp on initial presence.
    await alice.send("<iq type='get' id='p' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    assert (await alice.expect(ns.CLIENT, "iq")).get("id") == "p"
    bob = await _logged_in(connect, "bob", client_tls)
    await bob.send("<presence/>")
    got = [await bob.receive() for _ in range(2)]
    message = next(e for e in got if e.name == "message")
    assert message.get("id") == "x1" and message.find_text(ns.CLIENT, "body") == "hi"
    delay = message.find(ns.DELAY, "delay")
    assert delay is not None and delay.get("from") == "localhost" and delay.get("stamp")


async def test_message_to_unknown_account_is_service_unavailable(
    connect: Connect, client_tls: ssl.SSLContext
) -> None:
    alice = await _logged_in(connect, "alice", client_tls)
    await alice.send("<message to='nobody@localhost' type='chat' id='x2'><body>hi</body></message>")
    error = await alice.expect(ns.CLIENT, "message")
    assert error.get("type") == "error" and error.get("id") == "x2"
    err = error.find(ns.CLIENT, "error")
    assert err is not None and err.find(ns.STANZAS_ERRORS, "service-unavailable") is not None


async def test_stanza_errors_for_unknown_domain_bad_jid_and_unknown_iq(
    connect: Connect, client_tls: ssl.SSLContext
) -> None:
    alice = await _logged_in(connect, "alice", client_tls)
    await alice.send("<message to='x@remote.example' id='r1'><body>hi</body></message>")
    reply = await alice.expect(ns.CLIENT, "message")
    assert reply.find(ns.CLIENT, "error").find(ns.STANZAS_ERRORS, "remote-server-not-found")  # type: ignore[union-attr]
    await alice.send("<message to='a@b@c' id='r2'><body>hi</body></message>")
    reply = await alice.expect(ns.CLIENT, "message")
    assert reply.find(ns.CLIENT, "error").find(ns.STANZAS_ERRORS, "jid-malformed")  # type: ignore[union-attr]
    await alice.send("<iq type='get' id='r3' to='localhost'><query xmlns='urn:example:nope'/></iq>")
    reply = await alice.expect(ns.CLIENT, "iq")
    assert reply.get("type") == "error"
    assert reply.find(ns.CLIENT, "error").find(ns.STANZAS_ERRORS, "service-unavailable")  # type: ignore[union-attr]


async def test_iq_between_resources_and_to_missing_resource(
    connect: Connect, client_tls: ssl.SSLContext
) -> None:
    alice = await _logged_in(connect, "alice", client_tls, resource="a")
    bob = await _logged_in(connect, "bob", client_tls, resource="b")
    await alice.send(
        "<iq type='get' id='v1' to='bob@localhost/b'><query xmlns='jabber:iq:version'/></iq>"
    )
    request = await bob.expect(ns.CLIENT, "iq")
    assert request.get("from") == "alice@localhost/a"
    await bob.send("<iq type='result' id='v1' to='alice@localhost/a'/>")
    answer = await alice.expect(ns.CLIENT, "iq")
    assert answer.get("type") == "result" and answer.get("from") == "bob@localhost/b"
    await alice.send(
        "<iq type='get' id='v2' to='bob@localhost/gone'><query xmlns='jabber:iq:version'/></iq>"
    )
    error = await alice.expect(ns.CLIENT, "iq")
    assert error.get("type") == "error"


async def test_disco_and_ping_and_legacy_session(
    connect: Connect, client_tls: ssl.SSLContext
) -> None:
    alice = await _logged_in(connect, "alice", client_tls)
    await alice.send(
        "<iq type='set' id='s'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>"
    )
    assert (await alice.expect(ns.CLIENT, "iq")).get("type") == "result"
    await alice.send(f"<iq type='get' id='d' to='localhost'><query xmlns='{ns.DISCO_INFO}'/></iq>")
    info = await alice.expect(ns.CLIENT, "iq")
    query = info.find(ns.DISCO_INFO, "query")
    assert query is not None
    features = {f.get("var") for f in query.find_all(ns.DISCO_INFO, "feature")}
    assert {ns.DISCO_INFO, ns.PING} <= features
    identity = query.find(ns.DISCO_INFO, "identity")
    assert identity is not None and identity.get("category") == "server"


async def test_roster_set_get_and_push(connect: Connect, client_tls: ssl.SSLContext) -> None:
    alice = await _logged_in(connect, "alice", client_tls)
    await alice.send(f"<iq type='get' id='r1'><query xmlns='{ns.ROSTER}'/></iq>")
    empty = await alice.expect(ns.CLIENT, "iq")
    assert empty.find(ns.ROSTER, "query") is not None
    await alice.send(
        f"<iq type='set' id='r2'><query xmlns='{ns.ROSTER}'>"
        "<item jid='bob@localhost' name='Bob'><group>Friends</group></item></query></iq>"
    )
    got = [await alice.expect(ns.CLIENT, "iq") for _ in range(2)]
    push = next(i for i in got if i.get("type") == "set")
    result = next(i for i in got if i.get("type") == "result")
    assert result.get("id") == "r2"
    item = push.find(ns.ROSTER, "query").find(ns.ROSTER, "item")  # type: ignore[union-attr]
    assert item is not None and item.get("jid") == "bob@localhost" and item.get("name") == "Bob"
    await alice.send(f"<iq type='get' id='r3'><query xmlns='{ns.ROSTER}'/></iq>")
    roster = await alice.expect(ns.CLIENT, "iq")
    items = roster.find(ns.ROSTER, "query").find_all(ns.ROSTER, "item")  # type: ignore[union-attr]
    assert [i.get("jid") for i in items] == ["bob@localhost"]


async def test_binding_a_resource_in_use_ends_the_older_session_with_conflict(
    connect: Connect, client_tls: ssl.SSLContext
) -> None:
    first = await _logged_in(connect, "alice", client_tls, resource="same")
    second = await _logged_in(connect, "alice", client_tls, resource="same")
    assert await first.expect_stream_error() == "conflict"
    assert second.jid == "alice@localhost/same"
    await second.send("<iq type='get' id='p' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    assert (await second.expect(ns.CLIENT, "iq")).get("type") == "result"


async def test_spoofed_from_is_invalid_from(connect: Connect, client_tls: ssl.SSLContext) -> None:
    alice = await _logged_in(connect, "alice", client_tls)
    await alice.send(
        "<message from='bob@localhost/x' to='carol@localhost'><body>x</body></message>"
    )
    assert await alice.expect_stream_error() == "invalid-from"


async def test_client_close_is_answered_with_close(
    connect: Connect, client_tls: ssl.SSLContext
) -> None:
    alice = await _logged_in(connect, "alice", client_tls)
    await alice.send("</stream:stream>")
    with pytest.raises(StreamEnd):
        await alice.receive()


async def test_negotiation_timeout_is_connection_timeout(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    client = await connect(0, memory=True)
    await client.open()
    # Nothing more: after negotiation_timeout (virtual time) the server gives up.
    assert await client.expect_stream_error() == "connection-timeout"


async def test_memory_stream_session_with_tls(connect: Connect, client_tls: ssl.SSLContext) -> None:
    client = await connect(0, memory=True)
    jid = await client.login("bob", PASSWORD, tls=client_tls, resource="mem")
    assert jid == "bob@localhost/mem"


async def test_conflict_replacement_does_not_announce_the_new_session_offline(
    connect: Connect, client_tls: ssl.SSLContext
) -> None:
    with trio.fail_after(10):
        observer = await _logged_in(connect, "alice", client_tls, resource="obs")
        await observer.send("<presence/>")
        await observer.expect(ns.CLIENT, "presence")
        old = await _logged_in(connect, "alice", client_tls, resource="same")
        await old.send("<presence/>")
        await observer.expect(ns.CLIENT, "presence")  # old available
        new = await _logged_in(connect, "alice", client_tls, resource="same")
        assert await old.expect_stream_error() == "conflict"
        gone = await observer.expect(ns.CLIENT, "presence")
        assert gone.get("type") == "unavailable"  # the old one left...
        await new.send("<presence/>")
        back = await observer.expect(ns.CLIENT, "presence")
        assert back.get("type") is None  # ...and the new one is available, last word
        await observer.send(
            "<iq type='get' id='p' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
        )
        assert (await observer.expect(ns.CLIENT, "iq")).get("id") == "p"  # nothing else came


async def test_data_pipelined_after_sasl_success_is_a_stream_error_not_a_hang(
    connect: Connect,
) -> None:
    with trio.fail_after(10):
        client = await connect(2)
        await client.open()
        plain = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
        await client.send(
            f"<auth xmlns='{ns.SASL}' mechanism='PLAIN'>{plain}</auth>"
            "<stream:stream to='localhost' version='1.0' xmlns='jabber:client' "
            "xmlns:stream='http://etherx.jabber.org/streams'>"
        )
        assert await client.expect_stream_error() == "policy-violation"


async def test_iq_without_id_is_bad_request(connect: Connect, client_tls: ssl.SSLContext) -> None:
    alice = await _logged_in(connect, "alice", client_tls)
    await alice.send("<iq type='get' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    reply = await alice.expect(ns.CLIENT, "iq")
    assert reply.get("type") == "error"
    assert reply.find(ns.CLIENT, "error").find(ns.STANZAS_ERRORS, "bad-request") is not None  # type: ignore[union-attr]


async def test_stream_to_a_full_jid_is_host_unknown(connect: Connect) -> None:
    client = await connect(0)
    await client.send(
        "<stream:stream to='alice@localhost/x' version='1.0' xmlns='jabber:client' "
        "xmlns:stream='http://etherx.jabber.org/streams'>"
    )
    assert await client.expect_stream_error() == "host-unknown"


async def test_directed_presence_targets_are_bounded(
    connect: Connect, client_tls: ssl.SSLContext
) -> None:
    from gateway.core.presence import MAX_DIRECTED

    alice = await _logged_in(connect, "alice", client_tls)
    await alice.send("".join(f"<presence to='u{i}@localhost'/>" for i in range(MAX_DIRECTED + 1)))
    error = await alice.expect(ns.CLIENT, "presence")
    assert error.get("type") == "error"
    assert error.find(ns.CLIENT, "error").find(ns.STANZAS_ERRORS, "resource-constraint") is not None  # type: ignore[union-attr]


async def test_direct_tls_listener_negotiates_alpn_xmpp_client_and_offers_no_starttls(
    gateway: ServerContext, ca: trustme.CA
) -> None:
    """XEP-0368: TLS from the first byte, ALPN "xmpp-client"; the stream inside is secure."""
    with trio.fail_after(10):
        context = ssl.create_default_context()
        ca.configure_trust(context)
        context.set_alpn_protocols(["xmpp-client"])
        tcp = await trio.open_tcp_stream("127.0.0.1", gateway.listen_ports[3])
        tls = trio.SSLStream(tcp, context, server_hostname="localhost")
        await tls.do_handshake()
        assert tls.selected_alpn_protocol() == "xmpp-client"
        client = RawClient(tls)
        features = await client.open()
        assert features.find(ns.TLS, "starttls") is None
        assert "PLAIN" in mechanisms(features)
        assert (await client.auth("alice", PASSWORD, "PLAIN")).name == "success"
        client.parser.reset()
        await client.open()
        assert await client.bind("direct") == "alice@localhost/direct"
        await client.close()
