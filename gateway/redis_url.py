"""The check of `cluster.redis` (gateway.config): a Redis URL the client can use, with
errors that never quote the value (it may hold a password)."""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from typing import Final

from gateway.yaml_reader import Reader

REDIS_SCHEMES: Final = ("redis", "rediss", "unix")
_REDIS_HOST: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")
_REDIS_DB: Final = re.compile(r"[0-9]{1,9}")
_REDIS_URL_FORMS: Final = (
    "redis://[:password@]host[:port][/db], rediss://... or unix://[:password@]/path"
)


def check_redis_url(r: Reader, name: str) -> str | None:
    """The Redis URL at `name`, checked for what the Redis client needs.

    No message quotes any part of the value: it may hold a password, and a password with an
    unescaped `/`, `?` or `#` lands in whatever part of the URL follows it.
    """
    value = r.raw(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise r.error(name, f"must be a Redis URL ({_REDIS_URL_FORMS}), got {_type_of(value)}")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise r.error(name, "must not contain spaces or control characters")
    scheme, sep, _ = value.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in REDIS_SCHEMES:
        raise r.error(name, f"must start with redis://, rediss:// or unix:// ({_REDIS_URL_FORMS})")
    try:
        url = urllib.parse.urlsplit(value)
    except ValueError as exc:  # unbalanced [ ]
        raise r.error(name, f"is not a valid URL ({_REDIS_URL_FORMS})") from exc
    hostport = url.netloc.rpartition("@")[2]
    if url.fragment or (url.query and scheme != "unix"):
        raise r.error(
            name,
            "must not have a ?query or #fragment (the db number goes in the path: "
            "redis://host:6379/0; a password cannot hold / ? or #)",
        )
    if scheme == "unix":
        if hostport:
            raise r.error(name, "unix:// takes no host or port, only a path: unix:///path/to.sock")
        if not url.path.startswith("/") or url.path.endswith("/"):
            raise r.error(name, "must name the socket file by its absolute path: unix:///path")
        db = url.query.removeprefix("db=")
        if url.query and (db == url.query or not _REDIS_DB.fullmatch(db)):
            raise r.error(name, "may only have ?db=N after the socket path (N a number)")
        return value
    if hostport.startswith("["):  # an IPv6 address: [::1]:6379
        host, bracket, rest = hostport.partition("]")
        host += bracket
        colon, port = rest[:1], rest[1:]
        if rest and colon != ":":
            raise r.error(name, "has an invalid host")
    else:
        host, colon, port = hostport.partition(":")
    if not host:
        raise r.error(
            name, "has no host (redis://[:password@]host[:port][/db]; a password cannot hold / ? #)"
        )
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError as exc:
            raise r.error(name, "has an invalid IPv6 address between [ ]") from exc
    elif not _REDIS_HOST.fullmatch(host):
        raise r.error(name, "has an invalid host name")
    if colon and not (re.fullmatch(r"[0-9]{1,5}", port) and 1 <= int(port) <= 65535):
        raise r.error(name, "has an invalid port (must be between 1 and 65535)")
    if url.path not in ("", "/") and not _REDIS_DB.fullmatch(url.path[1:]):
        raise r.error(name, "may only have a db number as its path (redis://host:6379/0)")
    return value


def _type_of(value: object) -> str:
    """The YAML type of `value`, never its text (see `check_redis_url`)."""
    return "an empty string" if value == "" else type(value).__name__
