"""scripts/bench.py: its XML splitter, figures helpers, and one run against a fake server."""

from __future__ import annotations

import base64
import contextlib
import functools
import math
import os
import sys
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import bench  # the load generator script, imported as a module

from gateway.xmpp import sasl

# --- StreamParser -----------------------------------------------------------------------

HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' id='s1' version='1.0'>"
)


def test_parser_splits_stanzas_fed_byte_by_byte() -> None:
    parser = bench.StreamParser()
    data = HEADER + (
        b"<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
        b"<mechanism>PLAIN</mechanism></mechanisms></stream:features>"
        b"<message to='a@b/c'><body>1 &amp; 2</body></message> <r xmlns='urn:xmpp:sm:3'/>"
    )
    for index in range(len(data)):
        parser.feed(data[index : index + 1])
    assert parser.stream_attrs is not None
    assert parser.stream_attrs["id"] == "s1"
    features, message, request = parser.events
    mechanisms = features.find(bench.T_MECHANISMS)
    assert mechanisms is not None
    assert [m.text for m in mechanisms.children] == ["PLAIN"]
    assert message.tag == bench.T_MESSAGE
    assert message.attrs["to"] == "a@b/c"
    body = message.find(bench.T_BODY)
    assert body is not None
    assert body.text == "1 & 2"
    assert request.tag == bench.T_SM_R
    assert not parser.closed
    parser.feed(b"</stream:stream>")
    assert parser.closed


def test_parser_names_stream_error_condition() -> None:
    parser = bench.StreamParser()
    parser.feed(
        HEADER + b"<stream:error><host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
        b"</stream:error>"
    )
    (error,) = parser.events
    assert error.tag == bench.T_STREAM_ERROR
    assert error.first_child_name() == "host-unknown"


@pytest.mark.parametrize(
    "data",
    [
        b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'b'>]><stream:stream/>",
        HEADER + b"<message><body></message>",
        b"<message/>",
    ],
    ids=["dtd", "malformed", "not-a-stream"],
)
def test_parser_rejects_bad_input(data: bytes) -> None:
    with pytest.raises(bench.BenchError):
        bench.StreamParser().feed(data)


# --- figures helpers and CLI ---------------------------------------------------------------


def test_percentile_nearest_rank() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert bench.percentile(values, 50) == 3.0
    assert bench.percentile(values, 99) == 5.0
    assert bench.percentile(values, 0) == 1.0
    assert bench.percentile(list(map(float, range(1, 101))), 99) == 99.0
    assert math.isnan(bench.percentile([], 50))


def test_proc_readers_on_own_process() -> None:
    rss = bench.read_rss_kib(os.getpid())
    cpu = bench.read_cpu_seconds(os.getpid())
    assert rss is not None
    assert rss > 1000
    assert cpu is not None
    assert cpu > 0
    assert bench.read_rss_kib(2**22 + 7) is None  # above Linux's pid_max limit


def test_only_loopback_targets() -> None:
    bench.check_loopback("127.0.0.1", 5222)
    with pytest.raises(SystemExit, match="non-loopback"):
        bench.check_loopback("192.0.2.1", 5222)


@pytest.mark.parametrize("argv", [["--clients", "0"], ["--rate", "-1"], ["--window", "0"]])
def test_cli_rejects_bad_numbers(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


def test_scram_key_cache_derives_once_and_still_authenticates() -> None:
    # RFC 7677 section 3 test vector through ScramClient's key cache, as the bench uses it.
    server_first = (
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    before = bench.PBKDF2_RUNS()
    cache = bench.KEY_CACHES.setdefault("vector-user", {})
    for _ in range(3):
        client = sasl.ScramClient(
            "sha256", "user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO", key_cache=cache
        )
        final = client.final(server_first)
        assert final.endswith(b",p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
        client.verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    assert bench.PBKDF2_RUNS() == before + 1


# --- a whole run against a minimal fake server (no TLS, PLAIN, bind, SM, routing) ---------


Route = tuple[trio.SocketStream, trio.Lock]


async def _fake_server(stream: trio.SocketStream, routes: dict[str, Route]) -> None:
    parser = bench.StreamParser()
    lock = trio.Lock()

    async def send_to(route: Route, data: bytes) -> None:
        async with route[1]:
            await route[0].send_all(data)

    async def next_node() -> bench.Node:
        while not parser.events:
            data = b"" if parser.closed else await stream.receive_some(65536)
            if not data:
                raise trio.ClosedResourceError("client closed")
            parser.feed(data)
        return parser.events.popleft()

    async def open_stream(features: bytes) -> None:
        while parser.stream_attrs is None:
            parser.feed(await stream.receive_some(65536))
        await stream.send_all(HEADER + b"<stream:features>" + features + b"</stream:features>")

    await open_stream(
        b"<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>PLAIN</mechanism>"
        b"</mechanisms>"
    )
    auth = await next_node()
    user = base64.b64decode(auth.text).split(b"\0")[1].decode()
    await stream.send_all(b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
    parser = bench.StreamParser()
    await open_stream(
        b"<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/><sm xmlns='urn:xmpp:sm:3'/>"
    )
    jid = f"{user}@localhost/r"
    bind = await next_node()
    await stream.send_all(
        b"<iq type='result' id='" + bind.attrs["id"].encode() + b"'>"
        b"<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><jid>"
        + jid.encode()
        + b"</jid></bind></iq>"
    )
    await next_node()  # <enable/>
    await stream.send_all(b"<enabled xmlns='urn:xmpp:sm:3' resume='true' id='x'/>")
    routes[jid] = (stream, lock)
    handled = 0
    try:
        while True:
            node = await next_node()
            if node.tag == bench.T_MESSAGE:
                handled += 1
                body = node.find(bench.T_BODY)
                assert body is not None
                await send_to(
                    routes[node.attrs["to"]],
                    b"<message type='chat' from='"
                    + jid.encode()
                    + b"'><body>"
                    + body.text.encode()
                    + b"</body></message><r xmlns='urn:xmpp:sm:3'/>",
                )
            elif node.tag == bench.T_SM_R:
                await send_to(routes[jid], b"<a xmlns='urn:xmpp:sm:3' h='%d'/>" % handled)
    except trio.ClosedResourceError:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await send_to(routes[jid], bench.STREAM_CLOSE)


async def test_run_against_fake_server(capsys: pytest.CaptureFixture[str]) -> None:
    routes: dict[str, Route] = {}
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, host="127.0.0.1"),
            functools.partial(_fake_server, routes=routes),
            0,
        )
        port = listeners[0].socket.getsockname()[1]
        argv = ["--port", str(port), "-n", "4", "-p", "2", "-m", "30", "--no-require-tls"]
        argv += ["--idle-seconds", "0", "--window", "4", "--server-pid", str(os.getpid())]
        args = bench.parse_args(argv)
        cfg = bench.Config.from_args(args)
        report = bench.Reporter(as_json=False)
        with trio.fail_after(20):
            status = await bench.run(cfg, report)
        nursery.cancel_scope.cancel()
    out = capsys.readouterr().out
    assert status == 0, out
    logins = report.figures["logins"]
    messages = report.figures["messages"]
    assert isinstance(logins, dict)
    assert isinstance(messages, dict)
    assert logins["ok"] == 4
    assert logins["mechanisms"] == ["PLAIN"]
    assert logins["sm_enabled"] == 4
    assert (messages["sent"], messages["delivered"], messages["lost"]) == (60, 60, 0)
    assert messages["sm_acks_received"] > 0
    assert messages["sm_unacked"] == 0
    assert "idle memory:" in out
    assert "messages: 2 pairs x 30" in out
