"""Moving a session to the node its client resumes on (DESIGN section 6).

Theory of operation
-------------------
A client whose session is held by node A sends `<resume/>` to node B. B finds A in the
`sm_session` record (same user), and `fetch` posts `Surrender(smid, B)` to A through the
relay, then waits (bounded) for the session to arrive.

On A, `receive` finds the session's resume slot and asks its connection task to close
with `handoff=True, migrate_to=B` (a transport still attached is closed with `conflict`
first). The task takes the snapshot the restart hand-off takes
(`gateway.core.ending.hand_off`): it ends its slot, leaves the directory and
`sm_session`, and posts `Moved(smid, snapshot)` to B, in that order, so B's records
never race A's removals. From then on A refuses stanzas for it; they take the router's
fallbacks (another resource, or offline storage, flushed to the session after the
resume), so none is lost and none is delivered twice. Nothing of the session remains on A.

On B, `receive(Moved)` parks the snapshot as a local session (`adopt`, the restart's
revival: bound, registered with the next epoch, claimable) and wakes the waiting lender,
which then claims the slot like any local resume and answers `<resumed/>` with the
buffer. A snapshot that arrives after the lender gave up goes to the adoptable store
(`keep`), where the client's next `<resume/>` finds it on any node. A surrender A
cannot make (the session ended meanwhile) answers `Moved` with an empty snapshot, and B
answers `<failed/>` at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

import structlog
import trio

from gateway.core.handoff import read_snapshot
from gateway.core.relay import Relay
from gateway.core.resume import ResumeRegistry
from gateway.errors import StorageError, StreamErrorCondition
from gateway.storage.base import AdoptableStore
from gateway.storage.cluster_codec import Moved, Surrender

log = structlog.get_logger(module=__name__)

#: Seconds a lender waits for a session to arrive from its owner node.
MOVE_WAIT: Final = 6.0

#: Expired adoptable sessions taken per store call by `Migrations.sweep`.
SWEEP_BATCH: Final = 100

Adopt = Callable[[bytes], Awaitable[bool]]
Alive = Callable[[str], Awaitable[bool]]


class Migrations:
    """This node's half of session moves (module docstring).

    Args:
        relay: this node's relay.
        node: this node's id.
        registry: this node's resume slots (sessions that may be surrendered).
        adopt: parks a moved session here from its snapshot; False when it cannot.
    """

    def __init__(
        self,
        relay: Relay,
        node: str,
        registry: ResumeRegistry,
        adopt: Adopt,
        *,
        adoptable: AdoptableStore,
        alive: Alive,
    ) -> None:
        self.relay = relay
        self.node = node
        self.registry = registry
        self.adopt = adopt
        self.adoptable = adoptable
        self.alive = alive
        self._waiting: dict[str, tuple[trio.Event, list[bool]]] = {}
        #: Sessions being handed off here (slot ended, not yet stored or sent), with the
        #: nodes that asked for them meanwhile: answered once the hand-off is done
        #: (`gateway.core.ending.hand_off`), when the store has it or it is gone.
        self.leaving: dict[str, list[str]] = {}

    async def fetch(self, smid: str, owner: str) -> bool:
        """Bring session `smid`, held by node `owner`, here: from the adoptable store
        when `owner` drained, else by asking `owner` (if it lives) and waiting (at most
        `MOVE_WAIT`; a drain under way answers once the session is in the store). True
        once it is parked here; False when it did not come.

        Raises:
            StorageError: the adoptable store failed.
        """
        # The store first: a drained owner may be gone (or about to go) with its
        # heartbeat key still there; asking it would wait `MOVE_WAIT` for nothing.
        if await self._adopt_left(smid):
            return True
        if smid in self._waiting or not await self.alive(owner):
            return False
        if not self.relay.post(owner, Surrender(smid, self.node)):
            return False
        arrived, outcome = self._waiting[smid] = (trio.Event(), [])
        try:
            with trio.move_on_after(MOVE_WAIT):
                await arrived.wait()
        finally:
            del self._waiting[smid]
        if outcome and outcome[0]:
            return True
        # The owner may have drained meanwhile, leaving it for adoption.
        return await self._adopt_left(smid)

    async def _adopt_left(self, smid: str) -> bool:
        """Adopt the session a drained node left in the store, if it is there. Taking it
        and parking it are one shielded, bounded step: a lender cancelled in between
        must not make a taken snapshot vanish."""
        with trio.CancelScope(shield=True), trio.move_on_after(MOVE_WAIT):
            data = await self.adoptable.take(smid)
            return data is not None and await self.adopt(data)
        return False

    async def sweep(self) -> int:
        """End the sessions left for adoption whose time ran out and that no node took:
        each is adopted here and ends at once the way a parked session does, so its
        unacknowledged messages go to another resource or offline storage and its
        unavailable presence is sent (`gateway.core.revive`). Returns how many.

        Raises:
            StorageError: the adoptable store failed.
        """
        swept = 0
        while True:
            # (Shielded: a taken snapshot exists nowhere else until it is parked.)
            with trio.CancelScope(shield=True):
                taken = await self.adoptable.take_expired(SWEEP_BATCH)
                for smid, data in taken:
                    try:
                        await self.adopt(data)
                    except StorageError as exc:
                        await self._put_back(smid, data, exc)
            swept += len(taken)
            if len(taken) < SWEEP_BATCH:
                return swept

    async def _put_back(self, smid: str, data: bytes, error: StorageError) -> None:
        """A swept session could not be ended here (a store failed): back into the store,
        for the next sweep; if that fails too, say so loudly (its messages are lost)."""
        revivable = read_snapshot(data)
        try:
            if revivable is not None:
                await self.adoptable.put(smid, data, revivable.snapshot.expires_at)
                log.warning("sweep_put_back", smid=smid, error=str(error))
                return
        except StorageError as exc:
            error = exc
        log.error("session_lost", smid=smid, error=str(error))

    def send(self, smid: str, snapshot: bytes, to_node: str) -> bool:
        """Post a surrendered session's snapshot to the node that asked for it."""
        return self.relay.post(to_node, Moved(smid, snapshot))

    async def receive(self, item: Surrender | Moved) -> None:
        """A surrender request from another node, or a session arriving from one."""
        if isinstance(item, Surrender):
            if item.smid in self.leaving:
                self.leaving[item.smid].append(item.requester)
                return
            slot = self.registry.slots.get(item.smid)
            request = slot.session.close_request if slot is not None else None
            if slot is not None and request is not None and request.handoff:
                # Already being handed off (its node drains): it goes to the asker
                # instead, unless its snapshot was taken already (then the asker finds
                # it in the adoptable store).
                request.migrate_to = item.requester
                return
            sm = slot.session.sm if slot is not None else None
            if slot is None or sm is None or not sm.resumable:
                # Unknown here, or no longer resumable (its buffer overflowed): the
                # asker answers <failed/> at once instead of waiting.
                log.info("sm_surrender_unknown", smid=item.smid, requester=item.requester)
                self.send(item.smid, b"", item.requester)
                return
            log.info("sm_surrender", smid=item.smid, requester=item.requester)
            slot.session.close(
                StreamErrorCondition.CONFLICT,
                "resumed on another node",
                handoff=True,
                migrate_to=item.requester,
            )
            return
        waiting = self._waiting.get(item.smid)
        if waiting is None:
            await self.keep(item)
            return
        adopted = bool(item.snapshot) and await self.adopt(item.snapshot)
        arrived, outcome = waiting
        outcome.append(adopted)
        arrived.set()

    async def keep(self, item: Moved) -> None:
        """A session that arrives after its lender gave up (its client got `<failed/>`
        and may have opened a new session with the same resource since) is not parked
        here: parking binds its JID, which would end that newer session with
        `conflict`. It goes to the adoptable store instead, where the client's next
        resume (on any node) finds it, or the sweep ends it when its time is up. A
        second delivery of a session parked here already (the relay is at least once)
        changes nothing. (Also where a session goes whose destination left the cluster
        before it could be sent there.)"""
        if not item.snapshot:
            return
        if item.smid in self.registry.slots:
            log.info("sm_move_duplicate", smid=item.smid)
            return
        revivable = read_snapshot(item.snapshot)
        if revivable is None:
            return
        log.info("sm_move_late", smid=item.smid)
        with trio.CancelScope(shield=True):
            await self.adoptable.put(item.smid, item.snapshot, revivable.snapshot.expires_at)


async def run_adoptable_sweep(migrations: Migrations, interval: float) -> None:
    """Every `interval` seconds, end the adoptable sessions that expired unclaimed
    (`Migrations.sweep`); every node runs it, each snapshot is taken by one."""
    while True:
        await trio.sleep(interval)
        swept = await migrations.sweep()
        if swept:
            log.info("adoptable_swept", sessions=swept)
