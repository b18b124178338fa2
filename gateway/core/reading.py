"""Reading a client's stream with a clock on the stanza still being received.

A peer that sends half a stanza and then trickles (or nothing) holds the memory of that
half; `general.stanza_timeout` bounds how long, before and after authentication. The wire
names the unfinished stanza by its offset (`Wire.unfinished_at`): the same offset on two
reads is the same stanza, so complete stanzas, however many, never trip the clock.
"""

from __future__ import annotations

import trio

from gateway.errors import RemoteProtocolError, StreamErrorCondition
from gateway.net.wire import Wire
from gateway.xmpp.parser import Event


class StanzaTimer:
    """The clock of one connection (across its stream restarts and resumed transports).

    Args:
        stanza_timeout: seconds one stanza may stay unfinished (`general.stanza_timeout`).
    """

    def __init__(self, stanza_timeout: float) -> None:
        self.stanza_timeout = stanza_timeout
        #: The unfinished stanza being timed: (its wire, its offset, since when).
        self._unfinished: tuple[Wire, int, float] | None = None

    def reset(self) -> None:
        """A stream restart: offsets start again from zero."""
        self._unfinished = None

    async def read(self, wire: Wire) -> list[Event]:
        """The next parser events from `wire`.

        Raises:
            RemoteProtocolError: `policy-violation`, a stanza stayed unfinished for
                `stanza_timeout` seconds.
            TransportLost: the transport ended (from the wire).
        """
        offset = wire.unfinished_at
        if offset is None:
            self._unfinished = None
            return await wire.read_events()
        since = trio.current_time()
        if self._unfinished is not None and self._unfinished[:2] == (wire, offset):
            since = self._unfinished[2]
        self._unfinished = (wire, offset, since)
        with trio.move_on_at(since + self.stanza_timeout):
            return await wire.read_events()
        raise RemoteProtocolError(
            StreamErrorCondition.POLICY_VIOLATION, "a stanza stayed unfinished too long"
        )
