"""Scripted XEP-0198 conversations with an in-process gateway (STYLE V4).

`Peer` is a RawClient plus the client's half of stream management (its h and SM-ID);
`online()`, `authenticated()` and `resume()` log peers in over trio memory streams on
listener PLAIN (`tls: none`, so SASL PLAIN is offered and no TLS handshake is needed),
which lets `autojump_clock` run the timeouts (STYLE V2, V3). `Peer.sync()` first lets
every task settle, then reads what the server queued up to a barrier (an `<r/>` answered
by `<a/>` with SM on, a ping's result otherwise), so "nothing else arrived" is checkable.
The functions on element lists (`bodies`, `stanzas`, `presences`, ...) read what a
`sync()` returned.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import trio
import trio.testing

from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element
from gateway.xmpp.stanza import stanza_kind
from tests.helpers.accounts import PASSWORD
from tests.helpers.client import RawClient, read_to_end
from tests.helpers.inprocess import Connect

PLAIN = 2  # listener index: tls none, so PLAIN is offered and memory streams need no TLS
MOD = 2**32
LIMIT = 20  # seconds (virtual ones under autojump_clock) before a hung test fails
R = f"<r xmlns='{ns.SM}'/>"
RESUMABLE = " resume='true'"


def sm_options(**options: object) -> dict[str, object]:
    """The `modules` config section with these mod_stream_management options."""
    return {"mod_stream_management": options}


def failed(condition: str, h: int | None = None) -> Element:
    """The `<failed/>` we expect: one stanza error condition, `h` only when given."""
    attrs = {} if h is None else {"h": str(h)}
    return Element(ns.SM, "failed", attrs, [Element(ns.STANZAS_ERRORS, condition)])


def message(to: str, body: str) -> str:
    """A chat message whose id is its body, so resent and rerouted copies are traceable."""
    return f"<message to='{to}' type='chat' id='{body}'><body>{body}</body></message>"


def body(element: Element) -> str | None:
    """The body of a message element (None for anything else, or no body)."""
    return element.find_text(ns.CLIENT, "body") if element.tag == (ns.CLIENT, "message") else None


def bodies(elements: Iterable[Element]) -> list[str]:
    """The body of each message among `elements`, in order ("" for none)."""
    return [
        e.find_text(ns.CLIENT, "body") or "" for e in elements if e.tag == (ns.CLIENT, "message")
    ]


def stanzas(elements: Iterable[Element]) -> list[Element]:
    """The stanzas (message, presence, iq) among `elements`: what counts for h."""
    return [e for e in elements if stanza_kind(e) is not None]


def requests(elements: Iterable[Element]) -> int:
    """How many `<r/>` the server sent among `elements`."""
    return sum(1 for e in elements if e.tag == (ns.SM, "r"))


def presences(elements: Iterable[Element], type_: str | None = None) -> list[str]:
    """The `from` of each presence of this type (None: available) among `elements`."""
    return [
        e.get("from") or ""
        for e in elements
        if e.tag == (ns.CLIENT, "presence") and e.get("type") == type_
    ]


class Peer:
    """A scripted client (RawClient) plus the client's half of XEP-0198: its h and SM-ID."""

    def __init__(self, raw: RawClient) -> None:
        self.raw = raw
        self.managed = False
        self.h = 0  # stanzas handled from the server since <enabled/> (the client's h)
        self.smid: str | None = None
        self.server_h: int | None = None  # from the last <a/> the server sent
        self.at_login: list[Element] = []  # what initial presence brought (see online())
        self._pings = 0

    async def send(self, xml: str) -> None:
        """Write `xml` as it is."""
        await self.raw.send(xml)

    async def receive(self) -> Element:
        """The next element, counted into h (a stanza, with SM on) or server_h (`<a/>`)."""
        element = await self.raw.receive()
        if self.managed and stanza_kind(element) is not None:
            self.h = (self.h + 1) % MOD
        elif element.tag == (ns.SM, "a"):
            self.server_h = int(element.get("h") or "-1")
        return element

    async def enable(self, attrs: str = RESUMABLE) -> Element:
        """Send `<enable/>` with `attrs`; the answer (h restarts at 0 on `<enabled/>`)."""
        await self.send(f"<enable xmlns='{ns.SM}'{attrs}/>")
        answer = await self.receive()
        if answer.tag == (ns.SM, "enabled"):
            self.managed, self.h, self.smid = True, 0, answer.get("id")
        return answer

    async def until(self, done: Callable[[Element], bool]) -> list[Element]:
        """Elements up to the first one `done` accepts (that one is left out)."""
        seen: list[Element] = []
        while not done(element := await self.receive()):
            seen.append(element)
        return seen

    async def sync(self) -> list[Element]:
        """Everything the server queued for this client once all tasks settled."""
        await trio.testing.wait_all_tasks_blocked()
        if self.managed:
            await self.send(R)
            return await self.until(lambda e: e.tag == (ns.SM, "a"))
        self._pings += 1
        ping = f"sync{self._pings}"
        await self.send(f"<iq type='get' id='{ping}'><ping xmlns='{ns.PING}'/></iq>")
        return await self.until(lambda e: e.name == "iq" and e.get("id") == ping)

    async def ack(self, h: int | None = None) -> None:
        """Send `<a h/>`: this peer's h, or `h` when given."""
        await self.send(f"<a xmlns='{ns.SM}' h='{self.h if h is None else h}'/>")

    async def drain(self) -> list[Element]:
        """`sync()`, then acknowledge everything handled so far."""
        elements = await self.sync()
        if self.managed:
            await self.ack()
        return elements

    async def cut(self) -> None:
        """The network goes away: no `</stream:stream>`, the server only sees EOF."""
        await trio.aclose_forcefully(self.raw.stream)
        await trio.testing.wait_all_tasks_blocked()

    async def close(self) -> None:
        """A clean close: `</stream:stream>`, then wait for the server's."""
        await self.raw.close()
        await trio.testing.wait_all_tasks_blocked()


async def stream_error(peer: Peer) -> Element:
    """Read up to the `<stream:error/>`, check the stream then ends, and return the error."""
    while (element := await peer.raw.receive()).tag != (ns.STREAM, "error"):
        pass
    await read_to_end(peer.raw)
    return element


async def online(
    connect: Connect,
    user: str,
    resource: str,
    *,
    sm: str | None = None,
    priority: int | None = 0,
) -> Peer:
    """Log in on a memory stream; enable SM with `sm` attributes when given; send initial
    presence unless `priority` is None; read (and ack) whatever that brought."""
    raw = await connect(PLAIN, memory=True)
    await raw.login(user, PASSWORD, resource=resource, mechanism="PLAIN")
    peer = Peer(raw)
    if sm is not None:
        assert (await peer.enable(sm)).tag == (ns.SM, "enabled")
    if priority is not None:
        await peer.send(f"<presence><priority>{priority}</priority></presence>")
        peer.at_login = await peer.drain()
    return peer


async def authenticated(connect: Connect, user: str, *, memory: bool = True) -> Peer:
    """A stream past SASL and the restart, before bind (loopback TCP without `memory`)."""
    raw = await connect(PLAIN, memory=memory)
    await raw.open()
    assert (await raw.auth(user, PASSWORD, "PLAIN")).name == "success"
    raw.parser.reset()
    await raw.open()
    return Peer(raw)


async def resume(
    connect: Connect, user: str, previd: str | None, h: int, *, memory: bool = True
) -> tuple[Peer, Element]:
    """A new stream that sends `<resume previd h/>` after SASL; returns it and the answer."""
    peer = await authenticated(connect, user, memory=memory)
    await peer.send(f"<resume xmlns='{ns.SM}' previd='{previd}' h='{h}'/>")
    answer = await peer.receive()
    if answer.tag == (ns.SM, "resumed"):
        peer.managed, peer.h, peer.smid = True, h, previd
    return peer, answer


def offline_delivery(elements: Iterable[Element]) -> list[tuple[str, str | None]]:
    """(body, delay 'from') of each message among `elements` (XEP-0203 stamp checked)."""
    found: list[tuple[str, str | None]] = []
    for element in stanzas(elements):
        if element.name != "message":
            continue
        delay = element.find(ns.DELAY, "delay")
        if delay is not None:
            assert re.fullmatch(
                r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", delay.get("stamp") or ""
            )
        found.append(
            (
                element.find_text(ns.CLIENT, "body") or "",
                None if delay is None else delay.get("from"),
            )
        )
    return found


async def first(peer: Peer, wanted: Callable[[Element], bool], seconds: float) -> Element:
    """The first element `wanted` accepts, read within `seconds` (real time: for
    deliveries that cross real sockets, where waiting for all tasks to block proves
    nothing)."""
    with trio.fail_after(seconds):
        while not wanted(element := await peer.receive()):
            pass
    return element
