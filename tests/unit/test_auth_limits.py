"""AuthThrottle: failed-login limits per address and per account (pure, time passed in)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from gateway.core.auth_limits import AuthThrottle, TableSizes, address_key

ALICE = "alice@example.org"
BOB = "bob@example.org"


def throttle(
    *,
    ip_failures: int = 0,
    account_failures: int = 0,
    window: float = 60.0,
    duration: float = 300.0,
    max_entries: int = 100_000,
) -> AuthThrottle:
    return AuthThrottle(
        ip_failures=ip_failures,
        account_failures=account_failures,
        window=window,
        duration=duration,
        max_entries=max_entries,
    )


def fail_times(t: AuthThrottle, ip: str, account: str, *times: float) -> None:
    for now in times:
        t.failed(ip, account, now)


# -- per address ------------------------------------------------------------------------


def test_address_is_refused_after_ip_failures_within_window() -> None:
    t = throttle(ip_failures=3)
    fail_times(t, "192.0.2.1", ALICE, 0, 10, 20)
    assert t.refusal("192.0.2.1", ALICE, 20) == 300


def test_address_below_the_threshold_is_allowed() -> None:
    t = throttle(ip_failures=3)
    fail_times(t, "192.0.2.1", ALICE, 0, 10)
    assert t.refusal("192.0.2.1", ALICE, 10) is None


def test_address_failures_on_different_accounts_add_up() -> None:
    t = throttle(ip_failures=3)
    t.failed("192.0.2.1", ALICE, 0)
    t.failed("192.0.2.1", BOB, 1)
    t.failed("192.0.2.1", "carol@example.org", 2)
    assert t.refusal("192.0.2.1", "dave@example.org", 2) == 300


def test_failure_exactly_window_old_does_not_count() -> None:
    t = throttle(ip_failures=3, window=60)
    fail_times(t, "192.0.2.1", ALICE, 0, 30, 60)
    assert t.refusal("192.0.2.1", ALICE, 60) is None


def test_failure_just_inside_the_window_counts() -> None:
    t = throttle(ip_failures=3, window=60)
    fail_times(t, "192.0.2.1", ALICE, 0, 30, 59.5)
    assert t.refusal("192.0.2.1", ALICE, 59.5) == 300


def test_old_failures_slide_out_of_the_window() -> None:
    t = throttle(ip_failures=3, window=60)
    fail_times(t, "192.0.2.1", ALICE, 0, 50, 100, 140)
    assert t.refusal("192.0.2.1", ALICE, 140) is None
    t.failed("192.0.2.1", ALICE, 145)
    assert t.refusal("192.0.2.1", ALICE, 145) == 300


def test_refusal_lasts_duration_from_the_crossing_failure_and_counts_down() -> None:
    t = throttle(ip_failures=2, window=60, duration=300)
    fail_times(t, "192.0.2.1", ALICE, 10, 20)
    assert t.refusal("192.0.2.1", ALICE, 20) == 300
    assert t.refusal("192.0.2.1", ALICE, 119.5) == 200.5
    assert t.refusal("192.0.2.1", ALICE, 319) == 1
    assert t.refusal("192.0.2.1", ALICE, 320) is None


def test_address_block_applies_to_every_account_and_not_to_other_addresses() -> None:
    t = throttle(ip_failures=2)
    fail_times(t, "192.0.2.1", ALICE, 0, 1)
    assert t.refusal("192.0.2.1", BOB, 1) == 300
    assert t.refusal("192.0.2.2", ALICE, 1) is None


def test_failing_while_blocked_extends_the_block() -> None:
    t = throttle(ip_failures=2, window=60, duration=100)
    fail_times(t, "192.0.2.1", ALICE, 0, 1, 50)
    assert t.refusal("192.0.2.1", ALICE, 101) == 49


# -- per account ------------------------------------------------------------------------


def attacked_alice() -> AuthThrottle:
    """Alice under attack from t=2 until t=302: three addresses failed once each."""
    t = throttle(account_failures=3, window=60, duration=300)
    for now, ip in enumerate(["198.51.100.1", "198.51.100.2", "198.51.100.3"]):
        t.failed(ip, ALICE, now)
    return t


def test_addresses_that_failed_in_the_window_are_refused_when_the_attack_starts() -> None:
    t = attacked_alice()
    for ip in ["198.51.100.1", "198.51.100.2", "198.51.100.3"]:
        assert t.refusal(ip, ALICE, 2) == 300


def test_real_user_from_another_address_is_allowed_while_the_account_is_under_attack() -> None:
    t = attacked_alice()
    assert t.refusal("203.0.113.7", ALICE, 3) is None


def test_new_address_failing_once_on_an_attacked_account_is_refused() -> None:
    t = attacked_alice()
    t.failed("203.0.113.7", ALICE, 100)  # only 1 failure in the window: no extension
    assert t.refusal("203.0.113.7", ALICE, 100) == 202
    assert t.refusal("203.0.113.7", ALICE, 301) == 1
    assert t.refusal("203.0.113.7", ALICE, 302) is None


def test_failures_during_an_attack_that_reach_the_threshold_extend_it() -> None:
    t = attacked_alice()
    t.failed("203.0.113.7", ALICE, 3)  # 4th failure, 3 within 60 s: until 303
    assert t.refusal("198.51.100.3", ALICE, 3) == 300
    assert t.refusal("198.51.100.3", ALICE, 302.5) == 0.5


def test_address_that_failed_during_an_attack_stays_refused_while_it_is_extended() -> None:
    t = throttle(account_failures=2, window=10, duration=100)
    fail_times(t, "198.51.100.1", ALICE, 0, 1)  # attack from 1 until 101
    t.failed("198.51.100.2", ALICE, 5)  # during the attack: until 105
    fail_times(t, "198.51.100.3", ALICE, 20, 25)  # 20 alone does not extend; 25 does
    assert t.refusal("198.51.100.2", ALICE, 30) == 95


def test_pair_failure_exactly_window_old_before_the_attack_no_longer_refuses() -> None:
    t = throttle(account_failures=2, window=10, duration=100)
    t.failed("203.0.113.7", ALICE, 0)
    t.failed("198.51.100.1", ALICE, 5)  # attack from 5 until 105
    assert t.refusal("203.0.113.7", ALICE, 9.5) == 95.5
    assert t.refusal("203.0.113.7", ALICE, 10) is None


def test_address_whose_failure_predates_the_attack_may_retry_once_it_leaves_the_window() -> None:
    t = attacked_alice()  # 198.51.100.1 failed at 0, before the attack started at 2
    assert t.refusal("198.51.100.1", ALICE, 59.5) == 242.5
    assert t.refusal("198.51.100.1", ALICE, 60) is None
    t.failed("198.51.100.1", ALICE, 60)
    assert t.refusal("198.51.100.1", ALICE, 250) == 110  # 1, 2, 60 in 60 s: until 360


def test_attacker_address_stays_refused_past_the_window_while_the_attack_lasts() -> None:
    t = attacked_alice()
    assert t.refusal("198.51.100.3", ALICE, 250) == 52
    assert t.refusal("198.51.100.3", ALICE, 302) is None


def test_address_that_failed_before_the_window_and_the_attack_is_allowed() -> None:
    t = throttle(account_failures=3, window=60, duration=300)
    t.failed("203.0.113.7", ALICE, 0)  # the real user mistyped once, long ago
    fail_times(t, "198.51.100.1", ALICE, 100, 101, 102)
    assert t.refusal("198.51.100.1", ALICE, 102) == 300
    assert t.refusal("203.0.113.7", ALICE, 102) is None


def test_attack_on_one_account_does_not_refuse_others() -> None:
    t = attacked_alice()
    assert t.refusal("198.51.100.1", BOB, 2) is None


def test_distributed_attacker_gets_one_guess_per_address_during_an_attack() -> None:
    t = throttle(account_failures=3, window=60, duration=300)
    guesses = []
    for n in range(200):  # one new address a second, each guessing until refused
        ip, now = f"10.0.{n // 256}.{n % 256}", float(n)
        count = 0
        while t.refusal(ip, ALICE, now) is None and count < 10:
            t.failed(ip, ALICE, now)
            count += 1
        guesses.append(count)
    assert guesses == [3] + [1] * 199  # the first address alone started the attack


def test_account_rule_alone_does_not_block_a_single_address_on_other_accounts() -> None:
    t = throttle(account_failures=2)
    fail_times(t, "192.0.2.1", ALICE, 0, 1)
    assert t.refusal("192.0.2.1", ALICE, 1) == 300
    assert t.refusal("192.0.2.1", BOB, 1) is None


def test_refusal_is_the_longer_of_the_address_block_and_the_account_attack() -> None:
    t = throttle(ip_failures=2, account_failures=2, window=60, duration=300)
    t.failed("192.0.2.1", ALICE, 0)
    t.failed("198.51.100.1", ALICE, 5)  # Alice under attack until 305
    t.failed("192.0.2.1", BOB, 10)  # 192.0.2.1 blocked until 310
    assert t.refusal("192.0.2.1", ALICE, 10) == 300
    assert t.refusal("198.51.100.1", ALICE, 10) == 295


# -- success ----------------------------------------------------------------------------


def test_success_forgets_the_pair_but_not_the_address_total() -> None:
    t = throttle(ip_failures=3, account_failures=2)
    t.failed("192.0.2.1", ALICE, 0)
    t.failed("192.0.2.1", ALICE, 1)
    assert t.refusal("192.0.2.1", ALICE, 1) == 300  # Alice is under attack from here
    t.succeeded("192.0.2.1", ALICE, 2)
    assert t.refusal("192.0.2.1", ALICE, 2) is None
    t.failed("192.0.2.1", BOB, 3)  # the third failure from this address in the window
    assert t.refusal("192.0.2.1", BOB, 3) == 300


def test_success_does_not_end_an_attack_on_the_account() -> None:
    t = attacked_alice()
    t.succeeded("198.51.100.1", ALICE, 5)
    assert t.refusal("198.51.100.1", ALICE, 5) is None
    assert t.refusal("198.51.100.2", ALICE, 5) == 297
    t.failed("198.51.100.1", ALICE, 6)
    assert t.refusal("198.51.100.1", ALICE, 6) == 300


def test_success_without_failures_is_harmless() -> None:
    t = throttle(ip_failures=1, account_failures=1)
    t.succeeded("192.0.2.1", ALICE, 0)
    assert t.refusal("192.0.2.1", ALICE, 0) is None
    assert t.sizes() == TableSizes(0, 0, 0)


# -- address keys -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("::ffff:c000:201", "192.0.2.1"),
        ("::1", "::/64"),
        ("[2001:db8::1]", "[2001:db8::1]"),
        ("unix:/run/gateway.sock", "unix:/run/gateway.sock"),
        ("", ""),
    ],
)
def test_address_key_groups_ipv6_by_64_and_maps_ipv4(ip: str, key: str) -> None:
    assert address_key(ip) == key


def test_ipv6_addresses_in_one_64_share_a_counter() -> None:
    t = throttle(ip_failures=2)
    t.failed("2001:db8:0:1::a", ALICE, 0)
    t.failed("2001:db8:0:1:ffff::b", BOB, 1)
    assert t.refusal("2001:db8:0:1::c", ALICE, 1) == 300
    assert t.refusal("2001:db8:0:2::a", ALICE, 1) is None


def test_v4_mapped_address_counts_as_its_ipv4_address() -> None:
    t = throttle(ip_failures=2, account_failures=2)
    t.failed("::ffff:192.0.2.1", ALICE, 0)
    t.failed("192.0.2.1", BOB, 1)
    assert t.refusal("192.0.2.1", "carol@example.org", 1) == 300
    t.succeeded("192.0.2.1", ALICE, 2)
    assert t.sizes().pairs == 1


# -- configuration ----------------------------------------------------------------------


def test_zero_ip_failures_turns_the_address_rule_off() -> None:
    t = throttle(ip_failures=0, account_failures=100)
    for n in range(50):
        t.failed("192.0.2.1", f"user{n}@example.org", n)
    assert t.refusal("192.0.2.1", BOB, 50) is None
    assert t.sizes().addresses == 0


def test_zero_account_failures_turns_the_account_rule_off() -> None:
    t = throttle(ip_failures=100, account_failures=0)
    for n in range(50):
        t.failed(f"10.0.0.{n}", ALICE, n)
    assert t.refusal("10.0.0.1", ALICE, 50) is None
    assert t.sizes() == TableSizes(addresses=50, accounts=0, pairs=0)


def test_both_rules_off_allow_everything_and_keep_nothing() -> None:
    t = throttle(window=0, duration=0)
    fail_times(t, "192.0.2.1", ALICE, *range(10))
    assert t.refusal("192.0.2.1", ALICE, 10) is None
    assert t.sizes() == TableSizes(0, 0, 0)


def test_threshold_of_one_refuses_after_the_first_failure() -> None:
    t = throttle(ip_failures=1)
    t.failed("192.0.2.1", ALICE, 0)
    assert t.refusal("192.0.2.1", ALICE, 0) == 300


@pytest.mark.parametrize(
    ("ip_failures", "account_failures", "window", "duration", "max_entries"),
    [
        (-1, 0, 60, 300, 10),
        (0, -1, 60, 300, 10),
        (1, 0, 0, 300, 10),
        (1, 0, 60, -5, 10),
        (0, 1, math.nan, 300, 10),
        (0, 1, 60, math.inf, 10),
        (1, 0, 60, 300, 0),
    ],
)
def test_out_of_range_settings_raise_value_error(
    ip_failures: int, account_failures: int, window: float, duration: float, max_entries: int
) -> None:
    with pytest.raises(ValueError, match=r"must be"):
        throttle(
            ip_failures=ip_failures,
            account_failures=account_failures,
            window=window,
            duration=duration,
            max_entries=max_entries,
        )


# -- memory bounds ----------------------------------------------------------------------


def test_tables_never_hold_more_than_max_entries() -> None:
    t = throttle(ip_failures=5, account_failures=5, max_entries=50)
    for n in range(500):  # 10x max_entries distinct addresses and accounts, all live
        t.failed(f"10.0.{n // 256}.{n % 256}", f"user{n}@example.org", n / 1000)
        sizes = t.sizes()
        assert max(sizes.addresses, sizes.accounts, sizes.pairs) <= 50
    assert t.sizes() == TableSizes(50, 50, 50)


def test_least_recently_failed_address_is_evicted_first() -> None:
    t = throttle(ip_failures=1, max_entries=2)
    t.failed("192.0.2.1", ALICE, 0)
    t.failed("192.0.2.2", ALICE, 1)
    t.failed("192.0.2.1", ALICE, 2)  # touched again: now the newest
    t.failed("192.0.2.3", ALICE, 3)  # evicts 192.0.2.2
    assert t.refusal("192.0.2.1", ALICE, 3) == 299
    assert t.refusal("192.0.2.2", ALICE, 3) is None
    assert t.refusal("192.0.2.3", ALICE, 3) == 300


def test_expired_entries_are_dropped_when_later_failures_arrive() -> None:
    t = throttle(ip_failures=2, account_failures=2, window=10, duration=20)
    for n in range(30):
        t.failed(f"10.0.0.{n}", f"user{n}@example.org", 0)
    assert t.sizes() == TableSizes(30, 30, 30)
    t.failed("192.0.2.1", ALICE, 20)
    assert t.sizes() == TableSizes(1, 1, 1)


def test_entries_are_kept_while_their_block_or_attack_lasts() -> None:
    t = throttle(ip_failures=2, account_failures=2, window=10, duration=100)
    fail_times(t, "10.0.0.1", BOB, 0, 1)
    t.failed("192.0.2.1", ALICE, 50)
    assert t.sizes() == TableSizes(2, 2, 2)
    assert t.refusal("10.0.0.1", BOB, 50) == 51


def test_refusal_drops_expired_entries_it_looks_up() -> None:
    t = throttle(ip_failures=2, account_failures=2, window=10, duration=20)
    fail_times(t, "192.0.2.1", ALICE, 0, 1)
    assert t.sizes() == TableSizes(1, 1, 1)
    assert t.refusal("192.0.2.1", ALICE, 21) is None
    assert t.sizes() == TableSizes(0, 0, 0)


# -- model-based (STYLE V5) -------------------------------------------------------------

# Five addresses, three keys: few enough that random sequences hit the same keys often.
IPS = ["192.0.2.1", "::ffff:192.0.2.1", "2001:db8::1", "2001:db8::2", "not-an-address"]
ACCOUNTS = [ALICE, BOB]
KEYS = {ip: address_key(ip) for ip in IPS}  # parsing addresses dominates the run time


@dataclass
class Model:
    """Every failure ever, the rules recomputed from scratch on each question."""

    ip_failures: int
    account_failures: int
    window: float
    duration: float
    #: (time, address key, account), in call order
    failures: list[tuple[float, str, str]] = field(default_factory=list)
    #: (account, address key) -> failures before this index are forgotten
    forgotten: dict[tuple[str, str], int] = field(default_factory=dict)

    def refusal(self, ip: str, account: str, now: float) -> float | None:
        key = KEYS[ip]
        waits = [0.0]
        if self.ip_failures:
            times = [t for t, k, _ in self.failures if k == key]
            ends = [
                t + self.duration
                for i, t in enumerate(times)
                if sum(t - s < self.window for s in times[: i + 1]) >= self.ip_failures
            ]
            waits += [end - now for end in ends]
        if self.account_failures:
            times = [t for t, _, a in self.failures if a == account]
            qualifying = [
                t
                for i, t in enumerate(times)
                if sum(t - s < self.window for s in times[: i + 1]) >= self.account_failures
            ]
            # An attack is a run of [q, q + duration) intervals, each starting before the
            # previous one ended.
            start, end = -math.inf, -math.inf
            for q in qualifying:
                if q >= end:
                    start = q
                end = q + self.duration
            first = self.forgotten.get((account, key), 0)
            pair = [
                t
                for t, k, a in self.failures[first:]
                if (k, a) == (key, account) and (now - t < self.window or t >= start)
            ]
            if now < end and pair:
                waits.append(end - now)
        wait = max(waits)
        return wait if wait > 0 else None


class ThrottleMachine(RuleBasedStateMachine):
    """AuthThrottle against `Model` over random failures, successes and clock steps.

    With `check_every_step` every answer is compared after each step; without it only the
    `ask` rules compare, so expired entries pile up for `failed()` to sweep.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.throttle = throttle()
        self.model = Model(0, 0, 60.0, 300.0)
        self.check_every_step = False

    @initialize(
        ip_failures=st.integers(0, 3),
        account_failures=st.integers(0, 3),
        window=st.sampled_from([1.0, 2.0, 3.0]),
        duration=st.sampled_from([0.5, 2.0, 4.0, 7.0]),
        check_every_step=st.booleans(),
    )
    def start(
        self,
        ip_failures: int,
        account_failures: int,
        window: float,
        duration: float,
        check_every_step: bool,
    ) -> None:
        self.throttle = throttle(
            ip_failures=ip_failures,
            account_failures=account_failures,
            window=window,
            duration=duration,
        )
        self.model = Model(ip_failures, account_failures, window, duration)
        self.check_every_step = check_every_step

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 2.0, 5.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(data=st.data(), to_block_end=st.booleans())
    def advance_to_an_edge(self, data: st.DataObject, to_block_end: bool) -> None:
        """Jump to exactly where a recent failure leaves the window or its block ends."""
        recent = [t for t, _, _ in self.model.failures[-6:]] or [self.now]
        t = data.draw(st.sampled_from(recent))
        edge = t + (self.model.duration if to_block_end else self.model.window)
        self.now = max(self.now, edge)

    @rule(ip=st.sampled_from(IPS), account=st.sampled_from(ACCOUNTS))
    def fail(self, ip: str, account: str) -> None:
        self.throttle.failed(ip, account, self.now)
        self.model.failures.append((self.now, KEYS[ip], account))

    @rule(ip=st.sampled_from(IPS), account=st.sampled_from(ACCOUNTS))
    def succeed(self, ip: str, account: str) -> None:
        self.throttle.succeeded(ip, account, self.now)
        self.model.forgotten[account, KEYS[ip]] = len(self.model.failures)

    @rule(ip=st.sampled_from(IPS), account=st.sampled_from(ACCOUNTS))
    def ask(self, ip: str, account: str) -> None:
        assert self.throttle.refusal(ip, account, self.now) == self.model.refusal(
            ip, account, self.now
        )

    @rule()
    def ask_everything(self) -> None:
        for ip in IPS:
            for account in ACCOUNTS:
                got = self.throttle.refusal(ip, account, self.now)
                assert got == self.model.refusal(ip, account, self.now), (ip, account)

    @invariant()
    def answers_match_the_model(self) -> None:
        if self.check_every_step:
            self.ask_everything()

    @invariant()
    def tables_hold_only_known_keys(self) -> None:
        sizes = self.throttle.sizes()
        assert sizes.addresses <= len(IPS)
        assert sizes.accounts <= len(ACCOUNTS)
        assert sizes.pairs <= len(IPS) * len(ACCOUNTS)

    def teardown(self) -> None:
        self.ask_everything()


ThrottleMachine.TestCase.settings = settings(
    max_examples=500, stateful_step_count=30, deadline=None
)
TestThrottleAgainstModel = ThrottleMachine.TestCase
