"""The gateway as a real subprocess, set up with its own CLI exactly as an operator would.

`live_gateway()` optionally makes a certificate with `scripts/make_cert.py`, picks free
loopback ports, writes `config.yaml`, runs `check-config` and `user add` through the CLI,
starts `python -m gateway serve` (stdout and stderr to `gateway.log`), waits (bounded)
until its listeners accept connections, and on the way out stops it.

`LiveGateway.restart()` stops the process with SIGTERM and starts it again on the same
directory, config, database and ports (its output appended to the same log; each run's
lines are told apart by `log_events(run=...)`), as an operator's restart would.

The config text is a `string.Template`: `$name` (or `${name}`) is replaced with the free
port picked for each name in `ports`, so YAML braces are written as they are; a literal
dollar sign must be written `$$`.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import string
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from tests.helpers.logs import parse_json_lines

ROOT: Final[Path] = Path(__file__).resolve().parents[2]
START_TIMEOUT: Final = 30.0  # seconds for the listeners to accept connections
STOP_TIMEOUT: Final = 30.0  # seconds for the process to exit after SIGTERM


def free_port() -> int:
    """A loopback TCP port that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gateway_cli(
    *args: str, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`python -m gateway ARGS` from the repository root, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )


@dataclass
class LiveGateway:
    """A running gateway subprocess made by `live_gateway()`: its files, process, ports."""

    config: Path
    log: Path
    proc: subprocess.Popen[bytes]  # the current process (a new one after `start()`)
    ports: dict[str, int]
    cert: Path | None  # the server certificate (PEM), when `certs=True`
    wait_for: tuple[int, ...] = ()  # the ports a (re)start waits for
    runs: list[int] = field(default_factory=lambda: [0])  # log offset where each run begins
    terminated: set[int] = field(default_factory=set)  # pids that were sent SIGTERM

    @property
    def port(self) -> int:
        """The c2s port."""
        return self.ports["c2s"]

    def log_events(self, run: int | None = None) -> list[dict[str, Any]]:
        """The JSON log lines of every run, or of run `run` only (0: the first process,
        -1: the current one). A line still being written is left out."""
        data = self.log.read_bytes()
        data = data[: data.rfind(b"\n") + 1]
        if run is not None:
            index = run % len(self.runs)
            end = self.runs[index + 1] if index + 1 < len(self.runs) else len(data)
            data = data[self.runs[index] : end]
        return parse_json_lines(data)

    def terminate(self) -> None:
        """Send SIGTERM (once per process: a second one may kill it mid-shutdown)."""
        if self.proc.pid not in self.terminated and self.proc.poll() is None:
            self.terminated.add(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """`terminate()` (unless done already) and wait for the exit; returns its status.

        Raises:
            subprocess.TimeoutExpired: it had not exited after `timeout` (then it is killed).
        """
        self.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def start(self) -> None:
        """Start `serve` again (the last process must have exited) on the same config,
        and wait (bounded) until it listens on the same ports."""
        assert self.proc.poll() is not None, "the gateway is still running"
        self.runs.append(self.log.stat().st_size)
        self.proc = _spawn(self.config, self.log, append=True)
        _wait_listening(self.proc, self.log, self.wait_for)

    def restart(self) -> None:
        """`stop()` (its exit status must be 0), then `start()`."""
        code = self.stop()
        assert code == 0, f"exit status {code}:\n{self.log.read_text()[-4000:]}"
        self.start()


def _spawn(config: Path, log: Path, *, append: bool = False) -> subprocess.Popen[bytes]:
    """`python -m gateway serve`, its stdout and stderr to `log`."""
    with log.open("ab" if append else "wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


def _wait_listening(proc: subprocess.Popen[bytes], log: Path, ports: Sequence[int]) -> None:
    """Wait (at most START_TIMEOUT) until every one of `ports` accepts a connection."""
    deadline = time.monotonic() + START_TIMEOUT
    for port in ports:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"gateway did not start:\n{log.read_text()}") from None
                time.sleep(0.05)


def make_certs(out: Path) -> Path:
    """`scripts/make_cert.py --out OUT` (as an operator sets up TLS): the certificate of
    localhost (`OUT/localhost.pem`, its key beside it)."""
    made = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_cert.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    return out / "localhost.pem"


@contextlib.contextmanager
def live_gateway(
    tmp_path: Path,
    config: str,
    *,
    password: str,
    ports: Sequence[str] = ("c2s",),
    users: Sequence[str] = ("alice", "bob"),
    certs: bool = False,
    check_config: bool = True,
    setup: Callable[[Path], None] | None = None,
    wait_for: Sequence[str] | None = None,
    stop: Literal["term", "kill"] = "term",
    assert_clean_exit: bool = False,
) -> Iterator[LiveGateway]:
    """The gateway subprocess in `tmp_path`, with `users`@localhost (all with `password`).

    `config` is a `string.Template` with a `$name` per entry of `ports` (see the module
    docstring). `setup(config_path)` runs after the users are added, before `serve`.
    `wait_for` names the ports to wait for (default: all of them). On the way out a
    still-running process gets SIGTERM (`stop="term"`: killed if it has not exited in
    STOP_TIMEOUT) or SIGKILL (`stop="kill"`); with `assert_clean_exit` its exit status
    after SIGTERM must be 0 and a timeout is re-raised after the kill.
    """
    cert = make_certs(tmp_path / "certs") if certs else None
    port_numbers = {name: free_port() for name in ports}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(string.Template(config).substitute(port_numbers))
    if check_config:
        checked = gateway_cli("check-config", "--config", str(config_path))
        assert checked.returncode == 0, checked.stdout + checked.stderr
    for user in users:
        added = gateway_cli(
            "user", "add", f"{user}@localhost", "--password", password, "--config", str(config_path)
        )
        assert added.returncode == 0, added.stderr
    if setup is not None:
        setup(config_path)
    log = tmp_path / "gateway.log"
    names = ports if wait_for is None else wait_for
    gateway = LiveGateway(
        config_path,
        log,
        _spawn(config_path, log),
        port_numbers,
        cert,
        wait_for=tuple(port_numbers[name] for name in names),
    )
    try:
        _wait_listening(gateway.proc, log, gateway.wait_for)
        yield gateway
    finally:
        proc = gateway.proc  # the current process (restarts replace it)
        if proc.poll() is None:
            if stop == "kill":
                proc.kill()
                proc.wait()
            else:
                gateway.terminate()
                try:
                    code = proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    if assert_clean_exit:
                        raise
                else:
                    if assert_clean_exit:
                        assert code == 0, log.read_text()[-4000:]


def import_users(config: Path, users: Sequence[str], password: str) -> None:
    """`user import -` through the CLI: `users`@localhost, each with `password`."""
    lines = "".join(f"{user}@localhost {password}\n" for user in users)
    imported = gateway_cli("user", "import", "-", "--config", str(config), stdin=lines)
    assert imported.returncode == 0, imported.stdout + imported.stderr


def starttls_config(*, general: str = "", modules: str = "") -> str:
    """A `live_gateway()` config for real clients: one c2s listener (port `$c2s`) with
    STARTTLS required and the certificate that `certs=True` makes, the accounts in
    data/accounts.sqlite, JSON logs at info level. `general` adds YAML flow-mapping items
    to the general section (`"shutdown_grace: 0.5"`); `modules`, when given, is the
    content of the modules section (`"mod_stream_management: {resume_timeout: 60}"`)."""
    lines = [
        f"general: {{hosts: [localhost]{', ' + general if general else ''}}}",
        "listen:",
        "  c2s: [{ip: 127.0.0.1, port: $c2s, tls: required}]",
        "tls: {certfile: certs/localhost.pem, keyfile: certs/localhost.key}",
        "auth: {database: data/accounts.sqlite}",
    ]
    if modules:
        lines += ["modules:", f"  {modules}"]
    lines.append("logging: {level: info, format: json}")
    return "\n".join(lines) + "\n"
