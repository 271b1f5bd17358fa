"""Run records on `rota.events`, one per message or several in one batch.

A body on a ``run.<state>`` routing key is either one `RunRecord` or a *batch*:

    {"t": "RunRecords", "v": 1, "records": [<RunRecord map>, ...]}

where each element is exactly the map a single `RunRecord` message encodes to (its own
``t`` and ``v``), all of the routing key's state. The leader publishes a turn's records of
one state as one batch (`bodies_of`), so that events cost a fraction of a message per run
however many runs a turn moves; a lone record still goes as a plain `RunRecord`. Readers call
`records_of(body)`, which accepts both and refuses anything else with a `ProtocolError`
naming the element at fault.

A batch is built from the records' own encodings, concatenated (a msgpack array of maps is
its elements' bytes after an array header), so each record is encoded once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Final

import msgpack

from protocol.codec import MAX_MESSAGE_BYTES, decode_as, from_wire
from protocol.errors import (
    GARBAGE,
    MISSING_FIELD,
    OVERSIZED,
    UNKNOWN_VERSION,
    WRONG_TYPE,
    ProtocolError,
)
from protocol.messages import RunRecord

BATCH_TYPE: Final = "RunRecords"
BATCH_VERSION: Final = 1
MAX_BATCH_BYTES: Final = 512 * 1024
"""Largest batch body; larger groups are split (a record alone is at most ~40 KB)."""
MAX_BATCH_RECORDS: Final = 1000

_HEAD = (b"\x83" + msgpack.packb("t") + msgpack.packb(BATCH_TYPE) + msgpack.packb("v")
         + msgpack.packb(BATCH_VERSION) + msgpack.packb("records"))
_BATCH_MARK = msgpack.packb(BATCH_TYPE)


def batch(encoded: Sequence[bytes]) -> bytes:
    """One batch body of already encoded `RunRecord`s (a single one is returned as is)."""
    if len(encoded) == 1:
        return encoded[0]
    packer = msgpack.Packer()
    return _HEAD + packer.pack_array_header(len(encoded)) + b"".join(encoded)


def bodies_of(encoded: Sequence[bytes], max_bytes: int = MAX_BATCH_BYTES,
              max_records: int = MAX_BATCH_RECORDS) -> Iterator[bytes]:
    """Encoded records of one routing key as few bodies as the limits allow, in order."""
    start, size = 0, 0
    for i, data in enumerate(encoded):
        if i > start and (size + len(data) > max_bytes or i - start >= max_records):
            yield batch(encoded[start:i])
            start, size = i, 0
        size += len(data)
    if start < len(encoded):
        yield batch(encoded[start:])


def records_of(body: bytes | bytearray | memoryview) -> list[RunRecord]:
    """The records in a ``run.<state>`` body: one `RunRecord`, or every record of a batch."""
    if _BATCH_MARK not in bytes(body[:32]):
        return [decode_as(body, RunRecord)]
    if len(body) > MAX_MESSAGE_BYTES:
        raise ProtocolError(OVERSIZED, f"{BATCH_TYPE}: {len(body)} bytes, "
                                       f"limit is {MAX_MESSAGE_BYTES}")
    try:
        wire: Any = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:
        raise ProtocolError(GARBAGE, f"{BATCH_TYPE}: not valid msgpack "
                                     f"({type(exc).__name__}: {exc})") from exc
    if type(wire) is not dict or wire.get("t") != BATCH_TYPE:
        return [decode_as(body, RunRecord)]
    if wire.get("v") != BATCH_VERSION:
        raise ProtocolError(UNKNOWN_VERSION, f"{BATCH_TYPE}.v: unsupported batch version "
                                             f"{wire.get('v')!r} (supported: {BATCH_VERSION})",
                            field="v")
    items = wire.get("records")
    if items is None:
        raise ProtocolError(MISSING_FIELD, f"{BATCH_TYPE}.records: missing", field="records")
    if type(items) is not list:
        raise ProtocolError(WRONG_TYPE, f"{BATCH_TYPE}.records: expected a list, got "
                                        f"{type(items).__name__}", field="records")
    out: list[RunRecord] = []
    for index, item in enumerate(items):
        where = f"{BATCH_TYPE}.records[{index}]"
        try:
            rec = from_wire(item, RunRecord, where)
        except ProtocolError as exc:
            if str(exc).startswith(where):
                raise
            raise ProtocolError(exc.reason, f"{where}: {exc}", field=exc.field) from None
        out.append(rec)  # type: ignore[arg-type]
    return out


__all__ = ["BATCH_TYPE", "MAX_BATCH_BYTES", "MAX_BATCH_RECORDS", "batch", "bodies_of",
           "records_of"]
