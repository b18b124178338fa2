"""SASL mechanisms as step machines: SCRAM-SHA-256, SCRAM-SHA-1 and PLAIN.

Pure code: no trio, no I/O, no clock. The caller (`gateway.xmpp.sasl_exchange`) decodes and
encodes the base64 of `<auth/>`, `<response/>`, `<challenge/>` and `<success/>`, has the shell
look credentials up, and checks that the authorization identity (authzid) is one the
authenticated user may act as (RFC 6120 section 6.3.8): these machines get and return the raw
SASL payloads.

SCRAM (RFC 5802, RFC 7677), server side, as a `ScramServer`:

    EXPECT_CLIENT_FIRST --client_first()--> EXPECT_CREDENTIALS
    EXPECT_CREDENTIALS  --server_first()--> EXPECT_CLIENT_FINAL
    EXPECT_CLIENT_FINAL --client_final()--> SUCCEEDED

Any exception moves the machine to the terminal `ERROR`; calling a step out of order raises
`LocalProtocolError`. The server stores only SCRAM keys (StoredKey, ServerKey), so a login costs
a few HMACs and no PBKDF2. For an unknown user, `server_first(None)` answers with a salt derived
from the username and a secret (stable, so asking twice gives the same answer as for a real
user) and the exchange fails only at the final step, so failures do not reveal which users exist
(RFC 5802 section 9, "Security Considerations").

The message syntax (attributes, SASLnames, base64, and the channel-binding flags we accept)
is `gateway.xmpp.scram_messages`; this module holds the keys, the proofs and the steps.

PLAIN (RFC 4616): `parse_plain` splits the message, `verify_plain` checks a password against
the stored SCRAM credentials (it recomputes StoredKey with the stored salt and iteration count:
one PBKDF2 per login, which is why SCRAM is preferred).

Passwords are prepared with the PRECIS OpaqueString profile (RFC 8265 section 4.2, which
replaces SASLprep). Usernames are returned as sent (after SASLname decoding): the caller
enforces them as JID localparts.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Final, Literal

import precis_i18n

from gateway.errors import AuthFailure, LocalProtocolError, SaslCondition
from gateway.xmpp.scram_messages import (
    PRINTABLE,
    ClientFirst,
    b64encode,
    decode_message,
    encode_saslname,
    parse_client_final,
    parse_client_first,
    parse_server_final,
    parse_server_first,
)

HashName = Literal["sha1", "sha256"]

#: Default PBKDF2 iteration count (RFC 7677 section 4 asks for at least 4096).
DEFAULT_ITERATIONS: Final = 4096
#: Salt length for new credentials, in bytes.
SALT_BYTES: Final = 16

_DIGEST_SIZE: Final[dict[str, int]] = {"sha1": 20, "sha256": 32}
_OPAQUE: Final = precis_i18n.get_profile("OpaqueString")
#: Used to derive fake salts for unknown users when the caller gives no secret. Per process:
#: nodes that share one account database should pass a shared `fake_salt_secret`.
_PROCESS_SECRET: Final = secrets.token_bytes(32)
#: The salt `check_plain` hashes with for unknown accounts (the result is discarded).
_FAKE_PLAIN_SALT: Final = secrets.token_bytes(16)
#: Longest password taken, in characters (PRECIS OpaqueString work grows with it).
MAX_PASSWORD_LENGTH: Final = 1024


@dataclass(frozen=True, slots=True)
class ScramCredentials:
    """What the server stores for one user and one hash (RFC 5802 section 3).

    Attributes:
        salt: the PBKDF2 salt.
        iterations: the PBKDF2 iteration count.
        stored_key: H(ClientKey).
        server_key: HMAC(SaltedPassword, "Server Key").
    """

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


class ScramState(enum.Enum):
    """States of a `ScramServer`."""

    #: Waiting for the client-first-message.
    EXPECT_CLIENT_FIRST = enum.auto()
    #: client-first parsed; waiting for the caller to look the credentials up.
    EXPECT_CREDENTIALS = enum.auto()
    #: server-first sent; waiting for the client-final-message.
    EXPECT_CLIENT_FINAL = enum.auto()
    #: The proof was right; the server-final-message was returned. Terminal.
    SUCCEEDED = enum.auto()
    #: A step raised. Terminal.
    ERROR = enum.auto()


def prepare_password(password: str) -> str:
    """Enforce the PRECIS OpaqueString profile on a password.

    Raises:
        ValueError: the password is empty, longer than `MAX_PASSWORD_LENGTH` characters
            (refused before any work: SASLprep is costly per character), or has
            characters OpaqueString disallows.
    """
    if len(password) > MAX_PASSWORD_LENGTH:
        raise ValueError(f"password is longer than {MAX_PASSWORD_LENGTH} characters")
    try:
        return _OPAQUE.enforce(password)
    except UnicodeEncodeError as exc:
        # Not `from exc`: the codec error's message quotes the offending password character,
        # and credentials never reach logs (STYLE G4).
        raise ValueError(f"password is not a valid OpaqueString: {exc.reason}") from None


def derive_scram_credentials(
    password: str,
    hash_name: HashName,
    *,
    salt: bytes | None = None,
    iterations: int = DEFAULT_ITERATIONS,
) -> ScramCredentials:
    """Compute the SCRAM keys to store for a password (one PBKDF2).

    Args:
        password: the password; prepared with OpaqueString first.
        hash_name: "sha1" or "sha256".
        salt: the salt; a random 16-byte salt when None.
        iterations: the PBKDF2 iteration count (at least 1).

    Raises:
        ValueError: the password is not a valid OpaqueString, or iterations < 1.
    """
    if iterations < 1:
        raise ValueError("iterations must be at least 1")
    if salt is None:
        salt = secrets.token_bytes(SALT_BYTES)
    _, stored_key, server_key = _keys(prepare_password(password), salt, iterations, hash_name)
    return ScramCredentials(salt, iterations, stored_key, server_key)


def verify_plain(password: str, creds: ScramCredentials, hash_name: HashName) -> bool:
    """Check a PLAIN password against stored SCRAM credentials (constant-time compare).

    Returns:
        True when the password derives the stored StoredKey; False otherwise, including for
        a password that is not a valid OpaqueString.
    """
    try:
        prepared = prepare_password(password)
    except ValueError:
        return False
    _, stored_key, _ = _keys(prepared, creds.salt, creds.iterations, hash_name)
    return hmac.compare_digest(stored_key, creds.stored_key)


def check_plain(
    password: str, creds: ScramCredentials | None, hash_name: HashName, *, fake_iterations: int
) -> bool:
    """`verify_plain` at the same cost whether the account exists (`creds`) or not, so the
    time of a failure does not tell which accounts exist. Costs PBKDF2: call it off the
    event loop.

    Args:
        fake_iterations: the PBKDF2 iteration count of new accounts (`auth.scram_iterations`).
    """
    if creds is None:
        fake = ScramCredentials(_FAKE_PLAIN_SALT, fake_iterations, b"", b"")
        verify_plain(password, fake, hash_name)
        return False
    return verify_plain(password, creds, hash_name)


def parse_plain(message: bytes) -> tuple[str | None, str, str]:
    """Split a PLAIN message: `[authzid] NUL authcid NUL passwd` (RFC 4616 section 2).

    Returns:
        `(authzid or None, authcid, password)`.

    Raises:
        AuthFailure: MALFORMED_REQUEST when the message is not UTF-8, does not have exactly
            two NULs, or has an empty authcid or password.
    """
    text = decode_message(message)
    parts = text.split("\0")
    if len(parts) != 3:
        raise AuthFailure(SaslCondition.MALFORMED_REQUEST, "PLAIN needs exactly two NULs")
    authzid, authcid, password = parts
    if not authcid or not password:
        raise AuthFailure(SaslCondition.MALFORMED_REQUEST, "empty authcid or password")
    return (authzid or None, authcid, password)


@dataclass(frozen=True, slots=True)
class _ServerFirst:
    """What EXPECT_CLIENT_FINAL knows (EXPECT_CREDENTIALS knows the `ClientFirst`)."""

    client_first: ClientFirst
    message: str
    nonce: str
    creds: ScramCredentials
    is_fake: bool


class ScramServer:
    """The server side of one SCRAM exchange.

    Args:
        hash_name: "sha1" (SCRAM-SHA-1) or "sha256" (SCRAM-SHA-256).
        nonce_factory: makes the server nonce part (printable ASCII, no ","); random when
            None. Tests pass a fixed one.
        fake_salt_secret: key for the fake salts of unknown users; a per-process random key
            when None.
        fake_iterations: iteration count announced for unknown users; should match what real
            accounts use.
    """

    def __init__(
        self,
        hash_name: HashName,
        *,
        nonce_factory: Callable[[], str] | None = None,
        fake_salt_secret: bytes | None = None,
        fake_iterations: int = DEFAULT_ITERATIONS,
    ) -> None:
        self._hash_name: HashName = hash_name
        self._nonce_factory = nonce_factory or _random_nonce
        self._fake_salt_secret = fake_salt_secret or _PROCESS_SECRET
        self._fake_iterations = fake_iterations
        self._state = ScramState.EXPECT_CLIENT_FIRST
        self._exchange: ClientFirst | _ServerFirst | None = None

    @property
    def state(self) -> ScramState:
        """The current state."""
        return self._state

    @property
    def authzid(self) -> str | None:
        """The authorization identity from the gs2 header, once client-first is parsed."""
        match self._exchange:
            case (
                ClientFirst(authzid=authzid)
                | _ServerFirst(client_first=ClientFirst(authzid=authzid))
            ):
                return authzid
            case _:
                return None

    def client_first(self, message: bytes) -> str:
        """Take the client-first-message.

        Returns:
            The username (authcid), SASLname-decoded but not otherwise prepared.

        Raises:
            AuthFailure: MALFORMED_REQUEST on bad syntax or an "m=" extension;
                INVALID_AUTHZID on a badly encoded authzid; NOT_AUTHORIZED when the client
                asks for channel binding ("p=").
            LocalProtocolError: called out of order.
        """
        self._expect(ScramState.EXPECT_CLIENT_FIRST)
        try:
            first = parse_client_first(decode_message(message))
        except BaseException:
            self._state = ScramState.ERROR
            raise
        self._exchange = first
        self._state = ScramState.EXPECT_CREDENTIALS
        return first.username

    def server_first(self, creds: ScramCredentials | None) -> bytes:
        """Make the server-first-message.

        Args:
            creds: the user's stored credentials for this hash, or None when there is no
                such user (the exchange then goes on with fake ones and fails at the end).

        Raises:
            LocalProtocolError: called out of order, the nonce factory made an invalid
                nonce, or the credentials' key sizes do not fit the hash.
        """
        self._expect(ScramState.EXPECT_CREDENTIALS)
        try:
            exchange = self._make_server_first(creds)
        except BaseException:
            self._state = ScramState.ERROR
            raise
        self._exchange = exchange
        self._state = ScramState.EXPECT_CLIENT_FINAL
        return exchange.message.encode("ascii")

    def _make_server_first(self, creds: ScramCredentials | None) -> _ServerFirst:
        first = self._exchange
        if not isinstance(first, ClientFirst):
            raise LocalProtocolError("SCRAM state lost its client-first data")
        is_fake = creds is None
        if creds is None:
            creds = self._fake_credentials(first.username)
        size = _DIGEST_SIZE[self._hash_name]
        if len(creds.stored_key) != size or len(creds.server_key) != size:
            raise LocalProtocolError(f"stored keys do not fit SCRAM-{self._hash_name}")
        server_nonce = self._nonce_factory()
        if not server_nonce or not PRINTABLE.issuperset(server_nonce):
            raise LocalProtocolError("nonce factory made an invalid nonce")
        nonce = first.client_nonce + server_nonce
        message = f"r={nonce},s={b64encode(creds.salt)},i={creds.iterations}"
        return _ServerFirst(first, message, nonce, creds, is_fake)

    def client_final(self, message: bytes) -> bytes:
        """Check the client-final-message and make the server-final-message.

        Returns:
            `v=<ServerSignature>`, for `<success/>`.

        Raises:
            AuthFailure: MALFORMED_REQUEST on bad syntax; NOT_AUTHORIZED when the channel
                binding echo or the nonce do not match, the proof is wrong, or the user does
                not exist.
            LocalProtocolError: called out of order.
        """
        self._expect(ScramState.EXPECT_CLIENT_FINAL)
        try:
            server_final = self._check_client_final(decode_message(message))
        except BaseException:
            self._state = ScramState.ERROR
            raise
        self._state = ScramState.SUCCEEDED
        return server_final

    def _check_client_final(self, text: str) -> bytes:
        exchange = self._exchange
        if not isinstance(exchange, _ServerFirst):
            raise LocalProtocolError("SCRAM state lost its server-first data")
        final = parse_client_final(text)
        if not hmac.compare_digest(final.channel_binding, exchange.client_first.gs2_header):
            raise AuthFailure(SaslCondition.NOT_AUTHORIZED, "channel-bindings-dont-match")
        if not hmac.compare_digest(final.nonce.encode(), exchange.nonce.encode()):
            raise AuthFailure(SaslCondition.NOT_AUTHORIZED, "nonce mismatch")
        creds = exchange.creds
        if len(final.proof) != len(creds.stored_key):
            raise AuthFailure(SaslCondition.NOT_AUTHORIZED, "invalid-proof")
        auth_message = ",".join(
            (exchange.client_first.bare, exchange.message, final.without_proof)
        ).encode()
        # RFC 5802 section 3: ClientKey = ClientProof XOR ClientSignature; the proof is right
        # when H(ClientKey) == StoredKey.
        client_signature = hmac.digest(creds.stored_key, auth_message, self._hash_name)
        client_key = _xor(final.proof, client_signature)
        stored_key = hashlib.new(self._hash_name, client_key).digest()
        is_valid = hmac.compare_digest(stored_key, creds.stored_key)
        if exchange.is_fake or not is_valid:
            raise AuthFailure(SaslCondition.NOT_AUTHORIZED, "invalid-proof")
        server_signature = hmac.digest(creds.server_key, auth_message, self._hash_name)
        return b"v=" + b64encode(server_signature).encode("ascii")

    def _fake_credentials(self, username: str) -> ScramCredentials:
        """Stable, secret-derived credentials nobody can log in with."""
        seed = f"{self._hash_name}\0{username}".encode()
        key = self._fake_salt_secret
        size = _DIGEST_SIZE[self._hash_name]
        return ScramCredentials(
            salt=hmac.digest(key, b"salt\0" + seed, "sha256")[:SALT_BYTES],
            iterations=self._fake_iterations,
            stored_key=hmac.digest(key, b"stored\0" + seed, "sha256")[:size],
            server_key=hmac.digest(key, b"server\0" + seed, "sha256")[:size],
        )

    def _expect(self, state: ScramState) -> None:
        if self._state is not state:
            current = self._state
            self._state = ScramState.ERROR
            raise LocalProtocolError(f"SCRAM step needs {state.name}, machine is {current.name}")


class ScramClient:
    """The client side of SCRAM, for tests and the load generator.

    Args:
        hash_name: "sha1" or "sha256".
        username: the authcid, sent SASLname-encoded (not otherwise prepared).
        password: prepared with OpaqueString.
        nonce: the client nonce; random when None.
        authzid: an authorization identity to send in the gs2 header.
    """

    def __init__(
        self,
        hash_name: HashName,
        username: str,
        password: str,
        *,
        nonce: str | None = None,
        authzid: str | None = None,
        key_cache: MutableMapping[tuple[str, bytes, int], tuple[bytes, bytes, bytes]] | None = None,
    ) -> None:
        self._hash_name: HashName = hash_name
        # Clients such as Conversations keep ClientKey/ServerKey per (salt, iterations) so
        # a repeated login costs HMACs, not PBKDF2; one cache belongs to one account.
        self._key_cache = key_cache
        self._password = prepare_password(password)
        self._nonce = nonce or _random_nonce()
        if not PRINTABLE.issuperset(self._nonce):
            raise ValueError("nonce must be printable ASCII without ','")
        # gs2 flag "n": this client does not do channel binding.
        self._gs2_header = f"n,a={encode_saslname(authzid)}," if authzid else "n,,"
        self._bare = f"n={encode_saslname(username)},r={self._nonce}"
        self._server_signature: bytes | None = None

    def first(self) -> bytes:
        """The client-first-message (gs2 flag "n": no channel binding)."""
        return (self._gs2_header + self._bare).encode()

    def final(self, server_first: bytes) -> bytes:
        """Answer the server-first-message with the client-final-message.

        Raises:
            AuthFailure: the server-first-message is malformed, its nonce does not extend
                ours, or its iteration count is out of range.
        """
        text = decode_message(server_first)
        first = parse_server_first(text)
        nonce = first.nonce
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise AuthFailure(SaslCondition.NOT_AUTHORIZED, "server nonce does not extend ours")
        without_proof = f"c={b64encode(self._gs2_header.encode())},r={nonce}"
        auth_message = ",".join((self._bare, text, without_proof)).encode()
        cache_key = (self._hash_name, first.salt, first.iterations)
        cached = self._key_cache.get(cache_key) if self._key_cache is not None else None
        if cached is None:
            cached = _keys(self._password, first.salt, first.iterations, self._hash_name)
            if self._key_cache is not None:
                self._key_cache[cache_key] = cached
        client_key, stored_key, server_key = cached
        client_signature = hmac.digest(stored_key, auth_message, self._hash_name)
        proof = _xor(client_key, client_signature)
        self._server_signature = hmac.digest(server_key, auth_message, self._hash_name)
        return f"{without_proof},p={b64encode(proof)}".encode()

    def verify(self, server_final: bytes) -> None:
        """Check the server-final-message.

        Raises:
            AuthFailure: NOT_AUTHORIZED when it carries "e=" or a wrong server signature;
                MALFORMED_REQUEST when it is malformed.
            LocalProtocolError: `final` was not called first.
        """
        if self._server_signature is None:
            raise LocalProtocolError("verify() before final()")
        signature = parse_server_final(decode_message(server_final))
        if not hmac.compare_digest(signature, self._server_signature):
            raise AuthFailure(SaslCondition.NOT_AUTHORIZED, "wrong server signature")


def _keys(
    password: str, salt: bytes, iterations: int, hash_name: HashName
) -> tuple[bytes, bytes, bytes]:
    """(ClientKey, StoredKey, ServerKey) for an already-prepared password (RFC 5802 s3)."""
    salted = hashlib.pbkdf2_hmac(hash_name, password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", hash_name)
    stored_key = hashlib.new(hash_name, client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", hash_name)
    return client_key, stored_key, server_key


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _random_nonce() -> str:
    return secrets.token_urlsafe(18)
