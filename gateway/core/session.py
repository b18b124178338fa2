"""The session object (DESIGN.md section 2, Prosody's session structure).

A `Session` is owned by its connection task. Other tasks reach it only as a handle of the
session directory (`gateway.core.directory`): they call `send()` and `close()`, which hand
work to the owner through a bounded memory channel and a cancel scope, and read its
presence, priority and interest from the directory's records, which the owner publishes
after each change. Nothing else of its state is touched by anyone but the owner.

- connected resource: `full_jid` is set (after bind).
- available resource: `presence` is set (initial presence sent, not yet unavailable).
- interested resource: `interested` is true (it requested the roster).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import trio

from gateway.core.metrics import Metrics
from gateway.errors import StreamErrorCondition
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID
from gateway.xmpp.sm import BufferOverflow, SMState
from gateway.xmpp.sm_elements import ack_request
from gateway.xmpp.stanza import stanza_kind

# The one <r/> element: the writer recognises it by identity to start the ack timer.
ACK_REQUEST: Final = ack_request()
#: Seconds a closing transport gets to write its last bytes (and a write in progress to
#: finish) before it is closed regardless.
CLOSE_GRACE: Final = 2.0


@dataclass(slots=True)
class CloseRequest:
    """Why the owner task must end the stream."""

    condition: StreamErrorCondition | None
    text: str | None = None
    # Shutdown: a resumable session is handed off (kept for a resume elsewhere or after
    # the restart) instead of ended.
    handoff: bool = False
    # With `handoff`: the node of the cluster it moves to (a resume arrived there),
    # instead of the hand-off store.
    migrate_to: str | None = None


@dataclass(eq=False, slots=True)
class Session:
    """One client's session (see module docstring).

    Attributes:
        conn_id: the connection's id (for logs and loans).
        conn: a description of the transport serving the session (kind and peer).
        username, host, resource, full_jid: the JID parts, as they become known.
        priority: the priority of the last broadcast presence.
        presence: the last broadcast presence without type, None when unavailable.
        interested: the client requested the roster (gets roster pushes).
        directed: JIDs this resource sent directed available presence to; they get its
            unavailable presence when it goes away (RFC 6121 section 4.6.3).
        sm: the XEP-0198 state (`SMState`), once the client enabled stream management.
        outgoing: the channel to the writer of the current transport; None while parked.
        queued_bytes: memory (`Element.size`) of what `outgoing` holds; the writer takes
            it off as it writes.
        max_queued_bytes: the bound on `queued_bytes` (`general.send_queue_bytes`).
        stanzas_out: stanzas the session took (for the `connection_closed` line).
        metrics: the gateway's registry (`stanzas_out` there too), set by the owner task.
    """

    conn_id: str
    conn: str
    outgoing: trio.MemorySendChannel[Element] | None
    username: str | None = None
    host: str | None = None
    resource: str | None = None
    full_jid: JID | None = None
    priority: int = 0
    presence: Element | None = None
    interested: bool = False
    directed: set[JID] = field(default_factory=set)
    sm: SMState | None = None
    close_request: CloseRequest | None = None
    cancel_scope: trio.CancelScope | None = None
    stanzas_out: int = 0
    metrics: Metrics | None = None
    queued_bytes: int = 0
    max_queued_bytes: int = 10 * 1024 * 1024
    # Offline messages wait to be flushed (paced by the owner task, see connection.py).
    flush_pending: bool = False
    on_flush_request: Callable[[], None] | None = None

    def bound(self, full: JID) -> None:
        """Record the full JID the router bound the session to."""
        self.full_jid = full
        self.resource = full.resource

    @property
    def bare_jid(self) -> JID:
        assert self.full_jid is not None, "not a connected resource"
        return self.full_jid.bare()

    @property
    def is_available(self) -> bool:
        return self.presence is not None

    def send(self, stanza: Element) -> bool:
        """Queue a stanza for the client without blocking.

        With stream management on, the stanza enters the SM buffer first (XEP-0198: every
        stanza sent after enable is kept until acked), also while the session is parked
        without a transport; from then on the session is responsible for it (acked,
        resent on resume, or rerouted when the session ends), so the answer is True even
        when the buffer overflows (the session then ends with `resource-constraint`).

        Returns:
            True when the session took the stanza. False when it is closing, or (without
            stream management) its queue is full, which closes it with
            `resource-constraint`; the caller keeps responsibility for the stanza then.
        """
        sm = self.sm
        request = self.close_request
        if request is not None and not (request.handoff and sm is not None and sm.resumable):
            # (A session waiting to be handed off keeps taking stanzas into its buffer:
            # they go with it, so nothing sent to it during the shutdown goes astray.)
            return False
        if sm is not None:
            return self._send_managed(sm, stanza)
        if not self._queue(stanza):
            return False
        self._count_out(stanza)
        return True

    def has_room_for(self, stanza: Element) -> bool:
        """Whether `stanza` fits the byte bounds of the SM buffer and the outgoing queue
        (the offline flush asks before it sends, so it never overflows a session)."""
        size = stanza.size
        sm = self.sm
        limit = sm.buffer_max_bytes if sm is not None and sm.buffering else None
        if sm is not None and limit is not None and sm.buffer and sm.buffer_bytes + size > limit:
            return False
        queued = self.queued_bytes
        return not queued or queued + size <= self.max_queued_bytes

    def _queue(self, element: Element) -> bool:
        """Put `element` on the writer's channel without blocking.

        A full channel, in stanzas or in bytes (one element alone always fits), means the
        client does not read: the session is closed with `resource-constraint`.

        Returns:
            True when queued; False when full (closing) or there is no transport.
        """
        outgoing = self.outgoing
        if outgoing is None:
            return False
        size = element.size
        queued = self.queued_bytes
        full = bool(queued) and queued + size > self.max_queued_bytes
        if not full:
            try:
                outgoing.send_nowait(element)
            except trio.WouldBlock:
                full = True
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
        if full:
            self.close(StreamErrorCondition.RESOURCE_CONSTRAINT, "the client is not reading")
            return False
        self.queued_bytes = queued + size
        return True

    def _send_managed(self, sm: SMState, stanza: Element) -> bool:
        try:
            request = sm.sent(stanza)
        except BufferOverflow:
            self.close(StreamErrorCondition.RESOURCE_CONSTRAINT, "too many unacknowledged stanzas")
            return True  # kept in the buffer: rerouted when the session ends
        self._count_out(stanza)
        # Parked (no transport) or a transport going away: the buffer keeps the stanza
        # until a resume or the end.
        if self._queue(stanza) and request:
            self._queue(ACK_REQUEST)
        return True

    def _count_out(self, stanza: Element) -> None:
        self.stanzas_out += 1
        kind = stanza_kind(stanza)
        if self.metrics is not None and kind is not None:
            self.metrics.stanzas_out.inc(kind=kind)

    def send_nonza(self, element: Element) -> None:
        """Queue a nonza (SM answers); never counted nor buffered."""
        self._queue(element)

    def request_flush(self) -> None:
        """Ask the owner to send this account's offline messages (after initial presence)."""
        self.flush_pending = True
        if self.on_flush_request is not None:
            self.on_flush_request()

    def mark_ending(self) -> None:
        """The session ends without a close request from anyone (the client closed its
        stream, an error, a failed resume): from now on it takes no stanza, and a
        shutdown does not hand it off (XEP-0198 section 7)."""
        if self.close_request is None:
            self.close_request = CloseRequest(None)

    def close(
        self,
        condition: StreamErrorCondition | None = None,
        text: str | None = None,
        *,
        handoff: bool = False,
        migrate_to: str | None = None,
    ) -> None:
        """Ask the owner task to end the stream (with a stream error when given); with
        `handoff`, a resumable session is kept for a resume instead of ended (moved to
        node `migrate_to` when given)."""
        if self.close_request is not None:
            return
        self.close_request = CloseRequest(condition, text, handoff, migrate_to)
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()
