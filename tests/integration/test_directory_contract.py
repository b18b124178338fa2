"""The `Directory` contract (`gateway.core.directory`), run by every implementation.

Each test takes the `directory` fixture and so runs once per implementation (test id
`[local]`). A new implementation (a cluster's shared store) is one more entry in
`DIRECTORIES`: an opener that gives a fresh, empty directory of the named node for one
test and tears it down after (and may `pytest.skip` when its server is not running).

Members are `Peer`s, small recording stand-ins for sessions: like a session's owner task,
a test records the full JID `bind` returned in the member and calls `publish` after it
changed the member's fields. The directory never calls a member's `send` or `close`
(ending a replaced session is the caller's business), and the tests check that too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Final

import pytest

from gateway.core.cluster import ClusterDirectory
from gateway.core.directory import Bound, Directory, LocalDirectory, Member, Resource
from gateway.core.relay import Relay
from gateway.storage.redis_client import open_redis
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID
from tests.helpers.members import RecordingMember as Peer

#: The node name every directory under test is opened with.
NODE: Final = "gw1"
JULIET: Final = JID.parse("juliet@example.com")
ROMEO: Final = JID.parse("romeo@example.com")

DirectoryOpener = Callable[[str, pytest.FixtureRequest], AbstractAsyncContextManager[Directory]]


@contextlib.asynccontextmanager
async def _local(node: str, _request: pytest.FixtureRequest) -> AsyncIterator[Directory]:
    yield LocalDirectory(node)


@contextlib.asynccontextmanager
async def _cluster(node: str, request: pytest.FixtureRequest) -> AsyncIterator[Directory]:
    # Only this parameter starts Redis (the redis_url fixture), when it runs.
    url: str = request.getfixturevalue("redis_url")
    async with open_redis(url) as redis:
        relay = Relay(url, node, prefix="xg:", max_pending=100)
        directory = ClusterDirectory(redis, relay, node, prefix="xg:")
        yield directory
        await directory.aclose()


DIRECTORIES: Final[dict[str, DirectoryOpener]] = {
    "local": _local,
    "cluster": _cluster,
}


@pytest.fixture(params=[pytest.param(opener, id=name) for name, opener in DIRECTORIES.items()])
async def directory(request: pytest.FixtureRequest) -> AsyncIterator[Directory]:
    opener: DirectoryOpener = request.param
    async with opener(NODE, request) as opened:
        yield opened


def available(show: str | None = None) -> Element:
    """An initial presence (with a `<show/>` when given)."""
    children = [Element(ns.CLIENT, "show", None, [show])] if show else []
    return Element(ns.CLIENT, "presence", None, children)


async def bind(directory: Directory, member: Member, bare: JID, resource: str | None) -> Bound:
    """Bind like a session's owner task: `bind`, then record the full JID in the member."""
    bound = await directory.bind(member, bare, resource)
    member.full_jid = bound.full_jid
    return bound


def untouched(*peers: Peer) -> bool:
    """No stanza was given to and no close asked of any of `peers`."""
    return all(not p.sent and not p.closed for p in peers)


# -- bind ------------------------------------------------------------------------------------


async def test_bind_returns_the_full_jid_and_no_replaced_resource(directory: Directory) -> None:
    peer = Peer()
    bound = await directory.bind(peer, JULIET, "balcony")
    assert bound == Bound(JID.parse("juliet@example.com/balcony"), None)
    record = await directory.resource(bound.full_jid)
    assert record is not None
    assert record.full_jid == bound.full_jid
    assert record.handle is peer
    assert untouched(peer)


async def test_a_bound_record_has_the_members_fields_at_bind_time(directory: Directory) -> None:
    presence = available("away")
    peer = Peer(priority=7, presence=presence, interested=True)
    bound = await bind(directory, peer, JULIET, "balcony")
    assert await directory.resource(bound.full_jid) == Resource(
        bound.full_jid, NODE, peer, 7, presence, True
    )


async def test_a_new_resource_is_unavailable_with_priority_zero_and_not_interested(
    directory: Directory,
) -> None:
    peer = Peer()
    bound = await bind(directory, peer, JULIET, "balcony")
    assert await directory.resource(bound.full_jid) == Resource(bound.full_jid, NODE, peer)


async def test_bind_without_a_resource_draws_distinct_unused_ones(directory: Directory) -> None:
    named = Peer()
    await bind(directory, named, JULIET, "balcony")
    peers = [Peer() for _ in range(40)]
    drawn = [(await bind(directory, p, JULIET, None)) for p in peers]
    assert all(b.replaced is None for b in drawn)
    resources = [b.full_jid.resource for b in drawn]
    assert all(r for r in resources)
    assert "balcony" not in resources
    assert len(set(resources)) == len(peers)
    assert all(b.full_jid.bare() == JULIET for b in drawn)
    records = await directory.resources(JULIET)
    assert {r.full_jid for r in records} == {
        JULIET.with_resource("balcony"),
        *(b.full_jid for b in drawn),
    }
    for peer, bound in zip(peers, drawn, strict=True):
        record = await directory.resource(bound.full_jid)
        assert record is not None and record.handle is peer


async def test_binding_a_resource_held_by_another_member_replaces_it(
    directory: Directory,
) -> None:
    presence = available()
    old = Peer(priority=3, presence=presence, interested=True)
    first = await bind(directory, old, JULIET, "balcony")
    new = Peer(priority=1)
    second = await bind(directory, new, JULIET, "balcony")
    assert second.full_jid == first.full_jid
    assert second.replaced == Resource(first.full_jid, NODE, old, 3, presence, True)
    assert second.replaced.handle is old
    record = await directory.resource(first.full_jid)
    assert record == Resource(first.full_jid, NODE, new, 1)
    assert record.handle is new
    assert [r.handle for r in await directory.resources(JULIET)] == [new]
    # Ending the replaced session is the caller's business, not the directory's.
    assert untouched(old, new)


async def test_rebinding_the_same_member_is_not_a_replacement(directory: Directory) -> None:
    peer = Peer()
    first = await bind(directory, peer, JULIET, "balcony")
    peer.priority = 4
    again = await bind(directory, peer, JULIET, "balcony")
    assert again == Bound(first.full_jid, None)
    records = await directory.resources(JULIET)
    assert len(records) == 1
    assert records[0].handle is peer
    assert records[0].full_jid == first.full_jid
    assert untouched(peer)


# -- publish ---------------------------------------------------------------------------------


async def test_publish_records_priority_presence_and_interest(directory: Directory) -> None:
    peer = Peer()
    bound = await bind(directory, peer, JULIET, "balcony")
    presence = available("chat")
    peer.priority, peer.presence, peer.interested = -2, presence, True
    await directory.publish(peer)
    expected = Resource(bound.full_jid, NODE, peer, -2, presence, True)
    assert await directory.resource(bound.full_jid) == expected
    assert list(await directory.resources(JULIET)) == [expected]

    peer.presence = None
    await directory.publish(peer)
    record = await directory.resource(bound.full_jid)
    assert record == Resource(bound.full_jid, NODE, peer, -2, None, True)
    assert untouched(peer)


async def test_records_are_immutable_and_a_publish_does_not_change_an_earlier_one(
    directory: Directory,
) -> None:
    first_presence = available()
    peer = Peer(priority=1, presence=first_presence)
    bound = await bind(directory, peer, JULIET, "balcony")
    earlier = await directory.resource(bound.full_jid)
    earlier_list = await directory.resources(JULIET)
    assert earlier is not None

    second_presence = available("dnd")
    peer.priority, peer.presence, peer.interested = 9, second_presence, True
    await directory.publish(peer)

    assert (earlier.priority, earlier.presence, earlier.interested) == (1, first_presence, False)
    assert [(r.priority, r.presence, r.interested) for r in earlier_list] == [
        (1, first_presence, False)
    ]
    later = await directory.resource(bound.full_jid)
    assert later is not None
    assert (later.priority, later.presence, later.interested) == (9, second_presence, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        earlier.priority = 9  # type: ignore[misc]


async def test_publish_by_a_replaced_member_changes_nothing(directory: Directory) -> None:
    old = Peer()
    bound = await bind(directory, old, JULIET, "balcony")
    new = Peer(priority=2)
    await bind(directory, new, JULIET, "balcony")
    old.priority, old.presence, old.interested = 50, available(), True
    await directory.publish(old)
    assert await directory.resource(bound.full_jid) == Resource(bound.full_jid, NODE, new, 2)
    assert [r.handle for r in await directory.resources(JULIET)] == [new]


async def test_publish_by_an_unbound_member_changes_nothing(directory: Directory) -> None:
    gone = Peer()
    staying = Peer()
    bound = await bind(directory, gone, JULIET, "balcony")
    await bind(directory, staying, JULIET, "garden")
    assert await directory.unbind(gone)
    gone.priority, gone.presence = 5, available()
    await directory.publish(gone)
    assert await directory.resource(bound.full_jid) is None
    assert [r.handle for r in await directory.resources(JULIET)] == [staying]


async def test_publish_by_the_last_unbound_member_of_an_account_changes_nothing(
    directory: Directory,
) -> None:
    gone = Peer()
    bound = await bind(directory, gone, JULIET, "balcony")
    assert await directory.unbind(gone)
    gone.presence = available()
    await directory.publish(gone)
    assert await directory.resource(bound.full_jid) is None
    assert list(await directory.resources(JULIET)) == []


async def test_publish_by_a_member_never_bound_changes_nothing(directory: Directory) -> None:
    stranger = Peer(priority=1, presence=available())
    await directory.publish(stranger)
    stranger.full_jid = JULIET.with_resource("balcony")
    await directory.publish(stranger)
    assert await directory.resource(JULIET.with_resource("balcony")) is None
    assert list(await directory.resources(JULIET)) == []


# -- unbind ----------------------------------------------------------------------------------


async def test_unbind_returns_true_once_then_false(directory: Directory) -> None:
    peer = Peer()
    other = Peer()
    bound = await bind(directory, peer, JULIET, "balcony")
    await bind(directory, other, JULIET, "garden")
    assert await directory.unbind(peer) is True
    assert await directory.unbind(peer) is False
    assert await directory.resource(bound.full_jid) is None
    assert [r.handle for r in await directory.resources(JULIET)] == [other]
    assert await directory.unbind(other) is True
    assert list(await directory.resources(JULIET)) == []
    assert untouched(peer, other)


async def test_unbind_of_a_member_never_bound_is_false(directory: Directory) -> None:
    assert await directory.unbind(Peer()) is False
    assert await directory.unbind(Peer(full_jid=JULIET.with_resource("balcony"))) is False


async def test_unbind_of_a_replaced_member_is_false_and_keeps_the_new_holder(
    directory: Directory,
) -> None:
    old = Peer()
    bound = await bind(directory, old, JULIET, "balcony")
    new = Peer()
    await bind(directory, new, JULIET, "balcony")
    assert await directory.unbind(old) is False
    record = await directory.resource(bound.full_jid)
    assert record is not None and record.handle is new
    assert await directory.unbind(new) is True
    assert await directory.resource(bound.full_jid) is None


async def test_a_resource_can_be_bound_again_after_unbind(directory: Directory) -> None:
    first = Peer()
    bound = await bind(directory, first, JULIET, "balcony")
    assert await directory.unbind(first)
    second = Peer()
    again = await bind(directory, second, JULIET, "balcony")
    assert again == Bound(bound.full_jid, None)
    record = await directory.resource(bound.full_jid)
    assert record is not None and record.handle is second


# -- lookups ---------------------------------------------------------------------------------


async def test_an_unknown_bare_jid_has_no_resources(directory: Directory) -> None:
    assert list(await directory.resources(JULIET)) == []
    await bind(directory, Peer(), ROMEO, "orchard")
    assert list(await directory.resources(JULIET)) == []


async def test_an_unknown_full_jid_has_no_resource(directory: Directory) -> None:
    assert await directory.resource(JULIET.with_resource("balcony")) is None
    await bind(directory, Peer(), JULIET, "garden")
    assert await directory.resource(JULIET.with_resource("balcony")) is None
    assert await directory.resource(ROMEO.with_resource("garden")) is None


async def test_resources_are_keyed_by_bare_jid(directory: Directory) -> None:
    juliet_balcony, juliet_garden, romeo_balcony = Peer(), Peer(), Peer()
    await bind(directory, juliet_balcony, JULIET, "balcony")
    await bind(directory, juliet_garden, JULIET, "garden")
    bound = await bind(directory, romeo_balcony, ROMEO, "balcony")
    # The same resourcepart under another account is not a replacement.
    assert bound.replaced is None
    juliets = await directory.resources(JULIET)
    assert {(r.full_jid, id(r.handle)) for r in juliets} == {
        (JULIET.with_resource("balcony"), id(juliet_balcony)),
        (JULIET.with_resource("garden"), id(juliet_garden)),
    }
    romeos = await directory.resources(ROMEO)
    assert [(r.full_jid, r.handle) for r in romeos] == [
        (ROMEO.with_resource("balcony"), romeo_balcony)
    ]
    record = await directory.resource(ROMEO.with_resource("balcony"))
    assert record is not None and record.handle is romeo_balcony

    assert await directory.unbind(romeo_balcony)
    assert len(await directory.resources(JULIET)) == 2


async def test_a_resource_is_on_the_directorys_node(directory: Directory) -> None:
    assert directory.node == NODE
    bound = await bind(directory, Peer(), JULIET, "balcony")
    await bind(directory, Peer(), JULIET, None)
    record = await directory.resource(bound.full_jid)
    assert record is not None and record.node == NODE
    assert [r.node for r in await directory.resources(JULIET)] == [NODE, NODE]


async def test_a_resource_is_available_while_it_has_a_presence(directory: Directory) -> None:
    peer = Peer()
    bound = await bind(directory, peer, JULIET, "balcony")
    record = await directory.resource(bound.full_jid)
    assert record is not None and not record.is_available

    peer.presence = available()
    await directory.publish(peer)
    record = await directory.resource(bound.full_jid)
    assert record is not None and record.is_available

    peer.presence = None
    await directory.publish(peer)
    record = await directory.resource(bound.full_jid)
    assert record is not None and not record.is_available


# -- the local directory only ----------------------------------------------------------------


async def test_the_local_directory_draws_again_when_the_drawn_resource_is_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    local = LocalDirectory(NODE)
    holder = Peer()
    await bind(local, holder, JULIET, "taken")
    draws = iter(["taken", "taken", "fresh"])

    def token_urlsafe(nbytes: Any = None) -> str:
        return next(draws)

    monkeypatch.setattr(secrets, "token_urlsafe", token_urlsafe)
    newcomer = Peer()
    bound = await bind(local, newcomer, JULIET, None)
    assert bound == Bound(JULIET.with_resource("fresh"), None)
    record = await local.resource(JULIET.with_resource("taken"))
    assert record is not None and record.handle is holder
    assert len(local) == 2
