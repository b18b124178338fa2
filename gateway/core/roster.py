"""Roster management (RFC 6121 section 2): get, set, remove, and roster pushes.

The subscription state machine (RFC 6121 section 3) is not handled here: subscription
presence is routed as directed presence and items keep the subscription they have.
"""

from __future__ import annotations

import secrets

from gateway.core.blocking import RunBlocking
from gateway.core.directory import Member
from gateway.core.router import Router
from gateway.errors import JIDError, StanzaError, StanzaErrorCondition
from gateway.storage.base import RosterItem, RosterStore
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID
from gateway.xmpp.stanza import iq_result

MAX_NAME = 1024
MAX_GROUPS = 64


class RosterService:
    def __init__(self, store: RosterStore, run_blocking: RunBlocking) -> None:
        self.store = store
        self.run_blocking = run_blocking

    async def handle(
        self,
        router: Router,
        iq: Element,
        iq_type: str,
        query: Element,
        account: JID,
        origin: Member | None,
    ) -> Element:
        """Answer a roster get or set from the account itself.

        Args:
            origin: the requesting session (in its own connection task): a get makes it
                an interested resource (RFC 6121 section 2.1.3), published to the
                directory so that pushes find it.
        """
        host, user = account.domain, account.local or ""
        if iq_type == "get":
            items = await self.run_blocking(self.store.items, host, user)
            if origin is not None and not origin.interested:
                origin.interested = True
                await router.directory.publish(origin)
            payload = Element(ns.ROSTER, "query", None, [_item_element(i) for i in items])
            return iq_result(iq, payload)

        items_el = query.find_all(ns.ROSTER, "item")
        if len(items_el) != 1:
            # RFC 6121 section 2.3.3: a set carries exactly one item.
            raise StanzaError(StanzaErrorCondition.BAD_REQUEST, text="one item per roster set")
        el = items_el[0]
        try:
            contact = JID.parse(el.get("jid") or "")
        except JIDError as exc:
            raise StanzaError(StanzaErrorCondition.JID_MALFORMED) from exc
        if contact.resource is not None:
            raise StanzaError(StanzaErrorCondition.BAD_REQUEST, text="roster items are bare JIDs")
        if el.get("subscription") == "remove":
            removed = await self.run_blocking(self.store.remove, host, user, str(contact))
            if not removed:
                raise StanzaError(StanzaErrorCondition.ITEM_NOT_FOUND)
            pushed = Element(ns.ROSTER, "item", {"jid": str(contact), "subscription": "remove"})
        else:
            name = el.get("name")
            groups = tuple(g.text for g in el.find_all(ns.ROSTER, "group"))
            if (name and len(name) > MAX_NAME) or len(groups) > MAX_GROUPS:
                raise StanzaError(StanzaErrorCondition.NOT_ACCEPTABLE, text="item too large")
            if len(set(groups)) != len(groups) or any(not g for g in groups):
                raise StanzaError(StanzaErrorCondition.BAD_REQUEST, text="bad group list")
            stored = await self.run_blocking(
                self.store.upsert,
                host,
                user,
                RosterItem(str(contact), name or None, "none", groups),
            )
            pushed = _item_element(stored)
        await self.push(router, account, pushed)
        return iq_result(iq)

    async def push(self, router: Router, account: JID, item: Element) -> None:
        """RFC 6121 section 2.1.6: push the changed item to every interested resource."""
        for resource in await router.directory.resources(account):
            if resource.interested:
                resource.handle.send(
                    Element(
                        ns.CLIENT,
                        "iq",
                        {
                            "type": "set",
                            "id": "push-" + secrets.token_hex(6),
                            "to": str(resource.full_jid),
                        },
                        [Element(ns.ROSTER, "query", None, [item])],
                    )
                )


def _item_element(item: RosterItem) -> Element:
    attrs = {"jid": item.contact, "subscription": item.subscription}
    if item.name:
        attrs["name"] = item.name
    return Element(
        ns.ROSTER, "item", attrs, [Element(ns.ROSTER, "group", None, [g]) for g in item.groups]
    )
