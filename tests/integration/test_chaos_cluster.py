"""The seeded chaos test in cluster mode (DESIGN.md section 6): real processes, real time.

Three gateway nodes run as subprocesses (`python -m gateway serve`) sharing one real
redis-server and one SQLite file (accounts, offline storage), with short SM timers and
stale_h on. The chaos clients of `tests/helpers/chaos.py` (eight accounts with one or two
resources each, RawClients over TCP) chat as in the single-node test, with its four
kinds of transport cut; every (re)connection goes to a node picked by the client's
seeded rng among the nodes up at the time, so a resumption usually lands on another node
and moves the session there. At a seeded moment one node (seeded, among those holding
sessions) is killed with SIGKILL and some seconds later started again under its id. Its
clients see their transports die and reconnect elsewhere; their `<resume/>` gets
`<failed h/>` with the h the node last mirrored into Redis (a lower bound: the client
resends the rest, and those resends are exempt from the duplicate checks) and they start
a fresh session.

Then everyone comes back and reads until quiet, and the ledger accounts for every
message: delivered to its addressee (possibly via offline storage), or bounced to its
sender. The gateway does not (yet) mirror a node's SM buffers, so a message may die in
the killed node's buffer for its recipient: a missing message is `lost_in_killed_node`
when, by what the clients observed, its addressee's account had a session (or a
resumption under way) on the killed node at the kill, and it was first sent before the
kill. Anything else missing fails the test; so do dishonest duplicates (as in the
single-node test), messages left in offline storage, a killed session that resumes, a
`<failed h/>` counting more than the client sent, a node that does not exit cleanly at
the end, and error lines, tracebacks or other non-JSON output in the nodes' logs.
`MAX_LOST_IN_KILLED_NODE` bounds that class (None: unbounded); it becomes 0 once the
dead node's buffers are mirrored. `MAX_UNPROVOKED_DROPS` (0) bounds the transports the
server closed without cause.

The ledger is printed (run with `-s`); the clients' trace (what each sent, got, and how
each connection went) is written to `clients.trace` in the test's tmp directory, beside
each node's `gwN/gateway.log`, to reproduce a failure.
"""

from __future__ import annotations

import collections
import itertools
import json
import random
import signal
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest
import trio

from gateway.storage.offline_sqlite import SqliteOfflineStore
from tests.helpers.accounts import PASSWORD
from tests.helpers.chaos import (
    GHOST,
    USERS,
    Kill,
    Ledger,
    Timing,
    World,
    assert_honest,
    drain,
    make_clients,
    run_chaos,
    tally,
)
from tests.helpers.client import RawClient
from tests.helpers.live import LiveGateway, import_users, live_gateway

pytestmark = pytest.mark.integration

NODES: Final = ("gw1", "gw2", "gw3")
HEARTBEAT: Final = 0.5  # a node missing 3 is dead: the reaper accounts for it within ~2 s
RESUME_TIMEOUT: Final = 4.0
ACK_TIMEOUT: Final = 1.5
CHAOS_SECONDS: Final = 15.0
KILL_AT: Final = (0.25, 0.45)  # fractions of the chaos phase
RESTART_AFTER: Final = (3.0, 5.0)  # seconds: after the survivors have reaped it
#: Messages that may die in the killed node's SM buffers; None: any number (today: the
#: gateway does not mirror them, DESIGN section 6). Set to 0 once it does.
MAX_LOST_IN_KILLED_NODE: Final[int | None] = None
#: Transports the server closed though the client had answered every <r/> (no cut, no
#: kill, no stream error). This test found such drops (the ack deadline was armed after
#: the write of the <r/>, which a fast answer could overtake): none may happen.
MAX_UNPROVOKED_DROPS: Final = 0
TIMING: Final = Timing(
    resume_timeout=RESUME_TIMEOUT,
    away_extra=(0.5, 3),
    clean_stay=1.5,
    burst_gap=0.1,
    think_mean=0.6,
    negotiate=20,  # above the 6 s a resumption waits for a session from a dead node
    enabled_wait=5,
    retry_pause=0.3,
    close_wait=5,
    bury_wait=0.5,
    leave_wait=3,
    quiet=1.5,
)
SEEDS: Final = (1, 2)


def node_config(node: str, redis_url: str, database: Path) -> str:
    return (
        "general: {hosts: [localhost], shutdown_grace: 0.5}\n"
        "listen:\n"
        "  c2s: [{ip: 127.0.0.1, port: $c2s, tls: none}]\n"
        f"auth: {{database: {database}}}\n"
        "modules:\n"
        "  mod_stream_management: {backend: redis,"
        f" resume_timeout: {RESUME_TIMEOUT}, ack_timeout: {ACK_TIMEOUT},"
        " stale_h: {enabled: true}}\n"
        f"cluster: {{redis: '{redis_url}', node: {node}, heartbeat: {HEARTBEAT}}}\n"
        "logging: {level: info, format: json}\n"
    )


@dataclass
class Node:
    name: str
    gateway: LiveGateway


@dataclass
class Cluster:
    nodes: list[Node]
    database: Path
    up: list[Node] = field(default_factory=list)
    refused: int = 0  # connections refused (a node killed while being dialled)
    chaos_start: float = 0.0

    def __post_init__(self) -> None:
        self.up = list(self.nodes)

    async def dial(self, rng: random.Random) -> tuple[RawClient, str]:
        """A connection to a node picked with `rng` among those up."""
        for _ in range(50):
            node = rng.choice(self.up)
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", node.gateway.port)
            except OSError:
                self.refused += 1
                await trio.sleep(0.05)
                continue
            return RawClient(stream), node.name
        raise AssertionError("no node accepted a connection")


@pytest.fixture
def cluster(tmp_path: Path, redis_url: str) -> Iterator[Cluster]:
    database = tmp_path / "shared.sqlite"
    with ExitStack() as stack:
        nodes: list[Node] = []
        for name in NODES:
            (tmp_path / name).mkdir()
            gateway = stack.enter_context(
                live_gateway(
                    tmp_path / name,
                    node_config(name, redis_url, database),
                    password=PASSWORD,
                    users=(),
                    setup=(lambda c: import_users(c, USERS, PASSWORD)) if not nodes else None,
                    check_config=not nodes,
                )
            )
            nodes.append(Node(name, gateway))
        yield Cluster(nodes, database)


async def _kill_and_restart(
    cluster: Cluster, world: World, rng: random.Random, start: float
) -> None:
    """SIGKILL one node at a seeded moment; start it again some seconds later."""
    await trio.sleep_until(start + rng.uniform(*KILL_AT) * CHAOS_SECONDS)
    clients, ledger = world.clients, world.ledger
    holding = [n for n in cluster.up if any(c.holds_session_on(n.name) for c in clients)]
    victim = rng.choice(holding or cluster.up)
    cluster.up.remove(victim)
    # What the clients observed at this moment (no checkpoint until the kill): whose
    # session is there, connected, parked (its transport gone) or moving.
    held: dict[str, str] = {}
    for client in clients:
        state = client.session_killed = client.holds_session_on(victim.name)
        if state == "held":
            connected = client.conn is not None and client.where == victim.name
            state = "connected" if connected else "parked"
        if state is not None:
            held[client.name] = state
    ledger.note("test", f"kill {victim.name} holding {held}")
    ledger.kills.append(
        Kill(
            victim.name,
            trio.current_time(),
            held,
            frozenset(name.split("/")[0] for name in held),
            sum(1 for c in clients if c.conn is not None and c.where == victim.name),
        )
    )
    ledger.down.add(victim.name)
    victim.gateway.proc.send_signal(signal.SIGKILL)
    await trio.to_thread.run_sync(victim.gateway.proc.wait)
    ledger.events["node_killed"] += 1
    await trio.sleep(rng.uniform(*RESTART_AFTER))
    await trio.to_thread.run_sync(victim.gateway.start)
    cluster.up.append(victim)
    ledger.down.discard(victim.name)
    ledger.note("test", f"restarted {victim.name}")
    ledger.events["node_restarted"] += 1


async def _stop(node: Node) -> None:
    """SIGTERM and wait for the exit (in a thread: `stop` blocks)."""
    await trio.to_thread.run_sync(node.gateway.stop)


def _offline_left(database: Path) -> dict[str, int]:
    store = SqliteOfflineStore(database)
    try:
        return {u: n for u in USERS if (n := store.count("localhost", u))}
    finally:
        store.close()


def _node_logs(cluster: Cluster) -> tuple[list[dict[str, Any]], list[str]]:
    """Every node's JSON log lines (each tagged with its node), and what looks wrong:
    error-level lines, tracebacks, any output that is not a JSON line. Each run of a
    node is read by itself: the killed one's last line may have been cut off."""
    events: list[dict[str, Any]] = []
    wrong: list[str] = []
    for node in cluster.nodes:
        data = node.gateway.log.read_bytes()
        bounds = [*node.gateway.runs, len(data)]
        for begin, end in itertools.pairwise(bounds):
            chunk = data[begin:end]
            for line in chunk[: chunk.rfind(b"\n") + 1].decode(errors="replace").splitlines():
                try:
                    event = json.loads(line) if line.startswith("{") else None
                except ValueError:
                    event = None
                if not isinstance(event, dict):
                    if line.strip():
                        wrong.append(f"{node.name}: {line}")
                    continue
                events.append({**event, "_node": node.name})
                if event.get("level") in ("error", "critical") or "exception" in event:
                    wrong.append(f"{node.name}: {line}")
    return events, wrong


def _check(world: World, cluster: Cluster, seed: int, unsettled: str) -> dict[str, int]:
    ledger = world.ledger
    result = tally(ledger)
    lost: list[str] = []
    missing: list[str] = []
    for msg_id in result.missing:
        _sender, to_user = ledger.sent[msg_id]
        in_class = to_user != GHOST and any(
            to_user in kill.users and ledger.sent_at[msg_id] < kill.at for kill in ledger.kills
        )
        (lost if in_class else missing).append(msg_id)
    # How the addressee's sessions on the killed node stood: lost to a parked session
    # (its buffer filled while the client was away) is the expected case.
    lost_by = collections.Counter(
        "+".join(
            sorted(
                {
                    state
                    for kill in ledger.kills
                    for name, state in kill.held.items()
                    if name.split("/")[0] == ledger.sent[msg_id][1]
                }
            )
        )
        for msg_id in lost
    )
    events, wrong = _node_logs(cluster)
    named = collections.Counter(str(e.get("event")) for e in events)
    reasons = collections.Counter(
        str(e.get("reason")) for e in events if e.get("event") == "connection_closed"
    )
    dropped = collections.Counter(
        f"{e.get('kind')}:{e.get('policy')}" for e in events if e.get("event") == "stanza_dropped"
    )
    warnings = collections.Counter(
        str(e.get("event")) for e in events if e.get("level") == "warning"
    )
    reaped = [
        (e["_node"], e.get("node"), e.get("resources"), e.get("stanzas"))
        for e in events
        if e.get("event") == "node_reaped"
    ]
    counts = {
        **result.counts,
        "lost_in_killed_node": len(lost),
        "missing": len(missing),
        "resent_after_kill": len(ledger.resent_after_kill),
        "refused_dials": cluster.refused,
        **{
            f"server_{name}": named[name]
            for name in (
                "session_parked",
                "sm_resume_elsewhere",
                "sm_surrender",
                "sm_surrender_unknown",
                "sm_resume_failed",
                "node_dead",
                "node_reaped",
                "previous_run_forgotten",
            )
        },
        **{f"closed_{reason}": n for reason, n in sorted(reasons.items())},
        **{f"dropped_{policy}": n for policy, n in sorted(dropped.items())},
        **{f"warning_{name}": n for name, n in sorted(warnings.items())},
    }
    cuts = {k: v for k, v in counts.items() if k.startswith(("cut_", "silent_then_"))}
    kills = [
        (k.node, round(k.at - cluster.chaos_start, 1), dict(sorted(k.held.items())), k.connected)
        for k in ledger.kills
    ]
    print(
        f"\ncluster chaos ledger (seed {seed}):"
        f"\n  outcomes: sent {counts['sent']}, delivered {counts['delivered']}"
        f" (via offline {counts['via_offline']}), bounced {counts['bounced']},"
        f" lost_in_killed_node {len(lost)} (by the addressee's sessions there:"
        f" {dict(lost_by)}), missing {len(missing)},"
        f" duplicates {counts['duplicates']} (exempt resends: ambiguous"
        f" {counts['ambiguous_resends']}, after kill {counts['resent_after_kill']})"
        f"\n  cuts: {cuts}"
        f"\n  sessions: fresh {counts.get('fresh_sessions', 0)}, resumed"
        f" {counts.get('resumed', 0)} (on another node"
        f" {counts.get('resumed_on_another_node', 0)}), resume failed"
        f" {counts.get('resume_failed', 0)} (session's node killed"
        f" {counts.get('resume_failed_node_killed', 0)}; without h"
        f" {counts.get('failed_without_h', 0)})"
        f"\n  kills (node, second of the chaos, sessions there, transports open):"
        f" {kills};"
        f" restarted"
        f" {counts.get('node_restarted', 0)}; reaped (by, node, resources, stanzas): {reaped}"
        f"\n  all: {counts}"
    )
    wrong_ids = missing + [m for m, _ in result.same_session_dups + result.dups_after_ack]
    if wrong_ids:  # what the clients saw of the first few, to reproduce
        words = {"test"}
        for msg_id in wrong_ids[:3]:
            words |= {msg_id, ledger.sent[msg_id][0]}
            words |= {d.client for d in ledger.deliveries.get((ledger.sent[msg_id][1], msg_id), [])}
        print("\n".join(["story:", *ledger.story(words, cluster.chaos_start)][:400]))
    assert not unsettled, unsettled
    assert not missing, (
        f"{len(missing)} messages never arrived nor bounced (not in the killed node's"
        f" class): {[(m, *ledger.sent[m], round(ledger.sent_at[m], 2)) for m in missing[:20]]}"
    )
    if MAX_LOST_IN_KILLED_NODE is not None:
        assert len(lost) <= MAX_LOST_IN_KILLED_NODE, f"lost in the killed node: {lost}"
    left = _offline_left(cluster.database)
    assert not left, f"left in offline storage: {left}"
    assert not [p for p in dropped if p.startswith("message:")], dropped
    assert_honest(result, ledger)
    assert not wrong, "\n".join(wrong[:20])
    # A session that died with its node never comes back; no <failed h/> counts more
    # than the client sent.
    assert counts.get("resumed_a_killed_session", 0) == 0
    assert counts.get("failed_h_beyond_sent", 0) == 0
    unprovoked = counts.get("transport_lost_unprovoked", 0)
    assert unprovoked <= MAX_UNPROVOKED_DROPS, unprovoked
    return counts


@pytest.mark.parametrize("seed", SEEDS)
async def test_cluster_chaos_every_message_is_delivered_stored_or_bounced(
    cluster: Cluster, seed: int
) -> None:
    rng = random.Random(seed)
    ledger = Ledger()
    try:
        async with trio.open_nursery() as nursery:
            clients = make_clients(cluster.dial, ledger, rng, nursery, TIMING)
            world = World(clients, ledger, rng, TIMING)
            killer = random.Random(rng.random())
            with trio.fail_after(90):
                for client in clients:
                    await client.reconnect()
                start = cluster.chaos_start = trio.current_time()
                async with trio.open_nursery() as chaos:
                    for client in clients:
                        chaos.start_soon(run_chaos, world, client, start + CHAOS_SECONDS)
                    chaos.start_soon(_kill_and_restart, cluster, world, killer, start)
                try:
                    unsettled = await drain(world)
                finally:
                    for client in clients:
                        await client.leave()
            nursery.cancel_scope.cancel()
    finally:
        # The clients' story beside the nodes' logs (pytest keeps the last runs' tmp).
        (cluster.database.parent / "clients.trace").write_text(
            "".join(f"{line}\n" for line in ledger.story(set(), cluster.chaos_start, every=True))
        )
    # Stop the nodes (SIGTERM: a clean exit) so their logs are complete.
    async with trio.open_nursery() as stopping:
        for node in cluster.nodes:
            stopping.start_soon(_stop, node)
    codes = {node.name: node.gateway.proc.returncode for node in cluster.nodes}
    counts = _check(world, cluster, seed, unsettled)
    assert codes == dict.fromkeys(NODES, 0), codes
    assert counts["sent"] > 100
    assert counts["node_killed"] == 1 and counts["node_restarted"] == 1
    assert ledger.kills[0].held, "no session was on the killed node"
    assert counts.get("resumed_on_another_node", 0) > 0
