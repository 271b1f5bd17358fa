"""Run history kept by RabbitMQ: the `rota.history` stream behind the `rota.events` exchange."""

from __future__ import annotations

import time

import pika

from coordinator.adapters.events import RabbitEventBus
from coordinator.adapters.history import STREAM, read_history
from protocol import RunRecord, encode
from protocol.run_records import batch


def _record(i: int, state: str, at: float, service: str = "Backup Manager") -> RunRecord:
    final = state not in ("queued", "dispatched", "running")
    return RunRecord(
        run_id=f"run-{i}", service=service, node="node-1", trigger="scheduled", slot=at,
        queued_at=at, started_at=at if state != "queued" else None,
        finished_at=at + 1 if final else None, state=state, outcome=state if final else None,
        run_groups=[], epoch=3, error=None, output_tail=f"out {i}", reason=None, attempt=1,
    )


def _publish(amqp_url: str, records: list[RunRecord]) -> None:
    bus = RabbitEventBus(amqp_url)
    try:
        bus.publish_batch([(r.routing_key, encode(r)) for r in records])
    finally:
        bus.close()


def _wait_for(amqp_url: str, count: int) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            n = conn.channel().queue_declare(STREAM, passive=True).method.message_count
            if n >= count:
                return
            time.sleep(0.1)
    finally:
        conn.close()
    raise AssertionError(f"the stream did not reach {count} records")


def test_the_stream_keeps_ending_records_in_order_and_reads_back_from_a_time(
    amqp_url: str,
) -> None:
    t0 = time.time() - 100
    records = [_record(0, "queued", t0), _record(0, "running", t0), _record(0, "succeeded", t0),
               _record(1, "failed", t0 + 10), _record(2, "running", t0 + 20),
               _record(2, "lost", t0 + 20, service="Cache Manager"), _record(3, "skipped", t0 + 30)]
    _publish(amqp_url, records)
    _wait_for(amqp_url, 4)
    got = read_history(amqp_url)
    assert [(r.run_id, r.state) for r in got.records] == [
        ("run-0", "succeeded"), ("run-1", "failed"), ("run-2", "lost"), ("run-3", "skipped")]
    assert got.records[1].output_tail == "out 1" and got.undecodable == 0
    # A leader restarting or failing over changes nothing: the stream is RabbitMQ's.
    later = read_history(amqp_url, since=t0 + 15)
    assert [r.run_id for r in later.records] == ["run-2", "run-3"]
    newest = read_history(amqp_url, limit=2, keep=lambda r: r.service == "Backup Manager")
    assert [r.run_id for r in newest.records] == ["run-1", "run-3"]


def test_a_malformed_message_in_the_stream_is_skipped_and_counted(amqp_url: str) -> None:
    t0 = time.time()
    _publish(amqp_url, [_record(0, "succeeded", t0)])
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        conn.channel().basic_publish("rota.events", "run.failed", b"\xc1 not msgpack")
    finally:
        conn.close()
    _publish(amqp_url, [_record(1, "failed", t0)])
    _wait_for(amqp_url, 3)
    got = read_history(amqp_url)
    assert [r.run_id for r in got.records] == ["run-0", "run-1"]
    assert got.undecodable == 1


def test_batched_records_are_kept_and_read_back_one_by_one(amqp_url: str) -> None:
    """A leader turn's records of one state go as one `RunRecords` message: the stream keeps
    it, and the reader gives back every record, filtered and limited as lone ones are."""
    t0 = time.time() - 100
    lone = _record(0, "failed", t0)
    recs = [_record(i, "succeeded", t0 + i) for i in range(1, 7)]
    bus = RabbitEventBus(amqp_url)
    try:
        bus.publish_batch([(lone.routing_key, encode(lone)),
                           ("run.dispatched", batch([encode(_record(9, "dispatched", t0))] * 2)),
                           ("run.succeeded", batch([encode(r) for r in recs]))])
    finally:
        bus.close()
    _wait_for(amqp_url, 2)  # two messages: the dispatched ones are not history
    got = read_history(amqp_url)
    assert [(r.run_id, r.state) for r in got.records] == \
        [("run-0", "failed")] + [(f"run-{i}", "succeeded") for i in range(1, 7)]
    assert got.undecodable == 0
    assert [r.run_id for r in read_history(amqp_url, since=t0 + 4.5).records] == \
        ["run-4", "run-5", "run-6"]
    assert [r.run_id for r in read_history(amqp_url, limit=2).records] == ["run-5", "run-6"]
