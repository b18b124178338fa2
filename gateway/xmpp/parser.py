"""Incremental, hardened XMPP stream parser: bytes in, stream events out (RFC 6120 section 4, 11).

Theory of operation
-------------------
An XMPP stream is one XML document that never ends while the connection lives: the root
`<stream:stream>` opens it, every top-level child is a stanza (or nonza), and the root's end
tag closes it. `StreamParser` turns bytes into three facts:

* depth-0 start tag (the root)             -> `StreamOpened`
* an element ending at depth 1 (a stanza)  -> `ElementReceived`
* the root's end tag                       -> `StreamClosed`

Only the elements of the stanza being read are kept (a stack of open elements); the root
keeps no children, so memory does not grow with the number of stanzas. `feed()` can take
any split of the input, down to single bytes in the middle of a UTF-8 character: expat keeps
an incomplete token and finishes it on the next call. Consecutive text is joined into one
`str` child. Whitespace between stanzas (keepalives) produces no event; any other text at
stream level is `bad-format`. `reset()` drops the expat parser and starts a fresh document,
which is what a stream restart after STARTTLS or SASL success needs (RFC 6120 sections
5.4.3.3, 6.4.6).

Restricted XML (RFC 6120 section 11.1): the expat parser comes from
`gateway.xmpp.restricted_xml`, whose handlers refuse DTDs, entity declarations, comments,
processing instructions and non-UTF-8 declarations. Every other expat error is
`not-well-formed`.

Limits (STYLE P3). Positions are absolute byte offsets since the last reset (expat's
`CurrentByteIndex` and our `_received` count). The unit being read is measured from:
the start of the document while the stream header is incomplete; the `<` of the stanza's
start tag while a stanza is open; the start of the incomplete token expat still holds
between stanzas. More than `max_stanza_size` bytes in the current unit is
`policy-violation`. Input is handed to expat in slices of at most `_MAX_SLICE` bytes and
checked after each slice, and a stanza's size is checked again when its end tag is seen, so
a 10 MB chunk fails after a few slices instead of after building a 10 MB element. A stanza is
counted from its first byte to the start of its end tag. Elements nested more than
`max_depth` levels deep (the stanza is level 1) are `policy-violation` too.

Memory. Bytes on the wire do not bound the memory a stanza takes: an empty `<a/>` is 4
bytes but about 200 as an object. While a stanza is built, its estimated memory (the costs
of `gateway.xmpp.element`) is kept in `_cost`; past `STANZA_MEMORY_FACTOR` times
`max_stanza_size` it is `policy-violation`. Text that arrives in many small pieces (a byte
per TCP segment) is joined once its pieces' overhead is a quarter of that budget, so a
slow sender is charged for its text, not for the way it was split. `set_max_stanza_size`
changes both limits (a small one before authentication, the full one after).
`close()` drops the expat parser, whose handlers refer back to this object: without it the
pair is a reference cycle that only the cyclic collector frees.

Large tokens (CVE-2023-52425). Once expat holds an incomplete token longer than
`DEFER_THRESHOLD` bytes, new bytes go to a `HeldToken` (`_held`) instead of expat until
they may end that token; `gateway.xmpp.deferral` explains why. Held bytes count as received.

Errors. `feed()` raises `RemoteProtocolError`; events completed earlier in the same call are
then discarded (the stream is being torn down). The parser stays failed: later `feed()`
calls raise the same condition until `reset()`. After `StreamClosed` the document is over:
later input, including junk right after the root's end tag, is ignored and `feed()` returns
no events (the caller is closing the connection).

Ownership: a parser belongs to one connection task; it has no I/O, clock or logging.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, TypeAlias

# Only for ExpatError, ErrorString and a handler-less placeholder parser: the parser that
# reads the stream is made hardened by gateway.xmpp.restricted_xml (see its docstring).
from xml.parsers import expat

from gateway.errors import RemoteProtocolError, StreamErrorCondition
from gateway.xmpp.deferral import DEFER_THRESHOLD, HeldToken, hold_token
from gateway.xmpp.element import ELEMENT_COST, TEXT_COST, Element, attributes_cost
from gateway.xmpp.restricted_xml import new_expat_parser

__all__ = ["ElementReceived", "Event", "StreamClosed", "StreamOpened", "StreamParser"]

#: Separator expat puts between namespace URI and local name. `}` cannot occur in a local
#: name and expat refuses it in namespace URIs, so "uri}local" splits unambiguously and a
#: namespaced attribute becomes Clark notation by prepending "{".
_SEP: Final = "}"

#: Largest slice of one `feed()` chunk given to expat before the limits are checked again.
_MAX_SLICE: Final = 65536

#: XML white space (production S); expat has already turned CR LF into LF.
_XML_SPACE: Final = " \t\r\n"

#: A stanza being built may hold this many times `max_stanza_size` bytes of memory.
STANZA_MEMORY_FACTOR: Final = 8


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The stream header (the root start tag) was received.

    Attributes:
        namespace: namespace of the root element; `http://etherx.jabber.org/streams` for a
            valid stream (checked by the caller).
        name: local name of the root (`stream`).
        attrs: root attributes; `to`, `from`, `version`, `id` and Clark-notation keys such
            as `{http://www.w3.org/XML/1998/namespace}lang`.
        default_namespace: the default namespace declared on the root (`jabber:client`),
            or None.
    """

    namespace: str
    name: str
    attrs: Mapping[str, str]
    default_namespace: str | None


@dataclass(frozen=True, slots=True)
class ElementReceived:
    """A complete top-level child of the root (stanza or nonza), namespaces resolved."""

    element: Element


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """The root's end tag (`</stream:stream>`) was received."""


Event: TypeAlias = StreamOpened | ElementReceived | StreamClosed

_STREAM_CLOSED: Final = StreamClosed()

#: What a closed parser holds instead of its expat parser: one shared, handler-less one.
_CLOSED_PARSER: Final = expat.ParserCreate("UTF-8", _SEP, None)

#: An open element of the stanza being read: expat name ("uri}local"), attrs, children.
_Open: TypeAlias = tuple[str, dict[str, str], list[Element | str]]


def _clark(attrs: dict[str, str]) -> dict[str, str]:
    """Attributes with expat's "uri}local" keys rewritten to Clark notation "{uri}local"."""
    for key in attrs:
        if _SEP in key:
            return {("{" + k if _SEP in k else k): v for k, v in attrs.items()}
    return attrs


def _join_text(children: list[Element | str]) -> list[Element | str]:
    """`children` with each run of adjacent text pieces joined into one string."""
    joined: list[Element | str] = []
    run: list[str] = []
    for child in children:
        if type(child) is str:
            run.append(child)
            continue
        if run:
            joined.append("".join(run))
            run = []
        joined.append(child)
    if run:
        joined.append("".join(run))
    return joined


class StreamParser:
    """Sans-I/O parser for one XMPP stream (see the module docstring).

    Args:
        max_stanza_size: most bytes allowed for one top-level element, and for the stream
            header; more is `policy-violation`.
        max_depth: deepest element nesting inside a stanza (the stanza itself is depth 1);
            deeper is `policy-violation`.

    Raises:
        ValueError: a limit is not positive.
    """

    __slots__ = (
        "__weakref__",
        "_closed",
        "_cost",
        "_default_ns",
        "_error",
        "_events",
        "_held",
        "_loose",
        "_max_depth",
        "_max_memory",
        "_max_stanza_size",
        "_parser",
        "_received",
        "_root_open",
        "_slice",
        "_stack",
        "_stanza_start",
        "_tail",
        "_token_start",
    )

    def __init__(self, *, max_stanza_size: int = 262144, max_depth: int = 32) -> None:
        if max_depth < 1:
            raise ValueError("max_stanza_size and max_depth must be positive")
        self._max_depth = max_depth
        self.set_max_stanza_size(max_stanza_size)
        self.reset()

    def set_max_stanza_size(self, max_stanza_size: int) -> None:
        """Change the size limit (and with it the memory budget) from the next byte on.

        Raises:
            ValueError: the limit is not positive.
        """
        if max_stanza_size < 1:
            raise ValueError("max_stanza_size and max_depth must be positive")
        self._max_stanza_size = max_stanza_size
        self._max_memory = STANZA_MEMORY_FACTOR * max_stanza_size
        self._slice = min(max_stanza_size, _MAX_SLICE)

    def reset(self) -> None:
        """Forget everything and expect a new stream header (a stream restart).

        Data fed before the reset that expat had not finished parsing is dropped.
        """
        parser = new_expat_parser(_SEP)
        parser.StartElementHandler = self._on_start
        parser.EndElementHandler = self._on_end
        parser.CharacterDataHandler = self._on_text
        parser.StartNamespaceDeclHandler = self._on_namespace
        self._parser = parser
        self._events: list[Event] = []
        self._stack: list[_Open] = []
        self._root_open = False
        self._closed = False
        self._default_ns: str | None = None
        self._error: RemoteProtocolError | None = None
        #: Bytes received since the reset (given to expat or held).
        self._received = 0
        #: Offset of the `<` of the open stanza, or -1 between stanzas.
        self._stanza_start = -1
        #: Offset of the incomplete token expat holds (== _received when there is none).
        self._token_start = 0
        #: The bytes of that incomplete token.
        self._tail = b""
        #: Bytes received but not given to expat while a large token is deferred, or None.
        self._held: HeldToken | None = None
        #: Text pieces that follow other text in an open element's children (see _on_text).
        self._loose = 0
        #: Estimated memory held by the stanza being built (see the module docstring).
        self._cost = 0

    def close(self) -> None:
        """Drop the expat parser and what it holds (see the module docstring); `feed()`
        then fails with `not-well-formed` until `reset()`."""
        self._parser = _CLOSED_PARSER
        self._stack = []
        self._held = None
        self._tail = b""
        self._error = RemoteProtocolError(StreamErrorCondition.NOT_WELL_FORMED, "parser closed")

    @property
    def has_partial_data(self) -> bool:
        """Bytes of an unfinished element or token are buffered (not just whitespace).

        Used at a stream restart (after STARTTLS or SASL success): whatever the peer sent
        past the restart point cannot belong to the old stream.
        """
        return self._stanza_start >= 0 or self._held is not None or bool(self._tail.strip())

    @property
    def unfinished_at(self) -> int | None:
        """The byte offset (since the last reset) where the unfinished stanza or token
        starts, or None between stanzas. The shell times how long one stays unfinished:
        the same offset on two reads is the same unit."""
        if self._stanza_start >= 0:
            return self._stanza_start
        if self._held is not None or self._tail.strip():
            return self._token_start
        return None

    def feed(self, data: bytes) -> list[Event]:
        """Parse more of the stream.

        Args:
            data: the next bytes, split anywhere. `b""` is allowed and does nothing (end of
                input is the transport's business, not the parser's).

        Returns:
            The events completed by this data, in order. Empty after `StreamClosed`.

        Raises:
            RemoteProtocolError: `not-well-formed`, `restricted-xml`,
                `unsupported-encoding`, `policy-violation` (size or depth) or `bad-format`
                (text at stream level). The parser then stays failed until `reset()`.
        """
        if self._error is not None:
            raise RemoteProtocolError(self._error.condition, self._error.text)
        events: list[Event] = []
        self._events = events
        try:
            self._feed(data)
        except expat.ExpatError as exc:
            if self._closed:
                return events  # junk after </stream:stream> is ignored
            self._error = RemoteProtocolError(
                StreamErrorCondition.NOT_WELL_FORMED, expat.ErrorString(exc.code)
            )
            raise self._error from exc
        except RemoteProtocolError as exc:
            self._error = exc
            raise
        return events

    # -- feeding expat -------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        """Hand `data` to expat in slices, checking the size limits after each."""
        if self._closed:
            return
        size = len(data)
        if size <= self._slice and self._root_open:
            # Fast path: one small chunk in the middle of a stream.
            self._consume(data)
            self._check_size()
            return
        pos = 0
        while pos < size and not self._closed:
            step = self._slice
            if not self._root_open:
                # The header must be complete within max_stanza_size bytes.
                room = self._max_stanza_size - self._received
                if room <= 0:
                    raise RemoteProtocolError(
                        StreamErrorCondition.POLICY_VIOLATION, "stream header too large"
                    )
                step = min(step, room)
            chunk = data[pos : pos + step] if pos or step < size else data
            pos += len(chunk)
            self._consume(chunk)
            self._check_size()

    def _consume(self, chunk: bytes) -> None:
        """Give `chunk` to expat, or hold it while a large incomplete token can't end yet."""
        self._received += len(chunk)
        held = self._held
        if held is not None:
            if not held.add(chunk):
                return
            chunk = bytes(held.data)
            self._held = None
        self._parser.Parse(chunk, False)
        if self._closed:
            return
        start = self._parser.CurrentByteIndex
        self._token_start = start
        pending = self._received - start
        if not pending:
            self._tail = b""
            return
        if pending <= len(chunk):
            self._tail = chunk[len(chunk) - pending :]
        else:
            tail = self._tail + chunk
            self._tail = tail[len(tail) - pending :]
        if pending > DEFER_THRESHOLD:
            # Raises for a giant comment, DTD or processing instruction.
            self._held = hold_token(self._tail)

    def _check_size(self) -> None:
        """Raise `policy-violation` when the unit being read is over the limit."""
        if self._closed:
            return
        if not self._root_open:
            return  # feed() slices the input so the header never passes the limit
        start = self._stanza_start if self._stanza_start >= 0 else self._token_start
        if self._received - start > self._max_stanza_size:
            raise RemoteProtocolError(StreamErrorCondition.POLICY_VIOLATION, "stanza too large")

    # -- expat handlers ------------------------------------------------------------------

    def _on_start(self, name: str, attrs: dict[str, str]) -> None:
        stack = self._stack
        if stack:
            if len(stack) >= self._max_depth:
                raise RemoteProtocolError(
                    StreamErrorCondition.POLICY_VIOLATION, "elements nested too deeply"
                )
            # The name counts too: "uri}local" is a new string per element (no interning),
            # and a namespace URI can be as long as the stanza allows.
            cost = ELEMENT_COST + len(name)
            self._cost += cost + attributes_cost(attrs) if attrs else cost
            if self._cost > self._max_memory:
                self._over_budget()
            stack.append((name, attrs, []))
        elif self._root_open:
            self._stanza_start = self._parser.CurrentByteIndex
            cost = ELEMENT_COST + len(name)
            self._cost = cost + attributes_cost(attrs) if attrs else cost
            if self._cost > self._max_memory:
                self._over_budget()
            stack.append((name, attrs, []))
        else:
            self._root_open = True
            namespace, _, local = name.rpartition(_SEP)
            self._events.append(StreamOpened(namespace, local, _clark(attrs), self._default_ns))

    def _on_end(self, name: str) -> None:
        stack = self._stack
        if not stack:
            self._closed = True
            self._events.append(_STREAM_CLOSED)
            return
        qname, attrs, children = stack.pop()
        if self._loose:
            joined = _join_text(children)
            self._release(len(children) - len(joined))
            children = joined
        namespace, _, local = qname.rpartition(_SEP)
        element = Element(namespace, local, _clark(attrs) if attrs else None, children)
        if stack:
            stack[-1][2].append(element)
            return
        if self._parser.CurrentByteIndex - self._stanza_start > self._max_stanza_size:
            raise RemoteProtocolError(StreamErrorCondition.POLICY_VIOLATION, "stanza too large")
        self._stanza_start = -1
        self._loose = 0
        self._cost = 0
        self._events.append(ElementReceived(element))

    def _on_text(self, data: str) -> None:
        stack = self._stack
        if stack:
            children = stack[-1][2]
            if children and type(children[-1]) is str:
                # Text split over callbacks (long text, or across feed() calls): keep the
                # pieces and join them once at the end tag, so a text fed a byte at a
                # time is not copied over and over.
                self._loose += 1
            children.append(data)
            self._cost += TEXT_COST + len(data)
            if self._cost > self._max_memory:
                self._over_budget()
        elif data.strip(_XML_SPACE):
            # Expat only reports text inside the root, so this is at stream level.
            raise RemoteProtocolError(StreamErrorCondition.BAD_FORMAT, "text at stream level")

    def _over_budget(self) -> None:
        """The stanza's memory passed the budget: join split text, or refuse it."""
        if self._loose * TEXT_COST >= self._max_memory // 4:
            # Each join frees at least a quarter of the budget, so joining stays linear
            # in the bytes received.
            for _name, _attrs, children in self._stack:
                joined = _join_text(children)
                self._release(len(children) - len(joined))
                children[:] = joined
            if self._cost <= self._max_memory:
                return
        raise RemoteProtocolError(
            StreamErrorCondition.POLICY_VIOLATION, "stanza takes too much memory"
        )

    def _release(self, pieces: int) -> None:
        """`pieces` loose text pieces were joined into their neighbours."""
        self._loose -= pieces
        self._cost -= pieces * TEXT_COST

    def _on_namespace(self, prefix: str | None, uri: str | None) -> None:
        if prefix is None and not self._root_open:
            self._default_ns = uri or None
