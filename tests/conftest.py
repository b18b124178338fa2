"""Shared fixtures: an in-process gateway on loopback port 0, accounts, TLS from trustme."""

from __future__ import annotations

import functools
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from gateway.app import run_server
from gateway.config import GatewayConfig, parse_config
from gateway.core.connection import serve_connection
from gateway.core.context import ServerContext
from gateway.net.transport import PeerInfo, StreamTransport
from gateway.storage.sqlite import SqliteAccountStore
from tests.helpers.client import RawClient

PASSWORD = "correct horse battery staple"
USERS = ("alice", "bob", "carol")


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def cert_files(tmp_path: Path, ca: trustme.CA) -> tuple[Path, Path]:
    cert = ca.issue_cert("localhost")
    certfile, keyfile = tmp_path / "localhost.pem", tmp_path / "localhost.key"
    cert.private_key_pem.write_to_path(str(keyfile))
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(certfile), append=True)
    return certfile, keyfile


def make_config(
    tmp_path: Path, cert_files: tuple[Path, Path], **overrides: object
) -> GatewayConfig:
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


@pytest.fixture
def config(tmp_path: Path, cert_files: tuple[Path, Path]) -> GatewayConfig:
    cfg = make_config(tmp_path, cert_files)
    store = SqliteAccountStore(cfg.auth.database)
    for user in USERS:
        store.add_user("localhost", user, PASSWORD)
    store.close()
    return cfg


async def start_gateway(nursery: trio.Nursery, config: GatewayConfig) -> ServerContext:
    """An in-process gateway. Storage runs inline (no worker threads), so tests may use
    `autojump_clock` (STYLE V3)."""
    ctx: ServerContext = await nursery.start(
        functools.partial(run_server, config, inline_storage=True)
    )
    return ctx


@pytest.fixture
async def gateway(nursery: trio.Nursery, config: GatewayConfig) -> ServerContext:
    return await start_gateway(nursery, config)


Connect = Callable[..., Awaitable[RawClient]]


def connector(nursery: trio.Nursery, gateway: ServerContext, clients: list[RawClient]) -> Connect:
    """Open a RawClient to listener `index` (0 starttls, 1 required, 2 none).

    `memory=True` serves it over a trio memory stream pair instead of loopback TCP (use
    it with `autojump_clock`: real sockets and a jumping clock do not mix).
    """

    async def _connect(index: int = 0, *, memory: bool = False) -> RawClient:
        if memory:
            client_stream, server_stream = trio.testing.memory_stream_pair()
            transport = StreamTransport(server_stream, PeerInfo("192.0.2.7", 40000))
            assert gateway.handler_nursery is not None
            gateway.handler_nursery.start_soon(
                serve_connection, gateway, gateway.config.c2s[index], transport
            )
            client = RawClient(client_stream)
        else:
            stream = await trio.open_tcp_stream("127.0.0.1", gateway.listen_ports[index])
            client = RawClient(stream)
        clients.append(client)
        return client

    return _connect


@pytest.fixture
async def connect(nursery: trio.Nursery, gateway: ServerContext) -> AsyncIterator[Connect]:
    clients: list[RawClient] = []
    yield connector(nursery, gateway, clients)
    for client in clients:
        with trio.move_on_after(1):
            await client.stream.aclose()


GatewayFactory = Callable[..., Awaitable[tuple[ServerContext, Connect]]]


@pytest.fixture
async def gateway_factory(
    nursery: trio.Nursery, tmp_path: Path, cert_files: tuple[Path, Path]
) -> AsyncIterator[GatewayFactory]:
    """Start a gateway with config sections overridden, e.g.
    `await gateway_factory(modules={"mod_stream_management": {"buffer_max": 8}})`;
    returns it and a connect function. Accounts: USERS with PASSWORD."""
    clients: list[RawClient] = []
    count = 0

    async def _start(**overrides: object) -> tuple[ServerContext, Connect]:
        nonlocal count
        count += 1
        directory = tmp_path / f"gateway{count}"
        directory.mkdir()
        cfg = make_config(directory, cert_files, **overrides)
        with SqliteAccountStore(cfg.auth.database) as store:
            for user in USERS:
                store.add_user("localhost", user, PASSWORD)
        ctx = await start_gateway(nursery, cfg)
        return ctx, connector(nursery, ctx, clients)

    yield _start
    for client in clients:
        with trio.move_on_after(1):
            await client.stream.aclose()
