"""Serving one transport of a bound session: the reader, the single writer, the ack timer.

Theory of operation
-------------------
A `Pump` lives for one transport of a session (the session's first, or one lent by a
resume); `serve()` runs until something ends the serving and says what (`Outcome`).

* The reader is the calling task: it reads parser events (with the unfinished-stanza
  clock of `StanzaTimer`) and hands each element to the connection's `on_element`.
* The writer is a child task, the only one that writes: it drains the session's bounded
  outgoing channel in batches. Its write is shielded: serving that ends (a close, a
  loan, shutdown) gives the write in progress `CLOSE_GRACE` to finish, because half a
  stanza followed by a stream error is unreadable; a write still unfinished then is cut,
  `write_cut` is set and nothing more may be written to this transport.
* The ack timer: when the writer sends an `<r/>`, the reader's scope gets a deadline of
  `ack_timeout` (set before the write, which an answer may overtake); an `<a/>`
  (`client_alive`) lifts it. A deadline that passes ends
  serving with `ACK_TIMEOUT` (the transport counts as lost).
* Companions (the offline flush, the watch for a loan) are started by the
  connection on `nursery` while serving.

Others end the serving through the session (`Session.close` cancels `session.cancel_scope`,
which is this serving's scope) or, for a resume, by setting `loan_in` and cancelling it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Awaitable, Callable

import trio

from gateway.config import GatewayConfig
from gateway.core.reading import StanzaTimer
from gateway.core.resume import Loan
from gateway.core.session import ACK_REQUEST, CLOSE_GRACE, Session
from gateway.errors import RemoteProtocolError, StreamErrorCondition
from gateway.net.wire import TransportLost, Wire
from gateway.xmpp.element import Element
from gateway.xmpp.parser import ElementReceived, Event, StreamClosed, StreamOpened


class Outcome(enum.Enum):
    """How serving one transport ended."""

    CLIENT_CLOSED = "client_closed"
    TRANSPORT_LOST = "transport_lost"
    ACK_TIMEOUT = "ack_timeout"
    CLOSE_REQUESTED = "close_requested"
    PROTOCOL_ERROR = "protocol_error"
    HANDOVER = "loan"


class Pump:
    """Serves `session` on `wire` (see the module docstring).

    Args:
        config: the gateway's configuration (ack_timeout).
        wire: the transport.
        session: the bound session; its `outgoing` channel feeds `outgoing`.
        outgoing: the receiving end of the session's outgoing channel.
        timer: the connection's unfinished-stanza clock.
        on_element: handles one element from the client (stanza or nonza).
        on_written: called after each write (room for the offline flush).
        pending: events already parsed (pipelined), handled before reading.
        request_sent_at: when an `<r/>` was written before this pump existed (the one
            after a resend on resumption): the ack timer starts from it.
    """

    def __init__(
        self,
        config: GatewayConfig,
        wire: Wire,
        session: Session,
        outgoing: trio.MemoryReceiveChannel[Element],
        timer: StanzaTimer,
        on_element: Callable[[Element], Awaitable[None]],
        on_written: Callable[[], None],
        *,
        pending: list[Event],
        request_sent_at: float | None,
    ) -> None:
        self.wire = wire
        self.session = session
        self.outgoing = outgoing
        self.timer = timer
        self.on_element = on_element
        self.on_written = on_written
        self.pending = pending
        self.request_sent_at = request_sent_at
        self.ack_timeout = config.modules.mod_stream_management.ack_timeout
        #: The serving nursery, while serving: companions are started on it.
        self.nursery: trio.Nursery | None = None
        #: A resume's loan received while serving (set by the watch task).
        self.loan_in: Loan | None = None
        self.protocol_error: RemoteProtocolError | None = None
        self.writer_lost = False
        #: The batch being written: rerouted (without SM) if the session ends.
        self.in_flight: list[Element] = []
        #: A write was cut off mid-way: nothing more may be written to this transport.
        self.write_cut = False
        self._ack_scope: trio.CancelScope | None = None
        self._write_scope: trio.CancelScope | None = None

    async def serve(self, start: Callable[[trio.Nursery], None]) -> Outcome:
        """Serve until something ends it; `start` starts companions on the nursery."""
        session = self.session
        outcome = Outcome.CLOSE_REQUESTED
        with trio.CancelScope() as serve_scope:
            session.cancel_scope = serve_scope
            if session.close_request is not None:
                serve_scope.cancel()
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._writer)
                start(nursery)
                try:
                    outcome = await self._reader()
                except RemoteProtocolError as exc:
                    self.protocol_error = exc
                    outcome = Outcome.PROTOCOL_ERROR
                except (TransportLost, trio.BrokenResourceError, trio.ClosedResourceError):
                    outcome = Outcome.TRANSPORT_LOST
                except OSError:
                    outcome = Outcome.TRANSPORT_LOST
                finally:
                    self._bound_write()
                nursery.cancel_scope.cancel()
        self.nursery = None
        if self._received_loan() is not None:
            return Outcome.HANDOVER
        if session.close_request is not None:
            return Outcome.CLOSE_REQUESTED
        if self.writer_lost:
            return Outcome.TRANSPORT_LOST
        return outcome

    def receive_loan(self, loan: Loan) -> None:
        """A resume claimed the session while it is served here: end the serving."""
        self.loan_in = loan
        if self.session.cancel_scope is not None:
            self.session.cancel_scope.cancel()

    def client_alive(self) -> None:
        """The client acked: the ack deadline is lifted."""
        if self._ack_scope is not None:
            self._ack_scope.deadline = math.inf

    def _received_loan(self) -> Loan | None:
        # A method, so type checkers do not narrow the attribute the watch task sets.
        return self.loan_in

    async def _reader(self) -> Outcome:
        outcome = Outcome.ACK_TIMEOUT
        with trio.CancelScope() as ack_scope:
            # Only the ack deadline (set by the writer after an <r/>) cancels this scope.
            self._ack_scope = ack_scope
            if self.request_sent_at is not None and self.ack_timeout:
                ack_scope.deadline = self.request_sent_at + self.ack_timeout
            self.request_sent_at = None
            outcome = await self._read_loop()
        self._ack_scope = None
        return outcome

    async def _read_loop(self) -> Outcome:
        events, self.pending = self.pending, []
        while True:
            for event in events:
                if isinstance(event, ElementReceived):
                    await self.on_element(event.element)
                elif isinstance(event, StreamClosed):
                    return Outcome.CLIENT_CLOSED
                elif isinstance(event, StreamOpened):
                    raise RemoteProtocolError(
                        StreamErrorCondition.NOT_WELL_FORMED, "stream header inside the stream"
                    )
            events = await self.timer.read(self.wire)

    async def _writer(self) -> None:
        receive = self.outgoing
        session = self.session
        try:
            async for element in receive:
                batch = [element]
                while True:
                    try:
                        batch.append(receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                self.in_flight = batch
                scope = self._ack_scope
                armed = math.inf  # the deadline this batch's <r/> set, if it set one
                if (
                    self.ack_timeout
                    and scope is not None
                    and scope.deadline == math.inf
                    and any(e is ACK_REQUEST for e in batch)
                ):
                    # Armed before the write: a fast client's <a/> can be read (and lift
                    # the deadline) before the write returns.
                    armed = scope.deadline = trio.current_time() + self.ack_timeout
                with trio.CancelScope(shield=True) as write_scope:
                    self._write_scope = write_scope
                    await self.wire.write(batch)
                self._write_scope = None
                if write_scope.cancelled_caught:
                    self.write_cut = True
                    return
                if scope is not None and armed != math.inf and scope.deadline == armed:
                    # Not answered yet: the client has had `ack_timeout` since the <r/>
                    # reached it, not since a long write began.
                    scope.deadline = trio.current_time() + self.ack_timeout
                self.in_flight = []
                session.queued_bytes -= sum(e.size for e in batch)
                self.on_written()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.writer_lost = True
            if session.cancel_scope is not None:
                session.cancel_scope.cancel()

    def _bound_write(self) -> None:
        """Serving ends: a write in progress may finish within CLOSE_GRACE, no longer."""
        scope = self._write_scope
        if scope is not None and scope.deadline == math.inf:
            scope.deadline = trio.current_time() + CLOSE_GRACE
