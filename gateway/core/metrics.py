"""The gateway's counters, in one registry (DESIGN section 3, the ledger; STYLE P3, P5).

`Metrics` is made once by `gateway.app` and passed down explicitly (`ServerContext.metrics`,
and to the router, the offline service, the hand-off and each session); there is no
module-level registry. Names and labels follow Prometheus conventions (`xmpp_..._total`,
one small fixed label set per counter) so a later exporter only has to print `samples()`.

Bounded (STYLE P3): every label value comes from a declared Enum or set, and a value
outside it raises `ValueError`, so a bug cannot grow a counter without limit (no JIDs, ids
or free text as label values).

The ledger (`ledger`, `xmpp_ledger_stanzas_total{state}`): every stanza a session took
(`Session.send` answered True) ends in one `LedgerState`: acked by the client's h (an `<a/>`
or a `<resume h/>`), or, when the session ends without resumption, rerouted by the
router and delivered to another resource (a new entry in that session's ledger), stored
offline, bounced or dropped by a policy (which `dropped` names). A session handed off at
shutdown keeps its stanzas (counted in `handoff_stanzas`) and settles them after the
restart. A session without stream management has no acks: what its writer wrote leaves
the ledger unacknowledged, and only what was still queued when it ended is rerouted.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from typing import Final

from gateway.errors import StanzaErrorCondition
from gateway.xmpp.stanza import StanzaKind

#: What a label's values may be: the values of an Enum, or a fixed set of strings.
LabelValues = type[enum.Enum] | frozenset[str]

_NAME: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*_total")
_LABEL: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


class LedgerState(enum.Enum):
    """Where a stanza a session took ended (DESIGN section 3)."""

    #: Acknowledged by the client's h (XEP-0198 `<a/>`, or `<resume h/>`).
    ACKED = "acked"
    #: Handed back at the session's end and delivered to another resource of the account.
    DELIVERED = "delivered"
    #: Handed back and put into the account's offline storage (XEP-0160).
    STORED_OFFLINE = "stored_offline"
    #: Answered to its sender with a stanza error.
    BOUNCED = "bounced"
    #: Dropped by a stated policy (`DropPolicy`, counted in `Metrics.dropped`).
    DROPPED = "dropped"


class DropPolicy(enum.Enum):
    """Why the router dropped a stanza (the `stanza_dropped` log line names it too)."""

    PROBE_WITHOUT_SUBSCRIPTION_STATE = "probe_without_subscription_state"
    PRESENCE_NO_AVAILABLE_RESOURCE = "presence_no_available_resource"
    HEADLINE_NO_AVAILABLE_RESOURCE = "headline_no_available_resource"
    MESSAGE_TO_UNAVAILABLE_RESOURCE = "message_to_unavailable_resource"
    IQ_RESPONSE_TO_UNAVAILABLE_RESOURCE = "iq_response_to_unavailable_resource"
    #: An error or result (errors are never answered with errors), or no sender.
    CANNOT_BOUNCE = "cannot_bounce"
    #: The error reply of a bounce found neither the sender nor its account.
    BOUNCE_SENDER_GONE = "bounce_sender_gone"
    #: Presence and other stanzas a session took that nobody else can use after its end.
    UNDELIVERABLE_AFTER_SESSION_END = "undeliverable_after_session_end"


class ResumeFailure(enum.Enum):
    """Why a `<resume/>` got `<failed/>` (XEP-0198 section 5)."""

    MALFORMED = "malformed"  #: the `<resume/>` element itself was invalid
    RESUMPTION_OFF = "resumption_off"  #: `buffer: false` (feature-not-implemented)
    UNKNOWN_SMID = "unknown_smid"  #: no such session (never, or ended, or expired)
    OTHER_NODE = "other_node"  #: the session lives on another node of the cluster
    OTHER_USER = "other_user"  #: the SM id belongs to another account
    ALREADY_CLAIMED = "already_claimed"  #: a concurrent `<resume/>` claimed it first
    SESSION_CLOSING = "session_closing"  #: the session was closed in the claim's step
    SESSION_ENDED = "session_ended"  #: the session ended in the claim's step
    NOT_RESUMABLE = "not_resumable"  #: its buffer overflowed while parked
    HANDLED_COUNT_TOO_HIGH = "handled_count_too_high"  #: h acks more than was sent


class HandoffResult(enum.Enum):
    """What became of a session handed off at shutdown (`gateway.core.handoff`)."""

    WRITTEN = "written"  #: stored for the next start
    WRITE_FAILED = "write_failed"  #: the store failed: the session ended normally
    ENCODE_FAILED = "encode_failed"  #: not encodable: the session ended normally


class Counter:
    """A monotonic counter with fixed label names, each with a bounded set of values.

    Args:
        name: the Prometheus name, ending in `_total`.
        documentation: one line (the exporter's HELP).
        labels: label name -> the Enum (members are passed) or set of strings it takes.

    Raises:
        ValueError: a malformed name or label name.
    """

    def __init__(
        self, name: str, documentation: str, labels: Mapping[str, LabelValues] | None = None
    ) -> None:
        if not _NAME.fullmatch(name):
            raise ValueError(f"bad counter name {name!r}")
        for label in labels or {}:
            if not _LABEL.fullmatch(label) or label.startswith("__"):
                raise ValueError(f"bad label name {label!r} on {name}")
        self.name = name
        self.documentation = documentation
        self.labels: Mapping[str, LabelValues] = dict(labels or {})
        self._values: dict[tuple[str, ...], int] = {}
        self._known: dict[tuple[tuple[str, enum.Enum | str], ...], tuple[str, ...]] = {}

    def inc(self, amount: int = 1, /, **labels: enum.Enum | str) -> None:
        """Add `amount` (>= 0) to the sample of these label values.

        Raises:
            ValueError: a negative amount, a missing or unknown label, or a value outside
                the label's declared Enum or set.
        """
        if amount < 0:
            raise ValueError(f"{self.name}: a counter only goes up ({amount})")
        # Checked once per label combination (a few per counter: the cache is bounded by
        # the declared values), then a dict lookup: this is on every stanza's path.
        given = tuple(labels.items())
        key = self._known.get(given)
        if key is None:
            key = self._known[given] = self._key(labels)
        self._values[key] = self._values.get(key, 0) + amount

    def value(self, **labels: enum.Enum | str) -> int:
        """The sample of these label values (0 when never incremented)."""
        return self._values.get(self._key(labels), 0)

    def total(self) -> int:
        """The sum over every label value."""
        return sum(self._values.values())

    def samples(self) -> dict[tuple[str, ...], int]:
        """Label values (in `labels` order) -> count; a counter without labels always has
        its one sample, a labelled one only those incremented so far."""
        if not self.labels:
            return {(): self._values.get((), 0)}
        return dict(self._values)

    def _key(self, labels: Mapping[str, enum.Enum | str]) -> tuple[str, ...]:
        if labels.keys() != self.labels.keys():
            raise ValueError(
                f"{self.name} takes labels {sorted(self.labels)}, not {sorted(labels)}"
            )
        return tuple(
            _checked(self.name, n, allowed, labels[n]) for n, allowed in self.labels.items()
        )


def _checked(counter: str, label: str, allowed: LabelValues, value: enum.Enum | str) -> str:
    if isinstance(allowed, frozenset):
        if isinstance(value, str) and value in allowed:
            return value
    elif isinstance(value, allowed) and isinstance(value.value, str):
        return value.value
    raise ValueError(f"{counter}: {value!r} is not a declared value of label {label!r}")


class Metrics:
    """Every counter of one gateway (see the module docstring); one attribute each."""

    def __init__(self) -> None:
        kind = {"kind": StanzaKind}
        self.stanzas_in: Final = Counter(
            "xmpp_stanzas_in_total", "Stanzas received from clients of bound sessions.", kind
        )
        self.stanzas_out: Final = Counter(
            "xmpp_stanzas_out_total", "Stanzas sessions took for their clients.", kind
        )
        self.bounced: Final = Counter(
            "xmpp_stanzas_bounced_total",
            "Stanzas answered to their sender with an error, by condition.",
            {"condition": StanzaErrorCondition},
        )
        self.dropped: Final = Counter(
            "xmpp_stanzas_dropped_total",
            "Stanzas dropped by a stated policy.",
            {"policy": DropPolicy},
        )
        self.offline_stored: Final = Counter(
            "xmpp_offline_stored_total", "Messages put into offline storage (XEP-0160)."
        )
        self.offline_flushed: Final = Counter(
            "xmpp_offline_flushed_total", "Stored messages sent to a session that came online."
        )
        self.resumed: Final = Counter(
            "xmpp_sm_resumed_total", "Sessions resumed (XEP-0198 section 5)."
        )
        self.resume_failed: Final = Counter(
            "xmpp_sm_resume_failed_total",
            "Resumption requests answered <failed/>, by reason.",
            {"reason": ResumeFailure},
        )
        self.handoff_sessions: Final = Counter(
            "xmpp_handoff_sessions_total",
            "Resumable sessions handed off at shutdown, by result.",
            {"result": HandoffResult},
        )
        self.handoff_stanzas: Final = Counter(
            "xmpp_handoff_stanzas_total", "Unacked stanzas that went with handed-off sessions."
        )
        self.stale_h_evicted: Final = Counter(
            "xmpp_sm_stale_h_evicted_total",
            "stale_h entries dropped to keep the table within its bound before their age.",
        )
        self.ledger: Final = Counter(
            "xmpp_ledger_stanzas_total",
            "Stanzas sessions took, by the ledger state they ended in (DESIGN section 3).",
            {"state": LedgerState},
        )

    def counters(self) -> list[Counter]:
        """Every counter, in definition order."""
        return [c for c in vars(self).values() if isinstance(c, Counter)]

    def snapshot(self) -> dict[str, int]:
        """Every sample as `name{label="value",...}` -> count (for tests and log lines)."""
        found: dict[str, int] = {}
        for counter in self.counters():
            for values, count in counter.samples().items():
                pairs = ",".join(f'{n}="{v}"' for n, v in zip(counter.labels, values, strict=True))
                found[f"{counter.name}{{{pairs}}}" if pairs else counter.name] = count
        return found
