"""The command line: its parser, and the `user` commands that manage accounts in the
database named by `auth.database` (the server itself is `gateway.app`)."""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from gateway import __version__
from gateway.config import GatewayConfig
from gateway.errors import JIDError, StorageError
from gateway.storage.roster_sqlite import SqliteRosterStore
from gateway.storage.sqlite import SqliteAccountStore
from gateway.xmpp.jid import JID


def command_parser() -> argparse.ArgumentParser:
    """The command line of `xmpp-gateway` (`serve`, `check-config`, `user ...`)."""
    parser = argparse.ArgumentParser(prog="xmpp-gateway", description="XMPP edge gateway")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config", default="config.yaml", help="config file (default: %(default)s)"
    )
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", default=argparse.SUPPRESS, help="config file")
    # Set by the worker supervisor (general.workers) for each child it starts.
    serve.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    check = sub.add_parser("check-config", help="validate the config file and exit")
    check.add_argument("--config", default=argparse.SUPPRESS, help="config file")
    user = sub.add_parser("user", help="manage accounts")
    user.add_argument("--config", default=argparse.SUPPRESS, help="config file")
    user_sub = user.add_subparsers(dest="user_command", required=True)
    add = user_sub.add_parser("add", help="create an account")
    add.add_argument("jid")
    add.add_argument("--password", help="the password (read from stdin when omitted)")
    add.add_argument("--config", default=argparse.SUPPRESS, help="config file")
    passwd = user_sub.add_parser("passwd", help="set an account's password")
    passwd.add_argument("jid")
    passwd.add_argument("--password", help="the password (read from stdin when omitted)")
    passwd.add_argument("--config", default=argparse.SUPPRESS, help="config file")
    remove = user_sub.add_parser("remove", help="delete an account")
    remove.add_argument("jid")
    remove.add_argument("--config", default=argparse.SUPPRESS, help="config file")
    list_ = user_sub.add_parser("list", help="list accounts")
    list_.add_argument("host", nargs="?", help="only this domain")
    list_.add_argument("--config", default=argparse.SUPPRESS, help="config file")
    imp = user_sub.add_parser("import", help="create/update accounts from 'jid password' lines")
    imp.add_argument("file", help="the file, or - for stdin")
    imp.add_argument("--config", default=argparse.SUPPRESS, help="config file")
    return parser


def _read_password(given: str | None, out: TextIO) -> str:
    if given is not None:
        return given
    if sys.stdin.isatty():
        return getpass.getpass("Password: ")
    line = sys.stdin.readline().rstrip("\r\n")
    return line


def _account_jid(text: str, config: GatewayConfig) -> JID:
    try:
        jid = JID.parse(text)
    except JIDError as exc:
        raise SystemExit(f"error: {text!r} is not a valid JID: {exc}") from exc
    if jid.local is None or jid.resource is not None:
        raise SystemExit(f"error: {text!r} must be a bare JID like user@{config.general.hosts[0]}")
    if jid.domain not in config.general.hosts:
        raise SystemExit(
            f"error: {jid.domain} is not served (general.hosts in {config.path}: "
            f"{', '.join(config.general.hosts)})"
        )
    return jid


def _import_lines(lines: Iterator[str], config: GatewayConfig) -> Iterator[tuple[str, str, str]]:
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        # Whitespace around the password is not part of it (files are often aligned).
        jid_text, _, password = line.strip().partition(" ")
        password = password.strip()
        if not password:
            raise SystemExit(f"error: line {number}: expected 'jid password'")
        try:
            jid = _account_jid(jid_text, config)
        except SystemExit as exc:
            raise SystemExit(f"error: line {number}: {str(exc).removeprefix('error: ')}") from exc
        assert jid.local is not None
        yield jid.domain, jid.local, password


def run_user_command(args: argparse.Namespace, config: GatewayConfig) -> int:
    store = SqliteAccountStore(config.auth.database)
    iterations = config.auth.scram_iterations
    try:
        command = args.user_command
        if command == "list":
            for host, username in store.list_users(args.host):
                print(f"{username}@{host}")
            return 0
        if command == "import":
            if args.file == "-":
                entries = list(_import_lines(iter(sys.stdin), config))
            else:
                with Path(args.file).open(encoding="utf-8") as fh:
                    entries = list(_import_lines(iter(fh), config))
            count = store.import_users(entries, iterations=iterations)
            print(f"imported {count} accounts")
            return 0
        jid = _account_jid(args.jid, config)
        assert jid.local is not None
        if command == "add":
            password = _read_password(args.password, sys.stdout)
            if not password:
                raise SystemExit("error: the password must not be empty")
            store.add_user(jid.domain, jid.local, password, iterations=iterations)
            print(f"created {jid}")
        elif command == "passwd":
            password = _read_password(args.password, sys.stdout)
            if not password:
                raise SystemExit("error: the password must not be empty")
            store.set_password(jid.domain, jid.local, password, iterations=iterations)
            print(f"password set for {jid}")
        elif command == "remove":
            if not store.remove_user(jid.domain, jid.local):
                raise SystemExit(f"error: no account {jid}")
            with SqliteRosterStore(config.auth.database) as roster:
                roster.remove_account(jid.domain, jid.local)
            print(f"removed {jid}")
        return 0
    except StorageError as exc:
        raise SystemExit(f"error: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise SystemExit(f"error: {args.file}: not UTF-8 text (byte {exc.start})") from exc
    except ValueError as exc:
        # PRECIS refused the password (e.g. a control character); the message names the
        # rule, never the password itself.
        raise SystemExit(f"error: invalid password: {exc}") from exc
    finally:
        store.close()
