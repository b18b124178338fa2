"""Elements, stream header and footer -> UTF-8 bytes (RFC 6120 sections 4.7, 11).

`serialize` writes one element tree in a single pass into a list of strings, joins it and
encodes once. Namespaces are written the way the receiving side expects inside a
`<stream:stream xmlns='jabber:client' xmlns:stream=...>`:

* an element in the namespace in scope (`parent_namespace` for the top element) gets no
  `xmlns`; any other namespace gets `xmlns="..."` and becomes its children's default;
* elements in the streams namespace use the `stream:` prefix, declared by the enclosing
  stream header (`stream_prefix=True`) or on the outermost such element
  (`stream_prefix=False`, for RFC 7395 WebSocket framing, where each element stands alone);
* attribute keys in Clark notation get a prefix: `xml:` for the XML namespace, generated
  `ns0`, `ns1`, ... declared on the same element for anything else.

Text escapes `& < >` (and CR as `&#13;`, which the parser would otherwise turn into LF);
attribute values, written in double quotes, also escape `"` and TAB, LF, CR as character
references so they survive attribute-value normalisation. Characters XML 1.0 forbids
(C0 controls other than TAB/LF/CR, U+FFFE, U+FFFF, lone surrogates) cannot be escaped at
all, so they raise `ValueError`; the parser never produces them, but code may. So do the
reserved namespaces where they cannot be written (an element in the XML namespace, an
attribute in the xmlns namespace). Names are trusted: they come from the parser or from
our own code, and are not checked.
"""

from __future__ import annotations

import re
from typing import Final

from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element

__all__ = ["STREAM_FOOTER", "serialize", "stream_header"]

#: Closes a stream opened with `stream_header`.
STREAM_FOOTER: Final[bytes] = b"</stream:stream>"

#: Namespaces bound to reserved prefixes (Namespaces in XML 1.0, section 3).
_XMLNS: Final = "http://www.w3.org/2000/xmlns/"
_RESERVED: Final = frozenset({ns.XML, _XMLNS})

_STREAM_DECL: Final = ' xmlns:stream="' + ns.STREAM + '"'

#: Characters outside XML 1.0's Char production (section 2.2). One scan over the finished
#: document, not a parse: cheaper than checking every text and attribute separately.
_NOT_XML_CHAR: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _escape_text(text: str) -> str:
    """Escape character data (`>` too, so `]]>` can never appear)."""
    if "&" in text:
        text = text.replace("&", "&amp;")
    if "<" in text:
        text = text.replace("<", "&lt;")
    if ">" in text:
        text = text.replace(">", "&gt;")
    if "\r" in text:
        text = text.replace("\r", "&#13;")
    return text


def _escape_attr(value: str) -> str:
    """Escape an attribute value for double quotes, keeping TAB/LF/CR as references."""
    if "&" in value:
        value = value.replace("&", "&amp;")
    if "<" in value:
        value = value.replace("<", "&lt;")
    if ">" in value:
        value = value.replace(">", "&gt;")
    if '"' in value:
        value = value.replace('"', "&quot;")
    if "\t" in value:
        value = value.replace("\t", "&#9;")
    if "\n" in value:
        value = value.replace("\n", "&#10;")
    if "\r" in value:
        value = value.replace("\r", "&#13;")
    return value


def _write(parts: list[str], element: Element, default_ns: str, stream_declared: bool) -> None:
    """Append the markup of `element` to `parts`.

    Args:
        parts: output pieces.
        element: what to write.
        default_ns: the default namespace in scope.
        stream_declared: whether the `stream` prefix is declared in scope.
    """
    namespace = element.namespace
    if namespace == ns.STREAM:
        tag = "stream:" + element.name
        parts.append("<" + tag)
        if not stream_declared:
            parts.append(_STREAM_DECL)
            stream_declared = True
    elif namespace == default_ns:
        tag = element.name
        parts.append("<" + tag)
    else:
        if namespace in _RESERVED:
            raise ValueError(f"namespace {namespace!r} cannot be a default namespace")
        tag = element.name
        parts.append("<" + tag + ' xmlns="' + _escape_attr(namespace) + '"')
        default_ns = namespace
    attrs = element.attrs
    if attrs:
        prefixes: dict[str, str] | None = None
        for key, value in attrs.items():
            if key.startswith("{"):
                uri, _, local = key[1:].partition("}")
                if uri == ns.XML:
                    key = "xml:" + local
                elif not uri:
                    key = local
                else:
                    if uri == _XMLNS:
                        raise ValueError(f"attribute {key!r} is a namespace declaration")
                    if prefixes is None:
                        prefixes = {}
                    prefix = prefixes.get(uri)
                    if prefix is None:
                        prefix = prefixes[uri] = f"ns{len(prefixes)}"
                        parts.append(" xmlns:" + prefix + '="' + _escape_attr(uri) + '"')
                    key = prefix + ":" + local
            parts.append(" " + key + '="' + _escape_attr(value) + '"')
    children = element.children
    if not children:
        parts.append("/>")
        return
    parts.append(">")
    for child in children:
        if isinstance(child, str):
            parts.append(_escape_text(child))
        else:
            _write(parts, child, default_ns, stream_declared)
    parts.append("</" + tag + ">")


def _encode(document: str) -> bytes:
    """Check for characters XML cannot carry, then encode to UTF-8.

    Raises:
        ValueError: `document` holds a character outside XML 1.0's Char production.
    """
    bad = _NOT_XML_CHAR.search(document)
    if bad is not None:
        raise ValueError(f"character U+{ord(bad.group()):04X} is not allowed in XML")
    return document.encode("utf-8")


def serialize(
    element: Element, parent_namespace: str = ns.CLIENT, *, stream_prefix: bool = True
) -> bytes:
    """Serialize an element tree to UTF-8 bytes.

    Args:
        element: the element to write.
        parent_namespace: the default namespace in scope where the element is written
            (the stream's content namespace; `""` for a standalone document).
        stream_prefix: True when the `stream` prefix is already declared (inside a
            `<stream:stream>` header); False declares it on the outermost element in the
            streams namespace.

    Returns:
        The element's markup; empty elements are written as `<x/>`.

    Raises:
        ValueError: a name, text or attribute value holds a character XML 1.0 forbids, or
            a reserved namespace is used where it cannot be written.
    """
    parts: list[str] = []
    _write(parts, element, parent_namespace, stream_prefix)
    return _encode("".join(parts))


def stream_header(
    *,
    from_: str | None,
    id_: str | None,
    to: str | None = None,
    version: str = "1.0",
    lang: str = "en",
    namespace: str = ns.CLIENT,
) -> bytes:
    """The XML declaration and `<stream:stream>` start tag (RFC 6120 section 4.7).

    Args:
        from_: the `from` attribute (our domain), omitted when None.
        id_: the stream id, omitted when None.
        to: the `to` attribute (the peer's JID), omitted when None.
        version: the `version` attribute.
        lang: the `xml:lang` attribute.
        namespace: the default (content) namespace, `jabber:client` for c2s.

    Returns:
        `<?xml version='1.0'?><stream:stream xmlns=... xmlns:stream=... ...>` as bytes.

    Raises:
        ValueError: a value holds a character XML 1.0 forbids.
    """
    parts = [
        "<?xml version='1.0'?><stream:stream xmlns='",
        _escape_attr(namespace).replace("'", "&apos;"),
        "' xmlns:stream='" + ns.STREAM + "'",
    ]
    for name, value in (
        ("from", from_),
        ("id", id_),
        ("to", to),
        ("version", version),
        ("xml:lang", lang),
    ):
        if value is not None:
            parts.append(" " + name + "='" + _escape_attr(value).replace("'", "&apos;") + "'")
    parts.append(">")
    return _encode("".join(parts))
