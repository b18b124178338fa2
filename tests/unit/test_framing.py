"""WebSocketFraming and the message builders: RFC 7395 framing over the c2s stream path."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import RemoteProtocolError, StreamErrorCondition
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import XML_LANG, Element
from gateway.xmpp.framing import (
    WebSocketFraming,
    close_message,
    element_message,
    open_message,
)
from gateway.xmpp.negotiation import C2SNegotiation, NegotiationSettings, StreamEnded
from gateway.xmpp.parser import ElementReceived, Event, StreamClosed, StreamOpened, StreamParser
from gateway.xmpp.serializer import STREAM_FOOTER, serialize, stream_header
from gateway.xmpp.stanza import stream_error
from tests.helpers.xml_strategies import element, xml_chars, xml_names, xml_text

OPEN = (
    "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing'"
    " to='example.com' version='1.0' xml:lang='en'/>"
)
CLOSE = "<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>"
TCP_HEADER = (
    b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'"
    b" to='example.com' version='1.0' xml:lang='en'>"
)
MESSAGE = "<message xmlns='jabber:client' to='romeo@example.net'><body>hi</body></message>"

Condition = StreamErrorCondition


def framing(max_stanza_size: int = 4096, max_depth: int = 8) -> WebSocketFraming:
    return WebSocketFraming(max_stanza_size=max_stanza_size, max_depth=max_depth)


def opened(max_stanza_size: int = 4096, max_depth: int = 8) -> WebSocketFraming:
    """A framing that has received the client's `<open/>`."""
    result = framing(max_stanza_size, max_depth)
    [event] = result.receive_message(OPEN)
    assert isinstance(event, StreamOpened)
    return result


def one_element(events: list[Event]) -> Element:
    [event] = events
    assert isinstance(event, ElementReceived)
    return event.element


def condition_of(framed: WebSocketFraming, text: str) -> StreamErrorCondition:
    with pytest.raises(RemoteProtocolError) as info:
        framed.receive_message(text)
    return info.value.condition


def tcp_events(data: bytes) -> list[Event]:
    """What the TCP path reports for `data` after a stream header."""
    parser = StreamParser()
    parser.feed(TCP_HEADER)
    return parser.feed(data)


def parse_standalone(text: str) -> Element:
    """Parse `text` with no namespace declarations in scope: what a strict peer does."""
    parser = StreamParser()
    [_, received, _] = parser.feed(b"<r>" + text.encode() + b"</r>")
    assert isinstance(received, ElementReceived)
    return received.element


# -- input: stream headers (RFC 7395 sections 3.4, 3.6, 3.7) ------------------------------


def test_open_becomes_the_stream_opened_a_tcp_header_gives() -> None:
    """RFC 7395 3.4: `<open/>` carries the attributes of an RFC 6120 stream header."""
    [ws_event] = framing().receive_message(OPEN)
    [tcp_event] = StreamParser().feed(TCP_HEADER)
    assert ws_event == tcp_event
    assert ws_event == StreamOpened(
        ns.STREAM,
        "stream",
        {"to": "example.com", "version": "1.0", XML_LANG: "en"},
        ns.CLIENT,
    )


def test_open_attributes_are_passed_through_unchecked_for_the_negotiation() -> None:
    """The version and host are C2SNegotiation's business, as for a TCP header."""
    [event] = framing().receive_message(
        "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='elsewhere' version='2.5'/>"
    )
    assert isinstance(event, StreamOpened)
    assert event.attrs == {"to": "elsewhere", "version": "2.5"}


def test_a_new_open_after_a_restart_is_another_stream_opened() -> None:
    """RFC 7395 3.7: a restart is a new `<open/>`, with no `<close/>` before it."""
    framed = opened()
    one_element(framed.receive_message(MESSAGE))
    [event] = framed.receive_message(OPEN)
    assert isinstance(event, StreamOpened)


def test_close_becomes_stream_closed() -> None:
    """RFC 7395 3.6: `<close/>` ends the stream where TCP has `</stream:stream>`."""
    assert opened().receive_message(CLOSE) == [StreamClosed()]


def test_close_is_accepted_before_any_open() -> None:
    assert framing().receive_message(CLOSE) == [StreamClosed()]


def test_close_with_see_other_uri_is_still_a_close() -> None:
    text = "<close xmlns='urn:ietf:params:xml:ns:xmpp-framing' see-other-uri='wss://b/x'/>"
    assert opened().receive_message(text) == [StreamClosed()]


def test_messages_after_close_are_ignored_like_bytes_after_the_tcp_footer() -> None:
    framed = opened()
    framed.receive_message(CLOSE)
    assert framed.receive_message(MESSAGE) == []
    assert framed.receive_message("<unfinished") == []


def test_open_with_white_space_content_is_still_empty() -> None:
    text = "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='example.com'>\n</open>"
    [event] = framing().receive_message(text)
    assert isinstance(event, StreamOpened)


@pytest.mark.parametrize(
    "text",
    [
        "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='x'><x/></open>",
        "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='x'>text</open>",
        "<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'><x/></close>",
    ],
)
def test_headers_with_content_are_bad_format(text: str) -> None:
    assert condition_of(framing(), text) is Condition.BAD_FORMAT


@pytest.mark.parametrize(
    "text",
    [
        # The pre-RFC draft framing: a TCP header as a message.
        "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'"
        " to='example.com' version='1.0'>",
        "  <stream:stream to='example.com' version='1.0'>",
        "<stream:stream xmlns:stream='http://etherx.jabber.org/streams' to='example.com'/>",
        "<open xmlns='jabber:client' to='example.com' version='1.0'/>",
        "<open to='example.com' version='1.0'/>",
        "<close xmlns='http://etherx.jabber.org/streams'/>",
    ],
)
def test_headers_outside_the_framing_namespace_are_invalid_namespace(text: str) -> None:
    """RFC 7395 3.3.2: headers MUST be in the framing namespace, else invalid-namespace."""
    assert condition_of(framing(), text) is Condition.INVALID_NAMESPACE


def test_a_stanza_before_the_first_open_is_invalid_namespace() -> None:
    """RFC 7395 3.4: the first message MUST be `<open/>`; anything else is a bad header."""
    assert condition_of(framing(), MESSAGE) is Condition.INVALID_NAMESPACE


# -- input: stanzas (RFC 7395 section 3.3.3) ------------------------------------------------


def test_a_stanza_message_gives_the_element_the_tcp_path_gives() -> None:
    """RFC 7395 3.3.3 and STYLE T3: one stanza per message, parsed as on TCP."""
    ws_element = one_element(opened().receive_message(MESSAGE))
    assert ws_element == one_element(tcp_events(MESSAGE.encode()))
    assert ws_element.tag == (ns.CLIENT, "message")
    assert ws_element.find_text(ns.CLIENT, "body") == "hi"


def test_a_nonza_keeps_its_own_namespace() -> None:
    element = one_element(opened().receive_message("<r xmlns='urn:xmpp:sm:3'/>"))
    assert element.tag == (ns.SM, "r")


def test_elements_in_the_framing_namespace_other_than_headers_pass_through() -> None:
    element = one_element(
        opened().receive_message("<stream xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>")
    )
    assert element.tag == (ns.FRAMING, "stream")


def test_a_stanza_without_xmlns_is_invalid_namespace() -> None:
    """RFC 7395 3.3.3: a message declares its namespaces; none is in scope by default."""
    text = "<message><body>hi</body></message>"
    assert condition_of(opened(), text) is Condition.INVALID_NAMESPACE


def test_unqualified_children_stay_in_no_namespace_as_in_a_standalone_document() -> None:
    """Nothing is inherited from a synthetic context: `<foo/>` here is in no namespace."""
    text = f"<stream:error xmlns:stream='{ns.STREAM}'><foo/></stream:error>"
    element = one_element(opened().receive_message(text))
    assert element == Element(ns.STREAM, "error", None, [Element("", "foo")])


def test_an_undeclared_stream_prefix_is_not_well_formed() -> None:
    """RFC 7395 3.3.3: without an enclosing header, `stream:` must be declared."""
    text = "<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></stream:features>"
    assert condition_of(opened(), text) is Condition.NOT_WELL_FORMED


def test_unprefixed_and_prefixed_stream_elements_are_both_read() -> None:
    """RFC 7395 3.3.3: `<features xmlns=streams>` and a declared `stream:` prefix."""
    framed = opened()
    unprefixed = one_element(framed.receive_message(f"<features xmlns='{ns.STREAM}'/>"))
    prefixed = one_element(framed.receive_message(f"<stream:error xmlns:stream='{ns.STREAM}'/>"))
    assert unprefixed.tag == (ns.STREAM, "features")
    assert prefixed.tag == (ns.STREAM, "error")


def test_white_space_around_the_element_is_allowed() -> None:
    element = one_element(opened().receive_message("\r\n " + MESSAGE + " \n"))
    assert element.name == "message"


@pytest.mark.parametrize("text", ["", " ", "\r\n\t "])
def test_a_white_space_message_gives_no_event_like_a_tcp_keepalive(text: str) -> None:
    framed = opened()
    assert framed.receive_message(text) == []
    one_element(framed.receive_message(MESSAGE))


@pytest.mark.parametrize(
    "declaration",
    [
        "<?xml version='1.0'?>",
        '<?xml version="1.0" encoding="UTF-8"?>',
        "<?xml version = '1.0' encoding = 'utf-8' standalone = 'yes' ?>",
    ],
)
def test_a_leading_xml_declaration_is_allowed(declaration: str) -> None:
    """RFC 7395 3.3.3: XML declarations are NOT RECOMMENDED, so still allowed."""
    element = one_element(opened().receive_message(declaration + MESSAGE))
    assert element.name == "message"


def test_an_open_may_carry_an_xml_declaration() -> None:
    [event] = framing().receive_message("<?xml version='1.0'?>" + OPEN)
    assert isinstance(event, StreamOpened)


def test_an_xml_declaration_naming_another_encoding_is_unsupported_encoding() -> None:
    text = "<?xml version='1.0' encoding='ISO-8859-1'?>" + MESSAGE
    assert condition_of(opened(), text) is Condition.UNSUPPORTED_ENCODING


@pytest.mark.parametrize(
    "text",
    [
        "<?xml version='2.0'?>" + MESSAGE,
        "<?xml?>" + MESSAGE,
        MESSAGE + "<?xml version='1.0'?>",
    ],
)
def test_a_malformed_or_misplaced_xml_declaration_is_not_well_formed(text: str) -> None:
    assert condition_of(opened(), text) is Condition.NOT_WELL_FORMED


# -- input: errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        MESSAGE + MESSAGE,  # two stanzas in one message
        MESSAGE + OPEN,
        OPEN + MESSAGE,
        CLOSE + CLOSE,
        "<message xmlns='jabber:client'>",  # half a stanza
        "<message xmlns='jabber:client'><body>hi</body>",
        MESSAGE + "<pres",
        MESSAGE + "&am",
        "<message xmlns='jabber:client'></iq>",
        "</stream:stream>",  # the TCP footer is not a message
        MESSAGE + "</stream:stream>",
        "</framed>",  # nor is the end of the context the messages are parsed in
        MESSAGE + "</framed>",
        "<x:message/>",  # unbound prefix
    ],
)
def test_a_message_that_is_not_one_complete_element_is_not_well_formed(text: str) -> None:
    """RFC 7395 3.3.3: each message is one complete, standalone XML document."""
    assert condition_of(opened(), text) is Condition.NOT_WELL_FORMED


@pytest.mark.parametrize(
    "text",
    ["hello", "hello" + MESSAGE, MESSAGE + "hello", MESSAGE + "&amp;", "<![CDATA[x]]>"],
)
def test_text_outside_the_element_is_not_well_formed(text: str) -> None:
    """Text beside the root of a standalone document breaks well-formedness (XML 1.0 2.1)."""
    assert condition_of(opened(), text) is Condition.NOT_WELL_FORMED


@pytest.mark.parametrize(
    "text",
    [
        "<!DOCTYPE message>" + MESSAGE,
        "<!DOCTYPE message [<!ENTITY x 'y'>]>" + MESSAGE,
        "<!-- hello -->" + MESSAGE,
        MESSAGE + "<!-- hello -->",
        "<message xmlns='jabber:client'><!-- hello --></message>",
        "<?php echo 1 ?>" + MESSAGE,
        "<?xml-stylesheet href='a.xsl'?>" + MESSAGE,
        "<message xmlns='jabber:client'><?pi?></message>",
    ],
)
def test_dtds_comments_and_processing_instructions_are_restricted_xml(text: str) -> None:
    """RFC 6120 11.1, applied to every message as to a TCP stream."""
    assert condition_of(opened(), text) is Condition.RESTRICTED_XML


def test_an_undefined_entity_is_not_well_formed() -> None:
    text = "<message xmlns='jabber:client'><body>&lol;</body></message>"
    assert condition_of(opened(), text) is Condition.NOT_WELL_FORMED


def test_a_lone_surrogate_is_not_well_formed() -> None:
    assert condition_of(opened(), "<a xmlns='urn:a'>\ud800</a>") is Condition.NOT_WELL_FORMED


def test_a_message_at_the_size_limit_is_accepted() -> None:
    head = "<a xmlns='urn:a'>"
    tail = "</a>"
    text = head + "x" * (200 - len(head) - len(tail)) + tail
    assert len(text.encode()) == 200
    assert one_element(opened(max_stanza_size=200).receive_message(text)).name == "a"


def test_a_message_over_the_size_limit_is_a_policy_violation() -> None:
    text = "<a xmlns='urn:a'>" + "x" * 200 + "</a>"
    assert condition_of(opened(max_stanza_size=200), text) is Condition.POLICY_VIOLATION


def test_the_size_limit_counts_utf8_bytes_not_characters() -> None:
    text = "<a xmlns='urn:a'>" + "\u00e9" * 90 + "</a>"  # 111 characters, 201 bytes
    assert len(text) <= 200 < len(text.encode())
    assert condition_of(opened(max_stanza_size=200), text) is Condition.POLICY_VIOLATION


def test_a_huge_message_fails_before_it_is_parsed() -> None:
    text = "<a xmlns='urn:a'>" + "x" * 10_000_000
    assert condition_of(opened(max_stanza_size=4096), text) is Condition.POLICY_VIOLATION


def test_nesting_deeper_than_the_limit_is_a_policy_violation() -> None:
    framed = opened(max_depth=3)
    assert one_element(framed.receive_message("<a xmlns='urn:a'><b><c/></b></a>")).name == "a"
    deep = "<a xmlns='urn:a'><b><c><d/></c></b></a>"
    assert condition_of(framed, deep) is Condition.POLICY_VIOLATION


def test_after_an_error_the_framing_stays_failed_with_the_same_condition() -> None:
    framed = opened()
    assert condition_of(framed, MESSAGE + MESSAGE) is Condition.NOT_WELL_FORMED
    assert condition_of(framed, MESSAGE) is Condition.NOT_WELL_FORMED
    assert condition_of(framed, OPEN) is Condition.NOT_WELL_FORMED


def test_after_a_parser_error_the_framing_stays_failed() -> None:
    framed = opened()
    assert condition_of(framed, "hello") is Condition.NOT_WELL_FORMED
    assert condition_of(framed, MESSAGE) is Condition.NOT_WELL_FORMED


@pytest.mark.parametrize(("size", "depth"), [(7, 8), (0, 8), (4096, 0)])
def test_limits_too_small_are_refused(size: int, depth: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        WebSocketFraming(max_stanza_size=size, max_depth=depth)


# -- output (RFC 7395 sections 3.3.3, 3.4, 3.5, 3.6) ----------------------------------------


def test_open_message_answers_with_from_id_version_and_lang() -> None:
    """RFC 7395 3.4: the server's `<open/>` has the attributes of an RFC 6120 header."""
    text = open_message(from_="example.com", id_="s1")
    assert text == (
        '<open xmlns="urn:ietf:params:xml:ns:xmpp-framing"'
        ' from="example.com" id="s1" version="1.0" xml:lang="en"/>'
    )
    [event] = framing().receive_message(text)
    assert isinstance(event, StreamOpened)
    assert event.attrs == {"from": "example.com", "id": "s1", "version": "1.0", XML_LANG: "en"}


def test_open_message_takes_the_same_arguments_as_stream_header() -> None:
    [ws] = framing().receive_message(
        open_message(from_="a&b", id_=None, to="j@x'y", version="1.0", lang="fr")
    )
    [tcp] = StreamParser().feed(
        stream_header(from_="a&b", id_=None, to="j@x'y", version="1.0", lang="fr")
    )
    assert isinstance(ws, StreamOpened)
    assert isinstance(tcp, StreamOpened)
    assert ws.attrs == tcp.attrs


def test_open_message_refuses_characters_xml_cannot_carry() -> None:
    with pytest.raises(ValueError, match="not allowed in XML"):
        open_message(from_="a\x00", id_="s1")


def test_element_message_declares_the_content_namespace() -> None:
    """RFC 7395 3.3.3: each message is standalone, `xmlns='jabber:client'` included."""
    message = Element(
        ns.CLIENT, "message", {"to": "a@b"}, [Element(ns.CLIENT, "body", None, ["x"])]
    )
    text = element_message(message)
    assert text == '<message xmlns="jabber:client" to="a@b"><body>x</body></message>'
    assert parse_standalone(text) == message


def test_element_message_declares_the_stream_prefix_on_features() -> None:
    """RFC 7395 3.3.3: no enclosing header declares `stream:`, so the message does."""
    features = Element(ns.STREAM, "features", None, [Element(ns.BIND, "bind")])
    text = element_message(features)
    assert text.startswith(f'<stream:features xmlns:stream="{ns.STREAM}">')
    assert parse_standalone(text) == features


def test_a_stream_error_is_a_standalone_message_followed_by_close() -> None:
    """RFC 7395 3.5: the error as a complete element in its own message, then `<close/>`."""
    error = stream_error(StreamErrorCondition.POLICY_VIOLATION, "too big")
    text = element_message(error)
    assert parse_standalone(text) == error
    client = framing()
    client.receive_message(OPEN)
    assert one_element(client.receive_message(text)) == error
    assert client.receive_message(close_message()) == [StreamClosed()]


def test_close_message_is_the_framing_close() -> None:
    """RFC 7395 3.6."""
    assert close_message() == '<close xmlns="urn:ietf:params:xml:ns:xmpp-framing"/>'
    assert parse_standalone(close_message()) == Element(ns.FRAMING, "close")


def test_close_message_can_carry_see_other_uri() -> None:
    """RFC 7395 3.6.1: `see-other-uri` redirects the client."""
    text = close_message("wss://other.example.com/xmpp?a=1&b=2")
    assert parse_standalone(text) == Element(
        ns.FRAMING, "close", {"see-other-uri": "wss://other.example.com/xmpp?a=1&b=2"}
    )


def test_element_message_refuses_an_element_in_no_namespace() -> None:
    with pytest.raises(ValueError, match="needs a namespace"):
        element_message(Element("", "message"))


# -- the same negotiation serves both transports (STYLE T3) ---------------------------------


def _negotiation() -> C2SNegotiation:
    settings_ = NegotiationSettings(
        hosts=frozenset({"example.com"}), tls_available=False, tls_required=False, secure=True
    )
    return C2SNegotiation(settings_, stream_id_factory=lambda: "sid")


def test_an_open_drives_c2s_negotiation_exactly_like_a_tcp_header() -> None:
    over_tcp = _negotiation()
    for event in StreamParser().feed(TCP_HEADER):
        assert over_tcp.receive(event) == []
    over_ws = _negotiation()
    for event in framing().receive_message(OPEN):
        assert over_ws.receive(event) == []
    assert over_ws.take_output() == over_tcp.take_output()


def test_an_open_with_a_wrong_version_is_refused_by_the_negotiation() -> None:
    """The version check is the TCP one: unsupported-version (RFC 6120 4.7.5)."""
    [event] = framing().receive_message(
        "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='example.com' version='2.0'/>"
    )
    with pytest.raises(RemoteProtocolError) as info:
        _negotiation().receive(event)
    assert info.value.condition is Condition.UNSUPPORTED_VERSION


def test_a_close_ends_the_negotiated_stream() -> None:
    negotiation = _negotiation()
    framed = framing()
    [opened_event] = framed.receive_message(OPEN)
    negotiation.receive(opened_event)
    [closed_event] = framed.receive_message(CLOSE)
    assert negotiation.receive(closed_event) == [StreamEnded()]


# -- properties ------------------------------------------------------------------------------

child_namespaces = st.sampled_from([ns.CLIENT, ns.STREAM, ns.FRAMING, "urn:a", ""])
# A message's element: namespaced, and not one of the headers or their look-alikes.
top_namespaces = st.sampled_from([ns.CLIENT, ns.STREAM, ns.SM, ns.FRAMING, "urn:q&'\""])
top_names = xml_names.filter(lambda name: name not in {"open", "close", "stream"})


descendants = st.recursive(
    element(child_namespaces, xml_names, st.just([])),
    lambda inner: element(
        child_namespaces, xml_names, st.lists(st.one_of(xml_text, inner), max_size=3)
    ),
    max_leaves=8,
)
top_elements = element(
    top_namespaces, top_names, st.lists(st.one_of(xml_text, descendants), max_size=4)
)


@settings(max_examples=200, deadline=None)
@given(element=top_elements)
def test_any_element_sent_as_a_message_is_received_equal(element: Element) -> None:
    """RFC 7395 3.3.3 round trip: standalone for a strict peer, equal through our framing."""
    text = element_message(element)
    assert parse_standalone(text) == element
    assert one_element(opened(max_stanza_size=1 << 20).receive_message(text)) == element


@settings(max_examples=200, deadline=None)
@given(element=top_elements)
def test_ws_and_tcp_give_the_same_event_for_the_same_element(element: Element) -> None:
    """STYLE T3: one parser path, so both transports agree on every element."""
    ws = opened(max_stanza_size=1 << 20).receive_message(element_message(element))
    assert ws == tcp_events(serialize(element) + STREAM_FOOTER)[:1]


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.sampled_from("<>/a='\" &;:x!?-[]\n") | xml_chars, max_size=40))
def test_arbitrary_text_gives_at_most_one_event_or_a_protocol_error(text: str) -> None:
    try:
        events = opened().receive_message(text)
    except RemoteProtocolError:
        return
    assert len(events) <= 1
