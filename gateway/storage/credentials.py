"""SCRAM credentials for new passwords, the same for every account backend.

An account store keeps, per account and per hash in `HASHES`, what RFC 5802 section 3 has
the server store (salt, iteration count, StoredKey, ServerKey), never the password; these
helpers derive them (`gateway.xmpp.sasl.derive_scram_credentials`, one PBKDF2 each). Stores
call them before taking any lock: PBKDF2 costs ~1.6 ms at 4096 iterations.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterable
from typing import Final, get_args

from gateway.xmpp.sasl import HashName, ScramCredentials, derive_scram_credentials

#: Hashes stored for every account (the SCRAM mechanisms we offer).
HASHES: Final[tuple[HashName, ...]] = get_args(HashName)
#: `derive_accounts` derives in this process below this many accounts (a pool costs ~0.1 s).
_POOL_THRESHOLD: Final = 64

#: `(host, username, credentials)`, the credentials in the order of `HASHES`.
DerivedAccount = tuple[str, str, tuple[ScramCredentials, ...]]


def derive_credentials(password: str, iterations: int) -> tuple[ScramCredentials, ...]:
    """The credentials to store for `password`, one per hash in `HASHES` (fresh salts).

    Raises:
        ValueError: the password is not a valid PRECIS OpaqueString (e.g. empty).
    """
    return tuple(
        derive_scram_credentials(password, hash_name, iterations=iterations) for hash_name in HASHES
    )


def latest_passwords(entries: Iterable[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """`(host, username, password)` entries with one per account: the last password given
    for it, in the order of those last occurrences."""
    latest: dict[tuple[str, str], str] = {}
    for host, username, password in entries:
        latest.pop((host, username), None)  # keep the order of the last occurrence
        latest[(host, username)] = password
    return [(host, username, password) for (host, username), password in latest.items()]


def derive_accounts(
    work: list[tuple[str, str, str]], iterations: int, workers: int
) -> list[DerivedAccount]:
    """Credentials for many accounts, in a process pool of `workers` when there are many.

    PBKDF2 dominates a bulk import (two derivations per account), so it runs in chunks in
    other processes; 1 worker, or few accounts, derive in this process.

    Raises:
        ValueError: a password is not a valid OpaqueString; the message names the account,
            never the password.
    """
    if workers <= 1 or len(work) < _POOL_THRESHOLD:
        return _derive_chunk((work, iterations))
    # Several chunks per worker keep both busy to the end; chunks of at most 256 accounts
    # (~1 s of PBKDF2) keep the pickling overhead negligible.
    size = max(1, min(256, len(work) // (workers * 8)))
    jobs = [(work[i : i + size], iterations) for i in range(0, len(work), size)]
    # "spawn"-like start methods avoid fork()ing a process that may have threads (trio's
    # worker threads, a store's lock); forkserver amortises the start-up.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        derived: list[DerivedAccount] = []
        for chunk in pool.imap(_derive_chunk, jobs):
            derived.extend(chunk)
    return derived


def _derive_chunk(job: tuple[list[tuple[str, str, str]], int]) -> list[DerivedAccount]:
    """Pool worker: credentials for a chunk of (host, username, password)."""
    chunk, iterations = job
    derived: list[DerivedAccount] = []
    for host, username, password in chunk:
        try:
            derived.append((host, username, derive_credentials(password, iterations)))
        except ValueError as exc:
            # Name the account, never the password (STYLE G4); the message of `exc` has
            # no password characters, and no chained cause is kept.
            raise ValueError(f"account {username}@{host}: {exc}") from None
    return derived
