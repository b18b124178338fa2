"""SIGTERM drains: /healthz 503 and new streams refused during the grace, open
streams served until it ends, then closed with system-shutdown; exit 0. SIGHUP changes nothing."""

from __future__ import annotations

import signal
from pathlib import Path

import trio

from tests.helpers.client import RawClient
from tests.helpers.live import live_gateway

PASSWORD = "drain-pass"


CONFIG = """
general: {hosts: [localhost], shutdown_grace: 3}
listen:
  c2s: [{ip: 127.0.0.1, port: $c2s, tls: none}]
  websocket: [{ip: 127.0.0.1, port: $ws, path: /xmpp-websocket}]
auth: {database: data/accounts.sqlite}
logging: {level: info, format: json}
"""


async def _health(port: int) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: lb\r\n\r\n")
    response = b""
    while chunk := await stream.receive_some():
        response += chunk
    return response.split(b" ")[1]


async def test_sigterm_drains_then_closes_with_system_shutdown_and_exits_zero(
    tmp_path: Path,
) -> None:
    with live_gateway(
        tmp_path,
        CONFIG,
        password=PASSWORD,
        ports=("c2s", "ws"),
        users=("alice",),
        check_config=False,
        wait_for=("ws",),
        stop="kill",
    ) as gateway:
        proc, c2s, ws, log = gateway.proc, gateway.ports["c2s"], gateway.ports["ws"], gateway.log
        with trio.fail_after(30):
            assert await _health(ws) == b"200"
            alice = RawClient(await trio.open_tcp_stream("127.0.0.1", c2s))
            await alice.login("alice", PASSWORD, mechanism="PLAIN", resource="open")
            # SIGHUP (no reload yet) is logged and changes nothing, before the drain...
            proc.send_signal(signal.SIGHUP)
            while b'"sighup_ignored"' not in log.read_bytes():
                await trio.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            while b'"draining"' not in log.read_bytes():
                await trio.sleep(0.02)
            # ...and during it: it does not hurry the grace as a second SIGTERM would.
            proc.send_signal(signal.SIGHUP)
            while log.read_bytes().count(b'"sighup_ignored"') < 2:
                await trio.sleep(0.02)
            assert await _health(ws) == b"503"
            newcomer = RawClient(await trio.open_tcp_stream("127.0.0.1", c2s))
            await newcomer.send(
                "<stream:stream to='localhost' version='1.0' xmlns='jabber:client' "
                "xmlns:stream='http://etherx.jabber.org/streams'>"
            )
            assert await newcomer.expect_stream_error() == "system-shutdown"
            # The open stream is still served during the grace...
            await alice.send(
                "<iq type='get' id='p' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
            )
            assert (await alice.receive()).get("id") == "p"
            # ...and closed with system-shutdown when it ends.
            assert await alice.expect_stream_error() == "system-shutdown"
        assert proc.wait(timeout=20) == 0
