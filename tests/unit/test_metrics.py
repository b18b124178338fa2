"""The counter registry (`gateway.core.metrics`): bounded labels, snapshots, no globals."""

from __future__ import annotations

import enum
import re

import pytest

from gateway.core.metrics import Counter, DropPolicy, LedgerState, Metrics
from gateway.errors import StanzaErrorCondition
from gateway.xmpp.stanza import StanzaKind


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Other(enum.Enum):
    RED = "red"


def test_a_counter_without_labels_counts_and_always_has_its_one_sample() -> None:
    counter = Counter("things_total", "Things.")
    assert counter.samples() == {(): 0}
    counter.inc()
    counter.inc(4)
    assert (counter.value(), counter.total(), counter.samples()) == (5, 5, {(): 5})


def test_a_labelled_counter_keeps_one_sample_per_declared_value() -> None:
    counter = Counter("paints_total", "Paints.", {"colour": Colour, "size": frozenset({"s", "l"})})
    counter.inc(colour=Colour.RED, size="s")
    counter.inc(2, colour=Colour.RED, size="s")
    counter.inc(colour=Colour.BLUE, size="l")
    assert counter.value(colour=Colour.RED, size="s") == 3
    assert counter.value(colour=Colour.BLUE, size="s") == 0
    assert counter.total() == 4
    assert counter.samples() == {("red", "s"): 3, ("blue", "l"): 1}


@pytest.mark.parametrize(
    "labels",
    [
        {"colour": "red"},  # the Enum's value as a string is not its member
        {"colour": Other.RED},  # a member of another Enum
        {"colour": "green"},
        {},  # a label missing
        {"colour": Colour.RED, "size": "s"},  # a label not declared
    ],
    ids=["string_for_enum", "other_enum", "unknown", "missing", "undeclared"],
)
def test_a_label_value_outside_the_declared_set_is_refused_and_nothing_grows(
    labels: dict[str, enum.Enum | str],
) -> None:
    counter = Counter("paints_total", "Paints.", {"colour": Colour})
    counter.inc(colour=Colour.BLUE)
    with pytest.raises(ValueError, match="paints_total"):
        counter.inc(**labels)
    assert counter.samples() == {("blue",): 1}


def test_a_string_outside_a_declared_set_is_refused() -> None:
    counter = Counter("sizes_total", "Sizes.", {"size": frozenset({"s", "l"})})
    with pytest.raises(ValueError, match="size"):
        counter.inc(size="xl")
    with pytest.raises(ValueError, match="size"):
        counter.inc(size=Colour.RED)
    assert counter.samples() == {}


def test_a_counter_only_goes_up() -> None:
    counter = Counter("things_total", "Things.")
    with pytest.raises(ValueError, match="only goes up"):
        counter.inc(-1)
    counter.inc(0)
    assert counter.value() == 0


@pytest.mark.parametrize(
    ("name", "labels"),
    [("things", {}), ("2things_total", {}), ("things_total", {"bad-label": Colour})],
)
def test_names_and_label_names_follow_prometheus(
    name: str, labels: dict[str, type[enum.Enum]]
) -> None:
    with pytest.raises(ValueError, match="bad"):
        Counter(name, "Things.", labels)


def test_every_registry_counter_is_prometheus_named_and_bounded() -> None:
    counters = Metrics().counters()
    names = [c.name for c in counters]
    assert len(names) == len(set(names))
    for counter in counters:
        assert re.fullmatch(r"xmpp_[a-z_]+_total", counter.name), counter.name
        assert counter.documentation
        for allowed in counter.labels.values():
            assert isinstance(allowed, frozenset) or issubclass(allowed, enum.Enum)


def test_the_ledger_has_the_states_of_design_section_3() -> None:
    ledger = Metrics().ledger
    assert dict(ledger.labels) == {"state": LedgerState}
    assert {s.value for s in LedgerState} == {
        "acked",
        "delivered",
        "stored_offline",
        "bounced",
        "dropped",
    }


def test_a_fresh_snapshot_has_only_the_unlabelled_counters_at_zero() -> None:
    snapshot = Metrics().snapshot()
    assert snapshot == {
        "xmpp_offline_stored_total": 0,
        "xmpp_offline_flushed_total": 0,
        "xmpp_sm_resumed_total": 0,
        "xmpp_handoff_stanzas_total": 0,
        "xmpp_sm_stale_h_evicted_total": 0,
    }


def test_a_snapshot_names_each_sample_as_prometheus_would() -> None:
    metrics = Metrics()
    metrics.stanzas_in.inc(kind=StanzaKind.MESSAGE)
    metrics.bounced.inc(condition=StanzaErrorCondition.SERVICE_UNAVAILABLE)
    metrics.dropped.inc(2, policy=DropPolicy.CANNOT_BOUNCE)
    metrics.ledger.inc(3, state=LedgerState.STORED_OFFLINE)
    metrics.offline_stored.inc(3)
    snapshot = metrics.snapshot()
    assert {k: v for k, v in snapshot.items() if v} == {
        'xmpp_stanzas_in_total{kind="message"}': 1,
        'xmpp_stanzas_bounced_total{condition="service-unavailable"}': 1,
        'xmpp_stanzas_dropped_total{policy="cannot_bounce"}': 2,
        'xmpp_ledger_stanzas_total{state="stored_offline"}': 3,
        "xmpp_offline_stored_total": 3,
    }


def test_two_registries_share_nothing() -> None:
    first, second = Metrics(), Metrics()
    first.resumed.inc()
    assert (first.resumed.value(), second.resumed.value()) == (1, 0)
