"""Configuration: `config.yaml` -> frozen, typed objects (STYLE K1-K3).

Every refusal is one `ConfigError` naming the file, the dotted key and the reason, e.g.
``config.yaml: listen.c2s[0].port: must be between 0 and 65535, got 70000``. Unknown keys
are refused too, so a typo never silently falls back to a default. Relative paths are
resolved against the directory of the config file, so the gateway can be started from
anywhere.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from gateway.errors import ConfigError
from gateway.redis_url import check_redis_url
from gateway.xmpp.jid import JID
from gateway.yaml_reader import Reader, read_yaml

T = TypeVar("T")


class TlsMode(enum.Enum):
    """How a c2s listener does TLS."""

    STARTTLS = "starttls"  # offered, optional (PLAIN refused until TLS is up)
    REQUIRED = "required"  # STARTTLS mandatory before SASL
    DIRECT = "direct"  # XEP-0368 direct TLS: TLS from the first byte, ALPN xmpp-client
    NONE = "none"  # plain TCP, e.g. TLS terminated by a trusted proxy


class LogFormat(enum.Enum):
    AUTO = "auto"
    JSON = "json"
    CONSOLE = "console"


@dataclass(frozen=True, slots=True)
class GeneralConfig:
    hosts: tuple[str, ...] = ("localhost",)
    """Domains served (normalised JID domainparts)."""
    max_stanza_size: int = 262144
    """Bytes one stanza may take on the wire; larger -> stream error policy-violation."""
    max_depth: int = 32
    """Element nesting allowed inside one stanza."""
    negotiation_timeout: float = 30.0
    """Seconds from connect until a resource is bound; else stream error connection-timeout."""
    max_auth_failures: int = 3
    """Failed SASL attempts per connection before it is closed with policy-violation."""
    pre_auth_max_stanza_size: int = 8192
    """Bytes one stanza may take before authentication (SASL and STARTTLS need little);
    larger -> stream error policy-violation."""
    stanza_timeout: float = 60.0
    """Seconds one stanza may stay unfinished on the wire (a slow sender holding a half
    stanza); longer -> stream error policy-violation."""
    send_queue_size: int = 1000
    """Stanzas queued for one slow client before it is closed with resource-constraint."""
    send_queue_bytes: int = 10 * 1024 * 1024
    """Bytes of memory queued for one slow client (estimated, `Element.size`) before it is
    closed with resource-constraint."""
    max_connections: int = 0
    """Open client connections (all listeners) before new ones are refused; 0: the
    descriptor limit less a reserve for files and stores."""
    shutdown_grace: float = 5.0
    """Seconds of draining after SIGINT/SIGTERM (new streams refused, /healthz 503)
    before open streams are closed with system-shutdown."""
    workers: int = 1
    """Worker processes serving the same ports (SO_REUSEPORT), each a cluster node; more
    than 1 needs `cluster.redis`, where the nodes share their state."""


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    ip: str = "0.0.0.0"  # noqa: S104 - a server listens on all interfaces by default
    port: int = 5222
    tls: TlsMode = TlsMode.STARTTLS
    proxy_protocol: bool = False


@dataclass(frozen=True, slots=True)
class WebSocketListenerConfig:
    ip: str = "0.0.0.0"  # noqa: S104
    port: int = 5280
    path: str = "/xmpp-websocket"
    tls: TlsMode = TlsMode.NONE
    ping_interval: float = 30.0
    """Seconds between WebSocket pings; a ping unanswered for as long closes the socket
    (the session parks if resumable). 0 disables."""


@dataclass(frozen=True, slots=True)
class TlsConfig:
    certfile: Path | None = None
    keyfile: Path | None = None


@dataclass(frozen=True, slots=True)
class LockoutConfig:
    """`auth.lockout`: failed SASL attempts within `window` seconds that refuse further
    attempts for `duration` seconds; 0 turns a rule off."""

    ip_failures: int = 20
    """Failures from one address (an IPv6 /64), any accounts: that address is refused."""
    account_failures: int = 10
    """Failures on one account, any addresses: addresses that failed on it are refused;
    others (the account's owner) still log in."""
    window: float = 600.0
    duration: float = 900.0


@dataclass(frozen=True, slots=True)
class AuthConfig:
    database: Path = Path("data/gateway.sqlite")
    """SQLite file holding accounts (SCRAM salted credentials only)."""
    scram_iterations: int = 4096
    """PBKDF2 iterations for new credentials (RFC 7677 asks for at least 4096)."""
    lockout: LockoutConfig = field(default_factory=LockoutConfig)
    """Temporary refusal of SASL after repeated failures (password guessing)."""


@dataclass(frozen=True, slots=True)
class StaleHConfig:
    enabled: bool = False
    repeat_after: float = 1800.0
    """Seconds between stale_h garbage collection runs."""
    geriatric: float = 3600.0
    """Seconds a stale_h record is kept."""


@dataclass(frozen=True, slots=True)
class StreamManagementConfig:
    """`modules.mod_stream_management`, with the seed's names and defaults."""

    backend: str = "memory"
    """Where `sm_session` and `stale_h` live: memory (this node) or redis (shared by the
    nodes of a cluster; needs `cluster.redis`)."""
    buffer: bool = True
    buffer_max: int | None = 100
    """Unacked stanzas kept per session; None is `infinity`."""
    buffer_max_bytes: int = 10 * 1024 * 1024
    """Bytes of memory (estimated, `Element.size`) the unacked stanzas of one session may
    hold; more ends the session with resource-constraint, as `buffer_max` does."""
    ack: bool = True
    ack_freq: int = 1
    resume_timeout: float = 600.0
    stale_h: StaleHConfig = field(default_factory=StaleHConfig)
    ack_timeout: float = 60.0
    """Seconds an <r/> may stay unanswered before the transport counts as lost (0: never)."""
    max_parked_per_user: int = 5
    """Parked (resumable, disconnected) sessions one account may have; the oldest ends."""
    max_parked: int = 100_000
    """Parked sessions on this node; the oldest ends beyond it."""
    handoff_on_shutdown: bool = True
    """At shutdown, write resumable sessions to the hand-off store (in `auth.database`)
    instead of ending them; the next start parks them again until resumed or expired."""


@dataclass(frozen=True, slots=True)
class OfflineConfig:
    max_per_user: int = 1000
    max_bytes_per_user: int = 10 * 1024 * 1024
    """Bytes of stored messages one account may hold; more -> service-unavailable."""


@dataclass(frozen=True, slots=True)
class ModulesConfig:
    mod_stream_management: StreamManagementConfig = field(default_factory=StreamManagementConfig)
    mod_offline: OfflineConfig = field(default_factory=OfflineConfig)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    redis: str | None = field(default=None, repr=False)
    """The Redis URL shared by the nodes (`redis://`, `rediss://` or `unix://`); None: a
    single node with embedded state. Kept out of `repr`: it may hold a password."""
    node: str | None = None
    """This node's id in session records, Redis key names and logs (1 to 64 of
    ``A-Za-z0-9._-``); None: the host name and process id."""
    heartbeat: float = 5.0
    """Seconds between this node's heartbeats in Redis; a node that misses 3 counts as
    dead, so this sets how soon a dead node is noticed. 0.1 to 60: faster floods Redis
    with writes, slower notices a dead node minutes late."""


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"
    format: LogFormat = LogFormat.AUTO


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    path: Path = Path("config.yaml")
    general: GeneralConfig = field(default_factory=GeneralConfig)
    c2s: tuple[ListenerConfig, ...] = (ListenerConfig(),)
    websocket: tuple[WebSocketListenerConfig, ...] = ()
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    forwarded_header: str = "x-forwarded-for"
    """The one header trusted proxies maintain on WebSocket requests: x-forwarded-for or
    forwarded (RFC 7239). The other is ignored, so a client cannot inject it."""
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    modules: ModulesConfig = field(default_factory=ModulesConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def serves(self, host: str) -> bool:
        return host in self.general.hosts


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _parse_general(r: Reader) -> GeneralConfig:
    d = GeneralConfig()
    hosts = r.strings("hosts", d.hosts)
    if not hosts:
        raise r.error("hosts", "must name at least one domain")
    normalised = []
    for host in hosts:
        try:
            jid = JID.parse(host)
        except Exception as exc:
            raise r.error("hosts", f"{host!r} is not a valid domain: {exc}") from exc
        if not jid.is_bare or jid.local is not None:
            raise r.error("hosts", f"{host!r} is not a bare domain")
        if jid.domain not in normalised:
            normalised.append(jid.domain)
    g = GeneralConfig(
        hosts=tuple(normalised),
        max_stanza_size=r.integer("max_stanza_size", d.max_stanza_size, 1024, 64 * 1024 * 1024),
        max_depth=r.integer("max_depth", d.max_depth, 4, 256),
        negotiation_timeout=r.seconds("negotiation_timeout", d.negotiation_timeout, 1, 3600),
        max_auth_failures=r.integer("max_auth_failures", d.max_auth_failures, 1, 100),
        send_queue_size=r.integer("send_queue_size", d.send_queue_size, 10, 1_000_000),
        send_queue_bytes=r.integer("send_queue_bytes", d.send_queue_bytes, 65536, 2**40),
        pre_auth_max_stanza_size=r.integer(
            "pre_auth_max_stanza_size", d.pre_auth_max_stanza_size, 1024, 64 * 1024 * 1024
        ),
        stanza_timeout=r.seconds("stanza_timeout", d.stanza_timeout, 1, 3600),
        max_connections=r.integer("max_connections", d.max_connections, 0, 10_000_000),
        shutdown_grace=r.seconds("shutdown_grace", d.shutdown_grace, 0, 600),
        workers=r.integer("workers", d.workers, 1, 256),
    )
    r.done()
    if g.pre_auth_max_stanza_size > g.max_stanza_size:
        if r.has("pre_auth_max_stanza_size"):
            raise r.error("pre_auth_max_stanza_size", "must not be larger than max_stanza_size")
        g = dataclasses.replace(g, pre_auth_max_stanza_size=g.max_stanza_size)
    return g


def _check_ip(r: Reader, value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError as exc:
        raise r.error("ip", f"{value!r} is not an IP address") from exc
    return value


def _parse_c2s(r: Reader) -> ListenerConfig:
    d = ListenerConfig()
    listener = ListenerConfig(
        ip=_check_ip(r, r.string("ip", d.ip)),
        port=r.integer("port", d.port, 0, 65535),
        tls=r.choice("tls", TlsMode, d.tls),
        proxy_protocol=r.boolean("proxy_protocol", d.proxy_protocol),
    )
    r.done()
    return listener


def _parse_websocket(r: Reader) -> WebSocketListenerConfig:
    d = WebSocketListenerConfig()
    listener = WebSocketListenerConfig(
        ip=_check_ip(r, r.string("ip", d.ip)),
        port=r.integer("port", d.port, 0, 65535),
        path=r.string("path", d.path),
        tls=r.choice("tls", TlsMode, d.tls),
        ping_interval=r.seconds("ping_interval", d.ping_interval, 0, 3600),
    )
    r.done()
    if listener.tls not in (TlsMode.NONE, TlsMode.DIRECT):
        # RFC 7395 section 3.9: no STARTTLS over WebSocket; wss is TLS from the start.
        raise r.error("tls", "must be none (ws://, or TLS at a proxy) or direct (wss://)")
    if not listener.path.startswith("/"):
        raise r.error("path", f"must start with /, got {listener.path!r}")
    return listener


def _parse_sm(r: Reader) -> StreamManagementConfig:
    d = StreamManagementConfig()
    backend = r.string("backend", d.backend)
    if backend not in ("memory", "redis"):
        raise r.error("backend", f"must be memory or redis, got {backend!r}")
    raw_max = r.raw("buffer_max")
    buffer_max: int | None
    if raw_max == "infinity":
        buffer_max = None
    else:
        r.seen.discard("buffer_max")
        if isinstance(raw_max, str):
            raise r.error("buffer_max", f"must be a positive integer or infinity, got {raw_max!r}")
        buffer_max = r.integer("buffer_max", 100, 1, 10_000_000)
    s = r.section("stale_h")
    ds = StaleHConfig()
    stale_h = StaleHConfig(
        enabled=s.boolean("enabled", ds.enabled),
        repeat_after=s.seconds("repeat_after", ds.repeat_after, 1, 86400 * 365),
        geriatric=s.seconds("geriatric", ds.geriatric, 1, 86400 * 365),
    )
    s.done()
    sm = StreamManagementConfig(
        backend=backend,
        buffer=r.boolean("buffer", d.buffer),
        buffer_max=buffer_max,
        ack=r.boolean("ack", d.ack),
        ack_freq=r.integer("ack_freq", d.ack_freq, 1, 1_000_000),
        resume_timeout=r.seconds("resume_timeout", d.resume_timeout, 1, 86400 * 7),
        stale_h=stale_h,
        ack_timeout=r.seconds("ack_timeout", d.ack_timeout, 0, 86400),
        max_parked_per_user=r.integer("max_parked_per_user", d.max_parked_per_user, 1, 1000),
        max_parked=r.integer("max_parked", d.max_parked, 1, 10_000_000),
        buffer_max_bytes=r.integer("buffer_max_bytes", d.buffer_max_bytes, 65536, 2**40),
        handoff_on_shutdown=r.boolean("handoff_on_shutdown", d.handoff_on_shutdown),
    )
    r.done()
    return sm


def _parse_lockout(r: Reader) -> LockoutConfig:
    d = LockoutConfig()
    lockout = LockoutConfig(
        ip_failures=r.integer("ip_failures", d.ip_failures, 0, 1_000_000),
        account_failures=r.integer("account_failures", d.account_failures, 0, 1_000_000),
        window=r.seconds("window", d.window, 1, 86400 * 7),
        duration=r.seconds("duration", d.duration, 1, 86400 * 7),
    )
    r.done()
    return lockout


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate a config file.

    Args:
        path: the YAML file.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: naming the file, the dotted key and the reason.
    """
    p = Path(path)
    file = str(path)
    data = read_yaml(p, file)
    return parse_config(data, file=file, base=p.resolve().parent)


def parse_config(
    data: object, *, file: str = "config.yaml", base: Path | None = None
) -> GatewayConfig:
    """Validate an already-loaded YAML document (see `load_config`)."""
    base = base or Path.cwd()
    root = Reader(file, "", data)
    general = _parse_general(root.section("general"))

    listen = root.section("listen")
    c2s = (
        tuple(_parse_c2s(r) for r in listen.items("c2s"))
        if listen.has("c2s")
        else (ListenerConfig(),)
    )
    websocket = tuple(_parse_websocket(r) for r in listen.items("websocket"))
    listen.done()
    if not c2s and not websocket:
        raise ConfigError(file, "listen", "no listener configured")

    proxies = []
    for cidr in root.strings("trusted_proxies", ()):
        try:
            proxies.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError as exc:
            raise root.error("trusted_proxies", f"{cidr!r} is not a CIDR network") from exc

    forwarded_header = root.string("forwarded_header", "x-forwarded-for").lower()
    if forwarded_header not in ("x-forwarded-for", "forwarded"):
        raise root.error(
            "forwarded_header", f"must be x-forwarded-for or forwarded, got {forwarded_header!r}"
        )

    t = root.section("tls")
    tls = TlsConfig(
        certfile=t.path_value("certfile", None, base),
        keyfile=t.path_value("keyfile", None, base),
    )
    t.done()
    tls_modes = [listener.tls for listener in c2s] + [listener.tls for listener in websocket]
    if any(mode is not TlsMode.NONE for mode in tls_modes):
        for name in ("certfile", "keyfile"):
            value: Path | None = getattr(tls, name)
            if value is None:
                raise ConfigError(file, f"tls.{name}", "is required by a TLS listener")
            if not value.is_file():
                raise ConfigError(
                    file,
                    f"tls.{name}",
                    f"{value} does not exist (make a development pair with "
                    "`python scripts/make_cert.py`)",
                )

    a = root.section("auth")
    da = AuthConfig()
    database = a.path_value("database", da.database, base)
    assert database is not None  # a default is given
    auth = AuthConfig(
        database=database,
        scram_iterations=a.integer("scram_iterations", da.scram_iterations, 4096, 1_000_000),
        lockout=_parse_lockout(a.section("lockout")),
    )
    a.done()

    m = root.section("modules")
    sm = _parse_sm(m.section("mod_stream_management"))
    o = m.section("mod_offline")
    do = OfflineConfig()
    offline = OfflineConfig(
        max_per_user=o.integer("max_per_user", do.max_per_user, 0, 1_000_000),
        max_bytes_per_user=o.integer("max_bytes_per_user", do.max_bytes_per_user, 65536, 2**40),
    )
    o.done()
    m.done()

    cl = root.section("cluster")
    dc = ClusterConfig()
    node = cl.raw("node")
    if node is not None and (not isinstance(node, str) or not _NODE_ID.fullmatch(node)):
        raise cl.error("node", "must be 1 to 64 letters, digits, '.', '_' or '-'")
    cluster = ClusterConfig(
        redis=check_redis_url(cl, "redis"),
        node=node,
        heartbeat=cl.seconds("heartbeat", dc.heartbeat, 0.1, 60),
    )
    cl.done()
    _check_cluster(file, general, sm, cluster)
    if general.workers > 1:
        # Workers share each listener's port (SO_REUSEPORT); port 0 would give each its
        # own random port, so clients would reach only some of them.
        ports = [("c2s", i, item.port) for i, item in enumerate(c2s)]
        ports += [("websocket", i, item.port) for i, item in enumerate(websocket)]
        for kind, index, port in ports:
            if port == 0:
                raise ConfigError(
                    file,
                    f"listen.{kind}[{index}].port",
                    f"must be a fixed port with general.workers: {general.workers} "
                    "(the workers share it; 0 would give each worker another port)",
                )

    lg = root.section("logging")
    level = lg.string("level", "info").lower()
    if level not in LOG_LEVELS:
        raise lg.error("level", f"must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    logging_cfg = LoggingConfig(level=level, format=lg.choice("format", LogFormat, LogFormat.AUTO))
    lg.done()
    root.done()

    return GatewayConfig(
        path=Path(file),
        general=general,
        c2s=c2s,
        websocket=websocket,
        trusted_proxies=tuple(proxies),
        forwarded_header=forwarded_header,
        tls=tls,
        auth=auth,
        modules=ModulesConfig(mod_stream_management=sm, mod_offline=offline),
        logging=logging_cfg,
        cluster=cluster,
    )


def _check_cluster(
    file: str, general: GeneralConfig, sm: StreamManagementConfig, cluster: ClusterConfig
) -> None:
    """Keys that only make sense together: several nodes share their state in Redis."""
    if general.workers > 1 and cluster.redis is None:
        raise ConfigError(
            file,
            "general.workers",
            f"{general.workers} worker processes need cluster.redis (each worker is a node, "
            "and nodes share sessions through Redis); set it, or workers: 1",
        )
    if sm.backend == "redis" and cluster.redis is None:
        raise ConfigError(
            file,
            "modules.mod_stream_management.backend",
            "redis needs cluster.redis (the Redis URL); without a cluster use memory",
        )
    if sm.backend != "redis" and cluster.redis is not None:
        raise ConfigError(
            file,
            "modules.mod_stream_management.backend",
            f"must be redis when cluster.redis is set, got {sm.backend}: with per-node "
            "tables a resume arriving at another node would get item-not-found; set "
            "modules.mod_stream_management.backend: redis",
        )


__all__ = [
    "AuthConfig",
    "ClusterConfig",
    "GatewayConfig",
    "GeneralConfig",
    "ListenerConfig",
    "LockoutConfig",
    "LogFormat",
    "LoggingConfig",
    "StreamManagementConfig",
    "TlsMode",
    "WebSocketListenerConfig",
    "load_config",
    "parse_config",
]
