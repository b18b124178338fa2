"""PROXY protocol v1/v2 header parser and the trusted-proxy check; sans-I/O.

Theory of operation
-------------------
A TCP listener with `proxy_protocol: true` (DESIGN section 5, STYLE T2) accepts a
connection only from a peer that `is_trusted()`, then feeds every chunk it receives to one
`ProxyHeaderParser` until `feed()` returns a `ProxyInfo`; the bytes after the header
(`remainder`) are the start of the XMPP stream and are replayed to the stream parser.
Section numbers below are those of HAProxy's "The PROXY protocol, Versions 1 & 2"
(doc/proxy-protocol.txt).

States: READING (buffering; each `feed()` re-examines the whole buffer, which never grows
past `max_header` bytes without a verdict), then DONE (`feed()` returned the info) or
ERROR (`feed()` raised `ProxyHeaderError`). Both are terminal: feeding again is a
`LocalProtocolError`, as is reading `remainder` before DONE.

Refusing early (section 2.1: "abort the connection as soon as possible"): the first bytes
decide the version, byte by byte. Anything that stops being a prefix of `PROXY ` (v1) or
of the 12-byte signature (v2) is refused at once, so a client that is not a proxy
(`<?xml`, a TLS ClientHello) fails on its first byte instead of waiting for `max_header`
bytes. v1 lines are also checked as they arrive: only printable US-ASCII, a known
protocol word, and a CRLF within 107 bytes. v2 headers are checked at byte 13 (version
and command), 14 (family and transport) and 16 (length against `max_header`).

What the caller gets (`command` says whose addresses to use):

* "proxy": the four address fields are set; use them instead of the TCP peer's.
* "local": they are all None; use the real TCP peer. This covers v2 LOCAL (health
  checks; the whole address block is skipped, TLVs included, section 2.2), v1 UNKNOWN,
  and v2 PROXY with AF_UNSPEC, AF_UNIX or an UNSPEC transport, which carry no IP
  addresses we could use (section 2.2 lets the receiver fall back to the real endpoints).
  TLVs are still parsed for v2 PROXY over AF_UNIX (they follow its 216-byte block); for
  AF_UNSPEC and UNSPEC transports the address length is unknown, so the block is skipped.

DGRAM transports are refused: this listener relays TCP streams only.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal

from gateway.errors import GatewayError, LocalProtocolError

#: Longest v1 line including its CRLF ("PROXY UNKNOWN" with two full IPv6 addresses, 2.1).
V1_MAX_LENGTH: Final = 107
#: The v2 signature (section 2.2); its NUL and CRLFs make it invalid in most text protocols.
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
#: Signature, version/command, family/transport and the 16-bit address length.
V2_FIXED_LENGTH: Final = 16
#: HAProxy's recommended receive buffer (section 9): room for a v2 header with TLVs.
DEFAULT_MAX_HEADER: Final = 536

#: Registered v2 TLV types used here (section 2.2).
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_SSL: Final = 0x20
#: Client flag of PP2_TYPE_SSL: the client reached the proxy over TLS (section 2.2.6).
PP2_CLIENT_SSL: Final = 0x01

_V1_MAGIC: Final = b"PROXY "
_V1_PROTOCOLS: Final = (b"TCP4 ", b"TCP6 ", b"UNKNOWN")
_V1_PRINTABLE: Final = re.compile(rb"[\x20-\x7e]*")
#: "Heading zeroes are not permitted" for IPv4 octets and ports (section 2.1).
_V1_IPV4: Final = re.compile(rb"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
#: Hex groups, colons, and an optional embedded dotted quad; no zone ("%eth0").
_V1_IPV6: Final = re.compile(rb"[0-9A-Fa-f:.]{2,45}")
_V1_PORT: Final = re.compile(rb"0|[1-9][0-9]{0,4}")

_CMD_LOCAL: Final = 0x0
_CMD_PROXY: Final = 0x1
_AF_UNSPEC: Final = 0x0
_AF_INET: Final = 0x1
_AF_INET6: Final = 0x2
_AF_UNIX: Final = 0x3
_TRANSPORT_UNSPEC: Final = 0x0
_TRANSPORT_STREAM: Final = 0x1
_TRANSPORT_DGRAM: Final = 0x2
#: Bytes of source + destination address + ports for each family (section 2.2).
_ADDRESS_LENGTH: Final = {_AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}

_NO_TLVS: Final[Mapping[int, bytes]] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """What a complete PROXY header says about the connection it precedes.

    Invariant: `command == "local"` exactly when all four address fields are None.
    """

    #: "proxy": use the addresses below; "local": use the real TCP peer (module docstring).
    command: Literal["proxy", "local"]
    source_ip: str | None
    source_port: int | None
    dest_ip: str | None
    dest_port: int | None
    #: v2 TLV values by type, read-only; NOOP (padding) left out, the first of duplicates
    #: kept. Always empty for v1 and for v2 LOCAL.
    tlvs: Mapping[int, bytes] = field(default_factory=lambda: _NO_TLVS)
    #: PP2_TYPE_SSL is present with PP2_CLIENT_SSL set: the proxy terminated TLS.
    ssl: bool = False


class ProxyHeaderError(GatewayError):
    """The bytes are not a valid PROXY header; the message is one line for the log."""


class _State(enum.Enum):
    #: Waiting for the rest of the header.
    READING = enum.auto()
    #: `feed()` returned the info; `remainder` is available.
    DONE = enum.auto()
    #: `feed()` raised `ProxyHeaderError`.
    ERROR = enum.auto()


class ProxyHeaderParser:
    """Incremental parser for one PROXY v1 or v2 header (see the module docstring)."""

    def __init__(self, *, max_header: int = DEFAULT_MAX_HEADER) -> None:
        """Create a parser for one connection.

        Args:
            max_header: the longest v2 header accepted, in bytes (16 + address length).
                At least 107, so that every valid v1 line fits.

        Raises:
            ValueError: `max_header` is below 107.
        """
        if max_header < V1_MAX_LENGTH:
            raise ValueError(f"max_header must be at least {V1_MAX_LENGTH}, got {max_header}")
        self._max_header = max_header
        self._buffer = bytearray()
        self._state = _State.READING
        self._remainder = b""

    @property
    def remainder(self) -> bytes:
        """Bytes received after the header: the start of the XMPP stream, to be replayed.

        Raises:
            LocalProtocolError: the header is not complete yet.
        """
        if self._state is not _State.DONE:
            raise LocalProtocolError("remainder read before the PROXY header was complete")
        return self._remainder

    def feed(self, data: bytes) -> ProxyInfo | None:
        """Add received bytes.

        Args:
            data: the next chunk from the connection; b"" means the peer closed it.

        Returns:
            The header's information once it is complete (then read `remainder`), None
            while more bytes are needed.

        Raises:
            ProxyHeaderError: the bytes cannot be (the start of) a valid header, the header
                is longer than allowed, or the connection closed inside it.
            LocalProtocolError: called again after returning the info or raising.
        """
        if self._state is not _State.READING:
            raise LocalProtocolError(f"feed() called in state {self._state.name}")
        try:
            if not data:
                raise ProxyHeaderError(
                    f"connection closed after {len(self._buffer)} bytes of a PROXY header"
                )
            self._buffer += data
            info = self._parse()
        except ProxyHeaderError:
            self._state = _State.ERROR
            raise
        if info is not None:
            self._state = _State.DONE
        return info

    def _parse(self) -> ProxyInfo | None:
        buf = self._buffer
        if _is_prefix(buf, _V1_MAGIC):
            return self._parse_v1() if len(buf) > len(_V1_MAGIC) else None
        if _is_prefix(buf, V2_SIGNATURE):
            return self._parse_v2()
        raise ProxyHeaderError(f"not a PROXY protocol header: {bytes(buf[:16])!r}")

    def _parse_v1(self) -> ProxyInfo | None:
        buf = self._buffer
        end = buf.find(b"\r\n", 0, V1_MAX_LENGTH)
        line = bytes(buf[:end] if end >= 0 else buf[:V1_MAX_LENGTH])
        # A CR at the very end may be the first half of the CRLF; anywhere else it (or a
        # lone LF) is refused: "must not tolerate a single CR or LF" (section 2.1).
        checked = line[:-1] if end < 0 and line.endswith(b"\r") else line
        if not _V1_PRINTABLE.fullmatch(checked):
            raise ProxyHeaderError(f"PROXY v1 line has a non-printable byte: {line!r}")
        rest = line[len(_V1_MAGIC) :]
        if not any(_is_prefix(rest, protocol) for protocol in _V1_PROTOCOLS):
            raise ProxyHeaderError(f"PROXY v1 protocol not TCP4, TCP6 or UNKNOWN: {line!r}")
        if end < 0:
            if len(buf) >= V1_MAX_LENGTH:
                raise ProxyHeaderError(f"PROXY v1 line has no CRLF in {V1_MAX_LENGTH} bytes")
            return None
        self._remainder = bytes(buf[end + 2 :])
        return _decode_v1(line)

    def _parse_v2(self) -> ProxyInfo | None:
        buf = self._buffer
        if len(buf) > 12:
            version, command = buf[12] >> 4, buf[12] & 0x0F
            if version != 2:
                raise ProxyHeaderError(f"PROXY v2 header with version {version}")
            if command not in (_CMD_LOCAL, _CMD_PROXY):
                raise ProxyHeaderError(f"PROXY v2 header with unknown command {command:#x}")
        if len(buf) > 13:
            family, transport = buf[13] >> 4, buf[13] & 0x0F
            if family > _AF_UNIX or transport > _TRANSPORT_DGRAM:
                raise ProxyHeaderError(f"PROXY v2 header with unknown family {buf[13]:#04x}")
        if len(buf) < V2_FIXED_LENGTH:
            return None
        total = V2_FIXED_LENGTH + int.from_bytes(buf[14:16], "big")
        if total > self._max_header:
            raise ProxyHeaderError(
                f"PROXY v2 header of {total} bytes is longer than max_header {self._max_header}"
            )
        if len(buf) < total:
            return None
        self._remainder = bytes(buf[total:])
        return _decode_v2(bytes(buf[:total]))


def _is_prefix(data: bytes | bytearray, expected: bytes) -> bool:
    """`data` and `expected` agree on their common length (either may be the longer)."""
    n = min(len(data), len(expected))
    return data[:n] == expected[:n]


def _decode_v1(line: bytes) -> ProxyInfo:
    """Decode a v1 line (CRLF stripped, characters and protocol word already checked)."""
    fields = line.split(b" ")
    if fields[1] == b"UNKNOWN":
        # "the receiver must ignore anything presented before the CRLF" (section 2.1).
        return ProxyInfo("local", None, None, None, None)
    if fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError(f"PROXY v1 protocol {fields[1]!r} is not TCP4, TCP6 or UNKNOWN")
    if len(fields) != 6:
        raise ProxyHeaderError(f"PROXY v1 line needs 6 single-space separated fields: {line!r}")
    is_v6 = fields[1] == b"TCP6"
    return ProxyInfo(
        "proxy",
        source_ip=_v1_address(fields[2], is_v6=is_v6),
        source_port=_v1_port(fields[4]),
        dest_ip=_v1_address(fields[3], is_v6=is_v6),
        dest_port=_v1_port(fields[5]),
    )


def _v1_address(text: bytes, *, is_v6: bool) -> str:
    try:
        if is_v6:
            if _V1_IPV6.fullmatch(text):
                return str(ipaddress.IPv6Address(text.decode("ascii")))
        elif _V1_IPV4.fullmatch(text):
            return str(ipaddress.IPv4Address(text.decode("ascii")))
    except ValueError as exc:
        raise ProxyHeaderError(f"PROXY v1 address {text!r} is not valid: {exc}") from exc
    family = "TCP6" if is_v6 else "TCP4"
    raise ProxyHeaderError(f"PROXY v1 address {text!r} is not a {family} address")


def _v1_port(text: bytes) -> int:
    if not _V1_PORT.fullmatch(text) or int(text) > 0xFFFF:
        raise ProxyHeaderError(f"PROXY v1 port {text!r} is not 0..65535 without leading zeros")
    return int(text)


def _decode_v2(header: bytes) -> ProxyInfo:
    """Decode a complete v2 header (fixed part already checked)."""
    block = header[V2_FIXED_LENGTH:]
    family, transport = header[13] >> 4, header[13] & 0x0F
    if header[12] & 0x0F == _CMD_LOCAL:
        # "discard the protocol block including the family which is ignored" (section 2.2).
        return ProxyInfo("local", None, None, None, None)
    if transport == _TRANSPORT_DGRAM:
        raise ProxyHeaderError("PROXY v2 header for a DGRAM transport; only STREAM is relayed")
    if family == _AF_UNSPEC or transport == _TRANSPORT_UNSPEC:
        return ProxyInfo("local", None, None, None, None)
    needed = _ADDRESS_LENGTH[family]
    if len(block) < needed:
        raise ProxyHeaderError(
            f"PROXY v2 address block of {len(block)} bytes, family {family} needs {needed}"
        )
    tlvs = _decode_tlvs(header, needed)
    ssl_value = tlvs.get(PP2_TYPE_SSL)
    ssl = ssl_value is not None and bool(ssl_value[0] & PP2_CLIENT_SSL)
    if family == _AF_UNIX:
        return ProxyInfo("local", None, None, None, None, tlvs=tlvs, ssl=ssl)
    size = 4 if family == _AF_INET else 16
    return ProxyInfo(
        "proxy",
        source_ip=str(ipaddress.ip_address(block[:size])),
        source_port=int.from_bytes(block[2 * size : 2 * size + 2], "big"),
        dest_ip=str(ipaddress.ip_address(block[size : 2 * size])),
        dest_port=int.from_bytes(block[2 * size + 2 : 2 * size + 4], "big"),
        tlvs=tlvs,
        ssl=ssl,
    )


def _split_tlvs(data: bytes, start: int, what: str) -> list[tuple[int, int, bytes]]:
    """Bounds-checked (type, offset of value, value) triples from `data[start:]`."""
    found: list[tuple[int, int, bytes]] = []
    pos = start
    while pos < len(data):
        if len(data) - pos < 3:
            raise ProxyHeaderError(f"PROXY v2 {what} truncated: {len(data) - pos} bytes left")
        kind, length = data[pos], int.from_bytes(data[pos + 1 : pos + 3], "big")
        if pos + 3 + length > len(data):
            raise ProxyHeaderError(
                f"PROXY v2 {what} {kind:#04x} of {length} bytes overruns its block"
            )
        found.append((kind, pos + 3, data[pos + 3 : pos + 3 + length]))
        pos += 3 + length
    return found


def _decode_tlvs(header: bytes, address_length: int) -> Mapping[int, bytes]:
    """The TLVs after the address block, with SSL and CRC32C checked (section 2.2)."""
    tlvs: dict[int, bytes] = {}
    for kind, offset, value in _split_tlvs(header, V2_FIXED_LENGTH + address_length, "TLV"):
        if kind == PP2_TYPE_NOOP or kind in tlvs:
            continue
        if kind == PP2_TYPE_SSL:
            # struct pp2_tlv_ssl: u8 client, u32 verify, then sub-TLVs (section 2.2.6).
            if len(value) < 5:
                raise ProxyHeaderError(f"PROXY v2 SSL TLV of {len(value)} bytes, needs 5")
            _split_tlvs(value, 5, "SSL sub-TLV")
        elif kind == PP2_TYPE_CRC32C:
            # Checksum of the whole header with its own field zeroed (section 2.2.3).
            if len(value) != 4:
                raise ProxyHeaderError(f"PROXY v2 CRC32C TLV of {len(value)} bytes, needs 4")
            zeroed = header[:offset] + bytes(4) + header[offset + 4 :]
            if _crc32c(zeroed) != int.from_bytes(value, "big"):
                raise ProxyHeaderError("PROXY v2 CRC32C checksum does not match the header")
        tlvs[kind] = value
    return MappingProxyType(tlvs) if tlvs else _NO_TLVS


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


#: CRC-32C (Castagnoli), reflected polynomial 0x82F63B78, as in RFC 4960 appendix B.
_CRC32C_TABLE: Final = _crc32c_table()


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def is_trusted(
    peer_ip: str, trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    """Whether a TCP peer may send a PROXY header (or forwarded headers): STYLE T2, T3.

    An IPv4-mapped IPv6 peer (`::ffff:a.b.c.d`, what a dual-stack socket reports for an
    IPv4 client) also matches IPv4 networks, and an IPv4 peer also matches IPv6 networks
    written in mapped form (`::ffff:10.0.0.0/104`).

    Args:
        peer_ip: the TCP peer's address as the socket reports it (a zone is allowed).
        trusted: the configured `trusted_proxies`; empty trusts nobody.

    Returns:
        True if the address is in one of the networks.

    Raises:
        ValueError: `peer_ip` is not an IP address (a bug in the caller, not the peer).
    """
    address = ipaddress.ip_address(peer_ip)
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
    else:
        candidates.append(ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed))
    return any(candidate in network for candidate in candidates for network in trusted)
