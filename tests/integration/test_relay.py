"""The relay between the nodes of a cluster (`gateway.core.relay`): the batch format, and
Redis Streams carrying batches from one node's sender to another node's receiver.

The format tests need no server. The others run two `Relay`s (nodes gw1 and gw2), each
with its own client, on the session's real Redis (`redis_url`: an empty database per
test). Items cross real sockets, so the tests wait for what they expect under a deadline
(`CROSSING`) rather than for all tasks to block; the relay's tasks run in a nursery the
test closes itself, before the clients are.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

import pytest
import trio
from coredis.response.types import StreamPending
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from gateway.core.relay import GROUP, Relay
from gateway.core.relay import stream_key as relay_stream_key
from gateway.errors import StorageError, StreamErrorCondition
from gateway.storage.cluster_codec import (
    MAX_RELAYED,
    Close,
    Deliver,
    Item,
    Moved,
    Surrender,
    decode_batch,
    encode_batch,
)
from gateway.storage.redis_client import Redis, open_redis
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import XML_LANG, Element
from gateway.xmpp.jid import JID
from tests.helpers.redis import free_port

PREFIX: Final = "xg:"
#: Seconds an item may take to cross (real sockets to Redis and back).
CROSSING: Final = 5.0
#: Seconds between two looks at Redis while waiting for a state to be reached.
POLL: Final = 0.01

BALCONY: Final = JID.parse("juliet@example.com/balcony")
ORCHARD: Final = JID.parse("romeo@example.com/orchard")
#: A non-ASCII JID (localpart, domain and resource).
JURGEN: Final = JID.parse("jürgen@exämple.com/阳台")

#: How a batch item starts (operation, JID length, payload length), written by hand here
#: so that damaged batches can be built.
HEAD: Final = struct.Struct("!cHI")


def message(n: int, to: JID = BALCONY) -> Deliver:
    """A numbered chat message for `to` (the number is its id and body)."""
    body = Element(ns.CLIENT, "body", None, [str(n)])
    stanza = Element(ns.CLIENT, "message", {"to": str(to), "id": f"m{n}", "type": "chat"}, [body])
    return Deliver(to, stanza)


def stream_key(node: str) -> str:
    return relay_stream_key(PREFIX, node)


@pytest.fixture
async def redis1(redis_url: str) -> AsyncIterator[Redis]:
    async with open_redis(redis_url) as client:
        # The nodes these tests send to exist: each node's receiver makes its stream
        # (and group) when it starts, and the relay writes only to existing streams.
        for node in ("gw2", "gw3", "gw4"):
            await client.xgroup_create(stream_key(node), GROUP, "0", mkstream=True)
        yield client


@pytest.fixture
async def redis2(redis_url: str) -> AsyncIterator[Redis]:
    async with open_redis(redis_url) as client:
        yield client


@pytest.fixture
def gw1(redis_url: str) -> Relay:
    return Relay(redis_url, "gw1", prefix=PREFIX, max_pending=1000)


@pytest.fixture
def gw2(redis_url: str) -> Relay:
    return Relay(redis_url, "gw2", prefix=PREFIX, max_pending=1000)


@contextlib.asynccontextmanager
async def tasks() -> AsyncIterator[trio.Nursery]:
    """A nursery whose tasks (which never return) are cancelled when the block ends."""
    async with trio.open_nursery() as nursery:
        yield nursery
        nursery.cancel_scope.cancel()


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], *, timeout: float = CROSSING
) -> None:
    """Wait until `check` holds (it reads Redis, or a relay's counters), at most `timeout`
    seconds."""
    with trio.fail_after(timeout):
        while True:
            result = check()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await trio.sleep(POLL)


class Inbox:
    """A receiver's `deliver` callback that records what it is given."""

    def __init__(self) -> None:
        self.items: list[Item] = []
        self._changed = trio.Event()

    async def deliver(self, item: Item) -> None:
        self.items.append(item)
        self._changed.set()

    async def wait_for(self, count: int) -> None:
        """Wait until `count` items arrived (at most CROSSING seconds)."""
        with trio.fail_after(CROSSING):
            while len(self.items) < count:
                self._changed = trio.Event()
                await self._changed.wait()


async def drained(redis: Redis, node: str) -> bool:
    """`node`'s stream holds no entry and its group has none pending."""
    key = stream_key(node)
    pending = await redis.xpending(key, GROUP)
    assert isinstance(pending, StreamPending)
    return await redis.xlen(key) == 0 and pending.pending == 0


async def pending_entries(redis: Redis, node: str) -> int:
    """Entries of `node`'s stream read by its receiver and not acknowledged."""
    pending = await redis.xpending(stream_key(node), GROUP)
    assert isinstance(pending, StreamPending)
    return pending.pending


def failures(logs: Sequence[Mapping[str, Any]], event: str) -> int:
    return sum(1 for line in logs if line["event"] == event)


# -- the batch format -------------------------------------------------------------------------


async def test_a_batch_of_deliveries_decodes_to_equal_stanzas_with_non_ascii_and_namespaces() -> (
    None
):
    body = Element(ns.CLIENT, "body", {XML_LANG: "ru"}, ["Привет, 世界 ✓ <&> \"'"])
    receipt = Element("urn:xmpp:receipts", "request")
    extension = Element(
        "urn:example:thing",
        "thing",
        {"{urn:example:attrs}flavour": "süß", "plain": "yes"},
        ["before", Element("urn:example:thing", "inner"), "after"],
    )
    stanza = Element(
        ns.CLIENT,
        "message",
        {"to": str(JURGEN), "from": str(ORCHARD), "id": "ü1", "type": "chat"},
        [body, receipt, extension],
    )
    items: list[Item] = [Deliver(JURGEN, stanza), message(2, ORCHARD)]
    decoded = decode_batch(encode_batch(items))
    assert decoded == items
    first = decoded[0]
    assert isinstance(first, Deliver)
    assert first.stanza == stanza
    assert first.stanza.find("urn:example:thing", "thing") == extension
    assert first.stanza.find_text(ns.CLIENT, "body") == "Привет, 世界 ✓ <&> \"'"


@pytest.mark.parametrize(
    "close",
    [
        Close(BALCONY, StreamErrorCondition.CONFLICT, "Replaced by a new connection"),
        Close(BALCONY, StreamErrorCondition.CONFLICT),
        Close(JURGEN, StreamErrorCondition.SYSTEM_SHUTDOWN, "two\nlines, ünïcode"),
        Close(BALCONY, None, "no condition"),
        Close(BALCONY, None),
    ],
    ids=["condition-and-text", "condition-only", "multiline-text", "text-only", "neither"],
)
async def test_a_close_decodes_to_an_equal_close(close: Close) -> None:
    assert decode_batch(encode_batch([close])) == [close]


async def test_a_mixed_batch_keeps_its_order_and_an_empty_one_is_empty() -> None:
    items: list[Item] = [
        message(1),
        Close(ORCHARD, StreamErrorCondition.CONFLICT, "gone"),
        message(2, JURGEN),
        Close(BALCONY, None),
        message(3),
    ]
    assert decode_batch(encode_batch(items)) == items
    assert encode_batch([]) == b""
    assert decode_batch(b"") == []


async def test_surrender_and_moved_decode_to_equal_items_among_others() -> None:
    items: list[Item] = [
        Surrender("smid-ü", "gw2"),
        message(1),
        Moved("smid-ü", b"\x00snapshot\xff" * 100),
        Moved("gone", b""),
        Close(BALCONY, None),
    ]
    assert decode_batch(encode_batch(items)) == items


async def test_a_batch_cut_inside_an_item_is_refused_and_cut_between_items_is_a_prefix() -> None:
    items: list[Item] = [message(1), Close(ORCHARD, StreamErrorCondition.CONFLICT, "x")]
    data = encode_batch(items)
    boundary = len(encode_batch(items[:1]))
    for cut in range(1, len(data)):
        if cut == boundary:
            assert decode_batch(data[:cut]) == items[:1]
        else:
            with pytest.raises(StorageError):
                decode_batch(data[:cut])


def tree_item(tree: Any) -> bytes:
    """A deliver item whose stanza is `tree`, as JSON."""
    return raw_item(b"d", b"a@b/c", json.dumps(tree).encode())


def nested(depth: int) -> object:
    tree: object = ["", "leaf", {}, []]
    for _ in range(depth):
        tree = ["", "a", {}, [tree]]
    return tree


async def test_a_stanza_tree_nested_to_the_limit_decodes_and_deeper_is_refused() -> None:
    (item,) = decode_batch(tree_item(nested(256)))
    assert isinstance(item, Deliver) and item.stanza.name == "a"
    with pytest.raises(StorageError, match="not a stanza tree"):
        decode_batch(tree_item(nested(257)))
    with pytest.raises(StorageError):
        decode_batch(raw_item(b"d", b"a@b/c", b"[" * 100_000))  # (the JSON parser's own limit)


MESSAGE = ["jabber:client", "message"]


@pytest.mark.parametrize(
    "tree",
    [
        pytest.param([*MESSAGE, {}], id="three-parts"),
        pytest.param({"ns": "jabber:client"}, id="an-object"),
        pytest.param(["jabber:client", "", {}, []], id="no-name"),
        pytest.param([None, "message", {}, []], id="null-namespace"),
        pytest.param([*MESSAGE, {"to": 1}, []], id="int-attribute"),
        pytest.param([*MESSAGE, [], []], id="attributes-not-an-object"),
        pytest.param([*MESSAGE, {}, [3]], id="int-child"),
        pytest.param([*MESSAGE, {}, [["", "b", {}]]], id="bad-child"),
        pytest.param("just text", id="text"),
        # What the serializer would write unescaped, or refuse at the client's writer:
        pytest.param(["jabber:client", "x/><iq", {}, []], id="tag-breaking-name"),
        pytest.param([*MESSAGE, {"a='1' b": "x"}, []], id="tag-breaking-key"),
        pytest.param(["http://etherx.jabber.org/streams", "error", {}, []], id="stream-element"),
        pytest.param([*MESSAGE, {}, ["\x00"]], id="nul-text"),
        pytest.param([*MESSAGE, {"id": "\ufffe"}, []], id="non-character-attribute"),
    ],
)
async def test_a_stanza_tree_of_the_wrong_shape_is_refused(tree: object) -> None:
    with pytest.raises(StorageError):
        decode_batch(tree_item(tree))


async def test_a_relayed_stanza_past_the_size_bound_is_refused() -> None:
    big = [*MESSAGE, {}, ["x" * MAX_RELAYED]]
    with pytest.raises(StorageError, match="too large"):
        decode_batch(tree_item(big))


def raw_item(op: bytes, jid: bytes, payload: bytes) -> bytes:
    return HEAD.pack(op, len(jid), len(payload)) + jid + payload


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"garbage", id="garbage"),
        pytest.param(b"\x00", id="one-byte"),
        pytest.param(raw_item(b"x", b"a@b/c", b""), id="unknown-operation"),
        pytest.param(raw_item(b"d", b"a@b/c", b"<message"), id="unfinished-stanza"),
        pytest.param(raw_item(b"d", b"a@b/c", b"<a/><b/>"), id="two-stanzas"),
        pytest.param(raw_item(b"d", b"a@b/c", b""), id="empty-stanza"),
        pytest.param(raw_item(b"d", b"", b"<a/>"), id="empty-jid"),
        pytest.param(raw_item(b"d", b"@@/", b"<a/>"), id="invalid-jid"),
        pytest.param(raw_item(b"d", b"\xff\xfe", b"<a/>"), id="jid-not-utf8"),
        pytest.param(raw_item(b"c", b"a@b/c", b"no-such-condition\n"), id="unknown-condition"),
        pytest.param(raw_item(b"c", b"a@b/c", b"conflict\n\xff"), id="text-not-utf8"),
        pytest.param(encode_batch([message(1)]) + b"d\x00", id="valid-then-truncated-head"),
        pytest.param(
            encode_batch([message(1)]) + raw_item(b"?", b"a@b/c", b""), id="valid-then-unknown"
        ),
    ],
)
async def test_a_damaged_batch_raises_storage_error(data: bytes) -> None:
    with pytest.raises(StorageError):
        decode_batch(data)


def decodes_or_refuses(data: bytes) -> None:
    """`decode_batch` either returns items or raises StorageError: nothing else escapes."""
    try:
        items = decode_batch(data)
    except StorageError:
        return
    assert isinstance(items, list)
    assert all(isinstance(item, Item) for item in items)


_VALID = encode_batch(
    [message(1), Close(ORCHARD, StreamErrorCondition.CONFLICT, "x"), message(2, JURGEN)]
)

_near_valid_items = st.builds(
    lambda op, jid, payload, lengths: (
        HEAD.pack(op, *(lengths or (len(jid), len(payload)))) + jid + payload
    ),
    st.sampled_from([b"d", b"c", b"s", b"m", b"x", b"\x00"]),
    st.one_of(
        st.sampled_from([b"a@b/c", b"", b"@@", "ü@b/ж".encode(), b"b", b"a@b/" + b"r" * 1100]),
        st.binary(max_size=12),
    ),
    st.one_of(
        st.sampled_from(
            [b"<a/>", b"<message xmlns='jabber:client'/>", b"", b"<a", b"conflict\nt", b"x\n"]
        ),
        st.binary(max_size=24),
    ),
    st.none() | st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF)),
)


@settings(deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_to_items_or_raise_storage_error_only(data: bytes) -> None:
    decodes_or_refuses(data)


@settings(deadline=None)
@given(st.lists(_near_valid_items, max_size=4))
def test_nearly_valid_items_decode_to_items_or_raise_storage_error_only(
    parts: list[bytes],
) -> None:
    decodes_or_refuses(b"".join(parts))


@settings(deadline=None)
@given(st.integers(0, len(_VALID) - 1), st.integers(0, 255), st.integers(0, len(_VALID)))
def test_a_valid_batch_with_a_changed_byte_or_cut_decodes_or_raises_storage_error_only(
    position: int, value: int, cut: int
) -> None:
    changed = _VALID[:position] + bytes([value]) + _VALID[position + 1 :]
    decodes_or_refuses(changed)
    decodes_or_refuses(changed[:cut])


# -- across Redis -----------------------------------------------------------------------------


async def test_500_items_posted_while_the_sender_runs_arrive_in_order_exactly_once(
    gw1: Relay, gw2: Relay, redis1: Redis
) -> None:
    posted = [message(n) for n in range(500)]
    inbox = Inbox()
    async with tasks() as nursery:
        await nursery.start(gw2.run_receiver, inbox.deliver)
        await nursery.start(gw1.run_sender)
        for start in range(0, len(posted), 7):
            for item in posted[start : start + 7]:
                assert gw1.post("gw2", item)
            # Let the sender write some of it meanwhile (several rounds, several entries).
            await trio.sleep(0)
        await inbox.wait_for(len(posted))
        await eventually(lambda: drained(redis1, "gw2"))
        assert gw2.received == len(posted)
    assert inbox.items == posted
    assert (gw1.pending, gw1.sent) == (0, len(posted))


async def test_items_posted_before_the_sender_runs_leave_in_one_entry_per_destination(
    gw1: Relay, gw2: Relay, redis1: Redis
) -> None:
    for_gw2 = [message(n) for n in range(150)]
    for_gw3 = [message(n, ORCHARD) for n in range(50)]
    for item in for_gw2:
        assert gw1.post("gw2", item)
    for item in for_gw3:
        assert gw1.post("gw3", item)
    assert gw1.pending == 200
    async with tasks() as nursery:
        await nursery.start(gw1.run_sender)
        await eventually(lambda: gw1.pending == 0)
    # No receiver has read anything yet: the streams hold every XADD made.
    assert await redis1.xlen(stream_key("gw2")) == 1
    assert await redis1.xlen(stream_key("gw3")) == 1
    assert gw1.sent == 200

    inbox = Inbox()
    async with tasks() as nursery:
        await nursery.start(gw2.run_receiver, inbox.deliver)
        await inbox.wait_for(len(for_gw2))
        await eventually(lambda: drained(redis1, "gw2"))
    assert inbox.items == for_gw2


async def write_all(relay: Relay, node: str, items: Sequence[Item]) -> None:
    """Post `items` and run `relay`'s sender until they are written (one entry)."""
    for item in items:
        assert relay.post(node, item)
    async with tasks() as nursery:
        await nursery.start(relay.run_sender)
        await eventually(lambda: relay.pending == 0)


class Boom(Exception):
    pass


async def test_an_entry_whose_delivery_met_a_store_failure_is_delivered_again(
    gw1: Relay, redis1: Redis, redis_url: str
) -> None:
    """A store the delivery needs is away (offline storage, say): the round is not
    acknowledged, and read and delivered again after a pause (at least once)."""
    first = [message(n) for n in range(5)]
    await write_all(gw1, "gw2", first)
    delivered: list[Item] = []
    calls = 0

    async def fail_once_on_the_third(item: Item) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise StorageError("offline storage away")
        delivered.append(item)

    receiver = Relay(redis_url, "gw2", prefix=PREFIX, max_pending=10)
    with capture_logs() as logs:
        async with tasks() as nursery:
            await nursery.start(receiver.run_receiver, fail_once_on_the_third)
            await eventually(lambda: len(delivered) == 2 + len(first))
            await eventually(lambda: drained(redis1, "gw2"))
    assert delivered == first[:2] + first
    assert failures(logs, "relay_delivery_failed") == 1


async def test_a_session_that_could_not_be_kept_is_delivered_again(
    gw1: Relay, redis1: Redis, redis_url: str
) -> None:
    """A moved session exists nowhere else: if storing it fails, its round is not
    acknowledged (a surrender's failure only fails the resume it serves)."""
    moved = Moved("smid-1", b"snapshot")
    await write_all(gw1, "gw2", [Surrender("smid-0", "gw3"), moved])
    seen: list[Item] = []

    async def fail_the_first_move(item: Item) -> None:
        seen.append(item)
        if item == moved and seen.count(moved) == 1:
            raise StorageError("adoptable store away")

    receiver = Relay(redis_url, "gw2", prefix=PREFIX, max_pending=10)
    async with tasks() as nursery:
        await nursery.start(receiver.run_receiver, fail_the_first_move)
        await eventually(lambda: seen.count(moved) == 2)
        await eventually(lambda: drained(redis1, "gw2"))
    assert seen.count(moved) == 2


async def test_a_defect_delivering_one_item_is_logged_and_the_rest_delivered(
    gw1: Relay, redis1: Redis, redis_url: str
) -> None:
    """Any other exception from one item is a defect: logged with its traceback, and the
    stream goes on (read again after a restart, it would stop the node every time)."""
    items = [message(n) for n in range(4)]
    await write_all(gw1, "gw2", items)
    delivered: list[Item] = []

    async def fail_on_the_second(item: Item) -> None:
        if item == items[1]:
            raise Boom
        delivered.append(item)

    receiver = Relay(redis_url, "gw2", prefix=PREFIX, max_pending=10)
    with capture_logs() as logs:
        async with tasks() as nursery:
            await nursery.start(receiver.run_receiver, fail_on_the_second)
            await eventually(lambda: len(delivered) == 3)
            await eventually(lambda: drained(redis1, "gw2"))
    assert delivered == [items[0], *items[2:]]
    assert failures(logs, "relay_item_failed") == 1


async def test_an_entry_whose_receiver_was_cancelled_midway_is_delivered_again_by_the_next(
    gw1: Relay, redis1: Redis, redis_url: str
) -> None:
    items = [message(n) for n in range(4)]
    await write_all(gw1, "gw2", items)

    stuck: list[Item] = []
    inside = trio.Event()

    async def hang_on_the_second(item: Item) -> None:
        stuck.append(item)
        if len(stuck) == 2:
            inside.set()
            await trio.sleep_forever()

    async with tasks() as nursery:
        await nursery.start(
            Relay(redis_url, "gw2", prefix=PREFIX, max_pending=10).run_receiver, hang_on_the_second
        )
        with trio.fail_after(CROSSING):
            await inside.wait()
    assert stuck == items[:2]
    assert await pending_entries(redis1, "gw2") == 1

    inbox = Inbox()
    async with tasks() as nursery:
        await nursery.start(
            Relay(redis_url, "gw2", prefix=PREFIX, max_pending=10).run_receiver, inbox.deliver
        )
        await inbox.wait_for(len(items))
        await eventually(lambda: drained(redis1, "gw2"))
    assert inbox.items == items


async def test_a_large_backlog_leaves_in_bounded_entries_and_arrives_in_order(
    gw2: Relay, redis1: Redis, redis_url: str
) -> None:
    sender = Relay(redis_url, "gw1", prefix=PREFIX, max_pending=100, entry_max_bytes=400)
    items = [message(n) for n in range(20)]
    await write_all(sender, "gw2", items)
    entries = await redis1.xrange(stream_key("gw2"))
    assert len(entries) > 3
    assert all(len(e.field_values[b"b"]) <= 400 for e in entries)
    inbox = Inbox()
    async with tasks() as nursery:
        await nursery.start(gw2.run_receiver, inbox.deliver)
        await inbox.wait_for(len(items))
        await eventually(lambda: drained(redis1, "gw2"))
    assert inbox.items == items


async def test_items_for_a_node_whose_stream_is_gone_take_the_fallback_not_a_new_stream(
    gw1: Relay, redis1: Redis
) -> None:
    """A node that left (or was reaped) after items were posted for it: its stream is not
    made again (nobody would ever read it); the items go to `undeliverable`."""
    given_back: list[Item] = []

    async def undeliverable(item: Item) -> None:
        given_back.append(item)

    gw1.undeliverable = undeliverable
    items: list[Item] = [message(1), Close(BALCONY, None), message(2)]
    with capture_logs() as logs:
        async with tasks() as nursery:
            for item in items:
                assert gw1.post("gone", item)
            await nursery.start(gw1.run_sender)
            await eventually(lambda: gw1.pending == 0)
    assert given_back == items
    assert await redis1.exists([stream_key("gone")]) == 0
    assert failures(logs, "relay_destination_gone") == 1


async def test_post_refuses_past_max_pending_and_accepts_again_once_written(
    redis_url: str,
) -> None:
    relay = Relay(redis_url, "gw1", prefix=PREFIX, max_pending=3)
    assert relay.post("gw2", message(1))
    assert relay.post("gw3", message(2))
    assert relay.post("gw2", Close(BALCONY, StreamErrorCondition.CONFLICT))
    # The limit counts every destination together.
    assert not relay.post("gw2", message(3))
    assert not relay.post("gw4", message(4))
    assert relay.pending == 3
    async with tasks() as nursery:
        await nursery.start(relay.run_sender)
        await eventually(lambda: relay.pending == 0)
        assert relay.post("gw2", message(5))


async def test_with_redis_unreachable_post_accepts_up_to_max_pending_and_the_tasks_retry() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    if True:
        relay = Relay(dead, "gw1", prefix=PREFIX, max_pending=5)
        receiver = Relay(dead, "gw2", prefix=PREFIX, max_pending=5)
        assert all(relay.post("gw2", message(n)) for n in range(5))
        assert not relay.post("gw2", message(5))
        inbox = Inbox()
        with capture_logs() as logs:
            async with tasks() as nursery:
                await nursery.start(relay.run_sender)
                await nursery.start(receiver.run_receiver, inbox.deliver)
                await eventually(lambda: failures(logs, "relay_write_failed") >= 3)
                await eventually(lambda: failures(logs, "relay_read_failed") >= 2)
                assert relay.pending == 5
        assert (relay.pending, relay.sent) == (5, 0)
        assert not relay.post("gw2", message(6))
        assert inbox.items == []


async def test_a_batch_refused_by_redis_is_written_again_in_order_with_what_came_meanwhile(
    gw1: Relay, gw2: Relay, redis1: Redis
) -> None:
    key = stream_key("gw2")
    # A key of another type makes every XADD to it fail until it is gone.
    await redis1.set(key, b"not a stream")
    before = [message(n) for n in range(5)]
    after = [message(n) for n in range(5, 9)]
    with capture_logs() as logs:
        async with tasks() as nursery:
            for item in before:
                assert gw1.post("gw2", item)
            await nursery.start(gw1.run_sender)
            await eventually(lambda: failures(logs, "relay_write_failed") >= 1)
            for item in after:
                assert gw1.post("gw2", item)
            assert gw1.pending == len(before) + len(after)
            async with redis1.pipeline(transaction=True) as fix:  # a stream again, at once
                fix.delete([key])
                fix.xgroup_create(key, GROUP, "0", mkstream=True)
            await eventually(lambda: gw1.pending == 0)

            inbox = Inbox()
            await nursery.start(gw2.run_receiver, inbox.deliver)
            await inbox.wait_for(len(before) + len(after))
            await eventually(lambda: drained(redis1, "gw2"))
    assert inbox.items == before + after
    assert gw1.sent == len(before) + len(after)


async def test_a_destination_refusing_writes_does_not_duplicate_the_batches_of_the_others(
    gw1: Relay, redis1: Redis, redis_url: str
) -> None:
    await redis1.set(stream_key("gw2"), b"not a stream")
    for_gw3 = [message(n, ORCHARD) for n in range(3)]
    with capture_logs() as logs:
        async with tasks() as nursery:
            assert gw1.post("gw2", message(0))
            for item in for_gw3:
                assert gw1.post("gw3", item)
            await nursery.start(gw1.run_sender)
            await eventually(lambda: failures(logs, "relay_write_failed") >= 2)
            await redis1.delete([stream_key("gw2")])
            await eventually(lambda: gw1.pending == 0)

            inbox = Inbox()
            gw3 = Relay(redis_url, "gw3", prefix=PREFIX, max_pending=10)
            await nursery.start(gw3.run_receiver, inbox.deliver)
            await inbox.wait_for(len(for_gw3))
            await eventually(lambda: drained(redis1, "gw3"))
    assert inbox.items == for_gw3
