"""Offline messages in SQLite: order, the per-user cap under concurrency, atomic pops, and
the stanza encoding round trip."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.errors import StorageError
from gateway.storage.base import OfflineStore
from gateway.storage.codec import decode_stanza, encode_stanza
from gateway.storage.offline_sqlite import SqliteOfflineStore
from gateway.storage.roster_sqlite import SqliteRosterStore
from gateway.storage.sqlite import SqliteAccountStore
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import XML_LANG, Element

HOST = "example.com"
STAMP = "2026-11-22T07:00:00.123Z"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "gateway.sqlite"


@pytest.fixture
def store(path: Path) -> Iterator[SqliteOfflineStore]:
    with SqliteOfflineStore(path) as store:
        yield store


def message(n: int) -> bytes:
    return f'<message xmlns="jabber:client" id="m{n}"><body>{n}</body></message>'.encode()


def test_offline_store_shares_the_file_and_versions_its_schema(path: Path) -> None:
    SqliteAccountStore(path).close()
    SqliteRosterStore(path).close()
    SqliteOfflineStore(path).close()
    SqliteOfflineStore(path).close()  # opening again keeps the schema
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT component, version FROM schema_version ORDER BY 1").fetchall()
    db.close()
    assert rows == [("accounts", 1), ("offline", 1), ("roster", 1)]


def test_messages_pop_oldest_first_with_their_stamps(store: SqliteOfflineStore) -> None:
    checked: OfflineStore = store
    for n in range(5):
        assert checked.store(HOST, "juliet", message(n), f"stamp{n}", max_per_user=10)
    assert checked.store(HOST, "romeo", message(99), STAMP, max_per_user=10)
    assert checked.count(HOST, "juliet") == 5
    assert checked.pop_all(HOST, "juliet") == [(message(n), f"stamp{n}") for n in range(5)]
    assert checked.count(HOST, "juliet") == 0
    assert checked.count(HOST, "romeo") == 1


def test_accounts_are_keyed_by_host_and_username(store: SqliteOfflineStore) -> None:
    store.store(HOST, "juliet", message(1), STAMP, max_per_user=10)
    store.store("example.net", "juliet", message(2), STAMP, max_per_user=10)
    assert store.pop_all("example.net", "juliet") == [(message(2), STAMP)]
    assert store.pop_all(HOST, "nobody") == []
    assert store.count(HOST, "juliet") == 1


def test_popping_twice_gives_nothing_the_second_time(store: SqliteOfflineStore) -> None:
    store.store(HOST, "juliet", message(1), STAMP, max_per_user=10)
    assert len(store.pop_all(HOST, "juliet")) == 1
    assert store.pop_all(HOST, "juliet") == []


def test_pop_with_a_limit_takes_the_oldest_and_keeps_the_rest(store: SqliteOfflineStore) -> None:
    for n in range(5):
        store.store(HOST, "juliet", message(n), STAMP, max_per_user=10)
    assert [s for s, _ in store.pop_all(HOST, "juliet", limit=2)] == [message(0), message(1)]
    assert store.pop_all(HOST, "juliet", limit=0) == []
    store.store(HOST, "juliet", message(5), STAMP, max_per_user=10)
    assert [s for s, _ in store.pop_all(HOST, "juliet")] == [message(n) for n in range(2, 6)]


def test_a_full_mailbox_refuses_and_writes_nothing(store: SqliteOfflineStore) -> None:
    for n in range(3):
        assert store.store(HOST, "juliet", message(n), STAMP, max_per_user=3)
    assert not store.store(HOST, "juliet", message(3), STAMP, max_per_user=3)
    assert store.count(HOST, "juliet") == 3
    assert not store.store(HOST, "romeo", message(0), STAMP, max_per_user=0)
    assert store.count(HOST, "romeo") == 0
    store.pop_all(HOST, "juliet", limit=1)
    assert store.store(HOST, "juliet", message(4), STAMP, max_per_user=3)


def test_negative_cap_or_limit_is_a_value_error(store: SqliteOfflineStore) -> None:
    with pytest.raises(ValueError, match="max_per_user"):
        store.store(HOST, "juliet", message(0), STAMP, max_per_user=-1)
    with pytest.raises(ValueError, match="limit"):
        store.pop_all(HOST, "juliet", limit=-1)


def test_removing_an_account_deletes_its_messages_only(store: SqliteOfflineStore) -> None:
    for n in range(3):
        store.store(HOST, "juliet", message(n), STAMP, max_per_user=10)
    store.store(HOST, "romeo", message(9), STAMP, max_per_user=10)
    assert store.remove_account(HOST, "juliet") == 3
    assert store.remove_account(HOST, "juliet") == 0
    assert store.count(HOST, "romeo") == 1


def test_a_closed_store_raises_storage_error(path: Path) -> None:
    store = SqliteOfflineStore(path)
    store.close()
    with pytest.raises(StorageError, match="closed"):
        store.count(HOST, "juliet")


def _hammer(stores: list[SqliteOfflineStore], per_thread: int, cap: int) -> list[int]:
    """Threads storing for one user at once; returns how many stores each saw succeed."""
    barrier = threading.Barrier(len(stores))
    accepted = [0] * len(stores)

    def work(index: int) -> None:
        barrier.wait()
        for n in range(per_thread):
            if stores[index].store(HOST, "juliet", message(n), STAMP, max_per_user=cap):
                accepted[index] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return accepted


def test_threads_storing_near_the_cap_never_exceed_it(store: SqliteOfflineStore) -> None:
    for n in range(90):
        store.store(HOST, "juliet", message(n), STAMP, max_per_user=100)
    accepted = _hammer([store] * 4, per_thread=20, cap=100)
    assert sum(accepted) == 10
    assert store.count(HOST, "juliet") == 100


def test_two_connections_storing_near_the_cap_never_exceed_it(path: Path) -> None:
    # Separate store objects: separate connections, serialized only by SQLite's write lock.
    stores = [SqliteOfflineStore(path) for _ in range(2)]
    try:
        accepted = _hammer(stores, per_thread=30, cap=40)
        assert sum(accepted) == 40
        assert stores[0].count(HOST, "juliet") == 40
    finally:
        for s in stores:
            s.close()


def test_concurrent_pops_return_each_message_once(store: SqliteOfflineStore) -> None:
    for n in range(200):
        store.store(HOST, "juliet", message(n), STAMP, max_per_user=200)
    barrier = threading.Barrier(4)
    got: list[list[bytes]] = [[] for _ in range(4)]

    def work(index: int) -> None:
        barrier.wait()
        while batch := store.pop_all(HOST, "juliet", limit=7):
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


# -- encode_stanza / decode_stanza ----------------------------------------------------------


def test_a_message_survives_encoding_with_namespaces_lang_and_special_characters() -> None:
    xhtml = Element(
        "http://jabber.org/protocol/xhtml-im",
        "html",
        children=[
            Element(
                "http://www.w3.org/1999/xhtml",
                "body",
                {XML_LANG: "fr"},
                ["bold ", Element("http://www.w3.org/1999/xhtml", "b", children=["<&>"]), " end"],
            )
        ],
    )
    msg = Element(
        ns.CLIENT,
        "message",
        {
            "from": "romeo@example.net/orchard",
            "to": "juliet@example.com",
            "type": "chat",
            "id": "a'b\"c",
            XML_LANG: "en",
            "{urn:example:attrs}flag": "x\ty\nz",
        },
        [
            Element(ns.CLIENT, "body", {XML_LANG: "de"}, ['Grüße & <tags> ]]> "q" \r\n 🎉']),
            Element(ns.CLIENT, "thread", children=["t1"]),
            xhtml,
            Element(ns.DELAY, "delay", {"from": HOST, "stamp": STAMP}, ["Offline Storage"]),
            Element("", "unqualified"),
        ],
    )
    data = encode_stanza(msg)
    decoded = decode_stanza(data)
    assert decoded == msg
    assert decoded.find_text(ns.CLIENT, "body") == 'Grüße & <tags> ]]> "q" \r\n 🎉'
    assert decoded.get(XML_LANG) == "en"


def test_encoded_stanzas_round_trip_through_the_store(store: SqliteOfflineStore) -> None:
    msg = Element(ns.CLIENT, "message", {"to": "juliet@example.com"}, [Element(ns.CLIENT, "body")])
    store.store(HOST, "juliet", encode_stanza(msg), STAMP, max_per_user=1)
    ((data, stamp),) = store.pop_all(HOST, "juliet")
    assert decode_stanza(data) == msg
    assert stamp == STAMP


def test_a_deeply_nested_stanza_decodes() -> None:
    inner: Element = Element("urn:example:deep", "x")
    for _ in range(100):
        inner = Element("urn:example:deep", "x", children=[inner])
    msg = Element(ns.CLIENT, "message", children=[inner])
    assert decode_stanza(encode_stanza(msg)) == msg


def test_encoding_refuses_characters_xml_cannot_carry() -> None:
    with pytest.raises(ValueError, match="not allowed"):
        encode_stanza(Element(ns.CLIENT, "message", children=["\x00"]))


@pytest.mark.parametrize(
    "data",
    [b"", b"<message", b"<a/><b/>", b"text", b"<a><!-- c --></a>", b"</stream:stream><a/>"],
)
def test_damaged_stored_stanzas_are_storage_errors(data: bytes) -> None:
    with pytest.raises(StorageError):
        decode_stanza(data)


def test_store_refuses_a_message_past_the_byte_quota(store: SqliteOfflineStore) -> None:
    data = b"<message xmlns='jabber:client'><body>" + b"x" * 1000 + b"</body></message>"
    for _ in range(3):
        assert store.store(HOST, "juliet", data, STAMP, max_per_user=100, max_bytes_per_user=3300)
    assert not store.store(HOST, "juliet", data, STAMP, max_per_user=100, max_bytes_per_user=3300)
    assert store.store(HOST, "romeo", data, STAMP, max_per_user=100, max_bytes_per_user=3300)
    assert store.count(HOST, "juliet") == 3


def test_pop_all_takes_at_most_max_bytes_but_always_the_oldest(store: SqliteOfflineStore) -> None:
    for n in range(5):
        store.store(HOST, "juliet", message(n), STAMP, max_per_user=10)
    size = len(message(0))
    assert [s for s, _ in store.pop_all(HOST, "juliet", max_bytes=2 * size)] == [
        message(0),
        message(1),
    ]
    assert [s for s, _ in store.pop_all(HOST, "juliet", max_bytes=1)] == [message(2)]
    assert len(store.pop_all(HOST, "juliet", limit=1, max_bytes=10 * size)) == 1


def test_put_back_rows_come_first_again_in_their_order(store: SqliteOfflineStore) -> None:
    for n in range(4):
        store.store(HOST, "juliet", message(n), f"s{n}", max_per_user=10)
    popped = store.pop_all(HOST, "juliet", limit=3)
    store.store(HOST, "juliet", message(9), "s9", max_per_user=10)
    store.put_back(HOST, "juliet", popped[1:])
    store.put_back(HOST, "juliet", [])
    assert store.pop_all(HOST, "juliet") == [
        (message(1), "s1"),
        (message(2), "s2"),
        (message(3), "s3"),
        (message(9), "s9"),
    ]
