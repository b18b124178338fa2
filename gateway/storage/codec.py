"""Stanzas as stored bytes, the same for every backend (offline messages, hand-off
snapshots): `encode_stanza` writes every namespace on the element itself, so the bytes
parse back to an equal element in any context; `decode_stanza` trusts nothing.
"""

from __future__ import annotations

from typing import Final

from gateway.errors import RemoteProtocolError, StorageError
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from gateway.xmpp.parser import ElementReceived, StreamClosed, StreamParser
from gateway.xmpp.serializer import STREAM_FOOTER, serialize

#: Wraps a stored stanza for the stream parser. No default namespace: `encode_stanza`
#: writes every namespace explicitly, so the bytes parse the same in any context.
_HEADER: Final = b"<stream:stream xmlns:stream='" + ns.STREAM.encode() + b"'>"

#: Deepest nesting `decode_stanza` accepts: the config's upper bound for `max_depth`, so
#: every stanza the gateway accepted (and then stored) decodes.
_MAX_DEPTH: Final = 256

#: Size limit for decoding, as a multiple of the stored bytes (see `decode_stanza`).
_DECODE_SIZE_FACTOR: Final = 64


def encode_stanza(element: Element) -> bytes:
    """Serialize a stanza for storage, every namespace declared on the element itself.

    Args:
        element: the stanza (any namespace, usually `jabber:client`).

    Returns:
        UTF-8 XML that `decode_stanza` turns back into an equal element.

    Raises:
        ValueError: the element holds a character XML 1.0 cannot carry.
    """
    return serialize(element, "", stream_prefix=False)


def decode_stanza(data: bytes) -> Element:
    """Parse bytes written by `encode_stanza` back into the element.

    Args:
        data: one serialized element.

    Returns:
        The element, equal to the one encoded (namespaces, `xml:lang` and other
        namespaced attributes, text and child order included).

    Raises:
        StorageError: `data` is not exactly one well-formed element (a damaged row).
    """
    # The size limit only has to let `data` through; it is generous because the parser's
    # memory budget follows it, and a stored stanza of many tiny elements (accepted under
    # the configured limits) takes far more memory than bytes.
    limit = _DECODE_SIZE_FACTOR * (len(_HEADER) + len(data) + 1)
    parser = StreamParser(max_stanza_size=limit, max_depth=_MAX_DEPTH)
    try:
        # The footer is fed on its own: data that closes the wrapper itself
        # ("<a/></stream:stream><b/>") must not have its tail silently ignored.
        events = parser.feed(_HEADER + data)
        # StreamOpened and the element, then only the footer's StreamClosed: anything
        # else means data was not exactly one element.
        if len(events) != 2 or parser.has_partial_data:
            raise StorageError("stored offline stanza is not exactly one element")
        events += parser.feed(STREAM_FOOTER)
    except RemoteProtocolError as exc:
        raise StorageError(f"stored offline stanza is damaged: {exc}") from exc
    finally:
        parser.close()
    if (
        len(events) != 3
        or not isinstance(events[1], ElementReceived)
        or not isinstance(events[2], StreamClosed)
    ):
        raise StorageError("stored offline stanza is not exactly one element")
    return events[1].element
