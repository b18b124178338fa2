"""XEP-0198 stream-management state: builders, parsers, counters, acks, resumption.

Section numbers (s3, s4, ...) are those of XEP-0198 v1.6.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from gateway.errors import (
    GatewayError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    StanzaErrorCondition,
    StreamErrorCondition,
)
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import XML_LANG, Element
from gateway.xmpp.serializer import serialize
from gateway.xmpp.sm import (
    MOD,
    AckBehind,
    Acked,
    Answer,
    BufferOverflow,
    EnableAsked,
    HandledCountTooHigh,
    Ignored,
    SMState,
    grant_max,
    h_add,
    h_diff,
    handle_nonza,
)
from gateway.xmpp.sm_elements import (
    EnableRequest,
    ResumeRequest,
    SmCondition,
    SmError,
    ack_answer,
    ack_request,
    enabled,
    failed,
    handled_count_too_high,
    parse_ack,
    parse_enable,
    parse_resume,
    resumed,
    sm_feature,
)
from gateway.xmpp.stanza import stream_error

SM = 'xmlns="urn:xmpp:sm:3"'
NEAR_WRAP = MOD - 3


def msg(n: int) -> Element:
    """A distinct stanza, told apart by its id."""
    return Element(ns.CLIENT, "message", {"id": f"m{n}"}, [Element(ns.CLIENT, "body", None, ["x"])])


def sm_el(name: str, **attrs: str) -> Element:
    return Element(ns.SM, name, attrs)


def new_state(
    *,
    buffer_max: int | None = 100,
    ack_freq: int = 1,
    ack: bool = True,
    buffering: bool = True,
    counter_in: int = 0,
    counter_out: int = 0,
) -> SMState:
    return SMState(
        buffer_max=buffer_max,
        ack_freq=ack_freq,
        ack=ack,
        buffering=buffering,
        counter_in=counter_in,
        counter_out=counter_out,
    )


def resumable_state(
    *, buffer_max: int | None = 100, ack_freq: int = 1, counter_in: int = 0, counter_out: int = 0
) -> SMState:
    state = new_state(
        buffer_max=buffer_max, ack_freq=ack_freq, counter_in=counter_in, counter_out=counter_out
    )
    state.enable(EnableRequest(resume=True, max=None), resume_timeout=600, new_smid=lambda: "sm1")
    return state


def send(state: SMState, count: int, start: int = 0) -> list[Element]:
    stanzas = [msg(start + i) for i in range(count)]
    for stanza in stanzas:
        state.sent(stanza)
    return stanzas


# -- h arithmetic (s4) --------------------------------------------------------------------


def test_h_add_wraps_from_2_32_minus_1_to_zero_xep0198_s4() -> None:
    assert h_add(MOD - 1) == 0
    assert h_add(MOD - 2, 5) == 3
    assert h_add(7) == 8


def test_h_diff_counts_forward_across_the_wrap() -> None:
    assert h_diff(3, MOD - 2) == 5
    assert h_diff(5, 5) == 0
    assert h_diff(4, 5) == MOD - 1


# -- builders ---------------------------------------------------------------------------


def test_sm_feature_is_an_empty_sm_element_xep0198_s2() -> None:
    assert serialize(sm_feature()) == f"<sm {SM}/>".encode()


def test_enabled_for_a_resumable_stream_carries_id_resume_and_max_xep0198_s5() -> None:
    expected = f'<enabled {SM} id="abc" resume="true" max="300"/>'
    assert serialize(enabled("abc", 300)) == expected.encode()
    assert enabled("abc", None) == sm_el("enabled", id="abc", resume="true")


def test_enabled_without_smid_is_bare_xep0198_s3() -> None:
    assert serialize(enabled(None, None)) == f"<enabled {SM}/>".encode()


def test_enabled_refuses_max_without_smid_or_a_non_positive_max() -> None:
    with pytest.raises(ValueError, match="resumable"):
        enabled(None, 60)
    with pytest.raises(ValueError, match="positive"):
        enabled("abc", 0)


def test_resumed_carries_previd_and_h_xep0198_s5() -> None:
    assert serialize(resumed("abc", 7)) == f'<resumed {SM} previd="abc" h="7"/>'.encode()


def test_failed_carries_a_stanza_error_condition_xep0198_s6() -> None:
    assert serialize(failed(SmCondition.UNEXPECTED_REQUEST)) == (
        f'<failed {SM}><unexpected-request xmlns="{ns.STANZAS_ERRORS}"/></failed>'.encode()
    )


def test_failed_for_an_expired_session_carries_h_xep0198_s5() -> None:
    assert serialize(failed(SmCondition.ITEM_NOT_FOUND, h=42)) == (
        f'<failed {SM} h="42"><item-not-found xmlns="{ns.STANZAS_ERRORS}"/></failed>'.encode()
    )


def test_failed_with_text_puts_it_after_the_condition() -> None:
    assert failed(SmCondition.BAD_REQUEST, text="no") == Element(
        ns.SM,
        "failed",
        None,
        [
            Element(ns.STANZAS_ERRORS, "bad-request"),
            Element(ns.STANZAS_ERRORS, "text", {XML_LANG: "en"}, ["no"]),
        ],
    )


def test_failed_may_be_empty_but_text_needs_a_condition() -> None:
    assert serialize(failed()) == f"<failed {SM}/>".encode()
    with pytest.raises(ValueError, match="condition"):
        failed(text="why")


def test_ack_request_and_answer_shapes_xep0198_s4() -> None:
    assert serialize(ack_request()) == f"<r {SM}/>".encode()
    assert serialize(ack_answer(0)) == f'<a {SM} h="0"/>'.encode()
    assert serialize(ack_answer(MOD - 1)) == f'<a {SM} h="4294967295"/>'.encode()


@pytest.mark.parametrize("h", [-1, MOD])
def test_builders_refuse_h_outside_unsigned_32_bits(h: int) -> None:
    with pytest.raises(ValueError, match="h must be"):
        ack_answer(h)
    with pytest.raises(ValueError, match="h must be"):
        resumed("abc", h)
    with pytest.raises(ValueError, match="h must be"):
        failed(SmCondition.ITEM_NOT_FOUND, h=h)
    with pytest.raises(ValueError, match="h must be"):
        handled_count_too_high(h, 0)


def test_handled_count_too_high_goes_into_an_undefined_condition_stream_error_xep0198_s6() -> None:
    error = stream_error(StreamErrorCondition.UNDEFINED_CONDITION).append(
        handled_count_too_high(10, 8)
    )
    expected = (
        f'<stream:error><undefined-condition xmlns="{ns.STREAMS_ERRORS}"/>'
        f'<handled-count-too-high {SM} h="10" send-count="8"/></stream:error>'
    )
    assert serialize(error) == expected.encode()


def test_sm_conditions_are_rfc6120_stanza_error_conditions_xep0198_s6() -> None:
    for condition in SmCondition:
        assert StanzaErrorCondition(condition.value).value == condition.value


# -- parsers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        ({}, EnableRequest(resume=False, max=None)),
        ({"resume": "true"}, EnableRequest(resume=True, max=None)),
        ({"resume": "1"}, EnableRequest(resume=True, max=None)),
        ({"resume": "false"}, EnableRequest(resume=False, max=None)),
        ({"resume": "0"}, EnableRequest(resume=False, max=None)),
        ({"resume": " true\n"}, EnableRequest(resume=True, max=None)),
        ({"resume": "true", "max": "600"}, EnableRequest(resume=True, max=600)),
        ({"max": "+1"}, EnableRequest(resume=False, max=1)),
        ({"max": "99999999999999999999"}, EnableRequest(resume=False, max=99999999999999999999)),
    ],
)
def test_parse_enable_reads_resume_as_xs_boolean_and_max_xep0198_s3(
    attrs: dict[str, str], expected: EnableRequest
) -> None:
    assert parse_enable(sm_el("enable", **attrs)) == expected


@pytest.mark.parametrize(
    "attrs",
    [
        {"resume": "yes"},
        {"resume": "TRUE"},
        {"resume": ""},
        {"max": "0"},
        {"max": "-5"},
        {"max": "1.5"},
        {"max": "abc"},
        {"max": ""},
        {"max": "\u0663"},  # ARABIC-INDIC DIGIT THREE: int() takes it, XML Schema does not
        {"max": "9" * 5000},  # beyond int()'s digit limit
    ],
)
def test_parse_enable_refuses_bad_attributes_with_bad_request_xep0198_s6(
    attrs: dict[str, str],
) -> None:
    with pytest.raises(SmError) as info:
        parse_enable(sm_el("enable", **attrs))
    assert info.value.condition is SmCondition.BAD_REQUEST
    assert info.value.h is None


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        ({"previd": "abc", "h": "0"}, ResumeRequest("abc", 0)),
        ({"previd": "abc", "h": "4294967295"}, ResumeRequest("abc", MOD - 1)),
        ({"previd": "abc", "h": "+7"}, ResumeRequest("abc", 7)),
        ({"previd": "abc", "h": "007"}, ResumeRequest("abc", 7)),
    ],
)
def test_parse_resume_reads_previd_and_h_xep0198_s5(
    attrs: dict[str, str], expected: ResumeRequest
) -> None:
    assert parse_resume(sm_el("resume", **attrs)) == expected


@pytest.mark.parametrize(
    "attrs",
    [
        {"h": "1"},
        {"previd": "", "h": "1"},
        {"previd": "abc"},
        {"previd": "abc", "h": ""},
        {"previd": "abc", "h": "-1"},
        {"previd": "abc", "h": "4294967296"},
        {"previd": "abc", "h": "0x10"},
    ],
)
def test_parse_resume_refuses_missing_previd_or_bad_h_with_bad_request_xep0198_s5(
    attrs: dict[str, str],
) -> None:
    with pytest.raises(SmError) as info:
        parse_resume(sm_el("resume", **attrs))
    assert info.value.condition is SmCondition.BAD_REQUEST


def test_parse_ack_reads_h_xep0198_s4() -> None:
    assert parse_ack(sm_el("a", h="0")) == 0
    assert parse_ack(sm_el("a", h="4294967295")) == MOD - 1


@pytest.mark.parametrize("attrs", [{}, {"h": ""}, {"h": "x"}, {"h": "-1"}, {"h": "4294967296"}])
def test_parse_ack_with_a_bad_h_is_a_policy_violation_stream_error_xep0198_s4(
    attrs: dict[str, str],
) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_ack(sm_el("a", **attrs))
    assert info.value.condition is StreamErrorCondition.POLICY_VIOLATION


@pytest.mark.parametrize(
    ("parse", "element"),
    [
        (parse_enable, Element(ns.SM, "resume")),
        (parse_resume, Element(ns.SM, "enable")),
        (parse_ack, Element(ns.CLIENT, "a", {"h": "1"})),
    ],
)
def test_parsers_given_the_wrong_element_are_our_bug(parse: object, element: Element) -> None:
    assert callable(parse)
    with pytest.raises(LocalProtocolError):
        parse(element)


# -- errors -----------------------------------------------------------------------------


def test_error_classes_map_to_what_the_shell_sends() -> None:
    too_high = HandledCountTooHigh(10, 8)
    assert isinstance(too_high, RemoteProtocolError)
    assert too_high.condition is StreamErrorCondition.UNDEFINED_CONDITION
    assert (too_high.h, too_high.send_count) == (10, 8)
    assert too_high.extra == handled_count_too_high(10, 8)
    overflow = BufferOverflow(101, 100)
    assert isinstance(overflow, RemoteProtocolError)
    assert overflow.condition is StreamErrorCondition.RESOURCE_CONSTRAINT
    assert (overflow.size, overflow.buffer_max) == (101, 100)
    behind = AckBehind(3, 5)
    assert isinstance(behind, GatewayError)
    assert not isinstance(behind, (ProtocolError, SmError))
    failure = SmError(SmCondition.ITEM_NOT_FOUND, h=4, text="gone")
    assert (failure.condition, failure.h, failure.text) == (SmCondition.ITEM_NOT_FOUND, 4, "gone")
    assert str(failure) == "item-not-found: gone"
    assert str(SmError(SmCondition.BAD_REQUEST)) == "bad-request"


# -- enable (s3, s5) --------------------------------------------------------------------


def test_grant_max_is_the_smaller_of_client_max_and_resume_timeout_xep0198_s3() -> None:
    assert grant_max(None, 600) == 600
    assert grant_max(30, 600) == 30
    assert grant_max(10_000, 600) == 600
    assert grant_max(None, 600.9) == 600
    with pytest.raises(ValueError, match="resume_timeout"):
        grant_max(None, 0.5)
    with pytest.raises(ValueError, match="positive"):
        grant_max(0, 600)


def test_enable_with_resume_grants_an_smid_and_capped_max_xep0198_s5() -> None:
    state = new_state()
    answer = state.enable(
        EnableRequest(resume=True, max=30), resume_timeout=600, new_smid=lambda: "sm1"
    )
    assert answer == enabled("sm1", 30)
    assert (state.smid, state.max, state.resumable) == ("sm1", 30, True)


def test_enable_without_max_grants_resume_timeout() -> None:
    state = new_state()
    answer = state.enable(
        EnableRequest(resume=True, max=None), resume_timeout=600, new_smid=lambda: "sm1"
    )
    assert answer == enabled("sm1", 600)


def no_smid() -> str:
    raise AssertionError("no SM-ID may be made")


def test_enable_without_resume_answers_bare_enabled_and_makes_no_smid_xep0198_s3() -> None:
    state = new_state()
    answer = state.enable(EnableRequest(resume=False, max=60), resume_timeout=600, new_smid=no_smid)
    assert answer == enabled(None, None)
    assert (state.smid, state.max, state.resumable) == (None, None, False)


def test_enable_with_resume_but_no_buffer_is_not_resumable() -> None:
    state = new_state(buffering=False)
    answer = state.enable(
        EnableRequest(resume=True, max=None), resume_timeout=600, new_smid=no_smid
    )
    assert answer == enabled(None, None)
    assert not state.resumable


def test_enabling_twice_is_our_bug() -> None:
    state = resumable_state()
    with pytest.raises(LocalProtocolError):
        state.enable(EnableRequest(resume=False, max=None), resume_timeout=600, new_smid=no_smid)


def test_state_refuses_out_of_range_settings() -> None:
    with pytest.raises(ValueError, match="buffer_max"):
        new_state(buffer_max=0)
    with pytest.raises(ValueError, match="ack_freq"):
        new_state(ack_freq=0)
    with pytest.raises(ValueError, match="h must be"):
        new_state(counter_in=-1)
    with pytest.raises(ValueError, match="h must be"):
        new_state(counter_out=MOD)


# -- counting and requests (s4) ---------------------------------------------------------


def test_fresh_state_answers_h_zero_xep0198_s4() -> None:
    assert new_state().answer() == ack_answer(0)


def test_each_received_stanza_increments_counter_in_xep0198_s4() -> None:
    state = new_state()
    for _ in range(3):
        state.received()
    assert state.counter_in == 3
    assert state.answer() == ack_answer(3)


def test_ack_freq_1_requests_after_every_stanza() -> None:
    state = new_state(ack_freq=1)
    assert [state.sent(msg(i)) for i in range(3)] == [True, True, True]


def test_ack_freq_3_requests_after_every_third_stanza() -> None:
    state = new_state(ack_freq=3)
    assert [state.sent(msg(i)) for i in range(7)] == [False, False, True] * 2 + [False]


def test_ack_off_never_requests_but_still_buffers() -> None:
    state = new_state(ack=False)
    assert not any(state.sent(msg(i)) for i in range(5))
    assert state.buffer_size == 5


def test_buffering_off_keeps_nothing_but_still_counts_and_checks_acks() -> None:
    state = new_state(buffering=False)
    send(state, 3)
    assert state.buffer_size == 0
    assert state.unacked() == []
    assert state.send_count == 3
    assert state.acked(2) == []
    assert state.counter_out == 2
    with pytest.raises(HandledCountTooHigh) as info:
        state.acked(4)
    assert info.value.send_count == 3


# -- acks (s4, s6) ----------------------------------------------------------------------


def test_partial_ack_drops_the_oldest_stanzas_xep0198_s4() -> None:
    state = new_state()
    stanzas = send(state, 3)
    assert state.acked(2) == stanzas[:2]
    assert state.unacked() == stanzas[2:]
    assert state.counter_out == 2


def test_ack_of_everything_empties_the_buffer() -> None:
    state = new_state()
    stanzas = send(state, 3)
    assert state.acked(3) == stanzas
    assert state.buffer_size == 0


def test_repeated_ack_drops_nothing() -> None:
    state = new_state()
    stanzas = send(state, 3)
    state.acked(1)
    assert state.acked(1) == []
    assert state.unacked() == stanzas[1:]


def test_ack_behind_the_last_ack_is_ack_behind_and_changes_nothing() -> None:
    state = new_state()
    stanzas = send(state, 3)
    state.acked(2)
    with pytest.raises(AckBehind) as info:
        state.acked(1)
    assert (info.value.h, info.value.counter_out) == (1, 2)
    assert state.counter_out == 2
    assert state.unacked() == stanzas[2:]


def test_ack_2_31_behind_is_still_behind_but_one_more_is_too_high() -> None:
    state = new_state(counter_out=2**31)
    with pytest.raises(AckBehind):
        state.acked(0)
    with pytest.raises(HandledCountTooHigh):
        state.acked(MOD - 1)


def test_ack_more_than_sent_is_handled_count_too_high_xep0198_s6() -> None:
    state = new_state()
    stanzas = send(state, 3)
    state.acked(1)
    with pytest.raises(HandledCountTooHigh) as info:
        state.acked(4)
    assert (info.value.h, info.value.send_count) == (4, 3)
    assert state.counter_out == 1
    assert state.unacked() == stanzas[1:]


def test_ack_before_anything_was_sent_reports_send_count_zero_xep0198_s6() -> None:
    # MongooseIM sm_SUITE client_acks_more_than_sent: <a h='5'/> on a fresh stream.
    with pytest.raises(HandledCountTooHigh) as info:
        new_state().acked(5)
    assert (info.value.h, info.value.send_count) == (5, 0)


def test_acked_refuses_h_outside_unsigned_32_bits() -> None:
    with pytest.raises(ValueError, match="h must be"):
        new_state().acked(MOD)


# -- buffer bound (STYLE S7) ------------------------------------------------------------


def test_buffer_overflow_at_buffer_max_plus_one_keeps_the_stanza_and_ends_resumability() -> None:
    state = resumable_state(buffer_max=3)
    stanzas = send(state, 3)
    extra = msg(99)
    with pytest.raises(BufferOverflow) as info:
        state.sent(extra)
    assert (info.value.size, info.value.buffer_max) == (4, 3)
    assert state.unacked() == [*stanzas, extra]
    assert not state.resumable
    with pytest.raises(SmError) as refused:
        state.resume(0)
    assert refused.value.condition is SmCondition.ITEM_NOT_FOUND


def test_buffer_max_none_is_unbounded() -> None:
    state = new_state(buffer_max=None)
    send(state, 1000)
    assert state.buffer_size == 1000


# -- resumption (s5) --------------------------------------------------------------------


def test_resume_returns_the_unacked_tail_in_order_and_keeps_it_buffered_xep0198_s5() -> None:
    state = resumable_state()
    stanzas = send(state, 5)
    state.acked(1)
    assert state.resume(3) == stanzas[3:]
    assert state.counter_out == 3
    assert state.unacked() == stanzas[3:]
    assert state.acked(5) == stanzas[3:]


def test_resume_restarts_the_request_count() -> None:
    state = resumable_state(ack_freq=3)
    send(state, 2)
    state.resume(0)
    assert [state.sent(msg(i)) for i in range(3)] == [False, False, True]


def test_resume_with_h_too_high_or_behind_changes_nothing_xep0198_s5() -> None:
    state = resumable_state()
    stanzas = send(state, 3)
    state.acked(2)
    with pytest.raises(HandledCountTooHigh):
        state.resume(4)
    with pytest.raises(AckBehind):
        state.resume(1)
    assert state.unacked() == stanzas[2:]


def test_resume_of_a_stream_that_was_never_resumable_is_item_not_found() -> None:
    state = new_state()
    state.received()
    with pytest.raises(SmError) as info:
        state.resume(0)
    assert (info.value.condition, info.value.h) == (SmCondition.ITEM_NOT_FOUND, 1)


def test_snapshot_gives_smid_and_counter_in_for_stale_h() -> None:
    state = resumable_state()
    state.received()
    state.received()
    assert state.snapshot() == ("sm1", 2)
    assert new_state().snapshot() == (None, 0)


def test_repr_shows_counters_not_stanzas() -> None:
    state = resumable_state()
    send(state, 2)
    assert repr(state) == "<SMState smid='sm1' in=0 out=0 sent=2 buffered=2 resumable=True>"


# -- wrap-around (s4) -------------------------------------------------------------------


def test_received_crosses_zero_xep0198_s4() -> None:
    state = new_state(counter_in=NEAR_WRAP)
    for _ in range(5):
        state.received()
    assert state.counter_in == 2
    assert state.answer() == ack_answer(2)


def test_sent_and_acked_cross_zero_xep0198_s4() -> None:
    state = new_state(counter_out=NEAR_WRAP)
    stanzas = send(state, 6)
    assert state.send_count == 3
    assert state.acked(MOD - 1) == stanzas[:2]
    assert state.acked(1) == stanzas[2:4]
    assert state.counter_out == 1
    with pytest.raises(HandledCountTooHigh) as info:
        state.acked(4)
    assert info.value.send_count == 3
    with pytest.raises(AckBehind):
        state.acked(MOD - 2)


def test_resume_crosses_zero_xep0198_s5() -> None:
    state = resumable_state(counter_out=NEAR_WRAP, counter_in=NEAR_WRAP)
    stanzas = send(state, 5)
    state.received()
    assert state.resume(0) == stanzas[3:]
    assert state.snapshot() == ("sm1", MOD - 2)


# -- model-based (STYLE V5) -------------------------------------------------------------


class SMMachine(RuleBasedStateMachine):
    """SMState against a plain list and plain counters, starting near the wrap."""

    def __init__(self) -> None:
        super().__init__()
        self.state = SMState(buffer_max=None, ack_freq=1)
        self.model: list[Element] = []
        self.sent_total = 0
        self.acked_h = 0
        self.received_h = 0
        self.since_request = 0
        self.overflowed = False
        self.next_id = 0

    @initialize(
        start_in=st.integers(MOD - 8, MOD - 1) | st.integers(0, MOD - 1),
        start_out=st.integers(MOD - 8, MOD - 1) | st.integers(0, MOD - 1),
        buffer_max=st.none() | st.integers(1, 12),
        ack_freq=st.integers(1, 4),
        ack=st.booleans(),
    )
    def start(
        self, start_in: int, start_out: int, buffer_max: int | None, ack_freq: int, ack: bool
    ) -> None:
        self.state = SMState(
            buffer_max=buffer_max,
            ack_freq=ack_freq,
            ack=ack,
            counter_in=start_in,
            counter_out=start_out,
        )
        self.state.enable(
            EnableRequest(resume=True, max=None), resume_timeout=300, new_smid=lambda: "sm"
        )
        self.sent_total = self.acked_h = start_out
        self.received_h = start_in

    @rule()
    def send(self) -> None:
        stanza = msg(self.next_id)
        self.next_id += 1
        self.model.append(stanza)
        self.sent_total = (self.sent_total + 1) % MOD
        limit = self.state.buffer_max
        if limit is not None and len(self.model) > limit:
            with pytest.raises(BufferOverflow):
                self.state.sent(stanza)
            self.overflowed = True
            return
        asks = self.state.sent(stanza)
        expected = False
        if self.state.ack:
            self.since_request += 1
            if self.since_request == self.state.ack_freq:
                self.since_request = 0
                expected = True
        assert asks == expected

    @rule()
    def receive(self) -> None:
        self.state.received()
        self.received_h = (self.received_h + 1) % MOD

    @rule()
    def request_answer(self) -> None:
        assert self.state.answer() == Element(ns.SM, "a", {"h": str(self.received_h)})

    @rule(data=st.data())
    def ack_valid(self, data: st.DataObject) -> None:
        count = data.draw(st.integers(0, len(self.model)))
        h = (self.acked_h + count) % MOD
        assert self.state.acked(h) == self.model[:count]
        del self.model[:count]
        self.acked_h = h

    @rule(extra=st.integers(1, 1000))
    def ack_too_high(self, extra: int) -> None:
        h = (self.sent_total + extra) % MOD
        with pytest.raises(HandledCountTooHigh) as info:
            self.state.acked(h)
        assert info.value.send_count == self.sent_total

    @rule(back=st.integers(1, 2**31))
    def ack_behind(self, back: int) -> None:
        with pytest.raises(AckBehind):
            self.state.acked((self.acked_h - back) % MOD)

    @precondition(lambda self: not self.overflowed)
    @rule(data=st.data())
    def resume(self, data: st.DataObject) -> None:
        count = data.draw(st.integers(0, len(self.model)))
        h = (self.acked_h + count) % MOD
        del self.model[:count]
        self.acked_h = h
        self.since_request = 0
        assert self.state.resume(h) == self.model

    @precondition(lambda self: self.overflowed)
    @rule()
    def resume_after_overflow(self) -> None:
        with pytest.raises(SmError):
            self.state.resume(self.acked_h)

    @invariant()
    def buffer_matches_the_model(self) -> None:
        assert list(self.state.buffer) == self.model
        assert self.state.buffer_size == len(self.model)

    @invariant()
    def counters_match_the_model(self) -> None:
        assert self.state.counter_in == self.received_h
        assert self.state.counter_out == self.acked_h
        assert self.state.send_count == self.sent_total
        assert h_diff(self.sent_total, self.state.counter_out) == len(self.state.buffer)
        assert self.state.resumable is not self.overflowed


SMMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestSMAgainstModel = SMMachine.TestCase


# -- restored from a hand-off snapshot (DESIGN section 6) -------------------------------


def restored_state(
    *,
    counter_in: int = 7,
    counter_out: int = 5,
    buffer: list[Element] | None = None,
    buffer_max: int | None = 100,
    ack_freq: int = 1,
    ack: bool = True,
    max_: int = 300,
) -> SMState:
    return SMState.restored(
        smid="sm9",
        max_=max_,
        counter_in=counter_in,
        counter_out=counter_out,
        buffer=[msg(0), msg(1), msg(2)] if buffer is None else buffer,
        buffer_max=buffer_max,
        ack_freq=ack_freq,
        ack=ack,
    )


def test_restored_state_is_resumable_with_its_smid_max_and_counters() -> None:
    state = restored_state()
    assert (state.smid, state.max, state.resumable) == ("sm9", 300, True)
    assert (state.counter_in, state.counter_out) == (7, 5)
    assert state.unacked() == [msg(0), msg(1), msg(2)]
    assert state.buffering
    assert state.answer() == ack_answer(7)
    assert state.snapshot() == ("sm9", 7)


@pytest.mark.parametrize(
    ("counter_out", "length"),
    [(0, 0), (5, 3), (MOD - 1, 0), (MOD - 1, 1), (MOD - 2, 5), (NEAR_WRAP, 3)],
)
def test_restored_send_count_is_counter_out_plus_the_buffer_across_the_wrap_xep0198_s4(
    counter_out: int, length: int
) -> None:
    state = restored_state(counter_out=counter_out, buffer=[msg(i) for i in range(length)])
    assert state.send_count == (counter_out + length) % MOD
    assert h_diff(state.send_count, state.counter_out) == state.buffer_size == length


@pytest.mark.parametrize("counter_out", [5, MOD - 1, NEAR_WRAP])
def test_resuming_a_restored_state_drops_what_h_acks_and_resends_the_rest_xep0198_s5(
    counter_out: int,
) -> None:
    stanzas = [msg(i) for i in range(5)]
    state = restored_state(counter_out=counter_out, buffer=stanzas)
    h = (counter_out + 2) % MOD
    assert state.resume(h) == stanzas[2:]
    assert state.counter_out == h
    assert state.unacked() == stanzas[2:]
    assert state.acked(state.send_count) == stanzas[2:]
    assert state.buffer_size == 0


def test_a_restored_state_numbers_new_stanzas_after_its_buffer() -> None:
    state = restored_state(counter_out=MOD - 1, buffer=[msg(0)])
    state.sent(msg(1))
    assert state.send_count == 1
    assert state.acked(1) == [msg(0), msg(1)]


def test_acking_beyond_a_restored_send_count_is_handled_count_too_high_xep0198_s6() -> None:
    state = restored_state(counter_out=MOD - 1, buffer=[msg(0), msg(1)])
    with pytest.raises(HandledCountTooHigh) as info:
        state.acked(2)
    assert (info.value.h, info.value.send_count) == (2, 1)
    with pytest.raises(HandledCountTooHigh):
        state.resume(2)
    assert state.counter_out == MOD - 1
    assert state.unacked() == [msg(0), msg(1)]


def test_a_restored_buffer_over_buffer_max_is_kept_and_the_next_stanza_overflows() -> None:
    stanzas = [msg(i) for i in range(3)]
    state = restored_state(buffer=stanzas, buffer_max=2)
    assert state.unacked() == stanzas
    assert state.resumable
    extra = msg(99)
    with pytest.raises(BufferOverflow) as info:
        state.sent(extra)
    assert (info.value.size, info.value.buffer_max) == (4, 2)
    assert state.unacked() == [*stanzas, extra]
    assert not state.resumable


def test_a_restored_state_counts_requests_from_zero() -> None:
    state = restored_state(ack_freq=2)
    assert [state.sent(msg(10 + i)) for i in range(4)] == [False, True, False, True]
    quiet = restored_state(ack=False)
    assert not any(quiet.sent(msg(10 + i)) for i in range(3))


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("max_", 0, "max"),
        ("max_", -1, "max"),
        ("counter_in", -1, "h must be"),
        ("counter_in", MOD, "h must be"),
        ("counter_out", -1, "h must be"),
        ("counter_out", MOD, "h must be"),
        ("buffer_max", 0, "buffer_max"),
        ("ack_freq", 0, "ack_freq"),
    ],
)
def test_restoring_refuses_out_of_range_settings(field: str, value: int, match: str) -> None:
    settings_ = {"counter_in": 0, "counter_out": 0, "buffer_max": 10, "ack_freq": 1, "max_": 60}
    settings_[field] = value
    with pytest.raises(ValueError, match=match):
        SMState.restored(
            smid="sm9",
            max_=settings_["max_"],
            counter_in=settings_["counter_in"],
            counter_out=settings_["counter_out"],
            buffer=[],
            buffer_max=settings_["buffer_max"],
            ack_freq=settings_["ack_freq"],
        )


def test_enabling_a_restored_state_is_our_bug() -> None:
    state = restored_state()
    with pytest.raises(LocalProtocolError):
        state.enable(EnableRequest(resume=True, max=None), resume_timeout=600, new_smid=no_smid)
    assert state.smid == "sm9"


# -- the buffer bounded in bytes (buffer_max_bytes) -----------------------------------------


def big(n: int, chars: int) -> Element:
    return Element(
        ns.CLIENT, "message", {"id": f"b{n}"}, [Element(ns.CLIENT, "body", None, ["x" * chars])]
    )


def test_buffer_over_buffer_max_bytes_overflows_and_ends_resumability() -> None:
    state = SMState(buffer_max=100, buffer_max_bytes=10_000, ack_freq=1)
    state.enable(EnableRequest(resume=True, max=None), resume_timeout=600, new_smid=lambda: "s")
    state.sent(big(0, 4000))
    state.sent(big(1, 4000))
    with pytest.raises(BufferOverflow) as info:
        state.sent(big(2, 4000))
    assert info.value.condition is StreamErrorCondition.RESOURCE_CONSTRAINT
    assert info.value.text == "unacked stanzas take too much memory"
    assert state.buffer_size == 3 and not state.resumable  # kept, to be rerouted


def test_one_stanza_larger_than_buffer_max_bytes_alone_is_kept() -> None:
    state = SMState(buffer_max=100, buffer_max_bytes=1000, ack_freq=1)
    state.sent(big(0, 5000))
    assert state.buffer_bytes == big(0, 5000).size


def test_acks_and_resumption_release_buffer_bytes() -> None:
    state = SMState(buffer_max=100, buffer_max_bytes=10_000, ack_freq=1)
    state.enable(EnableRequest(resume=True, max=None), resume_timeout=600, new_smid=lambda: "s")
    stanzas = [big(n, 2500) for n in range(3)]
    for stanza in stanzas:
        state.sent(stanza)
    state.acked(2)
    assert state.buffer_bytes == stanzas[2].size
    state.resume(3)
    assert state.buffer_bytes == 0
    restored = SMState.restored(
        smid="s",
        max_=60,
        counter_in=0,
        counter_out=0,
        buffer=stanzas,
        buffer_max=100,
        buffer_max_bytes=10_000,
        ack_freq=1,
    )
    assert restored.buffer_bytes == sum(s.size for s in stanzas)
    with pytest.raises(ValueError, match="buffer_max_bytes"):
        SMState(buffer_max=1, buffer_max_bytes=0, ack_freq=1)


# -- nonzas from the client of a bound session (handle_nonza) ---------------------------


def test_enable_is_asked_once_then_an_unexpected_request() -> None:
    action = handle_nonza(None, sm_el("enable", resume="true", max="60"))
    assert action == EnableAsked(EnableRequest(resume=True, max=60))
    state = resumable_state()
    assert handle_nonza(state, sm_el("enable")) == Answer(failed(SmCondition.UNEXPECTED_REQUEST))
    assert handle_nonza(None, sm_el("enable", max="0")) == Answer(failed(SmCondition.BAD_REQUEST))


def test_resume_after_bind_is_an_unexpected_request_xep0198_s5() -> None:
    expected = Answer(failed(SmCondition.UNEXPECTED_REQUEST))
    assert handle_nonza(None, sm_el("resume", previd="x", h="0")) == expected


def test_r_and_a_before_enable_are_ignored_and_r_after_is_answered() -> None:
    assert isinstance(handle_nonza(None, sm_el("r")), Ignored)
    assert isinstance(handle_nonza(None, sm_el("a", h="1")), Ignored)
    state = resumable_state(counter_in=7)
    assert handle_nonza(state, sm_el("r")) == Answer(ack_answer(7))


def test_a_acks_and_an_a_too_high_or_behind_is_told_apart() -> None:
    state = resumable_state()
    stanzas = send(state, 3)
    assert handle_nonza(state, sm_el("a", h="2")) == Acked(stanzas[:2])
    assert isinstance(handle_nonza(state, sm_el("a", h="1")), Ignored)  # behind
    with pytest.raises(HandledCountTooHigh):
        handle_nonza(state, sm_el("a", h="9"))
    with pytest.raises(RemoteProtocolError) as info:
        handle_nonza(state, sm_el("a", h="x"))
    assert info.value.condition is StreamErrorCondition.POLICY_VIOLATION


@pytest.mark.parametrize(
    "element", [sm_el("enabled"), Element(ns.CLIENT, "r"), Element("urn:example", "a")]
)
def test_other_nonzas_are_unsupported_stanza_types(element: Element) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        handle_nonza(None, element)
    assert info.value.condition is StreamErrorCondition.UNSUPPORTED_STANZA_TYPE
