"""serialize / stream_header: namespaces, escaping, character checks, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import XML_LANG, Element
from gateway.xmpp.parser import ElementReceived, StreamClosed, StreamOpened, StreamParser
from gateway.xmpp.serializer import STREAM_FOOTER, serialize, stream_header
from tests.helpers.xml_strategies import element, xml_chars, xml_names, xml_text


def parse_in_stream(data: bytes) -> Element:
    """Parse `data` as the only stanza of a c2s stream."""
    parser = StreamParser()
    header = stream_header(from_="example.com", id_="s1")
    [opened, received, closed] = parser.feed(header + data + STREAM_FOOTER)
    assert isinstance(opened, StreamOpened)
    assert isinstance(received, ElementReceived)
    assert closed == StreamClosed()
    return received.element


# -- namespaces ------------------------------------------------------------------------


def test_element_in_the_parent_namespace_gets_no_xmlns() -> None:
    element = Element(
        ns.CLIENT, "message", {"to": "a@b"}, [Element(ns.CLIENT, "body", None, ["hi"])]
    )
    assert serialize(element) == b'<message to="a@b"><body>hi</body></message>'


def test_element_in_another_namespace_declares_it_and_children_inherit_it() -> None:
    element = Element(ns.BIND, "bind", None, [Element(ns.BIND, "jid", None, ["a@b/c"])])
    assert serialize(element) == (
        b'<bind xmlns="urn:ietf:params:xml:ns:xmpp-bind"><jid>a@b/c</jid></bind>'
    )


def test_parent_namespace_is_the_default_in_scope() -> None:
    element = Element(ns.CLIENT, "message")
    assert serialize(element, parent_namespace=ns.SERVER) == b'<message xmlns="jabber:client"/>'
    assert serialize(element, parent_namespace="") == b'<message xmlns="jabber:client"/>'


def test_element_in_no_namespace_undeclares_the_default() -> None:
    element = Element(ns.CLIENT, "message", None, [Element("", "x")])
    assert serialize(element) == b'<message><x xmlns=""/></message>'


def test_stream_elements_use_the_declared_stream_prefix() -> None:
    features = Element(
        ns.STREAM,
        "features",
        None,
        [Element(ns.TLS, "starttls", None, [Element(ns.TLS, "required")])],
    )
    assert serialize(features) == (
        b"<stream:features>"
        b'<starttls xmlns="urn:ietf:params:xml:ns:xmpp-tls"><required/></starttls>'
        b"</stream:features>"
    )


def test_stream_elements_declare_the_prefix_when_it_is_not_in_scope() -> None:
    error = Element(
        ns.STREAM,
        "error",
        None,
        [Element(ns.STREAMS_ERRORS, "conflict"), Element(ns.STREAM, "nested")],
    )
    assert serialize(error, stream_prefix=False) == (
        b'<stream:error xmlns:stream="http://etherx.jabber.org/streams">'
        b'<conflict xmlns="urn:ietf:params:xml:ns:xmpp-streams"/><stream:nested/>'
        b"</stream:error>"
    )


def test_children_of_stream_elements_keep_the_outer_default_namespace() -> None:
    features = Element(ns.STREAM, "features", None, [Element(ns.CLIENT, "x")])
    assert serialize(features) == b"<stream:features><x/></stream:features>"


def test_xml_lang_uses_the_xml_prefix() -> None:
    element = Element(ns.CLIENT, "message", {XML_LANG: "fr"})
    assert serialize(element) == b'<message xml:lang="fr"/>'


def test_namespaced_attributes_get_generated_prefixes_declared_on_the_element() -> None:
    element = Element(
        ns.CLIENT, "x", {"{urn:a}one": "1", "{urn:b}two": "2", "{urn:a}three": "3", "plain": "4"}
    )
    assert serialize(element) == (
        b'<x xmlns:ns0="urn:a" ns0:one="1" xmlns:ns1="urn:b" ns1:two="2" ns0:three="3" plain="4"/>'
    )
    assert parse_in_stream(serialize(element)) == element


def test_clark_key_without_namespace_is_a_plain_attribute() -> None:
    assert serialize(Element(ns.CLIENT, "x", {"{}a": "1"})) == b'<x a="1"/>'


# -- escaping and characters -----------------------------------------------------------


def test_text_escapes_markup_characters() -> None:
    element = Element(ns.CLIENT, "body", None, ["a & b < c > d ]]> \"q\" 'q'"])
    assert serialize(element) == (b"<body>a &amp; b &lt; c &gt; d ]]&gt; \"q\" 'q'</body>")


def test_text_keeps_carriage_returns_as_references() -> None:
    element = Element(ns.CLIENT, "body", None, ["a\r\nb\rc\n\td"])
    assert serialize(element) == b"<body>a&#13;\nb&#13;c\n\td</body>"
    assert parse_in_stream(serialize(element)) == element


def test_attribute_values_escape_quotes_and_whitespace() -> None:
    element = Element(ns.CLIENT, "x", {"a": "1 & 2 < 3 > 0 \"q\" 'q'\t\n\r"})
    assert serialize(element) == (
        b"<x a=\"1 &amp; 2 &lt; 3 &gt; 0 &quot;q&quot; 'q'&#9;&#10;&#13;\"/>"
    )
    assert parse_in_stream(serialize(element)) == element


def test_output_is_utf8() -> None:
    element = Element(ns.CLIENT, "body", {"a": "\u00e9"}, ["\u4e2d\U0001f600"])
    assert serialize(element) == '<body a="\u00e9">\u4e2d\U0001f600</body>'.encode()


def test_empty_element_is_self_closing() -> None:
    assert serialize(Element(ns.SM, "r"), ns.CLIENT) == b'<r xmlns="urn:xmpp:sm:3"/>'


@pytest.mark.parametrize(
    "char", ["\x00", "\x08", "\x0b", "\x0c", "\x1f", "\ufffe", "\uffff", "\ud800"]
)
def test_characters_not_allowed_in_xml_raise_value_error(char: str) -> None:
    with pytest.raises(ValueError, match="not allowed in XML"):
        serialize(Element(ns.CLIENT, "body", None, ["a" + char]))
    with pytest.raises(ValueError, match="not allowed in XML"):
        serialize(Element(ns.CLIENT, "body", {"a": char}))


def test_reserved_namespaces_that_cannot_be_written_raise_value_error() -> None:
    with pytest.raises(ValueError, match="default namespace"):
        serialize(Element(ns.CLIENT, "x", None, [Element(ns.XML, "y")]))
    with pytest.raises(ValueError, match="namespace declaration"):
        serialize(Element(ns.CLIENT, "x", {"{http://www.w3.org/2000/xmlns/}p": "urn:p"}))


# -- the stream header -----------------------------------------------------------------


def test_stream_header_has_declaration_namespaces_and_attributes() -> None:
    header = stream_header(from_="example.com", id_="abc", to="juliet@example.com")
    assert header == (
        b"<?xml version='1.0'?><stream:stream xmlns='jabber:client'"
        b" xmlns:stream='http://etherx.jabber.org/streams' from='example.com' id='abc'"
        b" to='juliet@example.com' version='1.0' xml:lang='en'>"
    )


def test_stream_header_omits_missing_attributes() -> None:
    header = stream_header(from_=None, id_=None, lang="de", namespace=ns.SERVER)
    assert header == (
        b"<?xml version='1.0'?><stream:stream xmlns='jabber:server'"
        b" xmlns:stream='http://etherx.jabber.org/streams' version='1.0' xml:lang='de'>"
    )


def test_stream_header_escapes_values_and_parses_back() -> None:
    header = stream_header(from_="a'b\"c<&>", id_="x\ty")
    [event] = StreamParser().feed(header)
    assert event == StreamOpened(
        ns.STREAM,
        "stream",
        {"from": "a'b\"c<&>", "id": "x\ty", "version": "1.0", XML_LANG: "en"},
        ns.CLIENT,
    )


def test_stream_header_refuses_characters_not_allowed_in_xml() -> None:
    with pytest.raises(ValueError, match="not allowed in XML"):
        stream_header(from_="a\x00", id_=None)


def test_stream_footer_closes_the_stream() -> None:
    assert STREAM_FOOTER == b"</stream:stream>"


# -- round trip property ---------------------------------------------------------------

element_namespaces = st.sampled_from(
    [ns.CLIENT, ns.STREAM, "urn:a", "urn:b:\u00e9", "", "urn:q?a=1&b=<2>'\""]
)


def _element(children: st.SearchStrategy[list[Element | str]]) -> st.SearchStrategy[Element]:
    return element(element_namespaces, xml_names, children)


elements = st.recursive(
    _element(st.just([])),
    lambda inner: _element(st.lists(st.one_of(xml_text, inner), max_size=4)),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(element=elements, stream_prefix=st.booleans())
def test_serialize_then_parse_gives_an_equal_element(element: Element, stream_prefix: bool) -> None:
    assert parse_in_stream(serialize(element, stream_prefix=stream_prefix)) == element


@settings(max_examples=100, deadline=None)
@given(
    from_=st.none() | st.text(xml_chars, max_size=10),
    id_=st.none() | st.text(xml_chars, max_size=10),
    to=st.none() | st.text(xml_chars, max_size=10),
)
def test_stream_header_round_trips(from_: str | None, id_: str | None, to: str | None) -> None:
    [event] = StreamParser().feed(stream_header(from_=from_, id_=id_, to=to))
    assert isinstance(event, StreamOpened)
    expected = {"from": from_, "id": id_, "to": to, "version": "1.0", XML_LANG: "en"}
    assert event.attrs == {k: v for k, v in expected.items() if v is not None}
