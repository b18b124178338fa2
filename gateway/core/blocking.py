"""How blocking storage calls (SQLite) run: worker threads in production, inline in tests.

Tests that use `MockClock(autojump_threshold=0)` must not wait on threads (STYLE V3): the
clock would jump past `resume_timeout` while a lookup runs. They pass `inline`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar, TypeVarTuple, Unpack

import trio

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class RunBlocking(Protocol):
    def __call__(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> Awaitable[T]: ...


def in_threads(limit: int) -> RunBlocking:
    """Run calls on trio's worker threads, at most `limit` at once."""
    limiter = trio.CapacityLimiter(limit)

    async def run(fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=limiter)

    return run


async def inline(fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
    """Run the call in the trio thread (tests with a mock clock)."""
    await trio.lowlevel.checkpoint()
    return fn(*args)
