"""The in-memory durable stores beyond their contracts: no password is kept, and an
account emptied of its data leaves nothing behind (memory follows what is stored)."""

from __future__ import annotations

import gc

from gateway.storage.accounts_memory import MemoryAccountStore
from gateway.storage.base import RosterItem
from gateway.storage.offline_memory import MemoryOfflineStore
from gateway.storage.roster_memory import MemoryRosterStore
from tests.storage.helpers import FAST, HOST, STAMP, message


def _reachable(root: object) -> list[object]:
    """Every object reachable from `root` through references the collector knows."""
    seen: dict[int, object] = {}
    todo = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen[id(obj)] = obj
        todo.extend(gc.get_referents(obj))
    return list(seen.values())


def test_the_password_is_never_kept() -> None:
    with MemoryAccountStore() as store:
        store.add_user(HOST, "juliet", "UniquePasswordMarker", iterations=FAST)
        store.set_password(HOST, "juliet", "OtherPasswordMarker", iterations=FAST)
        store.import_users([(HOST, "romeo", "ThirdPasswordMarker")], iterations=FAST, workers=1)
        texts = [o for o in _reachable(store) if isinstance(o, str | bytes)]
        assert "juliet" in texts
        assert not [t for t in texts if "PasswordMarker" in str(t)]


def test_an_emptied_mailbox_leaves_nothing_behind() -> None:
    with MemoryOfflineStore() as store:
        for n in range(3):
            store.store(HOST, "juliet", message(n), STAMP, max_per_user=10)
        store.store(HOST, "romeo", message(9), STAMP, max_per_user=10)
        store.pop_all(HOST, "juliet", limit=2)
        store.pop_all(HOST, "juliet", limit=2)
        store.remove_account(HOST, "romeo")
        store.put_back(HOST, "nurse", [])
        assert store._mailboxes == {}


def test_an_emptied_roster_leaves_nothing_behind() -> None:
    with MemoryRosterStore() as store:
        store.upsert(HOST, "juliet", RosterItem("romeo@example.net"))
        store.upsert(HOST, "romeo", RosterItem("juliet@example.com"))
        assert store.remove(HOST, "juliet", "romeo@example.net")
        assert store.remove_account(HOST, "romeo") == 1
        assert not store.remove(HOST, "nurse", "juliet@example.com")
        assert store._rosters == {}
