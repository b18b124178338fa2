"""IQs the server answers itself (DESIGN.md section 4): to a served domain, or to an
account's bare JID (the account's own requests, RFC 6120 section 10.3.3).

- XEP-0030 disco#info / disco#items on the domain (and disco#info on an account).
- XEP-0199 ping on the domain and on an account.
- RFC 3921 legacy session establishment (answered with an empty result).
- RFC 6121 roster get/set for the account itself, with pushes to interested resources.
- Anything else: `service-unavailable` (RFC 6120 section 8.4); malformed iq: `bad-request`.
"""

from __future__ import annotations

from typing import Final

from gateway.core.directory import Member
from gateway.core.roster import RosterService
from gateway.core.router import Router
from gateway.errors import StanzaError, StanzaErrorCondition
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID
from gateway.xmpp.stanza import IQ_TYPES, error_reply, iq_result

SERVER_FEATURES: Final = (
    ns.DISCO_INFO,
    ns.DISCO_ITEMS,
    ns.PING,
    ns.ROSTER,
    ns.SESSION,
)
ACCOUNT_FEATURES: Final = (ns.DISCO_INFO, ns.PING)


class ServerServices:
    """The router's `server_handler`: answers iqs addressed to the server or an account."""

    def __init__(self, roster: RosterService) -> None:
        self.roster = roster

    async def __call__(self, router: Router, iq: Element, origin: Member | None) -> None:
        iq_type = iq.get("type")
        if iq_type not in IQ_TYPES:
            await router.bounce(iq, StanzaErrorCondition.BAD_REQUEST, text="unknown iq type")
            return
        if iq_type in ("result", "error"):
            return  # answers to nothing we asked
        payload = list(iq.elements())
        if len(payload) != 1:
            # RFC 6120 section 8.2.3: get/set carry exactly one payload.
            await router.bounce(iq, StanzaErrorCondition.BAD_REQUEST, text="iq needs one payload")
            return
        query = payload[0]
        sender = JID.parse(iq.get("from") or "")
        to_text = iq.get("to")
        to = JID.parse(to_text) if to_text else sender.bare()
        try:
            if to.local is None:
                reply = await self._domain_iq(iq, iq_type, query, to)
            else:
                reply = await self._account_iq(router, iq, iq_type, query, to, sender, origin)
        except StanzaError as exc:
            reply = error_reply(iq, exc.condition, exc.error_type, exc.text, from_=str(to))
        if reply is not None:
            await router.route(reply, None)

    async def _domain_iq(
        self, iq: Element, iq_type: str, query: Element, to: JID
    ) -> Element | None:
        key = (query.namespace, query.name, iq_type)
        if key == (ns.DISCO_INFO, "query", "get"):
            if query.get("node"):
                raise StanzaError(StanzaErrorCondition.ITEM_NOT_FOUND)
            return iq_result(iq, _disco_info("server", "im", SERVER_FEATURES), from_=str(to))
        if key == (ns.DISCO_ITEMS, "query", "get"):
            if query.get("node"):
                raise StanzaError(StanzaErrorCondition.ITEM_NOT_FOUND)
            return iq_result(iq, Element(ns.DISCO_ITEMS, "query"), from_=str(to))
        if key == (ns.PING, "ping", "get"):
            return iq_result(iq, from_=str(to))
        if key == (ns.SESSION, "session", "set"):
            return iq_result(iq, from_=str(to))
        raise StanzaError(StanzaErrorCondition.SERVICE_UNAVAILABLE)

    async def _account_iq(
        self,
        router: Router,
        iq: Element,
        iq_type: str,
        query: Element,
        to: JID,
        sender: JID,
        origin: Member | None,
    ) -> Element | None:
        own = sender.bare() == to
        if (
            not own
            and not await router.directory.resources(to)
            and not await router.account_exists(to.domain, to.local or "")
        ):
            raise StanzaError(StanzaErrorCondition.SERVICE_UNAVAILABLE)
        key = (query.namespace, query.name, iq_type)
        if key == (ns.PING, "ping", "get"):
            return iq_result(iq, from_=str(to))
        if key == (ns.DISCO_INFO, "query", "get") and not query.get("node"):
            return iq_result(
                iq, _disco_info("account", "registered", ACCOUNT_FEATURES), from_=str(to)
            )
        if own and query.namespace == ns.ROSTER and query.name == "query":
            return await self.roster.handle(router, iq, iq_type, query, to, origin)
        if own and key == (ns.SESSION, "session", "set"):
            return iq_result(iq)
        raise StanzaError(StanzaErrorCondition.SERVICE_UNAVAILABLE)


def _disco_info(category: str, kind: str, features: tuple[str, ...]) -> Element:
    children: list[Element | str] = [
        Element(ns.DISCO_INFO, "identity", {"category": category, "type": kind})
    ]
    children.extend(Element(ns.DISCO_INFO, "feature", {"var": f}) for f in features)
    return Element(ns.DISCO_INFO, "query", None, children)
