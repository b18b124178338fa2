"""Routing (DESIGN.md section 4; RFC 6121 sections 8.5 and 10).

The router applies the delivery rules over the session directory
(`gateway.core.directory`): it asks where a JID's resources are and delivers through
their handles, wherever they live; it never holds a session. Stanzas arrive with `from`
already stamped by the sender's connection.

- full JID of a connected resource: delivered.
- full JID not connected: message chat/normal as to the bare JID; headline dropped;
  groupchat and iq get/set answered with `service-unavailable`; presence dropped.
- bare JID: message chat/normal to the available resource(s) of highest non-negative
  priority, headline to all non-negative ones, none available -> offline storage
  (XEP-0160; full -> `service-unavailable` to the sender); presence to
  every available resource; iq handled by the server on the account's behalf.
- a served domain: server features (`services.py`).
- any other domain: `remote-server-not-found` (no s2s at the edge).

Errors are never answered with errors; a stanza that cannot be delivered nor bounced is
dropped with a log line naming the policy (the ledger of DESIGN.md section 3).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import structlog

from gateway.core.directory import Directory, Handle, Member, Resource
from gateway.core.metrics import DropPolicy, LedgerState, Metrics
from gateway.core.offline import OfflineService
from gateway.errors import JIDError, StanzaErrorCondition, StreamErrorCondition
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID
from gateway.xmpp.stanza import StanzaKind, error_reply, stanza_kind

log = structlog.get_logger(module=__name__)

AccountExists = Callable[[str, str], Awaitable[bool]]
# The origin is the sending session, handled in its own connection task.
ServerHandler = Callable[["Router", Element, Member | None], Awaitable[None]]


class Router:
    """The delivery rules over a session directory (see module docstring)."""

    def __init__(
        self,
        hosts: tuple[str, ...],
        account_exists: AccountExists,
        *,
        directory: Directory,
        metrics: Metrics,
    ) -> None:
        self.hosts = frozenset(hosts)
        self.account_exists = account_exists
        self.directory = directory
        self.metrics = metrics
        # Set by the services module: handles iq addressed to a domain or to an account.
        self.server_handler: ServerHandler | None = None
        # XEP-0160 offline storage; None answers service-unavailable instead.
        self.offline: OfflineService | None = None

    # -- binding ----------

    async def bind(self, member: Member, bare: JID, resource: str | None) -> JID:
        """Register `member` as a connected resource of `bare` and return its full JID
        (the caller, the member's owner, records it in its session).

        A resource already in use by another session ends that older session with
        stream error `conflict` (RFC 6120 section 7.7.2.2, "override" policy); no resource
        asked for gets a random one.
        """
        bound = await self.directory.bind(member, bare, resource)
        old = bound.replaced
        if old is not None:
            log.info("session_replaced", resource=old.full_jid.resource, node=old.node)
            if old.is_available:
                # The old session leaves now, before the new one takes the JID: its
                # unavailable must not arrive after the new session's presence. (It no
                # longer holds the JID, so it does not say it again when it ends.)
                gone = Element(
                    ns.CLIENT, "presence", {"type": "unavailable", "from": str(old.full_jid)}
                )
                for other in await self.directory.resources(bare):
                    if other.is_available:
                        other.handle.send(gone)
            old.handle.close(StreamErrorCondition.CONFLICT, "replaced by a new connection")
        return bound.full_jid

    async def available_resources(self, bare: JID) -> list[Resource]:
        return [r for r in await self.directory.resources(bare) if r.presence is not None]

    # -- delivery ----------

    async def route(self, stanza: Element, origin: Member | None = None) -> None:
        """Deliver one stanza whose `from` is stamped (see module docstring)."""
        kind = stanza_kind(stanza)
        if kind is None:
            return
        to_text = stanza.get("to")
        if to_text is None:
            # RFC 6120 section 10.3: no 'to' is the sender's own account.
            sender = stanza.get("from")
            to = JID.parse(sender).bare() if sender else None
            if to is None:
                return
        else:
            try:
                to = JID.parse(to_text)
            except JIDError:
                await self.bounce(stanza, StanzaErrorCondition.JID_MALFORMED)
                return
        if kind is StanzaKind.PRESENCE and stanza.get("type") == "probe":
            # RFC 6121 4.3: probes are the server's business and are answered from the
            # subscription state, which this node does not keep yet; never relayed to a
            # client (that would leak who asks).
            self.drop(stanza, DropPolicy.PROBE_WITHOUT_SUBSCRIPTION_STATE)
            return
        if to.domain not in self.hosts:
            await self.bounce(stanza, StanzaErrorCondition.REMOTE_SERVER_NOT_FOUND)
            return
        if to.local is None:
            await self._to_domain(stanza, kind, to, origin)
        elif to.resource is None:
            await self._to_bare(stanza, kind, to, origin)
        else:
            await self._to_full(stanza, kind, to, origin)

    async def _to_domain(
        self, stanza: Element, kind: StanzaKind, to: JID, origin: Member | None
    ) -> None:
        if to.resource is not None:
            # A resource of the server itself: nothing lives there.
            await self.bounce(stanza, StanzaErrorCondition.SERVICE_UNAVAILABLE)
            return
        if kind is StanzaKind.IQ and self.server_handler is not None:
            await self.server_handler(self, stanza, origin)
        elif kind is StanzaKind.MESSAGE:
            await self.bounce(stanza, StanzaErrorCondition.SERVICE_UNAVAILABLE)
        # Presence to the domain: nothing to do (no server-side presence subscribers).

    async def _to_bare(
        self, stanza: Element, kind: StanzaKind, to: JID, origin: Member | None
    ) -> None:
        if kind is StanzaKind.IQ:
            if self.server_handler is not None:
                await self.server_handler(self, stanza, origin)
            return
        if kind is StanzaKind.PRESENCE:
            targets = await self.available_resources(to)
            if not targets and stanza.get("type") in (None, "unavailable", "error"):
                return  # RFC 6121 section 8.5.2.2.1: silently ignored
            for target in targets:
                target.handle.send(stanza)
            if not targets:
                self.drop(stanza, DropPolicy.PRESENCE_NO_AVAILABLE_RESOURCE)
            return
        await self.deliver_message_to_bare(stanza, to)

    async def deliver_message_to_bare(
        self, stanza: Element, to: JID, *, exclude: Handle | None = None
    ) -> LedgerState:
        """RFC 6121 section 8.5.2.1.1 for messages to a bare JID.

        Returns:
            Where the message went: DELIVERED (to a resource other than `exclude`),
            STORED_OFFLINE, BOUNCED or DROPPED; a session ending hands its unacked
            messages back through here and counts this in the ledger.
        """
        mtype = stanza.get("type", "normal")
        if mtype == "groupchat":
            return await self.bounce(stanza, StanzaErrorCondition.SERVICE_UNAVAILABLE)
        resources = await self.directory.resources(to)
        if deliver_to_best(stanza, resources, exclude):
            return LedgerState.DELIVERED
        if mtype == "headline":
            return self.drop(stanza, DropPolicy.HEADLINE_NO_AVAILABLE_RESOURCE)
        if not resources and not await self.account_exists(to.domain, to.local or ""):
            return await self.bounce(stanza, StanzaErrorCondition.SERVICE_UNAVAILABLE)
        if self.offline is None:
            # RFC 6121 section 8.5.2.1.1: without offline storage the server MUST answer
            # service-unavailable.
            return await self.bounce(
                stanza, StanzaErrorCondition.SERVICE_UNAVAILABLE, text="the recipient is offline"
            )

        async def deliver(stanza: Element, bare: JID) -> bool:
            return deliver_to_best(stanza, await self.directory.resources(bare), exclude)

        return await self.offline.store_or_deliver(stanza, to, deliver, self.bounce)

    async def _to_full(
        self, stanza: Element, kind: StanzaKind, to: JID, origin: Member | None
    ) -> None:
        target = await self.directory.resource(to)
        if target is not None and target.handle.send(stanza):
            return
        await self.to_unavailable_full(
            stanza, to, exclude=target.handle if target is not None else None, origin=origin
        )

    async def to_unavailable_full(
        self,
        stanza: Element,
        to: JID,
        *,
        exclude: Handle | None = None,
        origin: Member | None = None,
    ) -> None:
        """RFC 6121 section 8.5.3.2 for a stanza whose full JID is not connected (or did
        not take it: `exclude`); also for a stanza relayed from another node that arrived
        after its resource had gone."""
        kind = stanza_kind(stanza)
        if kind is StanzaKind.MESSAGE:
            mtype = stanza.get("type", "normal")
            if mtype in ("chat", "normal"):
                await self.deliver_message_to_bare(stanza, to.bare(), exclude=exclude)
            elif mtype == "groupchat":
                await self.bounce(stanza, StanzaErrorCondition.SERVICE_UNAVAILABLE)
            else:
                self.drop(stanza, DropPolicy.MESSAGE_TO_UNAVAILABLE_RESOURCE)
        elif kind is StanzaKind.IQ:
            if stanza.get("type") in ("get", "set"):
                await self.bounce(stanza, StanzaErrorCondition.SERVICE_UNAVAILABLE)
            else:
                self.drop(stanza, DropPolicy.IQ_RESPONSE_TO_UNAVAILABLE_RESOURCE)
        elif kind is StanzaKind.PRESENCE and stanza.get("type") in (
            "subscribe",
            "subscribed",
            "unsubscribe",
            "unsubscribed",
        ):
            await self._to_bare(stanza, kind, to.bare(), origin)
        # Other presence to an unavailable resource is silently ignored (RFC 6121 8.5.3.2.3).

    # -- the ledger's other ends -------------------------------------------------------------------

    async def bounce(
        self,
        stanza: Element,
        condition: StanzaErrorCondition,
        *,
        text: str | None = None,
    ) -> LedgerState:
        """Answer `stanza` to its sender with an error (never for errors or results).

        Returns:
            BOUNCED, or DROPPED (`cannot_bounce`) for an error, a result or a stanza
            without sender. (The error reply has its own fate: delivered, stored offline
            or dropped as `bounce_sender_gone`.)
        """
        stype = stanza.get("type")
        if stype in ("error", "result") or stanza.get("from") is None:
            return self.drop(stanza, DropPolicy.CANNOT_BOUNCE)
        self.metrics.bounced.inc(condition=condition)
        reply = error_reply(stanza, condition, text=text)
        sender = JID.parse(stanza.get("from") or "")
        target = await self.directory.resource(sender) if sender.resource else None
        if target is not None and target.handle.send(reply):
            return LedgerState.BOUNCED
        if sender.domain in self.hosts and sender.local is not None and reply.name == "message":
            # The sender's session moved on (logged in again, or ended): the error goes to
            # its account's current resources, else its offline store.
            await self.deliver_message_to_bare(reply, sender.bare())
            return LedgerState.BOUNCED
        self.drop(reply, DropPolicy.BOUNCE_SENDER_GONE)
        return LedgerState.BOUNCED

    def drop(self, stanza: Element, policy: DropPolicy | str) -> LedgerState:
        """Count and log a stanza dropped by a stated policy.

        Args:
            stanza: the stanza dropped.
            policy: why; a plain string must be the value of a `DropPolicy` (accepted
                only until `gateway.core.ending` passes the member).

        Returns:
            DROPPED (for the ledger of a session that hands its stanzas back).

        Raises:
            ValueError: a string that names no `DropPolicy`.
        """
        policy = DropPolicy(policy)
        self.metrics.dropped.inc(policy=policy)
        log.debug(
            "stanza_dropped",
            policy=policy.value,
            kind=stanza.name,
            type=stanza.get("type"),
            to=stanza.get("to"),
            from_=stanza.get("from"),
        )
        return LedgerState.DROPPED


def deliver_to_best(
    stanza: Element, resources: Sequence[Resource], exclude: Handle | None = None
) -> bool:
    """Send a message for a bare JID to the resources RFC 6121 section 8.5.2.1.1 picks:
    the available ones of highest non-negative priority (every non-negative one for a
    headline), except `exclude` (a session handing its messages back). When every one
    of them refuses it (they are closing), the next priority down gets it: a session
    on its way out is not available.

    Returns:
        Whether a resource took it.
    """
    candidates = [
        r
        for r in resources
        if r.presence is not None and r.priority >= 0 and r.handle is not exclude
    ]
    if stanza.get("type") == "headline":
        delivered = False
        for target in candidates:
            delivered = target.handle.send(stanza) or delivered
        return delivered
    while candidates:
        top = max(r.priority for r in candidates)
        delivered = False
        for target in candidates:
            if target.priority == top:
                delivered = target.handle.send(stanza) or delivered
        if delivered:
            return True
        candidates = [r for r in candidates if r.priority != top]
    return False
