"""C2S stream negotiation (RFC 6120 sections 4-7), sans-I/O.

Theory of operation
-------------------
`C2SNegotiation` is fed parser events (`receive`) and returns actions for the I/O shell;
the units to write accumulate in an outbound buffer read with `take_output()`. It owns
the `c2s_unauthed` -> `c2s` progression of one connection:

    WAIT_HEADER --header--> FEATURES --<starttls/>--> TLS (shell upgrades, calls
    tls_established(), parser reset) --> WAIT_HEADER ...
    FEATURES --<auth/>--> SASL (LookupCredentials; shell calls provide_credentials())
        --success--> WAIT_HEADER (restart, authenticated) --header--> WAIT_BIND
    WAIT_BIND --bind iq--> BINDING (BindRequested; shell calls bind_result()) --> ESTABLISHED

Only `restart` after STARTTLS / SASL success rewinds to WAIT_HEADER. Stream-level faults
raise `RemoteProtocolError`; the shell then writes `queue_stream_error()`'s output (which sends our
stream header first when none was sent yet, RFC 6120 section 4.9.1.1) and closes. SASL
faults are `<failure/>` answers and the stream goes on, until `max_auth_failures` is
exceeded (RFC 6120 section 6.4.5), which ends the stream with `policy-violation`.

This module owns the phases, the outbound buffer and the actions; two helpers own the
details. `gateway.xmpp.stream_opening` checks each stream header and builds the features
that answer it. `gateway.xmpp.sasl_exchange` runs the SASL exchanges while the phase is
FEATURES or SASL: it returns a step (send a challenge, look credentials up, succeed, fail)
that `_sasl_step` turns into output, a phase and the shell's action.

In ESTABLISHED the shell handles stanzas itself; `receive` is only needed there for the
stream close and for nonzas.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from gateway.errors import (
    JIDError,
    LocalProtocolError,
    RemoteProtocolError,
    StanzaErrorCondition,
    StreamErrorCondition,
)
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import XML_LANG, Element
from gateway.xmpp.jid import JID
from gateway.xmpp.parser import ElementReceived, Event, StreamClosed, StreamOpened
from gateway.xmpp.sasl import ScramCredentials
from gateway.xmpp.sasl_exchange import (
    CheckPassword,
    LookupCredentials,
    SaslExchange,
    SaslFailed,
    SaslReply,
    SaslStep,
    SaslSucceeded,
    offered_mechanisms,
)
from gateway.xmpp.serializer import STREAM_FOOTER, serialize, stream_header
from gateway.xmpp.stanza import error_reply, stream_error
from gateway.xmpp.stream_opening import (
    check_header,
    post_auth_features,
    pre_auth_features,
    requested_host,
)


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
    """`<proceed/>` is in the outbound buffer: write it out, then do the TLS handshake."""


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
class ResumeRequested:
    """XEP-0198 `<resume/>` before bind: try the loan, then call `resumed` or carry on."""

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
        self.mechanism: str | None = None  # the SASL mechanism that succeeded
        self._header_sent = False
        self._out: list[Output] = []
        self._new_id = stream_id_factory
        self._sasl = SaslExchange(settings.max_auth_failures)

    # -- output ----------

    def take_output(self) -> list[Output]:
        """Everything queued since the last call, as units the transport renders (a TCP
        stream as bytes, WebSocket as RFC 7395 messages)."""
        out, self._out = self._out, []
        return out

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

    @property
    def is_established(self) -> bool:
        return self.phase is Phase.ESTABLISHED

    @property
    def is_authenticated(self) -> bool:
        return self.jid is not None

    @property
    def auth_failures(self) -> int:
        """Failed SASL attempts on this stream."""
        return self._sasl.failures

    @property
    def exchange_username(self) -> str | None:
        """The username of the SASL exchange in progress, once the client named it (the
        shell's lockout asks again before each step of it)."""
        return self._sasl.username

    @property
    def failed_username(self) -> str | None:
        """The username of the last failed SASL exchange, if it named one (the shell's
        lockout counts failures per account)."""
        return self._sasl.failed_username

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
        requested = requested_host(event.attrs.get("to"))
        # Answer with a header from the host asked for (or the first served) before any
        # stream error, RFC 6120 section 4.9.1.1.
        reply_host = requested if requested in self.settings.hosts else None
        self._send_header(self.host or reply_host or sorted(self.settings.hosts)[0])
        lang = event.attrs.get(XML_LANG)
        if lang:
            self.lang = lang
        self.host = check_header(event, requested, self.settings.hosts, self.host)
        if self.jid is None:
            self.phase = Phase.FEATURES
            tls_first = self._must_tls_first()
            mechanisms = self._mechanisms()
            self.send(
                pre_auth_features(
                    starttls=self._tls_offered(), tls_first=tls_first, mechanisms=mechanisms
                )
            )
        else:
            self.phase = Phase.WAIT_BIND
            self.send(post_auth_features(stream_management=self.settings.stream_management))
        return []

    def _send_header(self, host: str) -> None:
        self.stream_id = self._new_id()
        self._out.append(StreamStart(host, self.stream_id, self.lang))
        self._header_sent = True

    def _mechanisms(self) -> list[str]:
        return offered_mechanisms(allow_plain=self.secure or self.settings.plain_without_tls)

    def _tls_offered(self) -> bool:
        return self.settings.tls_available and not self.secure

    def _must_tls_first(self) -> bool:
        return self.settings.tls_required and not self.secure

    def _on_element(self, event: ElementReceived) -> list[Action]:
        el = event.element
        phase = self.phase
        if phase is Phase.ESTABLISHED:
            raise LocalProtocolError("the stream is established: elements go to the session")
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

    # -- SASL (RFC 6120 section 6): the exchange itself is gateway.xmpp.sasl_exchange -------

    def _on_sasl(self, el: Element) -> list[Action]:
        if self.jid is not None:
            raise RemoteProtocolError(
                StreamErrorCondition.POLICY_VIOLATION, "already authenticated"
            )
        assert self.host is not None  # the header named it
        tls_first = self._must_tls_first()
        return self._sasl_step(
            self._sasl.receive(el, self.host, self._mechanisms(), tls_first=tls_first)
        )

    def password_checked(self, is_valid: bool) -> list[Action]:
        """Finish a PLAIN exchange with the shell's verdict on `CheckPassword`."""
        return self._sasl_step(self._sasl.password_checked(is_valid))

    def refuse_credentials(self, text: str) -> list[Action]:
        """Answer the exchange in progress (waiting for `LookupCredentials` or
        `CheckPassword`, or for the client's next step) with `temporary-auth-failure`
        without checking anything (the shell's lockout after repeated failures); it counts
        as a failed attempt."""
        return self._sasl_step(self._sasl.refuse(text))

    def provide_credentials(self, creds: ScramCredentials | None) -> list[Action]:
        """Continue a SCRAM exchange with the stored credentials (None: no such account)."""
        return self._sasl_step(self._sasl.provide_credentials(creds))

    def _sasl_step(self, step: SaslStep) -> list[Action]:
        assert self.host is not None
        match step:
            case SaslReply(element):
                self.send(element)
                self.phase = Phase.SASL
                return []
            case LookupCredentials() | CheckPassword():
                self.phase = Phase.SASL
                return [step]
            case SaslSucceeded(element, username, mechanism):
                self.send(element)
                self.jid = JID.make(username, self.host)
                self.mechanism = mechanism
                # Stream restart (RFC 6120 section 6.4.6): the shell resets its parser.
                self.phase = Phase.WAIT_HEADER
                return [Authenticated(self.jid)]
            case SaslFailed(element, is_fatal):
                self.send(element)
                self.phase = Phase.FEATURES
                if is_fatal:
                    raise RemoteProtocolError(
                        StreamErrorCondition.POLICY_VIOLATION,
                        "too many failed authentication attempts",
                    )
                return []

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
