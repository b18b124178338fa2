"""Reading the gateway's log lines in tests.

Two sources, one shape (a mapping per line with an "event" key): the entries of
`structlog.testing.capture_logs()` for a gateway in this process, and the JSON lines
(`logging.format: json`) a gateway subprocess writes to its log file (`parse_json_lines`,
`LiveGateway.log_events()`). `named()` filters either; `event_is()` builds the predicate
that `wait_for_log_line()` (trio) and `wait_for_log_line_asyncio()` (for slixmpp's
asyncio scenarios) poll the log file for.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import trio

LogLine = Mapping[str, Any]
Line = TypeVar("Line", bound=LogLine)

POLL = 0.05  # seconds between two reads of a log file being waited on
TAIL = 4000  # characters of the log file shown when a wait fails


class LogSource(Protocol):
    """A gateway subprocess's log: the file, and its JSON lines read so far."""

    @property
    def log(self) -> Path:
        """The file the gateway writes its output to."""
        ...

    def log_events(self) -> list[dict[str, Any]]:
        """The complete JSON lines written so far."""
        ...


def parse_json_lines(data: bytes) -> list[dict[str, Any]]:
    """The JSON log lines in `data`, each parsed: the whole lines that start with "{"
    (a last line still being written is left out, and so are other lines: warnings,
    tracebacks)."""
    data = data[: data.rfind(b"\n") + 1]
    lines = data.decode(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def event_is(name: str, jid: str | None = None, **fields: object) -> Callable[[LogLine], bool]:
    """A predicate for the log line `name`, of `jid` when given, with these `fields`."""

    def match(line: LogLine) -> bool:
        return (
            line.get("event") == name
            and (jid is None or line.get("jid") == jid)
            and all(line.get(key) == value for key, value in fields.items())
        )

    return match


def named(lines: Iterable[Line], name: str, jid: str | None = None) -> list[Line]:
    """The log lines `name` (of `jid`, when given), in order."""
    match = event_is(name, jid)
    return [line for line in lines if match(line)]


def _not_seen(source: LogSource, what: str) -> AssertionError:
    """The failure of a wait for `what`, with the tail of the log."""
    return AssertionError(f"log line not seen: {what}\n{source.log.read_text()[-TAIL:]}")


def _first(source: LogSource, match: Callable[[LogLine], bool]) -> dict[str, Any] | None:
    """The first log line written so far that `match` accepts."""
    return next((line for line in source.log_events() if match(line)), None)


async def wait_for_log_line(
    source: LogSource, match: Callable[[LogLine], bool], *, timeout: float, what: str = ""
) -> dict[str, Any]:
    """The first log line `match` accepts, waiting (trio, at most `timeout` seconds) for
    it to be written; an AssertionError with the log's tail when it is not."""
    with trio.move_on_after(timeout):
        while (found := _first(source, match)) is None:
            await trio.sleep(POLL)
        return found
    raise _not_seen(source, what)


async def wait_for_log_line_asyncio(
    source: LogSource, match: Callable[[LogLine], bool], *, timeout: float, what: str = ""
) -> dict[str, Any]:
    """`wait_for_log_line()` for asyncio code (the slixmpp scenarios)."""
    deadline = time.monotonic() + timeout
    while (found := _first(source, match)) is None:
        if time.monotonic() > deadline:
            raise _not_seen(source, what)
        await asyncio.sleep(POLL)
    return found
