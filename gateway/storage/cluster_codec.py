"""The bytes a cluster writes into Redis (DESIGN section 6): a resource's record in the
session directory (`gateway.core.cluster`), and the batches of items nodes send one
another through their streams (`gateway.core.relay`). Pure: no Redis, no clock.

A record is `node NUL session NUL priority NUL flags NUL presence`; a batch is, per
item, an operation byte, the target's length and the payload's length (`!cHI`), the
target (a JID, or an SM id for session moves) and the payload (a stanza, a close
condition, a requesting node, or a session snapshot).

A stanza crosses as its tree, `[namespace, name, attributes, children]` nested, in JSON
(compact, UTF-8), not as XML: a crossing message is then neither serialized nor parsed
as XML on its way between nodes, which was half of what crossing cost (JSON: 4.8 µs to
encode and about 5 µs to decode and rebuild a chat message, XML 5.8 and 12.8 µs). JSON
rather than a faster binary form such as `marshal`: its decoder allocates in proportion
to its input, whatever the bytes say. The tree is checked as it is rebuilt (types,
depth, names, characters XML cannot carry, size), so damaged or forged bytes are a
`StorageError`, never an element the serializer would refuse or mangle.
"""

from __future__ import annotations

import json
import re
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
#: Deepest stanza tree accepted (the config's upper bound for `max_depth`).
_MAX_DEPTH: Final = 256
#: Largest relayed stanza accepted, in bytes of its JSON (far above `max_stanza_size`).
MAX_RELAYED: Final = 8 * 1024 * 1024
#: An element or attribute name: no character that would end or split a tag.
_NAME: Final = re.compile(r"[^\s<>&'\"=/:{}\x00-\x1f]+")
#: An attribute key: a name, or `{namespace}name`.
_KEY: Final = re.compile(r"(?:\{[^{}<>&'\"\x00-\x1f]*\})?[^\s<>&'\"=/:{}\x00-\x1f]+")
#: Characters XML 1.0 cannot carry (as the serializer's check).
_NOT_XML_CHAR: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
#: Namespaces no stanza element may be in.
_RESERVED: Final = frozenset(
    (
        "http://etherx.jabber.org/streams",
        "http://www.w3.org/XML/1998/namespace",
        "http://www.w3.org/2000/xmlns/",
    )
)

Tree = list[object]


def stanza_tree(element: Element) -> Tree:
    """`element` as nested lists, for JSON."""
    return [
        element.namespace,
        element.name,
        element.attrs,
        [c if isinstance(c, str) else stanza_tree(c) for c in element.children],
    ]


def encode_tree(element: Element) -> bytes:
    """The JSON of `element`'s tree."""
    return json.dumps(stanza_tree(element), ensure_ascii=False, separators=(",", ":")).encode()


def decode_tree(data: bytes) -> Element:
    """The element whose tree `data` holds (`encode_tree`), every part checked.

    Raises:
        StorageError: `data` is not a stanza tree, or one too large or too deep.
    """
    if len(data) > MAX_RELAYED:
        raise StorageError("relay batch: stanza too large")
    try:
        tree = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise StorageError(f"relay batch: {exc}") from None
    texts: list[str] = []
    element = element_of(tree, texts)
    if _NOT_XML_CHAR.search("".join(texts)):
        raise StorageError("relay batch: a character XML cannot carry")
    return element


def element_of(tree: object, texts: list[str], depth: int = 0) -> Element:
    """The element a `stanza_tree` describes, its structure checked; every string it
    holds is added to `texts` (for one check of their characters).

    Raises:
        StorageError: `tree` is not a stanza tree (or nests deeper than `_MAX_DEPTH`).
    """
    if type(tree) is not list or len(tree) != 4 or depth > _MAX_DEPTH:
        raise StorageError("relay batch: not a stanza tree")
    namespace, name, attrs, children = tree
    if (
        type(namespace) is not str
        or namespace in _RESERVED
        or type(name) is not str
        or not _NAME.fullmatch(name)
        or type(attrs) is not dict
        or type(children) is not list
    ):
        raise StorageError("relay batch: not a stanza tree")
    for key, value in attrs.items():
        if type(value) is not str or not _KEY.fullmatch(key):
            raise StorageError("relay batch: not a stanza tree")
        texts.append(value)
    texts.append(namespace)
    kids: list[Element | str] = []
    for child in children:
        if type(child) is str:
            texts.append(child)
            kids.append(child)
        else:
            kids.append(element_of(child, texts, depth + 1))
    return Element(namespace, name, attrs, kids)


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
            jid, op, payload = str(item.to).encode(), _DELIVER, encode_tree(item.stanza)
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
                items.append(Deliver(JID.parse(target), decode_tree(payload)))
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
    except (struct.error, UnicodeDecodeError, ValueError, JIDError) as exc:
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
