"""PROXY protocol v1/v2 on c2s listeners: trusted proxies only, the real address logged."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest
import structlog
import trio
import trio.testing

from gateway.net.tcp import PrefixStream
from tests.helpers.accounts import PASSWORD
from tests.helpers.client import RawClient, StreamEnd
from tests.helpers.inprocess import GatewayFactory

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def _v2_ipv4(src: str, dst: str, sport: int, dport: int) -> bytes:
    body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


PROXIED = {
    "listen": {"c2s": [{"ip": "127.0.0.1", "port": 0, "tls": "none", "proxy_protocol": True}]}
}


async def test_prefix_stream_is_a_conforming_two_way_stream() -> None:
    async def pair() -> tuple[trio.abc.Stream, trio.abc.Stream]:
        left, right = trio.testing.memory_stream_pair()
        return PrefixStream(b"", left), right

    async def clogged() -> tuple[trio.abc.Stream, trio.abc.Stream]:
        left, right = trio.testing.lockstep_stream_pair()
        return PrefixStream(b"", left), right

    await trio.testing.check_two_way_stream(pair, clogged)


async def test_prefix_stream_replays_its_prefix_first() -> None:
    left, right = trio.testing.memory_stream_pair()
    stream = PrefixStream(b"<stream", left)
    await right.send_all(b":stream>")
    assert await stream.receive_some(4) == b"<str"
    assert await stream.receive_some() == b"eam"
    assert await stream.receive_some() == b":stream>"


@pytest.fixture
def log_lines() -> Iterator[structlog.testing.LogCapture]:
    """Log events with the connection's context variables merged in, as in production."""
    capture = structlog.testing.LogCapture()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, capture])
    try:
        yield capture
    finally:
        structlog.reset_defaults()


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 203.0.113.9 127.0.0.1 4321 5222\r\n",
        _v2_ipv4("203.0.113.9", "127.0.0.1", 4321, 5222),
    ],
    ids=["v1", "v2"],
)
async def test_trusted_proxy_header_gives_the_real_client_address(
    gateway_factory: GatewayFactory, header: bytes, log_lines: structlog.testing.LogCapture
) -> None:
    with trio.fail_after(10):
        ctx, _ = await gateway_factory(**PROXIED, trusted_proxies=["127.0.0.1/32"])
        stream = await trio.open_tcp_stream("127.0.0.1", ctx.listen_ports[0])
        # The header and the start of the XMPP stream in one packet, as HAProxy sends them.
        client = RawClient(stream)
        await stream.send_all(header)
        jid = await client.login("alice", PASSWORD, mechanism="PLAIN", resource="p")
        assert jid == "alice@localhost/p"
        await client.close()
        while not [e for e in log_lines.entries if e["event"] == "connection_closed"]:
            await trio.sleep(0.01)
    # Every line of the connection carries the client's address and the proxy's.
    lines = [e for e in log_lines.entries if e.get("conn_id")]
    assert {e["event"] for e in lines} >= {
        "connection_opened",
        "authenticated",
        "connection_closed",
    }
    assert {e["peer"] for e in lines} == {"203.0.113.9:4321 via 127.0.0.1"}


async def test_proxy_header_from_an_untrusted_address_is_refused(
    gateway_factory: GatewayFactory,
) -> None:
    with trio.fail_after(10), structlog.testing.capture_logs() as logs:
        ctx, _ = await gateway_factory(**PROXIED, trusted_proxies=["10.0.0.0/8"])
        stream = await trio.open_tcp_stream("127.0.0.1", ctx.listen_ports[0])
        client = RawClient(stream)
        await stream.send_all(b"PROXY TCP4 203.0.113.9 127.0.0.1 4321 5222\r\n")
        with pytest.raises((StreamEnd, trio.BrokenResourceError)):
            await client.open()
    refused = [e for e in logs if e["event"] == "proxy_refused"]
    assert refused and "trusted_proxies" in refused[0]["reason"]


@pytest.mark.parametrize(
    "data",
    [
        b"<?xml version='1.0'?><stream:stream>",  # a client that skipped the proxy
        b"PROXY TCP4 999.1.1.1 127.0.0.1 1 2\r\n",
        V2_SIGNATURE + bytes([0x21, 0x12, 0, 12]) + bytes(12),  # DGRAM
    ],
    ids=["no-header", "bad-v1-address", "v2-datagram"],
)
async def test_bad_or_missing_proxy_header_is_refused_with_a_log_line(
    gateway_factory: GatewayFactory, data: bytes
) -> None:
    with trio.fail_after(10), structlog.testing.capture_logs() as logs:
        ctx, _ = await gateway_factory(**PROXIED, trusted_proxies=["127.0.0.1/32"])
        stream = await trio.open_tcp_stream("127.0.0.1", ctx.listen_ports[0])
        await stream.send_all(data)
        assert await stream.receive_some(100) == b""  # closed, no XML answered
    assert [e for e in logs if e["event"] == "proxy_refused"]
