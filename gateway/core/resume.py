"""XEP-0198 resumption on this node: slots, parking and the loan (STYLE C9).

Theory of operation
-------------------
A session that enabled resumable stream management gets a `ResumeSlot` keyed by its SM
id. The session's own connection task keeps the session for its whole life ("lend, don't
give"): when its transport is lost it *parks* in `resume_session`, waiting on the slot's
receive channel, while the router keeps delivering into the session's SM buffer.

A new connection that sends `<resume previd h/>` (after SASL, before bind) calls
`claim(smid, jid)`. A slot that is unknown, ended, already claimed, or belongs to another
user answers None (the caller sends `<failed><item-not-found/>`, with the stale h when
known); otherwise the slot turns CLAIMED and the `Loan` is put into the slot's channel
in the same synchronous step (`send_nowait` on a buffer of one). Because claiming and ending
are both synchronous state changes on one trio thread, they are totally ordered: either the
loan is already in the channel when the parked task gives up (it checks the channel
once more and resumes), or the slot is ENDED before the claim (the claim fails). Two
connections racing to resume: the first claim wins, the second sees CLAIMED and fails.

A session still attached to a transport (the client reconnected before we noticed the old
socket died) receives the loan in its `watch` task, which only cancels the serving
scope; the session task then closes the old transport with `conflict` and adopts the new
one. The lender waits on `Loan.done` until the session task has finished with the
transport it lent, then returns.

Limits: `max_parked_per_user` and `max_parked` bound the parked slots; parking beyond a
limit evicts the oldest parked slot (its session ends cleanly and its stanzas are rerouted).
"""

from __future__ import annotations

import contextlib
import enum
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
import trio

from gateway.core.metrics import LedgerState, Metrics, ResumeFailure
from gateway.core.session import CLOSE_GRACE, Session
from gateway.errors import StreamErrorCondition
from gateway.net.wire import Wire
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID
from gateway.xmpp.negotiation import C2SNegotiation
from gateway.xmpp.parser import Event
from gateway.xmpp.sm import AckBehind, HandledCountTooHigh
from gateway.xmpp.sm_elements import SmError, handled_count_too_high

log = structlog.get_logger(module=__name__)


class SlotState(enum.Enum):
    SERVING = "serving"  # attached to a live transport
    PARKED = "parked"  # transport lost, waiting for a resume
    CLAIMED = "claimed"  # a loan is in the channel
    ENDED = "ended"  # the session is gone; the smid is only in stale_h now


@dataclass(eq=False)
class Loan:
    """A resuming connection's transport (its wire, negotiation state and pipelined
    events), lent to the session that owns the SM id ("lend, don't give", STYLE C9):
    the session answers through `accepted`, and sets `done` when it no longer uses the
    transport. One word for it: a session *handed off* is kept across a restart
    (`gateway.core.handoff`), stanzas *rerouted* when a session ends (`core.ending`)."""

    wire: Wire
    negotiation: C2SNegotiation
    pending: list[Event]
    h: int
    conn_id: str
    # Set by the session task once it decided (resumed is then True or False).
    accepted: trio.Event = field(default_factory=trio.Event)
    # Set by the session task when it no longer uses the lent transport.
    done: trio.Event = field(default_factory=trio.Event)
    resumed: bool = False
    lost_transport: bool = False
    # Why the resume was refused (when `resumed` stays False), set by whoever refused it
    # (`ResumeRegistry.claim`, `accept_loan`); the lender counts it when it answers
    # `<failed/>`. Unset, the id is as good as unknown (item-not-found).
    refusal: ResumeFailure = ResumeFailure.UNKNOWN_SMID


@dataclass(eq=False)
class ResumeSlot:
    smid: str
    jid: JID
    session: Session
    send_channel: trio.MemorySendChannel[Loan]
    receive_channel: trio.MemoryReceiveChannel[Loan]
    state: SlotState = SlotState.SERVING
    parked_at: float = 0.0
    evict_scope: trio.CancelScope | None = None


class ResumeRegistry:
    """The SM ids with a live session on this node (the local half of `sm_session`)."""

    def __init__(self, *, max_parked_per_user: int, max_parked: int) -> None:
        self.slots: dict[str, ResumeSlot] = {}
        self.parked: OrderedDict[str, ResumeSlot] = OrderedDict()
        # The same parked slots by user, oldest first: the per-user limit is checked in
        # O(that user's slots), not O(all parked) (10,000 sessions parked at once, after
        # a restart or a network outage, made parking quadratic).
        self.parked_by_jid: dict[JID, OrderedDict[str, ResumeSlot]] = {}
        self.max_parked_per_user = max_parked_per_user
        self.max_parked = max_parked

    def create(self, smid: str, jid: JID, session: Session) -> ResumeSlot:
        # A buffer of one: the loan is put in with send_nowait in the same step as the
        # claim, and only one claim per park can succeed.
        send_channel, receive_channel = trio.open_memory_channel[Loan](1)
        slot = ResumeSlot(smid, jid, session, send_channel, receive_channel)
        self.slots[smid] = slot
        return slot

    def claim(self, smid: str, jid: JID, loan: Loan) -> ResumeSlot | None:
        """Give `loan` to the session of `smid`, if `jid` may resume it right now;
        a refusal (None) says why in `loan.refusal`."""
        slot = self.slots.get(smid)
        if slot is None or slot.state is SlotState.ENDED:
            refused = ResumeFailure.UNKNOWN_SMID
        elif slot.jid != jid:
            refused = ResumeFailure.OTHER_USER
        elif slot.state is SlotState.CLAIMED:
            refused = ResumeFailure.ALREADY_CLAIMED
        else:
            slot.send_channel.send_nowait(loan)
            self._unpark(slot)
            slot.state = SlotState.CLAIMED
            return slot
        loan.refusal = refused
        return None

    def park(self, slot: ResumeSlot, now: float) -> list[ResumeSlot]:
        """Mark `slot` parked; return the parked slots to evict to stay within the limits."""
        slot.state = SlotState.PARKED
        slot.parked_at = now
        self.parked[slot.smid] = slot
        same_user = self.parked_by_jid.setdefault(slot.jid, OrderedDict())
        same_user[slot.smid] = slot
        evict: list[ResumeSlot] = []
        while len(same_user) > self.max_parked_per_user:
            _, victim = same_user.popitem(last=False)
            self.parked.pop(victim.smid, None)
            evict.append(victim)
        while len(self.parked) > self.max_parked:
            _, victim = self.parked.popitem(last=False)
            self._unpark(victim)
            evict.append(victim)
        return evict

    def serving(self, slot: ResumeSlot) -> None:
        """The session adopted a transport again (after a resume)."""
        self._unpark(slot)
        slot.state = SlotState.SERVING

    def end(self, slot: ResumeSlot) -> Loan | None:
        """The session ends. Returns a loan that was claimed in the meantime, if any.

        When a claim came first the session must serve it instead of ending (the caller
        then calls `serving`); otherwise the slot is gone and later claims fail.
        """
        try:
            loan = slot.receive_channel.receive_nowait()
        except trio.WouldBlock:
            loan = None
        if loan is not None:
            return loan
        self._unpark(slot)
        slot.state = SlotState.ENDED
        if self.slots.get(slot.smid) is slot:
            del self.slots[slot.smid]
        return None

    def _unpark(self, slot: ResumeSlot) -> None:
        self.parked.pop(slot.smid, None)
        same_user = self.parked_by_jid.get(slot.jid)
        if same_user is not None:
            same_user.pop(slot.smid, None)
            if not same_user:
                del self.parked_by_jid[slot.jid]

    def parked_count(self, jid: JID | None = None) -> int:
        if jid is None:
            return len(self.parked)
        return len(self.parked_by_jid.get(jid, ()))


async def wait_parked(
    registry: ResumeRegistry, slot: ResumeSlot, session: Session, deadline: float
) -> Loan | None:
    """Park `session` (its transport is gone) until a resume's loan or `deadline`.

    Parking may evict older parked sessions (the registry's limits): they are closed and
    end normally. Stanzas routed meanwhile go into the session's SM buffer only. A close
    of the session (`Session.close`) ends the wait at once.

    Returns:
        The loan, or None when the deadline passed or the session was closed.
    """
    assert session.sm is not None
    session.outgoing = None  # stanzas now only enter the SM buffer
    now = trio.current_time()
    for victim in registry.park(slot, now):
        log.info(
            "sm_parked_session_evicted", smid=victim.smid, victim_conn_id=victim.session.conn_id
        )
        victim.session.close(None, "too many parked sessions")
    log.info(
        "session_parked",
        timeout=round(max(deadline - now, 0.0), 3),
        unacked=session.sm.buffer_size,
    )
    with trio.CancelScope(deadline=deadline) as park_scope:
        session.cancel_scope = park_scope
        if session.close_request is not None:
            park_scope.cancel()
        return await slot.receive_channel.receive()
    return None


async def accept_loan(session: Session, loan: Loan, metrics: Metrics) -> list[Element] | None:
    """Apply a resume's h to the session (XEP-0198 section 5) and decide.

    The stanzas h acknowledges leave the ledger as ACKED (counted in `metrics`); a
    refusal says why in `loan.refusal`.

    Returns:
        The stanzas to resend after `<resumed/>`, or None when the resume is refused:
        the session was closed in the same step as the claim, or is no longer resumable
        (the lender answers `<failed/>`), or the client's h acks more than was sent (its
        transport is then closed here with `undefined-condition`). Either way the lender
        has its answer (`accepted`, and `done` when its transport is gone).
    """
    sm = session.sm
    assert sm is not None
    refused = ResumeFailure.SESSION_CLOSING
    if session.close_request is None:
        buffered = sm.buffer_size
        try:
            resend = sm.resume(loan.h)
        except AckBehind:
            return sm.unacked()
        except SmError:
            # No longer resumable: its buffer overflowed while parked.
            refused = ResumeFailure.NOT_RESUMABLE
        except HandledCountTooHigh as exc:
            refused = ResumeFailure.HANDLED_COUNT_TOO_HIGH
            log.info("sm_resume_bad_h", h=exc.h, send_count=exc.send_count)
            neg = loan.negotiation
            neg.queue_stream_error(
                StreamErrorCondition.UNDEFINED_CONDITION,
                "you acknowledged more stanzas than were sent",
                handled_count_too_high(exc.h, exc.send_count),
            )
            with trio.move_on_after(CLOSE_GRACE, shield=True):
                with contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, OSError
                ):
                    await loan.wire.write(neg.take_output())
                await loan.wire.aclose()
            loan.lost_transport = True
            loan.done.set()
        else:
            # resume() leaves the unacked stanzas in the buffer: the rest were acked.
            metrics.ledger.inc(buffered - len(resend), state=LedgerState.ACKED)
            return resend
    loan.refusal = refused
    loan.resumed = False
    loan.accepted.set()
    return None


async def watch(slot: ResumeSlot, on_loan: Callable[[Loan], None]) -> None:
    """While the session is served: receive a resume's loan and pass it on (which
    only ends the serving; the session task adopts it, STYLE C9)."""
    on_loan(await slot.receive_channel.receive())
