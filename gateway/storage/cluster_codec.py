"""The bytes a cluster writes into Redis (DESIGN section 6): a resource's record in the
session directory (`gateway.core.cluster`), and the batches of items nodes send one
another through their streams (`gateway.core.relay`). Pure: no Redis, no clock.

A record is `node NUL session NUL priority NUL flags NUL presence`; a batch is, per
item, an operation byte, the target's length and the payload's length (`!cHI`), the
target (a JID, or an SM id for session moves) and the payload (a stanza, a close
condition, a requesting node, or a session snapshot).

A stanza crosses as its tree, `(namespace, name, attributes, children)` nested, in
`marshal` format version 4 (stable across Python versions since 3.4), not as XML: a
crossing message is then neither serialized nor parsed on its way between nodes, which
made up half of what crossing cost (3.5 times cheaper each way, measured on a chat
message). The tree is checked while it is rebuilt (types, depth), so damaged bytes are a
`StorageError`, never a malformed element; the relay's entries are short-lived and come
from the cluster's own nodes (whoever can write to its Redis can send stanzas anyway).
What stays in Redis for long (directory records) or in databases is XML.
"""

from __future__ import annotations

import marshal
import struct
from dataclasses import dataclass
from typing import Final

from gateway.errors import JIDError, StorageError, StreamErrorCondition
from gateway.storage.codec import decode_stanza, encode_stanza
from gateway.xmpp.element import Element
from gateway.xmpp.jid import JID

_DELIVER: Final = b"d"
_CLOSE: Final = b"c"
_SURRENDER: Final = b"s"
_MOVED: Final = b"m"
_HEAD: Final = struct.Struct("!cHI")  # operation, JID length, payload length
#: `marshal`'s format for stanza trees (readable by every Python since 3.4).
_MARSHAL_VERSION: Final = 4
#: Deepest stanza tree accepted (the config's upper bound for `max_depth`).
_MAX_DEPTH: Final = 256

Tree = tuple[str, str, dict[str, str], tuple["Tree | str", ...]]


def stanza_tree(element: Element) -> Tree:
    """`element` as nested tuples, for `marshal`."""
    return (
        element.namespace,
        element.name,
        dict(element.attrs),
        tuple(c if isinstance(c, str) else stanza_tree(c) for c in element.children),
    )


def element_of(tree: object, depth: int = 0) -> Element:
    """The element a `stanza_tree` describes, every part checked.

    Raises:
        StorageError: `tree` is not a stanza tree (or nests deeper than `_MAX_DEPTH`).
    """
    if type(tree) is not tuple or len(tree) != 4 or depth > _MAX_DEPTH:
        raise StorageError("relay batch: not a stanza tree")
    namespace, name, attrs, children = tree
    if (
        type(namespace) is not str
        or type(name) is not str
        or not name
        or type(attrs) is not dict
        or type(children) is not tuple
        or not all(type(k) is str and type(v) is str for k, v in attrs.items())
    ):
        raise StorageError("relay batch: not a stanza tree")
    return Element(
        namespace,
        name,
        attrs,
        [c if type(c) is str else element_of(c, depth + 1) for c in children],
    )


@dataclass(frozen=True, slots=True)
class Deliver:
    """Give `stanza` to the resource `to` (held by the receiving node)."""

    to: JID
    stanza: Element


@dataclass(frozen=True, slots=True)
class Close:
    """End the session of resource `to` with `condition` (a conflict elsewhere), if it is
    still binding `session` (`gateway.core.cluster.Record.session`)."""

    to: JID
    condition: StreamErrorCondition | None
    text: str | None = None
    session: str = ""


@dataclass(frozen=True, slots=True)
class Surrender:
    """Give up session `smid` to node `requester` (a client resumes it there)."""

    smid: str
    requester: str


@dataclass(frozen=True, slots=True)
class Moved:
    """Session `smid` as a snapshot (`gateway.storage.snapshot`); empty: refused (the
    owner no longer had it)."""

    smid: str
    snapshot: bytes


Item = Deliver | Close | Surrender | Moved


def encode_batch(items: list[Item]) -> bytes:
    """The stream entry for `items`.

    Raises:
        ValueError: a stanza holds a character XML cannot carry (see `encode_stanza`).
    """
    parts: list[bytes] = []
    for item in items:
        if isinstance(item, Deliver):
            jid, op = str(item.to).encode(), _DELIVER
            payload = marshal.dumps(stanza_tree(item.stanza), _MARSHAL_VERSION)
        elif isinstance(item, Close):
            condition = item.condition.value if item.condition is not None else ""
            jid, op = str(item.to).encode(), _CLOSE
            payload = f"{condition}\n{item.session}\n{item.text or ''}".encode()
        elif isinstance(item, Surrender):
            jid, op, payload = item.smid.encode(), _SURRENDER, item.requester.encode()
        else:
            jid, op, payload = item.smid.encode(), _MOVED, item.snapshot
        parts.append(_HEAD.pack(op, len(jid), len(payload)))
        parts.append(jid)
        parts.append(payload)
    return b"".join(parts)


def decode_batch(data: bytes) -> list[Item]:
    """The items of a stream entry.

    Raises:
        StorageError: the entry is damaged (nothing of it is returned).
    """
    items: list[Item] = []
    offset = 0
    try:
        while offset < len(data):
            op, jid_length, payload_length = _HEAD.unpack_from(data, offset)
            offset += _HEAD.size
            end = offset + jid_length + payload_length
            if end > len(data):
                raise StorageError("relay batch: truncated item")
            target = data[offset : offset + jid_length].decode()
            payload = data[offset + jid_length : end]
            offset = end
            if op == _DELIVER:
                items.append(Deliver(JID.parse(target), element_of(marshal.loads(payload))))  # noqa: S302 (see the module docstring)
            elif op == _CLOSE:
                condition, session, text = payload.decode().split("\n", 2)
                items.append(
                    Close(
                        JID.parse(target),
                        StreamErrorCondition(condition) if condition else None,
                        text or None,
                        session,
                    )
                )
            elif op == _SURRENDER:
                items.append(Surrender(target, payload.decode()))
            elif op == _MOVED:
                items.append(Moved(target, payload))
            else:
                raise StorageError(f"relay batch: unknown operation {op!r}")
    except (struct.error, UnicodeDecodeError, ValueError, EOFError, TypeError, JIDError) as exc:
        # (marshal: ValueError, EOFError or TypeError for bytes it cannot read.)
        raise StorageError(f"relay batch: {exc}") from exc
    return items


@dataclass(frozen=True, slots=True)
class Record:
    """A resource as stored in Redis; `session` tells one binding of a full JID from the
    next (a close meant for a replaced session spares its successor)."""

    node: str
    session: str
    priority: int
    interested: bool
    presence: Element | None

    def encode(self) -> bytes:
        flags = "i" if self.interested else "-"
        presence = encode_stanza(self.presence) if self.presence is not None else b""
        head = f"{self.node}\0{self.session}\0{self.priority}\0{flags}\0"
        return head.encode() + presence

    @classmethod
    def decode(cls, data: bytes) -> Record:
        """Raises StorageError for a damaged record."""
        try:
            node, session, priority, flags, presence = data.split(b"\0", 4)
            return cls(
                node.decode(),
                session.decode(),
                int(priority),
                flags == b"i",
                decode_stanza(presence) if presence else None,
            )
        except (ValueError, UnicodeDecodeError) as exc:
            raise StorageError(f"directory record: {exc}") from exc


def node_prefix(node: str) -> bytes:
    """The start of every record `node` holds (how the scripts recognise its own)."""
    return f"{node}\0".encode()
