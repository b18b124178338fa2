"""Shared fixtures: an in-process gateway on loopback port 0, accounts, TLS from trustme.

The plain helpers these are built from (config, accounts, starting, connecting) are in
`tests/helpers/inprocess.py` and `tests/helpers/accounts.py`: tests import those, never
this module.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
import trustme

from gateway.config import GatewayConfig
from gateway.core.context import ServerContext
from tests.helpers.client import RawClient
from tests.helpers.inprocess import (
    Connect,
    GatewayFactory,
    add_accounts,
    close_clients,
    connector,
    make_config,
    start_connectable,
    start_gateway,
)
from tests.helpers.redis import RedisServer, run_redis


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """A throwaway certificate authority for the session."""
    return trustme.CA()


@pytest.fixture(scope="session")
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    """A client TLS context that trusts `ca`."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def cert_files(tmp_path: Path, ca: trustme.CA) -> tuple[Path, Path]:
    """(certificate chain, key) files for localhost, issued by `ca`."""
    cert = ca.issue_cert("localhost")
    certfile, keyfile = tmp_path / "localhost.pem", tmp_path / "localhost.key"
    cert.private_key_pem.write_to_path(str(keyfile))
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(certfile), append=True)
    return certfile, keyfile


@pytest.fixture
def config(tmp_path: Path, cert_files: tuple[Path, Path]) -> GatewayConfig:
    """`make_config()` in tmp_path, with USERS (PASSWORD) in its database."""
    cfg = make_config(tmp_path, cert_files)
    add_accounts(cfg)
    return cfg


@pytest.fixture
async def gateway(nursery: trio.Nursery, config: GatewayConfig) -> ServerContext:
    """A gateway on `config`, in this process, for the test."""
    return await start_gateway(nursery, config)


@pytest.fixture
async def connect(gateway: ServerContext) -> AsyncIterator[Connect]:
    """A Connect to `gateway` (see `connector()`); its clients are closed afterwards."""
    clients: list[RawClient] = []
    yield connector(gateway, clients)
    await close_clients(clients)


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
        add_accounts(cfg)
        return await start_connectable(nursery, cfg, clients)

    yield _start
    await close_clients(clients)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the whole test session (see tests/helpers/redis.py)."""
    yield from run_redis(tmp_path_factory.mktemp("redis"))


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of an empty Redis database for one test."""
    redis_server.cli("flushall")
    return redis_server.url
