"""The gate between a bound client and the router (RFC 6120 sections 8.1, 8.2)."""

from __future__ import annotations

import pytest

from gateway.errors import RemoteProtocolError, StreamErrorCondition
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from gateway.xmpp.intake import Refused, accept_stanza
from gateway.xmpp.jid import JID
from gateway.xmpp.stanza import StanzaKind

SENDER = JID.parse("juliet@example.com/balcony")


def stanza(name: str, **attrs: str) -> Element:
    return Element(ns.CLIENT, name, attrs, [Element(ns.CLIENT, "body", None, ["hi"])])


def condition(result: Element | Refused) -> str | None:
    assert isinstance(result, Refused) and result.reply is not None
    error = result.reply.find(ns.CLIENT, "error")
    assert error is not None
    return next(error.elements()).name


@pytest.mark.parametrize("claimed", [None, "juliet@example.com/balcony", "juliet@example.com"])
def test_an_accepted_stanza_is_stamped_with_the_senders_full_jid(claimed: str | None) -> None:
    attrs = {"to": "romeo@example.net"} | ({"from": claimed} if claimed else {})
    result = accept_stanza(stanza("message", **attrs), StanzaKind.MESSAGE, SENDER, "example.com")
    assert isinstance(result, Element)
    assert result.get("from") == "juliet@example.com/balcony"
    assert result.get("to") == "romeo@example.net"


@pytest.mark.parametrize("claimed", ["romeo@example.net", "juliet@example.com/other", "@@"])
def test_a_stanza_claiming_another_sender_is_invalid_from(claimed: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        accept_stanza(stanza("message", **{"from": claimed}), StanzaKind.MESSAGE, SENDER, "x")
    assert info.value.condition is StreamErrorCondition.INVALID_FROM


@pytest.mark.parametrize("attrs", [{"type": "get"}, {"id": "1"}, {"id": "1", "type": "nope"}])
def test_an_iq_without_id_or_known_type_is_bad_request(attrs: dict[str, str]) -> None:
    result = accept_stanza(stanza("iq", **attrs), StanzaKind.IQ, SENDER, "example.com")
    assert condition(result) == "bad-request"
    assert isinstance(result, Refused) and result.reply is not None
    assert result.reply.get("from") == "example.com"


def test_a_malformed_to_is_jid_malformed() -> None:
    result = accept_stanza(stanza("message", to="a@b@c"), StanzaKind.MESSAGE, SENDER, "x")
    assert condition(result) == "jid-malformed"


def test_error_stanzas_are_dropped_not_answered() -> None:
    bad_iq = stanza("iq", type="error")
    assert accept_stanza(bad_iq, StanzaKind.IQ, SENDER, "x") == Refused(None)
    bad_to = stanza("message", type="error", to="a@b@c")
    assert accept_stanza(bad_to, StanzaKind.MESSAGE, SENDER, "x") == Refused(None)
