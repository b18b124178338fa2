"""SASL step machines: SCRAM-SHA-1, SCRAM-SHA-256 (RFC 5802, RFC 7677) and PLAIN (RFC 4616)."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from gateway.errors import AuthFailure, LocalProtocolError, SaslCondition
from gateway.xmpp.sasl import (
    MAX_PASSWORD_LENGTH,
    HashName,
    ScramClient,
    ScramCredentials,
    ScramServer,
    ScramState,
    check_plain,
    derive_scram_credentials,
    parse_plain,
    prepare_password,
    verify_plain,
)

# RFC 5802 section 5 (SCRAM-SHA-1) and RFC 7677 section 3 (SCRAM-SHA-256).
RFC_VECTORS: dict[str, dict[str, str]] = {
    "sha1": {
        "client_nonce": "fyko+d2lbbFgONRv9qkxdawL",
        "server_nonce": "3rfcNHYJY1ZVvWVs7j",
        "salt": "QSXCR+Q6sek8bf92",
        "client_first": "n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
        "server_first": "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
        "client_final": "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,"
        "p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
        "server_final": "v=rmF9pqV8S7suAoZWja4dJRkFsKQ=",
    },
    "sha256": {
        "client_nonce": "rOprNGfwEbeRWgbNEkqO",
        "server_nonce": "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
        "salt": "W22ZaJ0SNY7soEsUEjb6gQ==",
        "client_first": "n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
        "server_first": "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        "s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        "client_final": "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        "server_final": "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
    },
}
HASHES: list[HashName] = ["sha1", "sha256"]


def rfc_creds(hash_name: HashName) -> ScramCredentials:
    salt = base64.b64decode(RFC_VECTORS[hash_name]["salt"])
    return derive_scram_credentials("pencil", hash_name, salt=salt)


def rfc_server(hash_name: HashName) -> ScramServer:
    nonce = RFC_VECTORS[hash_name]["server_nonce"]
    return ScramServer(hash_name, nonce_factory=lambda: nonce)


def server_at_client_final(
    hash_name: HashName, client_first: bytes | None = None
) -> tuple[ScramServer, str]:
    """A server that has sent server-first for the RFC exchange; returns it and the nonce."""
    vector = RFC_VECTORS[hash_name]
    server = rfc_server(hash_name)
    server.client_first(client_first or vector["client_first"].encode())
    server.server_first(rfc_creds(hash_name))
    return server, vector["client_nonce"] + vector["server_nonce"]


@pytest.mark.parametrize("hash_name", HASHES)
def test_rfc_vector_server_side(hash_name: HashName) -> None:
    vector = RFC_VECTORS[hash_name]
    server = rfc_server(hash_name)
    assert server.authzid is None
    assert server.client_first(vector["client_first"].encode()) == "user"
    assert server.authzid is None
    assert server.server_first(rfc_creds(hash_name)) == vector["server_first"].encode()
    assert server.client_final(vector["client_final"].encode()) == vector["server_final"].encode()
    assert server.state is ScramState.SUCCEEDED


@pytest.mark.parametrize("hash_name", HASHES)
def test_rfc_vector_client_side(hash_name: HashName) -> None:
    vector = RFC_VECTORS[hash_name]
    client = ScramClient(hash_name, "user", "pencil", nonce=vector["client_nonce"])
    assert client.first() == vector["client_first"].encode()
    assert client.final(vector["server_first"].encode()) == vector["client_final"].encode()
    client.verify(vector["server_final"].encode())


@pytest.mark.parametrize("hash_name", HASHES)
def test_client_and_server_agree_with_random_nonces_and_salts(hash_name: HashName) -> None:
    creds = derive_scram_credentials("p\u00e4ssword", hash_name)
    client = ScramClient(hash_name, "juliet,=x", "p\u00e4ssword")
    server = ScramServer(hash_name)
    assert server.client_first(client.first()) == "juliet,=x"
    server_final = server.client_final(client.final(server.server_first(creds)))
    client.verify(server_final)


@pytest.mark.parametrize("hash_name", HASHES)
def test_wrong_password_fails_at_the_final_step(hash_name: HashName) -> None:
    vector = RFC_VECTORS[hash_name]
    server = rfc_server(hash_name)
    client = ScramClient(hash_name, "user", "pen", nonce=vector["client_nonce"])
    server.client_first(client.first())
    server_first = server.server_first(rfc_creds(hash_name))
    with pytest.raises(AuthFailure) as failure:
        server.client_final(client.final(server_first))
    assert failure.value.condition is SaslCondition.NOT_AUTHORIZED
    assert server.state is ScramState.ERROR


@pytest.mark.parametrize("hash_name", HASHES)
def test_unknown_user_fails_only_at_the_final_step(hash_name: HashName) -> None:
    secret = b"k" * 32
    client = ScramClient(hash_name, "nobody", "pencil")
    server = ScramServer(hash_name, fake_salt_secret=secret)
    assert server.client_first(client.first()) == "nobody"
    server_first = server.server_first(None)
    client_final = client.final(server_first)  # looks like any other server-first
    with pytest.raises(AuthFailure) as failure:
        server.client_final(client_final)
    assert failure.value.condition is SaslCondition.NOT_AUTHORIZED


def _salt_and_iterations(server_first: bytes) -> tuple[bytes, bytes]:
    _, salt, iterations = server_first.split(b",")
    return salt, iterations


@pytest.mark.parametrize("hash_name", HASHES)
def test_fake_salt_is_stable_per_user_and_differs_between_users(hash_name: HashName) -> None:
    def fake_server_first(username: str, secret: bytes) -> bytes:
        server = ScramServer(hash_name, fake_salt_secret=secret)
        server.client_first(ScramClient(hash_name, username, "x").first())
        return server.server_first(None)

    first = _salt_and_iterations(fake_server_first("nobody", b"s" * 32))
    assert first == _salt_and_iterations(fake_server_first("nobody", b"s" * 32))
    assert first != _salt_and_iterations(fake_server_first("someone", b"s" * 32))
    assert first != _salt_and_iterations(fake_server_first("nobody", b"t" * 32))
    salt, iterations = first
    assert len(base64.b64decode(salt[2:])) == 16
    assert iterations == b"i=4096"


def hand_made_client_final(
    hash_name: HashName, password: str, client_first: str, server_first: str
) -> tuple[str, str]:
    """RFC 5802 section 3, written out: (client-final, expected server-final)."""
    flag, authzid, bare = client_first.split(",", 2)
    gs2_header = f"{flag},{authzid},"
    attrs = dict(field.split("=", 1) for field in server_first.split(","))
    salted = hashlib.pbkdf2_hmac(
        hash_name, password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"])
    )
    client_key = hmac.digest(salted, b"Client Key", hash_name)
    stored_key = hashlib.new(hash_name, client_key).digest()
    without_proof = f"c={base64.b64encode(gs2_header.encode()).decode()},r={attrs['r']}"
    auth_message = f"{bare},{server_first},{without_proof}".encode()
    signature = hmac.digest(stored_key, auth_message, hash_name)
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    server_key = hmac.digest(salted, b"Server Key", hash_name)
    server_signature = hmac.digest(server_key, auth_message, hash_name)
    return (
        f"{without_proof},p={base64.b64encode(proof).decode()}",
        f"v={base64.b64encode(server_signature).decode()}",
    )


@pytest.mark.parametrize("hash_name", HASHES)
@pytest.mark.parametrize("client_first", ["y,,n=user,r=CLIENT", "n,a=us=2Cer,n=user,r=CLIENT"])
def test_gs2_flag_y_and_authzid_are_accepted_and_echoed(
    hash_name: HashName, client_first: str
) -> None:
    creds = derive_scram_credentials("pencil", hash_name, iterations=16)
    server = ScramServer(hash_name, nonce_factory=lambda: "SERVER")
    server.client_first(client_first.encode())
    server_first = server.server_first(creds).decode()
    client_final, server_final = hand_made_client_final(
        hash_name, "pencil", client_first, server_first
    )
    assert server.client_final(client_final.encode()).decode() == server_final
    # The echo must be of this exchange's gs2 header, not the usual "n,,".
    server = ScramServer(hash_name, nonce_factory=lambda: "SERVER")
    server.client_first(client_first.encode())
    server.server_first(creds)
    with pytest.raises(AuthFailure) as failure:
        server.client_final(("c=biws," + client_final.split(",", 1)[1]).encode())
    assert failure.value.condition is SaslCondition.NOT_AUTHORIZED


@pytest.mark.parametrize("hash_name", HASHES)
def test_client_helper_sends_an_authzid(hash_name: HashName) -> None:
    creds = derive_scram_credentials("pencil", hash_name, iterations=16)
    client = ScramClient(hash_name, "user", "pencil", authzid="admin,x=")
    server = ScramServer(hash_name)
    assert client.first().startswith(b"n,a=admin=2Cx=3D,n=user,r=")
    server.client_first(client.first())
    assert server.authzid == "admin,x="
    client.verify(server.client_final(client.final(server.server_first(creds))))


def test_channel_binding_request_is_refused() -> None:
    # RFC 5802 section 6: we offer no -PLUS mechanism, so "p=" cannot be honoured.
    server = ScramServer("sha256")
    with pytest.raises(AuthFailure) as failure:
        server.client_first(b"p=tls-exporter,,n=user,r=abc")
    assert failure.value.condition is SaslCondition.NOT_AUTHORIZED
    assert server.state is ScramState.ERROR


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"n",
        b"n,",
        b"x,,n=user,r=abc",
        b"n,,",
        b"n,,n=user",
        b"n,,r=abc,n=user",
        b"n,,n=,r=abc",
        b"n,,n=user,r=",
        b"n,,n=us=2Xer,r=abc",
        b"n,,n=us=er,r=abc",
        b"n,,n=user=2,r=abc",
        b"n,,n=us\x00er,r=abc",
        b"n,,n=user,r=a b",
        b"n,,n=user,r=abc\x7f",
        b"n,,m=ext,n=user,r=abc",
        b"n,,n=user,r=abc,m=ext",
        b"n,,n=user,r=abc,",
        b"n,,n=user,r=abc,1=x",
        b"n,,n=user,r=abc,ext",
        b"n,,n=user,r=abc,e=",
        b"n,z=x,n=user,r=abc",
        b"n,,n=\xff\xfe,r=abc",
        b"N,,n=user,r=abc",
    ],
)
def test_malformed_client_first_is_refused(message: bytes) -> None:
    server = ScramServer("sha256")
    with pytest.raises(AuthFailure) as failure:
        server.client_first(message)
    assert failure.value.condition is SaslCondition.MALFORMED_REQUEST
    assert server.state is ScramState.ERROR


@pytest.mark.parametrize("message", [b"n,a=,n=user,r=abc", b"n,a=ad=min,n=user,r=abc"])
def test_badly_encoded_authzid_is_invalid_authzid(message: bytes) -> None:
    with pytest.raises(AuthFailure) as failure:
        ScramServer("sha256").client_first(message)
    assert failure.value.condition is SaslCondition.INVALID_AUTHZID


def test_unknown_extensions_are_ignored() -> None:
    # RFC 5802 section 7: unrecognised extension attributes MUST be ignored.
    vector = RFC_VECTORS["sha1"]
    server = rfc_server("sha1")
    server.client_first(vector["client_first"].encode() + b",x=future")
    assert server.state is ScramState.EXPECT_CREDENTIALS


@pytest.mark.parametrize(
    "template",
    [
        "",
        "c=biws",
        "c=biws,r={nonce}",
        "r={nonce},c=biws,p={proof}",
        "c=biws,p={proof}",
        "c=,r={nonce},p={proof}",
        "c=bi!s,r={nonce},p={proof}",
        "c=biw,r={nonce},p={proof}",
        "c=biws,r={nonce},p=",
        "c=biws,r={nonce},p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts",
        "c=biws,r={nonce},p={proof},x=1",
        "c=biws,r={nonce},m=x,p={proof}",
        "c=biws,r={nonce},=x,p={proof}",
        "c=biws,r={nonce},p=\u00e9",
    ],
)
def test_malformed_client_final_is_refused(template: str) -> None:
    server, nonce = server_at_client_final("sha1")
    message = template.format(nonce=nonce, proof="v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=")
    with pytest.raises(AuthFailure) as failure:
        server.client_final(message.encode())
    assert failure.value.condition is SaslCondition.MALFORMED_REQUEST
    assert server.state is ScramState.ERROR


def test_client_final_that_is_not_utf8_is_malformed() -> None:
    server, _ = server_at_client_final("sha1")
    with pytest.raises(AuthFailure) as failure:
        server.client_final(b"c=biws,r=\xff,p=AAAA")
    assert failure.value.condition is SaslCondition.MALFORMED_REQUEST


def test_client_final_with_extension_before_proof_is_accepted_syntax() -> None:
    # The extension is covered by the proof (AuthMessage), so the RFC proof now fails.
    server, nonce = server_at_client_final("sha1")
    with pytest.raises(AuthFailure) as failure:
        server.client_final(f"c=biws,r={nonce},x=1,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=".encode())
    assert failure.value.condition is SaslCondition.NOT_AUTHORIZED


@pytest.mark.parametrize(
    "template",
    [
        "c=biws,r={nonce}x,p={proof}",
        "c=biws,r=fyko+d2lbbFgONRv9qkxdawL,p={proof}",
        "c=eSws,r={nonce},p={proof}",
        "c=biws,r={nonce},p=AAAA",
        "c=biws,r={nonce},p=w0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
    ],
)
def test_wrong_nonce_binding_or_proof_is_not_authorized(template: str) -> None:
    server, nonce = server_at_client_final("sha1")
    message = template.format(nonce=nonce, proof="v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=")
    with pytest.raises(AuthFailure) as failure:
        server.client_final(message.encode())
    assert failure.value.condition is SaslCondition.NOT_AUTHORIZED


def test_steps_out_of_order_are_local_protocol_errors() -> None:
    server = ScramServer("sha256")
    with pytest.raises(LocalProtocolError):
        server.server_first(None)
    assert server.state is ScramState.ERROR
    with pytest.raises(LocalProtocolError):
        server.client_first(b"n,,n=user,r=abc")

    done, _ = server_at_client_final("sha1")
    done.client_final(RFC_VECTORS["sha1"]["client_final"].encode())
    with pytest.raises(LocalProtocolError):
        done.client_final(b"c=biws")


def test_bad_nonce_factory_or_mismatched_keys_are_local_errors() -> None:
    server = ScramServer("sha256", nonce_factory=lambda: "has,comma")
    server.client_first(b"n,,n=user,r=abc")
    with pytest.raises(LocalProtocolError):
        server.server_first(None)
    assert server.state is ScramState.ERROR

    server = ScramServer("sha256")
    server.client_first(b"n,,n=user,r=abc")
    with pytest.raises(LocalProtocolError):
        server.server_first(rfc_creds("sha1"))  # 20-byte keys for a SHA-256 exchange


def test_client_refuses_a_bad_server_first() -> None:
    for message, condition in [
        (b"r=other,s=QSXCR+Q6sek8bf92,i=4096", SaslCondition.NOT_AUTHORIZED),
        (b"r=abc,s=QSXCR+Q6sek8bf92,i=4096", SaslCondition.NOT_AUTHORIZED),
        (b"r=abcd,s=QSXCR+Q6sek8bf92", SaslCondition.MALFORMED_REQUEST),
        (b"r=abcd,s=!!,i=4096", SaslCondition.MALFORMED_REQUEST),
        (b"r=abcd,s=QSXCR+Q6sek8bf92,i=0", SaslCondition.MALFORMED_REQUEST),
        (b"r=abcd,s=QSXCR+Q6sek8bf92,i=+12", SaslCondition.MALFORMED_REQUEST),
        (b"r=abcd,s=QSXCR+Q6sek8bf92,i=\xd9\xa1", SaslCondition.MALFORMED_REQUEST),
        (b"r=abcd,s=QSXCR+Q6sek8bf92,i=99999999999", SaslCondition.MALFORMED_REQUEST),
        (b"r=abcd,s=QSXCR+Q6sek8bf92,i=4096,m=x", SaslCondition.MALFORMED_REQUEST),
    ]:
        client = ScramClient("sha1", "user", "pencil", nonce="abc")
        with pytest.raises(AuthFailure) as failure:
            client.final(message)
        assert failure.value.condition is condition, message


def test_client_verify_refuses_wrong_signature_and_errors() -> None:
    vector = RFC_VECTORS["sha256"]
    client = ScramClient("sha256", "user", "pencil", nonce=vector["client_nonce"])
    with pytest.raises(LocalProtocolError):
        client.verify(vector["server_final"].encode())
    client.final(vector["server_first"].encode())
    with pytest.raises(AuthFailure) as failure:
        client.verify(b"v=" + base64.b64encode(b"\0" * 32))
    assert failure.value.condition is SaslCondition.NOT_AUTHORIZED
    with pytest.raises(AuthFailure) as failure:
        client.verify(b"e=invalid-proof")
    assert failure.value.text == "invalid-proof"
    with pytest.raises(AuthFailure) as failure:
        client.verify(b"x=1")
    assert failure.value.condition is SaslCondition.MALFORMED_REQUEST


def test_client_refuses_a_bad_nonce() -> None:
    with pytest.raises(ValueError, match="nonce"):
        ScramClient("sha1", "user", "pencil", nonce="a,b")


def test_derive_prepares_the_password_and_checks_iterations() -> None:
    salt = b"0123456789abcdef"
    # OpaqueString maps non-ASCII spaces to U+0020 and applies NFC.
    assert derive_scram_credentials("a\u00a0b", "sha256", salt=salt) == derive_scram_credentials(
        "a b", "sha256", salt=salt
    )
    assert derive_scram_credentials(
        "u\u0308", "sha256", salt=salt, iterations=1
    ) == derive_scram_credentials("\u00fc", "sha256", salt=salt, iterations=1)
    with pytest.raises(ValueError, match="OpaqueString"):
        derive_scram_credentials("", "sha256")
    with pytest.raises(ValueError, match="OpaqueString"):
        derive_scram_credentials("a\x00b", "sha256")
    with pytest.raises(ValueError, match="iterations"):
        derive_scram_credentials("pencil", "sha256", iterations=0)
    creds = derive_scram_credentials("pencil", "sha1")
    assert len(creds.salt) == 16
    assert creds.iterations == 4096
    assert len(creds.stored_key) == len(creds.server_key) == 20


@pytest.mark.parametrize("hash_name", HASHES)
def test_verify_plain_checks_against_stored_scram_keys(hash_name: HashName) -> None:
    creds = rfc_creds(hash_name)
    assert verify_plain("pencil", creds, hash_name)
    assert not verify_plain("Pencil", creds, hash_name)
    assert not verify_plain("", creds, hash_name)
    assert not verify_plain("pen\x00cil", creds, hash_name)


def test_check_plain_costs_one_pbkdf2_whether_the_account_exists_or_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The time of a PLAIN failure must not tell whether the account exists: an unknown
    # account is hashed too, with the iteration count of new accounts.
    calls: list[int] = []
    real = hashlib.pbkdf2_hmac

    def counted(name: str, password: bytes, salt: bytes, iterations: int) -> bytes:
        calls.append(iterations)
        return real(name, password, salt, iterations)

    creds = rfc_creds("sha256")
    monkeypatch.setattr(hashlib, "pbkdf2_hmac", counted)
    assert check_plain("pencil", creds, "sha256", fake_iterations=4096)
    assert not check_plain("wrong", creds, "sha256", fake_iterations=4096)
    assert not check_plain("pencil", None, "sha256", fake_iterations=4096)
    assert calls == [creds.iterations, creds.iterations, 4096]


def test_overlong_password_is_refused_before_saslprep() -> None:
    creds = rfc_creds("sha256")
    longest = "x" * MAX_PASSWORD_LENGTH
    assert prepare_password(longest) == longest
    with pytest.raises(ValueError, match="longer than"):
        prepare_password(longest + "x")
    assert not verify_plain("x" * 190_000, creds, "sha256")


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (b"\x00tim\x00tanstaaftanstaaf", (None, "tim", "tanstaaftanstaaf")),
        (b"Ursel\x00Kurt\x00xipj3plmq", ("Ursel", "Kurt", "xipj3plmq")),
        (b"\x00juliet\x00p\xc3\xa4ss word", (None, "juliet", "p\u00e4ss word")),
        (b"admin@example.com\x00juliet\x00=,", ("admin@example.com", "juliet", "=,")),
    ],
)
def test_plain_messages_are_split(message: bytes, expected: tuple[str | None, str, str]) -> None:
    assert parse_plain(message) == expected


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"juliet",
        b"\x00juliet",
        b"\x00juliet\x00",
        b"\x00\x00secret",
        b"\x00\x00",
        b"a\x00b\x00c\x00d",
        b"\x00juliet\x00sec\x00ret",
        b"\x00jul\xffiet\x00secret",
        b"\x00juliet\x00\xc3",
    ],
)
def test_malformed_plain_messages_are_refused(message: bytes) -> None:
    with pytest.raises(AuthFailure) as failure:
        parse_plain(message)
    assert failure.value.condition is SaslCondition.MALFORMED_REQUEST
