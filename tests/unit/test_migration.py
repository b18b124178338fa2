"""`Migrations` without Redis: what a node answers to a surrender asked for a session it
is handing off at that moment (its slot ended, its snapshot not yet stored or sent)."""

from __future__ import annotations

from gateway.core.migration import Migrations
from gateway.core.resume import ResumeRegistry
from gateway.storage.adoptable_memory import MemoryAdoptableStore
from gateway.storage.cluster_codec import Item, Moved, Surrender


class PostingRelay:
    """The relay's `post` as `Migrations` uses it: what was posted, to which node."""

    def __init__(self) -> None:
        self.posted: list[tuple[str, Item]] = []

    def post(self, node: str, item: Item) -> bool:
        self.posted.append((node, item))
        return True


async def nothing_adopted(_: bytes) -> bool:
    return False


async def alive(_: str) -> bool:
    return True


def migrations(relay: PostingRelay) -> Migrations:
    return Migrations(
        relay,  # type: ignore[arg-type]  # (only `post` is used)
        "gw1",
        ResumeRegistry(max_parked_per_user=10, max_parked=100),
        nothing_adopted,
        adoptable=MemoryAdoptableStore(),
        alive=alive,
    )


async def test_a_surrender_for_an_unknown_session_is_refused_at_once() -> None:
    relay = PostingRelay()
    await migrations(relay).receive(Surrender("s1", "gw2"))
    assert relay.posted == [("gw2", Moved("s1", b""))]


async def test_a_surrender_for_a_session_being_handed_off_waits_for_the_hand_off() -> None:
    # Answered at once, the asker would look in the adoptable store before the snapshot
    # is there, and its client would get <failed/> for a session about to be adoptable.
    relay = PostingRelay()
    node = migrations(relay)
    node.leaving["s1"] = []
    await node.receive(Surrender("s1", "gw2"))
    await node.receive(Surrender("s1", "gw3"))
    assert relay.posted == []
    assert node.leaving["s1"] == ["gw2", "gw3"]  # answered by `ending.hand_off` when done
