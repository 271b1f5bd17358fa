"""Several messages of one type in one body: a batch.

    {"t": "<Batch type>", "v": 1, "<items>": [<message map>, ...]}

Each element is exactly the map the message alone encodes to (its own ``t`` and ``v``). A
batch is built from its messages' encodings, concatenated after a msgpack array header, so
every message is encoded once; a lone message is sent as itself. A reader takes the body
apart element by element (`unpack`), so an element that is not a valid message is told
apart, with its own bytes (to dead-letter it), from the valid ones around it.

Batch types (`KINDS`): `RunRecords` (records, on `rota.events`; `protocol/run_records.py`),
`RunEvents` (events, a worker's reports on `rota.results`) and `RunOrders` (orders, a leader
turn's orders for one node, on its queue; only to workers that announce version 0.2 or later,
`takes_order_batches`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import msgpack

from protocol.codec import MAX_MESSAGE_BYTES, decode_as
from protocol.errors import (
    GARBAGE,
    MISSING_FIELD,
    OVERSIZED,
    UNEXPECTED_TYPE,
    UNKNOWN_FIELD,
    UNKNOWN_VERSION,
    WRONG_TYPE,
    ProtocolError,
)
from protocol.messages import Message, RunEvent, RunOrder, RunRecord

VERSION: Final = 1
MAX_BATCH_BYTES: Final = 512 * 1024
"""Largest batch body; larger groups are split (one message alone is at most ~40 KB)."""
MAX_BATCH_ITEMS: Final = 1000

_M = TypeVar("_M", bound=Message)


@dataclass(frozen=True)
class Kind(Generic[_M]):
    """A batch type: its name on the wire, the messages it carries, their list's key."""

    name: str
    of: type[_M]
    items: str

    @property
    def head(self) -> bytes:
        return (b"\x83" + msgpack.packb("t") + msgpack.packb(self.name) + msgpack.packb("v")
                + msgpack.packb(VERSION) + msgpack.packb(self.items))

    @property
    def mark(self) -> bytes:
        return msgpack.packb(self.name)  # the name as msgpack writes it, length included


RUN_RECORDS: Final = Kind("RunRecords", RunRecord, "records")
RUN_EVENTS: Final = Kind("RunEvents", RunEvent, "events")
RUN_ORDERS: Final = Kind("RunOrders", RunOrder, "orders")
KINDS: Final = (RUN_RECORDS, RUN_EVENTS, RUN_ORDERS)
ORDERS_SINCE: Final = (0, 2)
"""The first worker version (`NodeAnnouncement.version`) that takes `RunOrders` batches: a
leader sends older workers one order per message."""


def takes_order_batches(version: str) -> bool:
    """Whether a worker announcing `version` ("0.2.0") takes `RunOrders` batches."""
    parts: list[int] = []
    for piece in version.split(".")[:2]:
        if not piece.isdigit():
            return False
        parts.append(int(piece))
    return tuple(parts) >= ORDERS_SINCE


def pack(kind: Kind[Any], encoded: Sequence[bytes]) -> bytes:
    """One body of already encoded messages (a single one is returned as is)."""
    if len(encoded) == 1:
        return encoded[0]
    return kind.head + msgpack.Packer().pack_array_header(len(encoded)) + b"".join(encoded)


def packs(kind: Kind[Any], encoded: Sequence[bytes], max_bytes: int = MAX_BATCH_BYTES,
          max_items: int = MAX_BATCH_ITEMS) -> Iterator[bytes]:
    """Encoded messages as few bodies as the limits allow, in order."""
    start, size = 0, 0
    for i, data in enumerate(encoded):
        if i > start and (size + len(data) > max_bytes or i - start >= max_items):
            yield pack(kind, encoded[start:i])
            start, size = i, 0
        size += len(data)
    if start < len(encoded):
        yield pack(kind, encoded[start:])


def is_batch(body: bytes | bytearray | memoryview, kind: Kind[Any]) -> bool:
    """Whether `body` looks like a batch of `kind` (`unpack` tells for sure)."""
    return kind.mark in bytes(body[:32])


def unpack(body: bytes | bytearray | memoryview, kind: Kind[_M]
           ) -> list[tuple[bytes, _M | ProtocolError]]:
    """Every message in `body` (a lone `kind.of` or a batch of them), each with its own bytes
    and either the message or why it is not one. A body that is not a batch's envelope at all
    raises `ProtocolError`."""
    data = bytes(body)
    if not is_batch(data, kind):
        return [(data, _one(data, kind.of))]
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(OVERSIZED, f"{kind.name}: {len(data)} bytes, "
                                       f"limit is {MAX_MESSAGE_BYTES}")
    try:
        return _elements(data, kind)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack's errors for bytes that are not msgpack
        raise ProtocolError(GARBAGE, f"{kind.name}: not valid msgpack "
                                     f"({type(exc).__name__}: {exc})") from exc


def messages_of(body: bytes | bytearray | memoryview, kind: Kind[_M]) -> list[_M]:
    """The messages in `body` (a lone one or a batch); `ProtocolError` for the first that is
    not valid, named."""
    out: list[_M] = []
    for _raw, found in unpack(body, kind):
        if isinstance(found, ProtocolError):
            raise found
        out.append(found)
    return out


def _one(data: bytes, cls: type[_M]) -> _M | ProtocolError:
    try:
        return decode_as(data, cls)
    except ProtocolError as exc:
        return exc


def _elements(data: bytes, kind: Kind[_M]) -> list[tuple[bytes, _M | ProtocolError]]:
    reader = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(data) + 1)
    reader.feed(data)
    try:
        fields = reader.read_map_header()
    except msgpack.UnpackValueError:
        return [(data, _one(data, kind.of))]  # not a map at the top: say why, as for one
    seen: dict[str, Any] = {}
    out: list[tuple[bytes, _M | ProtocolError]] | None = None
    for _ in range(fields):
        key = reader.unpack()
        if key == kind.items:
            try:
                count = reader.read_array_header()
            except msgpack.UnpackValueError:
                raise ProtocolError(WRONG_TYPE, f"{kind.name}.{kind.items}: expected a list",
                                    field=kind.items) from None
            out = []
            for index in range(count):
                start = reader.tell()
                reader.skip()
                raw = data[start:reader.tell()]
                out.append((raw, _named(_one(raw, kind.of), f"{kind.name}.{kind.items}[{index}]")))
        elif key in ("t", "v"):
            seen[key] = reader.unpack()
        else:
            raise ProtocolError(UNKNOWN_FIELD, f"{kind.name}.{str(key)[:40]}: unknown field",
                                field=str(key)[:40])
    if reader.tell() != len(data):
        raise ProtocolError(GARBAGE, f"{kind.name}: {len(data) - reader.tell()} bytes after "
                                     "the batch")
    if seen.get("t") != kind.name:
        if "t" not in seen and out is None:
            return [(data, _one(data, kind.of))]
        raise ProtocolError(UNEXPECTED_TYPE, f"message.t: expected {kind.of.__name__} or "
                                             f"{kind.name}, got {str(seen.get('t'))[:60]!r}",
                            field="t")
    if seen.get("v") != VERSION:
        raise ProtocolError(UNKNOWN_VERSION, f"{kind.name}.v: unsupported batch version "
                                             f"{str(seen.get('v'))[:20]} (supported: {VERSION})",
                            field="v")
    if out is None:
        raise ProtocolError(MISSING_FIELD, f"{kind.name}.{kind.items}: missing",
                            field=kind.items)
    return out


def _named(found: _M | ProtocolError, where: str) -> _M | ProtocolError:
    if isinstance(found, ProtocolError):
        return ProtocolError(found.reason, f"{where}: {found}", field=found.field)
    return found


__all__ = ["KINDS", "MAX_BATCH_BYTES", "MAX_BATCH_ITEMS", "ORDERS_SINCE", "RUN_EVENTS",
           "RUN_ORDERS", "RUN_RECORDS", "Kind", "is_batch", "messages_of", "pack", "packs",
           "takes_order_batches", "unpack"]
