"""XEP-0198 v1.6 as a server must honour it, and every mod_stream_management option.

Part A walks the XEP's normative statements section by section (the section is in each
test's name); part B shows the effect of each option of the seed's table (and ours:
`ack_timeout`, `max_parked_per_user`, `max_parked`, `mod_offline.max_per_user`); part C is
the ledger: nothing a session took is lost when it ends without resumption.

Every client talks to the gateway over a trio memory stream on listener 2 (`tls: none`,
SASL PLAIN), so no TLS handshakes slow the suite and `autojump_clock` can run the
timeouts (STYLE V2, V3). Conversations are scripted (STYLE V4): `Peer.sync()` first lets
every task settle, then reads what the server queued up to a barrier (an `<r/>` answered
by `<a/>` with SM on, a ping's result otherwise), so "nothing else arrived" is checkable.
"""

from __future__ import annotations

import functools
import re

import pytest
import trio
import trio.testing

from gateway.core.connection import serve_connection
from gateway.core.context import ServerContext
from gateway.net.transport import PeerInfo, StreamTransport
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from gateway.xmpp.sm import SMState
from tests.helpers.accounts import PASSWORD
from tests.helpers.client import RawClient, StreamEnd, condition_of
from tests.helpers.inprocess import Connect, GatewayFactory
from tests.helpers.sm import (
    LIMIT,
    MOD,
    PLAIN,
    RESUMABLE,
    Peer,
    authenticated,
    bodies,
    failed,
    message,
    offline_delivery,
    online,
    presences,
    requests,
    resume,
    sm_options,
    stanzas,
    stream_error,
)

# -- A. XEP-0198 v1.6, section by section ------------------------------------------------


async def test_s2_sm_feature_is_offered_only_after_authentication(
    connect: Connect,
) -> None:
    """Section 2: stream management cannot be negotiated before authentication."""
    with trio.fail_after(LIMIT):
        raw = await connect(PLAIN, memory=True)
        assert (await raw.open()).find(ns.SM, "sm") is None
        assert (await raw.auth("alice", PASSWORD, "PLAIN")).name == "success"
        raw.parser.reset()
        assert (await raw.open()).find(ns.SM, "sm") == Element(ns.SM, "sm")


async def test_s3_enable_before_bind_fails_with_unexpected_request_and_bind_still_works(
    connect: Connect,
) -> None:
    """Section 3: the server SHALL enforce "enable after binding" with `<failed/>`
    (`<unexpected-request/>`, a stanza error condition, section 6); the error is
    recoverable: the client binds and enables afterwards."""
    with trio.fail_after(LIMIT):
        peer = await authenticated(connect, "alice")
        assert await peer.enable() == failed("unexpected-request")
        assert await peer.raw.bind("pc") == "alice@localhost/pc"
        assert (await peer.enable()).tag == (ns.SM, "enabled")


async def test_s3_second_enable_fails_with_unexpected_request_and_the_session_goes_on(
    connect: Connect,
) -> None:
    """Section 3: stream management is enabled at most once per session. DESIGN section 3
    answers a second `<enable/>` with `<failed><unexpected-request/></failed>` (the XEP's
    SHOULD is a stream error; MongooseIM and Prosody answer `<failed/>`): the first SM
    state, its id and its counters, stay."""
    with trio.fail_after(LIMIT):
        alice = await online(connect, "alice", "pc", sm=RESUMABLE, priority=None)
        first_id = alice.smid
        await alice.send(f"<iq type='get' id='p1'><ping xmlns='{ns.PING}'/></iq>")
        await alice.drain()
        assert await alice.enable() == failed("unexpected-request")
        assert alice.smid == first_id
        await alice.sync()
        assert alice.server_h == 1  # the ping before the second <enable/> still counts


async def test_s3_enabled_for_resumption_has_a_fresh_unguessable_id_resume_and_max(
    connect: Connect, gateway: ServerContext
) -> None:
    """Section 3/5: with resumption the server's `<enabled/>` carries `id` (the SM-ID, here
    >= 128 random bits, URL-safe), `resume='true'` and `max`; nothing else (no `location`:
    this server never redirects resumption)."""
    with trio.fail_after(LIMIT):
        ids: list[str] = []
        for resource in ("pc", "phone"):
            raw = await connect(PLAIN, memory=True)
            await raw.login("alice", PASSWORD, resource=resource, mechanism="PLAIN")
            enabled = await Peer(raw).enable()
            assert enabled.tag == (ns.SM, "enabled")
            assert set(enabled.attrs) == {"id", "resume", "max"}
            assert enabled.get("resume") == "true"
            timeout = gateway.config.modules.mod_stream_management.resume_timeout
            assert enabled.get("max") == str(int(timeout))
            smid = enabled.get("id") or ""
            assert re.fullmatch(r"[A-Za-z0-9_-]{22,}", smid), smid
            ids.append(smid)
        assert ids[0] != ids[1]


async def test_s3_resume_1_is_the_same_as_resume_true(connect: Connect) -> None:
    """Section 3: 'resume' is an xs:boolean: '1' asks for resumption like 'true'."""
    with trio.fail_after(LIMIT):
        alice = await online(connect, "alice", "pc", priority=None)
        enabled = await alice.enable(" resume='1'")
        assert enabled.get("resume") == "true"
        assert enabled.get("id")


async def test_s3_enable_without_resume_answers_a_bare_enabled(connect: Connect) -> None:
    """Section 3: without 'resume' the stream is acked but not resumable: `<enabled/>`
    has no id, resume or max."""
    with trio.fail_after(LIMIT):
        alice = await online(connect, "alice", "pc", priority=None)
        assert await alice.enable("") == Element(ns.SM, "enabled")
        await alice.sync()
        assert alice.server_h == 0


async def test_s3_a_location_sent_by_the_client_is_ignored(connect: Connect) -> None:
    """Section 3: 'location' is the server's to give; one in `<enable/>` changes nothing."""
    with trio.fail_after(LIMIT):
        alice = await online(connect, "alice", "pc", priority=None)
        enabled = await alice.enable(" resume='true' location='198.51.100.9:5222'")
        assert enabled.tag == (ns.SM, "enabled")
        assert set(enabled.attrs) == {"id", "resume", "max"}


async def test_s3_client_max_below_resume_timeout_is_granted_and_enforced(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    """Section 3/5: the client's preferred `max` is honoured when below `resume_timeout`:
    `<enabled max=30/>`, and the parked session lives 30 s, not the configured 600 s."""
    with trio.fail_after(LIMIT * 100):
        bob = await online(connect, "bob", "phone", priority=None)
        carol = await online(connect, "carol", "phone", priority=None)
        for peer in (bob, carol):
            enabled = await peer.enable(" resume='true' max='30'")
            assert enabled.get("max") == "30"
        start = trio.current_time()
        await bob.cut()
        await carol.cut()
        await trio.sleep(start + 29 - trio.current_time())
        _, answer = await resume(connect, "bob", bob.smid, 0)
        assert answer.tag == (ns.SM, "resumed")
        await trio.sleep(start + 31 - trio.current_time())
        _, answer = await resume(connect, "carol", carol.smid, 0)
        assert answer == failed("item-not-found")


async def test_s3_client_max_above_resume_timeout_is_capped_by_it(
    gateway_factory: GatewayFactory, autojump_clock: trio.testing.MockClock
) -> None:
    """Section 3/5: the server's `max` is its own maximum: a larger client `max` gets
    `resume_timeout`, and the session is gone after it."""
    with trio.fail_after(LIMIT * 100):
        _, connect = await gateway_factory(modules=sm_options(resume_timeout=60))
        bob = await online(connect, "bob", "phone", priority=None)
        assert (await bob.enable(" resume='true' max='3600'")).get("max") == "60"
        start = trio.current_time()
        await bob.cut()
        await trio.sleep(start + 61 - trio.current_time())
        _, answer = await resume(connect, "bob", bob.smid, 0)
        assert answer == failed("item-not-found")


async def test_s4_r_is_answered_with_the_count_of_stanzas_received_since_enable(
    connect: Connect,
) -> None:
    """Section 4: h starts at 0 on `<enabled/>`, counts every stanza (message, presence,
    iq) the server handled, never a nonza, and each `<r/>` is answered with `<a h/>`."""
    with trio.fail_after(LIMIT):
        alice = await online(connect, "alice", "pc", priority=None)
        await alice.send(message("carol@localhost", "before-enable"))  # not counted
        await alice.sync()  # a ping: not counted either
        await alice.enable()
        await alice.sync()
        assert alice.server_h == 0
        await alice.send(message("carol@localhost", "m1"))
        await alice.send(f"<a xmlns='{ns.SM}' h='0'/>")  # nonza
        await alice.send("<presence/>")
        await alice.send(f"<iq type='get' id='p1'><ping xmlns='{ns.PING}'/></iq>")
        await alice.send(f"<enable xmlns='{ns.SM}'/>")  # nonza, answered <failed/>
        elements = await alice.sync()
        assert alice.server_h == 3
        assert failed("unexpected-request") in elements


async def test_s4_server_requests_acks_and_keeps_only_what_the_clients_h_did_not_cover(
    connect: Connect,
) -> None:
    """Section 4: the server asks with `<r/>`; the client's `<a h/>` (sent unasked, too)
    marks those stanzas handled. Closing then hands back only the stanzas after h: they
    reach the account's other resource (DESIGN section 3)."""
    with trio.fail_after(LIMIT):
        laptop = await online(connect, "bob", "laptop")
        alice = await online(connect, "alice", "pc", priority=None)
        phone = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        for body in ("m0", "m1", "m2"):
            await alice.send(message("bob@localhost/phone", body))
        elements = await phone.sync()
        assert bodies(elements) == ["m0", "m1", "m2"]
        assert requests(elements) == 3
        await phone.ack(1)
        await phone.close()
        assert bodies(await laptop.sync()) == ["m1", "m2"]


async def test_s4_h_wraps_to_zero_after_2_32_minus_1(
    connect: Connect, gateway: ServerContext
) -> None:
    """Section 4: h is an xs:unsignedInt that wraps to 0 after 2**32-1, on both counters."""
    gateway.new_sm_state = functools.partial(SMState, counter_in=MOD - 1, counter_out=MOD - 1)
    with trio.fail_after(LIMIT):
        alice = await online(connect, "alice", "pc", priority=None)
        await alice.enable()
        alice.h = MOD - 1
        for i in range(2):
            await alice.send(f"<iq type='get' id='w{i}'><ping xmlns='{ns.PING}'/></iq>")
        elements = await alice.sync()
        assert alice.server_h == 1  # 2**32-1, then 0, then 1
        assert len(stanzas(elements)) == 2
        assert alice.h == 1
        await alice.ack()  # h=1 acks both results across the wrap
        await alice.ack(2)  # one more than was sent
        error = await stream_error(alice)
        assert error.find(ns.SM, "handled-count-too-high") == Element(
            ns.SM, "handled-count-too-high", {"h": "2", "send-count": "1"}
        )


async def test_s5_resume_answers_resumed_with_previd_and_the_servers_h(connect: Connect) -> None:
    """Section 5: `<resume/>` after SASL, before bind: `<resumed previd h/>` where h counts
    the stanzas the server handled on the former stream; the session is back, same full
    JID, without binding."""
    with trio.fail_after(LIMIT):
        alice = await online(connect, "alice", "pc", priority=None)
        bob = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        for i in range(2):
            await bob.send(f"<iq type='get' id='b{i}'><ping xmlns='{ns.PING}'/></iq>")
        await bob.drain()
        await bob.cut()
        bob2, answer = await resume(connect, "bob", bob.smid, bob.h)
        assert answer == Element(ns.SM, "resumed", {"previd": bob.smid or "", "h": "2"})
        await alice.send(message("bob@localhost/phone", "hi"))
        await alice.sync()
        assert bodies(await bob2.sync()) == ["hi"]


async def test_s5_resume_resends_exactly_the_unacked_stanzas_in_order_with_their_ids(
    connect: Connect,
) -> None:
    """Section 5: the server handles `<resume h/>` like an `<a/>`, then re-sends every
    stanza still unacked, in order (the ones buffered while parked too), and nothing
    else; resent stanzas keep their id (DESIGN section 3)."""
    with trio.fail_after(LIMIT):
        alice = await online(connect, "alice", "pc", priority=None)
        bob = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        for i in range(5):
            await alice.send(message("bob@localhost/phone", f"m{i}"))
        assert bodies(await bob.sync()) == ["m0", "m1", "m2", "m3", "m4"]
        await bob.ack(2)
        await bob.cut()
        await alice.send(message("bob@localhost/phone", "m5"))  # while parked
        await alice.sync()
        bob2, answer = await resume(connect, "bob", bob.smid, 3)  # m2 was handled too
        assert answer.tag == (ns.SM, "resumed")
        elements = await bob2.sync()
        resent = stanzas(elements)
        assert [(e.get("id"), e.get("to")) for e in resent] == [
            (f"m{i}", "bob@localhost/phone") for i in (3, 4, 5)
        ]
        assert bodies(resent) == ["m3", "m4", "m5"]
        assert all(e.tag == (ns.SM, "r") for e in elements if e not in resent)


async def test_s5_counters_carry_over_into_the_resumed_stream(connect: Connect) -> None:
    """Section 5: sequence numbers are not reset by resumption: the server's h goes on
    from the former stream's, and so does the numbering of what it sends."""
    with trio.fail_after(LIMIT):
        bob = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        await bob.send(f"<iq type='get' id='p0'><ping xmlns='{ns.PING}'/></iq>")
        await bob.drain()
        await bob.cut()
        bob2, answer = await resume(connect, "bob", bob.smid, bob.h)
        assert answer.get("h") == "1"
        await bob2.send(f"<iq type='get' id='p1'><ping xmlns='{ns.PING}'/></iq>")
        await bob2.sync()
        assert bob2.server_h == 2
        assert bob2.h == 2
        await bob2.ack()  # the second result is stanza 2 of the session, not 1
        await bob2.ack(3)
        error = await stream_error(bob2)
        assert error.find(ns.SM, "handled-count-too-high") == Element(
            ns.SM, "handled-count-too-high", {"h": "3", "send-count": "2"}
        )


async def test_s5_parked_session_stays_available_to_the_accounts_other_resources(
    connect: Connect,
) -> None:
    """Section 5 (DESIGN section 3, resume_session): while the server waits for a resume,
    the session stays registered: the account's other resources see no unavailable
    presence, before or after the resumption."""
    with trio.fail_after(LIMIT):
        laptop = await online(connect, "bob", "laptop")
        phone = await online(connect, "bob", "phone", sm=RESUMABLE)
        assert presences(await laptop.sync()) == ["bob@localhost/phone"]
        await phone.cut()
        assert await laptop.sync() == []
        _, answer = await resume(connect, "bob", phone.smid, phone.h)
        assert answer.tag == (ns.SM, "resumed")
        assert await laptop.sync() == []


async def test_s5_resume_after_bind_fails_with_unexpected_request(connect: Connect) -> None:
    """Section 5: resumption comes instead of binding; after bind it is `<failed/>` with
    `<unexpected-request/>` and the stream goes on."""
    with trio.fail_after(LIMIT):
        bob = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        await bob.send(f"<resume xmlns='{ns.SM}' previd='{bob.smid}' h='0'/>")
        assert await bob.receive() == failed("unexpected-request")
        await bob.sync()
        assert bob.server_h == 0


async def test_s5_resume_before_authentication_is_refused(connect: Connect) -> None:
    """Section 5 (and section 9): only an authenticated entity may resume a session."""
    with trio.fail_after(LIMIT):
        bob = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        raw = await connect(PLAIN, memory=True)
        await raw.open()
        await raw.send(f"<resume xmlns='{ns.SM}' previd='{bob.smid}' h='0'/>")
        assert await raw.expect_stream_error() == "not-authorized"


async def test_s5_resume_with_an_unknown_id_fails_with_item_not_found_and_bind_still_works(
    connect: Connect,
) -> None:
    """Section 5: a previd the server does not know: `<failed><item-not-found/></failed>`
    (no h: nothing is known), and the client may bind on the same stream."""
    with trio.fail_after(LIMIT):
        peer = await authenticated(connect, "bob")
        await peer.send(f"<resume xmlns='{ns.SM}' previd='no-such-id' h='0'/>")
        assert await peer.receive() == failed("item-not-found")
        assert await peer.raw.bind("phone") == "bob@localhost/phone"


async def test_s5_resume_of_a_timed_out_session_fails_with_item_not_found(
    gateway_factory: GatewayFactory, autojump_clock: trio.testing.MockClock
) -> None:
    """Section 5: after `max` seconds the former session is gone: `<failed/>` with
    `<item-not-found/>`; without stale_h (the default) it carries no h."""
    with trio.fail_after(LIMIT * 100):
        _, connect = await gateway_factory(modules=sm_options(resume_timeout=60))
        bob = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        await bob.send(f"<iq type='get' id='p0'><ping xmlns='{ns.PING}'/></iq>")
        await bob.drain()
        await bob.cut()
        await trio.sleep(61)
        _, answer = await resume(connect, "bob", bob.smid, bob.h)
        assert answer == failed("item-not-found")


async def test_s5_resume_of_a_timed_out_session_reports_its_last_h_with_stale_h(
    gateway_factory: GatewayFactory, autojump_clock: trio.testing.MockClock
) -> None:
    """Section 5 (v1.6): when the session timed out but the server still knows its h, the
    `<failed/>` carries it so the client learns which of its stanzas arrived (stale_h)."""
    with trio.fail_after(LIMIT * 100):
        _, connect = await gateway_factory(
            modules=sm_options(resume_timeout=60, stale_h={"enabled": True})
        )
        bob = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        for i in range(3):
            await bob.send(f"<iq type='get' id='p{i}'><ping xmlns='{ns.PING}'/></iq>")
        await bob.drain()
        await bob.cut()
        await trio.sleep(61)
        _, answer = await resume(connect, "bob", bob.smid, bob.h)
        assert answer == failed("item-not-found", h=3)


async def test_s5_another_users_id_fails_exactly_like_an_unknown_one(
    gateway_factory: GatewayFactory,
) -> None:
    """Section 5 / section 9: a session can only be resumed by the entity that created it;
    another user's SM-ID, live or ended (even with its h in stale_h), is answered exactly
    like an id nobody ever had, and the owner can still resume it afterwards."""
    with trio.fail_after(LIMIT):
        _, connect = await gateway_factory(modules=sm_options(stale_h={"enabled": True}))
        parked = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        ended = await online(connect, "bob", "tablet", sm=RESUMABLE, priority=None)
        for peer in (parked, ended):
            await peer.send(f"<iq type='get' id='p'><ping xmlns='{ns.PING}'/></iq>")
            await peer.drain()
        await parked.cut()
        await ended.close()
        answers = [
            (await resume(connect, "alice", previd, 0))[1]
            for previd in (parked.smid, ended.smid, "no-such-id")
        ]
        assert answers == [failed("item-not-found")] * 3
        _, answer = await resume(connect, "bob", ended.smid, 0)
        assert answer == failed("item-not-found", h=1)  # the owner does learn h
        _, answer = await resume(connect, "bob", parked.smid, parked.h)
        assert answer.tag == (ns.SM, "resumed")


async def test_s5_a_resumed_session_can_be_resumed_again_with_the_same_id(
    connect: Connect,
) -> None:
    """Section 5: the SM-ID stays the session's: after a resumption the same previd
    resumes it again, with everything unacked resent."""
    with trio.fail_after(LIMIT):
        alice = await online(connect, "alice", "pc", priority=None)
        bob = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        for round_ in range(2):
            await bob.cut()
            await alice.send(message("bob@localhost/phone", f"m{round_}"))
            await alice.sync()
            bob, answer = await resume(connect, "bob", bob.smid, bob.h)
            assert answer.tag == (ns.SM, "resumed")
            assert bodies(await bob.sync()) == [f"m{round_}"]
            await bob.ack()


async def test_s5_resume_while_the_old_stream_is_open_closes_it_with_conflict(
    connect: Connect,
) -> None:
    """Section 5: if the former stream is still open, the server sends it a `conflict`
    stream error and closes it; the new stream gets `<resumed/>` and the unacked stanzas."""
    with trio.fail_after(LIMIT):
        alice = await online(connect, "alice", "pc", priority=None)
        bob = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        await alice.send(message("bob@localhost/phone", "m0"))
        await alice.sync()
        bob2, answer = await resume(connect, "bob", bob.smid, 0)
        assert answer.tag == (ns.SM, "resumed")
        assert condition_of(await stream_error(bob)) == "conflict"
        assert bodies(await bob2.sync()) == ["m0"]


async def test_s6_ack_with_h_too_high_is_undefined_condition_with_handled_count_too_high(
    connect: Connect,
) -> None:
    """Section 6: an `<a/>` acking more than was sent: stream error `undefined-condition`
    with `<handled-count-too-high h send-count/>`, and the stream closes. The stanza it
    falsely acked is not lost: it waits in offline storage (DESIGN section 3)."""
    with trio.fail_after(LIMIT):
        alice = await online(connect, "alice", "pc", priority=None)
        bob = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        await alice.send(message("bob@localhost/phone", "m0"))
        await alice.sync()
        assert bodies(await bob.sync()) == ["m0"]
        await bob.ack(3)
        error = await stream_error(bob)
        assert condition_of(error) == "undefined-condition"
        assert error.find(ns.SM, "handled-count-too-high") == Element(
            ns.SM, "handled-count-too-high", {"h": "3", "send-count": "1"}
        )
        again = await online(connect, "bob", "phone")
        assert offline_delivery(again.at_login) == [("m0", "localhost")]


async def test_s6_resume_with_h_too_high_is_the_same_stream_error(connect: Connect) -> None:
    """Section 6: the same applies to the h of `<resume/>`: the new stream gets the
    `undefined-condition` error; the session ends and its unacked stanza is stored."""
    with trio.fail_after(LIMIT):
        alice = await online(connect, "alice", "pc", priority=None)
        bob = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        await alice.send(message("bob@localhost/phone", "m0"))
        await alice.sync()
        await bob.cut()
        bob2 = await authenticated(connect, "bob")
        await bob2.send(f"<resume xmlns='{ns.SM}' previd='{bob.smid}' h='5'/>")
        error = await stream_error(bob2)
        assert condition_of(error) == "undefined-condition"
        assert error.find(ns.SM, "handled-count-too-high") == Element(
            ns.SM, "handled-count-too-high", {"h": "5", "send-count": "1"}
        )
        _, answer = await resume(connect, "bob", bob.smid, 1)
        assert answer == failed("item-not-found")
        again = await online(connect, "bob", "phone")
        assert offline_delivery(again.at_login) == [("m0", "localhost")]


async def test_s7_a_cleanly_closed_stream_cannot_be_resumed(connect: Connect) -> None:
    """Section 7: `</stream:stream>` finishes the session: it is not kept for resumption."""
    with trio.fail_after(LIMIT):
        bob = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        await bob.close()
        _, answer = await resume(connect, "bob", bob.smid, 0)
        assert answer == failed("item-not-found")


# -- B. The options (the seed's table, and ours) ----------------------------------------


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def test_backend_memory_keeps_sm_session_and_stale_h_in_process(
    gateway_factory: GatewayFactory,
) -> None:
    """backend=memory (the default): `sm_session` holds the SM-ID with its owner while the
    session may be resumed; when it ends the row goes and stale_h keeps `(smid, h)`."""
    with trio.fail_after(LIMIT):
        ctx, connect = await gateway_factory(
            modules=sm_options(backend="memory", stale_h={"enabled": True})
        )
        bob = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        assert bob.smid is not None
        record = await ctx.sm_sessions.lookup(bob.smid)
        assert record is not None and (record.jid, record.node) == ("bob@localhost", ctx.node)
        await bob.send(f"<iq type='get' id='p'><ping xmlns='{ns.PING}'/></iq>")
        await bob.drain()
        await bob.close()
        assert await ctx.sm_sessions.lookup(bob.smid) is None
        stale = await ctx.stale_h.get(bob.smid)
        assert stale is not None and (stale.h, stale.jid) == (1, "bob@localhost")


async def test_buffer_false_acks_but_never_offers_resumption(
    gateway_factory: GatewayFactory,
) -> None:
    """buffer=false: `<enable resume='true'/>` gets a bare `<enabled/>` (nothing could be
    resent), while acks still work both ways."""
    with trio.fail_after(LIMIT):
        _, connect = await gateway_factory(modules=sm_options(buffer=False))
        alice = await online(connect, "alice", "pc", priority=None)
        bob = await online(connect, "bob", "phone", priority=None)
        assert await bob.enable() == Element(ns.SM, "enabled")
        await alice.send(message("bob@localhost/phone", "m0"))
        await alice.sync()
        elements = await bob.sync()
        assert (bodies(elements), requests(elements)) == (["m0"], 1)
        await bob.ack()
        await bob.send(f"<iq type='get' id='p'><ping xmlns='{ns.PING}'/></iq>")
        await bob.sync()
        assert bob.server_h == 1


async def test_buffer_false_session_ends_as_soon_as_its_transport_is_lost(
    gateway_factory: GatewayFactory,
) -> None:
    """buffer=false: there is nothing to park: a lost transport ends the session at once
    (its other resources get unavailable presence without waiting `resume_timeout`)."""
    with trio.fail_after(LIMIT):
        _, connect = await gateway_factory(modules=sm_options(buffer=False))
        laptop = await online(connect, "bob", "laptop")
        phone = await online(connect, "bob", "phone", sm=RESUMABLE)
        assert presences(await laptop.sync()) == ["bob@localhost/phone"]
        await phone.cut()
        assert presences(await laptop.sync(), "unavailable") == ["bob@localhost/phone"]


async def test_buffer_false_resume_fails_with_feature_not_implemented(
    gateway_factory: GatewayFactory,
) -> None:
    """Section 5: "If the server does not support session resumption, it MUST return a
    <failed/> element, which SHOULD include an error condition of
    <feature-not-implemented/>"; then the client may bind."""
    with trio.fail_after(LIMIT):
        _, connect = await gateway_factory(modules=sm_options(buffer=False))
        peer = await authenticated(connect, "bob")
        await peer.send(f"<resume xmlns='{ns.SM}' previd='some-id' h='0'/>")
        assert await peer.receive() == failed("feature-not-implemented")
        assert await peer.raw.bind("phone") == "bob@localhost/phone"


async def test_buffer_false_stanzas_queued_but_never_written_are_still_rerouted(
    gateway_factory: GatewayFactory, nursery: trio.Nursery
) -> None:
    """buffer=false drops the copies of stanzas once written (a stated policy), but a
    stanza the server accepted and never wrote must still be rerouted when the session
    ends (the ledger, DESIGN section 3), as it is for a session without SM.

    A lockstep stream makes the server's writer block on the first write while the client
    does not read; what is routed meanwhile stays queued until the connection dies."""
    with trio.fail_after(LIMIT):
        ctx, connect = await gateway_factory(modules=sm_options(buffer=False))
        client_stream, server_stream = trio.testing.lockstep_stream_pair()
        transport = StreamTransport(server_stream, PeerInfo("192.0.2.8", 40001))
        nursery.start_soon(serve_connection, ctx, ctx.config.c2s[PLAIN], transport)
        bob = Peer(RawClient(client_stream))
        await bob.raw.login("bob", PASSWORD, resource="phone", mechanism="PLAIN")
        assert await bob.enable("") == Element(ns.SM, "enabled")
        alice = await online(connect, "alice", "pc", priority=None)
        await alice.send(message("bob@localhost/phone", "m0"))  # the writer blocks on it
        await alice.sync()
        await alice.send(message("bob@localhost/phone", "m1"))  # queued behind it
        await alice.send(message("bob@localhost/phone", "m2"))
        await alice.sync()
        await bob.cut()
        again = await online(connect, "bob", "phone")
        assert bodies(again.at_login) == ["m0", "m1", "m2"]  # in flight, then queued


async def test_buffer_max_overflow_ends_the_session_and_reroutes_to_another_resource(
    gateway_factory: GatewayFactory,
) -> None:
    """buffer_max=3: the 4th unacked stanza ends the session with stream error
    `resource-constraint`; every unacked stanza (the overflowing one too) goes to the
    account's other available resource, in order, and the session cannot be resumed."""
    with trio.fail_after(LIMIT):
        _, connect = await gateway_factory(modules=sm_options(buffer_max=3))
        laptop = await online(connect, "bob", "laptop")
        alice = await online(connect, "alice", "pc", priority=None)
        phone = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        await alice.send(message("bob@localhost/phone", "m0"))
        await alice.sync()
        assert bodies(await phone.drain()) == ["m0"]  # acked: not rerouted later
        await settle()
        for i in range(1, 4):
            await alice.send(message("bob@localhost/phone", f"m{i}"))
        await alice.sync()
        assert await laptop.sync() == []  # three unacked: within the bound
        await alice.send(message("bob@localhost/phone", "m4"))
        await alice.sync()
        assert condition_of(await stream_error(phone)) == "resource-constraint"
        assert bodies(await laptop.sync()) == ["m1", "m2", "m3", "m4"]
        _, answer = await resume(connect, "bob", phone.smid, 1)
        assert answer == failed("item-not-found")


async def test_buffer_max_overflow_without_another_resource_stores_offline(
    gateway_factory: GatewayFactory,
) -> None:
    """buffer_max: with no other available resource the rerouted stanzas go to offline
    storage and arrive, delay-stamped, at the next login."""
    with trio.fail_after(LIMIT):
        _, connect = await gateway_factory(modules=sm_options(buffer_max=3))
        alice = await online(connect, "alice", "pc", priority=None)
        phone = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        for i in range(4):
            await alice.send(message("bob@localhost/phone", f"m{i}"))
        await alice.sync()
        assert condition_of(await stream_error(phone)) == "resource-constraint"
        again = await online(connect, "bob", "phone")
        assert offline_delivery(again.at_login) == [(f"m{i}", "localhost") for i in range(4)]


async def test_buffer_max_infinity_keeps_any_number_of_unacked_stanzas(
    gateway_factory: GatewayFactory,
) -> None:
    """buffer_max=infinity: 150 unacked stanzas (past the default bound of 100) keep the
    session alive, and a resumption resends all of them."""
    with trio.fail_after(LIMIT):
        _, connect = await gateway_factory(modules=sm_options(buffer_max="infinity"))
        alice = await online(connect, "alice", "pc", priority=None)
        bob = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        sent = [f"m{i}" for i in range(150)]
        for body in sent:
            await alice.send(message("bob@localhost/phone", body))
        await alice.sync()
        assert bodies(await bob.sync()) == sent
        await bob.cut()
        bob2, answer = await resume(connect, "bob", bob.smid, 0)
        assert answer.tag == (ns.SM, "resumed")
        assert bodies(await bob2.sync()) == sent


async def test_ack_false_means_the_server_never_requests_acks(
    gateway_factory: GatewayFactory,
) -> None:
    """ack=false: no `<r/>` from the server (neither after stanzas nor after a resend),
    while the client's `<r/>` is still answered and resumption still works."""
    with trio.fail_after(LIMIT):
        _, connect = await gateway_factory(modules=sm_options(ack=False))
        alice = await online(connect, "alice", "pc", priority=None)
        bob = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        for i in range(3):
            await alice.send(message("bob@localhost/phone", f"m{i}"))
        await alice.sync()
        elements = await bob.sync()
        assert (bodies(elements), requests(elements)) == (["m0", "m1", "m2"], 0)
        assert bob.server_h == 0
        await bob.cut()
        bob2, answer = await resume(connect, "bob", bob.smid, 1)
        assert answer.tag == (ns.SM, "resumed")
        elements = await bob2.sync()
        assert (bodies(elements), requests(elements)) == (["m1", "m2"], 0)


@pytest.mark.parametrize(
    ("ack_freq", "pattern"), [(1, "mrmrmrmrmrmrmr"), (3, "mmmrmmmrm")], ids=["1", "3"]
)
async def test_ack_freq_is_the_number_of_stanzas_between_server_requests(
    gateway_factory: GatewayFactory, ack_freq: int, pattern: str
) -> None:
    """ack_freq=N: the server sends `<r/>` right after every N-th stanza."""
    with trio.fail_after(LIMIT):
        _, connect = await gateway_factory(modules=sm_options(ack_freq=ack_freq))
        alice = await online(connect, "alice", "pc", priority=None)
        bob = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        for i in range(7):
            await alice.send(message("bob@localhost/phone", f"m{i}"))
        await alice.sync()
        elements = await bob.sync()
        assert "".join("r" if e.tag == (ns.SM, "r") else e.name[0] for e in elements) == pattern


async def test_resume_timeout_ends_the_parked_session_and_hands_everything_back(
    gateway_factory: GatewayFactory, autojump_clock: trio.testing.MockClock
) -> None:
    """resume_timeout=60: the parked session lives until then (still available, still
    buffering); after it the session is gone: resumption fails, unacked messages are in
    offline storage (the account's only other resource has a negative priority), unacked
    iq requests are answered `service-unavailable` to their sender, and the other
    resources get the unavailable presence."""
    with trio.fail_after(LIMIT * 100):
        _, connect = await gateway_factory(modules=sm_options(resume_timeout=60))
        carol = await online(connect, "carol", "pc")
        laptop = await online(connect, "bob", "laptop", priority=-1)
        phone = await online(connect, "bob", "phone", sm=RESUMABLE)
        assert presences(await laptop.sync()) == ["bob@localhost/phone"]
        ping = f"<ping xmlns='{ns.PING}'/>"
        await carol.send(message("bob@localhost/phone", "m0"))
        await carol.send(f"<iq type='get' id='q0' to='bob@localhost/phone'>{ping}</iq>")
        await carol.sync()
        ids = [e.get("id") for e in stanzas(await phone.sync())]
        assert ids == ["m0", "q0"]
        start = trio.current_time()
        await phone.cut()
        await carol.send(message("bob@localhost/phone", "m1"))
        await carol.send(f"<iq type='get' id='q1' to='bob@localhost/phone'>{ping}</iq>")
        await trio.sleep(start + 59 - trio.current_time())
        assert await carol.sync() == []
        assert await laptop.sync() == []
        await trio.sleep(2)
        assert presences(await laptop.sync(), "unavailable") == ["bob@localhost/phone"]
        bounced = await carol.sync()
        assert [(e.name, e.get("type"), e.get("id"), e.get("from")) for e in bounced] == [
            ("iq", "error", f"q{i}", "bob@localhost/phone") for i in range(2)
        ]
        for iq in bounced:
            error = iq.find(ns.CLIENT, "error")
            assert error is not None
            assert error.find(ns.STANZAS_ERRORS, "service-unavailable") is not None
        _, answer = await resume(connect, "bob", phone.smid, phone.h)
        assert answer == failed("item-not-found")
        tablet = await online(connect, "bob", "tablet")
        assert offline_delivery(tablet.at_login) == [("m0", "localhost"), ("m1", "localhost")]


async def test_stale_h_is_forgotten_after_geriatric_plus_repeat_after(
    gateway_factory: GatewayFactory, autojump_clock: trio.testing.MockClock
) -> None:
    """stale_h.repeat_after=100, geriatric=200: the GC sweeps every 100 s and removes
    records older than 200 s, so a session's h is reported until its record is geriatric
    and no longer once a sweep has run after that."""
    with trio.fail_after(LIMIT * 100):
        ctx, connect = await gateway_factory(
            modules=sm_options(stale_h={"enabled": True, "repeat_after": 100, "geriatric": 200})
        )
        # Records are stamped, and aged by the GC, on the wall clock: the test's is trio's.
        ctx.wall_clock = trio.current_time
        bob = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        for i in range(2):
            await bob.send(f"<iq type='get' id='p{i}'><ping xmlns='{ns.PING}'/></iq>")
        await bob.drain()
        await bob.close()
        ended = trio.current_time()
        await trio.sleep(ended + 199 - trio.current_time())
        _, answer = await resume(connect, "bob", bob.smid, bob.h)
        assert answer == failed("item-not-found", h=2)
        await trio.sleep(ended + 200 + 100 + 1 - trio.current_time())
        _, answer = await resume(connect, "bob", bob.smid, bob.h)
        assert answer == failed("item-not-found")


async def test_ack_timeout_parks_a_client_that_stops_answering_r(
    gateway_factory: GatewayFactory, autojump_clock: trio.testing.MockClock
) -> None:
    """ack_timeout=30: an `<r/>` answered within 30 s keeps the connection; one left
    unanswered for 30 s counts as a lost transport: the server drops the connection and
    the session parks, so it can still be resumed with everything unacked resent."""
    with trio.fail_after(LIMIT * 100):
        _, connect = await gateway_factory(modules=sm_options(ack_timeout=30))
        alice = await online(connect, "alice", "pc", priority=None)
        bob = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        await alice.send(message("bob@localhost/phone", "m0"))
        await alice.sync()
        assert requests(await bob.sync()) == 1
        await trio.sleep(29)
        await bob.ack()  # just in time
        await trio.sleep(29)
        await alice.send(message("bob@localhost/phone", "m1"))
        await alice.sync()
        assert requests(await bob.sync()) == 1  # and bob never answers this one
        await trio.sleep(31)
        with pytest.raises(StreamEnd):
            await bob.raw.receive()
        bob2, answer = await resume(connect, "bob", bob.smid, 1)
        assert answer.tag == (ns.SM, "resumed")
        assert bodies(await bob2.sync()) == ["m1"]


async def test_an_r_answered_before_its_write_returned_keeps_the_connection(
    gateway_factory: GatewayFactory, autojump_clock: trio.testing.MockClock
) -> None:
    """ack_timeout=30 and a client that answers every `<r/>` at once: its `<a/>` can be
    read before the write that carried the `<r/>` returns (a slow TLS write, here a
    memory stream whose writes return a second after the client has the data). It
    counts all the same: the connection stays."""
    with trio.fail_after(LIMIT * 100):
        ctx, connect = await gateway_factory(modules=sm_options(ack_timeout=30))

        async def slow_writes(index: int = 0, *, memory: bool = False) -> RawClient:
            client_stream, server_stream = trio.testing.memory_stream_pair()
            deliver = server_stream.send_stream.send_all_hook
            assert deliver is not None

            async def deliver_then_linger() -> None:
                await deliver()
                await trio.sleep(1)

            server_stream.send_stream.send_all_hook = deliver_then_linger
            transport = StreamTransport(server_stream, PeerInfo("192.0.2.9", 40002))
            assert ctx.handler_nursery is not None
            ctx.handler_nursery.start_soon(serve_connection, ctx, ctx.config.c2s[index], transport)
            return RawClient(client_stream)

        alice = await online(connect, "alice", "pc", priority=None)
        bob = await online(slow_writes, "bob", "phone", sm=RESUMABLE, priority=None)
        got: list[str] = []
        ended: list[str] = []

        async def answer_at_once() -> None:
            h = 0
            try:
                while True:
                    element = await bob.raw.receive()
                    if element.namespace == ns.CLIENT:
                        h += 1
                        got.append(element.find_text(ns.CLIENT, "body") or "")
                    elif element.tag == (ns.SM, "r"):
                        await bob.raw.send(f"<a xmlns='{ns.SM}' h='{h}'/>")
            except StreamEnd:
                ended.append("stream ended")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_at_once)
            for n in range(3):
                await alice.send(message("bob@localhost/phone", f"m{n}"))
                await trio.sleep(100)  # over three times ack_timeout each
            nursery.cancel_scope.cancel()
        assert (got, ended) == (["m0", "m1", "m2"], [])


async def test_ack_timeout_also_covers_the_r_sent_after_a_resumption(
    gateway_factory: GatewayFactory, autojump_clock: trio.testing.MockClock
) -> None:
    """ack_timeout=30: the `<r/>` that follows the stanzas resent on resumption is an
    `<r/>` like any other: left unanswered for 30 s, the connection counts as lost."""
    with trio.fail_after(LIMIT * 100):
        _, connect = await gateway_factory(modules=sm_options(ack_timeout=30))
        alice = await online(connect, "alice", "pc", priority=None)
        bob = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        await alice.send(message("bob@localhost/phone", "m0"))
        await alice.sync()
        await bob.sync()
        await bob.cut()
        bob2, answer = await resume(connect, "bob", bob.smid, 0)
        assert answer.tag == (ns.SM, "resumed")
        elements = await bob2.sync()
        assert (bodies(elements), requests(elements)) == (["m0"], 1)
        await trio.sleep(31)  # bob2 never answers that <r/>
        with trio.move_on_after(LIMIT), pytest.raises(StreamEnd):
            await bob2.raw.receive()
        assert bob2.raw.closed


async def test_ack_timeout_ends_a_session_that_cannot_be_resumed_and_reroutes(
    gateway_factory: GatewayFactory, autojump_clock: trio.testing.MockClock
) -> None:
    """ack_timeout on a stream enabled without resumption: the session ends, and what
    the silent client never acked goes to offline storage."""
    with trio.fail_after(LIMIT * 100):
        _, connect = await gateway_factory(modules=sm_options(ack_timeout=30))
        alice = await online(connect, "alice", "pc", priority=None)
        bob = await online(connect, "bob", "phone", sm="", priority=None)
        await alice.send(message("bob@localhost/phone", "m0"))
        await alice.sync()
        assert bodies(await bob.sync()) == ["m0"]
        await trio.sleep(31)
        with pytest.raises(StreamEnd):
            await bob.raw.receive()
        again = await online(connect, "bob", "phone")
        assert offline_delivery(again.at_login) == [("m0", "localhost")]


async def test_max_parked_per_user_ends_the_oldest_parked_session_and_reroutes_it(
    gateway_factory: GatewayFactory,
) -> None:
    """max_parked_per_user=1: when a second session of bob parks, the older parked one
    ends: unavailable presence and its unacked stanzas go to bob's other resource, and
    only the newer one can be resumed."""
    with trio.fail_after(LIMIT):
        _, connect = await gateway_factory(modules=sm_options(max_parked_per_user=1))
        alice = await online(connect, "alice", "pc", priority=None)
        desk = await online(connect, "bob", "desk")
        phone = await online(connect, "bob", "phone", sm=RESUMABLE)
        tablet = await online(connect, "bob", "tablet", sm=RESUMABLE, priority=None)
        assert presences(await desk.sync()) == ["bob@localhost/phone"]
        await alice.send(message("bob@localhost/phone", "m0"))
        await alice.sync()
        assert bodies(await phone.sync()) == ["m0"]
        await phone.cut()
        assert await desk.sync() == []  # one parked session: allowed
        await tablet.cut()
        elements = await desk.sync()
        assert presences(elements, "unavailable") == ["bob@localhost/phone"]
        assert bodies(elements) == ["m0"]
        _, answer = await resume(connect, "bob", phone.smid, 0)
        assert answer == failed("item-not-found")
        _, answer = await resume(connect, "bob", tablet.smid, 0)
        assert answer.tag == (ns.SM, "resumed")


async def test_max_parked_ends_the_oldest_parked_session_of_the_node(
    gateway_factory: GatewayFactory,
) -> None:
    """max_parked=1: the node keeps one parked session; when bob's parks, alice's (parked
    earlier) ends: it cannot be resumed and its unacked message went to offline storage."""
    with trio.fail_after(LIMIT):
        _, connect = await gateway_factory(modules=sm_options(max_parked=1))
        carol = await online(connect, "carol", "pc", priority=None)
        alice = await online(connect, "alice", "phone", sm=RESUMABLE, priority=None)
        bob = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        await carol.send(message("alice@localhost/phone", "m0"))
        await carol.sync()
        assert bodies(await alice.sync()) == ["m0"]
        await alice.cut()
        await bob.cut()
        _, answer = await resume(connect, "alice", alice.smid, 0)
        assert answer == failed("item-not-found")
        _, answer = await resume(connect, "bob", bob.smid, 0)
        assert answer.tag == (ns.SM, "resumed")
        again = await online(connect, "alice", "phone")
        assert offline_delivery(again.at_login) == [("m0", "localhost")]


async def test_offline_max_per_user_bounces_messages_past_the_cap(
    gateway_factory: GatewayFactory,
) -> None:
    """mod_offline.max_per_user=2: a third message for an offline user comes back to its
    sender as an error with `service-unavailable`; the first two are delivered later."""
    with trio.fail_after(LIMIT):
        _, connect = await gateway_factory(modules={"mod_offline": {"max_per_user": 2}})
        alice = await online(connect, "alice", "pc", priority=None)
        for i in range(3):
            await alice.send(message("bob@localhost", f"m{i}"))
        (bounce,) = stanzas(await alice.sync())
        assert (bounce.name, bounce.get("type"), bounce.get("id")) == ("message", "error", "m2")
        assert bounce.get("from") == "bob@localhost"
        error = bounce.find(ns.CLIENT, "error")
        assert error is not None
        assert error.find(ns.STANZAS_ERRORS, "service-unavailable") is not None
        bob = await online(connect, "bob", "phone")
        assert offline_delivery(bob.at_login) == [("m0", "localhost"), ("m1", "localhost")]


# -- C. The ledger: nothing is lost -----------------------------------------------------


async def test_clean_close_with_unacked_stanzas_hands_them_back(connect: Connect) -> None:
    """Section 7 / DESIGN section 3: `</stream:stream>` with stanzas unacked ends the
    session without resumption, and nothing is lost: unacked messages go to offline
    storage (no other resource), an unacked iq request is answered `service-unavailable`,
    acked stanzas are not delivered twice."""
    with trio.fail_after(LIMIT):
        alice = await online(connect, "alice", "pc", priority=None)
        bob = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        for i in range(3):
            await alice.send(message("bob@localhost/phone", f"m{i}"))
        await alice.send(
            f"<iq type='get' id='q0' to='bob@localhost/phone'><ping xmlns='{ns.PING}'/></iq>"
        )
        await alice.sync()
        assert len(stanzas(await bob.sync())) == 4
        await bob.ack(1)
        await bob.close()
        (bounce,) = stanzas(await alice.sync())
        assert (bounce.name, bounce.get("type"), bounce.get("id")) == ("iq", "error", "q0")
        again = await online(connect, "bob", "phone")
        assert offline_delivery(again.at_login) == [("m1", "localhost"), ("m2", "localhost")]


async def test_message_for_a_user_without_available_resource_waits_for_initial_presence(
    connect: Connect,
) -> None:
    """RFC 6121 / XEP-0160 / XEP-0203: a message to a user with no available resource
    (here: one connected but not yet available) is stored, delivered with a `<delay/>`
    on the next initial presence, and only once."""
    with trio.fail_after(LIMIT):
        alice = await online(connect, "alice", "pc", priority=None)
        bob = await online(connect, "bob", "phone", priority=None)  # bound, not available
        await alice.send(message("bob@localhost", "m0"))
        await alice.sync()
        assert await bob.sync() == []
        await bob.send("<presence/>")
        elements = await bob.sync()
        assert offline_delivery(elements) == [("m0", "localhost")]
        (stored,) = (e for e in elements if e.name == "message")
        assert (stored.get("id"), stored.get("from")) == ("m0", "alice@localhost/pc")
        delay = stored.find(ns.DELAY, "delay")
        assert delay is not None and delay.text == "Offline Storage"
        await bob.close()
        again = await online(connect, "bob", "phone")
        assert bodies(again.at_login) == []
