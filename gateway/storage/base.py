"""Storage protocols: what the core needs from a backend, whatever the backend is.

Methods are synchronous. The core calls them through `trio.to_thread.run_sync`, so an
implementation must be safe to call from several worker threads at once, and must not assume
that the same thread calls it twice. "Not found" is `None` (or `False`), never an exception;
a backend that fails raises `StorageError`.
"""

from __future__ import annotations

from typing import Protocol

from gateway.xmpp.sasl import HashName, ScramCredentials


class CredentialStore(Protocol):
    """Accounts' SCRAM credentials, looked up at login.

    Usernames are JID localparts, already normalised by the caller; hosts are domainparts.
    """

    def get_credentials(
        self, host: str, username: str, hash_name: HashName
    ) -> ScramCredentials | None:
        """The stored SCRAM credentials for one hash, or None when there is no such account.

        Raises:
            StorageError: the backend failed.
        """
        ...

    def user_exists(self, host: str, username: str) -> bool:
        """Whether the account exists.

        Raises:
            StorageError: the backend failed.
        """
        ...
