"""Namespace URIs used by the gateway, as Final constants."""

from __future__ import annotations

from typing import Final

STREAM: Final = "http://etherx.jabber.org/streams"
CLIENT: Final = "jabber:client"
SERVER: Final = "jabber:server"
XML: Final = "http://www.w3.org/XML/1998/namespace"
STREAMS_ERRORS: Final = "urn:ietf:params:xml:ns:xmpp-streams"
STANZAS_ERRORS: Final = "urn:ietf:params:xml:ns:xmpp-stanzas"
TLS: Final = "urn:ietf:params:xml:ns:xmpp-tls"
SASL: Final = "urn:ietf:params:xml:ns:xmpp-sasl"
BIND: Final = "urn:ietf:params:xml:ns:xmpp-bind"
SESSION: Final = "urn:ietf:params:xml:ns:xmpp-session"
SM: Final = "urn:xmpp:sm:3"
FRAMING: Final = "urn:ietf:params:xml:ns:xmpp-framing"
DISCO_INFO: Final = "http://jabber.org/protocol/disco#info"
DISCO_ITEMS: Final = "http://jabber.org/protocol/disco#items"
PING: Final = "urn:xmpp:ping"
ROSTER: Final = "jabber:iq:roster"
DELAY: Final = "urn:xmpp:delay"
