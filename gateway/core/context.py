"""What every connection of one gateway shares: the server context.

Built once by `gateway.app` (which also wires the listeners of `gateway.net` to the
connection task) and passed to every connection task; tests build it the same way.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

import trio

from gateway.config import GatewayConfig
from gateway.core.auth_limits import AuthThrottle
from gateway.core.handoff import Handoff
from gateway.core.metrics import Metrics
from gateway.core.migration import Migrations
from gateway.core.resume import ResumeRegistry
from gateway.core.router import Router
from gateway.errors import StreamErrorCondition
from gateway.net.limits import ConnectionGate
from gateway.storage.base import AdoptableStore, SmSessionTable, StaleHTable
from gateway.xmpp.sasl import ScramCredentials
from gateway.xmpp.sasl_exchange import CheckPassword, LookupCredentials
from gateway.xmpp.sm import SMState

CredentialLookup = Callable[[LookupCredentials], Awaitable[ScramCredentials | None]]
PasswordCheck = Callable[[CheckPassword], Awaitable[bool]]

#: Connections that never bound a resource closing at once (see `serve_wire`).
CLOSE_CONCURRENCY: Final = 32


class LiveConnection(Protocol):
    """What the server asks of a live connection task (`gateway.core.connection`) when it
    shuts down."""

    finished: trio.Event

    @property
    def is_resumable(self) -> bool: ...

    @property
    def is_lending(self) -> bool: ...

    def close(
        self,
        condition: StreamErrorCondition | None,
        text: str | None = None,
        *,
        handoff: bool = False,
    ) -> None: ...


@dataclass(eq=False)
class ServerContext:
    """What every connection shares: config, router, stores, TLS context, live connections."""

    config: GatewayConfig
    router: Router
    lookup_credentials: CredentialLookup
    check_password: PasswordCheck
    ssl_context: ssl.SSLContext | None
    resume: ResumeRegistry
    sm_sessions: SmSessionTable
    stale_h: StaleHTable
    # The one registry of counters (gateway.core.metrics); the router, the offline
    # service, the resume registry and the hand-off count into this same object.
    metrics: Metrics
    connections: set[LiveConnection] = field(default_factory=set)
    draining: bool = False
    # Why the node cannot take new sessions although it serves its own (a cluster's
    # Redis unreachable), for /healthz; None: healthy.
    unhealthy: str | None = None
    listen_ports: list[int] = field(default_factory=list)
    websocket_ports: list[int] = field(default_factory=list)
    # Where connections run; transports accepted elsewhere (tests' memory streams) are
    # served here too, so they end before the server closes its stores.
    handler_nursery: trio.Nursery | None = None
    direct_tls_context: ssl.SSLContext | None = None
    # Builds each session's SMState (tests inject counters near 2**32 here).
    new_sm_state: Callable[..., SMState] = SMState
    # The hand-off store as the core uses it (gateway.core.handoff); None: sessions end
    # at shutdown and nothing is taken back at start.
    handoff: Handoff | None = None
    # Session moves between the nodes of a cluster (gateway.core.migration); None: one
    # node, a resume for a session held elsewhere fails.
    migrations: Migrations | None = None
    # A cluster's store of sessions left by draining nodes (gateway.core.migration);
    # with it, shutdown leaves resumable sessions there instead of the hand-off store.
    adoptable: AdoptableStore | None = None
    # Temporary SASL refusal after repeated failures (auth.lockout); None: off.
    lockout: AuthThrottle | None = None
    # Counts the open client connections of every listener (general.max_connections).
    gate: ConnectionGate = field(default_factory=ConnectionGate)
    # This node's id in session records (`cluster.node`, else host name and pid).
    node: str = "local"
    # Wall-clock seconds (UNIX time) for what other processes read: session records,
    # stale_h ages. Tests inject their own.
    wall_clock: Callable[[], float] = time.time

    def set_health(self, unhealthy: str | None) -> None:
        """Record why the node is unhealthy (None: healthy again), for /healthz."""
        self.unhealthy = unhealthy

    # Unbound connections closing at once (see serve_wire).
    closing: trio.CapacityLimiter = field(
        default_factory=lambda: trio.CapacityLimiter(CLOSE_CONCURRENCY)
    )
