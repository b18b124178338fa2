"""Supervised services: restarts with backoff and a log line per crash; the stale_h GC."""

from __future__ import annotations

import functools
from collections.abc import MutableMapping
from typing import Any

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from gateway.errors import StorageError
from gateway.storage.base import StaleH
from gateway.storage.memory import MemoryStaleHTable
from gateway.supervision import run_stale_h_gc, supervise


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


class Crashing:
    """A service that records when it started and crashes after `run_for` seconds."""

    def __init__(self, run_for: list[float] | None = None) -> None:
        self.starts: list[float] = []
        self.run_for = run_for or []

    async def __call__(self) -> None:
        self.starts.append(trio.current_time())
        if self.run_for:
            await trio.sleep(self.run_for.pop(0))
        raise RuntimeError(f"boom {len(self.starts)}")


async def test_a_crashing_service_is_restarted_and_each_crash_logged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = Crashing()
    with capture_logs() as logs, trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(supervise, "flaky", service))
            await trio.sleep(3.5)  # starts at 0, 1 and 3 (backoff 1, then 2)
            nursery.cancel_scope.cancel()
    assert len(service.starts) == 3
    crashes = events(logs, "service_crashed")
    assert [c["attempt"] for c in crashes] == [0, 1, 2]
    assert [c["restart_in"] for c in crashes] == [1.0, 2.0, 4.0]
    for crash in crashes:
        assert crash["service"] == "flaky"
        assert crash["log_level"] == "error"
        assert crash["exc_info"] is True  # log.exception: the renderer adds the traceback
        assert crash["module"] == "gateway.supervision"
    restarts = events(logs, "service_restarted")
    assert [(r["service"], r["attempt"]) for r in restarts] == [("flaky", 1), ("flaky", 2)]


async def test_backoff_doubles_up_to_the_cap(autojump_clock: trio.testing.MockClock) -> None:
    service = Crashing()
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            t0 = trio.current_time()
            nursery.start_soon(
                functools.partial(supervise, "flaky", service, initial_backoff=0.5, max_backoff=5)
            )
            await trio.sleep(30)
            nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in zip(service.starts, service.starts[1:], strict=False)]
    assert service.starts[0] == t0
    assert gaps[:7] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


async def test_backoff_resets_after_a_run_longer_than_the_cap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Crash at once twice (backoff 1, 2), then run 10 s (> max_backoff 8) and crash: the
    # next wait is back to 1, then doubles again.
    service = Crashing(run_for=[0, 0, 10, 0, 0])
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(supervise, "flaky", service, initial_backoff=1, max_backoff=8)
            )
            await trio.sleep(20)
            nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in zip(service.starts, service.starts[1:], strict=False)]
    assert gaps[:4] == [1.0, 2.0, 10.0 + 1.0, 2.0]


async def test_a_service_that_returns_is_logged_and_restarted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts: list[float] = []

    async def quitter() -> None:
        starts.append(trio.current_time())
        await trio.sleep(0)

    with capture_logs() as logs, trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(supervise, "quitter", quitter))
            await trio.sleep(2.5)
            nursery.cancel_scope.cancel()
    assert len(starts) == 2
    stopped = events(logs, "service_stopped_unexpectedly")
    assert [(s["service"], s["attempt"]) for s in stopped] == [("quitter", 0), ("quitter", 1)]
    assert not events(logs, "service_crashed")
    assert [r["attempt"] for r in events(logs, "service_restarted")] == [1]


@pytest.mark.parametrize("while_", ["running", "backing_off"])
async def test_cancelling_the_supervisor_stops_the_service_without_a_crash_line(
    autojump_clock: trio.testing.MockClock, while_: str
) -> None:
    cleaned_up: list[bool] = []

    async def service() -> None:
        try:
            if while_ == "backing_off":
                raise RuntimeError("crash first")
            await trio.sleep_forever()
        finally:
            cleaned_up.append(True)

    with capture_logs() as logs, trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            await nursery.start(supervise, "svc", service)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert cleaned_up == [True]
    crashes = events(logs, "service_crashed")
    assert len(crashes) == (1 if while_ == "backing_off" else 0)
    assert not events(logs, "service_restarted")
    assert not events(logs, "service_stopped_unexpectedly")


async def test_supervisor_refuses_a_backoff_that_could_spin() -> None:
    async def service() -> None:
        await trio.sleep_forever()  # pragma: no cover - never started

    with pytest.raises(ValueError, match="backoff"):
        await supervise("svc", service, initial_backoff=0)
    with pytest.raises(ValueError, match="backoff"):
        await supervise("svc", service, initial_backoff=2, max_backoff=1)


class FlakyTable(MemoryStaleHTable):
    """A stale_h table whose sweeps fail the given times (1-based), e.g. a lost backend."""

    def __init__(self, fail_on: set[int]) -> None:
        super().__init__()
        self.sweeps: list[tuple[float, float]] = []  # (when, older_than)
        self.fail_on = fail_on

    async def sweep(self, older_than: float) -> int:
        self.sweeps.append((trio.current_time(), older_than))
        if len(self.sweeps) in self.fail_on:
            raise StorageError("backend unavailable")
        return await super().sweep(older_than)


async def test_gc_removes_only_records_older_than_geriatric_every_repeat_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    table = FlakyTable(fail_on=set())
    gc = functools.partial(
        run_stale_h_gc, table, repeat_after=10, geriatric=25, clock=trio.current_time
    )
    with capture_logs() as logs, trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            t0 = trio.current_time()
            await nursery.start(supervise, "stale_h_gc", gc)
            await table.put(StaleH("a", 1, "juliet@example.com", t0))
            await trio.sleep(12)
            await table.put(StaleH("b", 2, "juliet@example.com", t0 + 12))
            await trio.sleep(23)  # t0 + 35: sweeps ran at +10, +20, +30
            assert await table.get("a") is None
            assert await table.get("b") is not None
            await trio.sleep(10)  # t0 + 45: the sweep at +40 (cutoff +15) took b
            assert await table.get("b") is None
            nursery.cancel_scope.cancel()
    assert [(when - t0, cutoff - t0) for when, cutoff in table.sweeps] == [
        (10, -15),
        (20, -5),
        (30, 5),
        (40, 15),
    ]
    assert [e["removed"] for e in events(logs, "stale_h_swept")] == [0, 0, 1, 1]


async def test_gc_keeps_running_after_a_failed_sweep(
    autojump_clock: trio.testing.MockClock,
) -> None:
    table = FlakyTable(fail_on={2})
    gc = functools.partial(
        run_stale_h_gc, table, repeat_after=10, geriatric=5, clock=trio.current_time
    )
    with capture_logs() as logs, trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            t0 = trio.current_time()
            await nursery.start(supervise, "stale_h_gc", gc)
            await table.put(StaleH("a", 1, "juliet@example.com", t0 + 12))
            await trio.sleep(45)
            nursery.cancel_scope.cancel()
    # Sweeps at +10, +20 (fails; restart after 1 s backoff), then every 10 s from +21.
    assert [when - t0 for when, _ in table.sweeps] == [10, 20, 31, 41]
    crashes = events(logs, "service_crashed")
    assert [(c["service"], c["exc_info"]) for c in crashes] == [("stale_h_gc", True)]
    assert [e["removed"] for e in events(logs, "stale_h_swept")] == [0, 1, 0]
    assert await table.get("a") is None


async def test_gc_refuses_a_nonpositive_period() -> None:
    with pytest.raises(ValueError, match="repeat_after"):
        await run_stale_h_gc(
            MemoryStaleHTable(), repeat_after=0, geriatric=1, clock=trio.current_time
        )
