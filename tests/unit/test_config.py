"""Configuration: the shipped file, every documented key, and one clear refusal per mistake.

Most cases write a document to a real file and go through `load_config`, so the file name in
the message is the one an operator would see. JSON is used to write those documents: it is
YAML, and the stdlib can produce it.
"""

from __future__ import annotations

import ipaddress
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from gateway.config import (
    AuthConfig,
    ClusterConfig,
    GatewayConfig,
    GeneralConfig,
    ListenerConfig,
    LockoutConfig,
    LogFormat,
    LoggingConfig,
    StreamManagementConfig,
    TlsMode,
    WebSocketListenerConfig,
    load_config,
    parse_config,
)
from gateway.errors import ConfigError

SHIPPED = Path(__file__).resolve().parents[2] / "config.yaml"
FILE_NAME = "gw-under-test.yaml"
PLAIN_LISTENER: dict[str, Any] = {"c2s": [{"ip": "127.0.0.1", "port": 5222, "tls": "none"}]}
REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_SM: dict[str, Any] = {"mod_stream_management": {"backend": "redis"}}
#: In the Redis URLs of the refusal cases; no message may quote it, nor any piece of it.
PASSWORD = "Sup3rSecret"


def _write(tmp_path: Path, data: object, name: str = FILE_NAME) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _doc(**sections: Any) -> dict[str, Any]:
    """A valid document (one plain-TCP listener, so no certificate) with sections replaced."""
    data: dict[str, Any] = {"listen": PLAIN_LISTENER}
    data.update(sections)
    return data


def _load(tmp_path: Path, **sections: Any) -> GatewayConfig:
    return load_config(_write(tmp_path, _doc(**sections)))


def _refusal(tmp_path: Path, data: object, key: str) -> ConfigError:
    """Load `data` from a file, expect a ConfigError naming `key` and the file."""
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    exc = info.value
    assert exc.key == key, str(exc)
    assert exc.path == str(path)
    assert FILE_NAME in str(exc)
    assert str(exc) == f"{path}: {key}: {exc.message}"
    return exc


def _certs(directory: Path) -> tuple[Path, Path]:
    """Empty certificate files: the loader only checks that they exist."""
    (directory / "certs").mkdir(parents=True, exist_ok=True)
    certfile, keyfile = directory / "certs" / "localhost.pem", directory / "certs" / "localhost.key"
    certfile.touch()
    keyfile.touch()
    return certfile, keyfile


# -- the shipped file and the defaults --------------------------------------------------------


def test_shipped_config_loads_with_the_documented_values(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    shutil.copy(SHIPPED, path)
    certfile, keyfile = _certs(tmp_path)

    cfg = load_config(path)

    assert cfg.path == path
    assert cfg.general == GeneralConfig()
    assert cfg.general.hosts == ("localhost",)
    assert cfg.c2s == (ListenerConfig("127.0.0.1", 5222, TlsMode.STARTTLS, False),)
    assert cfg.websocket == (
        WebSocketListenerConfig("127.0.0.1", 5280, "/xmpp-websocket", TlsMode.NONE, 30.0),
    )
    assert cfg.trusted_proxies == (ipaddress.ip_network("127.0.0.1/32"),)
    assert cfg.tls.certfile == certfile
    assert cfg.tls.keyfile == keyfile
    assert cfg.auth == AuthConfig(database=tmp_path / "data" / "gateway.sqlite")
    assert cfg.modules.mod_stream_management == StreamManagementConfig()
    assert cfg.modules.mod_offline.max_per_user == 1000
    assert cfg.logging == LoggingConfig("info", LogFormat.AUTO)
    assert cfg.cluster == ClusterConfig()  # a single node, embedded state
    assert cfg.serves("localhost")
    assert not cfg.serves("example.org")


def test_shipped_config_without_its_certificate_names_tls_certfile(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    shutil.copy(SHIPPED, path)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "tls.certfile"
    assert "make_cert.py" in info.value.message


def test_omitted_keys_take_the_documented_defaults(tmp_path: Path) -> None:
    cfg = _load(tmp_path)

    g = cfg.general
    assert g.hosts == ("localhost",)
    assert g.max_stanza_size == 262144
    assert g.max_depth == 32
    assert g.negotiation_timeout == 30.0
    assert g.max_auth_failures == 3
    assert g.send_queue_size == 1000
    assert g.shutdown_grace == 5.0
    assert g.workers == 1
    assert cfg.trusted_proxies == ()
    assert cfg.tls.certfile is None
    assert cfg.tls.keyfile is None
    assert cfg.auth.database == tmp_path / "data" / "gateway.sqlite"
    assert cfg.auth.scram_iterations == 4096
    sm = cfg.modules.mod_stream_management
    assert sm.backend == "memory"
    assert sm.buffer is True
    assert sm.buffer_max == 100
    assert sm.ack is True
    assert sm.ack_freq == 1
    assert sm.resume_timeout == 600.0
    assert sm.stale_h.enabled is False
    assert sm.stale_h.repeat_after == 1800.0
    assert sm.stale_h.geriatric == 3600.0
    assert cfg.modules.mod_offline.max_per_user == 1000
    assert cfg.logging.level == "info"
    assert cfg.logging.format is LogFormat.AUTO
    assert cfg.cluster.redis is None
    assert cfg.cluster.node is None
    assert cfg.cluster.heartbeat == 5.0


def test_default_listener_is_starttls_on_all_interfaces_port_5222(tmp_path: Path) -> None:
    certfile, keyfile = _certs(tmp_path)
    data = {"tls": {"certfile": str(certfile), "keyfile": str(keyfile)}}
    cfg = load_config(_write(tmp_path, data))
    assert cfg.c2s == (ListenerConfig("0.0.0.0", 5222, TlsMode.STARTTLS, False),)  # noqa: S104


def test_empty_sections_mean_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, _doc(general=None, auth={}, modules={}, logging=None)))
    assert cfg.general == GeneralConfig()
    assert cfg.modules.mod_stream_management == StreamManagementConfig()


def test_empty_file_means_defaults_so_the_default_tls_listener_wants_a_certificate(
    tmp_path: Path,
) -> None:
    path = tmp_path / FILE_NAME
    path.write_text("# nothing but a comment\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "tls.certfile"
    assert "is required by a TLS listener" in str(info.value)


# -- every documented key has its effect ------------------------------------------------------


GENERAL_VALUES = [
    ("max_stanza_size", 1024, 1024),
    ("max_stanza_size", 64 * 1024 * 1024, 64 * 1024 * 1024),
    ("max_depth", 4, 4),
    ("max_depth", 256, 256),
    ("negotiation_timeout", 2.5, 2.5),
    ("negotiation_timeout", 10, 10.0),
    ("max_auth_failures", 1, 1),
    ("max_auth_failures", 100, 100),
    ("send_queue_size", 10, 10),
    ("send_queue_size", 1_000_000, 1_000_000),
    ("shutdown_grace", 0, 0.0),
    ("shutdown_grace", 600, 600.0),
    ("pre_auth_max_stanza_size", 1024, 1024),
    ("stanza_timeout", 1, 1.0),
    ("stanza_timeout", 3600, 3600.0),
    ("send_queue_bytes", 65536, 65536),
    ("max_connections", 0, 0),
    ("max_connections", 50_000, 50_000),
    ("workers", 1, 1),
]


@pytest.mark.parametrize(("key", "value", "expected"), GENERAL_VALUES)
def test_general_key_sets_its_field(
    tmp_path: Path, key: str, value: object, expected: object
) -> None:
    cfg = _load(tmp_path, general={key: value})
    assert getattr(cfg.general, key) == expected
    assert type(getattr(cfg.general, key)) is type(expected)


def test_hosts_are_normalised_domains_and_define_what_is_served(tmp_path: Path) -> None:
    cfg = _load(tmp_path, general={"hosts": ["Example.ORG", "localhost"]})
    assert cfg.general.hosts == ("example.org", "localhost")
    assert cfg.serves("example.org")
    assert cfg.serves("localhost")
    assert not cfg.serves("Example.ORG")
    assert not cfg.serves("example.com")


def test_c2s_listeners_keep_their_order_and_settings(tmp_path: Path) -> None:
    certfile, keyfile = _certs(tmp_path)
    listen = {
        "c2s": [
            {"ip": "127.0.0.1", "port": 0, "tls": "starttls", "proxy_protocol": False},
            {"ip": "::1", "port": 65535, "tls": "required"},
            {"ip": "0.0.0.0", "port": 5223, "tls": "none"},  # noqa: S104
            {},
        ]
    }
    cfg = _load(tmp_path, listen=listen, tls={"certfile": str(certfile), "keyfile": str(keyfile)})
    assert cfg.c2s == (
        ListenerConfig("127.0.0.1", 0, TlsMode.STARTTLS, False),
        ListenerConfig("::1", 65535, TlsMode.REQUIRED, False),
        ListenerConfig("0.0.0.0", 5223, TlsMode.NONE, False),  # noqa: S104
        ListenerConfig(),
    )


def test_plain_listeners_need_no_certificate(tmp_path: Path) -> None:
    cfg = _load(tmp_path, tls={"certfile": "missing.pem", "keyfile": "missing.key"})
    assert cfg.c2s[0].tls is TlsMode.NONE
    assert cfg.tls.certfile == tmp_path / "missing.pem"


@pytest.mark.parametrize("mode", ["starttls", "required"])
def test_tls_listener_takes_the_certificate_pair(tmp_path: Path, mode: str) -> None:
    certfile, keyfile = _certs(tmp_path)
    cfg = _load(
        tmp_path,
        listen={"c2s": [{"tls": mode}]},
        tls={"certfile": str(certfile), "keyfile": str(keyfile)},
    )
    assert cfg.c2s[0].tls is TlsMode(mode)
    assert (cfg.tls.certfile, cfg.tls.keyfile) == (certfile, keyfile)


def test_trusted_proxies_are_parsed_as_networks(tmp_path: Path) -> None:
    cfg = _load(tmp_path, trusted_proxies=["10.1.2.3/8", "2001:db8::/32", "192.0.2.7"])
    assert cfg.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("192.0.2.7/32"),
    )


def test_auth_keys_set_database_and_iterations(tmp_path: Path) -> None:
    db = tmp_path / "elsewhere" / "accounts.sqlite"
    cfg = _load(tmp_path, auth={"database": str(db), "scram_iterations": 10000})
    assert cfg.auth == AuthConfig(database=db, scram_iterations=10000)


def test_stream_management_keys_set_their_fields(tmp_path: Path) -> None:
    sm_data = {
        "backend": "memory",
        "buffer": False,
        "buffer_max": 5,
        "ack": False,
        "ack_freq": 3,
        "resume_timeout": 30,
        "stale_h": {"enabled": True, "repeat_after": 60, "geriatric": 120.5},
    }
    cfg = _load(tmp_path, modules={"mod_stream_management": sm_data})
    sm = cfg.modules.mod_stream_management
    assert sm.backend == "memory"
    assert sm.buffer is False
    assert sm.buffer_max == 5
    assert sm.ack is False
    assert sm.ack_freq == 3
    assert sm.resume_timeout == 30.0
    assert sm.stale_h.enabled is True
    assert sm.stale_h.repeat_after == 60.0
    assert sm.stale_h.geriatric == 120.5


def test_buffer_max_infinity_means_no_limit(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    path.write_text(
        "listen: {c2s: [{tls: none}]}\n"
        "modules:\n  mod_stream_management:\n    buffer_max: infinity\n",
        encoding="utf-8",
    )
    assert load_config(path).modules.mod_stream_management.buffer_max is None


def test_offline_max_per_user_may_be_zero(tmp_path: Path) -> None:
    cfg = _load(tmp_path, modules={"mod_offline": {"max_per_user": 0}})
    assert cfg.modules.mod_offline.max_per_user == 0


@pytest.mark.parametrize(("given", "expected"), [("DEBUG", "debug"), ("critical", "critical")])
def test_log_level_is_case_insensitive(tmp_path: Path, given: str, expected: str) -> None:
    assert _load(tmp_path, logging={"level": given}).logging.level == expected


@pytest.mark.parametrize("fmt", list(LogFormat))
def test_log_format_is_one_of_auto_json_console(tmp_path: Path, fmt: LogFormat) -> None:
    assert _load(tmp_path, logging={"format": fmt.value}).logging.format is fmt


def test_parse_config_takes_an_already_loaded_document(tmp_path: Path) -> None:
    cfg = parse_config(
        _doc(auth={"database": "a.sqlite"}), file=str(tmp_path / "x.yaml"), base=tmp_path
    )
    assert cfg.path == tmp_path / "x.yaml"
    assert cfg.auth.database == tmp_path / "a.sqlite"


def test_parse_config_resolves_relative_paths_against_cwd_without_a_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(_doc(auth={"database": "a.sqlite"}))
    assert cfg.auth.database == tmp_path / "a.sqlite"


# -- paths ------------------------------------------------------------------------------------


def test_relative_paths_are_resolved_against_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc" / "gateway"
    etc.mkdir(parents=True)
    certfile, keyfile = _certs(etc)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data = {
        "listen": {"c2s": [{"tls": "required"}]},
        "tls": {"certfile": "certs/localhost.pem", "keyfile": "./certs/localhost.key"},
        "auth": {"database": "data/accounts.sqlite"},
    }
    # A relative path to the config file itself, seen from the working directory.
    _write(etc, data)
    cfg = load_config(Path("..") / "etc" / "gateway" / FILE_NAME)
    assert cfg.tls.certfile is not None and cfg.tls.keyfile is not None
    assert cfg.tls.certfile.resolve() == certfile.resolve()
    assert cfg.tls.keyfile.resolve() == keyfile.resolve()
    assert cfg.auth.database.resolve() == (etc / "data" / "accounts.sqlite").resolve()
    assert cfg.auth.database.is_absolute()


def test_absolute_and_home_relative_paths_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    absolute = tmp_path / "abs" / "db.sqlite"
    assert _load(tmp_path, auth={"database": str(absolute)}).auth.database == absolute
    home = _load(tmp_path, auth={"database": "~/db.sqlite"}).auth.database
    assert home == tmp_path / "home" / "db.sqlite"


# -- refusals: unknown keys -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "key"),
    [
        (_doc(hosts=["localhost"]), "hosts"),
        (_doc(general={"hostz": ["localhost"]}), "general.hostz"),
        (_doc(listen={"c2s": [{"prot": 5222, "tls": "none"}]}), "listen.c2s[0].prot"),
        (
            _doc(listen={"c2s": [{"tls": "none"}, {"tls": "none", "ipv6": True}]}),
            "listen.c2s[1].ipv6",
        ),
        (_doc(listen={"c2s": PLAIN_LISTENER["c2s"], "s2s": []}), "listen.s2s"),
        (_doc(tls={"cert": "x.pem"}), "tls.cert"),
        (_doc(auth={"db": "x.sqlite"}), "auth.db"),
        (_doc(modules={"mod_mam": {}}), "modules.mod_mam"),
        (
            _doc(modules={"mod_stream_management": {"bufer": True}}),
            "modules.mod_stream_management.bufer",
        ),
        (
            _doc(modules={"mod_stream_management": {"stale_h": {"geriatrc": 10}}}),
            "modules.mod_stream_management.stale_h.geriatrc",
        ),
        (_doc(modules={"mod_offline": {"max": 1}}), "modules.mod_offline.max"),
        (_doc(logging={"lvl": "info"}), "logging.lvl"),
        (_doc(cluster={"redis_url": REDIS_URL}), "cluster.redis_url"),
        (_doc(cluster={"heartbeats": 5}), "cluster.heartbeats"),
    ],
)
def test_unknown_key_is_refused_by_its_dotted_path(tmp_path: Path, data: object, key: str) -> None:
    exc = _refusal(tmp_path, data, key)
    assert exc.message == "unknown key"


# -- refusals: wrong types --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "key", "reason"),
    [
        (_doc(listen={"c2s": [{"port": "5222", "tls": "none"}]}), "listen.c2s[0].port", "integer"),
        (_doc(listen={"c2s": [{"port": 52.5, "tls": "none"}]}), "listen.c2s[0].port", "integer"),
        (_doc(general={"max_depth": True}), "general.max_depth", "integer"),
        (_doc(auth={"scram_iterations": False}), "auth.scram_iterations", "integer"),
        (_doc(general=["localhost"]), "general", "mapping"),
        (_doc(listen=[{"port": 5222}]), "listen", "mapping"),
        (_doc(tls="certs/localhost.pem"), "tls", "mapping"),
        (_doc(modules={"mod_stream_management": []}), "modules.mod_stream_management", "mapping"),
        (
            _doc(modules={"mod_stream_management": {"stale_h": True}}),
            "modules.mod_stream_management.stale_h",
            "mapping",
        ),
        (_doc(listen={"c2s": {"port": 5222}}), "listen.c2s", "list"),
        (_doc(listen={"c2s": ["127.0.0.1:5222"]}), "listen.c2s[0]", "mapping"),
        (_doc(general={"hosts": "localhost"}), "general.hosts", "list of non-empty strings"),
        (_doc(general={"hosts": ["localhost", 7]}), "general.hosts", "list of non-empty strings"),
        (_doc(general={"negotiation_timeout": "30s"}), "general.negotiation_timeout", "seconds"),
        (_doc(general={"shutdown_grace": True}), "general.shutdown_grace", "seconds"),
        (
            _doc(listen={"c2s": [{"tls": "none", "proxy_protocol": "no"}]}),
            "listen.c2s[0].proxy_protocol",
            "true or false",
        ),
        (
            _doc(modules={"mod_stream_management": {"stale_h": {"enabled": 1}}}),
            "modules.mod_stream_management.stale_h.enabled",
            "true or false",
        ),
        (_doc(listen={"c2s": [{"ip": 127, "tls": "none"}]}), "listen.c2s[0].ip", "string"),
        (_doc(listen={"c2s": [{"ip": "", "tls": "none"}]}), "listen.c2s[0].ip", "string"),
        (_doc(auth={"database": 5}), "auth.database", "file path"),
        (_doc(auth={"database": ""}), "auth.database", "file path"),
        (_doc(trusted_proxies="10.0.0.0/8"), "trusted_proxies", "list"),
        (_doc(logging={"level": 10}), "logging.level", "string"),
        (_doc(general={"workers": "2"}), "general.workers", "integer"),
        (_doc(general={"workers": 1.5}), "general.workers", "integer"),
        (_doc(cluster={"heartbeat": "5s"}), "cluster.heartbeat", "seconds"),
        (_doc(cluster={"heartbeat": True}), "cluster.heartbeat", "seconds"),
        (_doc(cluster=REDIS_URL), "cluster", "mapping"),
    ],
)
def test_wrong_type_is_refused_naming_the_key(
    tmp_path: Path, data: object, key: str, reason: str
) -> None:
    exc = _refusal(tmp_path, data, key)
    assert reason in exc.message


def test_wrong_type_message_shows_what_was_given(tmp_path: Path) -> None:
    exc = _refusal(
        tmp_path, _doc(listen={"c2s": [{"port": "5222", "tls": "none"}]}), "listen.c2s[0].port"
    )
    assert exc.message == "must be an integer, got str '5222'"


def test_document_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, ["general", "listen"])
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == ""
    assert str(info.value).startswith(f"{path}: must be a mapping")


# -- refusals: out-of-range values ------------------------------------------------------------


def test_port_out_of_range_names_the_key(tmp_path: Path) -> None:
    path = _write(tmp_path, _doc(listen={"c2s": [{"port": 70000, "tls": "none"}]}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    # The README quotes this line.
    assert str(info.value) == f"{path}: listen.c2s[0].port: must be between 0 and 65535, got 70000"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        (_doc(listen={"c2s": [{"port": -1, "tls": "none"}]}), "listen.c2s[0].port"),
        (_doc(listen={"c2s": [{"port": 65536, "tls": "none"}]}), "listen.c2s[0].port"),
        (_doc(general={"max_stanza_size": 1023}), "general.max_stanza_size"),
        (_doc(general={"max_depth": 3}), "general.max_depth"),
        (_doc(general={"max_depth": 257}), "general.max_depth"),
        (_doc(general={"negotiation_timeout": 0.5}), "general.negotiation_timeout"),
        (_doc(general={"negotiation_timeout": 3601}), "general.negotiation_timeout"),
        (_doc(general={"max_auth_failures": 0}), "general.max_auth_failures"),
        (_doc(general={"send_queue_size": 9}), "general.send_queue_size"),
        (_doc(general={"shutdown_grace": -1}), "general.shutdown_grace"),
        (_doc(auth={"scram_iterations": 4095}), "auth.scram_iterations"),
        (
            _doc(modules={"mod_stream_management": {"resume_timeout": -1}}),
            "modules.mod_stream_management.resume_timeout",
        ),
        (
            _doc(modules={"mod_stream_management": {"resume_timeout": 0}}),
            "modules.mod_stream_management.resume_timeout",
        ),
        (
            _doc(modules={"mod_stream_management": {"ack_freq": 0}}),
            "modules.mod_stream_management.ack_freq",
        ),
        (
            _doc(modules={"mod_stream_management": {"buffer_max": 0}}),
            "modules.mod_stream_management.buffer_max",
        ),
        (
            _doc(modules={"mod_stream_management": {"stale_h": {"repeat_after": 0}}}),
            "modules.mod_stream_management.stale_h.repeat_after",
        ),
        (_doc(modules={"mod_offline": {"max_per_user": -1}}), "modules.mod_offline.max_per_user"),
        (_doc(general={"workers": 0}), "general.workers"),
        (_doc(general={"workers": 257}), "general.workers"),
        (_doc(cluster={"heartbeat": 0}), "cluster.heartbeat"),
        (_doc(cluster={"heartbeat": 0.09}), "cluster.heartbeat"),
        (_doc(cluster={"heartbeat": 60.5}), "cluster.heartbeat"),
        (_doc(cluster={"heartbeat": -5}), "cluster.heartbeat"),
    ],
)
def test_out_of_range_value_is_refused_with_its_bounds(
    tmp_path: Path, data: object, key: str
) -> None:
    exc = _refusal(tmp_path, data, key)
    assert exc.message.startswith("must be between ")


def test_negative_resume_timeout_is_refused(tmp_path: Path) -> None:
    data = _doc(modules={"mod_stream_management": {"resume_timeout": -5}})
    exc = _refusal(tmp_path, data, "modules.mod_stream_management.resume_timeout")
    assert exc.message == "must be between 1 and 604800 seconds, got -5"


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_seconds_are_refused(value: float) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_doc(general={"negotiation_timeout": value}), file=FILE_NAME)
    assert info.value.key == "general.negotiation_timeout"
    assert FILE_NAME in str(info.value)


def test_huge_integer_for_seconds_is_refused_not_a_crash(tmp_path: Path) -> None:
    _refusal(
        tmp_path, _doc(general={"negotiation_timeout": 10**400}), "general.negotiation_timeout"
    )


# -- refusals: bad values ---------------------------------------------------------------------


def test_bad_tls_mode_lists_the_allowed_ones(tmp_path: Path) -> None:
    exc = _refusal(tmp_path, _doc(listen={"c2s": [{"tls": "ssl"}]}), "listen.c2s[0].tls")
    assert exc.message == "must be one of starttls, required, direct, none, got 'ssl'"


@pytest.mark.parametrize("ip", ["localhost", "256.0.0.1", "127.0.0.1:5222", "::g"])
def test_bad_ip_is_refused(tmp_path: Path, ip: str) -> None:
    exc = _refusal(tmp_path, _doc(listen={"c2s": [{"ip": ip, "tls": "none"}]}), "listen.c2s[0].ip")
    assert exc.message == f"{ip!r} is not an IP address"


@pytest.mark.parametrize("cidr", ["10.0.0.0/33", "proxy.example", "2001:db8::/129"])
def test_bad_cidr_in_trusted_proxies_is_refused(tmp_path: Path, cidr: str) -> None:
    exc = _refusal(tmp_path, _doc(trusted_proxies=["127.0.0.1/32", cidr]), "trusted_proxies")
    assert exc.message == f"{cidr!r} is not a CIDR network"


def test_tls_listener_without_certfile_names_tls_certfile(tmp_path: Path) -> None:
    exc = _refusal(tmp_path, _doc(listen={"c2s": [{"tls": "starttls"}]}), "tls.certfile")
    assert exc.message == "is required by a TLS listener"


def test_tls_listener_without_keyfile_names_tls_keyfile(tmp_path: Path) -> None:
    certfile, _ = _certs(tmp_path)
    data = _doc(listen={"c2s": [{"tls": "required"}]}, tls={"certfile": str(certfile)})
    exc = _refusal(tmp_path, data, "tls.keyfile")
    assert exc.message == "is required by a TLS listener"


def test_one_tls_listener_among_plain_ones_still_needs_the_certificate(tmp_path: Path) -> None:
    data = _doc(listen={"c2s": [{"tls": "none"}, {"tls": "starttls", "port": 5223}]})
    _refusal(tmp_path, data, "tls.certfile")


def test_certfile_missing_on_disk_is_refused_with_its_resolved_path(tmp_path: Path) -> None:
    _, keyfile = _certs(tmp_path)
    data = _doc(
        listen={"c2s": [{"tls": "starttls"}]},
        tls={"certfile": "certs/nope.pem", "keyfile": str(keyfile)},
    )
    exc = _refusal(tmp_path, data, "tls.certfile")
    assert str(tmp_path / "certs" / "nope.pem") in exc.message
    assert "does not exist" in exc.message
    assert "make_cert.py" in exc.message


def test_keyfile_missing_on_disk_is_refused(tmp_path: Path) -> None:
    certfile, _ = _certs(tmp_path)
    data = _doc(
        listen={"c2s": [{"tls": "required"}]},
        tls={"certfile": str(certfile), "keyfile": "nope.key"},
    )
    exc = _refusal(tmp_path, data, "tls.keyfile")
    assert "does not exist" in exc.message


def test_empty_hosts_is_refused(tmp_path: Path) -> None:
    exc = _refusal(tmp_path, _doc(general={"hosts": []}), "general.hosts")
    assert exc.message == "must name at least one domain"


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("exa mple.org", "is not a valid domain"),
        ("a..b", "is not a valid domain"),
        ("alice@example.org", "is not a bare domain"),
        ("example.org/resource", "is not a bare domain"),
    ],
)
def test_invalid_host_is_refused(tmp_path: Path, host: str, reason: str) -> None:
    exc = _refusal(tmp_path, _doc(general={"hosts": ["localhost", host]}), "general.hosts")
    assert exc.message.startswith(f"{host!r} {reason}")


def test_buffer_max_word_other_than_infinity_is_refused(tmp_path: Path) -> None:
    data = _doc(modules={"mod_stream_management": {"buffer_max": "lots"}})
    exc = _refusal(tmp_path, data, "modules.mod_stream_management.buffer_max")
    assert exc.message == "must be a positive integer or infinity, got 'lots'"


def test_unknown_sm_backend_is_refused(tmp_path: Path) -> None:
    data = _doc(modules={"mod_stream_management": {"backend": "mnesia"}})
    exc = _refusal(tmp_path, data, "modules.mod_stream_management.backend")
    assert "mnesia" in exc.message


def test_bad_log_level_is_refused(tmp_path: Path) -> None:
    exc = _refusal(tmp_path, _doc(logging={"level": "verbose"}), "logging.level")
    assert exc.message == "must be one of debug, info, warning, error, critical, got 'verbose'"


def test_bad_log_format_is_refused(tmp_path: Path) -> None:
    exc = _refusal(tmp_path, _doc(logging={"format": "xml"}), "logging.format")
    assert exc.message == "must be one of auto, json, console, got 'xml'"


def test_no_listener_at_all_is_refused(tmp_path: Path) -> None:
    exc = _refusal(tmp_path, _doc(listen={"c2s": []}), "listen")
    assert exc.message == "no listener configured"


# -- refusals: features that are not there yet -------------------------------------------------


def test_websocket_listener_defaults_and_keys(tmp_path: Path) -> None:
    listen = {"c2s": PLAIN_LISTENER["c2s"], "websocket": [{"port": 5290, "path": "/ws"}]}
    cfg = _load(tmp_path, listen=listen)
    assert cfg.websocket[0].port == 5290
    assert cfg.websocket[0].path == "/ws"
    assert cfg.websocket[0].tls.value == "none"


def test_websocket_listener_refuses_starttls_and_relative_paths(tmp_path: Path) -> None:
    listen = {"c2s": PLAIN_LISTENER["c2s"], "websocket": [{"tls": "starttls"}]}
    exc = _refusal(tmp_path, _doc(listen=listen), "listen.websocket[0].tls")
    assert "wss" in exc.message
    listen = {"c2s": PLAIN_LISTENER["c2s"], "websocket": [{"path": "ws"}]}
    _refusal(tmp_path, _doc(listen=listen), "listen.websocket[0].path")


def test_websocket_listener_unknown_key_is_refused(tmp_path: Path) -> None:
    listen = {"c2s": PLAIN_LISTENER["c2s"], "websocket": [{"port": 5280, "pth": "/ws"}]}
    _refusal(tmp_path, _doc(listen=listen), "listen.websocket[0].pth")


def test_direct_tls_listener_needs_the_certificate(tmp_path: Path) -> None:
    exc = _refusal(tmp_path, _doc(listen={"c2s": [{"tls": "direct"}]}), "tls.certfile")
    assert "required by a TLS listener" in exc.message


def test_proxy_protocol_listener_is_accepted(tmp_path: Path) -> None:
    cfg = _load(tmp_path, listen={"c2s": [{"tls": "none", "proxy_protocol": True}]})
    assert cfg.c2s[0].proxy_protocol is True


# -- refusals: the file itself ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("general:\n  hosts: [localhost]\n max_depth: 3\n", 3),
        ("general:\n  hosts: [localhost\n", 3),
        ("listen: {c2s: [{tls: none}]}\nlogging: level: info\n", 2),
        ("general:\n  hosts: @localhost\n", 2),
    ],
)
def test_invalid_yaml_is_refused_with_a_line_number(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / FILE_NAME
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == ""
    assert str(info.value).startswith(f"{path}: line {line}: not valid YAML: ")


def test_missing_file_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_directory_instead_of_a_file_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    path.mkdir()
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: cannot read: ")


def test_file_that_is_not_utf8_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    path.write_bytes(b"listen: {c2s: [{tls: none}]}\n# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert FILE_NAME in str(info.value)


def test_a_key_given_twice_is_refused_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    path.write_text("general:\n  hosts: [a.example]\n  hosts: [b.example]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "duplicate key 'hosts'" in str(info.value)
    assert "line 3" in str(info.value)


def test_duplicate_hosts_after_normalisation_are_kept_once() -> None:
    cfg = parse_config(_doc(general={"hosts": ["Example.org", "example.org."]}), file=FILE_NAME)
    assert cfg.general.hosts == ("example.org",)


def test_hostile_client_limits_have_safe_defaults(tmp_path: Path) -> None:
    cfg = _load(tmp_path)
    assert cfg.general.pre_auth_max_stanza_size == 8192
    assert cfg.general.stanza_timeout == 60.0
    assert cfg.general.send_queue_bytes == 10 * 1024 * 1024
    assert cfg.modules.mod_stream_management.buffer_max_bytes == 10 * 1024 * 1024
    assert cfg.modules.mod_offline.max_bytes_per_user == 10 * 1024 * 1024
    assert cfg.auth.lockout == LockoutConfig(20, 10, 600.0, 900.0)


def test_pre_auth_limit_follows_a_smaller_max_stanza_size_unless_given(tmp_path: Path) -> None:
    assert _load(tmp_path, general={"max_stanza_size": 4096}).general.pre_auth_max_stanza_size == (
        4096
    )
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, general={"max_stanza_size": 4096, "pre_auth_max_stanza_size": 8192})
    assert info.value.key == "general.pre_auth_max_stanza_size"
    assert "larger than max_stanza_size" in str(info.value)


def test_lockout_and_byte_limits_are_read_and_checked(tmp_path: Path) -> None:
    cfg = _load(
        tmp_path,
        auth={"lockout": {"ip_failures": 0, "account_failures": 3, "window": 60, "duration": 5}},
        modules={
            "mod_offline": {"max_bytes_per_user": 65536},
            "mod_stream_management": {"buffer_max_bytes": 1 << 20},
        },
    )
    assert cfg.auth.lockout == LockoutConfig(0, 3, 60.0, 5.0)
    assert cfg.modules.mod_offline.max_bytes_per_user == 65536
    assert cfg.modules.mod_stream_management.buffer_max_bytes == 1 << 20
    for section, data, key in [
        ("auth", {"lockout": {"window": 0}}, "auth.lockout.window"),
        ("auth", {"lockout": {"tries": 1}}, "auth.lockout.tries"),
        (
            "modules",
            {"mod_offline": {"max_bytes_per_user": 10}},
            "modules.mod_offline.max_bytes_per_user",
        ),
        ("general", {"send_queue_bytes": 1}, "general.send_queue_bytes"),
        ("general", {"stanza_timeout": 0}, "general.stanza_timeout"),
    ]:
        with pytest.raises(ConfigError) as info:
            _load(tmp_path, **{section: data})
        assert info.value.key == key


def test_cluster_node_names_this_node_and_is_checked(tmp_path: Path) -> None:
    assert _load(tmp_path).cluster.node is None  # the host name and pid, at start
    assert _load(tmp_path, cluster={"node": "gw-1.eu"}).cluster.node == "gw-1.eu"
    assert _load(tmp_path, cluster={"node": "x" * 64}).cluster.node == "x" * 64
    for bad in ["", "a b", "x" * 65, "gw:1", "gw/1", "gw1\n", "nœud", 7, ["gw1"]]:
        with pytest.raises(ConfigError) as info:
            _load(tmp_path, cluster={"node": bad})
        assert info.value.key == "cluster.node"
        assert "1 to 64 letters, digits" in info.value.message


# -- the cluster: cluster.*, general.workers, a shared SM backend -----------------------------


def _cluster(tmp_path: Path, redis: object, **cluster: Any) -> GatewayConfig:
    """A cluster node's config: `redis` as `cluster.redis`, SM tables in Redis."""
    return _load(tmp_path, cluster={"redis": redis, **cluster}, modules=REDIS_SM)


def test_shipped_cluster_example_loads_once_uncommented(tmp_path: Path) -> None:
    lines = SHIPPED.read_text(encoding="utf-8").splitlines()
    start = lines.index("# cluster:")
    end = lines.index("", start)
    lines[start:end] = [line.removeprefix("# ") for line in lines[start:end]]
    text = "\n".join(lines).replace("backend: memory ", "backend: redis  ")
    text = text.replace("  workers: 1\n", "  workers: 4\n")
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    _certs(tmp_path)

    cfg = load_config(path)

    assert cfg.cluster == ClusterConfig(redis=REDIS_URL, node="gw1", heartbeat=5.0)
    assert cfg.general.workers == 4
    assert cfg.modules.mod_stream_management.backend == "redis"


@pytest.mark.parametrize(
    "url",
    [
        REDIS_URL,
        "redis://localhost",
        "redis://localhost/",
        "redis://redis_1:6379",  # a compose service name
        "redis://:s3cret@redis.example.org:6380/2",
        "redis://gateway:s3cret@10.0.0.5/15",  # a Redis 6 ACL user
        "redis://:p@ss@redis.example.org/0",  # the last @ ends the password
        "redis://:pässwörd@redis.example.org:6379/0",
        "redis://[::1]:6379/1",
        "redis://[2001:db8::7]",
        "REDIS://Redis.Example.org:65535/0",
        "rediss://:s3cret@redis.example.org:6380/0",
        "rediss://redis.example.org",
        "unix:///run/redis/redis.sock",
        "unix://:s3cret@/run/redis/redis.sock",
        "unix:///run/redis/redis.sock?db=3",
    ],
)
def test_redis_url_is_accepted_and_kept_as_written(tmp_path: Path, url: str) -> None:
    cfg = _cluster(tmp_path, url)
    assert cfg.cluster.redis == url
    assert cfg.modules.mod_stream_management.backend == "redis"
    # Nothing that logs the config (repr) shows the URL: it may hold a password.
    assert url not in repr(cfg)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (f"http://:{PASSWORD}@redis.example.org/0", "must start with redis://, rediss://"),
        (f"redis:/:{PASSWORD}@redis.example.org/0", "must start with redis://, rediss://"),
        (f":{PASSWORD}@redis.example.org:6379", "must start with redis://, rediss://"),
        (PASSWORD, "must start with redis://, rediss://"),
        (f"redis://:{PASSWORD}@", "has no host"),
        (f"redis://:{PASSWORD}@:6379/0", "has no host"),
        ("redis://:Sup3r/Secret@redis.example.org/0", "has no host"),  # an unescaped /
        ("redis://:Sup3r?Secret@redis.example.org/0", "must not have a ?query"),
        ("redis://:Sup3r#Secret@redis.example.org/0", "must not have a ?query or #fragment"),
        (f"redis://:{PASSWORD}@redis.example.org:6379?db=1", "must not have a ?query"),
        (f"redis://:{PASSWORD}@redis.example.org:0/0", "has an invalid port"),
        (f"redis://:{PASSWORD}@redis.example.org:65536/0", "has an invalid port"),
        (f"redis://:{PASSWORD}@redis.example.org:-1/0", "has an invalid port"),
        (f"redis://:{PASSWORD}@redis.example.org:+80/0", "has an invalid port"),
        (f"redis://:{PASSWORD}@redis.example.org:port/0", "has an invalid port"),
        (f"redis://:{PASSWORD}@redis.example.org:/0", "has an invalid port"),
        (f"redis://admin:{PASSWORD}/0", "has an invalid port"),  # the @host forgotten
        (f"redis://:{PASSWORD}@redis.example.org/db0", "db number as its path"),
        (f"redis://:{PASSWORD}@redis.example.org/0/1", "db number as its path"),
        (f"redis://:{PASSWORD}@redis.example.org/-1", "db number as its path"),
        (f"redis://:{PASSWORD}@exa$mple.org/0", "has an invalid host name"),
        (f"redis://:{PASSWORD}@-redis/0", "has an invalid host name"),
        (f"redis://:{PASSWORD}@[::1/0", "is not a valid URL"),
        (f"redis://:{PASSWORD}@[::1]x/0", "has an invalid host"),
        (f"redis://:{PASSWORD}@redis.example.org /0", "must not contain spaces"),
        (f"redis://:{PASSWORD}@redis.example.org\n/0", "must not contain spaces"),
        (f"unix://:{PASSWORD}@localhost/run/redis.sock", "unix:// takes no host or port"),
        (f"unix://:{PASSWORD}@run/redis.sock", "unix:// takes no host or port"),
        (f"unix://:{PASSWORD}@", "absolute path"),
        (f"unix://:{PASSWORD}@/run/redis/", "absolute path"),
        (f"unix://:{PASSWORD}@/run/redis.sock?db=x", "?db=N"),
        (f"unix://:{PASSWORD}@/run/redis.sock?timeout=1", "?db=N"),
        (f"unix://:{PASSWORD}@/run/redis.sock#db", "#fragment"),
    ],
)
def test_bad_redis_url_is_refused_without_quoting_it(tmp_path: Path, url: str, reason: str) -> None:
    data = _doc(cluster={"redis": url}, modules=REDIS_SM)
    exc = _refusal(tmp_path, data, "cluster.redis")
    assert reason in exc.message
    for secret in (PASSWORD, "Sup3r", "Secret"):
        assert secret not in str(exc)


@pytest.mark.parametrize(
    ("value", "given"),
    [
        ("", "an empty string"),
        (6379, "int"),
        ([f"redis://:{PASSWORD}@redis.example.org/0"], "list"),
        ({"url": f"redis://:{PASSWORD}@redis.example.org/0"}, "dict"),
        (True, "bool"),
    ],
)
def test_redis_url_of_the_wrong_type_is_refused_without_quoting_it(
    tmp_path: Path, value: object, given: str
) -> None:
    data = _doc(cluster={"redis": value}, modules=REDIS_SM)
    exc = _refusal(tmp_path, data, "cluster.redis")
    assert exc.message.startswith("must be a Redis URL (redis://")
    assert exc.message.endswith(f"got {given}")
    assert PASSWORD not in str(exc)


@pytest.mark.parametrize(("value", "expected"), [(0.1, 0.1), (2.5, 2.5), (60, 60.0), (5, 5.0)])
def test_heartbeat_sets_seconds_between_heartbeats(
    tmp_path: Path, value: float, expected: float
) -> None:
    cfg = _cluster(tmp_path, REDIS_URL, heartbeat=value)
    assert cfg.cluster.heartbeat == expected
    assert type(cfg.cluster.heartbeat) is float


def test_heartbeat_bounds_are_stated(tmp_path: Path) -> None:
    exc = _refusal(tmp_path, _doc(cluster={"heartbeat": 61}), "cluster.heartbeat")
    assert exc.message == "must be between 0.1 and 60 seconds, got 61"


@pytest.mark.parametrize("workers", [2, 8, 256])
def test_several_workers_run_as_a_cluster(tmp_path: Path, workers: int) -> None:
    cfg = _load(
        tmp_path,
        general={"workers": workers},
        cluster={"redis": REDIS_URL, "node": "gw1", "heartbeat": 1},
        modules=REDIS_SM,
    )
    assert cfg.general.workers == workers
    assert cfg.cluster == ClusterConfig(redis=REDIS_URL, node="gw1", heartbeat=1.0)


def test_workers_bounds_are_stated(tmp_path: Path) -> None:
    exc = _refusal(tmp_path, _doc(general={"workers": 257}), "general.workers")
    assert exc.message == "must be between 1 and 256, got 257"


def test_one_node_may_use_redis_too(tmp_path: Path) -> None:
    """One worker per host, several hosts: each is a node of the same cluster."""
    cfg = _cluster(tmp_path, REDIS_URL, node="gw2")
    assert cfg.general.workers == 1
    assert (cfg.cluster.redis, cfg.cluster.node) == (REDIS_URL, "gw2")


@pytest.mark.parametrize("workers", [2, 256])
def test_several_workers_without_redis_are_refused(tmp_path: Path, workers: int) -> None:
    exc = _refusal(tmp_path, _doc(general={"workers": workers}), "general.workers")
    assert exc.message.startswith(f"{workers} worker processes need cluster.redis")


def test_several_workers_with_redis_sm_but_no_redis_name_workers(tmp_path: Path) -> None:
    data = _doc(general={"workers": 2}, modules=REDIS_SM)
    _refusal(tmp_path, data, "general.workers")


def test_redis_sm_backend_without_redis_is_refused(tmp_path: Path) -> None:
    exc = _refusal(tmp_path, _doc(modules=REDIS_SM), "modules.mod_stream_management.backend")
    assert exc.message.startswith("redis needs cluster.redis")


def test_redis_sm_backend_without_redis_is_refused_in_yaml_too(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    path.write_text(
        "listen: {c2s: [{tls: none}]}\nmodules: {mod_stream_management: {backend: redis}}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "modules.mod_stream_management.backend"
    assert "needs cluster.redis" in str(info.value)
    assert "not available yet" not in str(info.value)


@pytest.mark.parametrize(
    "modules", [{}, {"mod_stream_management": {"backend": "memory"}}], ids=["default", "memory"]
)
def test_redis_with_per_node_sm_tables_is_refused(tmp_path: Path, modules: dict[str, Any]) -> None:
    url = f"redis://:{PASSWORD}@redis.example.org:6379/0"
    data = _doc(cluster={"redis": url}, modules=modules)
    exc = _refusal(tmp_path, data, "modules.mod_stream_management.backend")
    assert exc.message.startswith("must be redis when cluster.redis is set, got memory")
    assert "item-not-found" in exc.message
    assert exc.message.endswith("set modules.mod_stream_management.backend: redis")
    assert PASSWORD not in str(exc)


def test_several_workers_need_fixed_ports(tmp_path: Path) -> None:
    data = _doc(
        general={"workers": 2},
        cluster={"redis": REDIS_URL, "node": "gw1"},
        modules=REDIS_SM,
        listen={"c2s": [{"port": 5222, "tls": "none"}, {"port": 0, "tls": "none"}]},
    )
    exc = _refusal(tmp_path, data, "listen.c2s[1].port")
    assert exc.message.startswith("must be a fixed port with general.workers: 2")
