"""Stanzas as stored bytes (`gateway.storage.codec`): namespaces, xml:lang and special
characters survive; damaged bytes are storage errors."""

from __future__ import annotations

import pytest

from gateway.errors import StorageError
from gateway.storage.codec import decode_stanza, encode_stanza
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import XML_LANG, Element
from tests.storage.helpers import HOST, STAMP


def test_a_message_survives_encoding_with_namespaces_lang_and_special_characters() -> None:
    xhtml = Element(
        "http://jabber.org/protocol/xhtml-im",
        "html",
        children=[
            Element(
                "http://www.w3.org/1999/xhtml",
                "body",
                {XML_LANG: "fr"},
                ["bold ", Element("http://www.w3.org/1999/xhtml", "b", children=["<&>"]), " end"],
            )
        ],
    )
    msg = Element(
        ns.CLIENT,
        "message",
        {
            "from": "romeo@example.net/orchard",
            "to": "juliet@example.com",
            "type": "chat",
            "id": "a'b\"c",
            XML_LANG: "en",
            "{urn:example:attrs}flag": "x\ty\nz",
        },
        [
            Element(ns.CLIENT, "body", {XML_LANG: "de"}, ['Grüße & <tags> ]]> "q" \r\n 🎉']),
            Element(ns.CLIENT, "thread", children=["t1"]),
            xhtml,
            Element(ns.DELAY, "delay", {"from": HOST, "stamp": STAMP}, ["Offline Storage"]),
            Element("", "unqualified"),
        ],
    )
    data = encode_stanza(msg)
    decoded = decode_stanza(data)
    assert decoded == msg
    assert decoded.find_text(ns.CLIENT, "body") == 'Grüße & <tags> ]]> "q" \r\n 🎉'
    assert decoded.get(XML_LANG) == "en"


def test_a_deeply_nested_stanza_decodes() -> None:
    inner: Element = Element("urn:example:deep", "x")
    for _ in range(100):
        inner = Element("urn:example:deep", "x", children=[inner])
    msg = Element(ns.CLIENT, "message", children=[inner])
    assert decode_stanza(encode_stanza(msg)) == msg


def test_encoding_refuses_characters_xml_cannot_carry() -> None:
    with pytest.raises(ValueError, match="not allowed"):
        encode_stanza(Element(ns.CLIENT, "message", children=["\x00"]))


@pytest.mark.parametrize(
    "data",
    [b"", b"<message", b"<a/><b/>", b"text", b"<a><!-- c --></a>", b"</stream:stream><a/>"],
)
def test_damaged_stored_stanzas_are_storage_errors(data: bytes) -> None:
    with pytest.raises(StorageError):
        decode_stanza(data)
