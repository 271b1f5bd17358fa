"""Several RabbitMQ URLs separated by ";": a first node that does not answer is passed over by
every connection Rota opens (the dramatiq broker, batches, the event bus, the history reader)."""

from __future__ import annotations

import threading
import time

import pika

from coordinator.adapters.events import EXCHANGE, RabbitEventBus
from coordinator.adapters.history import STREAM, read_history
from protocol import RunRecord, encode
from protocol.amqp import ConfirmPublisher, parameters
from protocol.transport import RESULTS, Delivery, node_queue
from protocol.transport_rabbitmq import RabbitmqTransport
from tests.harness import free_port, poll_until


def _dead_first(amqp_url: str) -> str:
    """A node that refuses connections (a port nothing listens on), then the live one."""
    vhost = amqp_url.rsplit("/", 1)[1]
    return f"amqp://guest:guest@127.0.0.1:{free_port()}/{vhost};{amqp_url}"


def test_the_transport_publishes_sends_and_consumes_through_the_second_url(
    amqp_url: str,
) -> None:
    urls = _dead_first(amqp_url)
    transport = RabbitmqTransport(urls)
    got: list[bytes | None] = []
    try:
        queue = node_queue("n-1")
        transport.publish([(queue, b"batch-%d" % i) for i in range(3)])  # ConfirmPublisher
        transport.send(queue, b"single")  # the dramatiq broker's own channel
        assert transport.pending(queue) == 4

        def take(delivery: Delivery) -> None:
            got.append(delivery.payload)
            delivery.ack()

        reader = transport.consume(queue, take)
        try:
            poll_until("four deliveries", lambda: len(got) == 4, timeout=20)
        finally:
            reader.stop()
    finally:
        transport.close()
    assert got == [b"batch-0", b"batch-1", b"batch-2", b"single"]


def test_the_confirm_publisher_opens_on_the_next_node_and_stays_there(amqp_url: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    conn.channel().queue_declare("failover", durable=True, arguments={"x-queue-type": "quorum"})
    conn.close()
    publisher = ConfirmPublisher(parameters(_dead_first(amqp_url)), timeout=10)
    try:
        for i in range(3):
            publisher.publish([("", "failover", b"%d" % i)], pika.BasicProperties(delivery_mode=2),
                              mandatory=True)
        assert publisher.parameters[publisher._next].port != publisher.parameters[0].port
    finally:
        publisher.close()
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        assert conn.channel().queue_declare("failover", passive=True).method.message_count == 3
    finally:
        conn.close()


def test_the_event_bus_and_the_history_reader_use_the_second_url(amqp_url: str) -> None:
    urls = _dead_first(amqp_url)
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    ch.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, EXCHANGE, routing_key="run.#")
    bus = RabbitEventBus(urls)
    stored = threading.Event()
    now = time.time()
    record = RunRecord(run_id="r-1", service="Tick", node="n-1", trigger="scheduled",
                       state="succeeded", queued_at=now - 2, started_at=now - 1,
                       finished_at=now, outcome="succeeded", epoch=1)
    try:
        bus.publish_batch([("run.succeeded", encode(record))], then=stored.set)
        assert stored.wait(20), "the event bus did not store the batch through the second URL"
        method, _props, _body = ch.basic_get(q, auto_ack=True)
        assert method is not None
        poll_until("the record in rota.history", lambda: ch.queue_declare(
            STREAM, passive=True).method.message_count, timeout=10)
    finally:
        bus.close()
        conn.close()
    assert [r.run_id for r in read_history(urls).records] == ["r-1"]


def test_results_reach_the_leaders_reader_when_only_the_second_url_answers(
    amqp_url: str,
) -> None:
    """A worker-role transport reporting to `rota.results` through the second URL."""
    urls = _dead_first(amqp_url)
    coordinator = RabbitmqTransport(urls, role="coordinator")
    worker = RabbitmqTransport(urls, role="worker")
    try:
        worker.publish([(RESULTS, b"report")])
        assert coordinator.pending(RESULTS) == 1
    finally:
        worker.close()
        coordinator.close()
