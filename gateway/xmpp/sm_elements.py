"""The XEP-0198 elements (v1.6, namespace urn:xmpp:sm:3): reading what a client sends
(`<enable/>`, `<resume/>`, `<a/>`) and building what the server sends (`<sm/>`,
`<enabled/>`, `<resumed/>`, `<failed/>`, `<r/>`, `<a/>`), with the `<failed/>`
conditions; sans-I/O. Values follow the schema of section 12: h is an xs:unsignedInt,
`max` an xs:positiveInteger, `resume` an xs:boolean. What the elements mean for a
session is `gateway.xmpp.sm`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Final

from gateway.errors import (
    GatewayError,
    LocalProtocolError,
    RemoteProtocolError,
    StreamErrorCondition,
)
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import XML_LANG, Element

#: The largest h (xs:unsignedInt); h arithmetic wraps after it (gateway.xmpp.sm).
H_MAX: Final = 2**32 - 1
#: XML whitespace, removed around attribute values by the xs:* whiteSpace facet "collapse".
_XML_SPACE: Final = " \t\n\r"
#: xs:unsignedInt / xs:positiveInteger lexical form: an optional "+" and ASCII digits.
_DIGITS: Final = re.compile(r"\+?[0-9]+")
#: xs:boolean lexical space (XML Schema part 2, section 3.2.2); `resume` uses it (s3).
_BOOLEANS: Final = {"true": True, "1": True, "false": False, "0": False}
#: `<r/>` never changes, and Elements are immutable: one shared instance.
_ACK_REQUEST: Final = Element(ns.SM, "r")


class SmCondition(enum.Enum):
    """Conditions of `<failed/>`; values are RFC 6120 stanza error names (XEP-0198 s6)."""

    #: A malformed `<enable/>` or `<resume/>` (bad `max`, `resume`, `h`, missing `previd`).
    BAD_REQUEST = "bad-request"
    #: `<resume/>` where resumption is not offered (section 5).
    FEATURE_NOT_IMPLEMENTED = "feature-not-implemented"
    #: The server failed while answering (e.g. a storage error during a lookup).
    INTERNAL_SERVER_ERROR = "internal-server-error"
    #: `previd` unknown, expired, not resumable any more, or another user's (section 5).
    ITEM_NOT_FOUND = "item-not-found"
    #: No room to keep another resumable session.
    RESOURCE_CONSTRAINT = "resource-constraint"
    #: `<enable/>` before bind or twice, `<resume/>` after bind (sections 3, 6).
    UNEXPECTED_REQUEST = "unexpected-request"


class SmError(GatewayError):
    """An `<enable/>` or `<resume/>` is refused: answered with `failed(condition, h, text)`.

    Args:
        condition: the `<failed/>` condition.
        h: the server's h to report (section 5: known for a timed-out session), or None.
        text: an optional human-readable `<text/>`.
    """

    def __init__(
        self, condition: SmCondition, h: int | None = None, text: str | None = None
    ) -> None:
        super().__init__(f"{condition.value}: {text}" if text else condition.value)
        self.condition = condition
        self.h = h
        self.text = text


@dataclass(frozen=True, slots=True)
class EnableRequest:
    """A parsed `<enable/>` (XEP-0198 section 3)."""

    resume: bool
    """The client asks for a resumable stream."""
    max: int | None
    """The client's preferred maximum resumption time in seconds, when given."""


@dataclass(frozen=True, slots=True)
class ResumeRequest:
    """A parsed `<resume/>` (XEP-0198 section 5)."""

    previd: str
    """The SM-ID of the stream to resume."""
    h: int
    """The client's h: the last stanza it handled on the old stream."""


def _expect(el: Element, name: str) -> None:
    if el.namespace != ns.SM or el.name != name:
        raise LocalProtocolError(f"expected <{name} xmlns='{ns.SM}'/>, got {el.tag!r}")


def _parse_unsigned(value: str | None) -> int | None:
    """An xs:unsignedInt-style attribute value, or None when it is not one (any size)."""
    if value is None:
        return None
    value = value.strip(_XML_SPACE)
    if _DIGITS.fullmatch(value) is None:
        return None
    try:
        return int(value)
    except ValueError:  # more digits than int() accepts: no h or max is that long
        return None


def _parse_h(value: str | None) -> int | None:
    """An `h` attribute (xs:unsignedInt, 0 .. 2**32-1), or None when invalid."""
    h = _parse_unsigned(value)
    return h if h is not None and h <= H_MAX else None


def check_h(h: int) -> None:
    """Refuse an h outside 0 .. 2**32-1 (a caller's bug: h values are always reduced).

    Raises:
        ValueError: out of range.
    """
    if not 0 <= h <= H_MAX:
        raise ValueError(f"h must be in 0..2**32-1, got {h!r}")


def parse_enable(el: Element) -> EnableRequest:
    """Read `<enable resume? max?/>` (XEP-0198 sections 3, 5; schema in section 12).

    Args:
        el: the `<enable/>` element.

    Returns:
        The request; `resume` defaults to False.

    Raises:
        SmError: BAD_REQUEST when `resume` is not an xs:boolean ("true", "1", "false", "0")
            or `max` is not a positive integer.
        LocalProtocolError: `el` is not an `<enable/>` in urn:xmpp:sm:3.
    """
    _expect(el, "enable")
    raw_resume = el.get("resume")
    resume = False
    if raw_resume is not None:
        parsed = _BOOLEANS.get(raw_resume.strip(_XML_SPACE))
        if parsed is None:
            raise SmError(SmCondition.BAD_REQUEST, text="'resume' must be true or false")
        resume = parsed
    raw_max = el.get("max")
    max_ = None
    if raw_max is not None:
        max_ = _parse_unsigned(raw_max)
        if max_ is None or max_ < 1:  # xs:positiveInteger
            raise SmError(SmCondition.BAD_REQUEST, text="'max' must be a positive integer")
    return EnableRequest(resume=resume, max=max_)


def parse_resume(el: Element) -> ResumeRequest:
    """Read `<resume previd h/>` (XEP-0198 section 5).

    Args:
        el: the `<resume/>` element.

    Returns:
        The request.

    Raises:
        SmError: BAD_REQUEST when `previd` is missing or empty, or `h` is missing or not
            an unsigned 32-bit integer.
        LocalProtocolError: `el` is not a `<resume/>` in urn:xmpp:sm:3.
    """
    _expect(el, "resume")
    previd = el.get("previd")
    if not previd:
        raise SmError(SmCondition.BAD_REQUEST, text="'previd' is required")
    h = _parse_h(el.get("h"))
    if h is None:
        raise SmError(SmCondition.BAD_REQUEST, text="'h' must be an unsigned 32-bit integer")
    return ResumeRequest(previd=previd, h=h)


def parse_ack(el: Element) -> int:
    """Read the client's `<a h/>` (XEP-0198 section 4: "MUST possess an 'h' attribute").

    `<failed/>` only answers `<enable/>` and `<resume/>` (section 6), so a broken `<a/>`
    is a stream error. We follow MongooseIM (`handle_a`): `policy-violation`, "Invalid h
    attribute".

    Args:
        el: the `<a/>` element.

    Returns:
        h, in 0 .. 2**32-1.

    Raises:
        RemoteProtocolError: POLICY_VIOLATION when `h` is missing or not an unsigned
            32-bit integer.
        LocalProtocolError: `el` is not an `<a/>` in urn:xmpp:sm:3.
    """
    _expect(el, "a")
    h = _parse_h(el.get("h"))
    if h is None:
        raise RemoteProtocolError(StreamErrorCondition.POLICY_VIOLATION, "Invalid h attribute")
    return h


# -- builders (all in urn:xmpp:sm:3) -----------------------------------------------------


def sm_feature() -> Element:
    """`<sm xmlns='urn:xmpp:sm:3'/>` for the stream features (XEP-0198 section 2)."""
    return Element(ns.SM, "sm")


def enabled(smid: str | None, max_: int | None) -> Element:
    """`<enabled/>` (XEP-0198 section 3), resumable when `smid` is given (section 5).

    Args:
        smid: the SM-ID; None for a stream that cannot be resumed.
        max_: the granted resumption time in seconds (only with `smid`), or None.

    Returns:
        `<enabled id=smid resume='true' max=max_/>`, or a bare `<enabled/>` without `smid`.

    Raises:
        ValueError: `max_` without `smid`, or `max_` not positive.
    """
    if smid is None:
        if max_ is not None:
            raise ValueError("max is only sent for a resumable stream")
        return Element(ns.SM, "enabled")
    attrs = {"id": smid, "resume": "true"}
    if max_ is not None:
        if max_ < 1:
            raise ValueError(f"max must be positive, got {max_!r}")
        attrs["max"] = str(max_)
    return Element(ns.SM, "enabled", attrs)


def resumed(previd: str, h: int) -> Element:
    """`<resumed previd h/>` with the server's h (XEP-0198 section 5)."""
    check_h(h)
    return Element(ns.SM, "resumed", {"previd": previd, "h": str(h)})


def failed(
    condition: SmCondition | None = None, h: int | None = None, text: str | None = None
) -> Element:
    """`<failed h?>` with a stanza error condition (XEP-0198 sections 5, 6).

    Args:
        condition: the condition child (urn:ietf:params:xml:ns:xmpp-stanzas), if any.
        h: the server's h, for a session that can no longer be resumed (section 5).
        text: a `<text xml:lang='en'/>` after the condition; needs `condition`.

    Returns:
        The element.

    Raises:
        ValueError: `text` without `condition`, or `h` out of range.
    """
    attrs: dict[str, str] = {}
    if h is not None:
        check_h(h)
        attrs["h"] = str(h)
    children: list[Element | str] = []
    if condition is not None:
        children.append(Element(ns.STANZAS_ERRORS, condition.value))
        if text:
            children.append(Element(ns.STANZAS_ERRORS, "text", {XML_LANG: "en"}, [text]))
    elif text:
        raise ValueError("a <failed/> text needs a condition")
    return Element(ns.SM, "failed", attrs, children)


def ack_request() -> Element:
    """`<r/>`: ask the client for an ack (XEP-0198 section 4)."""
    return _ACK_REQUEST


def ack_answer(h: int) -> Element:
    """`<a h/>` with the server's h (XEP-0198 section 4)."""
    check_h(h)
    return Element(ns.SM, "a", {"h": str(h)})


def handled_count_too_high(h: int, send_count: int) -> Element:
    """The `<handled-count-too-high h send-count/>` child of the section 6 stream error.

    It goes into `<stream:error>` after `<undefined-condition/>`.
    """
    check_h(h)
    check_h(send_count)
    return Element(ns.SM, "handled-count-too-high", {"h": str(h), "send-count": str(send_count)})
