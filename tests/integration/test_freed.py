"""An ended connection is freed by reference counting, not left for the cyclic collector.

The gateway runs the collector rarely (`gateway.app.tune_collector`), so a cycle left by
each ended connection holds its memory (~20 KiB: parser, TLS buffers, negotiation state)
until a full collection: with a thousand clients logging in and out that is tens of
megabytes the process does not need. These tests run with the collector off and look for
any object of the connection left behind.
"""

from __future__ import annotations

import gc
import ssl
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from gateway.core.connection import Connection
from gateway.core.negotiate import Negotiator
from gateway.core.session import Session
from gateway.net.wire import StreamWire
from gateway.xmpp.negotiation import C2SNegotiation
from tests.helpers.accounts import PASSWORD
from tests.helpers.inprocess import GatewayFactory
from tests.helpers.sm import RESUMABLE, Peer


@pytest.fixture
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def left_behind() -> dict[str, int]:
    """Objects of ended connections still in memory (the collector is off); only kinds
    the test's own clients do not use (they keep their parsers and TLS objects)."""
    kinds = (Connection, Session, Negotiator, C2SNegotiation, StreamWire)
    counts = {kind.__name__: 0 for kind in kinds}
    for obj in gc.get_objects():
        for kind in kinds:
            if isinstance(obj, kind):
                counts[kind.__name__] += 1
    return counts


NOTHING = {"Connection": 0, "Session": 0, "Negotiator": 0, "C2SNegotiation": 0, "StreamWire": 0}


@pytest.mark.parametrize("listener", [0, 2], ids=["starttls", "plain"])
async def test_a_connection_that_logged_in_and_out_leaves_nothing_for_the_collector(
    gateway_factory: GatewayFactory,
    client_tls: ssl.SSLContext,
    collector_off: None,
    listener: int,
) -> None:
    _ctx, connect = await gateway_factory()
    for _ in range(3):
        client = await connect(listener)
        await client.login(
            "alice", PASSWORD, tls=client_tls if listener == 0 else None, mechanism="PLAIN"
        )
        await client.send("<presence/>")
        await client.receive()  # its own presence, reflected
        await client.close()
    await trio.testing.wait_all_tasks_blocked()
    assert left_behind() == NOTHING


async def test_a_resumable_session_that_ends_leaves_nothing_for_the_collector(
    gateway_factory: GatewayFactory, collector_off: None
) -> None:
    _ctx, connect = await gateway_factory()
    client = await connect(2)
    await client.login("bob", PASSWORD, resource="phone", mechanism="PLAIN")
    peer = Peer(client)
    await peer.enable(RESUMABLE)
    await client.close()
    await trio.testing.wait_all_tasks_blocked()
    assert left_behind() == NOTHING


async def test_a_connection_that_never_logged_in_leaves_nothing_for_the_collector(
    gateway_factory: GatewayFactory, collector_off: None
) -> None:
    _ctx, connect = await gateway_factory()
    for _ in range(3):
        client = await connect(2)
        await client.open()
        failure = await client.auth("alice", "wrong", "PLAIN")
        assert failure.name == "failure"
        await client.close()
    await trio.testing.wait_all_tasks_blocked()
    assert left_behind() == NOTHING
