"""The RabbitMQ event bus during an outage: it waits at its bound and then delivers everything."""

from __future__ import annotations

import socket
import threading
import time
import uuid

import pika

from coordinator.adapters.events import EXCHANGE, RabbitEventBus


def _unreachable() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"amqp://guest:guest@127.0.0.1:{port}/%2F"


def test_events_held_at_the_bound_during_an_outage_all_arrive_in_order(amqp_url: str) -> None:
    key = f"run.bound-{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    ch.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, EXCHANGE, routing_key=key)
    bus = RabbitEventBus(_unreachable(), max_pending=5)
    try:
        total = 12
        producer = threading.Thread(
            target=lambda: [bus.publish(key, b"%d" % i) for i in range(total)], daemon=True)
        producer.start()
        producer.join(1.0)
        assert producer.is_alive(), "the publisher was not held at the bound"
        bus.amqp_url = amqp_url  # RabbitMQ is back
        producer.join(20)
        assert not producer.is_alive()
        got: list[bytes] = []
        deadline = time.monotonic() + 20
        while len(got) < total and time.monotonic() < deadline:
            method, _props, body = ch.basic_get(q, auto_ack=True)
            if method is None:
                time.sleep(0.05)
                continue
            got.append(body)
        assert got == [b"%d" % i for i in range(total)]
    finally:
        bus.close()
        conn.close()


def test_a_batch_is_answered_only_once_rabbitmq_stored_it(amqp_url: str) -> None:
    """The leader acknowledges a turn's reports in `then`: never before the events are
    stored, so a leader killed meanwhile leaves the reports (and their events) to the next."""
    key = f"run.then-{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    ch.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, EXCHANGE, routing_key=key)
    bus = RabbitEventBus(_unreachable())
    answered = threading.Event()
    try:
        bus.publish_batch([(key, b"a"), (key, b"b")], then=answered.set)
        assert not answered.wait(1.5), "answered while RabbitMQ was unreachable"
        bus.amqp_url = amqp_url  # RabbitMQ is back
        assert answered.wait(20)
        stored = [ch.basic_get(q, auto_ack=True)[2] for _ in range(2)]
        assert stored == [b"a", b"b"]
    finally:
        bus.close()
        conn.close()
