"""Every storage implementation, one fixture per protocol, for the contract suites.

Each `test_*_contract.py` test takes one of these fixtures and so runs once per
implementation (test ids `[memory]`, `[sqlite]`, and `[redis]` for the SM tables). A new
backend is one more entry in the table of each protocol it implements; its opener sets it
up fresh for one test and tears it down after (and may `pytest.skip` when its server is not
running).

Openers of the durable stores take a fresh directory (the SQLite stores open a file there)
and return a context manager (the stores are their own); the tables are typed, so mypy
checks that every implementation satisfies its protocol. The SM tables' openers are async
context managers (a network backend connects asynchronously) and take a `Scratch`: the
directory, and keys of their own in the test's Redis database, which starts only when an
opener asks for its URL (so the memory and SQLite tests never start Redis). The `stale_h`
opener takes the size bound, which every implementation has. The SQLite SM tables run their
blocking calls on trio's worker threads, as in production.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import pytest

from gateway.core.blocking import in_threads
from gateway.storage.accounts_memory import MemoryAccountStore
from gateway.storage.adoptable_memory import MemoryAdoptableStore
from gateway.storage.adoptable_redis import RedisAdoptableStore
from gateway.storage.base import (
    AccountStore,
    AdoptableStore,
    HandoffStore,
    OfflineStore,
    RosterStore,
    SmSessionTable,
    StaleHTable,
)
from gateway.storage.handoff_memory import MemoryHandoffStore
from gateway.storage.handoff_sqlite import SqliteHandoffStore
from gateway.storage.memory import MemorySmSessionTable, MemoryStaleHTable
from gateway.storage.offline_memory import MemoryOfflineStore
from gateway.storage.offline_sqlite import SqliteOfflineStore
from gateway.storage.redis_client import Redis, open_redis
from gateway.storage.roster_memory import MemoryRosterStore
from gateway.storage.roster_sqlite import SqliteRosterStore
from gateway.storage.sm_redis import RedisSmSessionTable, RedisStaleHTable
from gateway.storage.sm_sqlite import SqliteSmSessionTable, SqliteStaleHTable
from gateway.storage.sqlite import SqliteAccountStore
from tests.storage.helpers import OpenStaleH

#: The database file of the SQLite stores, in the opener's directory.
DATABASE: Final = "gateway.sqlite"
#: Worker threads the SQLite SM tables may use at once.
THREADS: Final = 4

S = TypeVar("S")
Opener = Callable[[Path], AbstractContextManager[S]]
AsyncOpener = Callable[..., AbstractAsyncContextManager[S]]


def params(openers: Mapping[str, object]) -> list[Any]:
    """One fixture parameter per implementation, with its name as the test id."""
    return [pytest.param(opener, id=name) for name, opener in openers.items()]


# -- sync (durable) stores -------------------------------------------------------------------

ACCOUNT_STORES: Final[dict[str, Opener[AccountStore]]] = {
    "memory": lambda _: MemoryAccountStore(),
    "sqlite": lambda directory: SqliteAccountStore(directory / DATABASE),
}
ROSTER_STORES: Final[dict[str, Opener[RosterStore]]] = {
    "memory": lambda _: MemoryRosterStore(),
    "sqlite": lambda directory: SqliteRosterStore(directory / DATABASE),
}
OFFLINE_STORES: Final[dict[str, Opener[OfflineStore]]] = {
    "memory": lambda _: MemoryOfflineStore(),
    "sqlite": lambda directory: SqliteOfflineStore(directory / DATABASE),
}
HANDOFF_STORES: Final[dict[str, Opener[HandoffStore]]] = {
    "memory": lambda _: MemoryHandoffStore(),
    "sqlite": lambda directory: SqliteHandoffStore(directory / DATABASE),
}


@pytest.fixture(params=params(ACCOUNT_STORES))
def accounts(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AccountStore]:
    opener: Opener[AccountStore] = request.param
    with opener(tmp_path) as store:
        yield store


@pytest.fixture(params=params(ROSTER_STORES))
def roster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RosterStore]:
    opener: Opener[RosterStore] = request.param
    with opener(tmp_path) as store:
        yield store


@pytest.fixture(params=params(OFFLINE_STORES))
def offline(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OfflineStore]:
    opener: Opener[OfflineStore] = request.param
    with opener(tmp_path) as store:
        yield store


@pytest.fixture(params=params(HANDOFF_STORES))
def handoff(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HandoffStore]:
    opener: Opener[HandoffStore] = request.param
    with opener(tmp_path) as store:
        yield store


# -- async SM tables -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scratch:
    """Where an SM table opener keeps one fresh table: a directory of its own, or keys of
    its own (`prefix`) in the test's Redis database."""

    directory: Path
    prefix: str
    request: pytest.FixtureRequest

    def redis_url(self) -> str:
        """The test's empty Redis database; the server starts on the first call."""
        url: str = self.request.getfixturevalue("redis_url")
        return url


def scratch(request: pytest.FixtureRequest, tmp_path: Path, name: str) -> Scratch:
    """A new directory `name` in tmp_path, and the key prefix `name:`."""
    directory = tmp_path / name
    directory.mkdir()
    return Scratch(directory, f"{name}:", request)


@contextlib.asynccontextmanager
async def _redis(where: Scratch) -> AsyncIterator[Redis]:
    """`open_redis` on the test's database (its errors come out as raised)."""
    async with open_redis(where.redis_url()) as client:
        yield client


@contextlib.asynccontextmanager
async def _memory_sm_session(_: Scratch) -> AsyncIterator[SmSessionTable]:
    yield MemorySmSessionTable()


@contextlib.asynccontextmanager
async def _sqlite_sm_session(where: Scratch) -> AsyncIterator[SmSessionTable]:
    with SqliteSmSessionTable(where.directory / DATABASE, in_threads(THREADS)) as table:
        yield table


@contextlib.asynccontextmanager
async def _redis_sm_session(where: Scratch) -> AsyncIterator[SmSessionTable]:
    async with _redis(where) as client:
        yield RedisSmSessionTable(client, prefix=where.prefix)


@contextlib.asynccontextmanager
async def _memory_stale_h(_: Scratch, **options: int) -> AsyncIterator[StaleHTable]:
    yield MemoryStaleHTable(**options)


@contextlib.asynccontextmanager
async def _sqlite_stale_h(where: Scratch, **options: int) -> AsyncIterator[StaleHTable]:
    with SqliteStaleHTable(where.directory / DATABASE, in_threads(THREADS), **options) as table:
        yield table


@contextlib.asynccontextmanager
async def _redis_stale_h(where: Scratch, **options: int) -> AsyncIterator[StaleHTable]:
    async with _redis(where) as client:
        yield RedisStaleHTable(client, prefix=where.prefix, **options)


SM_SESSION_TABLES: Final[dict[str, AsyncOpener[SmSessionTable]]] = {
    "memory": _memory_sm_session,
    "sqlite": _sqlite_sm_session,
    "redis": _redis_sm_session,
}
STALE_H_TABLES: Final[dict[str, AsyncOpener[StaleHTable]]] = {
    "memory": _memory_stale_h,
    "sqlite": _sqlite_stale_h,
    "redis": _redis_stale_h,
}


@pytest.fixture(params=params(SM_SESSION_TABLES))
async def sm_sessions(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[SmSessionTable]:
    opener: AsyncOpener[SmSessionTable] = request.param
    async with opener(scratch(request, tmp_path, "sm_session")) as table:
        yield table


@pytest.fixture(params=params(STALE_H_TABLES))
def open_stale_h(request: pytest.FixtureRequest, tmp_path: Path) -> OpenStaleH:
    """`async with open_stale_h(max_entries=N) as table:` (`max_entries` optional); each
    call opens a fresh table (a new file for SQLite, new keys for Redis)."""
    opener: AsyncOpener[StaleHTable] = request.param
    opened = 0

    def open_table(**options: int) -> AbstractAsyncContextManager[StaleHTable]:
        nonlocal opened
        opened += 1
        return opener(scratch(request, tmp_path, f"stale_h{opened}"), **options)

    return open_table


@pytest.fixture
async def stale_h(open_stale_h: OpenStaleH) -> AsyncIterator[StaleHTable]:
    async with open_stale_h() as table:
        yield table


# -- sessions left for adoption (async, like the SM tables) ----------------------------------


@contextlib.asynccontextmanager
async def _memory_adoptable(_: Scratch) -> AsyncIterator[AdoptableStore]:
    yield MemoryAdoptableStore()


@contextlib.asynccontextmanager
async def _redis_adoptable(where: Scratch) -> AsyncIterator[AdoptableStore]:
    async with _redis(where) as client:
        yield RedisAdoptableStore(client, prefix=where.prefix)


ADOPTABLE_STORES: Final[dict[str, AsyncOpener[AdoptableStore]]] = {
    "memory": _memory_adoptable,
    "redis": _redis_adoptable,
}


@pytest.fixture(params=params(ADOPTABLE_STORES))
async def adoptable(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[AdoptableStore]:
    """A fresh store on the wall clock (`time.time`), as in production."""
    opener: AsyncOpener[AdoptableStore] = request.param
    async with opener(scratch(request, tmp_path, "adoptable")) as store:
        yield store
