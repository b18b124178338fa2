"""Immutable XMPP addresses (RFC 7622).

A `JID` is `[localpart@]domainpart[/resourcepart]`. `JID.parse` splits a string as RFC 7622
section 3.1 says (the resourcepart starts at the first `/`; the localpart ends at the first
`@` before it) and enforces each part:

- localpart: PRECIS `UsernameCaseMapped` (RFC 8265 section 3.3) and none of the characters
  that RFC 7622 section 3.3.1 excludes: `" & ' / : < > @`.
- domainpart (RFC 7622 section 3.2): one trailing dot is stripped; the RFC 5895 mappings
  (lowercase, full-/half-width to their decompositions, NFC) are applied; every label must be
  an NR-LDH label or an IDNA2008 U-label, at most 63 octets in its A-label form. A-labels
  (`xn--...`) are converted to U-labels, as section 3.2.2 requires, so that one address has one
  spelling. IPv4 literals (they are LDH labels) and `[IPv6]` literals are allowed; IPv6 literals
  are written in their RFC 5952 canonical form.
- resourcepart: PRECIS `OpaqueString` (RFC 8265 section 4.2).

Each part is 1 to 1023 octets of UTF-8 once enforced (RFC 7622 sections 3.2-3.4); an empty
localpart or resourcepart after `@` or `/` is an error.

Every stanza's `to` and `from` goes through `JID.parse`, so results (and the reasons for
refusals) are kept in bounded LRU caches keyed by the input string. Only short strings are
cached, so an attacker cannot fill the cache with big ones.

The constructor does not validate: build JIDs with `parse` or `make`, never `JID(...)`, unless
the parts come from another `JID`.
"""

from __future__ import annotations

import functools
import ipaddress
import unicodedata
from dataclasses import dataclass
from typing import Final

import idna
import precis_i18n

from gateway.errors import JIDError

#: RFC 7622 sections 3.2-3.4: each part is at most 1023 octets of UTF-8.
MAX_PART_BYTES: Final = 1023
#: Inputs longer than this (in code points) are refused before any Unicode work. Three
#: maximal parts and two separators are 3071 octets; PRECIS/NFC can shrink a string, so allow
#: slack, but no more.
_MAX_INPUT_CHARS: Final = 2 * (3 * MAX_PART_BYTES + 2)
#: Only strings up to this length go through the caches (bounds their memory to a few MiB).
_MAX_CACHED_CHARS: Final = 256
_CACHE_SIZE: Final = 4096

#: RFC 7622 section 3.3.1: characters a localpart must not contain.
_LOCAL_EXCLUDED: Final = frozenset("\"&'/:<>@")
#: ASCII allowed in a domain label: LDH plus "_" (COMPAT: Prosody and ejabberd accept
#: underscores, which some internal and component hostnames use).
_ASCII_LABEL_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")
_MAX_LABEL_BYTES: Final = 63

_USERNAME: Final = precis_i18n.get_profile("UsernameCaseMapped")
_OPAQUE: Final = precis_i18n.get_profile("OpaqueString")


@dataclass(frozen=True, slots=True)
class JID:
    """An XMPP address; immutable, hashable, compared part by part.

    Attributes:
        local: the localpart, or None.
        domain: the domainpart (never empty).
        resource: the resourcepart, or None.
    """

    local: str | None
    domain: str
    resource: str | None

    @classmethod
    def parse(cls, text: str) -> JID:
        """Parse and normalise a JID string.

        Args:
            text: e.g. `juliet@example.com/balcony`.

        Returns:
            The normalised JID; equal inputs give the same (cached) object.

        Raises:
            JIDError: the string is not a valid JID; the message gives the reason.
        """
        result = _parse(text) if len(text) > _MAX_CACHED_CHARS else _parse_cached(text)
        if isinstance(result, _Refused):
            raise JIDError(result.reason)
        return result

    @classmethod
    def make(cls, local: str | None, domain: str, resource: str | None = None) -> JID:
        """Build a JID from its parts, validating and normalising each.

        Args:
            local: the localpart, or None for a domain JID.
            domain: the domainpart.
            resource: the resourcepart, or None for a bare JID.

        Raises:
            JIDError: a part is invalid.
        """
        return JID(
            None if local is None else _checked(_prep_local(local)),
            _checked(_prep_domain(domain)),
            None if resource is None else _checked(_prep_resource(resource)),
        )

    def bare(self) -> JID:
        """This JID without its resourcepart."""
        if self.resource is None:
            return self
        return JID(self.local, self.domain, None)

    def with_resource(self, resource: str) -> JID:
        """This JID with another resourcepart (validated and normalised).

        Raises:
            JIDError: the resourcepart is invalid.
        """
        return JID(self.local, self.domain, _checked(_prep_resource(resource)))

    @property
    def is_bare(self) -> bool:
        """True when there is no resourcepart."""
        return self.resource is None

    def __str__(self) -> str:
        text = self.domain if self.local is None else f"{self.local}@{self.domain}"
        return text if self.resource is None else f"{text}/{self.resource}"


@dataclass(frozen=True, slots=True)
class _Refused:
    """Why a part or a JID was refused; cached like a success, raised as `JIDError`."""

    reason: str


def _checked(result: str | _Refused) -> str:
    if isinstance(result, _Refused):
        raise JIDError(result.reason)
    return result


def _parse(text: str) -> JID | _Refused:
    """Parse `text`; return the JID or the reason it is refused (so refusals cache too)."""
    if len(text) > _MAX_INPUT_CHARS:
        return _Refused("JID is too long")
    # RFC 7622 section 3.1: the resourcepart is everything after the first "/", and the
    # localpart everything before the first "@" that comes before it.
    rest, slash, resource_text = text.partition("/")
    local_text, at, domain_text = rest.partition("@")
    if not at:
        local_text, domain_text = "", rest
    local: str | None = None
    if at:
        if not local_text:
            return _Refused("empty localpart")
        prepared = _prep_local(local_text)
        if isinstance(prepared, _Refused):
            return prepared
        local = prepared
    domain = _prep_domain(domain_text)
    if isinstance(domain, _Refused):
        return domain
    resource: str | None = None
    if slash:
        if not resource_text:
            return _Refused("empty resourcepart")
        prepared = _prep_resource(resource_text)
        if isinstance(prepared, _Refused):
            return prepared
        resource = prepared
    return JID(local, domain, resource)


_parse_cached = functools.lru_cache(maxsize=_CACHE_SIZE)(_parse)


def _check_length(part: str, what: str) -> str | _Refused:
    # PRECIS and the IDNA checks have refused empty parts and lone surrogates already, so
    # the part encodes and only the upper bound is left.
    if len(part.encode("utf-8")) > MAX_PART_BYTES:
        return _Refused(f"{what} is longer than {MAX_PART_BYTES} octets")
    return part


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _prep_local(text: str) -> str | _Refused:
    """Enforce a localpart; return it, or `(reason,)`."""
    if len(text) > _MAX_INPUT_CHARS:
        return _Refused("localpart is too long")
    try:
        local = _USERNAME.enforce(text)
    except UnicodeEncodeError as exc:
        return _Refused(f"invalid localpart: {exc.reason}")
    if not _LOCAL_EXCLUDED.isdisjoint(local):
        return _Refused("localpart contains a character excluded by RFC 7622 section 3.3.1")
    return _check_length(local, "localpart")


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _prep_resource(text: str) -> str | _Refused:
    """Enforce a resourcepart; return it, or `(reason,)`."""
    if len(text) > _MAX_INPUT_CHARS:
        return _Refused("resourcepart is too long")
    try:
        resource = _OPAQUE.enforce(text)
    except UnicodeEncodeError as exc:
        return _Refused(f"invalid resourcepart: {exc.reason}")
    return _check_length(resource, "resourcepart")


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _prep_domain(text: str) -> str | _Refused:
    """Enforce a domainpart; return it, or `(reason,)`."""
    if len(text) > _MAX_INPUT_CHARS:
        return _Refused("domainpart is too long")
    # RFC 7622 section 3.2: a trailing label separator is stripped (once).
    if text.endswith("."):
        text = text[:-1]
    if not text:
        return _Refused("empty domainpart")
    if text.startswith("["):
        return _prep_ip6_literal(text)
    if text.isascii():
        domain = text.lower()
    else:
        # RFC 5895 section 2 mappings (width, lowercase, NFC), then the ideographic full
        # stop as a label separator.
        domain = unicodedata.normalize("NFC", _width_map(text).lower()).replace("\u3002", ".")
    labels = domain.split(".")
    for index, label in enumerate(labels):
        checked = _prep_label(label)
        if isinstance(checked, _Refused):
            return checked
        labels[index] = checked
    return _check_length(".".join(labels), "domainpart")


def _prep_label(label: str) -> str | _Refused:
    """Check one (lowercased) domain label; return its U-label form, or `(reason,)`."""
    if not label:
        return _Refused("empty label in domainpart")
    if label.isascii():
        if not _ASCII_LABEL_CHARS.issuperset(label):
            return _Refused(f"forbidden character in domain label {label!r}")
        if len(label) > _MAX_LABEL_BYTES:
            return _Refused("domain label is longer than 63 octets")
        if label.startswith("-") or label.endswith("-"):
            return _Refused(f"domain label {label!r} starts or ends with a hyphen")
        if not label.startswith("xn--"):
            return label
        # RFC 7622 section 3.2.2: A-labels become U-labels.
        try:
            return idna.ulabel(label)
        except idna.IDNAError as exc:
            return _Refused(f"invalid A-label {label!r}: {exc}")
    try:
        # alabel() runs the IDNA2008 label checks (RFC 5891 section 5.4) and the length
        # check on the A-label form.
        idna.alabel(label)
    except (idna.IDNAError, UnicodeError) as exc:
        return _Refused(f"invalid domain label: {exc}")
    return label


def _prep_ip6_literal(text: str) -> str | _Refused:
    if not text.endswith("]"):
        return _Refused("unterminated IPv6 literal")
    inner = text[1:-1]
    # ipaddress accepts a "%zone" suffix, which RFC 3986 IP-literals do not have.
    if "%" in inner:
        return _Refused("zone identifiers are not allowed in IPv6 literals")
    try:
        address = ipaddress.IPv6Address(inner)
    except ValueError:
        return _Refused("invalid IPv6 literal")
    return f"[{address.compressed}]"


def _width_map(text: str) -> str:
    """Map full-width and half-width characters to their decompositions (RFC 5895 2.2)."""
    out = []
    for char in text:
        decomposition = unicodedata.decomposition(char)
        if decomposition.startswith(("<wide>", "<narrow>")):
            out.append(chr(int(decomposition.split()[1], 16)))
        else:
            out.append(char)
    return "".join(out)
