"""`Migrations` without Redis: what a node answers to a surrender asked for a session it
is handing off at that moment (its slot ended, its snapshot not yet stored or sent)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from structlog.testing import capture_logs

from gateway.core.migration import Migrations
from gateway.core.resume import ResumeRegistry
from gateway.errors import StorageError
from gateway.storage.adoptable_memory import MemoryAdoptableStore
from gateway.storage.base import SessionSnapshot
from gateway.storage.cluster_codec import Item, Moved, Surrender
from gateway.storage.snapshot import encode_snapshot


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


def migrations(
    relay: PostingRelay,
    adopt: Callable[[bytes], Awaitable[bool]] = nothing_adopted,
    store: MemoryAdoptableStore | None = None,
) -> Migrations:
    return Migrations(
        relay,  # type: ignore[arg-type]  # (only `post` is used)
        "gw1",
        ResumeRegistry(max_parked_per_user=10, max_parked=100),
        adopt,
        adoptable=store or MemoryAdoptableStore(),
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


async def test_a_swept_session_that_cannot_be_ended_now_goes_back_for_the_next_sweep() -> None:
    # Ending it needs a store (offline storage for its messages): while that fails, the
    # snapshot is put back instead of vanishing with the failed attempt.
    expired = SessionSnapshot(
        smid="sm1-0123456789abcdef",
        full_jid="juliet@example.com/balcony",
        expires_at=time.time() - 1,
        max=300,
        counter_in=3,
        counter_out=5,
        buffer=(),
    )
    data = encode_snapshot(expired)
    store = MemoryAdoptableStore()
    await store.put(expired.smid, data, expired.expires_at)
    attempts: list[bytes] = []

    async def failing_adopt(snapshot: bytes) -> bool:
        attempts.append(snapshot)
        raise StorageError("offline storage away")

    node = migrations(PostingRelay(), failing_adopt, store)
    with capture_logs() as logs:
        assert await node.sweep() == 1
    assert attempts == [data]
    assert [e["event"] for e in logs] == ["sweep_put_back"]
    assert await store.take_expired(10) == [(expired.smid, data)]  # there for the next
