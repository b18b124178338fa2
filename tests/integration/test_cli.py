"""The command line, run as a real subprocess: check-config and the `user` commands.

Every case runs `python -m gateway ... --config FILE` on a config in `tmp_path` (one plain-TCP
listener, so no certificate is needed; the account database next to the config file), and
checks the exit code, the exact output lines and what ended up in the database.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway import __version__
from gateway.storage.roster_sqlite import RosterItem, SqliteRosterStore
from gateway.storage.sqlite import SqliteAccountStore
from gateway.xmpp.sasl import verify_plain
from tests.helpers.live import gateway_cli

CONFIG = """\
general:
  hosts: [localhost, example.org]
listen:
  c2s:
    - {ip: 127.0.0.1, port: 0, tls: none}
auth:
  database: data/accounts.sqlite   # relative: next to this file
"""


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run the gateway CLI; stdin is a pipe (never a terminal), empty unless given."""
    return gateway_cli(*args, stdin=stdin, timeout=300)


def _ok(result: subprocess.CompletedProcess[str]) -> list[str]:
    """Assert success with a quiet stderr; the stdout lines."""
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout.splitlines()


def _fails(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """Assert a failure reported as exactly one stderr line and no traceback; that line."""
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "data" / "accounts.sqlite"


def _user(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return _cli("user", *args, "--config", str(config), stdin=stdin)


def _listed(config: Path, *host: str) -> list[str]:
    return _ok(_user(config, "list", *host))


def _password_works(database: Path, jid: str, password: str) -> bool:
    """Whether `password` matches the stored SCRAM credentials, for both hashes."""
    username, _, host = jid.partition("@")
    with SqliteAccountStore(database) as store:
        results = []
        for hash_name in ("sha1", "sha256"):
            creds = store.get_credentials(host, username, hash_name)
            assert creds is not None, f"no {hash_name} credentials for {jid}"
            results.append(verify_plain(password, creds, hash_name))
    assert results[0] == results[1]
    return results[0]


# -- check-config -----------------------------------------------------------------------------


def test_check_config_accepts_a_valid_file_and_says_ok(config: Path) -> None:
    assert _ok(_cli("check-config", "--config", str(config))) == [f"{config}: ok"]


def test_config_option_may_come_before_the_command(config: Path) -> None:
    assert _ok(_cli("--config", str(config), "check-config")) == [f"{config}: ok"]


@pytest.mark.parametrize(
    ("replace", "by", "key_and_reason"),
    [
        ("port: 0", "port: 70000", "listen.c2s[0].port: must be between 0 and 65535, got 70000"),
        ("hosts:", "hostz:", "general.hostz: unknown key"),
        ("tls: none", "tls: direct", "tls.certfile: is required by a TLS listener"),
        ("tls: none", "tls: starttls", "tls.certfile: is required by a TLS listener"),
        ("[localhost, example.org]", "[]", "general.hosts: must name at least one domain"),
    ],
)
def test_check_config_refuses_a_bad_file_with_one_line_naming_file_and_key(
    config: Path, replace: str, by: str, key_and_reason: str
) -> None:
    config.write_text(CONFIG.replace(replace, by, 1), encoding="utf-8")
    line = _fails(_cli("check-config", "--config", str(config)), code=2)
    assert line.startswith(f"config error: {config}: {key_and_reason}")


def test_check_config_refuses_invalid_yaml_with_its_line_number(config: Path) -> None:
    config.write_text(CONFIG + "logging: level: debug\n", encoding="utf-8")
    line = _fails(_cli("check-config", "--config", str(config)), code=2)
    assert line.startswith(f"config error: {config}: line 8: not valid YAML: ")


def test_check_config_refuses_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    line = _fails(_cli("check-config", "--config", str(missing)), code=2)
    assert line == f"config error: {missing}: cannot read: No such file or directory"


def test_check_config_loads_the_certificate_not_just_checks_it_exists(
    config: Path, tmp_path: Path
) -> None:
    (tmp_path / "empty.pem").touch()
    (tmp_path / "empty.key").touch()
    text = CONFIG.replace("tls: none", "tls: starttls") + "tls:\n  certfile: empty.pem\n"
    config.write_text(text + "  keyfile: empty.key\n", encoding="utf-8")
    line = _fails(_cli("check-config", "--config", str(config)), code=2)
    assert line.startswith(
        f"config error: {config}: tls.certfile: cannot load the certificate/key pair"
    )


@pytest.mark.parametrize("command", [["serve"], ["user", "list"]])
def test_every_command_refuses_a_bad_config_the_same_way(config: Path, command: list[str]) -> None:
    config.write_text(CONFIG.replace("hosts:", "hostz:"), encoding="utf-8")
    line = _fails(_cli(*command, "--config", str(config)), code=2)
    assert line == f"config error: {config}: general.hostz: unknown key"


# -- user add / list / passwd / remove --------------------------------------------------------


def test_user_add_with_password_option_creates_a_working_account(
    config: Path, database: Path
) -> None:
    assert _ok(_user(config, "add", "alice@localhost", "--password", "s3cret pass")) == [
        "created alice@localhost"
    ]
    assert _listed(config) == ["alice@localhost"]
    assert _password_works(database, "alice@localhost", "s3cret pass")
    assert not _password_works(database, "alice@localhost", "s3cret")


def test_user_add_reads_the_password_from_stdin(config: Path, database: Path) -> None:
    assert _ok(_user(config, "add", "bob@example.org", stdin="from stdin \n")) == [
        "created bob@example.org"
    ]
    # The line ending is not part of the password; other whitespace is.
    assert _password_works(database, "bob@example.org", "from stdin ")
    assert not _password_works(database, "bob@example.org", "from stdin \n")


def test_user_add_normalises_the_jid(config: Path) -> None:
    assert _ok(_user(config, "add", "Carol@LOCALHOST", "--password", "pw")) == [
        "created carol@localhost"
    ]
    assert _listed(config) == ["carol@localhost"]


def test_user_add_refuses_an_empty_password_from_stdin(config: Path) -> None:
    line = _fails(_user(config, "add", "alice@localhost", stdin=""))
    assert line == "error: the password must not be empty"
    assert _listed(config) == []


def test_adding_an_existing_user_fails_and_keeps_the_old_password(
    config: Path, database: Path
) -> None:
    _ok(_user(config, "add", "alice@localhost", "--password", "first"))
    line = _fails(_user(config, "add", "alice@localhost", "--password", "second"))
    assert line == "error: account alice@localhost exists"
    assert _password_works(database, "alice@localhost", "first")
    assert not _password_works(database, "alice@localhost", "second")


def test_user_list_is_sorted_and_filters_by_host(config: Path) -> None:
    for jid in ("zoe@localhost", "bob@example.org", "alice@localhost"):
        _ok(_user(config, "add", jid, "--password", "pw"))
    assert _listed(config) == ["bob@example.org", "alice@localhost", "zoe@localhost"]
    assert _listed(config, "localhost") == ["alice@localhost", "zoe@localhost"]
    assert _listed(config, "example.org") == ["bob@example.org"]


def test_user_passwd_replaces_the_password(config: Path, database: Path) -> None:
    _ok(_user(config, "add", "alice@localhost", "--password", "old"))
    assert _ok(_user(config, "passwd", "alice@localhost", "--password", "new")) == [
        "password set for alice@localhost"
    ]
    assert _ok(_user(config, "passwd", "alice@localhost", stdin="newer\n")) == [
        "password set for alice@localhost"
    ]
    assert _password_works(database, "alice@localhost", "newer")
    assert not _password_works(database, "alice@localhost", "new")
    assert not _password_works(database, "alice@localhost", "old")


def test_user_passwd_of_a_missing_user_fails_clearly(config: Path) -> None:
    line = _fails(_user(config, "passwd", "nobody@localhost", "--password", "pw"))
    assert line == "error: no account nobody@localhost"
    assert _listed(config) == []


def test_user_remove_deletes_the_account_and_its_roster(config: Path, database: Path) -> None:
    _ok(_user(config, "add", "alice@localhost", "--password", "pw"))
    _ok(_user(config, "add", "bob@localhost", "--password", "pw"))
    roster = SqliteRosterStore(database)
    roster.upsert("localhost", "alice", RosterItem("bob@localhost", "Bob"))
    roster.upsert("localhost", "bob", RosterItem("alice@localhost", "Alice"))

    assert _ok(_user(config, "remove", "alice@localhost")) == ["removed alice@localhost"]

    assert _listed(config) == ["bob@localhost"]
    assert roster.items("localhost", "alice") == []
    assert [item.contact for item in roster.items("localhost", "bob")] == ["alice@localhost"]
    with SqliteAccountStore(database) as store:
        assert store.get_credentials("localhost", "alice", "sha256") is None


def test_removing_a_missing_user_fails_clearly(config: Path) -> None:
    line = _fails(_user(config, "remove", "nobody@localhost"))
    assert line == "error: no account nobody@localhost"


@pytest.mark.parametrize(
    "args",
    [
        ["add", "alice@example.com", "--password", "pw"],
        ["passwd", "alice@example.com", "--password", "pw"],
        ["remove", "alice@example.com"],
    ],
)
def test_jid_of_an_unserved_domain_is_refused_naming_general_hosts(
    config: Path, args: list[str]
) -> None:
    line = _fails(_user(config, *args))
    assert line == (
        f"error: example.com is not served (general.hosts in {config}: localhost, example.org)"
    )
    assert _listed(config) == []


@pytest.mark.parametrize(
    ("jid", "reason"),
    [
        ("localhost", "must be a bare JID like user@localhost"),
        ("alice@localhost/phone", "must be a bare JID like user@localhost"),
        ("al ice@localhost", "is not a valid JID"),
    ],
)
def test_jid_that_is_not_a_bare_account_jid_is_refused(config: Path, jid: str, reason: str) -> None:
    line = _fails(_user(config, "add", jid, "--password", "pw"))
    assert line.startswith(f"error: {jid!r} {reason}")


def test_password_with_a_control_character_is_refused_without_a_traceback(config: Path) -> None:
    line = _fails(_user(config, "add", "alice@localhost", "--password", "a\x07b"))
    assert line.startswith("error: invalid password")
    assert "a\x07b" not in line
    bad_import = _user(config, "import", "-", stdin="alice@localhost a\x07b\n")
    assert _fails(bad_import).startswith("error: invalid password")


# -- user import ------------------------------------------------------------------------------


IMPORT_LINES = """\
# accounts for the test
alice@localhost alice-pw

bob@example.org pass with spaces
  carol@localhost carol-pw
alice@localhost alice-pw-2
"""


def test_user_import_from_a_file_creates_and_updates_accounts(
    config: Path, database: Path, tmp_path: Path
) -> None:
    _ok(_user(config, "add", "carol@localhost", "--password", "before"))
    accounts = tmp_path / "accounts.txt"
    accounts.write_text(IMPORT_LINES, encoding="utf-8")

    assert _ok(_user(config, "import", str(accounts))) == ["imported 3 accounts"]

    assert _listed(config) == ["bob@example.org", "alice@localhost", "carol@localhost"]
    assert _password_works(database, "alice@localhost", "alice-pw-2")  # the last line wins
    assert _password_works(database, "bob@example.org", "pass with spaces")
    assert _password_works(database, "carol@localhost", "carol-pw")


def test_user_import_reads_stdin_for_a_dash(config: Path, database: Path) -> None:
    assert _ok(_user(config, "import", "-", stdin=IMPORT_LINES)) == ["imported 3 accounts"]
    assert _listed(config) == ["bob@example.org", "alice@localhost", "carol@localhost"]
    assert _password_works(database, "carol@localhost", "carol-pw")


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ("dave@localhost", "expected 'jid password'"),
        ("dave@localhost ", "expected 'jid password'"),
        ("dave@example.com pw", "example.com is not served (general.hosts in"),
        ("dave pw", "'dave' must be a bare JID"),
    ],
)
def test_import_refuses_a_malformed_line_by_number_and_imports_nothing(
    config: Path, bad_line: str, reason: str
) -> None:
    text = IMPORT_LINES + bad_line + "\nerin@localhost pw\n"
    line = _fails(_user(config, "import", "-", stdin=text))
    assert line.startswith(f"error: line 7: {reason}")
    assert _listed(config) == []


def test_import_of_a_missing_file_fails_with_one_line(config: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    line = _fails(_user(config, "import", str(missing)))
    assert line.startswith("error: ")
    assert str(missing) in line


def test_ten_thousand_accounts_import_through_stdin(config: Path) -> None:
    count = 10_000
    jids = [f"user{i:05d}@localhost" for i in range(count)]
    text = "".join(f"{jid} password-{i}\n" for i, jid in enumerate(jids))

    started = time.perf_counter()
    assert _ok(_user(config, "import", "-", stdin=text)) == [f"imported {count} accounts"]
    elapsed = time.perf_counter() - started
    print(f"imported {count} accounts in {elapsed:.1f} s")

    assert _listed(config) == jids


# -- the console script and secrets -----------------------------------------------------------


def test_console_script_is_installed_and_reports_the_version() -> None:
    script = Path(sys.executable).parent / "xmpp-gateway"
    assert script.is_file()
    result = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert _ok(result) == [f"xmpp-gateway {__version__}"]
    assert _ok(_cli("--version")) == [f"xmpp-gateway {__version__}"]


def test_database_never_contains_a_plaintext_password(
    config: Path, database: Path, tmp_path: Path
) -> None:
    secrets = ["Plaintext-Added-0451", "Plaintext-Stdin-7733", "Plaintext-Passwd-9182"]
    imported = [f"Plaintext-Import-{i:04d}" for i in range(3)]
    _ok(_user(config, "add", "alice@localhost", "--password", secrets[0]))
    _ok(_user(config, "add", "bob@localhost", stdin=secrets[1] + "\n"))
    _ok(_user(config, "passwd", "bob@localhost", "--password", secrets[2]))
    accounts = "".join(f"user{i}@localhost {pw}\n" for i, pw in enumerate(imported))
    _ok(_user(config, "import", "-", stdin=accounts))

    files = sorted(database.parent.glob(database.name + "*"))  # the file and any -wal/-shm
    assert database in files
    content = b"".join(f.read_bytes() for f in files)
    assert b"alice" in content  # the right file: the account is there
    for password in [*secrets, *imported]:
        assert password.encode() not in content, password
        assert password.encode("utf-16-le") not in content, password
