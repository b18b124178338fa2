"""The `RosterStore` contract, run by every implementation: items per account, sorted by
contact; a roster set keeps the subscription; removal; closing; thread safety."""

from __future__ import annotations

import threading

import pytest

from gateway.errors import StorageError
from gateway.storage.base import RosterItem, RosterStore
from tests.storage.helpers import HOST


def test_an_account_without_items_has_an_empty_roster(roster: RosterStore) -> None:
    assert roster.items(HOST, "juliet") == []


def test_items_come_back_as_stored_sorted_by_contact(roster: RosterStore) -> None:
    nurse = RosterItem("nurse@example.com", None, "none", ())
    romeo = RosterItem("romeo@example.net", "Romeo", "none", ("Friends", "Montague", "Ä ü"))
    assert roster.upsert(HOST, "juliet", romeo) == romeo
    assert roster.upsert(HOST, "juliet", nurse) == nurse
    assert roster.items(HOST, "juliet") == [nurse, romeo]


def test_accounts_are_keyed_by_host_and_username(roster: RosterStore) -> None:
    roster.upsert(HOST, "juliet", RosterItem("romeo@example.net"))
    roster.upsert("example.net", "juliet", RosterItem("tybalt@example.net"))
    roster.upsert(HOST, "nurse", RosterItem("juliet@example.com"))
    assert [i.contact for i in roster.items(HOST, "juliet")] == ["romeo@example.net"]
    assert [i.contact for i in roster.items("example.net", "juliet")] == ["tybalt@example.net"]


def test_a_new_item_has_no_subscription_whatever_the_set_says(roster: RosterStore) -> None:
    stored = roster.upsert(HOST, "juliet", RosterItem("romeo@example.net", "R", "both", ("G",)))
    assert stored == RosterItem("romeo@example.net", "R", "none", ("G",))
    assert roster.items(HOST, "juliet") == [stored]


def test_updating_an_item_replaces_name_and_groups_and_keeps_the_subscription(
    roster: RosterStore,
) -> None:
    roster.upsert(HOST, "juliet", RosterItem("romeo@example.net", "Romeo", "none", ("A", "B")))
    updated = roster.upsert(HOST, "juliet", RosterItem("romeo@example.net", None, "to", ("C",)))
    assert updated == RosterItem("romeo@example.net", None, "none", ("C",))
    assert roster.items(HOST, "juliet") == [updated]


def test_remove_deletes_one_item(roster: RosterStore) -> None:
    roster.upsert(HOST, "juliet", RosterItem("romeo@example.net"))
    roster.upsert(HOST, "juliet", RosterItem("nurse@example.com"))
    assert roster.remove(HOST, "juliet", "romeo@example.net")
    assert not roster.remove(HOST, "juliet", "romeo@example.net")
    assert not roster.remove(HOST, "nobody", "romeo@example.net")
    assert [i.contact for i in roster.items(HOST, "juliet")] == ["nurse@example.com"]


def test_removing_an_account_deletes_its_items_only(roster: RosterStore) -> None:
    for contact in ("a@example.com", "b@example.com", "c@example.com"):
        roster.upsert(HOST, "juliet", RosterItem(contact))
    roster.upsert(HOST, "romeo", RosterItem("juliet@example.com"))
    assert roster.remove_account(HOST, "juliet") == 3
    assert roster.remove_account(HOST, "juliet") == 0
    assert roster.items(HOST, "juliet") == []
    assert len(roster.items(HOST, "romeo")) == 1


def test_a_closed_store_raises_storage_error(roster: RosterStore) -> None:
    roster.upsert(HOST, "juliet", RosterItem("romeo@example.net"))
    roster.close()
    roster.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        roster.items(HOST, "juliet")
    with pytest.raises(StorageError, match="closed"):
        roster.upsert(HOST, "juliet", RosterItem("nurse@example.com"))
    with pytest.raises(StorageError, match="closed"):
        roster.remove(HOST, "juliet", "romeo@example.net")
    with pytest.raises(StorageError, match="closed"):
        roster.remove_account(HOST, "juliet")


def test_threads_editing_one_roster_at_once_lose_no_item(roster: RosterStore) -> None:
    barrier = threading.Barrier(4)
    missing: list[str] = []

    def work(index: int) -> None:
        barrier.wait()
        for n in range(50):
            roster.upsert(HOST, "juliet", RosterItem(f"c{index}-{n:02d}@example.com"))
            if n % 2 and not roster.remove(HOST, "juliet", f"c{index}-{n - 1:02d}@example.com"):
                missing.append(f"c{index}-{n - 1:02d}")
            roster.items(HOST, "juliet")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert missing == []
    contacts = [item.contact for item in roster.items(HOST, "juliet")]
    assert contacts == sorted(
        f"c{i}-{n:02d}@example.com" for i in range(4) for n in range(1, 50, 2)
    )
