"""The h of this node's resumable sessions, mirrored into the cluster's `stale_h`.

XEP-0198 section 5: a server that cannot resume a session should say in `<failed/>` how
many stanzas it had handled (`h`), so the client knows what to send again. When a node
dies, its sessions die with it, and no session end writes their h. So every interval
each node of a cluster (with `stale_h.enabled`) writes the `counter_in` of every
resumable session it holds whose h changed since the last round; a resume that fails on
another node then answers with the last h Redis knew (at most one interval old, and
never more than the dead node had really handled). A session that ends normally
overwrites its entry with its final h, as on one node.
"""

from __future__ import annotations

import structlog
import trio

from gateway.core.context import ServerContext
from gateway.errors import StorageError
from gateway.storage.base import StaleH

log = structlog.get_logger(module=__name__)


async def run_h_mirror(
    ctx: ServerContext,
    interval: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Every `interval` seconds, write the changed h of this node's resumable sessions to
    `stale_h` (module docstring); never returns. A store failure is logged and the round
    tried again at the next interval."""
    written: dict[str, int] = {}
    task_status.started()
    while True:
        await trio.sleep(interval)
        now = ctx.wall_clock()
        current: dict[str, int] = {}
        try:
            for smid, slot in list(ctx.resume.slots.items()):
                sm = slot.session.sm
                if sm is None:
                    continue
                current[smid] = sm.counter_in
                if written.get(smid) != sm.counter_in:
                    await ctx.stale_h.put(StaleH(smid, sm.counter_in, str(slot.jid), now))
        except StorageError as exc:
            log.warning("h_mirror_failed", error=str(exc))
            continue
        written = current
