"""Throttling of SASL password guessing per client address and per account; sans-I/O.

Theory of operation
-------------------
The connection code asks `refusal(ip, account, now)` before running SASL for `account` (the
bare JID) and reports the outcome with `failed()` or `succeeded()`. Time is an argument
(STYLE S3); nothing here reads a clock, logs or awaits. A failure at time `s` is *within
the window* at time `t` when `t - s < window`, so one exactly `window` seconds old no longer
counts. Two rules, each off when its threshold is 0:

* Per address: when a failure makes `ip_failures` failures from one address (on any
  accounts) within the window, the address is refused for every account until `duration`
  seconds after that failure.
* Per account: when a failure makes `account_failures` failures on one account (from any
  addresses) within the window, the account is *under attack* until `duration` seconds
  after that failure; such a failure during an attack extends it, otherwise it starts a new
  one. While under attack, an address is refused on the account if its last failure on it
  is within the window or at or after the attack's start. Any other address (the real user
  on their phone) may still try, and once it fails it is refused until the attack ends. So
  a distributed attacker gets one guess per address per attack, plus one more for each
  address whose failure before the attack has left the window.

`succeeded()` forgets the (account, address) pair's failures only: neither the address's
total (one valid account must not reset an attacker's counter) nor the account's attack.

Addresses are keyed by `address_key`: IPv4 by the full address, IPv6 by its /64 (one host
usually owns a whole /64), IPv4-mapped IPv6 as the IPv4 address, anything else as given.

Memory (STYLE P3): three tables (addresses, accounts, pairs), each an `OrderedDict` of at
most `max_entries` keys in order of last failure. A key keeps its last `threshold`
failure times in a bounded deque: the threshold is reached within the window exactly when
the deque is full and its oldest entry is within the window. An entry whose window, block
and attack have passed means nothing; it is dropped when looked up, and each `failed()`
drops such entries from the old end of each table (stopping at the first live one), so
every call is O(1) amortised. Dropping never changes an answer. A new key in a full table
evicts the least recently failed key, even a live one: an attacker with more than
`max_entries` addresses (or /64s) can make the throttle forget.

Ownership: one instance serves all connections of a listener or of the process. Nothing
here awaits, so tasks on the one trio thread can share it without locks.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeVar

K = TypeVar("K")
V = TypeVar("V")

_IPV6_HOST_BITS: Final = 64  #: IPv6 addresses are grouped by their /64 prefix


def address_key(ip: str) -> str:
    """The key failures from `ip` are counted under.

    Args:
        ip: The client address as text, IPv4 or IPv6 (a scope id is ignored).

    Returns:
        The IPv4 address itself; for IPv6 its /64 as "prefix/64"; for an IPv4-mapped IPv6
        address the IPv4 address; `ip` unchanged if it does not parse.
    """
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv4Address):
        return str(addr)
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    prefix = int(addr) >> _IPV6_HOST_BITS << _IPV6_HOST_BITS
    return f"{ipaddress.IPv6Address(prefix)}/{128 - _IPV6_HOST_BITS}"


@dataclass(slots=True)
class _Address:
    failures: deque[float]  #: last `ip_failures` failure times, oldest first
    blocked_until: float = -math.inf


@dataclass(slots=True)
class _Account:
    failures: deque[float]  #: last `account_failures` failure times, oldest first
    attack_start: float = -math.inf
    attack_until: float = -math.inf


@dataclass(frozen=True, slots=True)
class TableSizes:
    """How many keys each table holds (for tests and metrics)."""

    addresses: int
    accounts: int
    pairs: int


class AuthThrottle:
    """Failed-login throttle per address and per account (see the module docstring).

    Args:
        ip_failures: Failures from one address within `window` that block it; 0 = off.
        account_failures: Failures on one account within `window` that start an attack on
            it; 0 = off.
        window: Seconds a failure counts for.
        duration: Seconds a block or an attack lasts after the failure that caused it.
        max_entries: Most keys held in each of the three tables.

    Raises:
        ValueError: A negative threshold, `max_entries` below 1, or (with a rule on) a
            `window` or `duration` that is not a positive finite number.
    """

    __slots__ = (
        "_accounts",
        "_addresses",
        "_pairs",
        "account_failures",
        "duration",
        "ip_failures",
        "max_entries",
        "window",
    )

    def __init__(
        self,
        *,
        ip_failures: int,
        account_failures: int,
        window: float,
        duration: float,
        max_entries: int = 100_000,
    ) -> None:
        if ip_failures < 0 or account_failures < 0:
            raise ValueError("failure thresholds must be >= 0 (0 turns a rule off)")
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        if ip_failures or account_failures:
            for name, value in (("window", window), ("duration", duration)):
                if not math.isfinite(value) or value <= 0:
                    raise ValueError(f"{name} must be a positive number of seconds")
        self.ip_failures: Final = ip_failures
        self.account_failures: Final = account_failures
        self.window: Final = window
        self.duration: Final = duration
        self.max_entries: Final = max_entries
        self._addresses: OrderedDict[str, _Address] = OrderedDict()
        self._accounts: OrderedDict[str, _Account] = OrderedDict()
        #: (account, address key) -> time of the pair's last failure
        self._pairs: OrderedDict[tuple[str, str], float] = OrderedDict()

    def refusal(self, ip: str, account: str, now: float) -> float | None:
        """Seconds until attempts from `ip` on `account` are allowed again.

        Args:
            ip: The client address.
            account: The bare JID the client wants to authenticate as.
            now: The current time in seconds (monotonic).

        Returns:
            The wait in seconds (> 0), or None when an attempt is allowed now.
        """
        addr = address_key(ip)
        wait = 0.0
        entry = self._addresses.get(addr)
        if entry is not None:
            if self._address_expired(entry, now):
                del self._addresses[addr]
            else:
                wait = max(wait, entry.blocked_until - now)
        attacked = self._accounts.get(account)
        if attacked is not None and self._account_expired(attacked, now):
            del self._accounts[account]
        pair = (account, addr)
        last = self._pairs.get(pair)
        if last is not None and not self._pair_counts(last, attacked, now):
            del self._pairs[pair]
        elif last is not None and attacked is not None and now < attacked.attack_until:
            wait = max(wait, attacked.attack_until - now)
        return wait if wait > 0 else None

    def failed(self, ip: str, account: str, now: float) -> None:
        """Record a failed authentication of `ip` as `account` at `now`."""
        addr = address_key(ip)
        if self.ip_failures:
            self._sweep(self._addresses, lambda _, e: self._address_expired(e, now))
            entry = self._touch(
                self._addresses, addr, lambda: _Address(deque(maxlen=self.ip_failures))
            )
            entry.failures.append(now)
            if self._crossed(entry.failures, now):
                entry.blocked_until = max(entry.blocked_until, now + self.duration)
        if self.account_failures:
            self._sweep(self._accounts, lambda _, a: self._account_expired(a, now))
            self._sweep(
                self._pairs,
                lambda k, last: not self._pair_counts(last, self._accounts.get(k[0]), now),
            )
            acct = self._touch(
                self._accounts, account, lambda: _Account(deque(maxlen=self.account_failures))
            )
            acct.failures.append(now)
            if self._crossed(acct.failures, now):
                if now >= acct.attack_until:
                    acct.attack_start = now
                acct.attack_until = max(acct.attack_until, now + self.duration)
            self._touch(self._pairs, (account, addr), lambda: now)
            self._pairs[account, addr] = now  # a known pair keeps its place, gets a new time

    def succeeded(self, ip: str, account: str, now: float) -> None:
        """Record that `ip` authenticated as `account`: forget only this pair's failures."""
        del now  # part of the interface so the caller need not know what is time-dependent
        self._pairs.pop((account, address_key(ip)), None)

    def sizes(self) -> TableSizes:
        """How many keys each table holds now (expired ones included until dropped)."""
        return TableSizes(len(self._addresses), len(self._accounts), len(self._pairs))

    def _crossed(self, failures: deque[float], now: float) -> bool:
        return len(failures) == failures.maxlen and now - failures[0] < self.window

    def _address_expired(self, entry: _Address, now: float) -> bool:
        return now >= entry.blocked_until and now - entry.failures[-1] >= self.window

    def _account_expired(self, acct: _Account, now: float) -> bool:
        return now >= acct.attack_until and now - acct.failures[-1] >= self.window

    def _pair_counts(self, last: float, acct: _Account | None, now: float) -> bool:
        """Whether a pair's last failure is within the window or in the account's attack."""
        if now - last < self.window:
            return True
        return acct is not None and acct.attack_start <= last and now < acct.attack_until

    def _touch(self, table: OrderedDict[K, V], key: K, make: Callable[[], V]) -> V:
        """The entry for `key`, moved to the new end; made if absent (evicting the oldest)."""
        entry = table.get(key)
        if entry is not None:
            table.move_to_end(key)
            return entry
        if len(table) >= self.max_entries:
            table.popitem(last=False)
        entry = table[key] = make()
        return entry

    @staticmethod
    def _sweep(table: OrderedDict[K, V], expired: Callable[[K, V], bool]) -> None:
        """Drop expired entries from the old end; each was added once, so O(1) amortised."""
        while table:
            key, value = next(iter(table.items()))
            if not expired(key, value):
                return
            del table[key]
