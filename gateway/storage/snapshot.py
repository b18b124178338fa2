"""The wire format of a `SessionSnapshot`: JSON with the stanzas as serialized XML.

Every backend of the hand-off store keeps these bytes opaque; only this module reads or
writes them, so a snapshot written by one node (or before a restart) is read the same by
any other. Stanzas use the offline store's encoding (`encode_stanza`: every namespace
declared on the element, so it parses back equal in any context).

`decode_snapshot` trusts nothing: a damaged or foreign record raises `StorageError` naming
what is wrong, and the caller drops that one record with a log line.
"""

from __future__ import annotations

import json
import math
import re
from typing import Final

from gateway.errors import StorageError
from gateway.storage.base import SessionSnapshot
from gateway.storage.codec import decode_stanza, encode_stanza
from gateway.xmpp import namespaces as ns
from gateway.xmpp.element import Element

#: Bumped when the format changes; a record of another version is refused, not misread.
FORMAT_VERSION: Final = 1

_H_LIMIT: Final = 2**32

#: Every key of a record; any other key means another format (or damage).
_KEYS: Final = frozenset(
    {
        "v", "smid", "full_jid", "expires_at", "max", "counter_in", "counter_out", "buffer",
        "priority", "presence", "interested", "directed", "flush_pending", "epoch", "peer",
    }
)  # fmt: skip

#: SM ids are URL-safe random tokens (`secrets.token_urlsafe(16)`: 22 characters).
_SMID: Final = re.compile(r"[A-Za-z0-9_-]{16,128}")

#: The most buffered stanzas a record may hold: the config's bound for `buffer_max`.
MAX_BUFFER: Final = 10_000_000

_STANZAS: Final = frozenset({"message", "presence", "iq"})


def encode_snapshot(snapshot: SessionSnapshot) -> bytes:
    """Serialize a snapshot (see module docstring).

    Raises:
        ValueError: a stanza holds a character XML 1.0 cannot carry.
    """

    def xml(element: Element) -> str:
        return encode_stanza(element).decode("utf-8")

    record = {
        "v": FORMAT_VERSION,
        "smid": snapshot.smid,
        "full_jid": snapshot.full_jid,
        "expires_at": snapshot.expires_at,
        "max": snapshot.max,
        "counter_in": snapshot.counter_in,
        "counter_out": snapshot.counter_out,
        "buffer": [xml(stanza) for stanza in snapshot.buffer],
        "priority": snapshot.priority,
        "presence": None if snapshot.presence is None else xml(snapshot.presence),
        "interested": snapshot.interested,
        "directed": list(snapshot.directed),
        "flush_pending": snapshot.flush_pending,
        "epoch": snapshot.epoch,
        "peer": snapshot.peer,
    }
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _field(record: dict[str, object], name: str, kind: type) -> object:
    value = record.get(name)
    # bool is an int in Python: an int field must not accept true/false.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise StorageError(f"hand-off snapshot: {name!r} is missing or not {kind.__name__}")
    return value


def _int(record: dict[str, object], name: str, low: int, high: int) -> int:
    value = _field(record, name, int)
    assert isinstance(value, int)
    if not low <= value < high:
        raise StorageError(f"hand-off snapshot: {name!r} is out of range")
    return value


def _text(value: object, name: str) -> str:
    # JSON can carry lone surrogates ("\ud800") that no XML or UTF-8 can.
    if not isinstance(value, str):
        raise StorageError(f"hand-off snapshot: {name!r} holds a non-string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise StorageError(f"hand-off snapshot: {name!r} is not valid Unicode") from exc
    return value


def _str(record: dict[str, object], name: str) -> str:
    return _text(_field(record, name, str), name)


def _strings(record: dict[str, object], name: str) -> list[str]:
    value = _field(record, name, list)
    assert isinstance(value, list)
    return [_text(item, name) for item in value]


def decode_snapshot(data: bytes) -> SessionSnapshot:
    """Parse bytes written by `encode_snapshot`.

    Raises:
        StorageError: the bytes are not a snapshot of this format (damaged, truncated,
            another version).
    """
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise StorageError(f"hand-off snapshot is not JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise StorageError("hand-off snapshot is not a JSON object")
    version = record.get("v")
    if type(version) is not int or version != FORMAT_VERSION:
        raise StorageError(f"hand-off snapshot format {version!r} is not {FORMAT_VERSION}")
    if record.keys() != _KEYS:
        raise StorageError(
            f"hand-off snapshot has keys {sorted(record.keys() ^ _KEYS)} wrong or missing"
        )
    raw_expiry = record.get("expires_at")
    try:
        if not isinstance(raw_expiry, int | float) or isinstance(raw_expiry, bool):
            raise TypeError
        expires_at = float(raw_expiry)  # OverflowError for a huge integer
    except (TypeError, OverflowError) as exc:
        raise StorageError("hand-off snapshot: 'expires_at' is missing or not a number") from exc
    if not math.isfinite(expires_at):
        raise StorageError("hand-off snapshot: 'expires_at' is not finite")
    smid = _str(record, "smid")
    if not _SMID.fullmatch(smid):
        raise StorageError("hand-off snapshot: 'smid' is not an SM id")
    presence_xml = record.get("presence")
    presence: Element | None = None
    if presence_xml is not None:
        presence = decode_stanza(_text(presence_xml, "presence").encode("utf-8"))
        if presence.tag != (ns.CLIENT, "presence") or presence.get("type") is not None:
            raise StorageError("hand-off snapshot: 'presence' is not an available presence")
    buffer_xml = _strings(record, "buffer")
    if len(buffer_xml) > MAX_BUFFER:
        raise StorageError("hand-off snapshot: 'buffer' holds too many stanzas")
    buffer = tuple(decode_stanza(text.encode("utf-8")) for text in buffer_xml)
    if any(e.namespace != ns.CLIENT or e.name not in _STANZAS for e in buffer):
        raise StorageError("hand-off snapshot: 'buffer' holds something that is not a stanza")
    interested = _field(record, "interested", bool)
    flush_pending = _field(record, "flush_pending", bool)
    return SessionSnapshot(
        smid=smid,
        full_jid=_str(record, "full_jid"),
        expires_at=expires_at,
        max=_int(record, "max", 1, _H_LIMIT),
        counter_in=_int(record, "counter_in", 0, _H_LIMIT),
        counter_out=_int(record, "counter_out", 0, _H_LIMIT),
        buffer=buffer,
        priority=_int(record, "priority", -128, 128),
        presence=presence,
        interested=interested is True,
        directed=tuple(_strings(record, "directed")),
        flush_pending=flush_pending is True,
        epoch=_int(record, "epoch", 1, 2**63),
        peer=_str(record, "peer"),
    )
