"""A resource on another node is a handle too: the router's rules (RFC 6121 section 8.5)
over a directory whose resources are not all this node's sessions.

`TwoNodes` is a directory for the tests: this node's sessions in a `LocalDirectory`
(node `gw1`), plus records of resources on node `gw2` that a test puts in, whose handles
are `Remote`s recording what the router gives them. Local members are `Peer`s (recording
stand-ins for sessions). No offline storage unless a test says so: a message nobody can
take is answered with `service-unavailable`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import pytest

from gateway.core.directory import Bound, LocalDirectory, Member, Resource
from gateway.core.metrics import DropPolicy, Metrics
from gateway.core.router import Router
from gateway.errors import StanzaErrorCondition, StreamErrorCondition
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID
from tests.helpers.members import RecordingHandle as Remote
from tests.helpers.members import RecordingMember as Peer

HOST: Final = "example.com"
LOCAL_NODE: Final = "gw1"
REMOTE_NODE: Final = "gw2"
JULIET: Final = JID.parse("juliet@example.com")
ROMEO: Final = JID.parse("romeo@example.com")


class TwoNodes:
    """This node's `LocalDirectory` plus the resources of node `gw2` (see module docstring).

    Binding a resource held on `gw2` takes it from there, as a cluster directory does.
    """

    def __init__(self) -> None:
        self.local = LocalDirectory(LOCAL_NODE)
        self.node = self.local.node
        self.remote: dict[JID, Resource] = {}

    def add_remote(
        self,
        full: JID,
        priority: int = 0,
        *,
        available: bool = True,
        accepts: bool = True,
    ) -> Remote:
        handle = Remote(accepts=accepts)
        presence = presence_of(priority) if available else None
        self.remote[full] = Resource(full, REMOTE_NODE, handle, priority, presence)
        return handle

    async def bind(self, member: Member, bare: JID, resource: str | None) -> Bound:
        bound = await self.local.bind(member, bare, resource)
        taken = self.remote.pop(bound.full_jid, None)
        if taken is not None:
            assert bound.replaced is None, "a resource is held on one node only"
            return Bound(bound.full_jid, taken)
        return bound

    async def publish(self, member: Member) -> None:
        await self.local.publish(member)

    async def unbind(self, member: Member) -> bool:
        return await self.local.unbind(member)

    async def resources(self, bare: JID) -> Sequence[Resource]:
        remote = [r for jid, r in self.remote.items() if jid.bare() == bare]
        return (*await self.local.resources(bare), *remote)

    async def resource(self, full: JID) -> Resource | None:
        return await self.local.resource(full) or self.remote.get(full)


def presence_of(priority: int) -> Element:
    return Element(
        ns.CLIENT, "presence", None, [Element(ns.CLIENT, "priority", None, [str(priority)])]
    )


def message(
    to: JID | str, mtype: str | None = "chat", sender: str = "romeo@example.com/orchard"
) -> Element:
    attrs = {"to": str(to), "from": sender, "id": "m1"}
    if mtype is not None:
        attrs["type"] = mtype
    return Element(ns.CLIENT, "message", attrs, [Element(ns.CLIENT, "body", None, ["hi"])])


async def account_exists(domain: str, username: str) -> bool:
    return domain == HOST and username in ("juliet", "romeo")


@pytest.fixture
def directory() -> TwoNodes:
    return TwoNodes()


@pytest.fixture
def router(directory: TwoNodes) -> Router:
    router = Router((HOST,), account_exists, directory=directory, metrics=Metrics())
    router.offline = None
    return router


async def connect(router: Router, bare: JID, resource: str, priority: int | None = 0) -> Peer:
    """A local session bound to `bare/resource`, available with `priority` (None: bound
    but unavailable), as its owner task does it."""
    peer = Peer()
    peer.full_jid = await router.bind(peer, bare, resource)
    if priority is not None:
        peer.priority, peer.presence = priority, presence_of(priority)
        await router.directory.publish(peer)
    return peer


@pytest.fixture
async def romeo(router: Router) -> Peer:
    """The sender of the tests' stanzas, a local session of another account."""
    return await connect(router, ROMEO, "orchard", 0)


def assert_service_unavailable(reply: Element, original: Element, text: str | None = None) -> None:
    """`reply` is the `service-unavailable` error answering `original` (RFC 6120 8.3)."""
    assert reply.namespace == ns.CLIENT
    assert reply.name == original.name
    assert reply.get("type") == "error"
    assert reply.get("to") == original.get("from")
    assert reply.get("from") == original.get("to")
    assert reply.get("id") == original.get("id")
    payload = list(original.elements())
    error = reply.find(ns.CLIENT, "error")
    assert error is not None
    assert list(reply.elements()) == [*payload, error]
    assert error.get("type") == "cancel"
    conditions = error.find_all(ns.STANZAS_ERRORS)
    assert conditions[0].name == "service-unavailable"
    assert error.find_text(ns.STANZAS_ERRORS, "text") == text


# -- messages to a bare JID ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local_priority", "remote_priority", "winner"),
    [
        pytest.param(1, 5, "remote", id="remote-higher"),
        pytest.param(5, 1, "local", id="local-higher"),
        pytest.param(0, -1, "local", id="remote-negative"),
        pytest.param(-1, 0, "remote", id="local-negative"),
    ],
)
async def test_a_message_to_a_bare_jid_goes_to_the_highest_priority_resource_wherever_it_is(
    router: Router,
    directory: TwoNodes,
    romeo: Peer,
    local_priority: int,
    remote_priority: int,
    winner: str,
) -> None:
    local = await connect(router, JULIET, "balcony", local_priority)
    remote = directory.add_remote(JULIET.with_resource("garden"), remote_priority)
    stanza = message(JULIET)
    await router.route(stanza, romeo)
    assert local.sent == ([stanza] if winner == "local" else [])
    assert remote.sent == ([stanza] if winner == "remote" else [])
    assert romeo.sent == []


async def test_a_message_to_a_bare_jid_goes_to_every_resource_of_equal_top_priority_on_both_nodes(
    router: Router, directory: TwoNodes, romeo: Peer
) -> None:
    top_local = await connect(router, JULIET, "balcony", 3)
    low_local = await connect(router, JULIET, "hall", 1)
    top_remote = directory.add_remote(JULIET.with_resource("garden"), 3)
    low_remote = directory.add_remote(JULIET.with_resource("chapel"), 2)
    unavailable_remote = directory.add_remote(JULIET.with_resource("attic"), 9, available=False)
    stanza = message(JULIET, mtype=None)  # normal
    await router.route(stanza, romeo)
    assert top_local.sent == [stanza]
    assert top_remote.sent == [stanza]
    assert low_local.sent == low_remote.sent == unavailable_remote.sent == []
    assert romeo.sent == []


async def test_resources_of_negative_priority_get_no_message_to_the_bare_jid(
    router: Router, directory: TwoNodes, romeo: Peer
) -> None:
    local = await connect(router, JULIET, "balcony", -1)
    remote = directory.add_remote(JULIET.with_resource("garden"), -5)
    stanza = message(JULIET)
    await router.route(stanza, romeo)
    assert local.sent == remote.sent == []
    # No offline storage: the sender learns the message was not delivered.
    assert len(romeo.sent) == 1
    assert_service_unavailable(romeo.sent[0], stanza, "the recipient is offline")


async def test_a_headline_goes_to_every_available_resource_of_non_negative_priority(
    router: Router, directory: TwoNodes, romeo: Peer
) -> None:
    local_one = await connect(router, JULIET, "balcony", 1)
    local_negative = await connect(router, JULIET, "hall", -1)
    local_unavailable = await connect(router, JULIET, "cellar", None)
    remote_five = directory.add_remote(JULIET.with_resource("garden"), 5)
    remote_zero = directory.add_remote(JULIET.with_resource("chapel"), 0)
    remote_negative = directory.add_remote(JULIET.with_resource("tomb"), -1)
    remote_unavailable = directory.add_remote(JULIET.with_resource("attic"), 9, available=False)
    stanza = message(JULIET, "headline")
    await router.route(stanza, romeo)
    assert local_one.sent == remote_five.sent == remote_zero.sent == [stanza]
    assert local_negative.sent == local_unavailable.sent == []
    assert remote_negative.sent == remote_unavailable.sent == []
    assert romeo.sent == []


# -- to a full JID ---------------------------------------------------------------------------


async def test_a_message_to_a_remote_full_jid_goes_through_its_handle(
    router: Router, directory: TwoNodes, romeo: Peer
) -> None:
    local = await connect(router, JULIET, "balcony", 10)
    # Neither available nor of non-negative priority: a full JID is delivered regardless.
    remote = directory.add_remote(JULIET.with_resource("garden"), -1, available=False)
    other_remote = directory.add_remote(JULIET.with_resource("chapel"), 10)
    stanza = message(JULIET.with_resource("garden"))
    await router.route(stanza, romeo)
    assert remote.sent == [stanza]
    assert remote.sent[0] is stanza
    assert local.sent == other_remote.sent == romeo.sent == []


async def test_a_refused_message_to_a_remote_full_jid_falls_back_to_the_bare_jid_without_it(
    router: Router, directory: TwoNodes, romeo: Peer
) -> None:
    local = await connect(router, JULIET, "balcony", 1)
    refusing = directory.add_remote(JULIET.with_resource("garden"), 10, accepts=False)
    stanza = message(JULIET.with_resource("garden"))
    await router.route(stanza, romeo)
    # Tried once at its full JID, then not again as the bare JID's top-priority resource.
    assert refusing.sent == [stanza]
    assert local.sent == [stanza]
    assert romeo.sent == []


async def test_a_message_to_a_bare_jid_refused_by_its_top_resource_goes_to_the_next(
    router: Router, directory: TwoNodes, romeo: Peer
) -> None:
    """A top-priority resource that refuses (its session is closing) is not available:
    the message goes to the next priority down, never to the sender as "offline"."""
    local = await connect(router, JULIET, "balcony", 1)
    refusing = directory.add_remote(JULIET.with_resource("garden"), 10, accepts=False)
    stanza = message(JULIET)
    await router.route(stanza, romeo)
    assert refusing.sent == [stanza]  # asked once
    assert local.sent == [stanza]
    assert romeo.sent == []


async def test_a_refused_message_with_no_other_resource_is_bounced_to_its_sender(
    router: Router, directory: TwoNodes, romeo: Peer
) -> None:
    refusing = directory.add_remote(JULIET.with_resource("garden"), 10, accepts=False)
    stanza = message(JULIET.with_resource("garden"))
    await router.route(stanza, romeo)
    assert refusing.sent == [stanza]
    assert len(romeo.sent) == 1
    assert_service_unavailable(romeo.sent[0], stanza, "the recipient is offline")


async def test_a_refused_headline_to_a_remote_full_jid_is_dropped(
    router: Router, directory: TwoNodes, romeo: Peer
) -> None:
    local = await connect(router, JULIET, "balcony", 1)
    refusing = directory.add_remote(JULIET.with_resource("garden"), 10, accepts=False)
    stanza = message(JULIET.with_resource("garden"), "headline")
    await router.route(stanza, romeo)
    assert refusing.sent == [stanza]
    assert local.sent == romeo.sent == []
    dropped = router.metrics.dropped
    assert dropped.value(policy=DropPolicy.MESSAGE_TO_UNAVAILABLE_RESOURCE) == 1


# -- presence --------------------------------------------------------------------------------


async def test_presence_to_a_bare_jid_reaches_every_available_resource_on_both_nodes(
    router: Router, directory: TwoNodes, romeo: Peer
) -> None:
    local_one = await connect(router, JULIET, "balcony", 1)
    local_negative = await connect(router, JULIET, "hall", -3)
    local_unavailable = await connect(router, JULIET, "cellar", None)
    remote_five = directory.add_remote(JULIET.with_resource("garden"), 5)
    remote_negative = directory.add_remote(JULIET.with_resource("tomb"), -1)
    remote_unavailable = directory.add_remote(JULIET.with_resource("attic"), 0, available=False)
    stanza = Element(ns.CLIENT, "presence", {"to": str(JULIET), "from": str(romeo.full_jid)})
    await router.route(stanza, romeo)
    for reached in (local_one, local_negative, remote_five, remote_negative):
        assert reached.sent == [stanza]
    assert local_unavailable.sent == remote_unavailable.sent == []
    assert romeo.sent == []


# -- iq --------------------------------------------------------------------------------------


@pytest.mark.parametrize("remote", ["absent", "refusing"])
async def test_an_iq_get_to_an_unavailable_full_jid_is_bounced_to_its_sender(
    router: Router, directory: TwoNodes, romeo: Peer, remote: str
) -> None:
    local = await connect(router, JULIET, "balcony", 5)
    other_remote = directory.add_remote(JULIET.with_resource("chapel"), 5)
    refusing = None
    if remote == "refusing":
        refusing = directory.add_remote(JULIET.with_resource("garden"), 5, accepts=False)
    query = Element(ns.DISCO_INFO, "query")
    iq = Element(
        ns.CLIENT,
        "iq",
        {"type": "get", "id": "q1", "to": "juliet@example.com/garden", "from": str(romeo.full_jid)},
        [query],
    )
    await router.route(iq, romeo)
    assert len(romeo.sent) == 1
    reply = romeo.sent[0]
    assert reply == Element(
        ns.CLIENT,
        "iq",
        {
            "type": "error",
            "id": "q1",
            "from": "juliet@example.com/garden",
            "to": str(romeo.full_jid),
        },
        [
            query,
            Element(
                ns.CLIENT,
                "error",
                {"type": "cancel"},
                [Element(ns.STANZAS_ERRORS, "service-unavailable")],
            ),
        ],
    )
    assert_service_unavailable(reply, iq)
    assert local.sent == other_remote.sent == []
    if refusing is not None:
        assert refusing.sent == [iq]
    bounced = router.metrics.bounced
    assert bounced.value(condition=StanzaErrorCondition.SERVICE_UNAVAILABLE) == 1


# -- binding ---------------------------------------------------------------------------------


async def test_binding_a_resource_held_on_another_node_closes_it_there_and_announces_it_gone(
    router: Router, directory: TwoNodes
) -> None:
    local_other = await connect(router, JULIET, "hall", 1)
    local_unavailable = await connect(router, JULIET, "cellar", None)
    held = directory.add_remote(JULIET.with_resource("balcony"), 2)
    remote_other = directory.add_remote(JULIET.with_resource("garden"), -1)
    remote_unavailable = directory.add_remote(JULIET.with_resource("attic"), 0, available=False)
    romeos = await connect(router, ROMEO, "orchard", 0)

    newcomer = Peer()
    full = await router.bind(newcomer, JULIET, "balcony")

    assert full == JULIET.with_resource("balcony")
    assert held.closed == [(StreamErrorCondition.CONFLICT, "replaced by a new connection", False)]
    gone = Element(
        ns.CLIENT, "presence", {"type": "unavailable", "from": "juliet@example.com/balcony"}
    )
    assert local_other.sent == [gone]
    assert remote_other.sent == [gone]
    assert local_unavailable.sent == remote_unavailable.sent == []
    # Neither the replaced resource, nor the newcomer (not available yet), nor another
    # account hears of it.
    assert held.sent == newcomer.sent == romeos.sent == []
    assert newcomer.closed == local_other.closed == remote_other.closed == []
    record = await directory.resource(full)
    assert record is not None
    assert record.handle is newcomer and record.node == LOCAL_NODE


async def test_binding_a_resource_held_unavailable_on_another_node_closes_it_quietly(
    router: Router, directory: TwoNodes
) -> None:
    local_other = await connect(router, JULIET, "hall", 1)
    held = directory.add_remote(JULIET.with_resource("balcony"), 2, available=False)
    newcomer = Peer()
    await router.bind(newcomer, JULIET, "balcony")
    assert held.closed == [(StreamErrorCondition.CONFLICT, "replaced by a new connection", False)]
    assert local_other.sent == held.sent == []
    assert [(r.full_jid, r.node) for r in await directory.resources(JULIET)] == [
        (JULIET.with_resource("hall"), LOCAL_NODE),
        (JULIET.with_resource("balcony"), LOCAL_NODE),
    ]
