"""The accounts tests log in with, and their passwords.

`PASSWORD` is every account's password on the in-process gateways of `tests/conftest.py`
(`USERS`@localhost) and on the subprocess gateways behind HAProxy and nginx
(`test_reverse_proxies.py`). `LIVE_PASSWORD`, with a non-ASCII letter, is the password of
the subprocess gateways that real client libraries (slixmpp, @xmpp/client) log in to, so
that SASLprep and the CLI's password handling see more than ASCII.
"""

from __future__ import annotations

from typing import Final

PASSWORD: Final = "correct horse battery staple"
USERS: Final = ("alice", "bob", "carol")
LIVE_PASSWORD: Final = "s3cret-Ü-pass"
