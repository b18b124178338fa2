"""The gateway in this process, for tests: its config, its accounts, starting it, connecting.

`tests/conftest.py` builds its fixtures (`config`, `gateway`, `connect`,
`gateway_factory`) from these; tests that need more than one gateway on the same database
(a restart, `test_handoff.py`) use them directly.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
import trio.testing

from gateway.app import run_server
from gateway.config import GatewayConfig, parse_config
from gateway.core.connection import serve_connection
from gateway.core.context import ServerContext
from gateway.core.session import Session
from gateway.net.transport import PeerInfo, StreamTransport
from gateway.storage.sqlite import SqliteAccountStore
from gateway.xmpp.jid import JID
from tests.helpers.accounts import PASSWORD, USERS
from tests.helpers.client import RawClient

# What the gateway sees as the address of a client connected over a memory stream.
MEMORY_PEER = PeerInfo("192.0.2.7", 40000)

Connect = Callable[..., Awaitable[RawClient]]
"""`await connect(index=0, *, memory=False)`: a RawClient to listener `index`."""

GatewayFactory = Callable[..., Awaitable[tuple[ServerContext, Connect]]]
"""`await gateway_factory(**overrides)`: a started gateway and its Connect."""


def make_config(
    tmp_path: Path, cert_files: tuple[Path, Path], **overrides: object
) -> GatewayConfig:
    """The test config: hosts localhost and example.org, four c2s listeners on loopback
    port 0 (0 starttls, 1 required, 2 none, 3 direct TLS), the database in `tmp_path`,
    warning-level console logs; `overrides` replace whole top-level sections."""
    certfile, keyfile = cert_files
    data: dict[str, object] = {
        "general": {"hosts": ["localhost", "example.org"], "negotiation_timeout": 10},
        "listen": {
            "c2s": [
                {"ip": "127.0.0.1", "port": 0, "tls": "starttls"},
                {"ip": "127.0.0.1", "port": 0, "tls": "required"},
                {"ip": "127.0.0.1", "port": 0, "tls": "none"},
                {"ip": "127.0.0.1", "port": 0, "tls": "direct"},
            ]
        },
        "tls": {"certfile": str(certfile), "keyfile": str(keyfile)},
        "auth": {"database": str(tmp_path / "accounts.sqlite")},
        "logging": {"level": "warning", "format": "console"},
    }
    data.update(overrides)
    return parse_config(data, file=str(tmp_path / "config.yaml"), base=tmp_path)


def add_accounts(config: GatewayConfig) -> None:
    """Create USERS@localhost, each with PASSWORD, in the config's account database."""
    with SqliteAccountStore(config.auth.database) as store:
        for user in USERS:
            store.add_user("localhost", user, PASSWORD)


async def start_gateway(nursery: trio.Nursery, config: GatewayConfig) -> ServerContext:
    """An in-process gateway. Storage runs inline (no worker threads), so tests may use
    `autojump_clock` (STYLE V3)."""
    ctx: ServerContext = await nursery.start(
        functools.partial(run_server, config, inline_storage=True)
    )
    return ctx


def serve_memory_client(
    gateway: ServerContext,
    index: int,
    *,
    peer: PeerInfo = MEMORY_PEER,
    lockstep: bool = False,
) -> RawClient:
    """A RawClient whose connection listener `index` serves over a trio memory stream
    pair, seen as coming from `peer`; with `lockstep` the pair has no buffer at all (a
    write waits for the other side to read)."""
    pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
    client_stream, server_stream = pair()
    transport = StreamTransport(server_stream, peer)
    assert gateway.handler_nursery is not None
    gateway.handler_nursery.start_soon(
        serve_connection, gateway, gateway.config.c2s[index], transport
    )
    return RawClient(client_stream)


def connector(gateway: ServerContext, clients: list[RawClient]) -> Connect:
    """Open a RawClient to listener `index` (0 starttls, 1 required, 2 none).

    `memory=True` serves it over a trio memory stream pair instead of loopback TCP (use
    it with `autojump_clock`: real sockets and a jumping clock do not mix). Every client
    opened is appended to `clients`, for the caller to close.
    """

    async def _connect(index: int = 0, *, memory: bool = False) -> RawClient:
        if memory:
            client = serve_memory_client(gateway, index)
        else:
            stream = await trio.open_tcp_stream("127.0.0.1", gateway.listen_ports[index])
            client = RawClient(stream)
        clients.append(client)
        return client

    return _connect


async def start_connectable(
    nursery: trio.Nursery, config: GatewayConfig, clients: list[RawClient]
) -> tuple[ServerContext, Connect]:
    """`start_gateway()`, and a Connect to it whose clients go into `clients`."""
    ctx = await start_gateway(nursery, config)
    return ctx, connector(ctx, clients)


async def close_clients(clients: list[RawClient]) -> None:
    """Close every client's stream (bounded: a second each)."""
    for client in clients:
        with trio.move_on_after(1):
            await client.stream.aclose()


async def local_session(gateway: ServerContext, full_jid: str) -> Session | None:
    """The session of this node bound to `full_jid`, looked up in the directory."""
    resource = await gateway.router.directory.resource(JID.parse(full_jid))
    if resource is None or resource.node != gateway.router.directory.node:
        return None  # (held by another node of a cluster)
    assert isinstance(resource.handle, Session), resource
    return resource.handle
