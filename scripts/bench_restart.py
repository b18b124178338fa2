#!/usr/bin/env python3
"""Restart benchmark: resumable XEP-0198 sessions handed off at SIGTERM and resumed after.

The run drives the gateway itself (`xmpp-gateway serve`) in a throwaway directory, with a
generated config (plain TCP on 127.0.0.1 and a free port, `shutdown_grace` small, JSON logs
at info level in a file) and accounts created by `xmpp-gateway user import -`:

1. First start (nothing to revive): process start -> "listening", the baseline.
2. N clients log in with resumable stream management (`scripts/bench.py`'s Session); P
   partner clients (no stream management) send each of them M numbered messages. The N
   clients answer no <r/>, so all M stay unacknowledged: the first half (rounded down) is
   handled (it will count in the <resume h/>), the rest received but never handled (as
   if the client died before processing it; the server must send those again).
3. Half of the N clients lose their TCP sockets abruptly (parked sessions), the other
   half stay connected (live sessions).
4. SIGTERM, and the stop is timed from the gateway's log: SIGTERM -> end of the drain
   (the "draining" line + shutdown_grace), the hand-off (drain end -> "stopped": the
   sessions without resumption end, then the kept sessions are written in grouped
   transactions), SIGTERM ->
   "stopped" and -> process exit; server RSS and CPU seconds before the stop.
5. Second start: process start -> "sessions_revived" -> "listening" (the N sessions taken
   back from the database and parked again before listening).
6. All N clients reconnect at once (bounded) and send <resume previd h/> (bench.py's
   `_reconnect_all`): <resume/> -> <resumed/> p50/p99/max, failures, and for every
   message whether it was handled exactly once across the old and the new stream.
7. The clients close their streams; a last SIGTERM times an empty stop.

Usage: .venv/bin/python scripts/bench_restart.py [--sessions N] [--messages M] [--json]
(see --help). The gateway runs pinned to CPU 0 and this script to CPU 1 when taskset and two
CPUs are there (scripts/bench_common.sh's convention).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final

import trio

# scripts/ is not a package: bench.py sits next to this file (it adds the repository root).
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench

from gateway import __version__

ROOT: Final = Path(__file__).resolve().parent.parent
DOMAIN: Final = "localhost"
PASSWORD: Final = "secret"  # noqa: S105 - throwaway accounts in a temp directory
TARGET_PREFIX: Final = "bench"
PARTNER_PREFIX: Final = "partner"
# How often the log file and the process are looked at while waiting (seconds).
POLL_S: Final = 0.005
# The gateway's own limit for closing streams and storing sessions after the drain
# (gateway.app.CLOSE_DEADLINE); a stop may take this long plus the grace.
CLOSE_DEADLINE_S: Final = 10.0
# Most seconds a start may take while its log keeps growing (revival of many sessions).
START_LIMIT_S: Final = 900.0


class RestartBenchError(Exception):
    """The run cannot go on (a gateway that does not start, accounts not imported)."""


# --- pure helpers -------------------------------------------------------------------------


def handoff_groups(messages: int) -> tuple[int, int]:
    """Split the M messages each session gets before the stop: (handled, unhandled).

    None is acknowledged, so the hand-off stores all M. The handled ones count in the
    client's <resume h/> after the restart: the server must not send them again. The
    unhandled ones (received, never processed) do not: the server must resend each once.
    """
    handled = messages // 2
    return handled, messages - handled


def parse_timestamp(text: str) -> float:
    """UNIX time of a structlog ISO timestamp ("2026-11-22T09:34:30.463891Z")."""
    return datetime.fromisoformat(text).timestamp()


@dataclass
class LogSummary:
    """What the bench needs from a gateway's JSON log: per event its count, the first
    line and the first and last time; the warning and error events; unparsable lines."""

    counts: Counter[str] = field(default_factory=Counter)
    first: dict[str, dict[str, object]] = field(default_factory=dict)
    first_ts: dict[str, float] = field(default_factory=dict)
    last_ts: dict[str, float] = field(default_factory=dict)
    problems: Counter[str] = field(default_factory=Counter)
    unparsed: int = 0
    lines: int = 0

    def feed(self, line: str) -> None:
        """Take one log line (JSON object with "event", "timestamp", "level")."""
        if not line.strip():
            return
        self.lines += 1
        try:
            entry = json.loads(line)
            event = str(entry["event"])
            stamp = parse_timestamp(str(entry["timestamp"]))
        except (ValueError, KeyError, TypeError):
            self.unparsed += 1
            return
        self.counts[event] += 1
        if event not in self.first:
            self.first[event] = entry
            self.first_ts[event] = stamp
        self.last_ts[event] = stamp
        level = entry.get("level")
        if level not in ("debug", "info"):
            self.problems[f"{level} {event}"] += 1

    def field_of(self, event: str, name: str) -> object:
        """A field of the event's first line (None when absent)."""
        return self.first.get(event, {}).get(name)


class LogWatch:
    """Follows a log file that a running gateway appends to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.summary = LogSummary()
        self._offset = 0
        self._partial = b""

    def poll(self) -> LogSummary:
        """Read what was appended since the last call; return the summary."""
        with self.path.open("rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self.summary.feed(line.decode("utf-8", "replace"))
        return self.summary

    async def wait(
        self, ready: Callable[[LogSummary], bool], limit_s: float, *, stall_s: float = math.inf
    ) -> bool:
        """Wait until `ready(summary)` holds, at most `limit_s` s, or `stall_s` s without a
        new line; return whether it held."""
        with trio.move_on_after(limit_s):
            progress_at = trio.current_time()
            lines = self.summary.lines
            while not ready(self.poll()):
                now = trio.current_time()
                if self.summary.lines != lines:
                    progress_at, lines = now, self.summary.lines
                elif now - progress_at > stall_s:
                    return False
                await trio.sleep(POLL_S)
            return True
        return False


def stop_phases(
    log: LogSummary, *, sigterm_at: float, exit_at: float | None, grace: float
) -> dict[str, float | None]:
    """Durations of one stop, in seconds (None when a line is missing).

    The drain is a `move_on_after(shutdown_grace)` that starts at the "draining" line,
    so it ends `grace` s after it; the hand-off phase runs from there to "stopped".
    """

    def since(start: float | None, end: float | None) -> float | None:
        return None if start is None or end is None else round(end - start, 3)

    draining = log.first_ts.get("draining")
    drain_end = None if draining is None else draining + grace
    stopped = log.first_ts.get("stopped")
    first_write = log.first_ts.get("session_handed_off")
    last_write = log.last_ts.get("session_handed_off")
    return {
        "sigterm_to_draining_s": since(sigterm_at, draining),
        "sigterm_to_drain_end_s": since(sigterm_at, drain_end),
        "handoff_s": since(drain_end, stopped),
        "drain_end_to_first_write_s": since(drain_end, first_write),
        "writes_first_to_last_s": since(first_write, last_write),
        "last_write_to_stopped_s": since(last_write, stopped),
        "sigterm_to_stopped_s": since(sigterm_at, stopped),
        "sigterm_to_exit_s": since(sigterm_at, exit_at),
    }


def gateway_config(*, port: int, grace: float, buffer_max: int) -> str:
    """The YAML config of the run (relative paths are relative to the file)."""
    return (
        f"general: {{hosts: [{DOMAIN}], negotiation_timeout: 60, send_queue_size: 10000,"
        f" shutdown_grace: {grace}}}\n"
        f"listen:\n  c2s: [{{ip: 127.0.0.1, port: {port}, tls: none}}]\n"
        "auth: {database: data/gateway.sqlite}\n"
        "modules:\n  mod_stream_management:\n"
        # The clients never answer <r/>: without ack_timeout 0 the live sessions would
        # count as lost after 60 s and park. buffer_max must hold the M messages.
        f"    {{buffer_max: {buffer_max}, ack_timeout: 0, handoff_on_shutdown: true}}\n"
        "logging: {level: info, format: json}\n"
    )


def _secs(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} s"


# --- the gateway process ----------------------------------------------------------------


@dataclass
class Gateway:
    process: trio.Process
    log: LogWatch
    spawned_at: float  # UNIX time just before the spawn

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self, lines: int = 15) -> str:
        text = self.log.path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


@dataclass
class StopResult:
    sigterm_at: float
    exit_at: float | None
    returncode: int | None
    rss_kib: int | None
    cpu_s: float | None  # server CPU seconds from SIGTERM to the last sample before exit


class Runner:
    """Starts and stops the gateway of one run in `work`."""

    def __init__(self, opts: argparse.Namespace, work: Path) -> None:
        self.opts = opts
        self.work = work
        self.config = work / "config.yaml"
        self.pin: list[str] = []
        if not opts.no_pin and shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
            self.pin = ["taskset", "-c", "0"]
        self.starts = 0
        self.running: list[trio.Process] = []

    def import_accounts(self, sessions: int, partners: int) -> float:
        """Create the accounts through `user import -`; return the seconds it took."""
        names = [f"{TARGET_PREFIX}{i}" for i in range(sessions)]
        names += [f"{PARTNER_PREFIX}{i}" for i in range(partners)]
        lines = "".join(f"{name}@{DOMAIN} {PASSWORD}\n" for name in names)
        start = time.perf_counter()
        done = subprocess.run(
            [self.opts.gateway, "user", "import", "-", "--config", str(self.config)],
            input=lines,
            text=True,
            capture_output=True,
            cwd=self.work,
            check=False,
        )
        if done.returncode != 0:
            raise RestartBenchError(f"user import failed ({done.returncode}): {done.stderr}")
        return time.perf_counter() - start

    async def start(self) -> Gateway:
        """Spawn the gateway and wait for its "listening" line."""
        self.starts += 1
        log_path = self.work / f"gateway-{self.starts}.log"
        command = [*self.pin, self.opts.gateway, "serve", "--config", str(self.config)]
        with log_path.open("wb") as out:
            spawned_at = time.time()
            process = await trio.lowlevel.open_process(
                command, stdout=out, stderr=subprocess.STDOUT, cwd=self.work
            )
        self.running.append(process)
        gateway = Gateway(process, LogWatch(log_path), spawned_at)
        # Reviving many sessions takes a while: give up only when the log stalls.
        await gateway.log.wait(
            lambda s: "listening" in s.counts or process.poll() is not None,
            START_LIMIT_S,
            stall_s=self.opts.timeout,
        )
        if "listening" not in gateway.log.poll().counts:
            raise RestartBenchError(
                f"gateway start {self.starts} did not reach 'listening' (exit status "
                f"{process.poll()}, {gateway.log.summary.lines} log lines); its log ends "
                f"with:\n{gateway.tail()}"
            )
        return gateway

    async def stop(self, gateway: Gateway) -> StopResult:
        """SIGTERM, then wait for the exit (sampling the server's CPU meanwhile)."""
        pid = gateway.pid
        rss = bench.read_rss_kib(pid)
        cpu_before = bench.read_cpu_seconds(pid)
        cpu_last = cpu_before
        sigterm_at = time.time()
        gateway.process.send_signal(signal.SIGTERM)
        exit_at = None
        with trio.move_on_after(self.opts.grace + CLOSE_DEADLINE_S + self.opts.timeout):
            while gateway.process.poll() is None:
                cpu_last = bench.read_cpu_seconds(pid) or cpu_last
                await trio.sleep(POLL_S)
            exit_at = time.time()
        if exit_at is None:
            gateway.process.kill()
            await gateway.process.wait()
        gateway.log.poll()
        cpu = None if cpu_before is None or cpu_last is None else round(cpu_last - cpu_before, 2)
        return StopResult(sigterm_at, exit_at, gateway.process.returncode, rss, cpu)

    async def kill_leftovers(self) -> None:
        """Kill the gateways this run started that still run (after an error)."""
        for process in self.running:
            if process.poll() is None:
                process.kill()
                with trio.move_on_after(5):
                    await process.wait()


# --- the scenario -----------------------------------------------------------------------


def client_config(opts: argparse.Namespace, *, port: int, pid: int, partners: bool) -> bench.Config:
    """bench.py's settings for the N clients (resumable SM) or the partners (no SM)."""
    clients = opts.partners if partners else opts.sessions
    return bench.Config(
        host="127.0.0.1",
        port=port,
        domain=DOMAIN,
        prefix=PARTNER_PREFIX if partners else TARGET_PREFIX,
        password=PASSWORD,
        clients=clients,
        pairs=0,
        messages=0,
        rate=0.0,
        window=16,
        ack_every=0,
        concurrency=opts.concurrency,
        login_timeout=opts.login_timeout,
        phase_timeout=opts.timeout,
        drain_timeout=opts.timeout,
        idle_seconds=0.0,
        require_tls=False,
        server_pid=pid,
        label=f"xmpp-gateway {__version__}",
        warmup=False,
        no_sm=partners,
        resume=0 if partners else clients,
        resume_messages=opts.messages,
        resume_parked=0,
        resume_concurrency=opts.resume_concurrency,
        ssl_context=bench.make_ssl_context(),
    )


class PrefixedReporter(bench.Reporter):
    """bench.py's Reporter with a prefix on each line (two login phases in one run)."""

    def __init__(self, as_json: bool, prefix: str) -> None:
        super().__init__(as_json)
        self.prefix = prefix

    def line(self, text: str) -> None:
        super().line(self.prefix + text)


async def login(
    cfg: bench.Config, nursery: trio.Nursery, report: bench.Reporter, name: str
) -> list[bench.Session]:
    sub = PrefixedReporter(report.as_json, f"{name} ")
    result = await bench.scenario_logins(cfg, nursery, sub)
    report.figures[f"{name}_logins"] = sub.figures["logins"]
    return result.sessions


async def close_transport(session: bench.Session) -> None:
    """Close what is left of a session's socket after the server closed it."""
    session.closing = True
    if session.tcp is not None:
        with trio.move_on_after(1), contextlib.suppress(OSError, trio.BrokenResourceError):
            await session.tcp.aclose()
    session.stream = None


async def send_messages(
    pairs: list[tuple[bench.Session, list[bench.Session]]], low: int, high: int
) -> None:
    """Each partner sends messages low..high-1 to each of its targets."""

    async def one(partner: bench.Session, targets: list[bench.Session]) -> None:
        for target in targets:
            await bench._send_numbered_quietly(partner, target.jid, low, high)

    async with trio.open_nursery() as nursery:
        for partner, targets in pairs:
            nursery.start_soon(one, partner, targets)


@dataclass
class Clients:
    """The logged-in clients of a run: the N resumable ones (half parked, half live), the
    partners that sent them messages, and per client which messages it handled."""

    targets: list[bench.Session]
    partners: list[bench.Session]
    tracks: dict[bench.Session, bench.ResumeTrack]
    parked: list[bench.Session]
    live: list[bench.Session]


class Scenario:
    """The run after the account import; each phase adds its figures and problems."""

    def __init__(self, opts: argparse.Namespace, runner: Runner, report: bench.Reporter) -> None:
        self.opts = opts
        self.runner = runner
        self.report = report
        self.figures = report.figures
        self.problems: list[str] = []
        self.handled_n, self.unhandled_n = handoff_groups(opts.messages)

    async def run(self) -> int:
        """All phases; returns the exit status."""
        first = await self.runner.start()
        baseline = round(first.log.summary.first_ts["listening"] - first.spawned_at, 3)
        self.figures["first_start"] = {"start_to_listening_s": baseline}
        self.report.line(
            f"first start: process start -> listening {baseline:.3f} s (nothing to revive)"
        )
        target_cfg = client_config(self.opts, port=self.opts.port, pid=first.pid, partners=False)
        async with trio.open_nursery() as readers:
            clients = await self.prepare(first, target_cfg, readers)
            if clients is None:
                await self.runner.stop(first)
                readers.cancel_scope.cancel()
                return 1
            await self.stop(first, clients)
            second = await self.restart(baseline, len(clients.targets))
            resumed = await self.resume(second, target_cfg, clients, readers)
            await bench.close_all(resumed)
            readers.cancel_scope.cancel()
        await self.empty_stop(second)
        log_problems = first.log.summary.problems + second.log.summary.problems
        unparsed = first.log.summary.unparsed + second.log.summary.unparsed
        self.figures["gateway_log"] = {"problems": dict(log_problems), "unparsed_lines": unparsed}
        self.report.line(
            f"gateway logs: {log_problems.total()} warning/error lines, {unparsed} unparsed"
            + "".join(f"; {event} x{n}" for event, n in log_problems.most_common(5))
        )
        self.figures["problems"] = self.problems
        for problem in self.problems:
            self.report.line(f"  PROBLEM: {problem}")
        return 1 if self.problems else 0

    async def prepare(
        self, gateway: Gateway, target_cfg: bench.Config, readers: trio.Nursery
    ) -> Clients | None:
        """Log in, send the unacked messages, cut half the clients (None: nobody to test)."""
        opts, problems = self.opts, self.problems
        partner_cfg = client_config(opts, port=opts.port, pid=gateway.pid, partners=True)
        targets = await login(target_cfg, readers, self.report, "clients")
        partners = await login(partner_cfg, readers, self.report, "partners")
        without_resume = sum(not t.sm_id for t in targets)
        targets = [t for t in targets if t.sm_id]
        if len(targets) < opts.sessions or len(partners) < opts.partners:
            problems.append(
                f"logged in {len(targets)}/{opts.sessions} clients with resumable SM "
                f"({without_resume} without), {len(partners)}/{opts.partners} partners"
            )
        if not targets or not partners:
            self.report.line("bench_restart: nothing to measure without clients and partners")
            return None
        tracks: dict[bench.Session, bench.ResumeTrack] = {}
        for target in targets:
            target.mute_acks = True  # every message stays unacknowledged
            tracks[target] = target.track = bench.ResumeTrack.create(opts.messages, 0)
        pairs = [(p, targets[i :: len(partners)]) for i, p in enumerate(partners)]

        # The handled messages, then the received-but-unhandled ones.
        handled_n, unhandled_n = self.handled_n, self.unhandled_n
        await send_messages(pairs, 0, handled_n)
        if not await bench.poll_until(
            lambda: all(t.handled_old() >= handled_n for t in tracks.values()), opts.timeout
        ):
            problems.append("not every handled message arrived before the stop")
        for track in tracks.values():
            track.drop = True
        await send_messages(pairs, handled_n, opts.messages)
        if not await bench.poll_until(
            lambda: all(t.dropped >= unhandled_n for t in tracks.values()), opts.timeout
        ):
            problems.append("not every unhandled message arrived before the stop")
        for track in tracks.values():
            # Nothing else is sent to them; handling again lets the reader see the
            # <stream:error><system-shutdown/> of the live ones.
            track.drop = False
        sent = sum(p.h_out for p in partners)

        # Half the sessions lose their sockets (parked), half stay connected (live).
        parked, live = targets[::2], targets[1::2]
        async with trio.open_nursery() as cuts:
            for target in parked:
                cuts.start_soon(target.cut)
        if not await gateway.log.wait(
            lambda s: s.counts["session_parked"] >= len(parked), opts.timeout
        ):
            problems.append(
                f"only {gateway.log.summary.counts['session_parked']}/{len(parked)} parked"
            )
        self.figures["messages"] = {
            "partners": len(partners),
            "sent": sent,
            "per_session": opts.messages,
            "handled_unacked": handled_n,
            "unhandled": unhandled_n,
            "parked_sessions": len(parked),
            "live_sessions": len(live),
        }
        self.report.line(
            f"messages: {sent} sent by {len(partners)} partners, {opts.messages} per session "
            f"and none acked ({handled_n} handled, {unhandled_n} received but unhandled); "
            f"{len(parked)} sessions cut (parked), {len(live)} connected (live)"
        )
        return Clients(targets, partners, tracks, parked, live)

    async def stop(self, gateway: Gateway, clients: Clients) -> None:
        """SIGTERM with the sessions in place: drain, hand-off, exit."""
        opts = self.opts
        stop = await self.runner.stop(gateway)
        log = gateway.log.summary
        phases = stop_phases(
            log, sigterm_at=stop.sigterm_at, exit_at=stop.exit_at, grace=opts.grace
        )
        handed = log.field_of("sessions_handed_off", "sessions")
        stanzas = log.field_of("sessions_handed_off", "stanzas")
        failed = log.field_of("sessions_handed_off", "failed")
        live = clients.live
        await bench.poll_until(lambda: all(t.reader_done.is_set() for t in live), 5.0)
        told = sum("system-shutdown" in t.reader_error for t in live)
        async with trio.open_nursery() as closes:
            for session in [*live, *clients.partners]:
                closes.start_soon(close_transport, session)
        sessions = len(clients.targets)
        expected_stanzas = sessions * opts.messages
        handoff_s = phases["handoff_s"]
        self.figures["stop"] = {
            **phases,
            "grace_s": opts.grace,
            "rss_kib_before": stop.rss_kib,
            "server_cpu_s": stop.cpu_s,
            "exit_status": stop.returncode,
            "sessions_handed_off": handed,
            "stanzas_handed_off": stanzas,
            "handoff_failed": failed,
            "session_handed_off_lines": log.counts["session_handed_off"],
            "expected_sessions": sessions,
            "expected_stanzas": expected_stanzas,
            "live_told_system_shutdown": told,
            "sessions_per_s": round(sessions / handoff_s, 1) if handoff_s and handed else None,
        }
        self.report.line(
            f"stop: server RSS {stop.rss_kib} KiB before SIGTERM; SIGTERM -> draining "
            f"{_secs(phases['sigterm_to_draining_s'])}, -> drain end "
            f"{_secs(phases['sigterm_to_drain_end_s'])} (grace {opts.grace:g} s); hand-off "
            f"(drain end -> stopped) {_secs(handoff_s)}; SIGTERM -> stopped "
            f"{_secs(phases['sigterm_to_stopped_s'])}, -> exit "
            f"{_secs(phases['sigterm_to_exit_s'])} (status {stop.returncode}); server CPU "
            f"{bench._fmt_s(stop.cpu_s)}"
        )
        self.report.line(
            f"  hand-off: {handed} sessions, {stanzas} stanzas, {failed} failed (expected "
            f"{sessions} / {expected_stanzas}); session writes first -> last "
            f"{_secs(phases['writes_first_to_last_s'])} (drain end -> first "
            f"{_secs(phases['drain_end_to_first_write_s'])}, last -> stopped "
            f"{_secs(phases['last_write_to_stopped_s'])}); live clients told "
            f"<system-shutdown/>: {told}/{len(live)}"
        )
        if stop.returncode != 0:
            self.problems.append(f"the gateway exited with {stop.returncode} at the stop")
        if (handed, stanzas, failed) != (sessions, expected_stanzas, 0):
            self.problems.append(
                f"handed off {handed} sessions / {stanzas} stanzas / {failed} failed, "
                f"expected {sessions} / {expected_stanzas} / 0"
            )

    async def restart(self, baseline: float, sessions: int) -> Gateway:
        """Start again: the sessions are revived before the gateway listens."""
        gateway = await self.runner.start()
        log = gateway.log.poll()
        revived_at = log.first_ts.get("sessions_revived")
        revived = log.field_of("sessions_revived", "sessions")
        to_listening = round(log.first_ts["listening"] - gateway.spawned_at, 3)
        to_revived = None if revived_at is None else round(revived_at - gateway.spawned_at, 3)
        rss = bench.read_rss_kib(gateway.pid)
        cpu = bench.read_cpu_seconds(gateway.pid)
        self.figures["restart"] = {
            "start_to_sessions_revived_s": to_revived,
            "start_to_listening_s": to_listening,
            "revival_cost_s": round(to_listening - baseline, 3),
            "sessions_revived": revived,
            "session_revived_lines": log.counts["session_revived"],
            "revived_to_end": log.counts["session_revived_to_end"],
            "rss_kib_listening": rss,
            "server_cpu_s_to_listening": cpu,
        }
        self.report.line(
            f"restart: process start -> sessions_revived {_secs(to_revived)} -> listening "
            f"{to_listening:.3f} s (first start {baseline:.3f} s); revived {revived} "
            f"sessions ({log.counts['session_revived_to_end']} ended at once); server RSS "
            f"{rss} KiB, CPU {bench._fmt_s(cpu)} at listening"
        )
        if revived != sessions:
            self.problems.append(f"revived {revived} sessions, expected {sessions}")
        return gateway

    async def resume(
        self,
        gateway: Gateway,
        target_cfg: bench.Config,
        clients: Clients,
        readers: trio.Nursery,
    ) -> list[bench.Session]:
        """Every client reconnects and resumes at once (bounded); returns those resumed."""
        targets, tracks = clients.targets, clients.tracks
        await bench.poll_until(lambda: all(t.reader_done.is_set() for t in targets), 5.0)
        cpu_before = bench.read_cpu_seconds(gateway.pid)
        start = time.perf_counter()
        run = await bench._reconnect_all(target_cfg, targets, readers)
        wall = time.perf_counter() - start
        cpu_after = bench.read_cpu_seconds(gateway.pid)
        server_cpu = (
            None if cpu_before is None or cpu_after is None else round(cpu_after - cpu_before, 2)
        )
        resumed = run.resumed
        await bench.poll_until(
            lambda: all(tracks[t].complete() for t in resumed), self.opts.timeout
        )
        await trio.sleep(0.25)  # room for a duplicate to show up
        self.problems += report_resume(
            self.report,
            run,
            tracks,
            sessions=len(targets),
            unhandled=self.unhandled_n,
            wall=wall,
            server_cpu=server_cpu,
            concurrency=self.opts.resume_concurrency,
        )
        return resumed

    async def empty_stop(self, gateway: Gateway) -> None:
        """SIGTERM after the clients closed their streams: the stop without hand-off."""
        stop = await self.runner.stop(gateway)
        log = gateway.log.summary
        phases = stop_phases(
            log, sigterm_at=stop.sigterm_at, exit_at=stop.exit_at, grace=self.opts.grace
        )
        self.figures["empty_stop"] = {
            **phases,
            "exit_status": stop.returncode,
            "sessions_handed_off": log.field_of("sessions_handed_off", "sessions"),
        }
        self.report.line(
            f"empty stop (clients gone): SIGTERM -> stopped "
            f"{_secs(phases['sigterm_to_stopped_s'])}, -> exit "
            f"{_secs(phases['sigterm_to_exit_s'])} (status {stop.returncode})"
        )
        if stop.returncode != 0:
            self.problems.append(f"the gateway exited with {stop.returncode} at the second stop")


def report_resume(
    report: bench.Reporter,
    run: bench.ResumeRun,
    tracks: dict[bench.Session, bench.ResumeTrack],
    *,
    sessions: int,
    unhandled: int,
    wall: float,
    server_cpu: float | None,
    concurrency: int,
) -> list[str]:
    """Figures of the resumption after the restart; returns the problems found."""
    totals: Counter[str] = Counter()
    for target in run.resumed:
        totals.update(tracks[target].tally())
    ok = len(run.resumed)
    p50, p99 = bench.percentile(run.resume_ns, 50), bench.percentile(run.resume_ns, 99)
    worst = max(run.resume_ns) if run.resume_ns else math.nan
    rc50, rc99 = bench.percentile(run.reconnect_ns, 50), bench.percentile(run.reconnect_ns, 99)
    errors = sorted({t.reader_error for t in run.resumed if t.reader_error})
    report.figures["resume"] = {
        "sessions": sessions,
        "resumed": ok,
        "failed": sessions - ok,
        "failures": run.failures,
        "concurrency": concurrency,
        "seconds": round(wall, 3),
        "resumptions_per_s": round(ok / wall, 1) if wall > 0 else 0.0,
        "p50_ms": bench._ms(p50),
        "p99_ms": bench._ms(p99),
        "max_ms": bench._ms(worst),
        "reconnect_p50_ms": bench._ms(rc50),
        "reconnect_p99_ms": bench._ms(rc99),
        "resent": totals["resent"],
        "resent_expected": ok * unhandled,
        "lost": totals["lost"],
        "duplicates": totals["duplicates"],
        "resent_after_handled": totals["resent_after_handled"],
        "h_mismatches": len(run.h_mismatches),
        "reader_errors": errors,
        "server_cpu_s": server_cpu,
    }
    report.line(
        f"resume: {ok}/{sessions} resumed in {wall:.2f} s ({concurrency} in flight); "
        f"<resume/> -> <resumed/> p50 {bench.fmt_ms(p50)}, p99 {bench.fmt_ms(p99)}, max "
        f"{bench.fmt_ms(worst)}; reconnect (TCP+SASL+resume) p50 {bench.fmt_ms(rc50)}, p99 "
        f"{bench.fmt_ms(rc99)}; failures {sessions - ok}; server CPU {bench._fmt_s(server_cpu)}"
    )
    report.line(
        f"  messages: resent after the resume {totals['resent']}/{ok * unhandled} expected; "
        f"lost {totals['lost']}, duplicates {totals['duplicates']} (handled before the stop "
        f"and sent again: {totals['resent_after_handled']}); h mismatches "
        f"{len(run.h_mismatches)}"
    )
    problems = [f"resume failed x{n}: {reason}" for reason, n in run.failures.items()]
    problems += [f"session error after resuming: {error}" for error in errors[:5]]
    problems += run.h_mismatches[:3]
    if totals["lost"] or totals["duplicates"]:
        problems.append(f"lost {totals['lost']}, duplicated {totals['duplicates']} messages")
    if totals["resent"] != ok * unhandled:
        problems.append(f"resent {totals['resent']} messages, expected {ok * unhandled}")
    return problems


# --- command line -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench_restart.py",
        description="Time a gateway restart that hands off N resumable sessions (SIGTERM, "
        "drain, one database write per session, revival before listening) and check that "
        "the clients resume them with every unacknowledged message exactly once.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    add = parser.add_argument
    add("--sessions", "-n", type=int, default=1000, help="resumable client sessions, N (1000)")
    add("--messages", "-m", type=int, default=5, help="unacked messages per session, M (5)")
    add("--partners", "-p", type=int, default=100, help="partner clients sending them (100)")
    add("--grace", type=float, default=1.0, help="general.shutdown_grace in seconds (1)")
    add("--concurrency", type=int, default=50, help="logins in progress at once (50)")
    add("--resume-concurrency", type=int, default=100, help="resumptions in flight (100)")
    add("--login-timeout", type=float, default=30.0, help="seconds per login/resume (30)")
    add("--timeout", type=float, default=60.0, help="seconds per waiting phase (60)")
    add(
        "--gateway",
        default=str(ROOT / ".venv" / "bin" / "xmpp-gateway"),
        help="the xmpp-gateway executable (.venv/bin/xmpp-gateway)",
    )
    add("--no-pin", action="store_true", help="do not pin gateway/bench to CPU 0/1")
    add("--keep", action="store_true", help="keep the work directory (config, logs, database)")
    add("--json", action="store_true", help="print one JSON object on stdout (lines on stderr)")
    args = parser.parse_args(argv)
    for name in ("sessions", "messages", "partners", "concurrency", "resume_concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.messages > 10_000:
        parser.error("--messages must be <= 10000 (the session's buffer_max)")
    if not 0 <= args.grace <= 600:
        parser.error("--grace must be between 0 and 600 (general.shutdown_grace)")
    args.partners = min(args.partners, args.sessions)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    report = bench.Reporter(opts.json)
    opts.port = free_port()
    work = Path(tempfile.mkdtemp(prefix="bench-restart."))
    runner = Runner(opts, work)
    runner.config.write_text(
        gateway_config(port=opts.port, grace=opts.grace, buffer_max=max(100, opts.messages))
    )
    started = time.perf_counter()
    status = 1
    try:
        imported = runner.import_accounts(opts.sessions, opts.partners)
        if runner.pin:
            os.sched_setaffinity(0, {1})  # the gateway gets CPU 0 through taskset
        report.figures.update(
            label=f"xmpp-gateway {__version__}",
            sessions=opts.sessions,
            messages=opts.messages,
            partners=opts.partners,
            grace_s=opts.grace,
            pinned=bool(runner.pin),
            accounts_import_s=round(imported, 2),
        )
        report.line(
            f"bench_restart: xmpp-gateway {__version__} on 127.0.0.1:{opts.port} (tls none), "
            f"{opts.sessions} sessions x {opts.messages} unacked messages, {opts.partners} "
            f"partners, shutdown_grace {opts.grace:g} s; "
            + ("gateway on CPU 0, bench on CPU 1" if runner.pin else "unpinned")
            + f"; {opts.sessions + opts.partners} accounts imported in {imported:.1f} s"
        )

        async def run() -> int:
            try:
                return await Scenario(opts, runner, report).run()
            finally:
                await runner.kill_leftovers()

        status = trio.run(run)
    except* RestartBenchError as group:
        # Raised inside the scenario's nursery, so it arrives in an ExceptionGroup.
        errors = [str(exc) for exc in group.exceptions]
        for error in errors:
            report.line(f"bench_restart: {error}")
        report.figures["error"] = errors
    finally:
        if opts.keep:
            report.line(f"bench_restart: work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report.figures["total_seconds"] = round(time.perf_counter() - started, 2)
    report.figures["exit_status"] = status
    if opts.json:
        print(json.dumps(report.figures, sort_keys=True))
    return status


if __name__ == "__main__":
    sys.exit(main())
