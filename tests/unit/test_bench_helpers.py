"""scripts/bench.py: its XML splitter, figures helpers, and one run against a fake server."""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import math
import os
import sys
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import bench  # the load generator script, imported as a module
import bench_restart  # the restart benchmark, on bench.py

from gateway.config import LogFormat, TlsMode, load_config
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


# --- resumption helpers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "groups"),
    [(0, (0, 0, 0)), (1, (1, 0, 0)), (2, (2, 0, 0)), (6, (2, 2, 2)), (7, (3, 2, 2))],
)
def test_resume_groups_split_every_message(messages: int, groups: tuple[int, int, int]) -> None:
    assert bench.resume_groups(messages) == groups
    assert sum(groups) == messages


def _message(seq: int, kind: str = "chat") -> bench.Node:
    node = bench.Node(bench.T_MESSAGE, {"type": kind})
    body = bench.Node(bench.T_BODY, {})
    body.text = f"{bench.RESUME_TAG} {seq} 123"
    node.children.append(body)
    return node


def test_resume_track_counts_exactly_once_across_streams() -> None:
    track = bench.ResumeTrack.create(before=4, parked=2)
    for seq in (0, 1, 2):  # 3 was received but not handled before the cut
        track.on_message(_message(seq))
    assert track.handled_old() == 3
    assert not track.complete()
    track.resumed = True
    for seq in (3, 4, 5):
        track.on_message(_message(seq))
    assert track.complete()
    assert track.tally() == {
        "lost": 0,
        "duplicates": 0,
        "resent_after_handled": 0,
        "resent": 1,
        "parked_delivered": 2,
    }
    track.on_message(_message(1))  # handled before the cut, resent anyway
    track.on_message(_message(4))  # a parked one twice
    track.on_message(_message(9))  # no such seq
    track.on_message(_message(2, kind="error"))
    tally = track.tally()
    assert (tally["duplicates"], tally["resent_after_handled"], tally["resent"]) == (2, 1, 2)
    assert track.foreign == 2


def test_resume_track_reports_lost() -> None:
    track = bench.ResumeTrack.create(before=2, parked=1)
    track.on_message(_message(0))
    track.resumed = True
    track.on_message(_message(2))
    assert track.tally()["lost"] == 1
    assert not track.complete()


def test_h_behind_wraps_at_2_to_the_32() -> None:
    assert bench._h_behind(5, 5) == 0
    assert bench._h_behind(2, 2**32 - 3) == 5
    assert bench._h_behind(10, 4) == 6


# --- a whole run against a minimal fake server (no TLS, PLAIN, bind, SM with resumption,
# routing); a lost transport parks the session, <resume/> after SASL picks it up ----------


class FakeSmSession:
    """One bound resource with resumable SM in the fake server."""

    def __init__(self, jid: str, stream: trio.SocketStream) -> None:
        self.jid = jid
        self.smid = ""  # set by <enable/>
        self.stream: trio.SocketStream | None = stream
        self.lock = trio.Lock()
        self.sent = 0  # stanzas sent to the client
        self.unacked: list[tuple[int, bytes]] = []
        self.handled = 0  # stanzas received from the client

    async def deliver(self, stanza: bytes) -> None:
        if not self.smid:
            await self.write(stanza)
            return
        self.sent += 1
        self.unacked.append((self.sent, stanza))
        await self.write(stanza + b"<r xmlns='urn:xmpp:sm:3'/>")

    async def write(self, data: bytes) -> None:
        async with self.lock:
            stream = self.stream
            if stream is None:
                return  # parked: kept in `unacked`
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(data)

    def acked(self, h: int) -> None:
        self.unacked = [(n, stanza) for n, stanza in self.unacked if n > h]


class FakeServer:
    def __init__(self, *, honour_resume_h: bool = True) -> None:
        self.routes: dict[str, FakeSmSession] = {}
        self.by_smid: dict[str, FakeSmSession] = {}
        self.resumed = 0
        self.sessions = 0
        # False: a buggy server that resends everything not acked by <a/> on resume.
        self.honour_resume_h = honour_resume_h

    async def serve(self, stream: trio.SocketStream) -> None:
        parser = bench.StreamParser()

        async def next_node() -> bench.Node:
            while not parser.events:
                if parser.closed:
                    raise EOFError("stream closed")
                data = await stream.receive_some(65536)
                if not data:
                    raise trio.BrokenResourceError("transport lost")
                parser.feed(data)
            return parser.events.popleft()

        async def open_stream(features: bytes) -> None:
            while parser.stream_attrs is None:
                parser.feed(await stream.receive_some(65536))
            await stream.send_all(HEADER + b"<stream:features>" + features + b"</stream:features>")

        await open_stream(
            b"<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>PLAIN"
            b"</mechanism></mechanisms>"
        )
        auth = await next_node()
        user = base64.b64decode(auth.text).split(b"\0")[1].decode()
        await stream.send_all(b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
        parser = bench.StreamParser()
        await open_stream(
            b"<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/><sm xmlns='urn:xmpp:sm:3'/>"
        )
        first = await next_node()
        if first.tag == f"{bench.NS_SM} resume":
            session = self.by_smid[first.attrs["previd"]]
            assert session.jid.startswith(f"{user}@")
            if self.honour_resume_h:
                session.acked(int(first.attrs["h"]))
            async with session.lock:
                session.stream = stream
                await stream.send_all(
                    b"<resumed xmlns='urn:xmpp:sm:3' previd='%s' h='%d'/>"
                    % (session.smid.encode(), session.handled)
                    + b"".join(stanza for _, stanza in session.unacked)
                    + b"<r xmlns='urn:xmpp:sm:3'/>"
                )
            self.resumed += 1
        else:
            self.sessions += 1
            jid = f"{user}@localhost/r{self.sessions}"
            session = self.routes[jid] = FakeSmSession(jid, stream)
            await stream.send_all(
                b"<iq type='result' id='" + first.attrs["id"].encode() + b"'>"
                b"<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><jid>"
                + jid.encode()
                + b"</jid></bind></iq>"
            )
        try:
            while True:
                node = await next_node()
                if node.tag == f"{bench.NS_SM} enable":
                    session.smid = f"sm-{session.jid}"
                    self.by_smid[session.smid] = session
                    await session.write(
                        b"<enabled xmlns='urn:xmpp:sm:3' resume='true' id='%s'/>"
                        % session.smid.encode()
                    )
                elif node.tag == bench.T_MESSAGE:
                    session.handled += 1
                    body = node.find(bench.T_BODY)
                    assert body is not None
                    await self.routes[node.attrs["to"]].deliver(
                        b"<message type='chat' from='"
                        + session.jid.encode()
                        + b"'><body>"
                        + body.text.encode()
                        + b"</body></message>"
                    )
                elif node.tag == bench.T_SM_R:
                    await session.write(b"<a xmlns='urn:xmpp:sm:3' h='%d'/>" % session.handled)
                elif node.tag == bench.T_SM_A:
                    session.acked(int(node.attrs["h"]))
        except EOFError:  # </stream:stream>: the session ends
            await session.write(bench.STREAM_CLOSE)
            self.routes.pop(session.jid, None)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            async with session.lock:  # transport lost: park (unless already resumed)
                if session.stream is stream:
                    session.stream = None


async def _run_bench(
    argv: list[str], server: FakeServer | None = None
) -> tuple[int, bench.Reporter, FakeServer]:
    server = server or FakeServer()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, host="127.0.0.1"), server.serve, 0
        )
        port = listeners[0].socket.getsockname()[1]
        argv = ["--port", str(port), "--no-require-tls", "--idle-seconds", "0", *argv]
        cfg = bench.Config.from_args(bench.parse_args(argv))
        report = bench.Reporter(as_json=False)
        with trio.fail_after(30):
            status = await bench.run(cfg, report)
        nursery.cancel_scope.cancel()
    return status, report, server


async def test_run_against_fake_server(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["-n", "4", "-p", "2", "-m", "30", "--window", "4", "--server-pid", str(os.getpid())]
    status, report, _ = await _run_bench(argv)
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
    assert messages["sm_senders"] == 4
    assert messages["sm_acks_received"] > 0
    assert messages["sm_unacked"] == 0
    assert messages["sm_r_answered"] > 0
    assert report.figures["resume"] == {"skipped": "not requested (--resume 0)"}
    assert "idle memory:" in out
    assert "messages: 2 pairs x 30" in out
    assert "resume:" not in out


async def test_unacked_counts_tail_not_covered_by_ack_every() -> None:
    # 15 messages per sender, <r/> after every 7th: the last one is asked about at the end.
    argv = ["-n", "2", "-p", "1", "-m", "30", "--ack-every", "7", "--window", "4"]
    status, report, _ = await _run_bench(argv)
    messages = report.figures["messages"]
    assert isinstance(messages, dict)
    assert status == 0
    assert messages["sm_unacked"] == 0
    assert messages["sm_acks_received"] == 2 * (2 + 1)


async def test_no_sm_reports_no_sm_figures() -> None:
    argv = ["-n", "2", "-p", "1", "-m", "10", "--no-sm", "--resume", "1"]
    status, report, _ = await _run_bench(argv)
    messages = report.figures["messages"]
    assert isinstance(messages, dict)
    assert status == 0
    assert messages["sm_senders"] == 0
    assert messages["sm_acks_received"] is None
    assert messages["sm_unacked"] is None
    assert report.figures["resume"] == {"skipped": "SM off (--no-sm)"}


async def test_resume_scenario_against_fake_server(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["-n", "8", "-p", "2", "-m", "10", "--resume", "3", "--resume-messages", "7"]
    argv += ["--resume-parked", "2", "--resume-concurrency", "2"]
    status, report, server = await _run_bench(argv)
    out = capsys.readouterr().out
    assert status == 0, out
    resume = report.figures["resume"]
    assert isinstance(resume, dict)
    assert server.resumed == 3
    assert (resume["sessions"], resume["resumed"], resume["failed"]) == (3, 3, 0)
    assert (resume["acked_before_cut"], resume["unhandled_before_cut"]) == (3, 2)
    assert resume["planned"] == 3 * 9
    assert (resume["lost"], resume["duplicates"], resume["h_mismatches"]) == (0, 0, 0)
    assert resume["resent"] == resume["resent_expected"] == 3 * 2
    assert resume["parked_delivered"] == resume["parked_expected"] == 3 * 2
    assert resume["incomplete_phases"] == []
    assert resume["p50_ms"] is not None
    assert resume["max_ms"] >= resume["p99_ms"] >= resume["p50_ms"]
    assert "resume: 3/3 sessions resumed" in out


async def test_resume_scenario_catches_resent_handled_messages(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["-n", "4", "-p", "1", "-m", "4", "--resume", "2", "--resume-messages", "6"]
    status, report, _ = await _run_bench(argv, FakeServer(honour_resume_h=False))
    out = capsys.readouterr().out
    resume = report.figures["resume"]
    assert isinstance(resume, dict)
    assert status == 1, out
    assert resume["resumed"] == 2
    assert resume["lost"] == 0
    # The 2 per session handled but never acked with <a/> came back on the new stream.
    assert resume["resent_after_handled"] == resume["duplicates"] == 2 * 2
    assert "handled before the cut and resent: 4" in out


# --- bench_restart.py helpers -----------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "groups"), [(0, (0, 0)), (1, (0, 1)), (5, (2, 3)), (6, (3, 3))]
)
def test_handoff_groups_split_every_message(messages: int, groups: tuple[int, int]) -> None:
    assert bench_restart.handoff_groups(messages) == groups


def _log_line(event: str, second: float, level: str = "info", **fields: object) -> str:
    stamp = f"2026-11-22T09:00:{second:09.6f}Z"
    return json.dumps({"event": event, "level": level, "timestamp": stamp, **fields})


def test_log_summary_counts_events_times_and_problems() -> None:
    summary = bench_restart.LogSummary()
    for line in (
        _log_line("session_handed_off", 1.5),
        _log_line("session_handed_off", 2.25),
        _log_line("sessions_handed_off", 2.5, sessions=2, stanzas=10, failed=0),
        _log_line("handoff_write_failed", 3.0, level="error"),
        "Traceback (most recent call last):",
        "",
    ):
        summary.feed(line)
    assert summary.counts["session_handed_off"] == 2
    assert summary.last_ts["session_handed_off"] - summary.first_ts["session_handed_off"] == (
        pytest.approx(0.75)
    )
    assert summary.field_of("sessions_handed_off", "stanzas") == 10
    assert summary.field_of("stopped", "sessions") is None
    assert summary.problems == {"error handoff_write_failed": 1}
    assert (summary.unparsed, summary.lines) == (1, 5)


def test_log_watch_reads_appended_lines_and_waits_for_partial_ones(tmp_path: Path) -> None:
    path = tmp_path / "gateway.log"
    first, second = _log_line("listening", 1.0), _log_line("draining", 2.0)
    path.write_text(first + "\n" + second[:10])
    watch = bench_restart.LogWatch(path)
    assert dict(watch.poll().counts) == {"listening": 1}
    with path.open("a") as fh:
        fh.write(second[10:] + "\n")
    assert dict(watch.poll().counts) == {"listening": 1, "draining": 1}
    assert watch.poll().lines == 2


def test_stop_phases_from_log_times() -> None:
    summary = bench_restart.LogSummary()
    for event, second in (
        ("draining", 10.0),
        ("session_handed_off", 11.5),
        ("session_handed_off", 12.0),
        ("stopped", 12.25),
    ):
        summary.feed(_log_line(event, second))
    sigterm = summary.first_ts["draining"] - 0.01
    phases = bench_restart.stop_phases(summary, sigterm_at=sigterm, exit_at=sigterm + 2.5, grace=1)
    assert phases == {
        "sigterm_to_draining_s": 0.01,
        "sigterm_to_drain_end_s": 1.01,
        "handoff_s": 1.25,
        "drain_end_to_first_write_s": 0.5,
        "writes_first_to_last_s": 0.5,
        "last_write_to_stopped_s": 0.25,
        "sigterm_to_stopped_s": 2.26,
        "sigterm_to_exit_s": 2.5,
    }
    empty = bench_restart.stop_phases(
        bench_restart.LogSummary(), sigterm_at=sigterm, exit_at=None, grace=1
    )
    assert set(empty.values()) == {None}


def test_restart_config_is_valid_for_the_gateway(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(bench_restart.gateway_config(port=5299, grace=1.5, buffer_max=150))
    config = load_config(path)
    assert config.general.shutdown_grace == 1.5
    (listener,) = config.c2s
    assert (listener.ip, listener.port, listener.tls) == ("127.0.0.1", 5299, TlsMode.NONE)
    sm = config.modules.mod_stream_management
    assert (sm.buffer_max, sm.ack_timeout, sm.handoff_on_shutdown) == (150, 0, True)
    assert config.logging.format is LogFormat.JSON
