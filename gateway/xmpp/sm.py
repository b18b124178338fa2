"""XEP-0198 Stream Management (v1.6): h counters, the unacked buffer, ack decisions; sans-I/O.

Theory of operation
-------------------
One `SMState` holds the stream-management half of one session. The I/O shell creates it
when it accepts `<enable/>` (XEP-0198 section 3: both counters start at zero "when the
server sends <enabled/>", section 4) and feeds it four facts:

* `received()`      a stanza (message, presence, iq) came from the client. Nonzas, SM
                    elements included, never count (section 1); the caller decides.
* `sent(stanza)`    a stanza is about to be written to the client (call it *before* writing).
* `acked(h)`        the client's `<a h/>` (section 4).
* `resume(h)`       the client's `<resume h/>` on a new stream (section 5).

and asks it for `answer()` (the `<a/>` for a client's `<r/>`), `unacked()` and
`snapshot()`. The names follow MongooseIM's `sm_state`: `counter_in` is the server's h
(stanzas handled from the client), `counter_out` the client's h as last acked,
`send_count` the h the client would report having handled everything we sent.

Invariants (all numbers are h values modulo 2**32, section 4; `h_add`/`h_diff` are the only
h arithmetic):

* `h_diff(send_count, counter_out)` stanzas are unacked; with buffering on they are exactly
  `buffer`, oldest first: the i-th entry (from 1) is the stanza numbered `counter_out + i`.
* An ack of h moves `counter_out` forward by `n = h_diff(h, counter_out)`. Which h are
  acceptable is decided with serial-number arithmetic (RFC 1982): n == 0 is a repeated ack
  (nothing to do); 1 <= n <= unacked drops n stanzas from the head; h at most 2**31 *behind*
  `counter_out` is `AckBehind` (a stale or reordered ack, nothing changes); anything else
  claims more than was sent: `HandledCountTooHigh` (section 6).
* `buffer_size <= buffer_max` except right after `BufferOverflow`: the stanza that broke the
  bound is appended before the raise, so `unacked()` still holds everything to reroute.
  From then on `resumable` is False for good (STYLE S7).
* A method either completes or raises with the state unchanged; the one exception is
  `BufferOverflow`, which keeps the stanza on purpose (see above).

Requests: with `ack` on, `sent()` returns True on every `ack_freq`-th stanza since the last
request (the seed's `ack_freq`); the caller then writes `ack_request()` right after the
stanza. The count restarts on `resume()`, where the caller should ask again after resending.

How the shell maps the errors (STYLE E2):

* `SmError`            -> `failed(exc.condition, exc.h, exc.text)`; the stream goes on (s6).
* `HandledCountTooHigh`-> stream error `undefined-condition` plus its `extra`, the
                          `handled_count_too_high(exc.h, exc.send_count)` child (s6); close.
* `BufferOverflow`     -> stream error `resource-constraint`; the session ends and every
                          stanza in `unacked()` is rerouted (the overflowing one included,
                          so it must not have been written).
* `AckBehind`          -> nothing on the wire; log and ignore.
* `RemoteProtocolError` from `parse_ack` -> stream error `policy-violation`; close.

Ownership: an `SMState` belongs to the task that owns its session (STYLE C3, C9) and moves
with the session on resumption. It has no I/O, clock, logging or randomness: the SM-ID is
made by a factory the caller passes to `enable()`. Nothing here awaits, so cancellation
can never observe a half-applied update.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from gateway.errors import (
    GatewayError,
    LocalProtocolError,
    RemoteProtocolError,
    StreamErrorCondition,
)
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from gateway.xmpp.sm_elements import (
    EnableRequest,
    SmCondition,
    SmError,
    ack_answer,
    check_h,
    enabled,
    failed,
    handled_count_too_high,
    parse_ack,
    parse_enable,
)

#: h values are xs:unsignedInt and wrap from 2**32-1 back to 0 (XEP-0198 section 4).
MOD: Final = 2**32
#: Serial-number window (RFC 1982): an h up to this far behind the last ack is "behind".
_HALF: Final = 2**31


def h_add(h: int, n: int = 1) -> int:
    """`h` advanced by `n` stanzas, wrapping at 2**32 (XEP-0198 section 4)."""
    return (h + n) % MOD


def h_diff(newer: int, older: int) -> int:
    """How many stanzas `newer` is ahead of `older`, modulo 2**32 (0 .. 2**32-1)."""
    return (newer - older) % MOD


def grant_max(requested: int | None, resume_timeout: float) -> int:
    """The resumption time to grant in `<enabled max/>` (XEP-0198 section 3, STYLE S7).

    Args:
        requested: the client's `max` (seconds), None when it sent none.
        resume_timeout: the configured `resume_timeout` (seconds, at least 1).

    Returns:
        `min(requested, resume_timeout)` in whole seconds; `resume_timeout` without a request.

    Raises:
        ValueError: `resume_timeout` is below one second or `requested` is not positive.
    """
    limit = int(resume_timeout)
    if limit < 1:
        raise ValueError(f"resume_timeout must be at least 1 s, got {resume_timeout!r}")
    if requested is None:
        return limit
    if requested < 1:
        raise ValueError(f"requested max must be positive, got {requested!r}")
    return min(requested, limit)


class HandledCountTooHigh(RemoteProtocolError):
    """The client acked more stanzas than were sent (XEP-0198 section 6).

    A stream error `undefined-condition` whose `extra` is the `handled_count_too_high(h,
    send_count)` child the shell adds to the `<stream:error/>` before closing.

    Args:
        h: the client's h.
        send_count: the h that acks everything we sent.
    """

    def __init__(self, h: int, send_count: int) -> None:
        super().__init__(
            StreamErrorCondition.UNDEFINED_CONDITION,
            "You acknowledged more stanzas than were sent",
            extra=handled_count_too_high(h, send_count),
        )
        self.h = h
        self.send_count = send_count


class AckBehind(GatewayError):
    """The client's h is behind its own last ack (up to 2**31 back); nothing was changed.

    Not a `ProtocolError`: the shell may log it and go on (a reordered or stale ack).

    Args:
        h: the client's h.
        counter_out: the h it acked before.
    """

    def __init__(self, h: int, counter_out: int) -> None:
        super().__init__(f"ack h={h} is behind the last ack h={counter_out}")
        self.h = h
        self.counter_out = counter_out


class BufferOverflow(RemoteProtocolError):
    """The unacked buffer went over `buffer_max`: stream error `resource-constraint`.

    The stanza that overflowed is already in the buffer and `resumable` is False; the
    session ends and everything in `SMState.unacked()` is rerouted.

    Args:
        size: the buffer's length, `buffer_max + 1` on the first overflow (or its bytes,
            with `in_bytes`).
        buffer_max: the bound (`buffer_max`, or `buffer_max_bytes` with `in_bytes`).
        in_bytes: the byte bound was crossed rather than the stanza count.
    """

    def __init__(self, size: int, buffer_max: int, *, in_bytes: bool = False) -> None:
        super().__init__(
            StreamErrorCondition.RESOURCE_CONSTRAINT,
            "unacked stanzas take too much memory" if in_bytes else "too many unacked stanzas",
        )
        self.size = size
        self.buffer_max = buffer_max


# -- state -------------------------------------------------------------------------------


class SMState:
    """The XEP-0198 state of one session; see the module docstring.

    Args:
        buffer_max: the most unacked stanzas kept; None is the seed's `infinity`.
        buffer_max_bytes: the most memory (`Element.size`) the unacked stanzas may hold;
            None is no bound. One stanza alone is always kept, however large.
        ack_freq: `sent()` asks for an `<r/>` every this many stanzas (>= 1).
        ack: whether to ask for acks at all (the seed's `ack`).
        buffering: keep sent stanzas until acked (the seed's `buffer`); needed to resume.
        counter_in: the starting server h (0 after `<enabled/>`; other values for tests).
        counter_out: the starting client h (nothing is unacked at the start).

    Raises:
        ValueError: a limit or counter is out of range.
    """

    __slots__ = (
        "_enabled",
        "ack",
        "ack_freq",
        "buffer",
        "buffer_bytes",
        "buffer_max",
        "buffer_max_bytes",
        "buffering",
        "counter_in",
        "counter_out",
        "max",
        "resumable",
        "send_count",
        "sent_since_request",
        "smid",
    )

    def __init__(
        self,
        *,
        buffer_max: int | None,
        ack_freq: int,
        ack: bool = True,
        buffering: bool = True,
        counter_in: int = 0,
        counter_out: int = 0,
        buffer_max_bytes: int | None = None,
    ) -> None:
        if buffer_max is not None and buffer_max < 1:
            raise ValueError(f"buffer_max must be positive or None, got {buffer_max!r}")
        if buffer_max_bytes is not None and buffer_max_bytes < 1:
            raise ValueError(f"buffer_max_bytes must be positive or None, got {buffer_max_bytes!r}")
        if ack_freq < 1:
            raise ValueError(f"ack_freq must be positive, got {ack_freq!r}")
        check_h(counter_in)
        check_h(counter_out)
        #: Sent stanzas not yet acked, oldest first (empty unless `buffering`).
        self.buffer: deque[Element] = deque()
        self.buffer_max = buffer_max
        #: The memory the buffer's stanzas hold (sum of `Element.size`).
        self.buffer_bytes = 0
        self.buffer_max_bytes = buffer_max_bytes
        self.ack_freq = ack_freq
        self.ack = ack
        self.buffering = buffering
        #: The server's h: stanzas received from the client, mod 2**32.
        self.counter_in = counter_in
        #: The client's h from its last ack, mod 2**32.
        self.counter_out = counter_out
        #: The h that acks everything sent so far: `counter_out` + unacked, mod 2**32.
        self.send_count = counter_out
        #: Stanzas sent since the last `<r/>` (or since resumption).
        self.sent_since_request = 0
        #: The SM-ID, set by `enable()` for a resumable stream.
        self.smid: str | None = None
        #: True while the session may be resumed; False for good after an overflow.
        self.resumable = False
        #: The granted resumption time in seconds (the `max` of `<enabled/>`), if resumable.
        self.max: int | None = None
        self._enabled = False

    @property
    def buffer_size(self) -> int:
        """Stanzas in the buffer."""
        return len(self.buffer)

    def __repr__(self) -> str:
        # Counters only: stanza payloads stay out of logs (STYLE G4).
        return (
            f"<SMState smid={self.smid!r} in={self.counter_in} out={self.counter_out} "
            f"sent={self.send_count} buffered={len(self.buffer)} resumable={self.resumable}>"
        )

    def enable(
        self, request: EnableRequest, *, resume_timeout: float, new_smid: Callable[[], str]
    ) -> Element:
        """Answer `<enable/>` (XEP-0198 sections 3, 5).

        Resumption is granted when the client asks for it and buffering is on (without a
        buffer nothing could be resent): `smid` comes from `new_smid()`, `max` is
        `grant_max(request.max, resume_timeout)`. Otherwise the answer is a bare
        `<enabled/>` and `new_smid` is not called. Whether `<enable/>` is allowed at all
        (after bind, once) is the caller's check (section 3).

        Args:
            request: the parsed `<enable/>`.
            resume_timeout: the configured `resume_timeout` in seconds.
            new_smid: makes a fresh SM-ID (>= 128 random bits, STYLE N2).

        Returns:
            The `<enabled/>` to send.

        Raises:
            LocalProtocolError: called twice.
            ValueError: `resume_timeout` below one second (see `grant_max`).
        """
        if self._enabled:
            raise LocalProtocolError("stream management is already enabled")
        if not (request.resume and self.buffering):
            self._enabled = True
            return enabled(None, None)
        granted = grant_max(request.max, resume_timeout)
        self.smid, self.max = new_smid(), granted
        self.resumable = self._enabled = True
        return enabled(self.smid, granted)

    def received(self) -> None:
        """Count a stanza from the client (XEP-0198 section 4). Never call it for nonzas."""
        self.counter_in = h_add(self.counter_in)

    def sent(self, stanza: Element) -> bool:
        """Record a stanza about to be written to the client (XEP-0198 section 4).

        Args:
            stanza: the stanza; kept in the buffer when buffering is on.

        Returns:
            True when `ack_request()` should follow it now (ack on, `ack_freq` stanzas
            since the last request); the count restarts at once.

        Raises:
            BufferOverflow: the buffer now holds more than `buffer_max` stanzas, or more
                than `buffer_max_bytes` bytes in more than one stanza. The stanza is kept
                (do not write it: it is rerouted with the rest) and `resumable` is now
                False; the request count does not advance.
        """
        self.send_count = h_add(self.send_count)
        if self.buffering:
            buffer = self.buffer
            buffer.append(stanza)
            self.buffer_bytes += stanza.size
            if self.buffer_max is not None and len(buffer) > self.buffer_max:
                self.resumable = False
                raise BufferOverflow(len(buffer), self.buffer_max)
            limit = self.buffer_max_bytes
            if limit is not None and self.buffer_bytes > limit and len(buffer) > 1:
                self.resumable = False
                raise BufferOverflow(self.buffer_bytes, limit, in_bytes=True)
        if not self.ack:
            return False
        count = self.sent_since_request + 1
        if count >= self.ack_freq:
            self.sent_since_request = 0
            return True
        self.sent_since_request = count
        return False

    def acked(self, h: int) -> list[Element]:
        """Apply the client's `<a h/>` (XEP-0198 section 4; limits in section 6).

        Args:
            h: the client's h (from `parse_ack`).

        Returns:
            The newly acked stanzas, oldest first (`[]` for a repeated ack, or when
            buffering is off).

        Raises:
            HandledCountTooHigh: h acks more than was sent; nothing changed.
            AckBehind: h is behind the last ack; nothing changed.
            ValueError: h is not in 0 .. 2**32-1.
        """
        check_h(h)
        count = h_diff(h, self.counter_out)
        if count == 0:
            return []
        if count > h_diff(self.send_count, self.counter_out):
            if count >= _HALF:  # h_diff(counter_out, h) in 1 .. 2**31 (RFC 1982)
                raise AckBehind(h, self.counter_out)
            raise HandledCountTooHigh(h, self.send_count)
        self.counter_out = h
        if not self.buffering:
            return []
        popleft = self.buffer.popleft
        done = [popleft() for _ in range(count)]
        self.buffer_bytes -= sum(stanza.size for stanza in done)
        return done

    def answer(self) -> Element:
        """The `<a h=counter_in/>` that answers the client's `<r/>` (XEP-0198 section 4)."""
        return ack_answer(self.counter_in)

    def resume(self, h: int) -> list[Element]:
        """Apply `<resume h/>` and list what to resend (XEP-0198 section 5).

        h is handled as in `acked()`; the stanzas still unacked are returned, oldest first,
        and stay in the buffer until a later `<a/>` acks them. The request count restarts.
        The caller answers `resumed(smid, counter_in)` first, then resends the list.

        Args:
            h: the client's h from `<resume/>`.

        Returns:
            The stanzas to resend, in order.

        Raises:
            SmError: ITEM_NOT_FOUND (with h=counter_in) when the session is not resumable.
            HandledCountTooHigh: as in `acked()`; nothing changed.
            AckBehind: as in `acked()`; nothing changed.
            ValueError: h is not in 0 .. 2**32-1.
        """
        if not self.resumable:
            raise SmError(SmCondition.ITEM_NOT_FOUND, h=self.counter_in)
        self.acked(h)
        self.sent_since_request = 0
        return list(self.buffer)

    @classmethod
    def restored(
        cls,
        *,
        smid: str,
        max_: int,
        counter_in: int,
        counter_out: int,
        buffer: Sequence[Element],
        buffer_max: int | None,
        ack_freq: int,
        ack: bool = True,
        buffer_max_bytes: int | None = None,
    ) -> SMState:
        """A resumable state rebuilt from a hand-off snapshot (a session kept across a
        restart or moved to another node; DESIGN section 6).

        The result is what `enable()` then the traffic had left: `buffer` holds the
        unacked stanzas, oldest first, so `send_count` is `counter_out` + len(buffer).
        A buffer over `buffer_max` or `buffer_max_bytes` (a limit was lowered meanwhile)
        is kept whole;
        the next `sent()` overflows.

        Raises:
            ValueError: a limit or counter is out of range.
        """
        state = cls(
            buffer_max=buffer_max,
            ack_freq=ack_freq,
            ack=ack,
            buffering=True,
            counter_in=counter_in,
            counter_out=counter_out,
            buffer_max_bytes=buffer_max_bytes,
        )
        if max_ < 1:
            raise ValueError(f"max must be positive, got {max_!r}")
        state.buffer.extend(buffer)
        state.buffer_bytes = sum(stanza.size for stanza in buffer)
        state.send_count = h_add(counter_out, len(state.buffer))
        state.smid, state.max = smid, max_
        state.resumable = state._enabled = True
        return state

    def unacked(self) -> list[Element]:
        """The buffered stanzas, oldest first (to reroute when the session ends, s4)."""
        return list(self.buffer)

    def snapshot(self) -> tuple[str | None, int]:
        """`(smid, counter_in)`: what stale_h keeps after the session ends (section 5)."""
        return (self.smid, self.counter_in)


# -- nonzas from the client of a bound session -------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """Send `element` (a nonza, never counted) back to the client."""

    element: Element


@dataclass(frozen=True, slots=True)
class EnableAsked:
    """The client asked to enable stream management: the shell makes an `SMState` from
    its config, calls `enable(request, ...)` and sends what it returns."""

    request: EnableRequest


@dataclass(frozen=True, slots=True)
class Acked:
    """The client acked; `stanzas` are the newly acknowledged ones (it is alive, and
    there may be room for more)."""

    stanzas: list[Element]


@dataclass(frozen=True, slots=True)
class Ignored:
    """Nothing to do; `reason` is for a debug log line."""

    reason: str


NonzaAction = Answer | EnableAsked | Acked | Ignored


def handle_nonza(sm: SMState | None, element: Element) -> NonzaAction:
    """What a nonza from the client of a bound session calls for (XEP-0198).

    Args:
        sm: the session's state, None before `<enable/>`.
        element: a top-level element that is not a stanza.

    Returns:
        The action; the state is updated already for `<a/>`.

    Raises:
        RemoteProtocolError: `unsupported-stanza-type` for anything but the SM
            elements a client may send; `policy-violation` for an `<a/>` without a valid
            h; `HandledCountTooHigh` (undefined-condition) for an `<a/>` acking more
            than was sent (section 6).
    """
    name = element.name
    if element.namespace != ns.SM or name not in ("enable", "r", "a", "resume"):
        raise RemoteProtocolError(
            StreamErrorCondition.UNSUPPORTED_STANZA_TYPE, f"<{name}/> is not supported"
        )
    if name == "enable":
        if sm is not None:
            # Section 3: a second <enable/> is an unexpected request.
            return Answer(failed(SmCondition.UNEXPECTED_REQUEST))
        try:
            return EnableAsked(parse_enable(element))
        except SmError as exc:
            return Answer(failed(exc.condition))
    if name == "resume":
        # Section 5: resumption comes instead of binding, not after it.
        return Answer(failed(SmCondition.UNEXPECTED_REQUEST))
    if sm is None:
        # <failed/> is not defined for <r/> and <a/> (section 6).
        return Ignored(f"<{name}/> before <enable/>")
    if name == "r":
        return Answer(sm.answer())
    h = parse_ack(element)
    try:
        return Acked(sm.acked(h))
    except AckBehind:
        return Ignored(f"<a h='{h}'/> behind the last ack")
