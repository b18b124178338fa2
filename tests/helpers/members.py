"""Stand-ins for sessions in directory and router tests: a handle
(`gateway.core.directory.Handle`) and a member (`Member`) that record what they are given."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from gateway.errors import StreamErrorCondition
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID

#: A recorded close: (condition, text, handoff).
Closed = tuple[StreamErrorCondition | None, str | None, bool]


@dataclass(eq=False)
class RecordingHandle:
    """Records every stanza offered (`sent`) and every close request (`closed`);
    `accepts=False` makes `send` refuse, as a closing session does (the offer is still
    recorded). Identity equality, like a session."""

    accepts: bool = True
    sent: list[Element] = field(default_factory=list)
    closed: list[Closed] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    def send(self, stanza: Element) -> bool:
        self.sent.append(stanza)
        self.changed.set()
        return self.accepts

    def close(
        self,
        condition: StreamErrorCondition | None = None,
        text: str | None = None,
        *,
        handoff: bool = False,
    ) -> None:
        self.closed.append((condition, text, handoff))
        self.changed.set()

    async def wait(self, done: Callable[[], bool], seconds: float = 10.0) -> None:
        """Wait until `done()` holds (it reads `sent`/`closed`), at most `seconds`."""
        with trio.fail_after(seconds):
            while not done():
                self.changed = trio.Event()
                await self.changed.wait()


@dataclass(eq=False)
class RecordingMember(RecordingHandle):
    """A session of this node as the directory sees it: a recording handle with the
    fields its owner publishes."""

    full_jid: JID | None = None
    priority: int = 0
    presence: Element | None = None
    interested: bool = False
