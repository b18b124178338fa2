"""StreamParser: events, restricted XML, limits, incremental feeding."""

from __future__ import annotations

import itertools
import time
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import RemoteProtocolError, StreamErrorCondition
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import XML_LANG, Element
from gateway.xmpp.parser import (
    ElementReceived,
    Event,
    StreamClosed,
    StreamOpened,
    StreamParser,
)

HEADER = (
    b"<?xml version='1.0'?>"
    b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'"
    b" to='example.com' from='juliet@example.com' version='1.0' xml:lang='en'>"
)
SHORT_HEADER = (
    b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
)


def opened(max_stanza_size: int = 262144, max_depth: int = 32) -> StreamParser:
    """A parser that has already read a stream header (a short one for small limits)."""
    parser = StreamParser(max_stanza_size=max_stanza_size, max_depth=max_depth)
    [event] = parser.feed(HEADER if max_stanza_size >= len(HEADER) else SHORT_HEADER)
    assert isinstance(event, StreamOpened)
    return parser


def elements(events: list[Event]) -> list[Element]:
    return [e.element for e in events if isinstance(e, ElementReceived)]


def one_element(parser: StreamParser, data: bytes) -> Element:
    [event] = parser.feed(data)
    assert isinstance(event, ElementReceived)
    return event.element


def feed_bytewise(parser: StreamParser, data: bytes) -> list[Event]:
    events: list[Event] = []
    for i in range(len(data)):
        events += parser.feed(data[i : i + 1])
    return events


def condition_of(parser: StreamParser, data: bytes) -> StreamErrorCondition:
    with pytest.raises(RemoteProtocolError) as info:
        parser.feed(data)
    return info.value.condition


# -- the stream header -----------------------------------------------------------------


def test_stream_header_gives_stream_opened_with_attrs_and_default_namespace() -> None:
    parser = StreamParser()
    assert parser.feed(HEADER) == [
        StreamOpened(
            namespace=ns.STREAM,
            name="stream",
            attrs={
                "to": "example.com",
                "from": "juliet@example.com",
                "version": "1.0",
                XML_LANG: "en",
            },
            default_namespace=ns.CLIENT,
        )
    ]


def test_header_without_default_namespace_reports_none() -> None:
    parser = StreamParser()
    [event] = parser.feed(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>")
    assert event == StreamOpened(ns.STREAM, "stream", {}, None)


def test_root_in_another_namespace_is_reported_for_the_caller_to_check() -> None:
    parser = StreamParser()
    [event] = parser.feed(b"<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='x'>")
    assert event == StreamOpened(ns.FRAMING, "open", {"to": "x"}, ns.FRAMING)


def test_header_fed_a_byte_at_a_time_gives_the_same_event() -> None:
    assert feed_bytewise(StreamParser(), HEADER) == StreamParser().feed(HEADER)


def test_empty_feed_gives_no_events() -> None:
    parser = StreamParser()
    assert parser.feed(b"") == []
    assert opened().feed(b"") == []


# -- stanzas ---------------------------------------------------------------------------


def test_stanza_with_nested_namespaces_and_xml_lang_is_resolved() -> None:
    element = one_element(
        opened(),
        b"<message to='romeo@example.net' xml:lang='fr' xmlns:x='urn:x'>"
        b"<body>Bonjour</body>"
        b"<x:thing x:attr='1' plain='2'/>"
        b"<query xmlns='jabber:iq:roster'><item jid='a@b'/></query>"
        b"</message>",
    )
    assert element == Element(
        ns.CLIENT,
        "message",
        {"to": "romeo@example.net", XML_LANG: "fr"},
        [
            Element(ns.CLIENT, "body", None, ["Bonjour"]),
            Element("urn:x", "thing", {"{urn:x}attr": "1", "plain": "2"}),
            Element(ns.ROSTER, "query", None, [Element(ns.ROSTER, "item", {"jid": "a@b"})]),
        ],
    )


def test_undeclared_default_namespace_gives_empty_namespace() -> None:
    element = one_element(opened(), b"<message><x xmlns=''/></message>")
    assert element.children == (Element("", "x"),)


def test_mixed_content_keeps_text_and_elements_in_order() -> None:
    element = one_element(
        opened(),
        b"<p xmlns='http://www.w3.org/1999/xhtml'>Hi <em>there</em>, <b>you</b>!</p>",
    )
    xhtml = "http://www.w3.org/1999/xhtml"
    assert element.children == (
        "Hi ",
        Element(xhtml, "em", None, ["there"]),
        ", ",
        Element(xhtml, "b", None, ["you"]),
        "!",
    )


def test_whitespace_inside_stanzas_is_kept() -> None:
    element = one_element(opened(), b"<message>\n  <body>  a\n\tb  </body>\n</message>")
    assert element.children == ("\n  ", Element(ns.CLIENT, "body", None, ["  a\n\tb  "]), "\n")


def test_predefined_entities_character_references_and_cdata_become_one_text() -> None:
    element = one_element(
        opened(),
        b"<body>&lt;&gt;&amp;&apos;&quot; &#65;&#x42; <![CDATA[<raw> & ]]>"
        b" \xc3\xa9\xe2\x82\xac</body>",
    )
    assert element.children == ("<>&'\" AB <raw> &  \u00e9\u20ac",)


def test_long_text_is_one_string() -> None:
    text = "x" * 20000 + "\n" + "y" * 20000
    element = one_element(opened(), f"<body>{text}</body>".encode())
    assert element.children == (text,)


def test_text_split_over_feeds_is_joined() -> None:
    parser = opened()
    assert parser.feed(b"<body>hel") == []
    assert parser.feed(b"lo &am") == []
    assert parser.feed(b"p; world") == []
    assert elements(parser.feed(b"</body>")) == [
        Element(ns.CLIENT, "body", None, ["hello & world"])
    ]


def test_text_split_over_feeds_around_a_child_element_is_joined_per_run() -> None:
    parser = opened()
    assert parser.feed(b"<body>ab") == []
    events = parser.feed(b"cd<b>x</b>e")
    assert elements(events + parser.feed(b"f</body>")) == [
        Element(ns.CLIENT, "body", None, ["abcd", Element(ns.CLIENT, "b", None, ["x"]), "ef"])
    ]


def test_several_stanzas_in_one_chunk_give_several_events() -> None:
    events = opened().feed(b"<r xmlns='urn:xmpp:sm:3'/><iq type='get' id='1'/><presence/>")
    assert elements(events) == [
        Element(ns.SM, "r"),
        Element(ns.CLIENT, "iq", {"type": "get", "id": "1"}),
        Element(ns.CLIENT, "presence"),
    ]


def test_whitespace_keepalives_between_stanzas_give_no_events() -> None:
    parser = opened()
    assert parser.feed(b" ") == []
    assert parser.feed(b"\n\r\n\t &#32;") == []
    assert elements(parser.feed(b" <presence/> \n")) == [Element(ns.CLIENT, "presence")]


def test_text_at_stream_level_is_bad_format() -> None:
    assert condition_of(opened(), b"  hello ") is StreamErrorCondition.BAD_FORMAT


def test_stream_close_gives_stream_closed() -> None:
    parser = opened()
    events = parser.feed(b"<presence/></stream:stream>")
    assert events == [ElementReceived(Element(ns.CLIENT, "presence")), StreamClosed()]


def test_data_after_stream_closed_is_ignored() -> None:
    parser = opened()
    assert parser.feed(b"</stream:stream><message/>junk<") == [StreamClosed()]
    assert parser.feed(b"<message/>") == []


def test_empty_root_gives_opened_then_closed() -> None:
    events = StreamParser().feed(
        b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams'/>"
    )
    assert events == [StreamOpened(ns.STREAM, "stream", {}, None), StreamClosed()]


def test_root_keeps_no_children() -> None:
    parser = opened()
    for _ in range(1000):
        parser.feed(b"<message><body>hi</body></message>")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(2000):
            parser.feed(b"<message><body>hi</body></message>")
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after - before < 10000


# -- restricted XML (RFC 6120 section 11.1) --------------------------------------------


@pytest.mark.parametrize(
    "document",
    [
        pytest.param(b"<!DOCTYPE stream:stream>" + HEADER[21:], id="doctype"),
        pytest.param(
            b"<?xml version='1.0'?><!DOCTYPE s [<!ENTITY e 'boom'>]><s>&e;</s>",
            id="entity-declaration",
        ),
        pytest.param(
            b"<!DOCTYPE lolz [<!ENTITY lol 'lol'>"
            b"<!ENTITY lol2 '&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;'>"
            b"<!ENTITY lol3 '&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;'>"
            b"]><lolz>&lol3;</lolz>",
            id="billion-laughs",
        ),
        pytest.param(
            b"<!DOCTYPE s [<!ENTITY ext SYSTEM 'file:///etc/passwd'>]><s>&ext;</s>",
            id="external-entity",
        ),
        pytest.param(b"<!DOCTYPE s SYSTEM 'http://example.com/evil.dtd'><s/>", id="external-dtd"),
        pytest.param(b"<!DOCTYPE s [<!NOTATION n SYSTEM 'x'>]><s/>", id="notation"),
        pytest.param(b"<?xml-stylesheet href='x'?>" + HEADER[21:], id="pi-before-root"),
        pytest.param(b"<!-- hello -->" + HEADER[21:], id="comment-before-root"),
    ],
)
def test_dtds_entities_pis_and_comments_before_the_root_are_restricted_xml(
    document: bytes,
) -> None:
    assert condition_of(StreamParser(), document) is StreamErrorCondition.RESTRICTED_XML


def test_restricted_xml_is_detected_when_fed_a_byte_at_a_time() -> None:
    parser = StreamParser()
    with pytest.raises(RemoteProtocolError) as info:
        feed_bytewise(parser, b"<!DOCTYPE s [<!ENTITY e 'boom'>]><s>&e;</s>")
    assert info.value.condition is StreamErrorCondition.RESTRICTED_XML


def test_comment_in_stream_is_restricted_xml() -> None:
    assert condition_of(opened(), b"<!-- hi -->") is StreamErrorCondition.RESTRICTED_XML


def test_comment_in_stanza_is_restricted_xml() -> None:
    parser = opened()
    assert condition_of(parser, b"<message><!-- hi --></message>") is (
        StreamErrorCondition.RESTRICTED_XML
    )


def test_processing_instruction_in_stanza_is_restricted_xml() -> None:
    parser = opened()
    assert condition_of(parser, b"<message><?php echo 1; ?></message>") is (
        StreamErrorCondition.RESTRICTED_XML
    )


def test_doctype_after_the_header_is_not_well_formed() -> None:
    assert condition_of(opened(), b"<!DOCTYPE x>") is StreamErrorCondition.NOT_WELL_FORMED


def test_undeclared_entity_reference_is_not_well_formed() -> None:
    assert condition_of(opened(), b"<body>&nbsp;</body>") is StreamErrorCondition.NOT_WELL_FORMED


@pytest.mark.parametrize("encoding", [b"ISO-8859-1", b"UTF-16", b"US-ASCII"])
def test_non_utf8_declaration_is_unsupported_encoding(encoding: bytes) -> None:
    document = b"<?xml version='1.0' encoding='" + encoding + b"'?>" + HEADER[21:]
    assert condition_of(StreamParser(), document) is StreamErrorCondition.UNSUPPORTED_ENCODING


def test_utf8_declaration_in_any_case_is_accepted() -> None:
    document = b"<?xml version='1.0' encoding='utf-8'?>" + HEADER[21:]
    [event] = StreamParser().feed(document)
    assert isinstance(event, StreamOpened)


@pytest.mark.parametrize(
    "stanza",
    [
        pytest.param(b"<foo:message/>", id="unbound-element-prefix"),
        pytest.param(b"<message foo:to='x'/>", id="unbound-attribute-prefix"),
        pytest.param(b"<message></presence>", id="mismatched-tags"),
        pytest.param(b"<message a='1' a='2'/>", id="duplicate-attribute"),
        pytest.param(b"<body>\xff\xfe</body>", id="invalid-utf8"),
        pytest.param(b"<body>\x00</body>", id="nul"),
        pytest.param(b"<body>&#0;</body>", id="nul-reference"),
        pytest.param(b"<?xml version='1.0'?>", id="late-xml-declaration"),
        pytest.param(b"<a xmlns:p='urn:}'/>", id="separator-in-namespace"),
    ],
)
def test_malformed_xml_is_not_well_formed(stanza: bytes) -> None:
    assert condition_of(opened(), stanza) is StreamErrorCondition.NOT_WELL_FORMED


def test_errors_are_sticky_until_reset() -> None:
    parser = opened()
    condition_of(parser, b"<!-- x -->")
    assert condition_of(parser, b"<presence/>") is StreamErrorCondition.RESTRICTED_XML
    parser.reset()
    assert isinstance(parser.feed(HEADER)[0], StreamOpened)


# -- limits ----------------------------------------------------------------------------


def test_stanza_at_most_the_limit_is_accepted_many_times() -> None:
    parser = opened(max_stanza_size=100)
    stanza = b"<message><body>" + b"x" * 50 + b"</body></message>"
    events = parser.feed(stanza * 200)
    assert len(events) == 200


def test_whitespace_keepalives_do_not_count_towards_the_limit() -> None:
    parser = opened(max_stanza_size=100)
    for _ in range(100):
        assert parser.feed(b" " * 50) == []
    assert len(parser.feed(b"<presence/>")) == 1


def test_stanza_over_the_limit_in_one_chunk_is_policy_violation() -> None:
    stanza = b"<message><body>" + b"x" * 200 + b"</body></message>"
    condition = condition_of(opened(max_stanza_size=100), stanza)
    assert condition is StreamErrorCondition.POLICY_VIOLATION


def test_stanza_over_the_limit_in_many_chunks_is_policy_violation() -> None:
    parser = opened(max_stanza_size=100)
    stanza = b"<message><body>" + b"x" * 200 + b"</body></message>"
    with pytest.raises(RemoteProtocolError) as info:
        feed_bytewise(parser, stanza)
    assert info.value.condition is StreamErrorCondition.POLICY_VIOLATION


def test_stanza_over_the_limit_completed_in_a_later_chunk_is_policy_violation() -> None:
    parser = opened(max_stanza_size=100)
    assert parser.feed(b"<message><body>" + b"x" * 60) == []
    condition = condition_of(parser, b"y" * 60 + b"</body></message>")
    assert condition is StreamErrorCondition.POLICY_VIOLATION


@pytest.mark.parametrize(
    "prefix",
    [
        pytest.param(b"<message><body>", id="text"),
        pytest.param(b"<message to='", id="attribute"),
        pytest.param(b"<message", id="whitespace-in-tag"),
    ],
)
def test_ten_megabyte_stanza_fails_early_without_building_it(prefix: bytes) -> None:
    parser = opened()
    filler = b" " if prefix.endswith(b"message") else b"x"
    data = prefix + filler * 10_000_000
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError) as info:
            parser.feed(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.condition is StreamErrorCondition.POLICY_VIOLATION
    assert peak < 3_000_000


def test_header_over_the_limit_in_one_chunk_is_policy_violation() -> None:
    parser = StreamParser(max_stanza_size=len(HEADER) - 1)
    assert condition_of(parser, HEADER) is StreamErrorCondition.POLICY_VIOLATION


def test_header_over_the_limit_in_many_chunks_is_policy_violation() -> None:
    parser = StreamParser(max_stanza_size=len(HEADER) - 1)
    with pytest.raises(RemoteProtocolError) as info:
        feed_bytewise(parser, HEADER)
    assert info.value.condition is StreamErrorCondition.POLICY_VIOLATION


def test_header_exactly_at_the_limit_is_accepted() -> None:
    parser = StreamParser(max_stanza_size=len(HEADER))
    assert isinstance(parser.feed(HEADER + b"<presence/>")[0], StreamOpened)


def test_endless_header_is_policy_violation() -> None:
    parser = StreamParser(max_stanza_size=1000)
    parser.feed(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' to='")
    condition = condition_of(parser, b"x" * 5000)
    assert condition is StreamErrorCondition.POLICY_VIOLATION


def test_nesting_up_to_max_depth_is_accepted() -> None:
    element = one_element(opened(max_depth=3), b"<a><b><c/></b></a>")
    assert element.name == "a"


def test_nesting_deeper_than_max_depth_is_policy_violation() -> None:
    parser = opened(max_depth=3)
    condition = condition_of(parser, b"<a><b><c><d/></c></b></a>")
    assert condition is StreamErrorCondition.POLICY_VIOLATION


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        StreamParser(max_stanza_size=0)
    with pytest.raises(ValueError, match="positive"):
        StreamParser(max_depth=0)


# -- large tokens fed slowly (deferred reparsing) --------------------------------------


def test_large_start_tag_fed_a_byte_at_a_time_gives_the_same_element() -> None:
    value = "a>b'c" * 2000
    stanza = f"<message a=\"{value}\" b='x\">y' c='{'z' * 5000}'><body/></message>".encode()
    expected = opened().feed(stanza)
    assert feed_bytewise(opened(), stanza) == expected
    assert elements(expected)[0].attrs["a"] == value


def test_large_character_reference_fed_in_pieces_is_decoded() -> None:
    stanza = b"<body>&#" + b"0" * 6000 + b"65;</body>"
    parser = opened()
    events: list[Event] = []
    for i in range(0, len(stanza), 7):
        events += parser.feed(stanza[i : i + 7])
    assert elements(events) == [Element(ns.CLIENT, "body", None, ["A"])]


def test_large_end_tag_fed_in_pieces_is_accepted() -> None:
    stanza = b"<message></message" + b" " * 6000 + b">"
    parser = opened()
    events: list[Event] = []
    for i in range(0, len(stanza), 100):
        events += parser.feed(stanza[i : i + 100])
    assert elements(events) == [Element(ns.CLIENT, "message")]


def test_large_tag_followed_by_more_stanzas_in_the_same_chunk() -> None:
    big = b"<message a='" + b"x" * 5000 + b"'/>"
    parser = opened()
    assert parser.feed(big[:4500]) == []
    assert parser.feed(big[4500:4800]) == []
    events = parser.feed(big[4800:] + b"<presence/><iq b='" + b"y" * 5000)
    assert [e.name for e in elements(events)] == ["message", "presence"]
    assert elements(parser.feed(b"'/>"))[0].attrs == {"b": "y" * 5000}


@pytest.mark.parametrize("start", [b"<!-- ", b"<?pi "])
def test_large_comment_or_pi_is_restricted_before_it_ends(start: bytes) -> None:
    parser = opened()
    parser.feed(b"<message>")
    condition = condition_of(parser, start + b"x" * 5000)
    assert condition is StreamErrorCondition.RESTRICTED_XML


def test_large_tag_fed_a_byte_at_a_time_costs_linear_time() -> None:
    # Without deferral expat rescans the whole tag per byte: ~50x slower than text here.
    size = 60000

    def bytewise_seconds(prefix: bytes, suffix: bytes) -> float:
        parser = opened()
        parser.feed(prefix)
        started = time.perf_counter()
        for _ in range(size):
            parser.feed(b">")
        assert len(parser.feed(suffix)) == 1
        return time.perf_counter() - started

    text = bytewise_seconds(b"<body>", b"</body>")
    attribute = bytewise_seconds(b"<body a='", b"'/>")
    assert attribute < 4 * text + 0.2


# -- reset -----------------------------------------------------------------------------


def test_reset_starts_a_new_stream_and_drops_partial_input() -> None:
    parser = opened()
    assert parser.feed(b"<message><body>half") == []
    parser.reset()
    [event] = parser.feed(HEADER)
    assert isinstance(event, StreamOpened)
    assert elements(parser.feed(b"<presence/>")) == [Element(ns.CLIENT, "presence")]


def test_reset_after_stream_closed_accepts_a_new_stream() -> None:
    parser = opened()
    parser.feed(b"</stream:stream>")
    parser.reset()
    assert isinstance(parser.feed(HEADER)[0], StreamOpened)


# -- properties ------------------------------------------------------------------------

FRAGMENTS = [
    b"<message to='a@b/c' xml:lang='de'>"
    b"<body>h\xc3\xa9llo \xf0\x9f\x98\x80 &amp; &#x263A;</body></message>",
    b"<iq type='set' id='x'><query xmlns='jabber:iq:roster' xmlns:q='urn:q'>"
    b"<item q:a='1' jid='x@y'><group>\xe4\xb8\xad</group></item></query></iq>",
    b"<r xmlns='urn:xmpp:sm:3'/>",
    b"<presence><![CDATA[a<b]]>c\r\nd</presence>",
    b" \n\t ",
    b"<p xmlns='http://www.w3.org/1999/xhtml'>a<b>b</b>c<i/>d</p>",
    b"<message a='" + b'q>"' * 1700 + b"'/>",
    b"<body>&#" + b"0" * 4200 + b"66;</body>",
]


@settings(max_examples=60, deadline=None)
@given(
    fragments=st.lists(st.sampled_from(FRAGMENTS), max_size=8),
    close=st.booleans(),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
)
def test_any_split_of_a_valid_stream_gives_the_same_events(
    fragments: list[bytes], close: bool, cuts: list[int]
) -> None:
    stream = HEADER + b"".join(fragments) + (b"</stream:stream>" if close else b"")
    whole = StreamParser().feed(stream)
    points = sorted({cut % (len(stream) + 1) for cut in cuts} | {0, len(stream)})
    parser = StreamParser()
    pieces: list[Event] = []
    for start, end in itertools.pairwise(points):
        pieces += parser.feed(stream[start:end])
    assert pieces == whole
    assert len(whole) == 1 + sum(1 for f in fragments if f.startswith(b"<")) + close


def test_stream_fed_a_byte_at_a_time_gives_the_same_events() -> None:
    stream = HEADER + b"".join(FRAGMENTS) + b"</stream:stream>"
    assert feed_bytewise(StreamParser(), stream) == StreamParser().feed(stream)


XMLISH = st.sampled_from(
    [
        b"<",
        b">",
        b"/>",
        b"</",
        b"&",
        b";",
        b"&amp;",
        b"&#",
        b"'",
        b'"',
        b"=",
        b" ",
        b"a",
        b"x:y",
        b"xmlns",
        b"xmlns:x='urn:x'",
        b"<!--",
        b"-->",
        b"<?",
        b"?>",
        b"<![CDATA[",
        b"]]>",
        b"<!DOCTYPE",
        b"<message>",
        b"</message>",
        b"</stream:stream>",
        b"\xc3",
        b"\xa9",
        b"\xff",
        b"\x00",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    garbage=st.one_of(st.binary(max_size=200), st.lists(XMLISH, max_size=40).map(b"".join)),
    cut=st.integers(min_value=0, max_value=200),
    limit=st.sampled_from([30, 1000]),
)
def test_arbitrary_bytes_after_a_header_give_events_or_remote_protocol_error(
    garbage: bytes, cut: int, limit: int
) -> None:
    parser = StreamParser(max_stanza_size=limit + len(HEADER), max_depth=3)
    parser.feed(HEADER)
    try:
        for piece in (garbage[:cut], garbage[cut:]):
            for event in parser.feed(piece):
                assert isinstance(event, StreamOpened | ElementReceived | StreamClosed)
    except RemoteProtocolError:
        pass
