"""Run history on RabbitMQ: the `rota.history` stream, fed by the `rota.events` exchange.

The leader publishes every run record on `rota.events` once; the stream queue `rota.history`
is bound to the routing keys of the records that end a run (and of daemon intervals), so
RabbitMQ itself keeps the history: an append-only log that survives leader failover, retained
by size and age, and readable from the first record or from a point in time. No ZooKeeper
write and no extra publish is spent on it.

Operator edits (`ServiceChange`, routing key `service.changed`) go the same way to a second
stream, `rota.changes` (retained 1 year or 256 MiB): the change log survives any leader's
death; `read_changes(url, ...)` reads it back.

Streams are replicated on every node of a RabbitMQ cluster that runs when they are declared
(RabbitMQ's default for `x-initial-cluster-size`, which Rota leaves alone: setting it now would
make RabbitMQ refuse to declare the streams an earlier Rota created without it). A stream
declared while a node was down has no replica there until an operator adds one
(`rabbitmq-streams add_replica`). The readers' URL may name several nodes, separated by ";".

`declare_history(channel)` creates and binds the streams (idempotent; the event bus calls it when
it connects). `read_history(url, since=..., limit=...)` reads it back as `RunRecord`s, oldest
first. Records that fail to decode are skipped and counted, never raised: the stream carries
what the exchange received.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from protocol import ProtocolError, RunRecord, ServiceChange, decode_as
from protocol.run_records import records_of

log = logging.getLogger("rota.history")

STREAM = "rota.history"
EXCHANGE = "rota.events"
MAX_BYTES = 1024**3
"""Retention by size: the oldest segments go once the stream is larger (1 GiB)."""
MAX_AGE = "30D"
"""Retention by age (RabbitMQ's `x-max-age` syntax)."""
SEGMENT_BYTES = 16 * 1024**2
"""Segment size; retention drops whole segments, so it must be well below `MAX_BYTES`."""
ENDING_STATES = ("succeeded", "failed", "timed_out", "lost", "expired", "rejected", "skipped",
                 "missed", "stopped", "exited", "paused")
"""States whose record ends a run or a daemon interval: the stream keeps these."""
CHANGES = "rota.changes"
CHANGES_MAX_BYTES = 256 * 1024**2
CHANGES_MAX_AGE = "1Y"


def stream_arguments(max_bytes: int = MAX_BYTES, max_age: str = MAX_AGE,
                     segment_bytes: int = SEGMENT_BYTES) -> dict[str, Any]:
    return {
        "x-queue-type": "stream",
        "x-max-length-bytes": max_bytes,
        "x-max-age": max_age,
        "x-stream-max-segment-size-bytes": min(segment_bytes, max_bytes),
    }


def declare_history(channel: Any, **retention: Any) -> None:
    """Declare the exchange and the history stream, bound to every ending state."""
    channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
    channel.queue_declare(STREAM, durable=True, arguments=stream_arguments(**retention))
    for state in ENDING_STATES:
        channel.queue_bind(STREAM, EXCHANGE, routing_key=f"run.{state}")
    channel.queue_declare(CHANGES, durable=True, arguments=stream_arguments(
        CHANGES_MAX_BYTES, CHANGES_MAX_AGE))
    channel.queue_bind(CHANGES, EXCHANGE, routing_key=ServiceChange.ROUTING_KEY)


@dataclass
class History:
    records: list[RunRecord]
    undecodable: int = 0


def read_history(
    amqp_url: str,
    *,
    since: float | None = None,
    limit: int | None = None,
    keep: Callable[[RunRecord], bool] | None = None,
    idle: float = 0.5,
    timeout: float = 30.0,
) -> History:
    """The stream's records, oldest first: all, or those that ended at or after `since`.

    Reading starts at the stream's first record, or at the chunk holding `since` (RabbitMQ
    seeks by timestamp to a chunk, so earlier records are filtered out here). It stops when no
    record arrives for `idle` seconds, or after `timeout`. With `limit`, the newest `limit`
    records that pass `keep` are returned.
    """
    import pika

    from protocol.amqp import parameters

    conn = pika.BlockingConnection(parameters(amqp_url))
    out: list[RunRecord] = []
    bad = 0
    try:
        ch = conn.channel()
        offset: Any = "first" if since is None else _offset_at(since)
        for body in _bodies(ch, STREAM, offset, idle, timeout):
            try:
                recs = records_of(body)
            except ProtocolError as exc:
                bad += 1
                log.warning("history record skipped: %s", exc)
                continue
            for rec in recs:
                if since is not None and (rec.finished_at or rec.queued_at or 0.0) < since:
                    continue
                if keep is not None and not keep(rec):
                    continue
                out.append(rec)
            if limit is not None and len(out) > 4 * limit:
                del out[: len(out) - limit]
    finally:
        conn.close()
    if limit is not None:
        out = out[-limit:] if limit else []
    return History(out, bad)


def read_changes(
    amqp_url: str,
    *,
    service: str | None = None,
    limit: int = 100,
    idle: float = 0.3,
    timeout: float = 10.0,
) -> list[ServiceChange]:
    """The newest `limit` operator edits in `rota.changes` (of `service` when given), oldest
    first. Edits are rare, so the stream is read from its start."""
    import pika

    from protocol.amqp import parameters

    conn = pika.BlockingConnection(parameters(amqp_url))
    out: list[ServiceChange] = []
    try:
        ch = conn.channel()
        declare_history(ch)
        for body in _bodies(ch, CHANGES, "first", idle, timeout):
            try:
                change = decode_as(body, ServiceChange)
            except ProtocolError as exc:
                log.warning("change log record skipped: %s", exc)
                continue
            if service is None or change.service == service:
                out.append(change)
                if len(out) > 4 * max(limit, 1):
                    del out[: len(out) - limit]
    finally:
        conn.close()
    return out[-limit:] if limit else []


def _bodies(ch: Any, stream: str, offset: Any, idle: float, timeout: float) -> Iterator[bytes]:
    """The bodies of a stream from `offset`, until none comes for `idle` seconds or after
    `timeout`; the consumer is cancelled once read."""
    ch.basic_qos(prefetch_count=1000)  # a stream consumer must set a prefetch
    deadline = time.monotonic() + timeout
    consumer = ch.consume(stream, inactivity_timeout=idle,
                          arguments={"x-stream-offset": offset})
    for method, _props, body in consumer:
        if method is None or time.monotonic() > deadline:
            break
        ch.basic_ack(method.delivery_tag)
        yield body
    ch.cancel()


def _offset_at(since: float) -> Any:
    from datetime import UTC, datetime

    # pika sends a datetime as an AMQP timestamp (whole seconds): start a second early.
    return datetime.fromtimestamp(int(since) - 1, UTC)


def of_service(names: Iterable[str]) -> Callable[[RunRecord], bool]:
    """A `keep` filter: records of these services."""
    wanted = set(names)
    return lambda rec: rec.service in wanted
