"""C2S stream negotiation (RFC 6120 sections 4-7), sans-I/O.

Theory of operation
-------------------
`C2SNegotiation` is fed parser events (`receive`) and returns actions for the I/O shell;
the bytes to write accumulate in an outbound buffer read with `data_to_send()`. It owns
the `c2s_unauthed` -> `c2s` progression of one connection:

    WAIT_HEADER --header--> FEATURES --<starttls/>--> TLS (shell upgrades, calls
    tls_established(), parser reset) --> WAIT_HEADER ...
    FEATURES --<auth/>--> SASL (LookupCredentials; shell calls provide_credentials())
        --success--> WAIT_HEADER (restart, authenticated) --header--> WAIT_BIND
    WAIT_BIND --bind iq--> BINDING (BindRequested; shell calls bind_result()) --> ESTABLISHED

Only `restart` after STARTTLS / SASL success rewinds to WAIT_HEADER. Stream-level faults
raise `RemoteProtocolError`; the shell then writes `stream_error_bytes()` (which sends our
stream header first when none was sent yet, RFC 6120 section 4.9.1.1) and closes. SASL
faults are `<failure/>` answers and the stream goes on, until `max_auth_failures` is
exceeded (RFC 6120 section 6.4.5), which ends the stream with `policy-violation`.

In ESTABLISHED the shell handles stanzas itself; `receive` is only needed there for the
stream close and for nonzas.
"""

from __future__ import annotations

import base64
import binascii
import enum
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from gateway.errors import (
    AuthFailure,
    JIDError,
    LocalProtocolError,
    RemoteProtocolError,
    SaslCondition,
    StanzaErrorCondition,
    StreamErrorCondition,
)
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import XML_LANG, Element
from gateway.xmpp.jid import JID
from gateway.xmpp.parser import ElementReceived, Event, StreamClosed, StreamOpened
from gateway.xmpp.sasl import HashName, ScramCredentials, ScramServer, parse_plain
from gateway.xmpp.serializer import STREAM_FOOTER, serialize, stream_header
from gateway.xmpp.stanza import error_reply, sasl_failure, stream_error

SCRAM_MECHANISMS: Final[dict[str, HashName]] = {
    "SCRAM-SHA-256": "sha256",
    "SCRAM-SHA-1": "sha1",
}
PLAIN: Final = "PLAIN"
#: Longest base64 SASL payload taken: a PLAIN message with the longest JIDs and password,
#: SCRAM messages are far shorter. Longer is `malformed-request`, before any work on it.
MAX_SASL_TEXT: Final = 12288


class Phase(enum.Enum):
    WAIT_HEADER = "wait_header"
    FEATURES = "features"
    TLS = "tls"
    SASL = "sasl"
    WAIT_BIND = "wait_bind"
    BINDING = "binding"
    ESTABLISHED = "established"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class NegotiationSettings:
    """What one listener offers.

    Attributes:
        hosts: the domains served.
        tls_available: STARTTLS can be offered (a certificate is configured).
        tls_required: STARTTLS must be negotiated before SASL.
        secure: the transport is already confidential (direct TLS, or TLS terminated by a
            trusted proxy on a `tls: none` listener); PLAIN is then allowed.
        plain_without_tls: allow PLAIN on this listener without TLS (`tls: none`).
        max_auth_failures: failed SASL attempts before the stream is closed.
    """

    hosts: frozenset[str]
    tls_available: bool
    tls_required: bool
    secure: bool = False
    plain_without_tls: bool = False
    max_auth_failures: int = 3
    stream_management: bool = False


# Actions for the shell.


@dataclass(frozen=True, slots=True)
class StartTls:
    """`<proceed/>` is in the outbound buffer: flush it, then do the TLS handshake."""


@dataclass(frozen=True, slots=True)
class LookupCredentials:
    """Fetch the account's stored credentials, then call `provide_credentials`."""

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
class Authenticated:
    """SASL succeeded for `jid` (a bare JID)."""

    jid: JID


@dataclass(frozen=True, slots=True)
class BindRequested:
    """The client asked to bind; `resource` is None when the server must pick one.

    Call `bind_result(full_jid)` (or `bind_refused`) next.
    """

    iq: Element
    resource: str | None


@dataclass(frozen=True, slots=True)
class StanzaReceived:
    """A stanza or nonza after the resource is bound, for the session to handle."""

    element: Element


@dataclass(frozen=True, slots=True)
class ResumeRequested:
    """XEP-0198 `<resume/>` before bind: try the handover, then call `resumed` or carry on."""

    element: Element


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The client closed its stream (`</stream:stream>`)."""


Action = (
    StartTls
    | LookupCredentials
    | CheckPassword
    | Authenticated
    | BindRequested
    | ResumeRequested
    | StanzaReceived
    | StreamEnded
)


@dataclass(frozen=True, slots=True)
class StreamStart:
    """Our stream header (TCP) or <open/> (WebSocket)."""

    from_: str
    id_: str
    lang: str


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """Our stream footer (TCP) or <close/> (WebSocket)."""


STREAM_END: Final = StreamEnd()
Output = Element | StreamStart | StreamEnd


def render_stream(units: list[Output]) -> bytes:
    """Output units as the bytes of a TCP stream."""
    parts: list[bytes] = []
    for unit in units:
        if isinstance(unit, Element):
            parts.append(serialize(unit))
        elif isinstance(unit, StreamStart):
            parts.append(stream_header(from_=unit.from_, id_=unit.id_, lang=unit.lang))
        else:
            parts.append(STREAM_FOOTER)
    return b"".join(parts)


def _new_stream_id() -> str:
    return secrets.token_urlsafe(12)


class C2SNegotiation:
    """The server side of one client stream's negotiation (see module docstring)."""

    def __init__(
        self,
        settings: NegotiationSettings,
        *,
        stream_id_factory: Callable[[], str] = _new_stream_id,
    ) -> None:
        self.settings = settings
        self.phase = Phase.WAIT_HEADER
        self.secure = settings.secure
        self.host: str | None = None
        self.lang = "en"
        self.stream_id: str | None = None
        self.jid: JID | None = None  # bare JID once authenticated
        self.full_jid: JID | None = None
        self.auth_failures = 0
        #: The username of the last failed SASL exchange, if it named one (the shell's
        #: lockout counts failures per account).
        self.failed_username: str | None = None
        self.mechanism: str | None = None  # the SASL mechanism that succeeded
        self._header_sent = False
        self._out: list[Output] = []
        self._new_id = stream_id_factory
        self._scram: ScramServer | None = None
        self._mechanism: str | None = None
        self._plain: tuple[str | None, str, str] | None = None
        self._awaiting_credentials = False

    # -- output ----------

    def take_output(self) -> list[Output]:
        """Everything queued since the last call, as units the transport renders (a TCP
        stream as bytes, WebSocket as RFC 7395 messages)."""
        out, self._out = self._out, []
        return out

    def data_to_send(self) -> bytes:
        """Everything queued since the last call, rendered for a TCP stream."""
        return render_stream(self.take_output())

    def send(self, element: Element) -> None:
        """Queue one element on this stream."""
        self._out.append(element)

    def queue_stream_error(
        self, condition: StreamErrorCondition, text: str | None = None, extra: object = None
    ) -> None:
        """Queue (our header if never sent,) the stream error and the end of the stream."""
        if not self._header_sent:
            self._send_header(self.host or next(iter(sorted(self.settings.hosts))))
        self.send(stream_error(condition, text, extra if isinstance(extra, Element) else None))
        self._out.append(STREAM_END)
        self.phase = Phase.CLOSED

    def queue_close(self) -> None:
        """Queue (our header if never sent and) the end of the stream: an orderly close."""
        if not self._header_sent:
            self._send_header(self.host or next(iter(sorted(self.settings.hosts))))
        self._out.append(STREAM_END)
        self.phase = Phase.CLOSED

    def stream_error_bytes(
        self, condition: StreamErrorCondition, text: str | None = None, extra: object = None
    ) -> bytes:
        """`queue_stream_error`, then everything queued as TCP bytes."""
        self.queue_stream_error(condition, text, extra)
        return self.data_to_send()

    def close_bytes(self) -> bytes:
        """`queue_close`, then everything queued as TCP bytes."""
        self.queue_close()
        return self.data_to_send()

    @property
    def is_established(self) -> bool:
        return self.phase is Phase.ESTABLISHED

    @property
    def is_authenticated(self) -> bool:
        return self.jid is not None

    # -- input ----------

    def receive(self, event: Event) -> list[Action]:
        """Handle one parser event.

        Raises:
            RemoteProtocolError: the stream must end with that condition.
        """
        if self.phase is Phase.CLOSED:
            return []
        if isinstance(event, StreamOpened):
            return self._on_header(event)
        if isinstance(event, StreamClosed):
            return [StreamEnded()]
        return self._on_element(event)

    def _on_header(self, event: StreamOpened) -> list[Action]:
        if self.phase is not Phase.WAIT_HEADER:
            raise RemoteProtocolError(StreamErrorCondition.NOT_WELL_FORMED, "unexpected header")
        to = event.attrs.get("to")
        requested_host: str | None = None
        if to is not None:
            try:
                to_jid = JID.parse(to)
            except JIDError:
                to_jid = None
            # RFC 6120 4.7.2: a client's 'to' is the bare domain of the service.
            if to_jid is not None and to_jid.local is None and to_jid.resource is None:
                requested_host = to_jid.domain
        # Answer with a header from the host asked for (or the first served) before any
        # stream error, RFC 6120 section 4.9.1.1.
        reply_host = requested_host if requested_host in self.settings.hosts else None
        self._send_header(self.host or reply_host or sorted(self.settings.hosts)[0])
        lang = event.attrs.get(XML_LANG)
        if lang:
            self.lang = lang

        if event.namespace != ns.STREAM or event.name != "stream":
            raise RemoteProtocolError(
                StreamErrorCondition.INVALID_NAMESPACE, "the root must be stream:stream"
            )
        if event.default_namespace != ns.CLIENT:
            raise RemoteProtocolError(
                StreamErrorCondition.INVALID_NAMESPACE,
                "the content namespace must be jabber:client",
            )
        version = event.attrs.get("version", "0.9")
        major, _, _minor = version.partition(".")
        if not major.isdigit() or int(major) != 1:
            raise RemoteProtocolError(
                StreamErrorCondition.UNSUPPORTED_VERSION, "this server speaks version 1.0"
            )
        if to is None:
            raise RemoteProtocolError(
                StreamErrorCondition.HOST_UNKNOWN, "the stream header must name a host in 'to'"
            )
        if requested_host is None or requested_host not in self.settings.hosts:
            raise RemoteProtocolError(StreamErrorCondition.HOST_UNKNOWN, "this host is not served")
        if self.host is not None and requested_host != self.host:
            raise RemoteProtocolError(
                StreamErrorCondition.HOST_UNKNOWN, "the host changed on a stream restart"
            )
        self.host = requested_host
        if self.jid is None:
            self.phase = Phase.FEATURES
            self.send(self._pre_auth_features())
        else:
            self.phase = Phase.WAIT_BIND
            self.send(self._post_auth_features())
        return []

    def _send_header(self, host: str) -> None:
        self.stream_id = self._new_id()
        self._out.append(StreamStart(host, self.stream_id, self.lang))
        self._header_sent = True

    def _mechanisms(self) -> list[str]:
        mechanisms = list(SCRAM_MECHANISMS)
        if self.secure or self.settings.plain_without_tls:
            mechanisms.append(PLAIN)
        return mechanisms

    def _tls_offered(self) -> bool:
        return self.settings.tls_available and not self.secure

    def _must_tls_first(self) -> bool:
        return self.settings.tls_required and not self.secure

    def _pre_auth_features(self) -> Element:
        children: list[Element | str] = []
        if self._tls_offered():
            required = [Element(ns.TLS, "required")] if self.settings.tls_required else []
            children.append(Element(ns.TLS, "starttls", None, required))
        # RFC 6120 section 5.3.1: with TLS mandatory, offer nothing else before it.
        if not self._must_tls_first():
            children.append(
                Element(
                    ns.SASL,
                    "mechanisms",
                    None,
                    [Element(ns.SASL, "mechanism", None, [m]) for m in self._mechanisms()],
                )
            )
        return Element(ns.STREAM, "features", None, children)

    def _post_auth_features(self) -> Element:
        return Element(
            ns.STREAM,
            "features",
            None,
            [
                Element(ns.BIND, "bind"),
                # RFC 6121 legacy session establishment: still answered, marked optional.
                Element(ns.SESSION, "session", None, [Element(ns.SESSION, "optional")]),
                *([Element(ns.SM, "sm")] if self.settings.stream_management else []),
            ],
        )

    def _on_element(self, event: ElementReceived) -> list[Action]:
        el = event.element
        phase = self.phase
        if phase is Phase.ESTABLISHED:
            return [StanzaReceived(el)]
        if phase is Phase.WAIT_HEADER or phase is Phase.TLS:
            raise RemoteProtocolError(
                StreamErrorCondition.NOT_AUTHORIZED, "element before the stream was (re)opened"
            )
        if el.namespace == ns.TLS and el.name == "starttls":
            return self._on_starttls()
        if el.namespace == ns.SASL:
            return self._on_sasl(el)
        if phase is Phase.WAIT_BIND and el.namespace == ns.CLIENT and el.name == "iq":
            return self._on_bind(el)
        if phase is Phase.WAIT_BIND and el.namespace == ns.SM and self.settings.stream_management:
            if el.name == "resume":
                return [ResumeRequested(el)]
            if el.name == "enable":
                # XEP-0198 section 3: enable only after binding a resource.
                self.send(
                    Element(
                        ns.SM,
                        "failed",
                        None,
                        [Element(ns.STANZAS_ERRORS, "unexpected-request")],
                    )
                )
                return []
        if phase is Phase.BINDING:
            raise RemoteProtocolError(
                StreamErrorCondition.POLICY_VIOLATION, "stanza sent while binding"
            )
        # RFC 6120 section 4.9.3.12: data before authentication (or, here, before a
        # resource is bound) is not processed.
        raise RemoteProtocolError(
            StreamErrorCondition.NOT_AUTHORIZED,
            "authenticate and bind a resource first"
            if self.jid is None
            else "bind a resource first",
        )

    # -- STARTTLS (RFC 6120 section 5) --------------------------------------------------------

    def _on_starttls(self) -> list[Action]:
        if self.phase is not Phase.FEATURES or not self._tls_offered():
            # RFC 6120 section 5.4.2.2: failure, then close.
            self.send(Element(ns.TLS, "failure"))
            raise RemoteProtocolError(
                StreamErrorCondition.POLICY_VIOLATION, "STARTTLS is not available now"
            )
        self.send(Element(ns.TLS, "proceed"))
        self.phase = Phase.TLS
        return [StartTls()]

    def tls_established(self) -> None:
        """The TLS handshake finished: expect a new stream header (the parser was reset)."""
        if self.phase is not Phase.TLS:
            raise LocalProtocolError(f"tls_established in phase {self.phase}")
        self.secure = True
        self.phase = Phase.WAIT_HEADER

    # -- SASL (RFC 6120 section 6) ----------------------------------------------------------

    def _on_sasl(self, el: Element) -> list[Action]:
        if self.jid is not None:
            raise RemoteProtocolError(
                StreamErrorCondition.POLICY_VIOLATION, "already authenticated"
            )
        if el.name == "abort":
            return self._sasl_fail(SaslCondition.ABORTED, count=False)
        if self._awaiting_credentials:
            raise RemoteProtocolError(
                StreamErrorCondition.POLICY_VIOLATION, "SASL data while credentials are checked"
            )
        if el.name == "auth":
            if self.phase is not Phase.FEATURES:
                return self._sasl_fail(SaslCondition.MALFORMED_REQUEST, "an exchange is running")
            return self._on_auth(el)
        if el.name == "response":
            if self.phase is not Phase.SASL:
                return self._sasl_fail(SaslCondition.MALFORMED_REQUEST, "no exchange is running")
            return self._on_response(el)
        return self._sasl_fail(SaslCondition.MALFORMED_REQUEST, f"unexpected <{el.name}/>")

    def _on_auth(self, el: Element) -> list[Action]:
        mechanism = el.get("mechanism") or ""
        if self._must_tls_first():
            return self._sasl_fail(
                SaslCondition.ENCRYPTION_REQUIRED, "negotiate STARTTLS first", count=False
            )
        if mechanism not in self._mechanisms():
            if mechanism == PLAIN:
                return self._sasl_fail(
                    SaslCondition.ENCRYPTION_REQUIRED, "PLAIN needs TLS", count=False
                )
            return self._sasl_fail(SaslCondition.INVALID_MECHANISM, count=False)
        self._mechanism = mechanism
        self.phase = Phase.SASL
        data = _decode_sasl(el.text)
        if isinstance(data, AuthFailure):
            return self._sasl_fail(data.condition, data.text)
        if data is None:
            # No initial response: ask for it with an empty challenge (RFC 6120 6.4.2).
            self.send(Element(ns.SASL, "challenge"))
            return []
        return self._sasl_step(data)

    def _on_response(self, el: Element) -> list[Action]:
        data = _decode_sasl(el.text)
        if isinstance(data, AuthFailure):
            return self._sasl_fail(data.condition, data.text)
        return self._sasl_step(data or b"")

    def _sasl_step(self, data: bytes) -> list[Action]:
        assert self.host is not None  # the header named it
        try:
            if self._mechanism == PLAIN:
                authzid, authcid, password = parse_plain(data)
                username = self._normalise_username(authcid)
                self._check_authzid(authzid, username)
                self._plain = (authzid, username, "")
                self._awaiting_credentials = True
                return [CheckPassword(self.host, username, password)]
            if self._scram is None:
                assert self._mechanism is not None
                self._scram = ScramServer(SCRAM_MECHANISMS[self._mechanism])
                username = self._normalise_username(self._scram.client_first(data))
                self._check_authzid(self._scram.authzid, username)
                self._plain = (None, username, "")
                self._awaiting_credentials = True
                return [LookupCredentials(self.host, username, SCRAM_MECHANISMS[self._mechanism])]
            server_final = self._scram.client_final(data)
        except AuthFailure as failure:
            return self._sasl_fail(failure.condition, failure.text)
        return self._sasl_success(server_final)

    def password_checked(self, is_valid: bool) -> list[Action]:
        """Finish a PLAIN exchange with the shell's verdict on `CheckPassword`."""
        if not self._awaiting_credentials or self._mechanism != PLAIN:
            raise LocalProtocolError("password_checked without a CheckPassword")
        self._awaiting_credentials = False
        if not is_valid:
            return self._sasl_fail(SaslCondition.NOT_AUTHORIZED)
        return self._sasl_success(None)

    def refuse_credentials(self, text: str) -> list[Action]:
        """Answer the exchange waiting for `LookupCredentials` or `CheckPassword` with
        `temporary-auth-failure` without checking anything (the shell's lockout after
        repeated failures); it counts as a failed attempt."""
        if not self._awaiting_credentials:
            raise LocalProtocolError("refuse_credentials without a pending exchange")
        self._awaiting_credentials = False
        return self._sasl_fail(SaslCondition.TEMPORARY_AUTH_FAILURE, text)

    def provide_credentials(self, creds: ScramCredentials | None) -> list[Action]:
        """Continue a SCRAM exchange with the stored credentials (None: no such account)."""
        if not self._awaiting_credentials or self._scram is None:
            raise LocalProtocolError("provide_credentials without a LookupCredentials")
        self._awaiting_credentials = False
        # An unknown user gets a plausible challenge and fails at the last step, so the
        # answer does not reveal which accounts exist.
        challenge = self._scram.server_first(creds)
        self.send(Element(ns.SASL, "challenge", None, [base64.b64encode(challenge).decode()]))
        return []

    def _normalise_username(self, raw: str) -> str:
        assert self.host is not None
        try:
            local = JID.make(raw, self.host).local
        except JIDError as exc:
            raise AuthFailure(SaslCondition.NOT_AUTHORIZED, "no such account") from exc
        assert local is not None
        return local

    def _check_authzid(self, authzid: str | None, username: str) -> None:
        if not authzid:
            return
        assert self.host is not None
        try:
            wanted = JID.parse(authzid)
        except JIDError as exc:
            raise AuthFailure(SaslCondition.INVALID_AUTHZID) from exc
        if wanted != JID.make(username, self.host):
            raise AuthFailure(SaslCondition.INVALID_AUTHZID, "cannot act as another user")

    def _sasl_success(self, additional: bytes | None) -> list[Action]:
        assert self.host is not None and self._plain is not None
        username = self._plain[1]
        text = [base64.b64encode(additional).decode()] if additional else []
        self.send(Element(ns.SASL, "success", None, text))
        self.jid = JID.make(username, self.host)
        self.mechanism = self._mechanism
        self._reset_sasl()
        # Stream restart (RFC 6120 section 6.4.6): the shell resets its parser.
        self.phase = Phase.WAIT_HEADER
        return [Authenticated(self.jid)]

    def _sasl_fail(
        self, condition: SaslCondition, text: str | None = None, *, count: bool = True
    ) -> list[Action]:
        self.failed_username = self._plain[1] if self._plain else None
        self._reset_sasl()
        self.send(sasl_failure(condition, text))
        self.phase = Phase.FEATURES
        if count and condition is not SaslCondition.ABORTED:
            self.auth_failures += 1
            if self.auth_failures >= self.settings.max_auth_failures:
                raise RemoteProtocolError(
                    StreamErrorCondition.POLICY_VIOLATION,
                    "too many failed authentication attempts",
                )
        return []

    def _reset_sasl(self) -> None:
        self._scram = None
        self._mechanism = None
        self._plain = None
        self._awaiting_credentials = False

    # -- resource binding (RFC 6120 section 7) ---------------------------------------------------

    def _on_bind(self, iq: Element) -> list[Action]:
        assert self.jid is not None
        bind = iq.find(ns.BIND, "bind")
        if bind is None or iq.get("type") != "set":
            raise RemoteProtocolError(StreamErrorCondition.NOT_AUTHORIZED, "bind a resource first")
        resource = (bind.find_text(ns.BIND, "resource") or "").strip()
        if not resource:
            self.phase = Phase.BINDING
            return [BindRequested(iq, None)]
        try:
            full = self.jid.with_resource(resource)
        except JIDError:
            # RFC 6120 section 7.7.2.1: a resource that cannot be processed.
            self.send(error_reply(iq, StanzaErrorCondition.BAD_REQUEST, text="invalid resource"))
            return []
        self.phase = Phase.BINDING
        return [BindRequested(iq, full.resource)]

    def bind_result(self, iq: Element, full_jid: JID) -> None:
        """Answer the bind request with `full_jid`; the session is established."""
        if self.phase is not Phase.BINDING:
            raise LocalProtocolError(f"bind_result in phase {self.phase}")
        payload = Element(ns.BIND, "bind", None, [Element(ns.BIND, "jid", None, [str(full_jid)])])
        reply_attrs = {"type": "result"}
        iq_id = iq.get("id")
        if iq_id is not None:
            reply_attrs["id"] = iq_id
        self.send(Element(ns.CLIENT, "iq", reply_attrs, [payload]))
        self.full_jid = full_jid
        self.phase = Phase.ESTABLISHED

    def resumed(self, full_jid: JID) -> None:
        """A `<resume/>` on this stream succeeded: the stream now serves that session."""
        if self.phase is not Phase.WAIT_BIND:
            raise LocalProtocolError(f"resumed in phase {self.phase}")
        self.full_jid = full_jid
        self.phase = Phase.ESTABLISHED

    def bind_refused(self, iq: Element, condition: StanzaErrorCondition, text: str) -> None:
        """Refuse the bind request; the client may try again."""
        if self.phase is not Phase.BINDING:
            raise LocalProtocolError(f"bind_refused in phase {self.phase}")
        self.send(error_reply(iq, condition, text=text))
        self.phase = Phase.WAIT_BIND


def _decode_sasl(text: str) -> bytes | AuthFailure | None:
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
