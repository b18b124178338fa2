"""The metrics registry in a running gateway: the ledger of DESIGN section 3 and the
counters that replaced the loose integers (`gateway.core.metrics`).

Conversations as in `test_sm_spec.py` (memory streams, scripted peers). Each test reads
the registry before and after and checks the difference, so what other sessions did
before does not matter.
"""

from __future__ import annotations

import trio

from gateway.core.context import ServerContext
from gateway.core.metrics import DropPolicy, LedgerState, ResumeFailure
from gateway.errors import StanzaErrorCondition
from gateway.xmpp import namespaces as ns
from gateway.xmpp.stanza import StanzaKind
from tests.helpers.inprocess import Connect
from tests.helpers.sm import LIMIT, RESUMABLE, bodies, message, online, resume, stanzas


def _changes(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The samples that moved between two snapshots, by how much."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


async def _end_with_unacked(connect: Connect, gateway: ServerContext) -> dict[str, int]:
    """bob's phone (SM, not available, no other resource) takes three messages, an iq
    request and a directed presence, acks none of them and closes its stream: the
    session ends without resumption. Returns the registry's changes from the session's
    end alone."""
    alice = await online(connect, "alice", "pc", priority=None)
    phone = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
    for i in range(3):
        await alice.send(message("bob@localhost/phone", f"m{i}"))
    await alice.send(
        f"<iq type='get' id='q0' to='bob@localhost/phone'><ping xmlns='{ns.PING}'/></iq>"
    )
    await alice.send("<presence to='bob@localhost/phone'/>")
    await alice.sync()
    assert len(stanzas(await phone.sync())) == 5
    before = gateway.metrics.snapshot()
    await phone.close()
    (bounce,) = stanzas(await alice.sync())
    assert (bounce.name, bounce.get("type"), bounce.get("id")) == ("iq", "error", "q0")
    return _changes(before, gateway.metrics.snapshot())


async def test_a_session_ending_with_unacked_stanzas_stores_bounces_and_drops_them(
    connect: Connect, gateway: ServerContext
) -> None:
    """The router's counters see each unacked stanza of an ended session once: the
    messages stored offline, the iq request bounced, the presence dropped by policy."""
    with trio.fail_after(LIMIT):
        metrics, policy = gateway.metrics, DropPolicy.UNDELIVERABLE_AFTER_SESSION_END
        dropped = metrics.dropped.value(policy=policy)
        moved = await _end_with_unacked(connect, gateway)
        assert moved["xmpp_offline_stored_total"] == 3
        assert moved['xmpp_stanzas_bounced_total{condition="service-unavailable"}'] == 1
        assert metrics.bounced.value(condition=StanzaErrorCondition.SERVICE_UNAVAILABLE) >= 1
        assert metrics.dropped.value(policy=policy) == dropped + 1


async def test_unacked_stanzas_of_an_ended_session_move_into_their_ledger_states(
    connect: Connect, gateway: ServerContext
) -> None:
    """DESIGN section 3: three unacked messages end stored offline, the iq request
    bounced, the presence dropped: each counted once in the ledger."""
    with trio.fail_after(LIMIT):
        moved = await _end_with_unacked(connect, gateway)
        ledger = {k: v for k, v in moved.items() if k.startswith("xmpp_ledger_")}
        assert ledger == {
            'xmpp_ledger_stanzas_total{state="stored_offline"}': 3,
            'xmpp_ledger_stanzas_total{state="bounced"}': 1,
            'xmpp_ledger_stanzas_total{state="dropped"}': 1,
        }


async def test_a_resume_counts_what_its_h_acknowledges_as_acked(
    connect: Connect, gateway: ServerContext
) -> None:
    """XEP-0198 section 5: `<resume h='2'/>` acks two of three buffered messages (ledger:
    acked), the third is resent; one resumption, no failure."""
    with trio.fail_after(LIMIT):
        metrics = gateway.metrics
        alice = await online(connect, "alice", "pc", priority=None)
        phone = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        out_before = metrics.stanzas_out.value(kind=StanzaKind.MESSAGE)
        for i in range(3):
            await alice.send(message("bob@localhost/phone", f"m{i}"))
        await alice.sync()
        assert bodies(await phone.sync()) == ["m0", "m1", "m2"]
        assert metrics.stanzas_out.value(kind=StanzaKind.MESSAGE) == out_before + 3
        await phone.cut()
        before = metrics.snapshot()
        phone2, answer = await resume(connect, "bob", phone.smid, 2)
        assert answer.tag == (ns.SM, "resumed")
        assert bodies(await phone2.sync()) == ["m2"]
        assert _changes(before, metrics.snapshot()) == {
            'xmpp_ledger_stanzas_total{state="acked"}': 2,
            "xmpp_sm_resumed_total": 1,
        }


async def test_acks_and_stanzas_from_clients_are_counted(
    connect: Connect, gateway: ServerContext
) -> None:
    """`<a h='2'/>` moves two stanzas into the ledger as acked; the three messages alice
    sends are counted in."""
    with trio.fail_after(LIMIT):
        metrics = gateway.metrics
        alice = await online(connect, "alice", "pc", priority=None)
        phone = await online(connect, "bob", "phone", sm=RESUMABLE, priority=None)
        before = metrics.snapshot()
        for i in range(3):
            await alice.send(message("bob@localhost/phone", f"m{i}"))
        await alice.sync()
        assert len(stanzas(await phone.sync())) == 3
        await phone.ack(2)
        await phone.sync()
        moved = _changes(before, metrics.snapshot())
        assert moved['xmpp_stanzas_in_total{kind="message"}'] == 3
        assert moved['xmpp_ledger_stanzas_total{state="acked"}'] == 2
        assert metrics.ledger.value(state=LedgerState.ACKED) >= 2


async def test_a_resume_of_an_unknown_id_is_counted_with_its_reason(
    connect: Connect, gateway: ServerContext
) -> None:
    """XEP-0198 section 5: `<failed/>` for an id nobody knows counts as unknown_smid."""
    with trio.fail_after(LIMIT):
        failed = gateway.metrics.resume_failed
        before = failed.value(reason=ResumeFailure.UNKNOWN_SMID)
        _, answer = await resume(connect, "bob", "no-such-id", 0)
        assert answer.tag == (ns.SM, "failed")
        assert failed.value(reason=ResumeFailure.UNKNOWN_SMID) == before + 1
