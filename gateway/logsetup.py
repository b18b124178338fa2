"""structlog setup (STYLE G1-G4): key=value on a terminal, JSON lines otherwise.

Every line of a connection carries `conn_id`, `peer` and, once bound, `jid`: they are
structlog contextvars bound at the top of the connection task (trio copies the context
into child tasks at spawn). Stanza payloads and credentials are never logged.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from gateway.config import LogFormat, LoggingConfig


def configure_logging(cfg: LoggingConfig, *, stream: TextIO | None = None) -> None:
    """Configure structlog and route stdlib logging (trio, trio-websocket) into it."""
    out = stream or sys.stderr
    fmt = cfg.format
    if fmt is LogFormat.AUTO:
        fmt = LogFormat.CONSOLE if out.isatty() else LogFormat.JSON
    level = logging.getLevelNamesMapping()[cfg.level.upper()]

    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if fmt is LogFormat.CONSOLE:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        shared.append(structlog.processors.dict_tracebacks)
        renderer = structlog.processors.JSONRenderer()

    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # One write per line (print() writes the line and its newline separately, and
        # stderr writes through): the worker processes share the supervisor's stderr, and
        # two lines written at once must not interleave into one (to a pipe, lines up to
        # PIPE_BUF, 4 KiB, are written whole; longer ones, tracebacks, may still split).
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=True,
    )

    # Stdlib loggers (trio-websocket, slixmpp in tests) through the same renderer.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(level, logging.INFO))
    # coredis logs each retry of a Lua script Redis had not cached yet (normal after a
    # start or a Redis restart) at info: only its warnings are the operator's business.
    logging.getLogger("coredis").setLevel(max(level, logging.WARNING))


def bind_connection(conn_id: str, peer: str, transport: str) -> None:
    """Bind the connection's identity to every log line of the current task tree."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(conn_id=conn_id, peer=peer, transport=transport)


def bind_jid(jid: str) -> None:
    """Add the authenticated (then bound) JID to the connection's log lines."""
    structlog.contextvars.bind_contextvars(jid=jid)
