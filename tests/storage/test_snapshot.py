"""The hand-off snapshot format: an equal snapshot after a round trip, and a damaged or
foreign record refused with `StorageError` (never another exception)."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.errors import StorageError
from gateway.storage.base import SessionSnapshot
from gateway.storage.snapshot import FORMAT_VERSION, decode_snapshot, encode_snapshot
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import XML_LANG, Element
from tests.helpers.xml_strategies import element, xml_chars, xml_names, xml_text

MOD = 2**32
XHTML_IM = "http://jabber.org/protocol/xhtml-im"
XHTML = "http://www.w3.org/1999/xhtml"
CAPS = "http://jabber.org/protocol/caps"
#: Marks a field to delete from a record in `record_with`.
MISSING = object()


def message(n: int, body: str = "hi") -> Element:
    return Element(
        ns.CLIENT,
        "message",
        {"id": f"m{n}", "to": "juliet@example.com/balcony", "type": "chat"},
        [Element(ns.CLIENT, "body", None, [body])],
    )


def full_snapshot() -> SessionSnapshot:
    """Every field away from its default, counters at the edge of 32 bits."""
    rich = Element(
        ns.CLIENT,
        "message",
        {
            "from": "romeo@example.net/orchard",
            "to": "juliet@example.com/balcony",
            "id": "a'b\"c",
            XML_LANG: "en",
            "{urn:example:attrs}flag": "x\ty\nz",
        },
        [
            Element(ns.CLIENT, "body", {XML_LANG: "de"}, ["Grüße <&> ]]> 'q' \r\n 🎉 中文"]),
            Element(
                XHTML_IM,
                "html",
                children=[
                    Element(
                        XHTML, "body", children=["a ", Element(XHTML, "b", children=["<b>"]), " z"]
                    )
                ],
            ),
            Element(ns.DELAY, "delay", {"from": "example.com", "stamp": "2026-01-02T03:04:05Z"}),
            Element("", "unqualified"),
        ],
    )
    presence = Element(
        ns.CLIENT,
        "presence",
        {XML_LANG: "fr"},
        [
            Element(ns.CLIENT, "show", children=["away"]),
            Element(ns.CLIENT, "status", children=["Là-bas & <ailleurs>"]),
            Element(ns.CLIENT, "priority", children=["-5"]),
            Element(
                CAPS, "c", {"hash": "sha-1", "node": "urn:x", "ver": "QgayPKawpkPSDYmwT/WM94="}
            ),
        ],
    )
    return SessionSnapshot(
        smid="c21pZA-_0123456789abcdef",
        full_jid="juliet@example.com/balcony \u00e9",
        expires_at=1_790_000_000.125,
        max=MOD - 1,
        counter_in=MOD - 1,
        counter_out=MOD - 2,
        buffer=(message(1), rich, message(2, "ünïcödé"), message(3)),
        priority=-5,
        presence=presence,
        interested=True,
        directed=("romeo@example.net/orchard", "room@muc.example.com/nick"),
        flush_pending=True,
        epoch=7,
    )


def small_snapshot() -> SessionSnapshot:
    return SessionSnapshot(
        smid="sm1-0123456789abcdef",
        full_jid="juliet@example.com/balcony",
        expires_at=1_790_000_000.0,
        max=300,
        counter_in=3,
        counter_out=1,
        buffer=(message(1),),
    )


def record_with(**changes: object) -> bytes:
    """A valid encoded snapshot with fields replaced (or deleted, with `MISSING`)."""
    record = json.loads(encode_snapshot(small_snapshot()))
    for name, value in changes.items():
        if value is MISSING:
            del record[name]
        else:
            record[name] = value
    return json.dumps(record).encode()


# -- round trip ----------------------------------------------------------------------------


def test_a_full_snapshot_decodes_equal_to_what_was_encoded() -> None:
    snapshot = full_snapshot()
    decoded = decode_snapshot(encode_snapshot(snapshot))
    assert decoded == snapshot
    assert decoded.buffer[1].find_text(ns.CLIENT, "body") == "Grüße <&> ]]> 'q' \r\n 🎉 中文"
    assert decoded.buffer[1].get(XML_LANG) == "en"
    assert decoded.presence is not None
    assert decoded.presence.get(XML_LANG) == "fr"


def test_a_snapshot_with_defaults_and_an_empty_buffer_round_trips() -> None:
    snapshot = SessionSnapshot(
        smid="s" * 16,
        full_jid="a@b/c",
        expires_at=0.0,
        max=1,
        counter_in=0,
        counter_out=0,
        buffer=(),
    )
    decoded = decode_snapshot(encode_snapshot(snapshot))
    assert decoded == snapshot
    assert decoded.presence is None
    assert decoded.buffer == ()


def test_the_encoding_is_a_utf8_json_object_of_this_format_version() -> None:
    data = encode_snapshot(full_snapshot())
    record = json.loads(data.decode("utf-8"))
    assert record["v"] == FORMAT_VERSION == 1
    assert record["counter_in"] == MOD - 1
    assert isinstance(record["buffer"], list)
    assert all(isinstance(item, str) for item in record["buffer"])


def test_an_integral_expires_at_decodes_as_a_float() -> None:
    decoded = decode_snapshot(record_with(expires_at=1_790_000_000))
    assert decoded.expires_at == 1_790_000_000.0
    assert isinstance(decoded.expires_at, float)


def test_a_record_with_presence_null_decodes_with_presence_none() -> None:
    assert decode_snapshot(record_with(presence=None)).presence is None


@pytest.mark.parametrize("key", ["presence", "peer"])
def test_a_record_missing_a_key_is_refused(key: str) -> None:
    with pytest.raises(StorageError, match=key):
        decode_snapshot(record_with(**{key: MISSING}))


def test_a_record_with_an_unknown_key_is_refused() -> None:
    with pytest.raises(StorageError, match="surprise"):
        decode_snapshot(record_with(surprise=1))


@pytest.mark.parametrize(
    "smid", ["", "short", "has space in it long enough", "new\nline-0123456789"]
)
def test_an_smid_that_no_server_would_have_made_is_refused(smid: str) -> None:
    with pytest.raises(StorageError, match="smid"):
        decode_snapshot(record_with(smid=smid))


@pytest.mark.parametrize(
    "xml",
    [
        f"<r xmlns='{ns.SM}'/>",
        "<message xmlns='urn:other'/>",
        "<message/>",
        f"<error xmlns='{ns.STREAM}'/>",
    ],
)
def test_a_buffer_item_that_is_not_a_client_stanza_is_refused(xml: str) -> None:
    with pytest.raises(StorageError, match="buffer"):
        decode_snapshot(record_with(buffer=[xml]))


@pytest.mark.parametrize(
    "xml",
    [
        f"<message xmlns='{ns.CLIENT}'/>",
        f"<presence xmlns='{ns.CLIENT}' type='unavailable'/>",
    ],
)
def test_a_presence_that_is_not_an_available_presence_is_refused(xml: str) -> None:
    with pytest.raises(StorageError, match="presence"):
        decode_snapshot(record_with(presence=xml))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("counter_in", 0),
        ("counter_in", MOD - 1),
        ("counter_out", MOD - 1),
        ("max", 1),
        ("max", MOD - 1),
        ("priority", -128),
        ("priority", 127),
        ("epoch", 1),
        ("epoch", 2**63 - 1),
        ("expires_at", -1.5),
    ],
)
def test_values_at_the_edges_of_their_range_are_accepted(field: str, value: int) -> None:
    decoded = decode_snapshot(record_with(**{field: value}))
    assert getattr(decoded, field) == value


# -- round trip property (STYLE V5) ---------------------------------------------------------

element_namespaces = st.sampled_from([ns.CLIENT, "urn:a", "urn:b:\u00e9", "", "urn:q?a=1&b=<2>'"])


def _element(children: st.SearchStrategy[list[Element | str]]) -> st.SearchStrategy[Element]:
    return element(element_namespaces, xml_names, children)


elements = st.recursive(
    _element(st.just([])),
    lambda inner: _element(st.lists(st.one_of(xml_text, inner), max_size=4)),
    max_leaves=8,
)
counters = st.integers(MOD - 8, MOD - 1) | st.integers(0, MOD - 1)


@settings(max_examples=150, deadline=None)
@given(
    counter_in=counters,
    counter_out=counters,
    max_=st.integers(1, MOD - 1),
    priority=st.integers(-128, 127),
    expires_at=st.floats(allow_nan=False, allow_infinity=False),
    bodies=st.lists(xml_text, max_size=4),
    extra=st.lists(elements.map(lambda e: Element(ns.CLIENT, "message", {}, [e])), max_size=2),
    presence=st.none() | elements.map(lambda e: Element(ns.CLIENT, "presence", {}, [e])),
    smid=st.from_regex(r"[A-Za-z0-9_-]{16,128}", fullmatch=True),
    directed=st.lists(st.text(), max_size=3),
    flags=st.tuples(st.booleans(), st.booleans()),
    epoch=st.integers(1, 2**63 - 1),
)
def test_any_snapshot_decodes_equal_to_what_was_encoded(
    counter_in: int,
    counter_out: int,
    max_: int,
    priority: int,
    expires_at: float,
    bodies: list[str],
    extra: list[Element],
    presence: Element | None,
    smid: str,
    directed: list[str],
    flags: tuple[bool, bool],
    epoch: int,
) -> None:
    buffer = tuple(message(n, body) for n, body in enumerate(bodies)) + tuple(extra)
    snapshot = SessionSnapshot(
        smid=smid,
        full_jid="juliet@example.com/" + smid,
        expires_at=expires_at,
        max=max_,
        counter_in=counter_in,
        counter_out=counter_out,
        buffer=buffer,
        priority=priority,
        presence=presence,
        interested=flags[0],
        directed=tuple(directed),
        flush_pending=flags[1],
        epoch=epoch,
    )
    assert decode_snapshot(encode_snapshot(snapshot)) == snapshot


# -- refusals: not a record of this format --------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"{",
        b'{"v": 1,',
        b"\xff\xfe\xfa",  # invalid UTF-8
        b'{"v": 1, "smid": "\xc3\x28"}',  # invalid UTF-8 inside a string
        b"\x80" + encode_snapshot(small_snapshot()),
        encode_snapshot(small_snapshot())[:-1],  # truncated
    ],
)
def test_bytes_that_are_not_json_are_refused(data: bytes) -> None:
    with pytest.raises(StorageError, match="not JSON"):
        decode_snapshot(data)


@pytest.mark.parametrize("data", [b"[]", b"null", b"1", b'"snapshot"', b"true", b"[{}]"])
def test_json_that_is_not_an_object_is_refused(data: bytes) -> None:
    with pytest.raises(StorageError, match="not a JSON object"):
        decode_snapshot(data)


@pytest.mark.parametrize("version", [MISSING, None, 0, 2, "1", [1], {}])
def test_a_record_of_another_format_version_is_refused(version: object) -> None:
    with pytest.raises(StorageError, match="format"):
        decode_snapshot(record_with(v=version))


@pytest.mark.parametrize("version", [True, 1.0])
def test_a_version_that_is_not_the_integer_1_is_refused(version: object) -> None:
    with pytest.raises(StorageError, match="format"):
        decode_snapshot(record_with(v=version))


REQUIRED = [
    "smid",
    "full_jid",
    "expires_at",
    "max",
    "counter_in",
    "counter_out",
    "buffer",
    "priority",
    "interested",
    "directed",
    "flush_pending",
    "epoch",
]


@pytest.mark.parametrize("field", REQUIRED)
def test_a_record_missing_a_required_field_is_refused(field: str) -> None:
    with pytest.raises(StorageError, match=field):
        decode_snapshot(record_with(**{field: MISSING}))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("smid", 1),
        ("smid", None),
        ("smid", ["sm1"]),
        ("full_jid", 5),
        ("full_jid", False),
        ("expires_at", "1790000000"),
        ("expires_at", True),
        ("expires_at", None),
        ("expires_at", [1.0]),
        ("max", True),
        ("max", 300.0),
        ("max", "300"),
        ("counter_in", True),
        ("counter_in", 1.0),
        ("counter_out", False),
        ("counter_out", None),
        ("buffer", '<message xmlns="jabber:client"/>'),
        ("buffer", {"0": "<a/>"}),
        ("buffer", [1]),
        ("buffer", [None]),
        ("priority", True),
        ("priority", 0.5),
        ("interested", 1),
        ("interested", 0),
        ("interested", "true"),
        ("interested", None),
        ("flush_pending", 1),
        ("flush_pending", "false"),
        ("directed", "romeo@example.net"),
        ("directed", [1]),
        ("directed", [None]),
        ("epoch", True),
        ("epoch", 1.0),
    ],
)
def test_a_field_of_the_wrong_type_is_refused(field: str, value: object) -> None:
    with pytest.raises(StorageError, match=field):
        decode_snapshot(record_with(**{field: value}))


@pytest.mark.parametrize("value", [1, True, False, ["<presence/>"], {"a": 1}])
def test_a_presence_that_is_not_a_string_is_refused(value: object) -> None:
    with pytest.raises(StorageError, match="presence"):
        decode_snapshot(record_with(presence=value))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("counter_in", -1),
        ("counter_in", MOD),
        ("counter_out", -1),
        ("counter_out", MOD),
        ("max", 0),
        ("max", -1),
        ("max", MOD),
        ("priority", -129),
        ("priority", 128),
        ("epoch", 0),
        ("epoch", 2**63),
    ],
)
def test_a_number_out_of_range_is_refused(field: str, value: int) -> None:
    with pytest.raises(StorageError, match=f"{field}.*out of range"):
        decode_snapshot(record_with(**{field: value}))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_an_expires_at_that_is_not_finite_is_refused(value: float) -> None:
    data = record_with(expires_at=value)  # json.dumps writes NaN / Infinity (allow_nan)
    assert b"NaN" in data or b"Infinity" in data
    with pytest.raises(StorageError, match="expires_at"):
        decode_snapshot(data)


def test_an_expires_at_literal_beyond_float_range_is_refused() -> None:
    data = record_with(expires_at=1.0).replace(b'"expires_at": 1.0', b'"expires_at": 1e400')
    assert b"1e400" in data
    with pytest.raises(StorageError, match="expires_at"):
        decode_snapshot(data)


def test_an_integer_expires_at_beyond_float_range_is_refused() -> None:
    with pytest.raises(StorageError, match="expires_at"):
        decode_snapshot(record_with(expires_at=10**400))


@pytest.mark.parametrize(
    "stanza",
    [
        "",
        "<message",
        "text",
        "<a/><b/>",
        '<message xmlns="jabber:client"><body>x</message>',
        "<a><!-- c --></a>",
        "</stream:stream><a/>",
        "<?xml version='1.0'?><a/>",
        "<a>" * 300 + "</a>" * 300,  # deeper than decode_stanza allows
    ],
)
def test_a_damaged_stanza_in_the_buffer_is_refused(stanza: str) -> None:
    data = record_with(buffer=['<message xmlns="jabber:client"/>', stanza])
    with pytest.raises(StorageError):
        decode_snapshot(data)


def test_a_damaged_presence_is_refused() -> None:
    with pytest.raises(StorageError):
        decode_snapshot(record_with(presence="<presence"))


def test_a_buffer_stanza_with_data_after_a_stream_close_is_refused() -> None:
    with pytest.raises(StorageError):
        decode_snapshot(record_with(buffer=["<a/></stream:stream><b/>"]))


@pytest.mark.parametrize("field", ["buffer", "presence"])
def test_a_stanza_string_with_a_lone_surrogate_is_refused(field: str) -> None:
    value: object = ["\ud800"] if field == "buffer" else "\ud800"
    data = record_with(**{field: value})
    assert b"\\ud800" in data
    with pytest.raises(StorageError):
        decode_snapshot(data)


@pytest.mark.parametrize("field", ["smid", "full_jid", "directed"])
def test_a_snapshot_that_decodes_can_be_encoded_again(field: str) -> None:
    value: object = ["\udc80"] if field == "directed" else "\udc80"
    try:
        snapshot = decode_snapshot(record_with(**{field: value}))
    except StorageError:
        return  # refusing it is fine too
    assert decode_snapshot(encode_snapshot(snapshot)) == snapshot


@pytest.mark.parametrize("data", [b"[" * 100_000, b'{"a":' * 100_000])
def test_deeply_nested_json_is_refused(data: bytes) -> None:
    with pytest.raises(StorageError):
        decode_snapshot(data)


# -- refusals: properties (STYLE V5) --------------------------------------------------------

VALID = encode_snapshot(full_snapshot())


def _mutations() -> st.SearchStrategy[bytes]:
    """A valid encoding truncated, or with one byte replaced or deleted."""
    positions = st.integers(0, len(VALID) - 1)
    return st.one_of(
        st.builds(lambda i: VALID[:i], positions),
        st.builds(
            lambda i, b: VALID[:i] + bytes([b]) + VALID[i + 1 :], positions, st.integers(0, 255)
        ),
        st.builds(lambda i: VALID[:i] + VALID[i + 1 :], positions),
    )


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200) | _mutations())
@example(data=b"")
@example(data=VALID)
def test_arbitrary_bytes_decode_or_raise_storage_error_only(data: bytes) -> None:
    with contextlib.suppress(StorageError):
        decode_snapshot(data)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.text(xml_chars, max_size=20).map(lambda s: f"<a>{s}</a>"),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from([*REQUIRED, "presence", "v"]), value=json_values)
def test_any_json_value_in_any_field_decodes_or_raises_storage_error_only(
    field: str, value: object
) -> None:
    with contextlib.suppress(StorageError):
        decode_snapshot(record_with(**{field: value}))
