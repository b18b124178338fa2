"""slixmpp clients for the gateway subprocess (`tests.helpers.live`), set up as the tests
need them: STARTTLS only, the gateway's certificate verified, XEP-0199 pings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import slixmpp

from tests.helpers.accounts import LIVE_PASSWORD

ClientT = TypeVar("ClientT", bound=slixmpp.ClientXMPP)


def verified_starttls(
    client: ClientT, cert: Path | None, plugins: Sequence[str] = ("xep_0199",)
) -> ClientT:
    """`client`, made to log in through STARTTLS only (no plaintext stream, no direct
    TLS), verifying the gateway's certificate `cert` for real, with `plugins` registered
    in this order."""
    client.enable_plaintext = False
    client.enable_direct_tls = False
    client.enable_starttls = True
    client.ca_certs = cert
    for plugin in plugins:
        client.register_plugin(plugin)
    return client


def starttls_client(
    jid: str, cert: Path | None, plugins: Sequence[str] = ("xep_0199",)
) -> slixmpp.ClientXMPP:
    """A slixmpp client for `jid` with LIVE_PASSWORD, set up by `verified_starttls()`."""
    return verified_starttls(slixmpp.ClientXMPP(jid, LIVE_PASSWORD), cert, plugins)
