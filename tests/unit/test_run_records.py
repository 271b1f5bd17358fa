"""Run records on `rota.events`: batches of one state, and the readers that take both forms."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.outbox import _batched
from protocol import ProtocolError, RunRecord, decode_as, encode
from protocol.run_records import BATCH_TYPE, batch, bodies_of, records_of


def record(i: int, state: str = "succeeded", tail: str = "") -> RunRecord:
    return RunRecord(run_id=f"r-{i}", service=f"svc {i}", node="n1", trigger="scheduled",
                     slot=1_700_000_000.0 + i, queued_at=1_700_000_000.0 + i, state=state,
                     epoch=3, output_tail=tail)


def test_a_batch_reads_back_every_record_in_order() -> None:
    recs = [record(i) for i in range(5)]
    body = batch([encode(r) for r in recs])
    assert msgpack.unpackb(body)["t"] == BATCH_TYPE
    assert records_of(body) == recs


def test_a_lone_record_stays_a_plain_run_record() -> None:
    body = next(bodies_of([encode(record(1))]))
    assert decode_as(body, RunRecord) == record(1)
    assert records_of(body) == [record(1)]


def test_bodies_respect_the_byte_and_count_limits_and_keep_the_order() -> None:
    recs = [record(i, tail="x" * 1000) for i in range(50)]
    encoded = [encode(r) for r in recs]
    by_count = list(bodies_of(encoded, max_records=7))
    assert [len(records_of(b)) for b in by_count] == [7] * 7 + [1]
    by_size = list(bodies_of(encoded, max_bytes=5_000))
    assert all(len(b) <= 5_000 + 100 for b in by_size)
    assert [r for b in by_size for r in records_of(b)] == recs
    assert list(bodies_of([])) == []


def _batch_wire(records: list[Any], version: Any = 1) -> bytes:
    return msgpack.packb({"t": BATCH_TYPE, "v": version, "records": records})


@pytest.mark.parametrize(("body", "reason", "names"), [
    (_batch_wire([{"t": "RunRecord", "v": 1}]), "missing_field", "records[0]"),
    (_batch_wire([msgpack.unpackb(encode(record(1))), "nope"]), "garbage", "records[1]"),
    (_batch_wire([msgpack.unpackb(encode(record(1))) | {"state": "bogus"}]), "bad_value",
     "records[0]: RunRecord.state"),
    (_batch_wire([], version=9), "unknown_version", "unsupported batch version 9"),
    (msgpack.packb({"t": BATCH_TYPE, "v": 1}), "missing_field", "RunRecords.records"),
    (msgpack.packb({"t": BATCH_TYPE, "v": 1, "records": 5}), "wrong_type", "expected a list"),
    (b"\x93" + msgpack.packb(BATCH_TYPE) + b"\xc1", "garbage", "not valid msgpack"),
])
def test_a_bad_batch_is_refused_naming_what_is_wrong(body: bytes, reason: str,
                                                     names: str) -> None:
    with pytest.raises(ProtocolError) as err:
        records_of(body)
    assert err.value.reason == reason
    assert names in str(err.value)


def test_other_messages_are_refused_as_run_records() -> None:
    with pytest.raises(ProtocolError) as err:
        records_of(b"\x80")
    assert err.value.reason in ("missing_field", "garbage")


def test_a_turns_records_go_one_body_per_state_in_lifecycle_order() -> None:
    recs = [record(1, "succeeded"), record(2, "dispatched"), record(2, "succeeded"),
            record(3, "dispatched"), record(4, "failed"), record(5, "running")]
    events = _batched(recs)
    assert [key for key, _ in events] == ["run.dispatched", "run.running", "run.succeeded",
                                          "run.failed"]
    got = {key: records_of(body) for key, body in events}
    assert got["run.dispatched"] == [record(2, "dispatched"), record(3, "dispatched")]
    assert got["run.succeeded"] == [record(1, "succeeded"), record(2, "succeeded")]
    assert got["run.running"] == [record(5, "running")]
    assert decode_as(dict(events)["run.failed"], RunRecord) == record(4, "failed")


_wire_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_wire_values, max_size=4), st.binary(max_size=64))
def test_no_batch_body_raises_anything_but_a_protocol_error(items: list[Any],
                                                            junk: bytes) -> None:
    for body in (_batch_wire(items), _batch_wire(items)[:-1], b"\x83" + msgpack.packb("t")
                 + msgpack.packb(BATCH_TYPE) + junk):
        try:
            records_of(body)
        except ProtocolError:
            pass
