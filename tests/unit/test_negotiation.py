"""C2S negotiation as a pure machine: client bytes in, server bytes out (RFC 6120 4-7)."""

from __future__ import annotations

import base64

import pytest

from gateway.errors import (
    LocalProtocolError,
    RemoteProtocolError,
    StanzaErrorCondition,
    StreamErrorCondition,
)
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID
from gateway.xmpp.negotiation import (
    Action,
    Authenticated,
    BindRequested,
    C2SNegotiation,
    NegotiationSettings,
    Phase,
    StartTls,
    StreamEnded,
    render_stream,
)
from gateway.xmpp.parser import ElementReceived, StreamOpened, StreamParser
from gateway.xmpp.sasl import ScramClient, derive_scram_credentials
from gateway.xmpp.sasl_exchange import CheckPassword, LookupCredentials

HEADER = (
    b"<?xml version='1.0'?><stream:stream to='localhost' version='1.0' xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams'>"
)
GARBAGE = base64.b64encode(b"garbage").decode()
CREDS = {
    "sha256": derive_scram_credentials("pencil", "sha256", salt=b"0123456789abcdef"),
    "sha1": derive_scram_credentials("pencil", "sha1", salt=b"0123456789abcdef"),
}


class Peer:
    """Drives a C2SNegotiation with bytes and reads its output back as elements."""

    def __init__(self, **settings: object) -> None:
        defaults: dict[str, object] = {
            "hosts": frozenset({"localhost"}),
            "tls_available": True,
            "tls_required": False,
        }
        defaults.update(settings)
        self.neg = C2SNegotiation(
            NegotiationSettings(**defaults),  # type: ignore[arg-type]
            stream_id_factory=lambda: "sid",
        )
        self.parser = StreamParser()
        self.out_parser = StreamParser()
        self.actions: list[Action] = []

    def feed(self, data: bytes) -> list[Element]:
        """Send client bytes; return the elements the server wrote in reply."""
        for event in self.parser.feed(data):
            self.actions.extend(self.neg.receive(event))
        return self.read()

    def last(self) -> Action:
        return self.actions[-1]

    def read(self) -> list[Element]:
        out: list[Element] = []
        for event in self.out_parser.feed(render_stream(self.neg.take_output())):
            if isinstance(event, ElementReceived):
                out.append(event.element)
            elif isinstance(event, StreamOpened):
                assert event.attrs.get("from") == "localhost"
                assert event.attrs.get("id") == "sid"
        return out

    def restart(self) -> list[Element]:
        self.parser.reset()
        self.out_parser.reset()
        return self.feed(HEADER)

    def authenticate(self, user: str = "user", mechanism: str = "SCRAM-SHA-256") -> None:
        hash_name = "sha256" if mechanism == "SCRAM-SHA-256" else "sha1"
        client = ScramClient(hash_name, user, "pencil")  # type: ignore[arg-type]
        first = base64.b64encode(client.first()).decode()
        assert (
            self.feed(f"<auth xmlns='{ns.SASL}' mechanism='{mechanism}'>{first}</auth>".encode())
            == []
        )
        lookup = self.actions.pop()
        assert isinstance(lookup, LookupCredentials)
        self.neg.provide_credentials(CREDS[lookup.hash_name])
        (challenge,) = self.read()
        final = client.final(base64.b64decode(challenge.text))
        (success,) = self.feed(
            f"<response xmlns='{ns.SASL}'>{base64.b64encode(final).decode()}</response>".encode()
        )
        assert success.name == "success"
        client.verify(base64.b64decode(success.text))


def _mechanisms(features: Element) -> list[str]:
    mechanisms = features.find(ns.SASL, "mechanisms")
    return [] if mechanisms is None else [m.text for m in mechanisms.elements()]


def test_header_is_answered_with_header_and_pre_auth_features() -> None:
    peer = Peer()
    (features,) = peer.feed(HEADER)
    assert features.tag == (ns.STREAM, "features")
    assert features.find(ns.TLS, "starttls") is not None
    assert _mechanisms(features) == ["SCRAM-SHA-256", "SCRAM-SHA-1"]
    assert peer.neg.phase is Phase.FEATURES


def test_tls_required_offers_only_starttls_rfc6120_5_3_1() -> None:
    peer = Peer(tls_required=True)
    (features,) = peer.feed(HEADER)
    starttls = features.find(ns.TLS, "starttls")
    assert starttls is not None and starttls.find(ns.TLS, "required") is not None
    assert features.find(ns.SASL, "mechanisms") is None


def test_starttls_answers_proceed_and_asks_the_shell_to_upgrade() -> None:
    peer = Peer()
    peer.feed(HEADER)
    (proceed,) = peer.feed(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    assert proceed.tag == (ns.TLS, "proceed")
    assert isinstance(peer.last(), StartTls)
    peer.neg.tls_established()
    (features,) = peer.restart()
    assert features.find(ns.TLS, "starttls") is None
    assert "PLAIN" in _mechanisms(features)


def test_starttls_when_not_offered_is_failure_then_stream_error() -> None:
    peer = Peer(tls_available=False)
    peer.feed(HEADER)
    with pytest.raises(RemoteProtocolError):
        peer.feed(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    (failure,) = peer.read()
    assert failure.tag == (ns.TLS, "failure")


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_scram_login_restart_and_bind(mechanism: str) -> None:
    peer = Peer()
    peer.feed(HEADER)
    peer.authenticate(mechanism=mechanism)
    assert isinstance(peer.last(), Authenticated)
    assert peer.neg.jid == JID.parse("user@localhost")
    assert peer.neg.mechanism == mechanism
    (features,) = peer.restart()
    assert features.find(ns.BIND, "bind") is not None
    session = features.find(ns.SESSION, "session")
    assert session is not None and session.find(ns.SESSION, "optional") is not None
    bind_request = f"<bind xmlns='{ns.BIND}'><resource>home</resource></bind>"
    assert peer.feed(f"<iq type='set' id='b'>{bind_request}</iq>".encode()) == []
    request = peer.last()
    assert isinstance(request, BindRequested) and request.resource == "home"
    peer.neg.bind_result(request.iq, JID.parse("user@localhost/home"))
    (result,) = peer.read()
    assert result.get("type") == "result" and result.get("id") == "b"
    bind = result.find(ns.BIND, "bind")
    assert bind is not None and bind.find_text(ns.BIND, "jid") == "user@localhost/home"
    assert peer.neg.is_established
    with pytest.raises(LocalProtocolError):  # the session's pump reads from now on
        peer.feed(b"<message to='x@localhost'><body>hi</body></message>")


def test_bind_without_resource_lets_the_server_choose() -> None:
    peer = Peer()
    peer.feed(HEADER)
    peer.authenticate()
    peer.restart()
    peer.feed(f"<iq type='set' id='b'><bind xmlns='{ns.BIND}'/></iq>".encode())
    request = peer.last()
    assert isinstance(request, BindRequested) and request.resource is None


def test_bind_with_invalid_resource_is_bad_request_and_can_be_retried() -> None:
    peer = Peer()
    peer.feed(HEADER)
    peer.authenticate()
    peer.restart()
    # U+202E (a bidi override) is disallowed by the OpaqueString profile.
    bind = f"<bind xmlns='{ns.BIND}'><resource>a\u202eb</resource></bind>"
    (error,) = peer.feed(f"<iq type='set' id='b'>{bind}</iq>".encode())
    assert error.get("type") == "error"
    assert error.find(ns.CLIENT, "error").find(ns.STANZAS_ERRORS, "bad-request") is not None  # type: ignore[union-attr]
    assert peer.neg.phase is Phase.WAIT_BIND


def test_bind_refused_returns_to_wait_bind() -> None:
    peer = Peer()
    peer.feed(HEADER)
    peer.authenticate()
    peer.restart()
    peer.feed(f"<iq type='set' id='b'><bind xmlns='{ns.BIND}'/></iq>".encode())
    request = peer.last()
    assert isinstance(request, BindRequested)
    peer.neg.bind_refused(request.iq, StanzaErrorCondition.NOT_ALLOWED, "no")
    (error,) = peer.read()
    assert error.get("type") == "error"
    assert peer.neg.phase is Phase.WAIT_BIND


def test_wrong_password_is_not_authorized_and_stream_continues() -> None:
    peer = Peer()
    peer.feed(HEADER)
    client = ScramClient("sha256", "user", "wrong")
    first = base64.b64encode(client.first()).decode()
    peer.feed(f"<auth xmlns='{ns.SASL}' mechanism='SCRAM-SHA-256'>{first}</auth>".encode())
    peer.neg.provide_credentials(CREDS["sha256"])
    (challenge,) = peer.read()
    final = base64.b64encode(client.final(base64.b64decode(challenge.text))).decode()
    (failure,) = peer.feed(f"<response xmlns='{ns.SASL}'>{final}</response>".encode())
    assert failure.tag == (ns.SASL, "failure")
    assert failure.find(ns.SASL, "not-authorized") is not None
    assert peer.neg.phase is Phase.FEATURES
    peer.authenticate()  # a retry on the same stream succeeds


def test_too_many_failures_end_the_stream_with_policy_violation() -> None:
    peer = Peer(max_auth_failures=2, tls_available=False, plain_without_tls=True)
    peer.feed(HEADER)
    bad = base64.b64encode(b"\0user\0wrong").decode()
    peer.feed(f"<auth xmlns='{ns.SASL}' mechanism='PLAIN'>{bad}</auth>".encode())
    peer.neg.password_checked(False)
    assert peer.read()[0].tag == (ns.SASL, "failure")
    peer.feed(f"<auth xmlns='{ns.SASL}' mechanism='PLAIN'>{bad}</auth>".encode())
    with pytest.raises(RemoteProtocolError) as info:
        peer.neg.password_checked(False)
    assert info.value.condition is StreamErrorCondition.POLICY_VIOLATION


def test_plain_on_tls_none_listener_succeeds_and_unknown_user_fails() -> None:
    peer = Peer(tls_available=False, plain_without_tls=True)
    (features,) = peer.feed(HEADER)
    assert "PLAIN" in _mechanisms(features)
    ok = base64.b64encode(b"\0user\0pencil").decode()
    peer.feed(f"<auth xmlns='{ns.SASL}' mechanism='PLAIN'>{ok}</auth>".encode())
    check = peer.last()
    assert isinstance(check, CheckPassword) and check.username == "user"
    assert check.password == "pencil" and "pencil" not in repr(check)
    peer.neg.password_checked(False)
    (failure,) = peer.read()
    assert failure.find(ns.SASL, "not-authorized") is not None
    peer.feed(f"<auth xmlns='{ns.SASL}' mechanism='PLAIN'>{ok}</auth>".encode())
    assert isinstance(peer.neg.password_checked(True)[0], Authenticated)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
def test_refused_credentials_are_a_temporary_auth_failure_that_counts(mechanism: str) -> None:
    peer = Peer(max_auth_failures=2, tls_available=False, plain_without_tls=True)
    peer.feed(HEADER)
    if mechanism == "PLAIN":
        data = base64.b64encode(b"\0user\0pencil").decode()
    else:
        data = base64.b64encode(ScramClient("sha256", "user", "pencil").first()).decode()
    peer.feed(f"<auth xmlns='{ns.SASL}' mechanism='{mechanism}'>{data}</auth>".encode())
    assert peer.neg.refuse_credentials("try again in 60 seconds") == []
    (failure,) = peer.read()
    assert failure.find(ns.SASL, "temporary-auth-failure") is not None
    assert failure.find_text(ns.SASL, "text") == "try again in 60 seconds"
    assert peer.neg.auth_failures == 1 and peer.neg.phase is Phase.FEATURES
    with pytest.raises(LocalProtocolError):
        peer.neg.refuse_credentials("nothing is pending")


def test_overlong_sasl_payload_is_malformed_before_any_work() -> None:
    peer = Peer(tls_available=False, plain_without_tls=True)
    peer.feed(HEADER)
    data = base64.b64encode(b"\0user\0" + b"x" * 20000).decode()
    (failure,) = peer.feed(f"<auth xmlns='{ns.SASL}' mechanism='PLAIN'>{data}</auth>".encode())
    assert failure.find(ns.SASL, "malformed-request") is not None
    assert not any(isinstance(a, CheckPassword) for a in peer.actions)


def test_auth_without_initial_response_gets_an_empty_challenge() -> None:
    peer = Peer(tls_available=False, plain_without_tls=True)
    peer.feed(HEADER)
    (challenge,) = peer.feed(f"<auth xmlns='{ns.SASL}' mechanism='PLAIN'/>".encode())
    assert challenge.name == "challenge" and challenge.text == ""
    ok = base64.b64encode(b"\0user\0pencil").decode()
    peer.feed(f"<response xmlns='{ns.SASL}'>{ok}</response>".encode())
    assert isinstance(peer.last(), CheckPassword)


@pytest.mark.parametrize(
    ("auth", "condition"),
    [
        (f"<auth xmlns='{ns.SASL}' mechanism='DIGEST-MD5'>=</auth>", "invalid-mechanism"),
        (f"<auth xmlns='{ns.SASL}' mechanism='PLAIN'>AGE=</auth>", "encryption-required"),
        (
            f"<auth xmlns='{ns.SASL}' mechanism='SCRAM-SHA-1'>@@notbase64@@</auth>",
            "incorrect-encoding",
        ),
        (
            f"<auth xmlns='{ns.SASL}' mechanism='SCRAM-SHA-1'>{GARBAGE}</auth>",
            "malformed-request",
        ),
        (f"<abort xmlns='{ns.SASL}'/>", "aborted"),
    ],
)
def test_sasl_failures_carry_the_rfc6120_condition(auth: str, condition: str) -> None:
    peer = Peer()
    peer.feed(HEADER)
    (failure,) = peer.feed(auth.encode())
    assert failure.tag == (ns.SASL, "failure")
    assert failure.find(ns.SASL, condition) is not None


def test_authzid_of_another_user_is_invalid_authzid() -> None:
    peer = Peer(tls_available=False, plain_without_tls=True)
    peer.feed(HEADER)
    data = base64.b64encode(b"admin@localhost\0user\0pencil").decode()
    (failure,) = peer.feed(f"<auth xmlns='{ns.SASL}' mechanism='PLAIN'>{data}</auth>".encode())
    assert failure.find(ns.SASL, "invalid-authzid") is not None


@pytest.mark.parametrize(
    ("header", "condition"),
    [
        (
            HEADER.replace(b"to='localhost'", b"to='other.example'"),
            StreamErrorCondition.HOST_UNKNOWN,
        ),
        (HEADER.replace(b"to='localhost' ", b""), StreamErrorCondition.HOST_UNKNOWN),
        (
            HEADER.replace(b"version='1.0'", b"version='2.0'"),
            StreamErrorCondition.UNSUPPORTED_VERSION,
        ),
        (
            HEADER.replace(b"xmlns='jabber:client'", b"xmlns='jabber:server'"),
            StreamErrorCondition.INVALID_NAMESPACE,
        ),
        (
            HEADER.replace(b"etherx.jabber.org/streams", b"example.org/x"),
            StreamErrorCondition.INVALID_NAMESPACE,
        ),
    ],
)
def test_bad_headers_raise_with_our_header_sent_first(
    header: bytes, condition: StreamErrorCondition
) -> None:
    peer = Peer()
    with pytest.raises(RemoteProtocolError) as info:
        peer.feed(header)
    assert info.value.condition is condition
    peer.neg.queue_stream_error(condition)
    data = render_stream(peer.neg.take_output())
    assert data.startswith(b"<?xml")  # RFC 6120 4.9.1.1: header before the error
    assert data.endswith(b"</stream:stream>")
    assert condition.value.encode() in data


def test_stanza_before_authentication_is_not_authorized() -> None:
    peer = Peer()
    peer.feed(HEADER)
    with pytest.raises(RemoteProtocolError) as info:
        peer.feed(b"<message to='a@localhost'><body>x</body></message>")
    assert info.value.condition is StreamErrorCondition.NOT_AUTHORIZED


def test_client_stream_close_is_reported() -> None:
    peer = Peer()
    peer.feed(HEADER)
    peer.feed(b"</stream:stream>")
    assert isinstance(peer.last(), StreamEnded)
    peer.neg.queue_close()
    assert render_stream(peer.neg.take_output()).endswith(b"</stream:stream>")


def test_restart_with_another_host_is_host_unknown() -> None:
    peer = Peer(hosts=frozenset({"localhost", "example.org"}))
    peer.feed(HEADER)
    peer.authenticate()
    peer.parser.reset()
    with pytest.raises(RemoteProtocolError) as info:
        peer.feed(HEADER.replace(b"localhost", b"example.org"))
    assert info.value.condition is StreamErrorCondition.HOST_UNKNOWN
