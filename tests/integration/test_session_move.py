"""A session leaves a process and re-enters one in a single way: `snapshot_of`, the
snapshot codec's bytes, `read_snapshot`, `session_from` (`gateway.core.handoff`). The
restart hand-off uses it through its store; cross-node migration carries the same bytes."""

from __future__ import annotations

from gateway.config import StreamManagementConfig
from gateway.core.handoff import read_snapshot, session_from, snapshot_of
from gateway.core.session import Session
from gateway.storage.snapshot import encode_snapshot
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID
from gateway.xmpp.sm import SMState
from gateway.xmpp.sm_elements import EnableRequest

FULL = JID.parse("bob@localhost/phone")


def _message(body: str) -> Element:
    return Element(
        ns.CLIENT,
        "message",
        {"to": str(FULL), "from": "alice@localhost/desk", "type": "chat", "id": body},
        [Element(ns.CLIENT, "body", None, [body])],
    )


def _moving_session() -> Session:
    session = Session(conn_id="old", conn="tcp 192.0.2.7:4711", outgoing=None)
    session.bound(FULL)
    session.username, session.host = FULL.local, FULL.domain
    session.presence = Element(ns.CLIENT, "presence", {"from": str(FULL)})
    session.priority = 5
    session.interested = True
    session.directed = {JID.parse("room@conference.localhost/bob")}
    sm = SMState(buffer_max=100, ack_freq=1, counter_in=2**32 - 2)
    sm.enable(EnableRequest(resume=True, max=300), resume_timeout=600, new_smid=lambda: "s" * 24)
    session.sm = sm
    for body in ("m1", "m2", "m3"):
        sm.sent(_message(body))
    sm.received()
    sm.received()
    sm.received()  # the server's h wraps past 2**32
    sm.acked(1)  # m1 acked: m2 and m3 travel
    return session


def test_a_session_moved_through_its_snapshot_bytes_arrives_whole() -> None:
    session = _moving_session()
    snapshot = snapshot_of(session, expires_at=1_900_000_000.0, epoch=3, peer="192.0.2.7:4711")
    moved = read_snapshot(encode_snapshot(snapshot))
    assert moved is not None
    assert moved.full_jid == FULL
    assert moved.snapshot.epoch == 3
    assert moved.snapshot.expires_at == 1_900_000_000.0

    arrived = session_from(moved, "new", StreamManagementConfig())

    assert arrived.conn_id == "new"
    assert (arrived.username, arrived.host) == ("bob", "localhost")
    assert arrived.full_jid is None  # bound again by the process that takes it
    assert arrived.priority == 5
    assert arrived.interested is True
    assert arrived.presence is not None and arrived.presence.get("from") == str(FULL)
    assert arrived.directed == {JID.parse("room@conference.localhost/bob")}
    assert arrived.flush_pending is True  # available: offline messages follow it
    sm, old = arrived.sm, session.sm
    assert sm is not None and old is not None
    assert (sm.smid, sm.max, sm.resumable) == ("s" * 24, 300, True)
    assert sm.counter_in == old.counter_in == 1
    assert sm.counter_out == old.counter_out == 1
    assert [e.get("id") for e in sm.unacked()] == ["m2", "m3"]
    assert [e.find_text(ns.CLIENT, "body") for e in sm.unacked()] == ["m2", "m3"]
    # The client's next ack applies to the moved buffer as it would have to the old one.
    assert [e.get("id") for e in sm.acked(2)] == ["m2"]


def test_damaged_snapshot_bytes_are_refused_not_half_read() -> None:
    snapshot = snapshot_of(_moving_session(), expires_at=1.0, epoch=1, peer="p")
    data = encode_snapshot(snapshot)
    assert read_snapshot(data[: len(data) // 2]) is None
    assert read_snapshot(b"") is None
