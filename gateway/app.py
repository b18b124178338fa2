"""Entry point: the CLI, the root nursery, listeners, signals and graceful shutdown.

    xmpp-gateway serve --config config.yaml          (also: python -m gateway ...)
    xmpp-gateway check-config --config config.yaml
    xmpp-gateway user add|remove|list|passwd|import ... --config config.yaml

Shutdown (STYLE C11): on SIGINT/SIGTERM the gateway drains for `general.shutdown_grace`
seconds (new streams refused, /healthz 503), then every stream is closed with
`system-shutdown`; resumable sessions are handed off to the hand-off store instead of
ended (`gateway.core.handoff`) and parked again by the next start; the process exits 0.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from functools import partial

import structlog
import trio

from gateway.cli import command_parser, run_user_command
from gateway.config import GatewayConfig, ListenerConfig, TlsMode, load_config
from gateway.core.auth_limits import AuthThrottle
from gateway.core.blocking import in_threads, inline
from gateway.core.cluster import ClusterDirectory
from gateway.core.connection import serve_connection, serve_wire
from gateway.core.context import ServerContext
from gateway.core.directory import Directory, Handle, LocalDirectory
from gateway.core.dispatch import cluster_dispatcher
from gateway.core.handoff import Handoff
from gateway.core.metrics import HandoffResult, Metrics
from gateway.core.migration import run_adoptable_sweep
from gateway.core.mirror import run_h_mirror
from gateway.core.offline import OfflineService
from gateway.core.reaper import forget_previous_run, leave, run_reaper
from gateway.core.relay import Relay
from gateway.core.resume import ResumeRegistry
from gateway.core.revive import serve_revived
from gateway.core.roster import RosterService
from gateway.core.router import Router
from gateway.core.services import ServerServices
from gateway.errors import ConfigError, StorageError, StreamErrorCondition
from gateway.logsetup import configure_logging
from gateway.net.limits import ConnectionGate, connection_cap, raise_descriptor_limit
from gateway.net.tcp import open_listeners, peer_of, unwrap_proxy
from gateway.net.transport import StreamTransport
from gateway.net.websocket import serve_websocket
from gateway.storage.adoptable_redis import RedisAdoptableStore
from gateway.storage.base import SmSessionTable, StaleHTable
from gateway.storage.handoff_sqlite import SqliteHandoffStore
from gateway.storage.memory import MemorySmSessionTable, MemoryStaleHTable
from gateway.storage.offline_sqlite import SqliteOfflineStore
from gateway.storage.redis_client import Redis, open_redis, preload
from gateway.storage.roster_sqlite import SqliteRosterStore
from gateway.storage.sm_redis import RedisSmSessionTable, RedisStaleHTable
from gateway.storage.sqlite import SqliteAccountStore
from gateway.supervision import run_stale_h_gc, supervise
from gateway.workers import run_workers
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID
from gateway.xmpp.sasl import ScramCredentials, check_plain
from gateway.xmpp.sasl_exchange import CheckPassword, LookupCredentials

log = structlog.get_logger(module=__name__)

STORAGE_THREADS = 4
HASHING_THREADS = 2  # PLAIN password checks (PBKDF2), apart from the stores' threads
CLOSE_DEADLINE = 10.0  # seconds for streams to close and sessions to reroute their stanzas, at exit
#: Every key the gateway writes in a cluster's Redis starts with this (one database may
#: be shared with other software).
REDIS_PREFIX = "xg:"
#: Stanzas for other nodes waiting for Redis (an outage); past it they take the local
#: fallbacks (offline storage, bounces) instead of growing memory.
RELAY_MAX_PENDING = 100_000


def make_lockout(config: GatewayConfig) -> AuthThrottle | None:
    """The SASL lockout of `auth.lockout`, or None when both of its rules are off."""
    lockout = config.auth.lockout
    if not (lockout.ip_failures or lockout.account_failures):
        return None
    return AuthThrottle(
        ip_failures=lockout.ip_failures,
        account_failures=lockout.account_failures,
        window=lockout.window,
        duration=lockout.duration,
    )


def make_ssl_context(config: GatewayConfig, *, alpn: str | None = None) -> ssl.SSLContext | None:
    """The server TLS context (with an ALPN protocol), or None when no listener uses TLS."""
    modes = [listener.tls for listener in config.c2s] + [w.tls for w in config.websocket]
    if all(mode is TlsMode.NONE for mode in modes):
        return None
    assert config.tls.certfile is not None and config.tls.keyfile is not None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls.certfile, config.tls.keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            str(config.path), "tls.certfile", f"cannot load the certificate/key pair: {exc}"
        ) from exc
    if alpn is not None:
        context.set_alpn_protocols([alpn])
    return context


async def serve_c2s(
    ctx: ServerContext,
    listener: ListenerConfig,
    handler_nursery: trio.Nursery,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept TCP connections on one c2s listener until cancelled."""
    listeners = await open_listeners(
        listener.ip,
        listener.port,
        task_status,
        reuse_port=ctx.config.general.workers > 1,
        kind="c2s",
        tls=listener.tls.value,
    )

    async def handle(stream: trio.SocketStream) -> None:
        with ctx.gate.admit() as admitted:
            if admitted:
                await _handle_c2s(ctx, listener, stream)
            else:
                await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handle, listeners, handler_nursery=handler_nursery)


async def _handle_c2s(
    ctx: ServerContext, listener: ListenerConfig, stream: trio.SocketStream
) -> None:
    """One accepted c2s connection: PROXY header (if configured), then the XMPP stream."""
    peer = peer_of(stream)
    if peer is None:
        await trio.aclose_forcefully(stream)
        return
    inner: trio.abc.Stream = stream
    if listener.proxy_protocol:
        unwrapped = await unwrap_proxy(stream, peer, ctx.config.trusted_proxies)
        if unwrapped is None:
            await trio.aclose_forcefully(stream)
            return
        inner, peer = unwrapped
    await serve_connection(ctx, listener, StreamTransport(inner, peer))


async def run_server(
    config: GatewayConfig,
    *,
    inline_storage: bool = False,
    worker: int | None = None,
    task_status: trio.TaskStatus[ServerContext] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the gateway until SIGINT/SIGTERM (or cancellation), then shut down gracefully.

    `task_status.started` gets the `ServerContext`; the bound ports are in
    `ctx.listen_ports` (useful with port 0 in tests). `inline_storage` runs SQLite calls
    in the trio thread instead of worker threads (tests with a mock clock, STYLE V3).
    With `cluster.redis`, the node joins the cluster: its directory, relay and heartbeat
    (and with `backend: redis` its SM tables) use that Redis.
    """
    node = config.cluster.node or f"{socket.gethostname()}-{os.getpid()}"
    if worker is not None and config.cluster.node is not None:
        node = f"{node}-{worker}"  # (without cluster.node, the pid tells workers apart)
    if config.cluster.redis is None:
        await _run_node(config, None, node, inline_storage=inline_storage, task_status=task_status)
        return
    async with open_redis(config.cluster.redis) as redis:
        await _run_node(config, redis, node, inline_storage=inline_storage, task_status=task_status)


async def _run_node(
    config: GatewayConfig,
    redis: Redis | None,
    node: str,
    *,
    inline_storage: bool,
    task_status: trio.TaskStatus[ServerContext],
) -> None:
    accounts = SqliteAccountStore(config.auth.database)
    roster_store = SqliteRosterStore(config.auth.database)
    run_blocking = inline if inline_storage else in_threads(STORAGE_THREADS)

    async def account_exists(host: str, username: str) -> bool:
        return await run_blocking(accounts.user_exists, host, username)

    async def lookup_credentials(action: LookupCredentials) -> ScramCredentials | None:
        return await run_blocking(
            accounts.get_credentials, action.host, action.username, action.hash_name
        )

    def verify_password(action: CheckPassword) -> bool:
        creds = accounts.get_credentials(action.host, action.username, "sha256")
        return check_plain(
            action.password, creds, "sha256", fake_iterations=config.auth.scram_iterations
        )

    # PBKDF2 (and SASLprep) in worker threads of their own: never in the event loop, and
    # a flood of PLAIN attempts queues behind itself, not in front of the stores' calls
    # (logins' credential lookups, offline storage, session ends).
    run_hashing = inline if inline_storage else in_threads(HASHING_THREADS)

    async def check_password(action: CheckPassword) -> bool:
        return await run_hashing(verify_password, action)

    sm_cfg = config.modules.mod_stream_management
    offline_store = SqliteOfflineStore(config.auth.database)
    handoff_store = SqliteHandoffStore(config.auth.database)
    # The one registry of counters (STYLE P5: made here, passed down, never global).
    metrics = Metrics()
    relay = cluster = None
    directory: Directory = LocalDirectory(node)
    if redis is not None:
        assert config.cluster.redis is not None
        relay = Relay(
            config.cluster.redis, node, prefix=REDIS_PREFIX, max_pending=RELAY_MAX_PENDING
        )
        directory = cluster = ClusterDirectory(redis, relay, node, prefix=REDIS_PREFIX)
    router = Router(config.general.hosts, account_exists, directory=directory, metrics=metrics)
    if cluster is not None:

        async def unavailable(stanza: Element, to: JID, exclude: Handle | None) -> None:
            await router.to_unavailable_full(stanza, to, exclude=exclude)

        cluster.unavailable = unavailable
    router.server_handler = ServerServices(RosterService(roster_store, run_blocking))
    router.offline = OfflineService(
        offline_store,
        run_blocking,
        max_per_user=config.modules.mod_offline.max_per_user,
        max_bytes_per_user=config.modules.mod_offline.max_bytes_per_user,
        metrics=metrics,
    )
    sm_sessions: SmSessionTable
    stale_h: StaleHTable
    adoptable = RedisAdoptableStore(redis, prefix=REDIS_PREFIX) if redis is not None else None
    if sm_cfg.backend == "redis" and redis is not None:
        sm_sessions = RedisSmSessionTable(redis, prefix=REDIS_PREFIX)
        stale_h = RedisStaleHTable(redis, prefix=REDIS_PREFIX)
    else:
        sm_sessions, stale_h = MemorySmSessionTable(), MemoryStaleHTable()
    ctx = ServerContext(
        config=config,
        router=router,
        lookup_credentials=lookup_credentials,
        check_password=check_password,
        ssl_context=make_ssl_context(config),
        # XEP-0368: direct TLS announces the ALPN protocol "xmpp-client".
        direct_tls_context=make_ssl_context(config, alpn="xmpp-client"),
        resume=ResumeRegistry(
            max_parked_per_user=sm_cfg.max_parked_per_user, max_parked=sm_cfg.max_parked
        ),
        sm_sessions=sm_sessions,
        adoptable=adoptable,
        stale_h=stale_h,
        metrics=metrics,
        handoff=Handoff(handoff_store, run_blocking, metrics=metrics),
        lockout=make_lockout(config),
        node=node,
        gate=ConnectionGate(
            connection_cap(config.general.max_connections, raise_descriptor_limit())
        ),
    )
    log.info("connection_cap", max_connections=ctx.gate.cap)
    # The signal receiver stays open until the stores are closed: a late second signal
    # must not kill the process (default action) after the hand-off was written.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as received:
        signals = _stop_signals(received)
        try:
            async with trio.open_nursery() as service_nursery:
                if relay is not None and cluster is not None:
                    await forget_previous_run(cluster)
                    scripts = [*cluster.scripts, *adoptable.scripts] if adoptable else []
                    if isinstance(stale_h, RedisStaleHTable):
                        scripts += stale_h.scripts
                    await preload(cluster.redis, scripts)
                    await service_nursery.start(relay.run_sender)
                    await service_nursery.start(
                        relay.run_receiver, cluster_dispatcher(ctx, relay, cluster)
                    )
                    await service_nursery.start(
                        cluster.run_heartbeat, config.cluster.heartbeat, ctx.set_health
                    )
                    if sm_cfg.stale_h.enabled:
                        # The h of this node's sessions, for the others if it dies.
                        await service_nursery.start(
                            supervise,
                            "h_mirror",
                            partial(run_h_mirror, ctx, config.cluster.heartbeat),
                        )
                    assert cluster.unavailable is not None
                    # Accounts for nodes that died (gateway.core.reaper), supervised.
                    await service_nursery.start(
                        supervise,
                        "reaper",
                        partial(run_reaper, cluster, config.cluster.heartbeat, cluster.unavailable),
                    )
                    assert ctx.migrations is not None
                    # Ends the sessions drained nodes left that no client came back for.
                    await service_nursery.start(
                        supervise,
                        "adoptable_sweep",
                        partial(run_adoptable_sweep, ctx.migrations, config.cluster.heartbeat),
                    )
                if sm_cfg.stale_h.enabled:
                    # The stale_h GC is supervised: restarted (and logged) if it ever fails.
                    await service_nursery.start(
                        supervise,
                        "stale_h_gc",
                        partial(
                            run_stale_h_gc,
                            stale_h,
                            repeat_after=sm_cfg.stale_h.repeat_after,
                            geriatric=sm_cfg.stale_h.geriatric,
                            # Read at each sweep (tests replace the context's clock).
                            clock=lambda: ctx.wall_clock(),
                        ),
                    )
                await _serve_until_signal(ctx, config, signals, task_status)
                if relay is not None:
                    # What the ending sessions handed to other nodes (stanzas, moved
                    # sessions) leaves before the sender stops; bounded.
                    with trio.move_on_after(CLOSE_DEADLINE / 2):
                        await relay.wait_flushed()
                    if relay.pending:
                        log.warning("relay_not_flushed", pending=relay.pending)
                service_nursery.cancel_scope.cancel()
            if cluster is not None:
                with trio.move_on_after(CLOSE_DEADLINE / 2):
                    await leave(cluster)
                await cluster.aclose()
        finally:
            accounts.close()
            roster_store.close()
            offline_store.close()
            handoff_store.close()
        log.info("stopped")


async def _serve_until_signal(
    ctx: ServerContext,
    config: GatewayConfig,
    signals: AsyncIterator[int],
    task_status: trio.TaskStatus[ServerContext],
) -> None:
    """Listeners and connection handlers, until SIGINT/SIGTERM; then the graceful stop."""
    with contextlib.ExitStack() as after_stop:
        async with trio.open_nursery() as handler_nursery:
            ctx.handler_nursery = handler_nursery
            await revive_sessions(ctx, handler_nursery)
            listening = False

            def started() -> None:
                nonlocal listening
                listening = True
                task_status.started(ctx)

            try:
                await _listen_until_signal(ctx, config, signals, handler_nursery, started)
            except BaseException:
                if not listening:
                    # The start failed (a port in use...): the revived sessions go back to
                    # the store for the next attempt instead of ending.
                    for conn in list(ctx.connections):
                        conn.close(StreamErrorCondition.SYSTEM_SHUTDOWN, handoff=True)
                raise
            # Thousands of sessions ending or handed off at once: the cyclic garbage
            # collector, scanning them again and again, was most of the stop's CPU.
            after_stop.enter_context(collector_paused())
            await shutdown(ctx, handler_nursery)
    handed_off = ctx.metrics.handoff_sessions
    written = handed_off.value(result=HandoffResult.WRITTEN)
    if ctx.handoff is not None and handed_off.total():
        log.info(
            "sessions_handed_off",
            sessions=written,
            stanzas=ctx.metrics.handoff_stanzas.value(),
            failed=handed_off.total() - written,
        )


async def _listen_until_signal(
    ctx: ServerContext,
    config: GatewayConfig,
    signals: AsyncIterator[int],
    handler_nursery: trio.Nursery,
    started: Callable[[], None],
) -> None:
    """Open every listener (then call `started`), serve until SIGINT/SIGTERM, drain."""
    async with trio.open_nursery() as listener_nursery:
        ports: list[int] = []
        for listener in config.c2s:
            sockets = await listener_nursery.start(serve_c2s, ctx, listener, handler_nursery)
            ports.extend(s.socket.getsockname()[1] for s in sockets)
        ctx.listen_ports = ports
        for ws_listener in config.websocket:
            # The core's connection task serves what the WebSocket listener accepts.
            serve = partial(serve_wire, ctx, tls=ws_listener.tls, port=ws_listener.port)
            sockets = await listener_nursery.start(
                serve_websocket, ctx, ws_listener, handler_nursery, serve
            )
            ctx.websocket_ports.extend(s.socket.getsockname()[1] for s in sockets)
        started()
        async for signum in signals:
            log.info("shutdown_requested", signal=signal.Signals(signum).name)
            break
        await drain(ctx, signals)
        listener_nursery.cancel_scope.cancel()


#: Cyclic garbage collector thresholds for a server process (Python's are 700, 10, 10).
COLLECTOR_THRESHOLDS = (20_000, 10, 10)


def tune_collector() -> None:
    """Make the cyclic garbage collector run less often.

    Thousands of connections keep millions of objects alive, and with Python's default
    thresholds a burst of connections opening or closing (a flood reaching
    negotiation_timeout together) started full collections again and again, each longer
    than the last (up to 1.4 s with 10,000 connections) and each finding nothing. The
    gateway frees a connection by reference counting (it breaks its own cycles when a
    connection ends, and trio's TLS stream's, see `release_tls`), so collections can be
    rarer; they still run, for whatever cycle a library leaves. With these thresholds
    the same burst pauses the event loop for tens of milliseconds at a time.
    """
    gc.set_threshold(*COLLECTOR_THRESHOLDS)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector (reference counting still frees almost
    everything) while thousands of sessions are torn down at once, on the way out: each
    collection walks every live object, and the burst of deallocations and exceptions
    triggers many (with 10,000 sessions: 13.2 s of hand-off with it, 4.6 s without).
    Not used for the revival at start: it leaves cyclic garbage (one expat parser per
    stored stanza) that tripled the memory when collected only afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


async def revive_sessions(ctx: ServerContext, handler_nursery: trio.Nursery) -> None:
    """Before listening: park again the sessions the last shutdown handed off, so their
    clients can resume them (`gateway.core.handoff`).

    Raises:
        StorageError: the hand-off store failed (the gateway does not start: its sessions
            stay stored for the next attempt).
    """
    if ctx.handoff is None:
        return
    revivable = await ctx.handoff.take_all()
    for item in revivable:
        await handler_nursery.start(serve_revived, ctx, item)
    if revivable:
        log.info("sessions_revived", sessions=len(revivable))


async def _stop_signals(received: AsyncIterator[int]) -> AsyncIterator[int]:
    """SIGINT and SIGTERM. SIGHUP (configuration reload, not supported yet) is logged and
    skipped: caught, because its default action would end the process."""
    async for signum in received:
        if signum == signal.SIGHUP:
            log.warning("sighup_ignored", reason="reload is not supported yet")
            continue
        yield signum


async def drain(ctx: ServerContext, signals: AsyncIterator[int]) -> None:
    """Draining: for `shutdown_grace` seconds new streams get system-shutdown and /healthz
    answers 503 (load balancers move away) while open streams go on. A second signal
    ends the grace at once."""
    ctx.draining = True
    grace = ctx.config.general.shutdown_grace
    log.info("draining", grace=grace, connections=len(ctx.connections))
    with trio.move_on_after(grace):
        async for signum in signals:
            log.info("shutdown_hurried", signal=signal.Signals(signum).name)
            break


async def shutdown(ctx: ServerContext, handler_nursery: trio.Nursery) -> None:
    """Close every stream with system-shutdown; whatever still runs after CLOSE_DEADLINE
    is cancelled (the end of each session still runs, shielded).

    With `handoff_on_shutdown`, resumable sessions (live or parked) are handed off instead
    of ended, in a second step: the sessions that end go first, so what they reroute
    (unacked messages, their unavailable presence) reaches the kept sessions' buffers.
    """
    ctx.draining = True
    handler_nursery.cancel_scope.deadline = trio.current_time() + CLOSE_DEADLINE
    text = "the server is shutting down"
    handoff = (
        ctx.handoff is not None and ctx.config.modules.mod_stream_management.handoff_on_shutdown
    )
    kept = {conn for conn in ctx.connections if handoff and conn.is_resumable}
    # A connection lending its transport to a resumed session ends when that session is
    # done with it (it closes the transport, with system-shutdown, in its own step).
    ending = [conn for conn in ctx.connections if conn not in kept and not conn.is_lending]
    for conn in ending:
        conn.close(StreamErrorCondition.SYSTEM_SHUTDOWN, text)
    with trio.move_on_after(CLOSE_DEADLINE / 2):
        for conn in ending:
            await conn.finished.wait()
    for conn in kept:
        conn.close(StreamErrorCondition.SYSTEM_SHUTDOWN, text, handoff=True)


def _first(group: BaseExceptionGroup[OSError]) -> OSError:
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


def main(argv: Sequence[str] | None = None) -> int:
    """The console script `xmpp-gateway` and `python -m gateway`."""
    args = command_parser().parse_args(argv)
    command = args.command or "serve"
    try:
        config = load_config(args.config)
        if command == "check-config":
            make_ssl_context(config)
            print(f"{args.config}: ok")
            return 0
        if command == "user":
            return run_user_command(args, config)
        configure_logging(config.logging)
        make_ssl_context(config)
        worker: int | None = getattr(args, "worker", None)
        if config.general.workers > 1 and worker is None:
            return trio.run(run_workers, args.config, config.general.workers)
        tune_collector()
        try:
            trio.run(partial(run_server, config, worker=worker))
        except ExceptionGroup as group:
            # e.g. a listener could not bind: report the first OSError as one line.
            matched, _rest = group.split(OSError)
            if matched is None:
                raise
            raise _first(matched) from group
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(f"storage error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # e.g. the port is taken: one line, not a traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
