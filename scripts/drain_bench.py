#!/usr/bin/env python3
"""Drain benchmark: a cluster node's resumable XEP-0198 sessions moved to the other node
at SIGTERM, against a single node's restart, in one run.

Cluster run: a redis-server of its own on a free loopback port, two gateway nodes (`gwA`,
`gwB`: `xmpp-gateway serve --config`, plain TCP on their own free ports, one SQLite file,
`cluster.redis` and `mod_stream_management.backend: redis`):

1. N clients log in on node A with resumable stream management (`scripts/bench.py`'s
   Session); P partners (no SM) log in on node B and send each of them M numbered
   messages, which cross to A through Redis. The N clients answer no <r/>, so all M stay
   unacknowledged: the first half (rounded down) is handled (counted in the client's h),
   the rest received but never handled (the server must send those again).
2. SIGTERM to node A: it drains (`general.shutdown_grace`), closes each stream with
   <system-shutdown/> and leaves each session for adoption in Redis (or hands it straight
   to B when B asked for it first).
3. Each client reconnects to node B as soon as its stream to A has ended (at most
   --resume-concurrency at once) and sends <resume previd h/>; it must get <resumed/> and
   every message exactly once across the old and the new stream.

Figures: SIGTERM -> node A's exit (the drain), SIGTERM -> every client resumed on B,
per client reconnect -> <resumed/> (TCP, SASL, resume) and <resume/> -> <resumed/>
p50/p99, stream end -> resumed (how long a client is without its session), failures,
messages lost / duplicated / resent; the nodes' log lines at warning and above.

Single-node run (the reference, same load): one node, no cluster; SIGTERM hands the
sessions off to its database; the node is started again as soon as it exits (as a
service manager would), and each client reconnects as soon as its stream has ended and
the new process listens. The comparison prints cluster / single for each figure.

Usage: .venv/bin/python scripts/drain_bench.py [--sessions N] [--messages M] [--json]
(see --help); scripts/drain_bench.sh N wraps it. Nothing is pinned to a CPU by default, as
in scripts/cluster_bench.sh (nodes of a real cluster do not share one core); with --pin the
servers (both nodes and Redis) run on CPU 0 and this script on CPU 1, as bench_restart.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio

# scripts/ is not a package: bench.py and bench_restart.py sit next to this file (bench.py
# adds the repository root).
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench
import bench_restart
from bench_restart import Gateway, LogSummary, RestartBenchError, Runner

from gateway import __version__

ROOT: Final = Path(__file__).resolve().parent.parent
REDIS_START_S: Final = 10.0
MODES: Final = ("cluster", "single")
# Events of the drained node and of the adopting one worth counting (gateway/core).
DRAINED_EVENTS: Final = (
    "session_left_for_adoption",
    "session_moved",
    "sm_surrender",
    "sm_surrender_unknown",
    "session_not_left_for_adoption",
    "session_handed_off",
)
ADOPTING_EVENTS: Final = (
    "sm_resume_elsewhere",
    "sm_resume_handover",
    "session_revived",
    "sm_resume_failed",
    "sm_move_duplicate",
    "session_replaced",
)


class DrainBenchError(Exception):
    """The run cannot go on (redis-server does not start)."""


# --- configuration ------------------------------------------------------------------------


def node_config(
    *,
    port: int,
    database: Path,
    grace: float,
    buffer_max: int,
    redis_url: str | None = None,
    node: str | None = None,
) -> str:
    """A node's YAML config: bench_restart.py's, plus the cluster part when `redis_url`."""
    backend = ", backend: redis" if redis_url is not None else ""
    text = (
        f"general: {{hosts: [{bench_restart.DOMAIN}], negotiation_timeout: 60,"
        f" send_queue_size: 10000, shutdown_grace: {grace}}}\n"
        f"listen:\n  c2s: [{{ip: 127.0.0.1, port: {port}, tls: none}}]\n"
        f"auth: {{database: '{database}'}}\n"
        "modules:\n  mod_stream_management:\n"
        # The clients never answer <r/>: without ack_timeout 0 the live sessions would
        # count as lost after 60 s and park. buffer_max must hold the M messages.
        f"    {{buffer_max: {buffer_max}, ack_timeout: 0, handoff_on_shutdown: true{backend}}}\n"
        "logging: {level: info, format: json}\n"
    )
    if redis_url is not None:
        text += f"cluster: {{redis: '{redis_url}', node: {node}}}\n"
    return text


@contextlib.contextmanager
def running_redis(directory: Path, pin: list[str]) -> Iterator[tuple[int, int]]:
    """A redis-server on a free loopback port, nothing saved to disk (as
    tests/helpers/redis.py starts it); yields (port, pid) once it answers PING."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise DrainBenchError("needs redis-server (Debian's redis-server package)")
    directory.mkdir(parents=True, exist_ok=True)
    port = bench_restart.free_port()
    command = [*pin, binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "no", "--dir", str(directory)]
    command += ["--logfile", str(directory / "redis.log")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + REDIS_START_S
        while True:
            ping = subprocess.run(
                ["redis-cli", "-p", str(port), "ping"],
                capture_output=True,
                text=True,
                check=False,
                timeout=REDIS_START_S,
            )
            if ping.stdout.strip() == "PONG":
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise DrainBenchError(f"redis-server did not start (see {directory}/redis.log)")
            time.sleep(0.05)
        yield port, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def redis_command_counts(port: int) -> Counter[str]:
    """Calls per command so far (`INFO commandstats`), to count a phase's commands."""
    done = await trio.run_process(
        ["redis-cli", "-p", str(port), "info", "commandstats"], capture_stdout=True, check=False
    )
    counts: Counter[str] = Counter()
    for text in done.stdout.decode().splitlines():
        name, _, rest = text.partition(":")
        if name.startswith("cmdstat_") and rest.startswith("calls="):
            counts[name.removeprefix("cmdstat_")] = int(rest.split(",")[0].removeprefix("calls="))
    return counts


def copy_database(template: Path, target: Path) -> None:
    """Copy the SQLite file with the imported accounts (and its journal files, if any)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        source = template.with_name(template.name + suffix)
        if source.exists():
            shutil.copyfile(source, target.with_name(target.name + suffix))


# --- one client's move --------------------------------------------------------------------


@dataclass
class Move:
    """One client: its stream to the drained node ends, it reconnects and resumes."""

    target: bench.Session
    ended_at: float | None = None  # time.time() when its old stream ended
    old_end: str = ""  # how it ended (the reader's error: "stream error <system-shutdown/>")
    resumed_at: float | None = None  # time.time() at <resumed/>
    reconnect_ns: int | None = None  # reconnect start (TCP connect) -> <resumed/>
    resume_ns: int | None = None  # <resume/> sent -> <resumed/>
    failure: str | None = None
    h_mismatch: str | None = None


async def move(
    item: Move,
    cfg: bench.Config,
    ready: trio.Event,
    limiter: trio.CapacityLimiter,
    readers: trio.Nursery,
) -> None:
    """Wait for the client's stream to end, then reconnect (once `ready`) and resume."""
    target = item.target
    await target.reader_done.wait()
    item.ended_at = time.time()
    item.old_end = target.reader_error
    await bench_restart.close_transport(target)
    await ready.wait()
    async with limiter:
        track = target.track
        assert track is not None
        target.cfg = cfg
        track.drop = False
        track.resumed = True
        target.mute_acks = False
        start = time.perf_counter_ns()
        try:
            with trio.fail_after(cfg.login_timeout):
                elapsed, server_h = await target.resume()
        except (
            bench.BenchError,
            OSError,
            ValueError,
            trio.BrokenResourceError,
            trio.TooSlowError,
        ) as exc:
            reason = "timeout" if isinstance(exc, trio.TooSlowError) else str(exc)
            item.failure = reason or type(exc).__name__
            await bench_restart.close_transport(target)
            return
        item.reconnect_ns = time.perf_counter_ns() - start
        item.resume_ns = elapsed
        item.resumed_at = time.time()
        if server_h != target.h_out % bench.H_MOD:
            item.h_mismatch = f"<resumed h='{server_h}'/>, sent {target.h_out}"
        target.start_reader(readers)


# --- one run (cluster or single node) -----------------------------------------------------


def _since(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(end - start, 3)


def _ms_of(values: Sequence[float], pct: float) -> float | None:
    return bench._ms(bench.percentile(values, pct))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} s"


@dataclass
class Nodes:
    """The gateway processes of one run: the drained one and (cluster) the other."""

    drained: Runner
    other: Runner | None
    started: list[Gateway] = field(default_factory=list)


class Run:
    """One mode's run: start, log in, messages, SIGTERM, moves, figures, stop."""

    def __init__(
        self,
        opts: argparse.Namespace,
        mode: str,
        work: Path,
        report: bench.Reporter,
        redis: tuple[int, int] | None,
    ) -> None:
        self.opts = opts
        self.mode = mode
        self.work = work
        self.report = report
        self.redis = redis
        self.figures: dict[str, object] = {}
        report.figures[mode] = self.figures
        self.problems: list[str] = []
        self.handled_n, self.unhandled_n = bench_restart.handoff_groups(opts.messages)

    def line(self, text: str) -> None:
        self.report.line(f"[{self.mode}] {text}")

    def runner(self, name: str, port: int, node: str | None) -> Runner:
        """A Runner (bench_restart.py's) for one node, with its directory and config."""
        directory = self.work / name
        directory.mkdir(parents=True)
        runner = Runner(self.opts, directory)
        redis_url = None if self.redis is None else f"redis://127.0.0.1:{self.redis[0]}/0"
        runner.config.write_text(
            node_config(
                port=port,
                database=self.work / "data" / "gateway.sqlite",
                grace=self.opts.grace,
                buffer_max=max(100, self.opts.messages),
                redis_url=redis_url,
                node=node,
            )
        )
        return runner

    async def run(self) -> int:
        """The whole run; returns the number of problems found."""
        cluster = self.mode == "cluster"
        port_a = bench_restart.free_port()
        port_b = bench_restart.free_port() if cluster else port_a
        nodes = Nodes(
            self.runner("a", port_a, "gwA" if cluster else None),
            self.runner("b", port_b, "gwB") if cluster else None,
        )
        try:
            await self.scenario(nodes, port_a, port_b)
        finally:
            for runner in (nodes.drained, nodes.other):
                if runner is not None:
                    await runner.kill_leftovers()
        self.figures["problems"] = self.problems
        for problem in self.problems:
            self.line(f"PROBLEM: {problem}")
        return len(self.problems)

    async def scenario(self, nodes: Nodes, port_a: int, port_b: int) -> None:
        opts = self.opts
        a = await nodes.drained.start()
        nodes.started.append(a)
        b = None
        if nodes.other is not None:
            b = await nodes.other.start()
            nodes.started.append(b)
        target_cfg = bench_restart.client_config(opts, port=port_a, pid=a.pid, partners=False)
        partner_cfg = bench_restart.client_config(
            opts, port=port_b, pid=(b or a).pid, partners=True
        )
        resume_cfg = dataclasses.replace(target_cfg, port=port_b)
        async with trio.open_nursery() as readers:
            logged_in = await self.prepare(target_cfg, partner_cfg, readers)
            if logged_in is None:
                readers.cancel_scope.cancel()
                return
            targets, partners = logged_in
            moves = [Move(t) for t in targets]
            ready = trio.Event()
            if b is not None:
                ready.set()  # node B listens already
            limiter = trio.CapacityLimiter(opts.resume_concurrency)
            cpu_other = None if b is None else bench.read_cpu_seconds(b.pid)
            cpu_redis = None if self.redis is None else bench.read_cpu_seconds(self.redis[1])
            commands = None if self.redis is None else await redis_command_counts(self.redis[0])
            restarted: Gateway | None = None
            async with trio.open_nursery() as movers:
                for item in moves:
                    movers.start_soon(move, item, resume_cfg, ready, limiter, readers)
                stop = await nodes.drained.stop(a)
                if b is None:
                    restarted = await nodes.drained.start()
                    nodes.started.append(restarted)
                    ready.set()
            done_at = time.time()
            adopting = b or restarted
            assert adopting is not None
            cpu_line = self.measure_cpu(stop, adopting, cpu_other, cpu_redis)
            used: Counter[str] | None = None
            if self.redis is not None and commands is not None:
                used = await redis_command_counts(self.redis[0])
                used.subtract(commands)
            resumed = [m.target for m in moves if m.resumed_at is not None]
            tracks = {t: t.track for t in resumed if t.track is not None}
            await bench.poll_until(lambda: all(t.complete() for t in tracks.values()), opts.timeout)
            await trio.sleep(0.25)  # room for a duplicate to show up
            self.report_drain(a, stop)
            if restarted is not None:
                self.report_restart(restarted, stop)
            self.report_moves(moves, stop.sigterm_at, done_at)
            self.line(cpu_line)
            if used is not None:
                self.report_commands(+used)
            await bench.close_all(resumed)
            async with trio.open_nursery() as closes:
                for session in partners:
                    closes.start_soon(bench_restart.close_transport, session)
            readers.cancel_scope.cancel()
        # The other node (or the restarted one) stops last; its log is read whole.
        last = nodes.started[-1] if b is None else b
        last_runner = nodes.drained if b is None else nodes.other
        assert last_runner is not None
        end = await last_runner.stop(last)
        if end.returncode != 0:
            self.problems.append(f"the last node exited with {end.returncode}")
        if b is not None:
            self.count_events("other_node", b.log.poll(), ADOPTING_EVENTS)
            if replaced := b.log.summary.counts["session_replaced"]:
                # The adopting node's bind found the drained node's directory record
                # still there: it ends "the older session" (a Close to the drained node)
                # and, for an available resource, sends the account's resources, the
                # adopted session included, an unavailable presence from its own JID.
                self.problems.append(
                    f"session_replaced x{replaced} on node B: sessions adopted while node A "
                    "still held their directory records"
                )
        elif restarted is not None:
            self.count_events("restarted_node", restarted.log.poll(), ADOPTING_EVENTS)
        self.report_logs(nodes.started)

    def measure_cpu(
        self,
        stop: bench_restart.StopResult,
        adopting: Gateway,
        other_before: float | None,
        redis_before: float | None,
    ) -> str:
        """Server CPU seconds: the drained node from SIGTERM to its exit, and until every
        client resumed, the other node (or the restarted one, from its start) and Redis;
        returns the line that reports them."""
        after = bench.read_cpu_seconds(adopting.pid)
        redis_after = None if self.redis is None else bench.read_cpu_seconds(self.redis[1])
        adopting_s = after if other_before is None or after is None else after - other_before
        redis_s = (
            None if redis_after is None or redis_before is None else redis_after - redis_before
        )
        figures = {
            "drained_node_sigterm_to_exit_s": stop.cpu_s,
            (
                "other_node_to_all_resumed_s"
                if other_before is not None
                else "restarted_node_start_to_all_resumed_s"
            ): None if adopting_s is None else round(adopting_s, 2),
            "redis_s": None if redis_s is None else round(redis_s, 2),
        }
        self.figures["cpu"] = figures
        return "server CPU: " + ", ".join(
            f"{name.removesuffix('_s').replace('_', ' ')} {bench._fmt_s(v)}"
            for name, v in figures.items()
        )

    def report_commands(self, used: Counter[str]) -> None:
        """Redis commands from SIGTERM until every client resumed (both nodes)."""
        total = used.total()
        self.figures["redis_commands"] = {"total": total, **dict(used.most_common())}
        self.line(
            f"Redis commands from SIGTERM to the last resume: {total} "
            f"({total / self.opts.sessions:.1f} per session): "
            + ", ".join(f"{name} {n}" for name, n in used.most_common(8))
        )

    async def prepare(
        self, target_cfg: bench.Config, partner_cfg: bench.Config, readers: trio.Nursery
    ) -> tuple[list[bench.Session], list[bench.Session]] | None:
        """Log in, send the unacked messages (bench_restart.py's steps, nobody cut)."""
        opts, problems = self.opts, self.problems
        targets = await bench_restart.login(
            target_cfg, readers, self.report, f"{self.mode}_clients"
        )
        partners = await bench_restart.login(
            partner_cfg, readers, self.report, f"{self.mode}_partners"
        )
        without_resume = sum(not t.sm_id for t in targets)
        targets = [t for t in targets if t.sm_id]
        if len(targets) < opts.sessions or len(partners) < opts.partners:
            problems.append(
                f"logged in {len(targets)}/{opts.sessions} clients with resumable SM "
                f"({without_resume} without), {len(partners)}/{opts.partners} partners"
            )
        if not targets or not partners:
            self.line("nothing to measure without clients and partners")
            return None
        tracks: dict[bench.Session, bench.ResumeTrack] = {}
        for target in targets:
            target.mute_acks = True  # every message stays unacknowledged
            tracks[target] = target.track = bench.ResumeTrack.create(opts.messages, 0)
        pairs = [(p, targets[i :: len(partners)]) for i, p in enumerate(partners)]
        handled_n, unhandled_n = self.handled_n, self.unhandled_n
        await bench_restart.send_messages(pairs, 0, handled_n)
        if not await bench.poll_until(
            lambda: all(t.handled_old() >= handled_n for t in tracks.values()), opts.timeout
        ):
            problems.append("not every handled message arrived before the stop")
        for track in tracks.values():
            track.drop = True
        await bench_restart.send_messages(pairs, handled_n, opts.messages)
        if not await bench.poll_until(
            lambda: all(t.dropped >= unhandled_n for t in tracks.values()), opts.timeout
        ):
            problems.append("not every unhandled message arrived before the stop")
        for track in tracks.values():
            # Nothing else is sent to them; handling again lets the reader see the
            # <stream:error><system-shutdown/>.
            track.drop = False
        sent = sum(p.h_out for p in partners)
        self.figures["messages"] = {
            "partners": len(partners),
            "sent": sent,
            "per_session": opts.messages,
            "handled_unacked": handled_n,
            "unhandled": unhandled_n,
        }
        self.line(
            f"messages: {sent} sent by {len(partners)} partners"
            + (" on node B" if self.mode == "cluster" else "")
            + f", {opts.messages} per session and none acked ({handled_n} handled, "
            f"{unhandled_n} received but unhandled)"
        )
        return targets, partners

    def report_drain(self, gateway: Gateway, stop: bench_restart.StopResult) -> None:
        """SIGTERM -> exit of the drained node, and its phases from its log."""
        log = gateway.log.summary
        phases = bench_restart.stop_phases(
            log, sigterm_at=stop.sigterm_at, exit_at=stop.exit_at, grace=self.opts.grace
        )
        moved = {
            event: {
                "count": log.counts[event],
                "first_s": _since(stop.sigterm_at, log.first_ts.get(event)),
                "last_s": _since(stop.sigterm_at, log.last_ts.get(event)),
            }
            for event in DRAINED_EVENTS
            if log.counts[event]
        }
        self.figures["drain"] = {
            "sigterm_to_draining_s": phases["sigterm_to_draining_s"],
            "sigterm_to_drain_end_s": phases["sigterm_to_drain_end_s"],
            "sigterm_to_stopped_s": phases["sigterm_to_stopped_s"],
            "sigterm_to_exit_s": phases["sigterm_to_exit_s"],
            "grace_s": self.opts.grace,
            "rss_kib_before": stop.rss_kib,
            "exit_status": stop.returncode,
            "events": moved,
        }
        self.line(
            f"drain: SIGTERM -> exit {_fmt(phases['sigterm_to_exit_s'])} (status "
            f"{stop.returncode}; -> draining {_fmt(phases['sigterm_to_draining_s'])}, -> drain "
            f"end {_fmt(phases['sigterm_to_drain_end_s'])} (grace {self.opts.grace:g} s), -> "
            f"stopped {_fmt(phases['sigterm_to_stopped_s'])}); server RSS {stop.rss_kib} KiB, "
            f"CPU {bench._fmt_s(stop.cpu_s)}"
        )
        self.line(
            "  its sessions: "
            + (
                "; ".join(
                    f"{event} x{f['count']} (SIGTERM + {f['first_s']} .. {f['last_s']} s)"
                    for event, f in moved.items()
                )
                or "none logged"
            )
        )
        if stop.returncode != 0:
            self.problems.append(f"the drained node exited with {stop.returncode}")
        kept = sum(log.counts[e] for e in ("session_left_for_adoption", "session_moved"))
        kept += log.counts["session_handed_off"]
        if kept != self.opts.sessions:
            self.problems.append(
                f"the drained node kept {kept} sessions (left, moved or handed off), "
                f"expected {self.opts.sessions}"
            )

    def report_restart(self, gateway: Gateway, stop: bench_restart.StopResult) -> None:
        log = gateway.log.poll()
        listening = log.first_ts.get("listening")
        revived = log.field_of("sessions_revived", "sessions")
        self.figures["restart"] = {
            "exit_to_spawn_s": _since(stop.exit_at, gateway.spawned_at),
            "spawn_to_listening_s": _since(gateway.spawned_at, listening),
            "sigterm_to_listening_s": _since(stop.sigterm_at, listening),
            "sessions_revived": revived,
        }
        self.line(
            f"restart: exit -> spawn {_fmt(_since(stop.exit_at, gateway.spawned_at))}, spawn "
            f"-> listening {_fmt(_since(gateway.spawned_at, listening))} ({revived} sessions "
            f"revived); SIGTERM -> listening {_fmt(_since(stop.sigterm_at, listening))}"
        )
        if revived != self.opts.sessions:
            self.problems.append(f"revived {revived} sessions, expected {self.opts.sessions}")

    def report_moves(self, moves: list[Move], sigterm_at: float, done_at: float) -> None:
        """Stream ends, resumptions and messages of the N clients."""
        ok = [m for m in moves if m.resumed_at is not None]
        failures = Counter(m.failure for m in moves if m.failure is not None)
        unfinished = sum(m.resumed_at is None and m.failure is None for m in moves)
        if unfinished:
            failures["never reconnected"] += unfinished
        ended = [m.ended_at for m in moves if m.ended_at is not None]
        old_ends = Counter(m.old_end or "(clean close)" for m in moves if m.ended_at)
        reconnect = [float(m.reconnect_ns) for m in ok if m.reconnect_ns is not None]
        resume = [float(m.resume_ns) for m in ok if m.resume_ns is not None]
        outage = [
            (m.resumed_at - m.ended_at) * 1e9
            for m in ok
            if m.resumed_at is not None and m.ended_at is not None
        ]
        last = max((m.resumed_at for m in ok if m.resumed_at is not None), default=None)
        totals: Counter[str] = Counter()
        for m in ok:
            assert m.target.track is not None
            totals.update(m.target.track.tally())
        mismatches = [m.h_mismatch for m in ok if m.h_mismatch]
        errors = sorted({m.target.reader_error for m in ok if m.target.reader_error})
        expected_resent = len(ok) * self.unhandled_n
        self.figures["resume"] = {
            "sessions": len(moves),
            "resumed": len(ok),
            "failed": len(moves) - len(ok),
            "failures": dict(failures),
            "concurrency": self.opts.resume_concurrency,
            "sigterm_to_first_stream_end_s": _since(sigterm_at, min(ended, default=None)),
            "sigterm_to_last_stream_end_s": _since(sigterm_at, max(ended, default=None)),
            "old_stream_ends": dict(old_ends),
            "sigterm_to_all_resumed_s": _since(sigterm_at, last) if not failures else None,
            "sigterm_to_last_resumed_s": _since(sigterm_at, last),
            "sigterm_to_moves_done_s": _since(sigterm_at, done_at),
            "reconnect_p50_ms": _ms_of(reconnect, 50),
            "reconnect_p99_ms": _ms_of(reconnect, 99),
            "reconnect_max_ms": bench._ms(max(reconnect, default=math.nan)),
            "resume_p50_ms": _ms_of(resume, 50),
            "resume_p99_ms": _ms_of(resume, 99),
            "outage_p50_ms": _ms_of(outage, 50),
            "outage_p99_ms": _ms_of(outage, 99),
            "outage_max_ms": bench._ms(max(outage, default=math.nan)),
            "resent": totals["resent"],
            "resent_expected": expected_resent,
            "lost": totals["lost"],
            "duplicates": totals["duplicates"],
            "resent_after_handled": totals["resent_after_handled"],
            "h_mismatches": len(mismatches),
            "reader_errors": errors,
        }
        where = "node B" if self.mode == "cluster" else "the restarted node"
        self.line(
            f"streams to the drained node ended SIGTERM + "
            f"{_fmt(_since(sigterm_at, min(ended, default=None)))} .. "
            f"{_fmt(_since(sigterm_at, max(ended, default=None)))} ("
            + ", ".join(f"{end} x{n}" for end, n in old_ends.most_common(3))
            + ")"
        )
        self.line(
            f"resume on {where}: {len(ok)}/{len(moves)} resumed, SIGTERM -> last resumed "
            f"{_fmt(_since(sigterm_at, last))}; reconnect (TCP+SASL+resume) -> <resumed/> "
            f"p50 {bench.fmt_ms(bench.percentile(reconnect, 50))}, p99 "
            f"{bench.fmt_ms(bench.percentile(reconnect, 99))}; <resume/> -> <resumed/> p50 "
            f"{bench.fmt_ms(bench.percentile(resume, 50))}, p99 "
            f"{bench.fmt_ms(bench.percentile(resume, 99))}; stream end -> resumed p50 "
            f"{bench.fmt_ms(bench.percentile(outage, 50))}, p99 "
            f"{bench.fmt_ms(bench.percentile(outage, 99))}; failures "
            f"{len(moves) - len(ok)} ({self.opts.resume_concurrency} in flight)"
        )
        self.line(
            f"  messages: resent after the resume {totals['resent']}/{expected_resent} "
            f"expected; lost {totals['lost']}, duplicates {totals['duplicates']} (handled "
            f"before the stop and sent again: {totals['resent_after_handled']}); h mismatches "
            f"{len(mismatches)}"
        )
        self.problems += [f"resume failed x{n}: {why}" for why, n in failures.most_common()]
        self.problems += [f"session error after resuming: {e}" for e in errors[:5]]
        self.problems += mismatches[:3]
        if totals["lost"] or totals["duplicates"]:
            self.problems.append(f"lost {totals['lost']}, duplicated {totals['duplicates']}")
        if totals["resent"] != expected_resent:
            self.problems.append(f"resent {totals['resent']} messages, expected {expected_resent}")
        if set(old_ends) - {"stream error <system-shutdown/>"}:
            self.problems.append(f"streams to the drained node ended with {dict(old_ends)}")

    def count_events(self, name: str, log: LogSummary, events: Sequence[str]) -> None:
        counts = {event: log.counts[event] for event in events if log.counts[event]}
        self.figures[f"{name}_events"] = counts
        self.line(
            f"{name.replace('_', ' ')}: "
            + (", ".join(f"{event} x{n}" for event, n in counts.items()) or "nothing logged")
        )

    def report_logs(self, gateways: list[Gateway]) -> None:
        """Warning/error lines and anything that is not a JSON line (tracebacks)."""
        problems: Counter[str] = Counter()
        odd: list[str] = []
        for gateway in gateways:
            summary = gateway.log.poll()
            problems += summary.problems
            for text in gateway.log.path.read_text(errors="replace").splitlines():
                if text.strip() and not text.startswith("{"):
                    odd.append(f"{gateway.log.path.parent.name}/{gateway.log.path.name}: {text}")
        self.figures["gateway_logs"] = {"problems": dict(problems), "non_json_lines": len(odd)}
        self.line(
            f"gateway logs: {problems.total()} warning/error lines, {len(odd)} non-JSON lines"
            + "".join(f"; {event} x{n}" for event, n in problems.most_common(5))
        )
        for text in odd[:20]:
            self.line(f"  {text}")
        if problems.total() or odd:
            self.problems.append(
                f"gateway logs: {dict(problems.most_common(5))}, {len(odd)} non-JSON lines"
            )


# --- comparison and command line ----------------------------------------------------------

ROWS: Final = (
    ("SIGTERM -> drained node exits (s)", "drain", "sigterm_to_exit_s"),
    ("SIGTERM -> all resumed (s)", "resume", "sigterm_to_all_resumed_s"),
    ("reconnect -> <resumed/> p50 (ms)", "resume", "reconnect_p50_ms"),
    ("reconnect -> <resumed/> p99 (ms)", "resume", "reconnect_p99_ms"),
    ("<resume/> -> <resumed/> p50 (ms)", "resume", "resume_p50_ms"),
    ("<resume/> -> <resumed/> p99 (ms)", "resume", "resume_p99_ms"),
    ("stream end -> resumed p50 (ms)", "resume", "outage_p50_ms"),
    ("stream end -> resumed p99 (ms)", "resume", "outage_p99_ms"),
    ("resume failures", "resume", "failed"),
    ("messages lost", "resume", "lost"),
    ("messages duplicated", "resume", "duplicates"),
)


def compare(report: bench.Reporter) -> None:
    """The cluster's figures against the single node's, with the ratio cluster / single."""
    figures = report.figures
    table: dict[str, dict[str, object]] = {}
    report.line(f"{'':36} {'cluster':>10} {'single':>10} {'ratio':>7}")
    for name, section, key in ROWS:
        values = []
        for mode in MODES:
            run = figures.get(mode)
            part = run.get(section) if isinstance(run, dict) else None
            values.append(part.get(key) if isinstance(part, dict) else None)
        a, b = values
        ratio = (
            round(a / b, 2)
            if isinstance(a, int | float) and isinstance(b, int | float) and b
            else None
        )
        table[name] = {"cluster": a, "single": b, "ratio": ratio}
        shown = "-" if ratio is None else f"{ratio:.2f}"
        report.line(f"{name:36} {a!s:>10} {b!s:>10} {shown:>7}")
    figures["comparison"] = table


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="drain_bench.py",
        description="Time the drain of a cluster node (SIGTERM) that moves N resumable "
        "sessions to the other node, against a single node's restart with the same "
        "sessions, and check that every client resumes with its messages exactly once.",
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
        "--modes",
        default=",".join(MODES),
        help="the runs, in order: cluster, single or both (cluster,single)",
    )
    add(
        "--gateway",
        default=str(ROOT / ".venv" / "bin" / "xmpp-gateway"),
        help="the xmpp-gateway executable (.venv/bin/xmpp-gateway)",
    )
    add(
        "--pin",
        action="store_true",
        help="pin the servers (both nodes and Redis) to CPU 0 and the bench to CPU 1",
    )
    add("--keep", action="store_true", help="keep the work directory (configs, logs, database)")
    add("--json", action="store_true", help="print one JSON object on stdout (lines on stderr)")
    args = parser.parse_args(argv)
    for name in ("sessions", "messages", "partners", "concurrency", "resume_concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.messages > 10_000:
        parser.error("--messages must be <= 10000 (the session's buffer_max)")
    if not 0 <= args.grace <= 600:
        parser.error("--grace must be between 0 and 600 (general.shutdown_grace)")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - set(MODES):
        parser.error("--modes takes cluster, single or both, comma-separated")
    args.partners = min(args.partners, args.sessions)
    args.no_pin = not args.pin  # (bench_restart.Runner's setting)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    report = bench.Reporter(opts.json)
    work = Path(tempfile.mkdtemp(prefix="drain-bench."))
    started = time.perf_counter()
    status = 1
    try:
        template = Runner(opts, work)
        pin = template.pin
        template.config.write_text(
            node_config(port=0, database=work / "accounts.sqlite", grace=opts.grace, buffer_max=100)
        )
        imported = template.import_accounts(opts.sessions, opts.partners)
        if pin:
            os.sched_setaffinity(0, {1})  # the servers get CPU 0 through taskset
        report.figures.update(
            label=f"xmpp-gateway {__version__}",
            sessions=opts.sessions,
            messages=opts.messages,
            partners=opts.partners,
            grace_s=opts.grace,
            pinned=bool(pin),
            accounts_import_s=round(imported, 2),
            loadavg_start=os.getloadavg(),
        )
        report.line(
            f"drain_bench: xmpp-gateway {__version__}, {opts.sessions} sessions x "
            f"{opts.messages} unacked messages, {opts.partners} partners, shutdown_grace "
            f"{opts.grace:g} s, {opts.resume_concurrency} resumptions in flight; "
            + ("servers on CPU 0, bench on CPU 1" if pin else "unpinned")
            + f"; {opts.sessions + opts.partners} accounts imported in {imported:.1f} s; "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        found = 0
        for mode in opts.modes:
            mode_work = work / mode
            copy_database(work / "accounts.sqlite", mode_work / "data" / "gateway.sqlite")
            with contextlib.ExitStack() as stack:
                redis = None
                if mode == "cluster":
                    redis = stack.enter_context(running_redis(mode_work / "redis", pin))
                run = Run(opts, mode, mode_work, report, redis)
                found += trio.run(run.run)
        if len(opts.modes) == len(MODES):
            compare(report)
        report.figures["loadavg_end"] = os.getloadavg()
        status = 1 if found else 0
    except* (RestartBenchError, DrainBenchError) as group:
        errors = [str(exc) for exc in group.exceptions]
        for error in errors:
            report.line(f"drain_bench: {error}")
        report.figures["error"] = errors
    finally:
        if opts.keep:
            report.line(f"drain_bench: work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report.figures["total_seconds"] = round(time.perf_counter() - started, 2)
    report.figures["exit_status"] = status
    if opts.json:
        print(json.dumps(report.figures, sort_keys=True))
    return status


if __name__ == "__main__":
    sys.exit(main())
