"""Client addresses behind trusted proxies on WebSocket listeners (DESIGN 5, STYLE T3)."""

from __future__ import annotations

import ipaddress

from gateway.net.transport import PeerInfo
from gateway.net.websocket import client_address, parse_head

TRUSTED = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))
PROXY = PeerInfo("127.0.0.1", 50000)


def test_forwarded_headers_from_an_untrusted_peer_are_ignored() -> None:
    peer = PeerInfo("198.51.100.1", 1234)
    assert client_address(peer, {"x-forwarded-for": "203.0.113.5"}, TRUSTED) == peer


def test_x_forwarded_for_is_walked_right_to_left_past_trusted_hops() -> None:
    headers = {
        "x-forwarded-for": "203.0.113.66, 198.51.100.7, 10.1.2.3",
        "x-forwarded-proto": "https",
    }
    got = client_address(PROXY, headers, TRUSTED)
    # 10.1.2.3 is a trusted hop; 198.51.100.7 is the first that is not: the client. What it
    # claims further left (203.0.113.66) is the client's own word and not believed.
    assert got == PeerInfo("198.51.100.7", 0, secure=True, via_proxy=True, proxy_ip="127.0.0.1")


def test_a_client_cannot_inject_the_header_the_proxy_does_not_maintain() -> None:
    headers = {"forwarded": "for=203.0.113.66", "x-forwarded-for": "198.51.100.7"}
    assert client_address(PROXY, headers, TRUSTED).ip == "198.51.100.7"
    assert client_address(PROXY, headers, TRUSTED, "forwarded").ip == "203.0.113.66"


def test_rfc7239_forwarded_nodes_with_ports_and_ipv6() -> None:
    headers = {"forwarded": 'for="[2001:db8::7]:4711";proto=https, for=10.0.0.9'}
    assert client_address(PROXY, headers, TRUSTED, "forwarded").ip == "2001:db8::7"


def test_a_garbled_hop_stops_the_walk() -> None:
    headers = {"x-forwarded-for": "203.0.113.66, unknown, 10.1.2.3"}
    assert client_address(PROXY, headers, TRUSTED).ip == "10.1.2.3"


def test_request_head_parsing_joins_repeated_headers() -> None:
    head = b"GET /xmpp-websocket?x=1 HTTP/1.1\r\nX-Forwarded-For: a\r\nx-forwarded-for: b\r\n\r\n"
    assert parse_head(head) == ("GET", "/xmpp-websocket?x=1", {"x-forwarded-for": "a, b"})
    assert parse_head(b"garbage\r\n\r\n") is None
