"""Helpers shared by the storage suites (contracts and per-implementation files)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Final

from gateway.storage.base import CredentialStore, OfflineStore, StaleHTable
from gateway.xmpp.sasl import ScramClient, ScramServer

#: PBKDF2 at 4096 iterations costs ~1.6 ms; tests that do not check the count use fewer.
FAST: Final = 8
HOST: Final = "example.com"
STAMP: Final = "2026-11-22T07:00:00.123Z"

#: The `open_stale_h` fixture: `async with open_stale_h(max_entries=N) as table:`.
OpenStaleH = Callable[..., AbstractAsyncContextManager[StaleHTable]]


def scram_login(store: CredentialStore, host: str, username: str, password: str) -> None:
    """A SCRAM-SHA-1 and a SCRAM-SHA-256 login against the store's credentials; raises
    when either fails."""
    for hash_name in ("sha1", "sha256"):
        client = ScramClient(hash_name, username, password)
        server = ScramServer(hash_name)
        user = server.client_first(client.first())
        challenge = server.server_first(store.get_credentials(host, user, hash_name))
        client.verify(server.client_final(client.final(challenge)))


def message(n: int) -> bytes:
    """A stored offline message, distinct per `n`."""
    return f'<message xmlns="jabber:client" id="m{n}"><body>{n}</body></message>'.encode()


def snap(n: int) -> tuple[str, bytes]:
    """An `(smid, encoded snapshot)` pair; opaque bytes, NUL and non-UTF-8 included."""
    return (f"sm{n}", b"snapshot\x00\xff" + str(n).encode())


def hammer(stores: Sequence[OfflineStore], per_thread: int, cap: int) -> list[int]:
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
