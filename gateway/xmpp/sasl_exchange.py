"""The SASL exchanges of one c2s stream (RFC 6120 section 6), sans-I/O.

Theory of operation
-------------------
`C2SNegotiation` (gateway.xmpp.negotiation) owns one `SaslExchange` and hands it the
`<auth/>`, `<response/>` and `<abort/>` elements the client sends before it is
authenticated, and the shell's answers to the lookups it asked for. Each call returns one
`SaslStep` for the negotiation to carry out; this module never writes to the stream:

* `SaslReply`            send the `<challenge/>`; the exchange goes on
* `LookupCredentials`    SCRAM: the shell looks the stored keys up -> `provide_credentials`
* `CheckPassword`        PLAIN: the shell checks the password -> `password_checked`
* `SaslSucceeded`        send `<success/>`; the stream restarts, authenticated
* `SaslFailed`           send `<failure/>`; the client may try again, unless `is_fatal`

At most one exchange runs at a time. Between exchanges the machine is idle; `<auth/>`
starts one with a mechanism from those offered (SCRAM-SHA-256, SCRAM-SHA-1, and PLAIN only
on a confidential stream or where the listener allows it) and a username that must be a
valid JID localpart of the stream's host. While the shell works on a lookup the exchange
waits: only `<abort/>` is taken then, anything else is a stream error. The exchange ends
with `SaslSucceeded` or `SaslFailed`, which drop all of its data (the SCRAM machine, the
username). The SCRAM and PLAIN steps themselves are `gateway.xmpp.sasl`.

Every failure but `<abort/>` and a refused mechanism counts as a failed attempt; the attempt
that reaches `max_failures` is fatal, and the negotiation ends the stream with
`policy-violation` after the `<failure/>` (RFC 6120 section 6.4.5). `failed_username` names
the account of the last failed exchange, if it got that far, for the shell's lockout.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from gateway.errors import (
    AuthFailure,
    JIDError,
    LocalProtocolError,
    RemoteProtocolError,
    SaslCondition,
    StreamErrorCondition,
)
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID
from gateway.xmpp.sasl import HashName, ScramCredentials, ScramServer, parse_plain
from gateway.xmpp.stanza import sasl_failure

SCRAM_MECHANISMS: Final[dict[str, HashName]] = {
    "SCRAM-SHA-256": "sha256",
    "SCRAM-SHA-1": "sha1",
}
PLAIN: Final = "PLAIN"
#: Longest base64 SASL payload taken: a PLAIN message with the longest JIDs and password,
#: SCRAM messages are far shorter. Longer is `malformed-request`, before any work on it.
MAX_SASL_TEXT: Final = 12288


def offered_mechanisms(*, allow_plain: bool) -> list[str]:
    """The mechanisms to offer, best first; PLAIN only when `allow_plain`."""
    mechanisms = list(SCRAM_MECHANISMS)
    if allow_plain:
        mechanisms.append(PLAIN)
    return mechanisms


@dataclass(frozen=True, slots=True)
class SaslReply:
    """Send `element` (a `<challenge/>`); the exchange goes on."""

    element: Element


@dataclass(frozen=True, slots=True)
class LookupCredentials:
    """SCRAM: fetch the account's stored credentials, then call `provide_credentials`."""

    host: str
    username: str
    hash_name: HashName


@dataclass(frozen=True, slots=True)
class CheckPassword:
    """PLAIN: check `password` against the account's stored credentials, at the same cost
    whether the account exists or not and off the event loop (PBKDF2), then call
    `password_checked`."""

    host: str
    username: str
    password: str = field(repr=False)  # never in logs (STYLE G4)


@dataclass(frozen=True, slots=True)
class SaslSucceeded:
    """Send `element` (`<success/>`): `username` authenticated with `mechanism`."""

    element: Element
    username: str
    mechanism: str


@dataclass(frozen=True, slots=True)
class SaslFailed:
    """Send `element` (`<failure/>`); when `is_fatal`, then end the stream."""

    element: Element
    is_fatal: bool


SaslStep = SaslReply | LookupCredentials | CheckPassword | SaslSucceeded | SaslFailed


class SaslExchange:
    """The SASL exchanges of one stream (see the module docstring).

    Args:
        max_failures: failed attempts after which the stream ends.
    """

    def __init__(self, max_failures: int) -> None:
        self._max_failures = max_failures
        #: Failed attempts so far.
        self.failures = 0
        #: The username of the last failed exchange, if it named one.
        self.failed_username: str | None = None
        # The running exchange, if any (None: idle).
        self._mechanism: str | None = None
        self._host = ""
        self._scram: ScramServer | None = None
        self._username: str | None = None
        self._waiting = False

    def receive(
        self, el: Element, host: str, offered: Sequence[str], *, tls_first: bool
    ) -> SaslStep:
        """Handle an element in the SASL namespace from a client not yet authenticated.

        Args:
            el: the element.
            host: the stream's host (usernames are localparts of it).
            offered: the mechanisms offered on this stream.
            tls_first: STARTTLS must come before SASL on this stream.

        Raises:
            RemoteProtocolError: SASL data while the shell checks credentials.
        """
        if el.name == "abort":
            return self._fail(SaslCondition.ABORTED, count=False)
        if self._waiting:
            raise RemoteProtocolError(
                StreamErrorCondition.POLICY_VIOLATION, "SASL data while credentials are checked"
            )
        if el.name == "auth":
            if self._mechanism is not None:
                return self._fail(SaslCondition.MALFORMED_REQUEST, "an exchange is running")
            return self._on_auth(el, host, offered, tls_first=tls_first)
        if el.name == "response":
            if self._mechanism is None:
                return self._fail(SaslCondition.MALFORMED_REQUEST, "no exchange is running")
            return self._on_response(el)
        return self._fail(SaslCondition.MALFORMED_REQUEST, f"unexpected <{el.name}/>")

    def provide_credentials(self, creds: ScramCredentials | None) -> SaslStep:
        """Continue a SCRAM exchange with the stored credentials (None: no such account)."""
        if not self._waiting or self._scram is None:
            raise LocalProtocolError("provide_credentials without a LookupCredentials")
        self._waiting = False
        # An unknown user gets a plausible challenge and fails at the last step, so the
        # answer does not reveal which accounts exist.
        challenge = self._scram.server_first(creds)
        return SaslReply(
            Element(ns.SASL, "challenge", None, [base64.b64encode(challenge).decode()])
        )

    def password_checked(self, is_valid: bool) -> SaslStep:
        """Finish a PLAIN exchange with the shell's verdict."""
        if not self._waiting or self._mechanism != PLAIN:
            raise LocalProtocolError("password_checked without a CheckPassword")
        self._waiting = False
        if not is_valid:
            return self._fail(SaslCondition.NOT_AUTHORIZED)
        return self._succeed(None)

    @property
    def username(self) -> str | None:
        """The username of the exchange in progress, once known."""
        return self._username if self._mechanism is not None else None

    def refuse(self, text: str) -> SaslStep:
        """Fail the exchange in progress with `temporary-auth-failure`, checking
        nothing; it counts as a failed attempt."""
        if not self._waiting and self._mechanism is None:
            raise LocalProtocolError("refuse_credentials without a pending exchange")
        self._waiting = False
        return self._fail(SaslCondition.TEMPORARY_AUTH_FAILURE, text)

    def _on_auth(
        self, el: Element, host: str, offered: Sequence[str], *, tls_first: bool
    ) -> SaslStep:
        mechanism = el.get("mechanism") or ""
        if tls_first:
            return self._fail(
                SaslCondition.ENCRYPTION_REQUIRED, "negotiate STARTTLS first", count=False
            )
        if mechanism not in offered:
            if mechanism == PLAIN:
                return self._fail(SaslCondition.ENCRYPTION_REQUIRED, "PLAIN needs TLS", count=False)
            return self._fail(SaslCondition.INVALID_MECHANISM, count=False)
        self._mechanism = mechanism
        self._host = host
        data = _decode_payload(el.text)
        if isinstance(data, AuthFailure):
            return self._fail(data.condition, data.text)
        if data is None:
            # No initial response: ask for it with an empty challenge (RFC 6120 6.4.2).
            return SaslReply(Element(ns.SASL, "challenge"))
        return self._step(data)

    def _on_response(self, el: Element) -> SaslStep:
        data = _decode_payload(el.text)
        if isinstance(data, AuthFailure):
            return self._fail(data.condition, data.text)
        return self._step(data or b"")

    def _step(self, data: bytes) -> SaslStep:
        try:
            if self._mechanism == PLAIN:
                authzid, authcid, password = parse_plain(data)
                username = self._normalise_username(authcid)
                self._check_authzid(authzid, username)
                self._username = username
                self._waiting = True
                return CheckPassword(self._host, username, password)
            if self._scram is None:
                assert self._mechanism is not None
                hash_name = SCRAM_MECHANISMS[self._mechanism]
                self._scram = ScramServer(hash_name)
                username = self._normalise_username(self._scram.client_first(data))
                self._check_authzid(self._scram.authzid, username)
                self._username = username
                self._waiting = True
                return LookupCredentials(self._host, username, hash_name)
            server_final = self._scram.client_final(data)
        except AuthFailure as failure:
            return self._fail(failure.condition, failure.text)
        return self._succeed(server_final)

    def _normalise_username(self, raw: str) -> str:
        try:
            local = JID.make(raw, self._host).local
        except JIDError as exc:
            raise AuthFailure(SaslCondition.NOT_AUTHORIZED, "no such account") from exc
        assert local is not None
        return local

    def _check_authzid(self, authzid: str | None, username: str) -> None:
        if not authzid:
            return
        try:
            wanted = JID.parse(authzid)
        except JIDError as exc:
            raise AuthFailure(SaslCondition.INVALID_AUTHZID) from exc
        if wanted != JID.make(username, self._host):
            raise AuthFailure(SaslCondition.INVALID_AUTHZID, "cannot act as another user")

    def _succeed(self, additional: bytes | None) -> SaslStep:
        assert self._mechanism is not None and self._username is not None
        text = [base64.b64encode(additional).decode()] if additional else []
        success = Element(ns.SASL, "success", None, text)
        step = SaslSucceeded(success, self._username, self._mechanism)
        self._reset()
        return step

    def _fail(
        self, condition: SaslCondition, text: str | None = None, *, count: bool = True
    ) -> SaslStep:
        self.failed_username = self._username
        self._reset()
        if count:
            self.failures += 1
        is_fatal = count and self.failures >= self._max_failures
        return SaslFailed(sasl_failure(condition, text), is_fatal)

    def _reset(self) -> None:
        self._mechanism = None
        self._scram = None
        self._username = None
        self._waiting = False


def _decode_payload(text: str) -> bytes | AuthFailure | None:
    """SASL payload text -> bytes; '' is "no data", '=' is an empty response (RFC 6120 6.4.2)."""
    text = text.strip()
    if not text:
        return None
    if len(text) > MAX_SASL_TEXT:
        # Refused before any decoding or SASLprep work.
        return AuthFailure(SaslCondition.MALFORMED_REQUEST, "SASL message too long")
    if text == "=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return AuthFailure(SaslCondition.INCORRECT_ENCODING, "not valid base64")
