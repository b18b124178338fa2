"""The session directory: where a JID's connected resources are, and a handle to each.

Theory of operation
-------------------
The router never holds a session. It asks the directory for the resources of a bare JID
(or the one of a full JID) and gets `Resource` records: plain data (full JID, node,
priority, last presence, interest in roster pushes) plus a `Handle` that delivers
(`send`) or ends the session (`close`). The local directory's handles are this node's
sessions themselves; a cluster directory answers with resources of other nodes too, whose
handles carry the stanza or the close request to the node that holds them. The delivery
rules (`gateway.core.router`) are the same for both.

Who changes what: a record changes only when the session's own connection task says so:
`bind` when it binds a resource, `publish` after it changed its presence, priority or
interest, `unbind` when it ends or moves. Records are immutable; a publish replaces the
record, so a reader holding an old one sees a consistent (if dated) view. Everything else
reaches a session only through its handle: a session is owned by one task (STYLE C3).

The methods are async so that an implementation may ask another process (a cluster's
shared store); the local one answers without waiting.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from gateway.errors import StreamErrorCondition
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID


class Handle(Protocol):
    """How a session is reached without touching it (`gateway.core.session.Session` is
    the local one)."""

    def send(self, stanza: Element) -> bool:
        """Give the session a stanza without blocking; True when it took responsibility
        for it (delivered, buffered for a resume, or queued to another node), False when
        the caller keeps it (the session is closing or cannot take more)."""
        ...

    def close(
        self,
        condition: StreamErrorCondition | None = None,
        text: str | None = None,
        *,
        handoff: bool = False,
    ) -> None:
        """Ask the session's owner to end its stream (with a stream error when given)."""
        ...


class Member(Handle, Protocol):
    """A session as its owner task publishes it: the fields routing reads (only the owner
    changes them, then calls `Directory.publish`)."""

    full_jid: JID | None
    priority: int
    presence: Element | None
    interested: bool


@dataclass(frozen=True, slots=True)
class Resource:
    """A connected resource as the router sees it.

    Attributes:
        full_jid: its JID.
        node: the node whose connection task owns the session.
        handle: how to reach it.
        priority: the priority of its last broadcast presence.
        presence: its last broadcast presence without type; None: not available.
        interested: it requested the roster (gets roster pushes, RFC 6121 2.1.6).
    """

    full_jid: JID
    node: str
    handle: Handle
    priority: int = 0
    presence: Element | None = None
    interested: bool = False

    @property
    def is_available(self) -> bool:
        return self.presence is not None


@dataclass(frozen=True, slots=True)
class Bound:
    """What `Directory.bind` did: the full JID taken, and the resource it took it from
    (RFC 6120 7.7.2.2: the newer session wins; the caller ends the older one)."""

    full_jid: JID
    replaced: Resource | None


class Directory(Protocol):
    """Where resources are (see module docstring)."""

    node: str

    async def bind(self, member: Member, bare: JID, resource: str | None) -> Bound:
        """Register `member` as a connected resource of `bare`.

        Args:
            member: the session (its handle is itself).
            bare: the account.
            resource: the resource asked for; None draws a random unused one.

        Returns:
            The full JID and the resource that held it before, if any (no longer in the
            directory: the caller closes it).
        """
        ...

    async def publish(self, member: Member) -> None:
        """Record `member`'s current priority, presence and interest (a no-op when it
        no longer holds its JID)."""
        ...

    async def unbind(self, member: Member) -> bool:
        """Remove `member`; False when it did not hold its JID (replaced, or unbound)."""
        ...

    async def resources(self, bare: JID) -> Sequence[Resource]:
        """The connected resources of `bare`, on every node."""
        ...

    async def resource(self, full: JID) -> Resource | None:
        """The resource with JID `full`, or None."""
        ...


class LocalDirectory:
    """The resources of this node, in memory (a single node, and tests)."""

    def __init__(self, node: str = "local") -> None:
        self.node = node
        self._by_bare: dict[JID, dict[str, Resource]] = {}

    def __len__(self) -> int:
        return sum(len(resources) for resources in self._by_bare.values())

    def fresh_resource(self, bare: JID) -> str:
        """A random resource `bare` has no session with here."""
        resources = self._by_bare.get(bare, {})
        resource = secrets.token_urlsafe(9)
        while resource in resources:
            resource = secrets.token_urlsafe(9)
        return resource

    async def bind(self, member: Member, bare: JID, resource: str | None) -> Bound:
        if resource is None:
            resource = self.fresh_resource(bare)
        resources = self._by_bare.setdefault(bare, {})
        full = bare.with_resource(resource)
        old = resources.get(resource)
        replaced = old if old is not None and old.handle is not member else None
        resources[resource] = Resource(
            full,
            self.node,
            member,
            member.priority,
            member.presence,
            member.interested,
        )
        return Bound(full, replaced)

    async def publish(self, member: Member) -> None:
        full = member.full_jid
        if full is None:
            return
        resources = self._by_bare.get(full.bare())
        key = full.resource or ""
        held = resources.get(key) if resources is not None else None
        if resources is None or held is None or held.handle is not member:
            return
        resources[key] = replace(
            held, priority=member.priority, presence=member.presence, interested=member.interested
        )

    async def unbind(self, member: Member) -> bool:
        full = member.full_jid
        if full is None:
            return False
        bare = full.bare()
        resources = self._by_bare.get(bare)
        if resources is None:
            return False
        key = full.resource or ""
        held = resources.get(key)
        is_held = held is not None and held.handle is member
        if is_held:
            del resources[key]
        if not resources:
            del self._by_bare[bare]
        return is_held

    async def resources(self, bare: JID) -> Sequence[Resource]:
        resources = self._by_bare.get(bare)
        return tuple(resources.values()) if resources else ()

    def all(self) -> list[Resource]:
        """Every resource of this node (a cluster writes them again after an outage)."""
        return [r for resources in self._by_bare.values() for r in resources.values()]

    def release(self, full: JID, handle: Handle) -> None:
        """Undo a `bind` of `handle` to `full` that could not be completed elsewhere."""
        resources = self._by_bare.get(full.bare())
        key = full.resource or ""
        if resources is not None and (held := resources.get(key)) and held.handle is handle:
            del resources[key]
            if not resources:
                del self._by_bare[full.bare()]

    async def resource(self, full: JID) -> Resource | None:
        resources = self._by_bare.get(full.bare())
        return resources.get(full.resource or "") if resources is not None else None
