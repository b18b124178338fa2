"""Presence from a client (RFC 6121 section 4).

Runs in the sending session's own connection task: it changes that session's presence
fields, publishes them to the session directory, and reaches the account's other
resources (on any node) through their handles.

- Broadcast presence (no `to`): stored as the session's `presence` and `priority` and sent
  to every available resource of the account (the sender included, as a reflection).
  On initial presence the new resource also receives the presence of the account's other
  available resources (RFC 6121 section 4.4.2). Unavailable clears `presence` and is also
  sent to every entity that got directed presence from this resource (section 4.6.3).
- Directed presence (`to` set): routed; available directed presence is remembered.

Presence to contacts follows from the roster's subscriptions, which are not kept yet:
only the account's own resources and directed-presence peers get it.
"""

from __future__ import annotations

import contextlib

from gateway.core.router import Router
from gateway.core.session import Session
from gateway.errors import JIDError, StanzaError, StanzaErrorCondition
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID

MAX_DIRECTED = 1000  # directed-presence targets remembered per resource
MIN_PRIORITY = -128
MAX_PRIORITY = 127


def _priority(stanza: Element) -> int:
    text = stanza.find_text(ns.CLIENT, "priority")
    if text is None:
        return 0
    try:
        value = int(text.strip())
    except ValueError as exc:
        raise StanzaError(
            StanzaErrorCondition.BAD_REQUEST, text="priority must be an integer"
        ) from exc
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise StanzaError(StanzaErrorCondition.BAD_REQUEST, text="priority out of range")
    return value


async def handle_presence(router: Router, session: Session, stanza: Element) -> None:
    """Handle a presence stanza from `session` (its `from` already stamped)."""
    ptype = stanza.get("type")
    to_text = stanza.get("to")
    if to_text is not None:
        # A malformed 'to' is answered jid-malformed by the router.
        with contextlib.suppress(JIDError):
            target = JID.parse(to_text)
            if target.bare() == session.bare_jid:
                pass  # own resources get broadcasts anyway: not "directed"
            elif ptype is None:
                if target not in session.directed and len(session.directed) >= MAX_DIRECTED:
                    # STYLE P3: bounded; one client must not grow server memory at will.
                    raise StanzaError(
                        StanzaErrorCondition.RESOURCE_CONSTRAINT,
                        text="too many directed presence targets",
                    )
                session.directed.add(target)
            elif ptype == "unavailable":
                session.directed.discard(target)
        await router.route(stanza, session)
        return
    if ptype is None:
        priority = _priority(stanza)
        initial = session.presence is None
        session.presence = stanza
        session.priority = priority
        await router.directory.publish(session)
        others = await router.available_resources(session.bare_jid)
        for other in others:
            other.handle.send(stanza)
        if initial:
            for other in others:
                if other.handle is not session and other.presence is not None:
                    session.send(other.presence)
            if priority >= 0 and router.offline is not None:
                # XEP-0160 section 3: stored messages go out on initial presence, paced
                # by the session's owner so they fit its buffer (Session.request_flush).
                session.request_flush()
        return
    if ptype == "unavailable":
        await broadcast_unavailable(router, session, stanza)
        return
    if ptype == "error":
        return
    # Subscription requests without 'to', probes without 'to': nothing to address.
    raise StanzaError(StanzaErrorCondition.BAD_REQUEST, text="this presence needs a 'to'")


async def broadcast_unavailable(
    router: Router, session: Session, stanza: Element | None = None, *, own_account: bool = True
) -> None:
    """Send unavailable presence for `session` to its account's resources and directed peers.

    Used when the client sends it and when the session ends without sending it (then
    unbound already: `own_account` False when it no longer held its JID, replaced by a
    newer session that said goodbye for it).
    """
    if session.full_jid is None:
        return
    was_available = session.presence is not None
    if stanza is None:
        if not was_available and not session.directed:
            return
        stanza = Element(
            ns.CLIENT, "presence", {"type": "unavailable", "from": str(session.full_jid)}
        )
    session.presence = None
    await router.directory.publish(session)
    if was_available and own_account:
        for other in await router.available_resources(session.bare_jid):
            other.handle.send(stanza)
        session.send(stanza)
    targets = session.directed
    session.directed = set()
    for target in targets:
        await router.route(stanza.replace_attrs(to=str(target)), session)
