"""What a c2s stream (re)opening is checked against and answered with (RFC 6120 4.3, 4.7).

Pure functions for `C2SNegotiation` (gateway.xmpp.negotiation), which calls them each time
the client sends a stream header (at the start, after STARTTLS, after SASL success):
`requested_host` and `check_header` judge the header, `pre_auth_features` and
`post_auth_features` build the `<stream:features/>` that follows our own header. Which
answer applies, and when, is the negotiation's business.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.errors import JIDError, RemoteProtocolError, StreamErrorCondition
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID
from gateway.xmpp.parser import StreamOpened


def requested_host(to: str | None) -> str | None:
    """The host a client's stream header asks for: its 'to' when that is a bare domain
    (RFC 6120 4.7.2), else None."""
    if to is None:
        return None
    try:
        to_jid = JID.parse(to)
    except JIDError:
        return None
    if to_jid.local is None and to_jid.resource is None:
        return to_jid.domain
    return None


def check_header(
    header: StreamOpened, requested: str | None, hosts: frozenset[str], host: str | None
) -> str:
    """Check a client's stream header (RFC 6120 4.7, 4.8, 4.9.3).

    Args:
        header: the header.
        requested: `requested_host` of its 'to'.
        hosts: the domains served.
        host: the stream's host when this is a restart, else None.

    Returns:
        The stream's host.

    Raises:
        RemoteProtocolError: `invalid-namespace`, `unsupported-version` or `host-unknown`.
    """
    if header.namespace != ns.STREAM or header.name != "stream":
        raise RemoteProtocolError(
            StreamErrorCondition.INVALID_NAMESPACE, "the root must be stream:stream"
        )
    if header.default_namespace != ns.CLIENT:
        raise RemoteProtocolError(
            StreamErrorCondition.INVALID_NAMESPACE,
            "the content namespace must be jabber:client",
        )
    version = header.attrs.get("version", "0.9")
    major, _, _minor = version.partition(".")
    if not major.isdigit() or int(major) != 1:
        raise RemoteProtocolError(
            StreamErrorCondition.UNSUPPORTED_VERSION, "this server speaks version 1.0"
        )
    if header.attrs.get("to") is None:
        raise RemoteProtocolError(
            StreamErrorCondition.HOST_UNKNOWN, "the stream header must name a host in 'to'"
        )
    if requested is None or requested not in hosts:
        raise RemoteProtocolError(StreamErrorCondition.HOST_UNKNOWN, "this host is not served")
    if host is not None and requested != host:
        raise RemoteProtocolError(
            StreamErrorCondition.HOST_UNKNOWN, "the host changed on a stream restart"
        )
    return requested


def pre_auth_features(*, starttls: bool, tls_first: bool, mechanisms: Sequence[str]) -> Element:
    """The features before authentication (RFC 6120 5.3.1, 6.3.1).

    Args:
        starttls: offer STARTTLS.
        tls_first: STARTTLS is required before SASL: marked `<required/>`, and no SASL
            mechanisms are offered yet (RFC 6120 section 5.3.1).
        mechanisms: the SASL mechanisms to offer.
    """
    children: list[Element | str] = []
    if starttls:
        required = [Element(ns.TLS, "required")] if tls_first else []
        children.append(Element(ns.TLS, "starttls", None, required))
    if not tls_first:
        children.append(
            Element(
                ns.SASL,
                "mechanisms",
                None,
                [Element(ns.SASL, "mechanism", None, [m]) for m in mechanisms],
            )
        )
    return Element(ns.STREAM, "features", None, children)


def post_auth_features(*, stream_management: bool) -> Element:
    """The features after authentication: bind (RFC 6120 7.2), session, XEP-0198 `<sm/>`."""
    return Element(
        ns.STREAM,
        "features",
        None,
        [
            Element(ns.BIND, "bind"),
            # RFC 6121 legacy session establishment: still answered, marked optional.
            Element(ns.SESSION, "session", None, [Element(ns.SESSION, "optional")]),
            *([Element(ns.SM, "sm")] if stream_management else []),
        ],
    )
