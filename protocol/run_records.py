"""Run records on `rota.events`, one per message or several in one batch.

A body on a ``run.<state>`` routing key is either one `RunRecord` or a `RunRecords` batch
(`protocol/batches.py`):

    {"t": "RunRecords", "v": 1, "records": [<RunRecord map>, ...]}

each element exactly the map a single `RunRecord` message encodes to, all of the routing
key's state. The leader publishes a turn's records of one state as one batch (`bodies_of`),
so that events cost a fraction of a message per run however many runs a turn moves; a lone
record still goes as a plain `RunRecord`. Readers call `records_of(body)`, which accepts both
and refuses anything else with a `ProtocolError` naming the element at fault.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Final

from protocol.batches import MAX_BATCH_BYTES, MAX_BATCH_ITEMS, RUN_RECORDS, messages_of, pack, packs
from protocol.messages import RunRecord

BATCH_TYPE: Final = RUN_RECORDS.name


def batch(encoded: Sequence[bytes]) -> bytes:
    """One batch body of already encoded `RunRecord`s (a single one is returned as is)."""
    return pack(RUN_RECORDS, encoded)


def bodies_of(encoded: Sequence[bytes], max_bytes: int = MAX_BATCH_BYTES,
              max_records: int = MAX_BATCH_ITEMS) -> Iterator[bytes]:
    """Encoded records of one routing key as few bodies as the limits allow, in order."""
    return packs(RUN_RECORDS, encoded, max_bytes, max_records)


def records_of(body: bytes | bytearray | memoryview) -> list[RunRecord]:
    """The records in a ``run.<state>`` body: one `RunRecord`, or every record of a batch;
    `ProtocolError` for anything else (the first bad element, named)."""
    return messages_of(body, RUN_RECORDS)


__all__ = ["BATCH_TYPE", "batch", "bodies_of", "records_of"]
