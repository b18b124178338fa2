"""Memory held by the stream parser and by elements: the costs, the stanza budget, the
size limit that changes at authentication, and freeing a parser without the cyclic GC."""

from __future__ import annotations

import gc
import tracemalloc
import weakref

import pytest

from gateway.errors import RemoteProtocolError, StreamErrorCondition
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import ELEMENT_COST, TEXT_COST, Element
from gateway.xmpp.framing import WebSocketFraming
from gateway.xmpp.parser import STANZA_MEMORY_FACTOR, ElementReceived, StreamParser

HEADER = (
    b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'"
    b" to='example.com' version='1.0'>"
)


def opened(max_stanza_size: int = 262144) -> StreamParser:
    parser = StreamParser(max_stanza_size=max_stanza_size, max_depth=32)
    parser.feed(HEADER)
    return parser


def test_many_empty_children_are_refused_once_they_pass_the_memory_budget() -> None:
    # 65,000 <a/> are 260 KB on the wire (under the size limit) but were ~13 MB of objects.
    parser = opened()
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError) as info:
            parser.feed(b"<message>" + b"<a/>" * 65_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.condition is StreamErrorCondition.POLICY_VIOLATION
    assert info.value.text == "stanza takes too much memory"
    budget = STANZA_MEMORY_FACTOR * 262144
    # The budget plus what one feed() call and expat hold besides.
    assert peak < budget + 1_500_000, peak


def test_many_attributes_on_one_element_count_against_the_budget() -> None:
    parser = opened(max_stanza_size=65536)
    attrs = b" ".join(b"a%d=''" % i for i in range(8000))  # ~60 KB, under the size limit
    with pytest.raises(RemoteProtocolError) as info:
        parser.feed(b"<message " + attrs + b"/>")
    assert info.value.text == "stanza takes too much memory"


def test_a_stanza_under_the_budget_is_unchanged() -> None:
    parser = opened()
    [event] = parser.feed(b"<message>" + b"<a/>" * 5000 + b"</message>")
    assert isinstance(event, ElementReceived)
    assert len(event.element.children) == 5000


def test_text_trickled_in_small_pieces_is_joined_instead_of_refused() -> None:
    # Two bytes per feed: 120,000 pieces whose objects alone would pass the budget.
    parser = opened()
    parser.feed(b"<message><body>")
    for _ in range(120_000):
        assert parser.feed(b"xy") == []
    [event] = parser.feed(b"</body></message>")
    assert isinstance(event, ElementReceived)
    body = event.element.children[0]
    assert isinstance(body, Element) and body.text == "xy" * 120_000
    assert body.children == ("xy" * 120_000,)


def test_the_budget_is_charged_again_for_each_stanza() -> None:
    parser = opened(max_stanza_size=16384)
    stanza = b"<message>" + b"<a/>" * 500 + b"</message>"  # ~100 KB of a 128 KB budget
    for _ in range(20):
        [event] = parser.feed(stanza)
        assert isinstance(event, ElementReceived)


def test_set_max_stanza_size_changes_the_size_limit_and_the_budget() -> None:
    parser = opened(max_stanza_size=8192)
    with pytest.raises(RemoteProtocolError) as info:
        parser.feed(b"<message><body>" + b"x" * 9000 + b"</body></message>")
    assert info.value.text == "stanza too large"
    parser = opened(max_stanza_size=8192)
    parser.set_max_stanza_size(262144)
    [event] = parser.feed(b"<message><body>" + b"x" * 100_000 + b"</body></message>")
    assert isinstance(event, ElementReceived)
    with pytest.raises(ValueError, match="positive"):
        parser.set_max_stanza_size(0)


def test_unfinished_at_names_the_stanza_being_received() -> None:
    parser = opened()

    def after(data: bytes) -> int | None:
        parser.feed(data)
        return parser.unfinished_at

    assert parser.unfinished_at is None
    assert after(b"  ") is None  # keepalive white space is no stanza
    first = after(b"<message><bo")
    assert first == len(HEADER) + 2
    assert after(b"dy>hi") == first  # the same stanza, still unfinished
    second = after(b"</body></message><presence")
    assert second is not None and second > first
    assert after(b"/>") is None


def test_a_closed_parser_is_freed_without_the_cyclic_collector() -> None:
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        parser = opened()
        parser.feed(b"<message>" + b"<a/>" * 1000)
        ref = weakref.ref(parser)
        parser.close()
        del parser
        assert ref() is None
    finally:
        if was_enabled:
            gc.enable()


def test_a_closed_parser_refuses_more_input_until_reset() -> None:
    parser = opened()
    parser.close()
    with pytest.raises(RemoteProtocolError):
        parser.feed(b"<message/>")
    parser.reset()
    parser.feed(HEADER)
    assert len(parser.feed(b"<message/>")) == 1


def test_websocket_framing_takes_the_new_limit() -> None:
    framing = WebSocketFraming(max_stanza_size=8192, max_depth=32)
    framing.receive_message(f"<open xmlns='{ns.FRAMING}' to='example.com' version='1.0'/>")
    big = "<message xmlns='jabber:client'><body>" + "x" * 9000 + "</body></message>"
    framing.set_max_stanza_size(262144)
    [event] = framing.receive_message(big)
    assert isinstance(event, ElementReceived)
    framing.close()


def test_element_size_adds_up_its_parts_and_is_shared_by_copies() -> None:
    empty = Element(ns.CLIENT, "a")
    assert empty.size == ELEMENT_COST + len(ns.CLIENT) + 1
    body = Element(ns.CLIENT, "body", None, ["hello"])
    assert body.size == ELEMENT_COST + len(ns.CLIENT) + 4 + TEXT_COST + 5
    message = Element(ns.CLIENT, "message", {"to": "a@b"}, [body])
    assert message.size > body.size + ELEMENT_COST
    copy = message.replace_attrs(**{"from": "c@d/e"})
    assert copy.size > message.size  # one more attribute, the same children


def test_element_size_follows_measured_memory_within_a_factor_of_two() -> None:
    parser = opened()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        [event] = parser.feed(
            b"<message to='a@b' type='chat'>" + b"<x k='v'>text</x>" * 2000 + b"</message>"
        )
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(event, ElementReceived)
    held = after - before
    assert held / 2 < event.element.size < held * 2, (held, event.element.size)


def test_a_long_namespace_counts_for_every_element_that_carries_it() -> None:
    # Each child's name is "uri}local", a new string: 30,000 children under a 100 KB
    # namespace held about 1 GB before the name was charged.
    parser = opened()
    namespace = "u" * 100_000
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError) as info:
            parser.feed(f"<x xmlns='{namespace}'>".encode() + b"<a/>" * 30_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.text == "stanza takes too much memory"
    assert peak < STANZA_MEMORY_FACTOR * 262144 + 1_500_000, peak
    assert Element("u" * 1000, "a").size == ELEMENT_COST + 1001
