"""The `HandoffStore` contract, run by every implementation: order, replacement, an
atomic take, closing."""

from __future__ import annotations

import threading

import pytest

from gateway.errors import StorageError
from gateway.storage.base import HandoffStore, SessionSnapshot
from gateway.storage.snapshot import decode_snapshot, encode_snapshot
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from tests.storage.helpers import snap


def test_take_all_returns_snapshots_in_insertion_order_and_empties_the_store(
    handoff: HandoffStore,
) -> None:
    handoff.put_many([snap(n) for n in range(3)])
    handoff.put_many([snap(n) for n in range(3, 5)])
    assert handoff.count() == 5
    assert handoff.take_all() == [snap(n)[1] for n in range(5)]
    assert handoff.count() == 0
    assert handoff.take_all() == []


def test_an_empty_store_takes_nothing(handoff: HandoffStore) -> None:
    assert handoff.count() == 0
    assert handoff.take_all() == []


def test_putting_an_smid_again_replaces_its_snapshot(handoff: HandoffStore) -> None:
    handoff.put_many([snap(1), snap(2)])
    handoff.put_many([("sm1", b"newer")])
    assert handoff.count() == 2
    taken = handoff.take_all()
    assert sorted(taken) == sorted([b"newer", snap(2)[1]])
    assert snap(1)[1] not in taken


def test_an_smid_twice_in_one_batch_keeps_the_last_snapshot(handoff: HandoffStore) -> None:
    handoff.put_many([("sm1", b"first"), ("sm1", b"second")])
    assert handoff.count() == 1
    assert handoff.take_all() == [b"second"]


def test_putting_nothing_is_a_no_op(handoff: HandoffStore) -> None:
    handoff.put_many([])
    assert handoff.count() == 0
    handoff.put_many([snap(1)])
    handoff.put_many([])
    assert handoff.take_all() == [snap(1)[1]]


def test_encoded_snapshots_round_trip_through_the_store(handoff: HandoffStore) -> None:
    snapshot = SessionSnapshot(
        smid="sm1-0123456789abcdef",
        full_jid="juliet@example.com/balcony",
        expires_at=1_790_000_000.5,
        max=300,
        counter_in=2**32 - 1,
        counter_out=5,
        buffer=(Element(ns.CLIENT, "message", {"id": "m1"}, [Element(ns.CLIENT, "body")]),),
    )
    handoff.put_many([(snapshot.smid, encode_snapshot(snapshot))])
    (data,) = handoff.take_all()
    assert decode_snapshot(data) == snapshot


def test_a_closed_store_raises_storage_error(handoff: HandoffStore) -> None:
    handoff.put_many([snap(1)])
    handoff.close()
    handoff.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        handoff.put_many([snap(2)])
    with pytest.raises(StorageError, match="closed"):
        handoff.take_all()
    with pytest.raises(StorageError, match="closed"):
        handoff.count()


def test_threads_taking_while_others_put_take_each_snapshot_exactly_once(
    handoff: HandoffStore,
) -> None:
    barrier = threading.Barrier(4)
    got: list[list[bytes]] = [[] for _ in range(2)]

    def put(index: int) -> None:
        barrier.wait()
        for n in range(100):
            handoff.put_many([snap(index * 1000 + n)])

    def take(index: int) -> None:
        barrier.wait()
        for _ in range(50):
            got[index].extend(handoff.take_all())

    threads = [threading.Thread(target=put, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [data for batch in got for data in batch] + handoff.take_all()
    assert sorted(everything) == sorted(snap(i * 1000 + n)[1] for i in range(2) for n in range(100))
