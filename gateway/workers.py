"""Several worker processes on the same listeners (`general.workers`), each a node of the
cluster (DESIGN section 6): one machine's cores all serve.

`serve` with `workers: N` (N > 1) runs this supervisor instead of a gateway: it starts N
children, `python -m gateway serve --config FILE --worker I`, each a whole gateway whose
listeners set SO_REUSEPORT (the kernel spreads new connections over them) and whose node
id is `cluster.node` suffixed with `-I` (or, without `cluster.node`, the host name and
the child's pid). The supervisor restarts a child that exits when it should not (after a
backoff that grows while children keep dying quickly, logged each time), and on SIGTERM
or SIGINT asks every child to drain (their sessions
move to the nodes still up, or to the cluster's adoptable store) and exits once all have
exited: 0 when every child exited cleanly. SIGHUP is passed on to every child.
"""

from __future__ import annotations

import signal
import sys
from typing import Final

import structlog
import trio

log = structlog.get_logger(module=__name__)

#: Seconds before restarting a child that died, doubling up to MAX_RESTART_DELAY while
#: children keep dying within STABLE_AFTER seconds of their start.
FIRST_RESTART_DELAY: Final = 0.5
MAX_RESTART_DELAY: Final = 30.0
STABLE_AFTER: Final = 60.0


class Workers:
    """The supervisor's state: the children, and whether it is stopping."""

    def __init__(self, config_path: str, count: int) -> None:
        self.config_path = config_path
        self.count = count
        self.children: dict[int, trio.Process] = {}
        self.stopping = trio.Event()
        self.failed = False

    def command(self, index: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            self.config_path,
            "--worker",
            str(index),
        ]

    async def keep(self, index: int) -> None:
        """Run child `index` until the supervisor stops, restarting it when it dies."""
        delay = FIRST_RESTART_DELAY
        while not self.stopping.is_set():
            started = trio.current_time()
            process = await trio.lowlevel.open_process(self.command(index))
            self.children[index] = process
            if self.stopping.is_set():
                process.send_signal(signal.SIGTERM)  # (SIGTERM came while it started)
            log.info("worker_started", worker=index, pid=process.pid)
            with trio.CancelScope(shield=True):
                # Shielded: a child is always waited for (no zombie), also at shutdown.
                code = await process.wait()
            del self.children[index]
            if self.stopping.is_set():
                log.info("worker_exited", worker=index, pid=process.pid, status=code)
                # (A child still starting when SIGTERM came ends by it, with nothing to
                # drain: that is a clean exit too.)
                self.failed = self.failed or code not in (0, -signal.SIGTERM)
                return
            log.warning("worker_died", worker=index, pid=process.pid, status=code, restart_in=delay)
            await trio.sleep(delay)
            ran = trio.current_time() - started
            delay = FIRST_RESTART_DELAY if ran > STABLE_AFTER else min(delay * 2, MAX_RESTART_DELAY)

    def signal_all(self, signum: int) -> None:
        for process in list(self.children.values()):
            if process.returncode is None:
                process.send_signal(signum)


async def run_workers(config_path: str, count: int) -> int:
    """Supervise `count` worker processes until SIGTERM/SIGINT and their exit (module
    docstring); returns the supervisor's exit status."""
    workers = Workers(config_path, count)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(workers.keep, index)
            log.info("workers_started", workers=count)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    # Each worker reads its configuration itself.
                    workers.signal_all(signal.SIGHUP)
                    continue
                log.info("shutdown_requested", signal=signal.Signals(signum).name)
                workers.stopping.set()
                workers.signal_all(signal.SIGTERM)
                break
    log.info("stopped", failed=workers.failed)
    return 1 if workers.failed else 0
