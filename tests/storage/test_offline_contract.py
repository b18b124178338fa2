"""The `OfflineStore` contract, run by every implementation: order, both per-user caps
(also under concurrency), atomic pops, put_back ahead of the rest, closing."""

from __future__ import annotations

import threading

import pytest

from gateway.errors import StorageError
from gateway.storage.base import OfflineStore
from gateway.storage.codec import decode_stanza, encode_stanza
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from tests.storage.helpers import HOST, STAMP, hammer, message


def test_messages_pop_oldest_first_with_their_stamps(offline: OfflineStore) -> None:
    for n in range(5):
        assert offline.store(HOST, "juliet", message(n), f"stamp{n}", max_per_user=10)
    assert offline.store(HOST, "romeo", message(99), STAMP, max_per_user=10)
    assert offline.count(HOST, "juliet") == 5
    assert offline.pop_all(HOST, "juliet") == [(message(n), f"stamp{n}") for n in range(5)]
    assert offline.count(HOST, "juliet") == 0
    assert offline.count(HOST, "romeo") == 1


def test_accounts_are_keyed_by_host_and_username(offline: OfflineStore) -> None:
    offline.store(HOST, "juliet", message(1), STAMP, max_per_user=10)
    offline.store("example.net", "juliet", message(2), STAMP, max_per_user=10)
    assert offline.pop_all("example.net", "juliet") == [(message(2), STAMP)]
    assert offline.pop_all(HOST, "nobody") == []
    assert offline.count(HOST, "juliet") == 1
    assert offline.count(HOST, "nobody") == 0


def test_popping_twice_gives_nothing_the_second_time(offline: OfflineStore) -> None:
    offline.store(HOST, "juliet", message(1), STAMP, max_per_user=10)
    assert len(offline.pop_all(HOST, "juliet")) == 1
    assert offline.pop_all(HOST, "juliet") == []


def test_pop_with_a_limit_takes_the_oldest_and_keeps_the_rest(offline: OfflineStore) -> None:
    for n in range(5):
        offline.store(HOST, "juliet", message(n), STAMP, max_per_user=10)
    assert [s for s, _ in offline.pop_all(HOST, "juliet", limit=2)] == [message(0), message(1)]
    assert offline.pop_all(HOST, "juliet", limit=0) == []
    assert offline.pop_all(HOST, "juliet", limit=0, max_bytes=10_000) == []
    offline.store(HOST, "juliet", message(5), STAMP, max_per_user=10)
    assert [s for s, _ in offline.pop_all(HOST, "juliet")] == [message(n) for n in range(2, 6)]


def test_a_full_mailbox_refuses_and_writes_nothing(offline: OfflineStore) -> None:
    for n in range(3):
        assert offline.store(HOST, "juliet", message(n), STAMP, max_per_user=3)
    assert not offline.store(HOST, "juliet", message(3), STAMP, max_per_user=3)
    assert offline.count(HOST, "juliet") == 3
    assert not offline.store(HOST, "romeo", message(0), STAMP, max_per_user=0)
    assert offline.count(HOST, "romeo") == 0
    offline.pop_all(HOST, "juliet", limit=1)
    assert offline.store(HOST, "juliet", message(4), STAMP, max_per_user=3)


def test_negative_cap_or_limit_is_a_value_error(offline: OfflineStore) -> None:
    with pytest.raises(ValueError, match="max_per_user"):
        offline.store(HOST, "juliet", message(0), STAMP, max_per_user=-1)
    with pytest.raises(ValueError, match="limit"):
        offline.pop_all(HOST, "juliet", limit=-1)
    assert offline.count(HOST, "juliet") == 0


def test_removing_an_account_deletes_its_messages_only(offline: OfflineStore) -> None:
    for n in range(3):
        offline.store(HOST, "juliet", message(n), STAMP, max_per_user=10)
    offline.store(HOST, "romeo", message(9), STAMP, max_per_user=10)
    assert offline.remove_account(HOST, "juliet") == 3
    assert offline.remove_account(HOST, "juliet") == 0
    assert offline.count(HOST, "romeo") == 1


def test_store_refuses_a_message_past_the_byte_quota(offline: OfflineStore) -> None:
    data = b"<message xmlns='jabber:client'><body>" + b"x" * 1000 + b"</body></message>"
    for _ in range(3):
        assert offline.store(HOST, "juliet", data, STAMP, max_per_user=100, max_bytes_per_user=3300)
    assert not offline.store(HOST, "juliet", data, STAMP, max_per_user=100, max_bytes_per_user=3300)
    assert offline.store(HOST, "romeo", data, STAMP, max_per_user=100, max_bytes_per_user=3300)
    assert offline.count(HOST, "juliet") == 3


def test_the_byte_quota_counts_what_is_held_now(offline: OfflineStore) -> None:
    quota = 2 * len(message(0))

    def store(n: int) -> bool:
        return offline.store(
            HOST, "juliet", message(n), STAMP, max_per_user=9, max_bytes_per_user=quota
        )

    assert store(0)
    assert store(1)
    assert not store(2)
    offline.pop_all(HOST, "juliet", limit=1)
    assert store(2)
    offline.remove_account(HOST, "juliet")
    assert store(3)
    assert store(4)
    assert not store(5)


def test_pop_all_takes_at_most_max_bytes_but_always_the_oldest(offline: OfflineStore) -> None:
    for n in range(5):
        offline.store(HOST, "juliet", message(n), STAMP, max_per_user=10)
    size = len(message(0))
    assert [s for s, _ in offline.pop_all(HOST, "juliet", max_bytes=2 * size)] == [
        message(0),
        message(1),
    ]
    assert [s for s, _ in offline.pop_all(HOST, "juliet", max_bytes=1)] == [message(2)]
    assert len(offline.pop_all(HOST, "juliet", limit=1, max_bytes=10 * size)) == 1


def test_put_back_rows_come_first_again_in_their_order(offline: OfflineStore) -> None:
    for n in range(4):
        offline.store(HOST, "juliet", message(n), f"s{n}", max_per_user=10)
    popped = offline.pop_all(HOST, "juliet", limit=3)
    offline.store(HOST, "juliet", message(9), "s9", max_per_user=10)
    offline.put_back(HOST, "juliet", popped[1:])
    offline.put_back(HOST, "juliet", [])
    assert offline.pop_all(HOST, "juliet") == [
        (message(1), "s1"),
        (message(2), "s2"),
        (message(3), "s3"),
        (message(9), "s9"),
    ]


def test_put_back_ignores_the_caps_and_counts_towards_them_after(offline: OfflineStore) -> None:
    for n in range(2):
        offline.store(HOST, "juliet", message(n), STAMP, max_per_user=2)
    popped = offline.pop_all(HOST, "juliet", limit=1)
    offline.store(HOST, "juliet", message(2), STAMP, max_per_user=2)
    offline.put_back(HOST, "juliet", popped)  # a third message: over the cap of 2
    assert offline.count(HOST, "juliet") == 3
    assert not offline.store(HOST, "juliet", message(3), STAMP, max_per_user=3)
    offline.put_back(HOST, "romeo", [(message(7), STAMP)])  # an account with nothing
    assert offline.pop_all(HOST, "romeo") == [(message(7), STAMP)]
    assert [s for s, _ in offline.pop_all(HOST, "juliet")] == [message(n) for n in range(3)]


def test_encoded_stanzas_round_trip_through_the_store(offline: OfflineStore) -> None:
    msg = Element(ns.CLIENT, "message", {"to": "juliet@example.com"}, [Element(ns.CLIENT, "body")])
    offline.store(HOST, "juliet", encode_stanza(msg), STAMP, max_per_user=1)
    ((data, stamp),) = offline.pop_all(HOST, "juliet")
    assert decode_stanza(data) == msg
    assert stamp == STAMP


def test_a_closed_store_raises_storage_error(offline: OfflineStore) -> None:
    offline.store(HOST, "juliet", message(1), STAMP, max_per_user=10)
    offline.close()
    offline.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        offline.count(HOST, "juliet")
    with pytest.raises(StorageError, match="closed"):
        offline.store(HOST, "juliet", message(2), STAMP, max_per_user=10)
    with pytest.raises(StorageError, match="closed"):
        offline.pop_all(HOST, "juliet")
    with pytest.raises(StorageError, match="closed"):
        offline.put_back(HOST, "juliet", [(message(3), STAMP)])
    with pytest.raises(StorageError, match="closed"):
        offline.remove_account(HOST, "juliet")


def test_threads_storing_near_the_cap_never_exceed_it(offline: OfflineStore) -> None:
    for n in range(90):
        offline.store(HOST, "juliet", message(n), STAMP, max_per_user=100)
    accepted = hammer([offline] * 4, per_thread=20, cap=100)
    assert sum(accepted) == 10
    assert offline.count(HOST, "juliet") == 100


def test_concurrent_pops_return_each_message_once(offline: OfflineStore) -> None:
    for n in range(200):
        offline.store(HOST, "juliet", message(n), STAMP, max_per_user=200)
    barrier = threading.Barrier(4)
    got: list[list[bytes]] = [[] for _ in range(4)]

    def work(index: int) -> None:
        barrier.wait()
        while batch := offline.pop_all(HOST, "juliet", limit=7):
            got[index].extend(s for s, _ in batch)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [s for batch in got for s in batch]
    assert sorted(everything) == sorted(message(n) for n in range(200))
    for batch in got:  # each thread saw its share oldest first
        assert batch == sorted(batch, key=lambda s: int(s.split(b'id="m')[1].split(b'"')[0]))
