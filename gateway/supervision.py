"""Service supervision: restart a background service with backoff, log every crash.

`supervise` wraps a service loop that must never silently disappear (STYLE C10; DESIGN
section 3: the stale_h GC "if it crashes it is restarted and the crash logged, never
silently gone"). It is the one place besides the connection boundary that catches
`Exception` (STYLE C7): a supervised service is, by definition, isolated from the process.
`trio.Cancelled` and other `BaseException`s (KeyboardInterrupt, a group holding Cancelled)
are never caught: cancelling the supervisor ends it and the service at once.

Also here: `run_stale_h_gc`, the stale_h garbage collector (the seed's `repeat_after` and
`geriatric`), meant to run under `supervise`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
import trio

from gateway.storage.base import StaleHTable

log = structlog.get_logger(module=__name__)


async def supervise(
    name: str,
    service: Callable[[], Awaitable[None]],
    *,
    initial_backoff: float = 1.0,
    max_backoff: float = 60.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run `service()` forever, restarting it after a crash or a return.

    A crash (an `Exception`) logs `service_crashed` with the traceback; a normal return logs
    `service_stopped_unexpectedly` (service loops never return, STYLE C1). Either way the
    service starts again after a backoff (`service_restarted`, with the attempt number),
    which doubles after each failure up to `max_backoff` and goes back to
    `initial_backoff` once the service has run for longer than `max_backoff`.

    Args:
        name: the service's name in log lines (`service=`).
        service: starts one run of the service, e.g. `functools.partial(run_x, table, ...)`.
        initial_backoff: seconds to wait before the first restart.
        max_backoff: the most seconds to wait before a restart.
        task_status: `started()` is called at once (the supervisor is ready as soon as it
            runs; the service reports nothing).

    Raises:
        ValueError: `initial_backoff` is not positive, or `max_backoff` is below it.

    Cancellation: ends the running service (its own cleanup runs) or the backoff sleep, and
    then this function, without a crash log line.
    """
    if not initial_backoff > 0 or max_backoff < initial_backoff:
        raise ValueError("need 0 < initial_backoff <= max_backoff")
    task_status.started()
    backoff = initial_backoff
    attempt = 0
    while True:
        started = trio.current_time()
        try:
            await service()
        except Exception:
            backoff = _next_backoff(backoff, started, initial_backoff, max_backoff)
            log.exception("service_crashed", service=name, attempt=attempt, restart_in=backoff)
        else:
            backoff = _next_backoff(backoff, started, initial_backoff, max_backoff)
            log.error(
                "service_stopped_unexpectedly", service=name, attempt=attempt, restart_in=backoff
            )
        await trio.sleep(backoff)
        backoff = min(backoff * 2, max_backoff)
        attempt += 1
        log.warning("service_restarted", service=name, attempt=attempt)


def _next_backoff(backoff: float, started: float, initial: float, maximum: float) -> float:
    """The wait before the next restart: back to `initial` after a run longer than `maximum`
    (a fresh failure, not a crash loop), else `backoff` as it stands."""
    return initial if trio.current_time() - started > maximum else backoff


async def run_stale_h_gc(
    table: StaleHTable,
    *,
    repeat_after: float,
    geriatric: float,
    clock: Callable[[], float],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Delete stale_h entries older than `geriatric` seconds, every `repeat_after` seconds.

    Never returns. Run it under `supervise` so a failing backend does not end it for good.
    Entry ages are measured on `clock`, the wall clock the core stamps them with (a record
    means the same to every process that shares the table).

    Args:
        table: the stale_h table.
        repeat_after: seconds between sweeps (`stale_h.repeat_after`).
        geriatric: seconds an entry is kept (`stale_h.geriatric`).
        clock: the wall clock (UNIX seconds; tests pass their own).
        task_status: `started()` is called at once.

    Raises:
        StorageError: a sweep failed (the supervisor restarts this loop).
        ValueError: `repeat_after` is not positive or `geriatric` is negative.

    Cancellation: stops between or during sweeps; a cancelled sweep may have removed part
    of what it would have removed.
    """
    if not repeat_after > 0 or geriatric < 0:
        raise ValueError("need repeat_after > 0 and geriatric >= 0")
    task_status.started()
    while True:
        await trio.sleep(repeat_after)
        cutoff = clock() - geriatric
        removed = await table.sweep(cutoff)
        log.info("stale_h_swept", removed=removed, geriatric=geriatric)
