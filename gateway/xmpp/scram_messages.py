"""SCRAM message syntax (RFC 5802 section 7): the four messages as text, no cryptography.

Both sides of `gateway.xmpp.sasl` (`ScramServer`, `ScramClient`) read and write their
messages through this module: attributes are `name=value` fields separated by ",", user
names are SASLnames ("=2C" for ",", "=3D" for "="), binary values are base64 and nonces are
printable ASCII without ",". A message that breaks the grammar is an `AuthFailure` with
`malformed-request`; the few faults the RFC makes authentication failures instead are
`not-authorized` or `invalid-authzid`, and are noted where they are raised. The hashing, the
nonce checks and the state of an exchange stay in `gateway.xmpp.sasl`.

Channel binding: we never offer the -PLUS variants, so the gs2 flags "n" (client does not support
channel binding) and "y" (client does, but thinks the server does not) are accepted. A client
that sends "p=..." asks for channel binding the server did not offer; RFC 5802 section 6 and the
server-error-value "channel-binding-not-supported" of section 7 make that an authentication
failure, reported as `not-authorized`.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Final

from gateway.errors import AuthFailure, SaslCondition

#: A client refuses iteration counts above this (a hostile server could ask for a PBKDF2
#: that never ends).
MAX_ITERATIONS: Final = 10_000_000
#: RFC 5802 section 7: printable = %x21-2B / %x2D-7E (ASCII graphic characters but ",").
PRINTABLE: Final = frozenset(chr(c) for c in range(0x21, 0x7F)) - {","}
_ALPHA: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass(frozen=True, slots=True)
class ClientFirst:
    """A parsed client-first-message.

    Attributes:
        gs2_header: the gs2 header as sent, which the client-final-message must echo.
        bare: the client-first-message-bare, part of the AuthMessage.
        username: the authcid, SASLname-decoded.
        authzid: the authorization identity, SASLname-decoded, or None.
        client_nonce: the client's part of the nonce.
    """

    gs2_header: bytes
    bare: str
    username: str
    authzid: str | None
    client_nonce: str


@dataclass(frozen=True, slots=True)
class ClientFinal:
    """A parsed client-final-message.

    Attributes:
        channel_binding: the decoded `c=` value (the gs2 header echoed, no channel binding).
        nonce: the `r=` value, client and server nonce.
        proof: the decoded ClientProof.
        without_proof: the message up to the proof, part of the AuthMessage.
    """

    channel_binding: bytes
    nonce: str
    proof: bytes
    without_proof: str


@dataclass(frozen=True, slots=True)
class ServerFirst:
    """A parsed server-first-message: the nonce, the PBKDF2 salt and iteration count."""

    nonce: str
    salt: bytes
    iterations: int


def parse_client_first(text: str) -> ClientFirst:
    """Parse a client-first-message.

    Raises:
        AuthFailure: MALFORMED_REQUEST on bad syntax or an "m=" extension;
            INVALID_AUTHZID on a badly encoded authzid; NOT_AUTHORIZED when the client
            asks for channel binding ("p=").
    """
    # client-first-message = gs2-header client-first-message-bare
    # gs2-header = gs2-cbind-flag "," [ authzid ] ","
    cbind_flag, comma, rest = text.partition(",")
    if not comma:
        raise _malformed("missing gs2 header")
    if cbind_flag.startswith("p="):
        raise AuthFailure(SaslCondition.NOT_AUTHORIZED, "channel-binding-not-supported")
    if cbind_flag not in ("n", "y"):
        raise _malformed("invalid gs2-cbind-flag")
    authzid_field, comma, bare = rest.partition(",")
    if not comma:
        raise _malformed("missing gs2 header")
    authzid: str | None = None
    if authzid_field:
        if not authzid_field.startswith("a="):
            raise _malformed("invalid authzid field")
        try:
            authzid = _decode_saslname(authzid_field[2:])
        except AuthFailure as exc:
            raise AuthFailure(SaslCondition.INVALID_AUTHZID, exc.text) from exc
    gs2_header = text[: len(text) - len(bare)].encode()
    # client-first-message-bare = [reserved-mext ","] username "," nonce ["," extensions]
    attrs = bare.split(",")
    if attrs[0].startswith("m="):
        # RFC 5802 section 5.1: "m" MUST cause authentication failure.
        raise _malformed("mandatory extensions are not supported")
    if len(attrs) < 2:
        raise _malformed("client-first needs n= and r=")
    username = _decode_saslname(_attr(attrs[0], "n"))
    nonce = _attr(attrs[1], "r")
    if not PRINTABLE.issuperset(nonce):
        raise _malformed("invalid nonce")
    _check_extensions(attrs[2:])
    return ClientFirst(gs2_header, bare, username, authzid, nonce)


def parse_client_final(text: str) -> ClientFinal:
    """Parse a client-final-message.

    Raises:
        AuthFailure: MALFORMED_REQUEST on bad syntax.
    """
    # client-final-message = channel-binding "," nonce ["," extensions] "," proof
    attrs = text.split(",")
    if len(attrs) < 3:
        raise _malformed("client-final needs c=, r= and p=")
    cbind = _attr(attrs[0], "c")
    nonce = _attr(attrs[1], "r")
    _check_extensions(attrs[2:-1])
    proof = b64decode(_attr(attrs[-1], "p"))
    without_proof = text[: len(text) - len(attrs[-1]) - 1]
    return ClientFinal(b64decode(cbind), nonce, proof, without_proof)


def parse_server_first(text: str) -> ServerFirst:
    """Parse a server-first-message.

    Raises:
        AuthFailure: MALFORMED_REQUEST on bad syntax or an iteration count that is not a
            positive decimal number up to `MAX_ITERATIONS`.
    """
    attrs = text.split(",")
    if len(attrs) < 3:
        raise _malformed("server-first needs r=, s= and i=")
    nonce = _attr(attrs[0], "r")
    salt = b64decode(_attr(attrs[1], "s"))
    iterations = _parse_iterations(_attr(attrs[2], "i"))
    _check_extensions(attrs[3:])
    return ServerFirst(nonce, salt, iterations)


def parse_server_final(text: str) -> bytes:
    """Parse a server-final-message.

    Returns:
        The decoded ServerSignature.

    Raises:
        AuthFailure: NOT_AUTHORIZED when it carries a server-error ("e="); MALFORMED_REQUEST
            on bad syntax.
    """
    attrs = text.split(",")
    if attrs[0].startswith("e="):
        raise AuthFailure(SaslCondition.NOT_AUTHORIZED, attrs[0][2:])
    signature = b64decode(_attr(attrs[0], "v"))
    _check_extensions(attrs[1:])
    return signature


def encode_saslname(name: str) -> str:
    """`name` as a SASLname (RFC 5802 section 5.1): "=" as "=3D", "," as "=2C"."""
    return name.replace("=", "=3D").replace(",", "=2C")


def decode_message(message: bytes) -> str:
    """A SASL message as text; not UTF-8 is MALFORMED_REQUEST (`AuthFailure`)."""
    try:
        return message.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _malformed("not UTF-8") from exc


def b64encode(data: bytes) -> str:
    """Base64 without a trailing newline."""
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def b64decode(text: str) -> bytes:
    """Strict base64; anything else is MALFORMED_REQUEST (`AuthFailure`)."""
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise _malformed("invalid base64") from exc


def _attr(field: str, name: str) -> str:
    """The non-empty value of `name=value`, or MALFORMED_REQUEST."""
    if len(field) < 3 or field[0] != name or field[1] != "=":
        raise _malformed(f"expected {name}=")
    return field[2:]


def _check_extensions(fields: list[str]) -> None:
    """Syntax-check extension attributes; RFC 5802 section 7 says unknown ones are ignored.

    "m" is the reserved mandatory-extension attribute: section 5.1 says it MUST fail.
    """
    for field in fields:
        if len(field) < 3 or field[0] not in _ALPHA or field[1] != "=":
            raise _malformed("invalid attribute")
        if field[0] == "m":
            raise _malformed("mandatory extensions are not supported")


def _decode_saslname(name: str) -> str:
    """RFC 5802 section 5.1: "=2C" is ",", "=3D" is "=", any other "=" fails."""
    if not name or "\0" in name:
        raise _malformed("invalid saslname")
    if "=" not in name:
        return name
    head, *escapes = name.split("=")
    out = [head]
    for escape in escapes:
        if escape.startswith("2C"):
            out.append(",")
        elif escape.startswith("3D"):
            out.append("=")
        else:
            raise _malformed("invalid escape in saslname")
        out.append(escape[2:])
    return "".join(out)


def _parse_iterations(text: str) -> int:
    # Only ASCII digits: int() would also take "+1", " 1", "1_0" and other scripts' digits.
    if not (text.isascii() and text.isdigit()) or text.startswith("0"):
        raise _malformed("invalid iteration count")
    iterations = int(text)
    if iterations > MAX_ITERATIONS:
        raise _malformed("iteration count too high")
    return iterations


def _malformed(text: str) -> AuthFailure:
    return AuthFailure(SaslCondition.MALFORMED_REQUEST, text)
