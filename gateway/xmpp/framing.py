"""XMPP over WebSocket framing (RFC 7395): messages <-> the c2s stream's events and output.

Theory of operation
-------------------
Over TCP the client's side of the stream is one endless XML document; over WebSocket
(RFC 7395 section 3.3) every text message is a complete document of its own: `<open/>`
where TCP has the `<stream:stream>` start tag, one stanza or nonza per message, `<close/>`
where TCP has `</stream:stream>`; `<open/>` and `<close/>` are in the framing namespace
`urn:ietf:params:xml:ns:xmpp-framing`. This module makes both look the same to the rest of
the gateway (STYLE T3), so `C2SNegotiation` and the session never know the transport.

Input. `WebSocketFraming` owns one hardened `StreamParser` for the connection's life. At
construction it feeds that parser a synthetic root start tag that declares nothing
(`<framed>`); from then on each message is fed as the next child of that root, so it is
parsed exactly once, by the same code, limits and restricted-XML rules as a TCP stanza.
Reusing one parser costs about a quarter of creating a fresh expat parser per message.
After each message exactly one `ElementReceived` and no unfinished markup must be left;
anything else was not one complete document (RFC 7395 section 3.3.3). The element is then
classified:

* `<open/>` in the framing namespace -> `StreamOpened` with namespace `streams`, name
  `stream`, the `<open/>`'s attributes and default namespace `jabber:client`, exactly what
  the parser reports for a TCP header, so `C2SNegotiation` checks `to`, `version` and
  `xml:lang` the same way for both transports (RFC 7395 section 3.4).
* `<close/>` in the framing namespace -> `StreamClosed` (RFC 7395 section 3.6); later
  messages are ignored, as the parser ignores bytes after `</stream:stream>`.
* anything else -> `ElementReceived`, unchanged.

The parser's root never ends, so stream restarts (RFC 7395 section 3.7: the client just
sends a new `<open/>`) need no reset here; `C2SNegotiation` decides whether an `<open/>` is
allowed now, as it does for a TCP header.

The synthetic root binds no namespace and no prefix, so every message means exactly what
it means as a standalone document (RFC 7395 section 3.3.3: "complete with all relevant
namespace and language declarations"), and gives the same `Element` the TCP path gives for
the same stanza. A root that declared `jabber:client` would accept `<message>` without
`xmlns` (Prosody's leniency) but would also move the unqualified children of a
`<stream:error>` into `jabber:client`, misreading valid messages; so it does not, and a
top-level element in no namespace is refused instead, loudly, rather than reaching the
negotiation as an unknown element. Strophe.js (behind converse.js) sets
`xmlns='jabber:client'` on every stanza it sends.

Errors (`RemoteProtocolError`; the framing then stays failed, like the parser):

* more than `max_stanza_size` UTF-8 bytes in one message: `policy-violation`, checked before
  parsing (trio-websocket's `max_message_size` normally stops such a message earlier);
* not exactly one complete element (two elements, half an element, text beside the
  element, `</stream:stream>`): `not-well-formed`, since a standalone document has one
  root and no text outside it (RFC 7395 section 3.3.3; XML 1.0 section 2.1);
* a stream header that is not `<open/>`/`<close/>` in the framing namespace (a
  `<stream:stream>` start tag, `<open/>` in another namespace), a stanza before the first
  `<open/>`, a top-level element in no namespace: `invalid-namespace` (RFC 7395 sections
  3.3.2, 3.3.3 and 3.4; RFC 6120 section 4.9.3.10);
* `<open/>` or `<close/>` with content: `bad-format` (they are empty elements);
* everything the parser refuses, with the parser's condition: `restricted-xml` (DTD,
  comment, processing instruction), `not-well-formed` (also an unbound prefix, such as
  `stream:` not declared by the message), `policy-violation` (depth).

An XML declaration at the start of a message is allowed, though NOT RECOMMENDED (RFC 7395
section 3.3.3): it is checked (UTF-8 only, else `unsupported-encoding`) and dropped, since
inside the synthetic root it would not be well-formed. A message of only white space gives
no event, like a white space keepalive on TCP.

Output. The server's side is built one message at a time from the same elements the TCP
path serializes: `open_message` (the `<open/>` answer, section 3.4), `element_message`
(each stanza, nonza, `<stream:features/>` and `<stream:error/>` as a standalone document
with every namespace declared, section 3.3.3), `close_message` (section 3.6, optionally
with `see-other-uri`, section 3.6.1). A stream error is `element_message(stream_error(...))`
followed by `close_message()` (section 3.5). Each returns `str`, what a WebSocket text
message carries, so nothing is parsed again on the way out.

Ownership: one `WebSocketFraming` per connection, used by its task only; no I/O, clock or
logging. The output functions are pure.
"""

from __future__ import annotations

import re
from typing import Final

from gateway.errors import RemoteProtocolError, StreamErrorCondition
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import XML_LANG, Element
from gateway.xmpp.parser import ElementReceived, Event, StreamClosed, StreamOpened, StreamParser
from gateway.xmpp.serializer import serialize

__all__ = ["WebSocketFraming", "close_message", "element_message", "open_message"]

#: The root every message is parsed inside; it declares nothing (see the module docstring).
_CONTEXT: Final = b"<framed>"

#: Local names that need a closer look: the framing headers and their look-alikes.
_HEADER_NAMES: Final = frozenset({"open", "close", "stream"})

_STREAM_CLOSED: Final = StreamClosed()

#: `<close/>` without `see-other-uri`, the common case, built once.
_CLOSE: Final = '<close xmlns="' + ns.FRAMING + '"/>'

#: An XML declaration (XML 1.0 section 2.8, production XMLDecl); group 1 or 2 = encoding.
_XML_DECL: Final = re.compile(
    rb"""<\?xml [ \t\r\n]+ version [ \t\r\n]* = [ \t\r\n]* (?: '1\.[0-9]+' | "1\.[0-9]+" )
    (?: [ \t\r\n]+ encoding [ \t\r\n]* = [ \t\r\n]*
        (?: '([A-Za-z][A-Za-z0-9._-]*)' | "([A-Za-z][A-Za-z0-9._-]*)" ) )?
    (?: [ \t\r\n]+ standalone [ \t\r\n]* = [ \t\r\n]* (?: '(?:yes|no)' | "(?:yes|no)" ) )?
    [ \t\r\n]* \?>""",
    re.VERBOSE,
)


def _without_xml_declaration(data: bytes) -> bytes:
    """`data` without its leading XML declaration, when it has a valid one.

    Anything else starting with `<?xml` is left for the parser, which refuses it
    (`restricted-xml` for a processing instruction, `not-well-formed` otherwise).

    Raises:
        RemoteProtocolError: `unsupported-encoding`: the declaration names another
            encoding than UTF-8 (RFC 6120 section 11.6; a text message is UTF-8).
    """
    match = _XML_DECL.match(data)
    if match is None:
        return data
    encoding = match.group(1) or match.group(2)
    if encoding is not None and encoding.upper() != b"UTF-8":
        raise RemoteProtocolError(
            StreamErrorCondition.UNSUPPORTED_ENCODING, f"encoding {encoding.decode()!r}"
        )
    return data[match.end() :]


def _message_error(
    condition: StreamErrorCondition, text: str | None, data: bytes
) -> RemoteProtocolError:
    """The error for a message the parser refused or that is not one element.

    Only called on failure, so the checks below cost nothing on the normal path.

    Args:
        condition: what the parser (or the one-element check) found.
        text: its description.
        data: the message as given to the parser.
    """
    start = data.lstrip(b" \t\r\n")
    if start.startswith(b"<stream:stream"):
        # The pre-RFC draft's framing: a TCP stream header as a message (RFC 7395 3.3.2).
        return RemoteProtocolError(
            StreamErrorCondition.INVALID_NAMESPACE,
            f"stream headers are <open/> and <close/> in {ns.FRAMING}",
        )
    if start.startswith(b"<!DOCTYPE"):
        # Legal in a standalone document's prolog, refused by XMPP (RFC 6120 section
        # 11.1); inside the synthetic root expat only reports misplaced markup.
        return RemoteProtocolError(StreamErrorCondition.RESTRICTED_XML, "document type declaration")
    if condition is StreamErrorCondition.BAD_FORMAT:
        # The parser's "text at stream level": text outside the root element of a
        # standalone document is a well-formedness error (XML 1.0 section 2.1).
        return RemoteProtocolError(StreamErrorCondition.NOT_WELL_FORMED, "text outside the element")
    return RemoteProtocolError(condition, text)


def _is_empty(element: Element) -> bool:
    """No child elements and no text other than white space."""
    return all(isinstance(child, str) and not child.strip() for child in element.children)


class WebSocketFraming:
    """Turns RFC 7395 text messages into the parser events of a c2s stream.

    See the module docstring. One instance per WebSocket connection.

    Args:
        max_stanza_size: most UTF-8 bytes in one message (and so in one stanza); more is
            `policy-violation`. At least the size of the synthetic root (8 bytes).
        max_depth: deepest element nesting inside a stanza (the stanza is depth 1), as
            for `StreamParser`.

    Raises:
        ValueError: a limit is too small.
    """

    __slots__ = ("_error", "_is_closed", "_is_opened", "_max_stanza_size", "_parser")

    def __init__(self, *, max_stanza_size: int, max_depth: int) -> None:
        if max_stanza_size < len(_CONTEXT):
            raise ValueError(f"max_stanza_size must be at least {len(_CONTEXT)}")
        self._max_stanza_size = max_stanza_size
        self._parser = StreamParser(max_stanza_size=max_stanza_size, max_depth=max_depth)
        self._parser.feed(_CONTEXT)
        #: An `<open/>` was received (RFC 7395 section 3.4: it must come first).
        self._is_opened = False
        #: A `<close/>` was received; later messages are ignored.
        self._is_closed = False
        self._error: RemoteProtocolError | None = None

    def set_max_stanza_size(self, max_stanza_size: int) -> None:
        """Change the message size limit (small before authentication, full after).

        Raises:
            ValueError: the limit is too small.
        """
        if max_stanza_size < len(_CONTEXT):
            raise ValueError(f"max_stanza_size must be at least {len(_CONTEXT)}")
        self._max_stanza_size = max_stanza_size
        self._parser.set_max_stanza_size(max_stanza_size)

    def close(self) -> None:
        """Free the parser now (see `StreamParser.close`); later messages fail."""
        self._parser.close()

    def receive_message(self, text: str) -> list[Event]:
        """Translate one WebSocket text message.

        Args:
            text: the message, as the WebSocket library decoded it.

        Returns:
            `[StreamOpened]` for `<open/>`, `[StreamClosed]` for `<close/>`,
            `[ElementReceived]` for a stanza or nonza; `[]` for a message of only white
            space, and for anything after `<close/>`.

        Raises:
            RemoteProtocolError: see the module docstring for the conditions. The framing
                then stays failed: later calls raise the same condition.
        """
        if self._error is not None:
            raise RemoteProtocolError(self._error.condition, self._error.text)
        if self._is_closed:
            return []
        try:
            return self._receive(text)
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _receive(self, text: str) -> list[Event]:
        limit = self._max_stanza_size
        # A character is at least one byte: a long text fails before it is encoded.
        if len(text) > limit:
            raise RemoteProtocolError(StreamErrorCondition.POLICY_VIOLATION, "message too large")
        try:
            data = text.encode()
        except UnicodeEncodeError as exc:
            # A lone surrogate; WebSocket libraries decode strictly, so only a caller bug.
            raise RemoteProtocolError(
                StreamErrorCondition.NOT_WELL_FORMED, "not valid UTF-8"
            ) from exc
        if len(data) > limit:
            raise RemoteProtocolError(StreamErrorCondition.POLICY_VIOLATION, "message too large")
        if data.startswith(b"<?xml"):
            data = _without_xml_declaration(data)
        parser = self._parser
        try:
            events = parser.feed(data)
        except RemoteProtocolError as exc:
            raise _message_error(exc.condition, exc.text, data) from exc
        if len(events) != 1 or parser.has_partial_data:
            if not events and not parser.has_partial_data:
                return []  # white space only
            raise _message_error(
                StreamErrorCondition.NOT_WELL_FORMED, "a message must be exactly one element", data
            )
        event = events[0]
        if type(event) is not ElementReceived:
            # `</framed>` ended the synthetic root: an end tag alone is not a document.
            raise RemoteProtocolError(
                StreamErrorCondition.NOT_WELL_FORMED, "an end tag is not a message"
            )
        element = event.element
        if element.name in _HEADER_NAMES:
            header = self._header(element)
            if header is not None:
                return [header]
        if not self._is_opened:
            raise RemoteProtocolError(
                StreamErrorCondition.INVALID_NAMESPACE, "the first message must be <open/>"
            )
        if not element.namespace:
            raise RemoteProtocolError(
                StreamErrorCondition.INVALID_NAMESPACE, "the element must declare its namespace"
            )
        return events

    def _header(self, element: Element) -> StreamOpened | StreamClosed | None:
        """The event for a framing header, or None for an ordinary element.

        Raises:
            RemoteProtocolError: `invalid-namespace` for a header in the wrong namespace
                (RFC 7395 section 3.3.2), `bad-format` for a header with content.
        """
        name = element.name
        namespace = element.namespace
        if namespace == ns.FRAMING and name != "stream":
            if not _is_empty(element):
                raise RemoteProtocolError(
                    StreamErrorCondition.BAD_FORMAT, f"<{name}/> must be empty"
                )
            if name == "close":
                self._is_closed = True
                return _STREAM_CLOSED
            self._is_opened = True
            return StreamOpened(ns.STREAM, "stream", element.attrs, ns.CLIENT)
        if name != "stream" or namespace == ns.STREAM:
            raise RemoteProtocolError(
                StreamErrorCondition.INVALID_NAMESPACE,
                f"stream headers are <open/> and <close/> in {ns.FRAMING}",
            )
        return None


# -- output (RFC 7395 sections 3.3.3, 3.4, 3.5, 3.6) ---------------------------------------


def element_message(element: Element) -> str:
    """One top-level element as a standalone message (RFC 7395 section 3.3.3).

    The element declares its namespace (`xmlns='jabber:client'` for stanzas), elements in
    the streams namespace declare the `stream` prefix on the outermost one, so
    `<stream:features/>` and `<stream:error/>` need no enclosing header.

    Args:
        element: a stanza, nonza, `<stream:features/>` or `<stream:error/>`.

    Returns:
        The message text.

    Raises:
        ValueError: the element is in no namespace (not a valid top-level element; our
            own reader refuses it too), or the serializer refuses it.
    """
    if not element.namespace:
        raise ValueError("a top-level element needs a namespace")
    # TODO: a serializer that writes text directly would save this decode.
    return serialize(element, "", stream_prefix=False).decode()


def open_message(
    *,
    from_: str | None,
    id_: str | None,
    to: str | None = None,
    version: str = "1.0",
    lang: str = "en",
) -> str:
    """The server's `<open/>`, where TCP sends `stream_header()` (RFC 7395 section 3.4).

    Takes the same arguments as `serializer.stream_header`, so a caller can pick one by
    transport.

    Args:
        from_: the `from` attribute (our domain), omitted when None.
        id_: the stream id, omitted when None.
        to: the `to` attribute, omitted when None.
        version: the `version` attribute.
        lang: the `xml:lang` attribute.

    Returns:
        `<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' from=.. id=.. version='1.0'
        xml:lang='en'/>` (double quotes).

    Raises:
        ValueError: a value holds a character XML 1.0 forbids.
    """
    attrs: dict[str, str] = {}
    for key, value in (("from", from_), ("id", id_), ("to", to)):
        if value is not None:
            attrs[key] = value
    attrs["version"] = version
    attrs[XML_LANG] = lang
    return element_message(Element(ns.FRAMING, "open", attrs))


def close_message(see_other_uri: str | None = None) -> str:
    """`<close/>`, where TCP sends `</stream:stream>` (RFC 7395 section 3.6).

    Args:
        see_other_uri: where the client should reconnect (RFC 7395 section 3.6.1), or
            None for a plain close.

    Returns:
        The message text.

    Raises:
        ValueError: the URI holds a character XML 1.0 forbids.
    """
    if see_other_uri is None:
        return _CLOSE
    return element_message(Element(ns.FRAMING, "close", {"see-other-uri": see_other_uri}))
