"""What a client's stanza must be before it is routed (RFC 6120 sections 8.1 and 8.2).

`accept_stanza` is the one gate between a bound client and the router: an iq needs an
`id` and a known `type`, a `from` may only name the sender itself (its full or bare
JID), a `to` must be a valid JID; an accepted stanza leaves stamped with the sender's
full JID as `from`. A stanza that fails is answered with an error and the stream goes
on, except a forged `from`, which is a stream error. Error stanzas are never answered
(RFC 6120 8.3.1), so they are dropped instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import (
    JIDError,
    RemoteProtocolError,
    StanzaErrorCondition,
    StreamErrorCondition,
)
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID
from gateway.xmpp.stanza import IQ_TYPES, StanzaKind, error_reply


@dataclass(frozen=True, slots=True)
class Refused:
    """The stanza is not routed; `reply` (when not None) is sent back to the client."""

    reply: Element | None


def accept_stanza(element: Element, kind: StanzaKind, sender: JID, host: str) -> Element | Refused:
    """Check a stanza from the client bound as `sender` and stamp its `from`.

    Args:
        element: the stanza as received.
        kind: its kind (`stanza_kind`).
        sender: the session's full JID.
        host: the session's domain, the `from` of the error replies.

    Returns:
        The stanza with `from` set to `sender`, or `Refused` with the error reply.

    Raises:
        RemoteProtocolError: `invalid-from`, the stanza claims another sender
            (RFC 6120 section 8.1.2.1).
    """
    is_error = element.get("type") == "error"
    if kind is StanzaKind.IQ and (element.get("id") is None or element.get("type") not in IQ_TYPES):
        # RFC 6120 8.1.3 / 8.2.3: an iq needs an id and a known type.
        if is_error:
            return Refused(None)
        return Refused(
            error_reply(
                element.replace_attrs(**{"from": str(sender)}),
                StanzaErrorCondition.BAD_REQUEST,
                text="an iq needs an id and a type of get, set, result or error",
                from_=host,
            )
        )
    full = str(sender)
    claimed = element.get("from")
    if claimed is not None and claimed != full:
        try:
            claimed_jid = JID.parse(claimed)
        except JIDError as exc:
            raise RemoteProtocolError(StreamErrorCondition.INVALID_FROM) from exc
        if claimed_jid not in (sender, sender.bare()):
            raise RemoteProtocolError(StreamErrorCondition.INVALID_FROM)
    stanza = element.replace_attrs(**{"from": full})
    to = stanza.get("to")
    if to is not None:
        try:
            JID.parse(to)
        except JIDError:
            if is_error:
                return Refused(None)
            return Refused(error_reply(stanza, StanzaErrorCondition.JID_MALFORMED, from_=host))
    return stanza
