"""Storage protocols: what the core needs from a backend, whatever the backend is.

Every store is a `Protocol` here, with a memory implementation and an SQLite or Redis
one (the live state a cluster shares is in Redis); each protocol has a contract suite
that every implementation runs (`tests/storage/test_*_contract.py`). The core names only these
protocols; `app.py` picks the implementations.

Two kinds of store live here:

* Durable stores (accounts, roster, offline messages, hand-off snapshots) have synchronous
  methods. The core calls them through a `RunBlocking` runner (trio's worker threads in
  production), so an implementation must be safe to call from several threads at once, and
  must not assume that the same thread calls it twice. `close()` ends a store; any later
  call raises `StorageError`.
* The stream management tables (`sm_session`, `stale_h`; DESIGN section 3, the seed's
  MongooseIM tables) and a cluster's adoptable sessions have async methods: the memory
  backend answers at once (each call is still a trio checkpoint), the SQLite backend
  runs its blocking work through a `RunBlocking` runner, the redis backend for clusters
  does network I/O. They are called from trio tasks directly, never from threads. Like
  any trio I/O, a call made inside a cancelled scope raises `trio.Cancelled`, so
  cleanup in a `finally` (removing the `sm_session` record, writing `stale_h` when a
  session ends) must run shielded (STYLE C5).

"Not found" is `None` (or `False`), never an exception; a backend that fails raises
`StorageError` from any method (the docstrings below list only the other exceptions, and
what a failure leaves behind). Times in SM records are whatever clock the caller passes
(the core passes `trio.current_time()`); the tables never read a clock.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self, TypeVar, TypeVarTuple, Unpack

from gateway.xmpp.element import Element
from gateway.xmpp.sasl import DEFAULT_ITERATIONS, HashName, ScramCredentials

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")


class RunBlocking(Protocol):
    """How a blocking call runs from trio: `await run(fn, *args)` returns `fn(*args)`.

    The same shape as `gateway.core.blocking.RunBlocking` (`in_threads`, or `inline` in
    tests with a mock clock), defined here because storage does not import the core
    (STYLE L2). Stores that do blocking work behind an async protocol (the SQLite SM
    tables) take one, as the core's services do for the sync stores.
    """

    def __call__(self, fn: Callable[[Unpack[_Ts]], _T], *args: *_Ts) -> Awaitable[_T]: ...


class ClosedOnExit(abc.ABC):
    """`with store:` closes the store at the end; implementations define `close()`."""

    @abc.abstractmethod
    def close(self) -> None:
        """End the store; later calls raise `StorageError`. Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- accounts --------------------------------------------------------------------------------


class CredentialStore(Protocol):
    """Accounts as login sees them: SCRAM credentials and existence.

    Usernames are JID localparts, already normalised by the caller; hosts are domainparts.
    """

    def get_credentials(
        self, host: str, username: str, hash_name: HashName
    ) -> ScramCredentials | None:
        """The stored SCRAM credentials for one hash, or None when there is no such account."""
        ...

    def user_exists(self, host: str, username: str) -> bool:
        """Whether the account exists."""
        ...


class AccountStore(CredentialStore, Protocol):
    """Accounts with their SCRAM-SHA-1 and SCRAM-SHA-256 credentials, never a password
    (`gateway.xmpp.sasl.derive_scram_credentials`): login's view plus administration
    (the `user` command).

    Passwords must be PRECIS OpaqueStrings; PBKDF2 runs outside any lock the store holds.
    """

    def add_user(
        self, host: str, username: str, password: str, *, iterations: int = DEFAULT_ITERATIONS
    ) -> None:
        """Create an account.

        Raises:
            StorageError: the account exists, or the backend failed.
            ValueError: the password is not a valid OpaqueString (e.g. empty).
        """
        ...

    def set_password(
        self, host: str, username: str, password: str, *, iterations: int = DEFAULT_ITERATIONS
    ) -> None:
        """Replace an account's credentials.

        Raises:
            StorageError: there is no such account, or the backend failed.
            ValueError: the password is not a valid OpaqueString.
        """
        ...

    def remove_user(self, host: str, username: str) -> bool:
        """Delete an account and its credentials; False when there was none."""
        ...

    def list_users(self, host: str | None = None) -> list[tuple[str, str]]:
        """`(host, username)` of every account (of one host when given), sorted."""
        ...

    def import_users(
        self,
        entries: Iterable[tuple[str, str, str]],
        *,
        iterations: int = DEFAULT_ITERATIONS,
        workers: int | None = None,
    ) -> int:
        """Create or update `(host, username, password)` accounts in one atomic step; when
        one account appears twice, the last password wins.

        Args:
            entries: `(host, username, password)`; usernames already normalised.
            iterations: PBKDF2 iteration count.
            workers: processes deriving keys (default one per CPU); 1 derives in this one.

        Returns:
            The number of distinct accounts created or updated.

        Raises:
            StorageError: the backend failed (nothing is written).
            ValueError: a password is not a valid OpaqueString (nothing is written; the
                message names the account, never the password).
        """
        ...

    def close(self) -> None:
        """End the store; later calls raise `StorageError`. Idempotent."""
        ...


# -- roster (RFC 6121 section 2) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RosterItem:
    """One contact in an account's roster.

    Attributes:
        contact: the contact's bare JID.
        name: the user's name for the contact, if any.
        subscription: "none", "to", "from" or "both" (RFC 6121 section 2.1.2.5).
        groups: the roster groups, in the user's order.
    """

    contact: str
    name: str | None = None
    subscription: str = "none"
    groups: tuple[str, ...] = ()


class RosterStore(Protocol):
    """Roster items per account (host, username), keyed by contact."""

    def items(self, host: str, username: str) -> list[RosterItem]:
        """The account's items, sorted by contact."""
        ...

    def upsert(self, host: str, username: str, item: RosterItem) -> RosterItem:
        """Add or update an item and return it as stored: name and groups are the item's,
        the subscription is the existing item's ("none" for a new one), whatever
        `item.subscription` says (a roster set never changes subscriptions)."""
        ...

    def remove(self, host: str, username: str, contact: str) -> bool:
        """Delete one item; False when there was none."""
        ...

    def remove_account(self, host: str, username: str) -> int:
        """Delete every item of the account; returns how many there were."""
        ...

    def close(self) -> None:
        """End the store; later calls raise `StorageError`. Idempotent."""
        ...


# -- XEP-0160 offline messages ---------------------------------------------------------------


class OfflineStore(Protocol):
    """Messages kept for an account while it has no available resource (XEP-0160).

    Stanzas are opaque serialized XML (see `gateway.storage.codec.encode_stanza`);
    `stamp` is the XEP-0203 delay timestamp the caller computed when the message arrived.
    """

    def store(
        self,
        host: str,
        username: str,
        stanza: bytes,
        stamp: str,
        *,
        max_per_user: int,
        max_bytes_per_user: int | None = None,
    ) -> bool:
        """Append one message; False (nothing written) when the account already holds
        `max_per_user` messages, or the message would take its stored bytes past
        `max_bytes_per_user`. The check and the write are one atomic step.

        Raises:
            ValueError: `max_per_user` is negative.
        """
        ...

    def pop_all(
        self, host: str, username: str, *, limit: int | None = None, max_bytes: int | None = None
    ) -> list[tuple[bytes, str]]:
        """Remove and return `(stanza, stamp)` pairs, oldest first (at most `limit`, and
        at most `max_bytes` of stanzas, but always the oldest one when there is one).

        What is returned is removed in the same atomic step, so two concurrent callers never
        both get one message.

        Raises:
            ValueError: `limit` is negative.
        """
        ...

    def put_back(self, host: str, username: str, rows: Sequence[tuple[bytes, str]]) -> None:
        """Return popped `(stanza, stamp)` pairs to the store, in order, ahead of the
        account's other messages (a flush that could not send them); no cap applies.

        Raises:
            StorageError: the backend failed (nothing is written).
        """
        ...

    def count(self, host: str, username: str) -> int:
        """How many messages the account holds."""
        ...

    def remove_account(self, host: str, username: str) -> int:
        """Delete every message of the account; returns how many there were."""
        ...

    def close(self) -> None:
        """End the store; later calls raise `StorageError`. Idempotent."""
        ...


# -- XEP-0198 stream management tables (DESIGN section 3, the seed) --------------------------


@dataclass(frozen=True, slots=True)
class SmSessionRecord:
    """A resumable session: one row of the seed's `sm_session` table.

    Attributes:
        smid: the SM id given to the client in `<enabled id=.../>` (>= 128 random bits).
        jid: the bare JID that enabled it; a resume by anyone else is refused as if the id
            were unknown.
        node: the id of the node that holds the session (`cluster.node`); a resume
            that reaches another node is told apart from an unknown id by it.
        created: when it was registered, in wall-clock seconds (UNIX time), so that
            every process reads it the same way.
        epoch: how many times the session moved (hand-offs, migrations); a fencing
            number: a record from an older epoch is stale.
    """

    smid: str
    jid: str
    node: str
    created: float
    epoch: int = 0


@dataclass(frozen=True, slots=True)
class StaleH:
    """The server's last h of a session that can no longer be resumed (XEP-0198 v1.6).

    Attributes:
        smid: the SM id of the ended session.
        h: its `counter_in` (stanzas received from the client, mod 2**32) when it ended.
        jid: the bare JID that owned it; `<failed h=.../>` is only given to that user.
        at: when the session ended, in wall-clock seconds (UNIX time); the GC removes
            records whose `at` is older than `geriatric` seconds.
    """

    smid: str
    h: int
    jid: str
    at: float


class SmSessionTable(Protocol):
    """SM id -> the resumable session behind it (the seed's `sm_session`)."""

    async def register(self, record: SmSessionRecord) -> None:
        """Add the record, replacing any record with the same `smid`."""
        ...

    async def lookup(self, smid: str) -> SmSessionRecord | None:
        """The record for `smid`, or None."""
        ...

    async def remove(self, smid: str) -> bool:
        """Delete the record for `smid`; False when there was none."""
        ...


class StaleHTable(Protocol):
    """SM id -> last h of an ended session (the seed's `stale_h`), swept by age."""

    async def put(self, entry: StaleH) -> int:
        """Add the entry, replacing any entry with the same `smid`.

        A backend may bound its size and drop its oldest entries to make room.

        Returns:
            How many other entries were dropped to make room (for the metrics).
        """
        ...

    async def get(self, smid: str) -> StaleH | None:
        """The entry for `smid`, or None (never stored, swept or dropped)."""
        ...

    async def sweep(self, older_than: float) -> int:
        """Delete every entry with `at < older_than`; returns how many were deleted.

        Callers put entries with non-decreasing `at`; an entry put out of that order may
        be kept until the entries put before it are swept (the memory table does that).
        If cancelled, what was deleted before the cancellation stays deleted.
        """
        ...


class AdoptableStore(Protocol):
    """Encoded session snapshots left by a node that drained, each waiting for the node
    its client resumes on (taken once, by smid) until it expires, and then for the sweep
    that ends it properly (`take_expired`: its messages are rerouted, not lost with it).

    Unlike the tables above, expiry is in wall-clock time (UNIX seconds), because a
    snapshot crosses processes: the store reads a clock of its own.
    Snapshots are opaque bytes (see `gateway.storage.snapshot`).
    """

    async def put(self, smid: str, snapshot: bytes, expires_at: float) -> None:
        """Store the snapshot until `expires_at` (wall-clock UNIX seconds) and past it
        until `take_expired` takes it, replacing any with the same smid.

        Raises:
            StorageError: the backend failed; the put may or may not have happened.
        """
        ...

    async def take(self, smid: str) -> bytes | None:
        """Remove and return the snapshot of `smid` in one atomic step (two nodes never
        both get it); None when there is none or it expired (then it stays).

        Raises:
            StorageError: the backend failed; the snapshot may be gone all the same (a
                network backend that lost the answer), and is then lost.
        """
        ...

    async def take_expired(self, limit: int) -> list[tuple[str, bytes]]:
        """Remove and return up to `limit` expired snapshots as (smid, snapshot), each in
        one atomic step (two callers never both get one).

        Raises:
            StorageError: as `take`.
        """
        ...


# -- sessions handed off at shutdown (DESIGN sections 5 and 6) -------------------------------


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    """A resumable session taken off its node: enough to park it again elsewhere.

    A draining node writes one per resumable session (live or parked) instead of ending it;
    the node that takes the snapshot (the same node after a restart, or another node of a
    cluster) parks the session again until the client resumes it or `expires_at` passes,
    so the client's `<resume/>` succeeds and nothing it was owed is lost.

    Attributes:
        smid: the SM id the client will resume.
        full_jid: the bound resource.
        expires_at: wall-clock time (UNIX seconds) when the session may no longer be
            resumed: when its transport was lost (or the hand-off, for a live session)
            plus the granted `max`. Wall-clock, because it crosses processes.
        max: the granted resumption time in seconds (`<enabled max/>`).
        counter_in: the server's h (stanzas received from the client).
        counter_out: the client's h from its last ack.
        buffer: the unacked stanzas, oldest first.
        priority, presence, interested, directed: the session's IM state (DESIGN 2).
        flush_pending: offline messages are to be flushed to it after the resume.
        epoch: how many times this session was handed off (for logs now; the cluster's
            fencing will compare it).
        peer: the address of its last client (for log lines).
    """

    smid: str
    full_jid: str
    expires_at: float
    max: int
    counter_in: int
    counter_out: int
    buffer: tuple[Element, ...]
    priority: int = 0
    presence: Element | None = None
    interested: bool = False
    directed: tuple[str, ...] = ()
    flush_pending: bool = False
    epoch: int = 1
    peer: str = ""


class HandoffStore(Protocol):
    """Encoded `SessionSnapshot`s waiting to be taken (see `gateway.storage.snapshot`)."""

    def put_many(self, snapshots: Sequence[tuple[str, bytes]]) -> None:
        """Store `(smid, encoded snapshot)` pairs in one atomic step, replacing any with
        the same smid.

        Raises:
            StorageError: the backend failed; nothing was written.
        """
        ...

    def take_all(self) -> list[bytes]:
        """Remove and return every stored snapshot, oldest first, in one atomic step: two
        takers never both get one snapshot (only one node serves a session).

        Raises:
            StorageError: the backend failed; nothing was removed.
        """
        ...

    def count(self) -> int:
        """How many snapshots are stored."""
        ...

    def close(self) -> None:
        """End the store; later calls raise `StorageError`. Idempotent."""
        ...
