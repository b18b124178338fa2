"""The total connection cap, kept below the process's file descriptor limit.

A process that runs out of descriptors fails in `accept()` (EMFILE) on every listener, and
also wherever else it opens a file: the store, a certificate, a log. So the gateway raises
its soft descriptor limit to the hard one at start (`raise_descriptor_limit`) and admits at
most `connection_cap` client connections, all listeners together, leaving a reserve for
everything else. A connection over the cap is closed at once (`ConnectionGate.admit`), and
refusals are logged as one line per `REFUSAL_LOG_INTERVAL` with their count, so a flood does
not flood the log too.
"""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator
from typing import Final

import structlog
import trio

log = structlog.get_logger(module=__name__)

#: Descriptors kept for what is not a client connection (stores, logs, TLS files, threads'
#: pipes, trio's wakeup socket), at least; a twentieth of the limit on large limits.
DESCRIPTOR_RESERVE: Final = 64
#: Seconds between two `connections_refused` lines.
REFUSAL_LOG_INTERVAL: Final = 10.0


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit where the system allows it.

    Returns:
        The soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit is not a value setrlimit takes for the soft one everywhere.
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("descriptor_limit_not_raised", soft=soft, hard=hard, error=str(exc))
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_cap(configured: int, descriptor_limit: int) -> int:
    """The connection cap: `configured` (`general.max_connections`; 0 is automatic), never
    closer to `descriptor_limit` than the reserve."""
    reserve = max(DESCRIPTOR_RESERVE, descriptor_limit // 20)
    ceiling = max(descriptor_limit - reserve, 1)
    if configured == 0:
        return ceiling
    if configured > ceiling:
        log.warning(
            "max_connections_lowered",
            configured=configured,
            cap=ceiling,
            descriptor_limit=descriptor_limit,
        )
        return ceiling
    return configured


class ConnectionGate:
    """Counts the open client connections of every listener against the cap.

    Args:
        cap: the most connections open at once; 0 is no cap.
    """

    def __init__(self, cap: int = 0) -> None:
        self.cap = cap
        self.open = 0
        self.refused = 0
        self._unlogged = 0
        self._logged_at = -REFUSAL_LOG_INTERVAL

    @contextlib.contextmanager
    def admit(self) -> Iterator[bool]:
        """Hold a place for one connection while the block runs.

        Yields:
            False when the cap is reached: the caller closes the connection at once.
        """
        if self.cap and self.open >= self.cap:
            self._refuse()
            yield False
            return
        self.open += 1
        try:
            yield True
        finally:
            self.open -= 1

    def _refuse(self) -> None:
        self.refused += 1
        self._unlogged += 1
        now = trio.current_time()
        if now - self._logged_at >= REFUSAL_LOG_INTERVAL:
            log.warning(
                "connections_refused", reason="max_connections", cap=self.cap, count=self._unlogged
            )
            self._logged_at = now
            self._unlogged = 0
