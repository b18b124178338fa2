"""SIGTERM drains (issue 4): /healthz 503 and new streams refused during the grace, open
streams served until it ends, then closed with system-shutdown; exit 0."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import trio

from tests.helpers.client import RawClient
from tests.integration.test_slixmpp import ROOT, _free_port, _gateway

PASSWORD = "drain-pass"


def _start(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int, int, Path]:
    c2s, ws = _free_port(), _free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
general: {{hosts: [localhost], shutdown_grace: 3}}
listen:
  c2s: [{{ip: 127.0.0.1, port: {c2s}, tls: none}}]
  websocket: [{{ip: 127.0.0.1, port: {ws}, path: /xmpp-websocket}}]
auth: {{database: data/accounts.sqlite}}
logging: {{level: info, format: json}}
"""
    )
    assert (
        _gateway(
            "user", "add", "alice@localhost", "--password", PASSWORD, "--config", str(config)
        ).returncode
        == 0
    )
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", ws), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    return proc, c2s, ws, log


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
    proc, c2s, ws, log = _start(tmp_path)
    try:
        with trio.fail_after(30):
            assert await _health(ws) == b"200"
            alice = RawClient(await trio.open_tcp_stream("127.0.0.1", c2s))
            await alice.login("alice", PASSWORD, mechanism="PLAIN", resource="open")
            proc.send_signal(signal.SIGTERM)
            while b'"draining"' not in log.read_bytes():
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
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
