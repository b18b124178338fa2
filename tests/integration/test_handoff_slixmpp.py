"""XEP-0198 sessions survive a gateway restart: slixmpp resumes on the next process.

The gateway runs as a subprocess started with its CLI (as in `test_slixmpp.py`); the
test restarts it in the steps of `LiveGateway.restart()`, checking in between: SIGTERM
(`terminate()`), exit status 0 (`stop()`), then `serve` again (`start()`) on the same
directory, config, database and c2s port. With
`handoff_on_shutdown` (on by default, so the config below does not name it) the first
process writes alice's resumable session, with the stanzas she has not acked, to the
`sm_handoff` table of `auth.database`; the second parks it again before it listens, and
alice's `<resume previd h/>` gets `<resumed/>` and whatever she had not received.

alice is slixmpp with `xep_0198` (resumption on); bob is a plain slixmpp client that
sends her numbered messages `m<i>` with ids `bob-m<i>` and ends with a ping, whose answer
means the gateway has routed them. Every delivery alice sees is counted as it comes: no
dedup, so a repeat would show as a count of 2 (with the repeated id).

The acks are deterministic: the gateway asks for none (`ack: false`) and alice's plugin
asks for none (its window is never reached), so alice acks only in `ack_all()` (her
`<a h/>`, then an `<r/>` whose answer proves the gateway read the `<a/>` first). The
stanzas in the hand-off are then exactly those sent to alice since her last `ack_all()`.

Scenario A (live session): alice is connected when the gateway stops; she gets the
`system-shutdown` stream error and reconnects by herself, retrying every RETRY seconds
(slixmpp's own back-off waits 3, 9, 21 seconds...) until the new process listens.
Scenario B (parked session): `CutProxy` (`tests/helpers/proxy.py`) resets alice's link
first, bob's messages go into her parked buffer, then the gateway restarts and alice
connects again through the proxy (by hand: an automatic reconnect would resume on the
first process, before the restart).

slixmpp runs on asyncio, so each scenario is bounded with `asyncio.timeout` (the asyncio
counterpart of `trio.fail_after`) and every single wait by WAIT.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import slixmpp
from slixmpp.plugins.xep_0198 import stanza as sm_stanza
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from tests.helpers.accounts import LIVE_PASSWORD
from tests.helpers.live import LiveGateway, live_gateway, starttls_config
from tests.helpers.logs import event_is, named, wait_for_log_line_asyncio
from tests.helpers.proxy import CutProxy
from tests.helpers.slixmpp_clients import verified_starttls

pytestmark = pytest.mark.integration

ALICE = "alice@localhost/desk"
BOB = "bob@localhost/phone"
RESUME_TIMEOUT = 60  # seconds: resume_timeout in CONFIG, granted to alice (she asks no max)
SCENARIO_BOUND = 25.0  # seconds of wall time for a scenario (it takes under 2)
WAIT = 10.0  # seconds: the bound on every single wait below
RETRY = 0.2  # seconds between alice's connection attempts while the gateway is down

CONFIG = starttls_config(
    general="shutdown_grace: 0.5",
    modules="mod_stream_management: {resume_timeout: 60, ack: false}",
)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[LiveGateway]:
    with live_gateway(tmp_path, CONFIG, password=LIVE_PASSWORD, certs=True) as server:
        yield server


class QuickRetryXMPP(slixmpp.ClientXMPP):
    """A slixmpp client that retries a failed connection every RETRY seconds."""

    def reschedule_connection_attempt(self) -> asyncio.Future[Any] | None:
        # slixmpp's version sets the next wait to min(300, 2 * wait + 1).
        if self._current_connection_attempt is None:
            return None
        self._connect_loop_wait = RETRY
        self._current_connection_attempt = asyncio.ensure_future(self._connect_loop())
        return self._current_connection_attempt


class Client:
    """One slixmpp client (STARTTLS, the gateway's certificate verified) and what it saw."""

    def __init__(self, jid: str, gateway: LiveGateway, port: int, *, sm: bool) -> None:
        client = verified_starttls(QuickRetryXMPP(jid, LIVE_PASSWORD), gateway.cert)
        self.sm: Any = None
        if sm:
            # A window never reached: the plugin asks the gateway for no acks by itself.
            client.register_plugin("xep_0198", pconfig={"window": 10**9, "allow_resume": True})
            self.sm = client.plugin["xep_0198"]
            client.register_handler(
                Callback(
                    "test: the gateway's <a/>",
                    MatchXPath(sm_stanza.Ack.tag_name()),
                    self._on_gateway_ack,
                    instream=True,
                )
            )
        self.client = client
        self.port = port
        self.reconnect = False  # connect again at once after each disconnection
        self.gateway_acks = 0
        self.acked_h = 0  # alice's h in her last ack_all()
        self.events: collections.Counter[str] = collections.Counter()
        self.stream_errors: list[str] = []
        self.deliveries: list[tuple[str, str]] = []  # (id, body) of every m<i> received
        self.changed = asyncio.Event()
        for name in ("session_start", "session_resumed", "sm_enabled", "sm_failed"):
            client.add_event_handler(name, self._counter(name))
        client.add_event_handler("failed_all_auth", self._counter("failed_all_auth"))
        client.add_event_handler("connection_failed", self._counter("connection_failed"))
        client.add_event_handler("disconnected", self._on_disconnected)
        client.add_event_handler("stream_error", self._on_stream_error)
        client.add_event_handler("message", self._on_message)

    def _counter(self, name: str) -> Callable[[object], None]:
        def handler(_event: object) -> None:
            self.events[name] += 1
            if name == "session_start":
                self.client.send_presence()  # available: bob's messages to the bare JID route
            self.changed.set()

        return handler

    async def _on_disconnected(self, _event: object) -> None:
        self.events["disconnected"] += 1
        self.changed.set()
        if self.reconnect:
            await asyncio.sleep(0)  # as slixmpp's reconnect(): let sync handlers run first
            self.connect()

    def _on_stream_error(self, error: Any) -> None:
        self.stream_errors.append(str(error["condition"]))
        self.changed.set()

    def _on_message(self, message: Any) -> None:
        if message["type"] == "chat" and str(message["body"]).startswith("m"):
            self.deliveries.append((str(message["id"]), str(message["body"])))
            self.changed.set()

    def _on_gateway_ack(self, _ack: Any) -> None:
        self.gateway_acks += 1
        self.changed.set()

    def connect(self) -> None:
        self.client.connect("127.0.0.1", self.port)

    async def until(self, what: str, condition: Callable[[], bool]) -> None:
        """Wait (bounded) until `condition()` holds."""
        try:
            async with asyncio.timeout(WAIT):
                while not condition():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"{self.client.boundjid}: timed out waiting for {what}; "
                f"events={dict(self.events)} errors={self.stream_errors} "
                f"deliveries={self.deliveries}"
            ) from None

    async def online(self, sessions: int = 1) -> None:
        """Connect and wait for the `sessions`-th session start (and SM, if on)."""
        self.connect()
        await self.until("session start", lambda: self.events["session_start"] == sessions)
        if self.sm is not None:
            await self.until("sm enabled", lambda: self.events["sm_enabled"] == sessions)
            assert self.sm.sm_id, "the gateway granted no resumable SM id"

    async def ack_all(self) -> None:
        """Ack every stanza handled so far and wait until the gateway has read the ack."""
        seen = self.gateway_acks
        self.acked_h = self.sm.handled
        self.sm.send_ack()
        self.sm.request_ack()  # answered after the <a/> is processed (one ordered stream)
        await self.until("the gateway's <a/>", lambda: self.gateway_acks > seen)

    def unacked(self) -> int:
        """Stanzas handled since the last ack_all() (h arithmetic is modulo 2**32)."""
        return int((self.sm.handled - self.acked_h) % 2**32)

    async def ping(self) -> None:
        """A round trip to the gateway: whatever it wrote before the answer has arrived."""
        await self.client.plugin["xep_0199"].ping(jid=slixmpp.JID("localhost"), timeout=WAIT)

    async def send_to_alice(self, numbers: range) -> None:
        """m<i> (id bob-m<i>) to alice's bare JID; the ping's answer means all are routed."""
        for i in numbers:
            message = self.client.make_message(
                mto=slixmpp.JID("alice@localhost"), mbody=f"m{i}", mtype="chat"
            )
            message["id"] = f"bob-m{i}"
            message.send()
        await self.ping()

    def bodies(self) -> list[str]:
        return [body for _id, body in self.deliveries]

    async def goodbye(self) -> None:
        self.reconnect = False
        if self.client.is_connected():
            try:
                await asyncio.wait_for(self.client.disconnect(), 5)
            except TimeoutError:
                self.client.abort()


def _stored_smids(gateway: LiveGateway) -> list[str]:
    """The SM ids in the hand-off table of `auth.database` (read-only)."""
    path = gateway.config.parent / "data" / "accounts.sqlite"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return [str(row[0]) for row in db.execute("SELECT smid FROM sm_handoff ORDER BY seq")]


async def _stop(gateway: LiveGateway) -> list[dict[str, Any]]:
    """Wait for the first process's exit (after `terminate()`): status 0; its log lines."""
    code = await asyncio.to_thread(gateway.stop)
    assert code == 0, gateway.log.read_text()[-6000:]
    return gateway.log_events(run=0)


def _assert_handed_off(first_run: list[dict[str, Any]], unacked: int) -> None:
    """The first process kept alice's session (and only hers) with `unacked` stanzas."""
    handed = named(first_run, "session_handed_off")
    assert [e.get("jid") for e in handed] == [ALICE], handed
    assert handed[0]["unacked"] == unacked
    assert 0 < handed[0]["remaining"] <= RESUME_TIMEOUT
    batch = named(first_run, "sessions_handed_off")
    assert len(batch) == 1
    assert (batch[0]["sessions"], batch[0]["stanzas"]) == (1, unacked)
    # bob had no stream management: his session ended as before.
    bobs = named(first_run, "connection_closed", BOB)
    assert [e.get("reason") for e in bobs] == ["system-shutdown"], bobs


def _assert_revived(second_run: list[dict[str, Any]], unacked: int, handed: Any) -> None:
    revived = named(second_run, "sessions_revived")
    assert len(revived) == 1 and revived[0]["sessions"] == 1, revived
    mine = named(second_run, "session_revived")
    assert [e.get("jid") for e in mine] == [ALICE], mine
    assert mine[0]["unacked"] == unacked
    # What was left of the resumption time went on counting while nothing ran.
    assert 0 < mine[0]["remaining"] <= handed["remaining"]


def test_live_session_resumes_after_restart_and_gets_every_message_once(
    gateway: LiveGateway,
) -> None:
    async def scenario() -> None:
        alice = Client(ALICE, gateway, gateway.port, sm=True)
        bob = Client(BOB, gateway, gateway.port, sm=False)
        try:
            await alice.online()
            smid = alice.sm.sm_id
            await bob.online()
            await bob.send_to_alice(range(3))
            await alice.until("m0..m2", lambda: len(alice.deliveries) == 3)
            await alice.ack_all()
            # m3..m5 arrive, and alice does not ack them: they are what the hand-off keeps.
            await bob.send_to_alice(range(3, 6))
            await alice.until("m3..m5", lambda: len(alice.deliveries) == 6)
            assert alice.unacked() == 3

            alice.reconnect = True
            gateway.terminate()
            await alice.until("system-shutdown", lambda: alice.events["disconnected"] == 1)
            await bob.until("system-shutdown", lambda: bob.events["disconnected"] == 1)
            assert alice.stream_errors == ["system-shutdown"]
            assert bob.stream_errors == ["system-shutdown"]
            first_run = await _stop(gateway)
            _assert_handed_off(first_run, unacked=3)
            handed = named(first_run, "session_handed_off")[0]
            assert _stored_smids(gateway) == [smid]

            # alice is retrying meanwhile; the new process revives her session first.
            await asyncio.to_thread(gateway.start)
            assert _stored_smids(gateway) == [], "the new process took the snapshot"
            await alice.until("resumed", lambda: alice.events["session_resumed"] == 1)
            await alice.ping()  # anything resent came before its answer
            second_run = gateway.log_events(run=1)
            _assert_revived(second_run, unacked=3, handed=handed)
            resumed = named(second_run, "session_resumed", ALICE)
            assert len(resumed) == 1
            # alice's <resume h/> acked m3..m5, which she had received: none comes again.
            assert resumed[0]["resent"] == 0

            assert alice.sm.sm_id == smid
            assert alice.events["session_start"] == 1, "resumption must not start a session"
            assert alice.events["sm_failed"] == 0
            assert alice.events["connection_failed"] >= 1, "alice retried while it was down"
            counts = collections.Counter(alice.deliveries)
            assert counts == {(f"bob-m{i}", f"m{i}"): 1 for i in range(6)}, alice.deliveries
        finally:
            await alice.goodbye()
            await bob.goodbye()

    async def bounded() -> None:
        async with asyncio.timeout(SCENARIO_BOUND):
            await scenario()

    asyncio.run(bounded())


def test_parked_session_resumes_after_restart_with_its_buffer_once(gateway: LiveGateway) -> None:
    async def scenario() -> None:
        proxy = CutProxy(gateway.port)
        await proxy.start()
        alice = Client(ALICE, gateway, proxy.port, sm=True)
        bob = Client(BOB, gateway, gateway.port, sm=False)
        try:
            await alice.online()
            smid = alice.sm.sm_id
            await bob.online()
            await bob.send_to_alice(range(2))
            await alice.until("m0..m1", lambda: len(alice.deliveries) == 2)
            await alice.ack_all()
            proxy.cut()
            await alice.until("cut", lambda: alice.events["disconnected"] == 1)
            await wait_for_log_line_asyncio(
                gateway, event_is("session_parked", ALICE), timeout=WAIT, what="alice parked"
            )
            # m2..m6 go into alice's parked buffer.
            await bob.send_to_alice(range(2, 7))

            gateway.terminate()
            await bob.until("system-shutdown", lambda: bob.events["disconnected"] == 1)
            assert bob.stream_errors == ["system-shutdown"]
            first_run = await _stop(gateway)
            _assert_handed_off(first_run, unacked=5)
            handed = named(first_run, "session_handed_off")[0]
            assert _stored_smids(gateway) == [smid]

            await asyncio.to_thread(gateway.start)
            assert _stored_smids(gateway) == [], "the new process took the snapshot"
            second_run = gateway.log_events(run=1)  # revived before it listened
            _assert_revived(second_run, unacked=5, handed=handed)
            alice.connect()  # through the proxy again
            await alice.until("resumed", lambda: alice.events["session_resumed"] == 1)
            await alice.until("m2..m6", lambda: len(alice.deliveries) >= 7)
            # bob logs in again; what he sends now reaches the resumed session.
            await bob.online(sessions=2)
            await bob.send_to_alice(range(7, 9))
            await alice.until("m7..m8", lambda: len(alice.deliveries) >= 9)
            await alice.ping()  # anything still on its way came before the answer

            resumed = named(gateway.log_events(run=1), "session_resumed", ALICE)
            assert len(resumed) == 1
            assert resumed[0]["resent"] == 5  # m2..m6 came out of the revived buffer
            assert alice.sm.sm_id == smid
            assert alice.events["session_start"] == 1, "resumption must not start a session"
            assert alice.events["sm_failed"] == 0
            assert proxy.accepted == 2
            assert alice.deliveries == [(f"bob-m{i}", f"m{i}") for i in range(9)]
        finally:
            await alice.goodbye()
            await bob.goodbye()
            await proxy.close()

    async def bounded() -> None:
        async with asyncio.timeout(SCENARIO_BOUND):
            await scenario()

    asyncio.run(bounded())
