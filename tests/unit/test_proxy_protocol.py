"""PROXY protocol v1/v2 header parsing and the trusted-proxy check.

Section numbers are those of HAProxy's doc/proxy-protocol.txt. v2 headers are built here
with `struct`, independently of the implementation.
"""

from __future__ import annotations

import ipaddress
import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import GatewayError, LocalProtocolError
from gateway.xmpp.proxy_protocol import (
    ProxyHeaderError,
    ProxyHeaderParser,
    ProxyInfo,
    is_trusted,
)

SIGNATURE = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
STREAM = b"<?xml version='1.0'?><stream:stream to='example.com'>"

PROXY_V2, LOCAL_V2 = 0x21, 0x20
TCP4, TCP6, UNIX_STREAM, UNSPEC = 0x11, 0x21, 0x31, 0x00


def v2(ver_cmd: int = PROXY_V2, fam: int = TCP4, body: bytes = b"", length: int | None = None):
    """A v2 header: signature, version/command, family/transport, length, body."""
    size = len(body) if length is None else length
    return SIGNATURE + struct.pack("!BBH", ver_cmd, fam, size) + body


def ipv4_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return struct.pack(
        "!4s4sHH",
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
        sport,
        dport,
    )


def ipv6_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return struct.pack(
        "!16s16sHH",
        ipaddress.IPv6Address(src).packed,
        ipaddress.IPv6Address(dst).packed,
        sport,
        dport,
    )


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def ssl_tlv(client: int, verify: int = 0, sub: bytes = b"") -> bytes:
    return tlv(0x20, struct.pack("!BI", client, verify) + sub)


def crc32c_bitwise(data: bytes) -> int:
    """CRC-32C computed bit by bit (RFC 4960 appendix B), unlike the module's table."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def with_crc32c(addresses: bytes, other_tlvs: bytes = b"") -> bytes:
    """A PROXY TCP4 header whose CRC32C TLV (placed last) is correct."""
    unsigned = v2(body=addresses + other_tlvs + tlv(0x03, bytes(4)))
    return unsigned[:-4] + struct.pack("!I", crc32c_bitwise(unsigned))


def parse(data: bytes, **kwargs: int) -> tuple[ProxyInfo, bytes]:
    parser = ProxyHeaderParser(**kwargs)
    info = parser.feed(data)
    assert info is not None
    return info, parser.remainder


def refuse(data: bytes) -> str:
    with pytest.raises(ProxyHeaderError) as excinfo:
        ProxyHeaderParser().feed(data)
    return str(excinfo.value)


def test_crc32c_helper_matches_the_standard_check_value():
    assert crc32c_bitwise(b"123456789") == 0xE3069283


# --- v1 (section 2.1) -------------------------------------------------------------------


def test_v1_tcp4_header_gives_addresses_and_ports():
    info, rest = parse(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n")
    assert info == ProxyInfo("proxy", "192.168.0.1", 56324, "192.168.0.11", 443)
    assert info.tlvs == {}
    assert not info.ssl
    assert rest == b""


def test_v1_tcp6_header_gives_normalised_addresses():
    info, _ = parse(b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::1 0 65535\r\n")
    assert info == ProxyInfo("proxy", "2001:db8::1", 0, "::1", 65535)


def test_v1_tcp6_accepts_an_ipv4_mapped_address():
    info, _ = parse(b"PROXY TCP6 ::ffff:192.0.2.7 ::1 1 2\r\n")
    assert info.source_ip is not None
    assert ipaddress.IPv6Address(info.source_ip).ipv4_mapped == ipaddress.IPv4Address("192.0.2.7")


def test_v1_unknown_short_form_means_use_the_tcp_peer():
    info, _ = parse(b"PROXY UNKNOWN\r\n")
    assert info == ProxyInfo("local", None, None, None, None)


def test_v1_unknown_ignores_the_rest_of_the_line():
    info, _ = parse(b"PROXY UNKNOWN whatever the sender puts here\r\n")
    assert info.command == "local"
    assert info.source_ip is None


def test_v1_longest_valid_lines_are_accepted():
    v6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    worst = f"PROXY UNKNOWN {v6} {v6} 65535 65535\r\n".encode()
    tcp6 = f"PROXY TCP6 {v6} {v6} 65535 65535\r\n".encode()
    assert (len(worst), len(tcp6)) == (107, 104)
    assert parse(worst)[0].command == "local"
    assert parse(tcp6)[0].source_ip == v6


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "non-printable"),  # lone LF
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\r\n", "non-printable"),  # lone CR
        (b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n", "non-printable"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.\xff 1 2\r\n", "non-printable"),
        (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY \r\n", "not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY UNKNOWNX 1.2.3.4 5.6.7.8 1 2\r\n", "not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY TCP4X 1.2.3.4 5.6.7.8 1 2\r\n", "not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY TCP4\r\n", "6 single-space"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "6 single-space"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "6 single-space"),
        (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "6 single-space"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "not a TCP4 address"),
        (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "not a TCP4 address"),
        (b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n", "not a TCP4 address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.256 1 2\r\n", "is not valid"),
        (b"PROXY TCP4 ::1 ::1 1 2\r\n", "not a TCP4 address"),
        (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "is not valid"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "not a TCP6 address"),
        (b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "is not valid"),
        (b"PROXY TCP6 ::g ::1 1 2\r\n", "not a TCP6 address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 123456\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 00\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n", "port"),
    ],
)
def test_malformed_v1_lines_are_refused(line: bytes, fragment: str):
    assert fragment in refuse(line)


def test_v1_line_without_crlf_in_107_bytes_is_refused():
    line = b"PROXY UNKNOWN " + b"f" * 92
    parser = ProxyHeaderParser()
    assert parser.feed(line) is None  # 106 bytes: the CRLF may still come
    with pytest.raises(ProxyHeaderError, match="no CRLF in 107 bytes"):
        parser.feed(b"\r\n")  # the CRLF would end at byte 108


def test_v1_line_with_a_cr_at_the_end_of_a_chunk_waits_for_the_lf():
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r") is None
    assert parser.feed(b"\n") == ProxyInfo("proxy", "1.2.3.4", 1, "5.6.7.8", 2)


def test_v1_unknown_protocol_word_is_refused_before_the_line_ends():
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY TC") is None
    with pytest.raises(ProxyHeaderError, match="not TCP4, TCP6 or UNKNOWN"):
        parser.feed(b"P5")


# --- v2 (section 2.2) -------------------------------------------------------------------


def test_v2_proxy_over_ipv4_gives_addresses_and_ports():
    info, rest = parse(v2(body=ipv4_block("203.0.113.5", "10.0.0.1", 50000, 5222)))
    assert info == ProxyInfo("proxy", "203.0.113.5", 50000, "10.0.0.1", 5222)
    assert rest == b""


def test_v2_proxy_over_ipv6_gives_addresses_and_ports():
    body = ipv6_block("2001:db8::5", "2001:db8::1", 65535, 0)
    info, _ = parse(v2(fam=TCP6, body=body))
    assert info == ProxyInfo("proxy", "2001:db8::5", 65535, "2001:db8::1", 0)


@pytest.mark.parametrize(
    ("fam", "body"),
    [
        (UNSPEC, b""),
        (TCP4, ipv4_block("1.2.3.4", "5.6.7.8", 1, 2)),
        (TCP6, ipv6_block("::1", "::2", 1, 2)),
        (TCP4, ipv4_block("1.2.3.4", "5.6.7.8", 1, 2) + ssl_tlv(0x01)),
        (TCP4, b"\x01\x02"),  # "must not assume zero is presented for LOCAL connections"
        (0x12, b""),  # the family of a LOCAL header is ignored, DGRAM included
    ],
)
def test_v2_local_means_use_the_tcp_peer_and_skips_the_block(fam: int, body: bytes):
    info, rest = parse(v2(LOCAL_V2, fam, body) + STREAM)
    assert info == ProxyInfo("local", None, None, None, None)
    assert info.tlvs == {}
    assert not info.ssl
    assert rest == STREAM


def test_v2_proxy_with_unspec_family_or_transport_is_local_like():
    for fam in (UNSPEC, 0x10, 0x20, 0x01):
        info, rest = parse(v2(fam=fam, body=b"opaque") + STREAM)
        assert info == ProxyInfo("local", None, None, None, None)
        assert rest == STREAM


def test_v2_proxy_over_unix_socket_is_local_like_but_keeps_its_tlvs():
    body = bytes(216) + ssl_tlv(0x01) + tlv(0x02, b"example.com")
    info, _ = parse(v2(fam=UNIX_STREAM, body=body))
    assert info.command == "local"
    assert (info.source_ip, info.source_port, info.dest_ip, info.dest_port) == (None,) * 4
    assert info.tlvs[0x02] == b"example.com"
    assert info.ssl


def test_v2_tlvs_are_returned_by_type():
    body = (
        ipv4_block("1.2.3.4", "5.6.7.8", 1, 2)
        + tlv(0x01, b"xmpp-client")
        + tlv(0x02, b"example.com")
        + tlv(0x05, b"\x00" * 128)
        + tlv(0xE0, b"custom")
        + tlv(0xEA, b"")
    )
    info, _ = parse(v2(body=body))
    assert dict(info.tlvs) == {
        0x01: b"xmpp-client",
        0x02: b"example.com",
        0x05: b"\x00" * 128,
        0xE0: b"custom",
        0xEA: b"",
    }
    assert not info.ssl


def test_v2_tlvs_are_read_only():
    info, _ = parse(v2(body=ipv4_block("1.2.3.4", "5.6.7.8", 1, 2) + tlv(0x02, b"a")))
    with pytest.raises(TypeError):
        info.tlvs[0x02] = b"b"  # type: ignore[index]  # Mapping has no __setitem__: the point


def test_v2_noop_tlvs_are_padding_and_left_out():
    body = ipv4_block("1.2.3.4", "5.6.7.8", 1, 2) + tlv(0x04, b"") + tlv(0x04, b"\0" * 5)
    info, _ = parse(v2(body=body))
    assert info.tlvs == {}


def test_v2_first_of_duplicate_tlvs_is_kept():
    body = ipv4_block("1.2.3.4", "5.6.7.8", 1, 2) + tlv(0x02, b"first") + tlv(0x02, b"second")
    info, _ = parse(v2(body=body))
    assert info.tlvs[0x02] == b"first"


def test_v2_ssl_tlv_with_client_ssl_flag_says_the_proxy_terminated_tls():
    sub = tlv(0x21, b"TLSv1.3") + tlv(0x23, b"TLS_AES_128_GCM_SHA256")
    body = ipv4_block("1.2.3.4", "5.6.7.8", 1, 2) + ssl_tlv(0x01 | 0x02, verify=0, sub=sub)
    info, _ = parse(v2(body=body))
    assert info.ssl
    assert info.tlvs[0x20] == struct.pack("!BI", 0x03, 0) + sub


def test_v2_ssl_tlv_without_client_ssl_flag_is_not_tls():
    body = ipv4_block("1.2.3.4", "5.6.7.8", 1, 2) + ssl_tlv(0x02 | 0x04, verify=1)
    info, _ = parse(v2(body=body))
    assert 0x20 in info.tlvs
    assert not info.ssl


def test_v2_correct_crc32c_is_accepted():
    header = with_crc32c(ipv4_block("1.2.3.4", "5.6.7.8", 1, 2), tlv(0x02, b"example.com"))
    info, _ = parse(header)
    assert info.source_ip == "1.2.3.4"
    assert info.tlvs[0x02] == b"example.com"
    assert 0x03 in info.tlvs


def test_v2_wrong_crc32c_is_refused():
    header = bytearray(with_crc32c(ipv4_block("1.2.3.4", "5.6.7.8", 1, 2)))
    header[16] ^= 0x01  # a spoofed source address
    assert "CRC32C checksum does not match" in refuse(bytes(header))


def test_v2_header_with_a_long_tlv_block_fits_a_larger_max_header():
    body = ipv4_block("1.2.3.4", "5.6.7.8", 1, 2) + tlv(0xE0, b"x" * 1000)
    with pytest.raises(ProxyHeaderError, match="longer than max_header 536"):
        ProxyHeaderParser().feed(v2(body=body))
    info, _ = parse(v2(body=body), max_header=2048)
    assert info.tlvs[0xE0] == b"x" * 1000


def test_v2_header_of_exactly_max_header_bytes_is_accepted():
    body = ipv4_block("1.2.3.4", "5.6.7.8", 1, 2) + tlv(0xE0, b"x" * (536 - 16 - 12 - 3))
    assert len(v2(body=body)) == 536
    assert parse(v2(body=body))[0].tlvs[0xE0] == b"x" * 505


def test_v2_length_above_max_header_is_refused_from_the_fixed_part_alone():
    parser = ProxyHeaderParser()
    with pytest.raises(ProxyHeaderError, match="521 bytes is longer than max_header 520"):
        ProxyHeaderParser(max_header=520).feed(v2(length=505))
    with pytest.raises(ProxyHeaderError, match="65551 bytes"):
        parser.feed(v2(length=0xFFFF))


def test_max_header_below_the_v1_line_length_is_a_programming_error():
    with pytest.raises(ValueError, match="at least 107"):
        ProxyHeaderParser(max_header=106)
    assert parse(b"PROXY UNKNOWN\r\n", max_header=107)[0].command == "local"


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (v2(0x11, TCP4), "version 1"),
        (v2(0x31, TCP4), "version 3"),
        (v2(0x01, TCP4), "version 0"),
        (v2(0x22, TCP4), "unknown command 0x2"),
        (v2(0x2F, TCP4), "unknown command 0xf"),
        (v2(PROXY_V2, 0x41), "unknown family 0x41"),
        (v2(PROXY_V2, 0x13), "unknown family 0x13"),
        (v2(LOCAL_V2, 0xF0), "unknown family 0xf0"),
        (v2(PROXY_V2, 0x12, ipv4_block("1.2.3.4", "5.6.7.8", 1, 2)), "DGRAM"),
        (v2(PROXY_V2, 0x22, ipv6_block("::1", "::2", 1, 2)), "DGRAM"),
        (v2(PROXY_V2, 0x32, bytes(216)), "DGRAM"),
        (v2(PROXY_V2, 0x02), "DGRAM"),
        (v2(body=bytes(11)), "block of 11 bytes, family 1 needs 12"),
        (v2(fam=TCP6, body=bytes(35)), "block of 35 bytes, family 2 needs 36"),
        (v2(fam=TCP6, body=ipv4_block("1.2.3.4", "5.6.7.8", 1, 2)), "needs 36"),
        (v2(fam=UNIX_STREAM, body=bytes(215)), "needs 216"),
        (v2(body=bytes(12) + b"\x02\x00"), "TLV truncated: 2 bytes left"),
        (v2(body=bytes(12) + b"\x02"), "TLV truncated: 1 bytes left"),
        (v2(body=bytes(12) + b"\x02\x00\x05abcd"), "TLV 0x02 of 5 bytes overruns"),
        (v2(body=bytes(12) + tlv(0x02, b"ok") + b"\xe0\xff\xff"), "TLV 0xe0 of 65535"),
        (v2(body=bytes(12) + tlv(0x20, b"\x01\x00\x00\x00")), "SSL TLV of 4 bytes, needs 5"),
        (v2(body=bytes(12) + ssl_tlv(0x01, sub=b"\x21\x00\x09TLSv1.3")), "SSL sub-TLV 0x21"),
        (v2(body=bytes(12) + ssl_tlv(0x01, sub=b"\x21\x00")), "SSL sub-TLV truncated"),
        (v2(body=bytes(12) + tlv(0x03, b"\0\0\0")), "CRC32C TLV of 3 bytes, needs 4"),
        (v2(body=bytes(12) + tlv(0x03, b"\0\0\0\0")), "CRC32C checksum does not match"),
    ],
)
def test_malformed_v2_headers_are_refused(header: bytes, fragment: str):
    assert fragment in refuse(header)


def test_v2_bad_version_is_refused_at_the_thirteenth_byte():
    parser = ProxyHeaderParser()
    assert parser.feed(SIGNATURE) is None
    with pytest.raises(ProxyHeaderError, match="version 1"):
        parser.feed(b"\x11")


def test_v2_bad_family_is_refused_at_the_fourteenth_byte():
    parser = ProxyHeaderParser()
    assert parser.feed(SIGNATURE + b"\x21") is None
    with pytest.raises(ProxyHeaderError, match="unknown family"):
        parser.feed(b"\x51")


def test_v2_signature_mismatch_is_refused_at_the_first_wrong_byte():
    for position in range(len(SIGNATURE)):
        parser = ProxyHeaderParser()
        if position:
            assert parser.feed(SIGNATURE[:position]) is None
        wrong = bytes([SIGNATURE[position] ^ 0x40])
        with pytest.raises(ProxyHeaderError, match="not a PROXY protocol header"):
            parser.feed(wrong)


# --- not a proxy at all: refused early ----------------------------------------------------


@pytest.mark.parametrize(
    "first_bytes",
    [
        b"<",  # <?xml ...: an XMPP client talking to the proxy port directly
        b"<?xml version='1.0'?>",
        b"\x16\x03\x01\x02\x00",  # a TLS ClientHello
        b"GET / HTTP/1.1\r\n",
        b"proxy TCP4",
        b"PROXX",
        b"PROXY\r\n",
        b"\r\n\r\n\r\n",
        b"\n",
    ],
)
def test_data_that_is_not_a_proxy_header_is_refused_without_waiting(first_bytes: bytes):
    assert "not a PROXY protocol header" in refuse(first_bytes)


def test_valid_prefixes_of_either_version_wait_for_more_bytes():
    for prefix in (b"P", b"PROXY", b"PROXY ", b"PROXY TCP4 1.2", b"\r", SIGNATURE[:11]):
        assert ProxyHeaderParser().feed(prefix) is None


# --- incremental feeding and replay -----------------------------------------------------

VALID_HEADERS = [
    b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
    b"PROXY TCP6 2001:db8::1 2001:db8::2 5222 5223\r\n",
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN ::1 ::1 1 1\r\n",
    v2(body=ipv4_block("203.0.113.5", "10.0.0.1", 50000, 5222)),
    v2(fam=TCP6, body=ipv6_block("2001:db8::5", "::1", 1, 2) + ssl_tlv(0x01)),
    v2(LOCAL_V2, UNSPEC),
    v2(body=ipv4_block("1.2.3.4", "5.6.7.8", 1, 2) + tlv(0x02, b"a") + tlv(0x04, b"")),
    with_crc32c(ipv4_block("1.2.3.4", "5.6.7.8", 1, 2), tlv(0x05, b"id")),
]


@given(
    header=st.sampled_from(VALID_HEADERS),
    stream=st.sampled_from([b"", STREAM, b"\r\n", SIGNATURE]),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
)
def test_every_split_of_a_valid_header_gives_the_same_result(
    header: bytes, stream: bytes, cuts: list[int]
):
    expected, expected_rest = parse(header + stream)
    data = header + stream
    points = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    parser = ProxyHeaderParser()
    info = None
    replay = b""
    for start, end in itertools.pairwise(points):
        if info is None:
            info = parser.feed(data[start:end])
            if info is not None:
                replay = parser.remainder
        else:
            replay += data[start:end]  # what the caller reads after the header
    assert info == expected
    assert replay == expected_rest == stream


def test_header_and_stream_bytes_in_one_chunk_leave_the_stream_to_replay():
    info, rest = parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n" + STREAM)
    assert info.source_ip == "1.2.3.4"
    assert rest == STREAM
    info, rest = parse(v2(body=ipv4_block("1.2.3.4", "5.6.7.8", 1, 2)) + STREAM)
    assert info.source_ip == "1.2.3.4"
    assert rest == STREAM


def test_a_second_proxy_header_is_stream_data_not_parsed_again():
    first = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
    second = b"PROXY TCP4 9.9.9.9 9.9.9.9 9 9\r\n"
    info, rest = parse(first + second)
    assert info.source_ip == "1.2.3.4"
    assert rest == second


@given(st.binary(max_size=600))
def test_arbitrary_bytes_give_info_none_or_a_header_error(data: bytes):
    parser = ProxyHeaderParser()
    try:
        info = parser.feed(data)
    except ProxyHeaderError:
        return
    if info is not None:
        assert (info.command == "local") == (info.source_ip is None)
        assert data.endswith(parser.remainder)


# --- end of input and misuse ------------------------------------------------------------


def test_connection_closed_inside_the_header_is_refused():
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY TCP4 1.2.3.4") is None
    with pytest.raises(ProxyHeaderError, match="closed after 18 bytes"):
        parser.feed(b"")


def test_connection_closed_before_any_byte_is_refused():
    with pytest.raises(ProxyHeaderError, match="closed after 0 bytes"):
        ProxyHeaderParser().feed(b"")


def test_feeding_after_the_header_is_complete_is_a_local_error():
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY UNKNOWN\r\n") is not None
    with pytest.raises(LocalProtocolError):
        parser.feed(STREAM)


def test_feeding_after_a_refusal_is_a_local_error():
    parser = ProxyHeaderParser()
    with pytest.raises(ProxyHeaderError):
        parser.feed(b"<")
    with pytest.raises(LocalProtocolError):
        parser.feed(b"PROXY UNKNOWN\r\n")
    with pytest.raises(LocalProtocolError):
        _ = parser.remainder


def test_remainder_before_the_header_is_complete_is_a_local_error():
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY") is None
    with pytest.raises(LocalProtocolError, match="before the PROXY header was complete"):
        _ = parser.remainder


def test_header_errors_are_gateway_errors_with_one_line_messages():
    message = refuse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n\n\n")
    assert issubclass(ProxyHeaderError, GatewayError)
    assert "\n" not in message
    assert "\n" not in refuse(b"\r\n\r\n\r\n")


# --- is_trusted ---------------------------------------------------------------------------

NETS = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8:1::/48")]


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("10.1.2.3", True),
        ("10.255.255.255", True),
        ("11.0.0.1", False),
        ("2001:db8:1::7", True),
        ("2001:db8:2::7", False),
        ("::ffff:10.1.2.3", True),  # an IPv4 client on a dual-stack socket
        ("::ffff:11.0.0.1", False),
        ("::10.1.2.3", False),  # IPv4-compatible (deprecated) is not IPv4-mapped
        ("::1", False),
        ("127.0.0.1", False),
    ],
)
def test_is_trusted_checks_the_peer_against_the_networks(peer: str, expected: bool):
    assert is_trusted(peer, NETS) is expected


def test_is_trusted_with_no_networks_trusts_nobody():
    assert not is_trusted("10.1.2.3", [])
    assert not is_trusted("::ffff:10.1.2.3", [])
    assert not is_trusted("::1", [])


def test_ipv4_peer_matches_a_network_written_in_mapped_form():
    assert is_trusted("10.1.2.3", [ipaddress.ip_network("::ffff:10.0.0.0/104")])
    assert not is_trusted("11.1.2.3", [ipaddress.ip_network("::ffff:10.0.0.0/104")])


def test_is_trusted_accepts_a_peer_with_a_zone():
    assert is_trusted("fe80::1%eth0", [ipaddress.ip_network("fe80::/10")])


def test_is_trusted_with_a_peer_that_is_not_an_address_is_a_programming_error():
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        is_trusted("proxy.example.com", NETS)
