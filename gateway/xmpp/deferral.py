"""Holding back a large incomplete token from expat (the CVE-2023-52425 defence).

Theory of operation
-------------------
Expat reparses an incomplete token from its start every time data arrives, so a huge start
tag sent a byte at a time costs quadratic time (CVE-2023-52425). Expat >= 2.6 fixes this with
"reparse deferral", which can hold back a complete stanza until more data arrives: fatal for
an interactive protocol, so `gateway.xmpp.restricted_xml` switches it off. Instead, once
expat holds an incomplete token longer than `DEFER_THRESHOLD` bytes, `StreamParser` asks
`hold_token` whether to keep new bytes itself, and then adds each chunk to the `HeldToken`
until one contains what could end that token: a `>` outside quotes for a tag, `;` for a
reference. Only then are the held bytes handed to expat, in one piece, so the token is
reparsed once per possible end instead of once per chunk. Comments, DTDs and processing
instructions that large are refused at once. Text is never deferred (expat reports
character data as it arrives). This changes no events, only when a malformed giant token is
detected.

The scan is linear in the bytes held: a `HeldToken` remembers whether the last byte it saw
was outside quotes, inside '...' or inside "...", so each byte is looked at once. The
parser that owns a `HeldToken` still counts its bytes against `max_stanza_size`, so what is
held is bounded too.
"""

from __future__ import annotations

import re
from typing import Final

from gateway.errors import RemoteProtocolError, StreamErrorCondition

#: An incomplete token longer than this is deferred. Reparsing up to this many bytes per
#: received chunk costs about as much as receiving the chunk.
DEFER_THRESHOLD: Final = 4096

# Scanner states for a held tag: outside quotes, inside '...', inside "...".
_TAG_OUT: Final = 0
_TAG_SQ: Final = 1
_TAG_DQ: Final = 2
#: Scanner state for a held entity or character reference (ends at `;`).
_REF: Final = 3

_TAG_SPECIAL: Final = re.compile(rb"[>'\"]")


class HeldToken:
    """The bytes of a large incomplete token that expat has not been given yet.

    Attributes:
        data: the bytes held, in order; given to expat once `add` returns True.
    """

    __slots__ = ("_state", "data")

    def __init__(self, state: int) -> None:
        self._state = state
        self.data = bytearray()

    def add(self, chunk: bytes) -> bool:
        """Hold `chunk`, which continues the token.

        Returns:
            True when the token may now be complete: hand `data` to expat.
        """
        may_end = self._may_end(chunk)
        self.data += chunk
        return may_end

    def _may_end(self, data: bytes) -> bool:
        """Scan `data`, which continues the held token: could the token now be complete?

        Tracks quotes so a `>` inside an attribute value does not count; linear in `data`.
        """
        state = self._state
        if state == _REF:
            return b";" in data
        pos = 0
        while True:
            if state == _TAG_OUT:
                found = _TAG_SPECIAL.search(data, pos)
                if found is None:
                    break
                pos = found.end()
                char = data[pos - 1]
                if char == 0x3E:  # ">"
                    return True
                state = _TAG_SQ if char == 0x27 else _TAG_DQ
            else:
                end = data.find(b"'" if state == _TAG_SQ else b'"', pos)
                if end < 0:
                    break
                pos = end + 1
                state = _TAG_OUT
        self._state = state
        return False


def hold_token(tail: bytes) -> HeldToken | None:
    """Expat holds `tail`, an incomplete token longer than `DEFER_THRESHOLD`: start holding.

    Args:
        tail: the bytes of that token, from its first byte (`<` or `&`).

    Returns:
        An empty `HeldToken` to add the next chunks to, or None when `tail` itself may
        already end the token (expat gets the next chunk directly).

    Raises:
        RemoteProtocolError: the token is a comment, DTD or processing instruction.
    """
    if tail.startswith(b"<!"):
        # A CDATA section start is 9 bytes and its content is reported as it comes.
        raise RemoteProtocolError(
            StreamErrorCondition.RESTRICTED_XML, "comment or document type declaration"
        )
    if tail.startswith(b"<?"):
        # The XML declaration is a few dozen bytes; anything this long is a PI.
        raise RemoteProtocolError(StreamErrorCondition.RESTRICTED_XML, "processing instruction")
    if tail.startswith(b"<"):
        held = HeldToken(_TAG_OUT)
    elif tail.startswith(b"&"):
        held = HeldToken(_REF)
    else:  # pragma: no cover - expat holds nothing else this long
        return None
    # The scan starts after the `<` or `&`; what it learns (inside quotes or not) is kept.
    return None if held._may_end(tail[1:]) else held
