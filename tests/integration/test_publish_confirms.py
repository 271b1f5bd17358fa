"""Batches confirmed as a whole on the real RabbitMQ: all stored when `publish` returns, a
failure raises and the next batch goes out on a fresh channel."""

from __future__ import annotations

import pika
import pytest

from protocol.amqp import ConfirmPublisher, PublishError
from protocol.transport import node_queue
from protocol.transport_dramatiq import payload_of
from protocol.transport_rabbitmq import RabbitmqTransport

PERSISTENT = pika.BasicProperties(delivery_mode=2)


def _count(amqp_url: str, queue: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        count: int = conn.channel().queue_declare(queue, durable=True,
                                                  passive=True).method.message_count
        return count
    finally:
        conn.close()


def test_a_confirmed_batch_is_all_in_the_queue_when_publish_returns(amqp_url: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    conn.channel().queue_declare("batch-test", durable=True)
    conn.close()
    publisher = ConfirmPublisher(pika.URLParameters(amqp_url))
    try:
        for size in (1, 10, 1000):
            publisher.publish([("", "batch-test", b"%d" % i) for i in range(size)], PERSISTENT,
                              mandatory=True)
        assert _count(amqp_url, "batch-test") == 1011
    finally:
        publisher.close()


def test_a_message_no_queue_takes_fails_its_batch_and_the_next_one_goes_out(
    amqp_url: str,
) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    conn.channel().queue_declare("there", durable=True)
    conn.close()
    publisher = ConfirmPublisher(pika.URLParameters(amqp_url))
    try:
        with pytest.raises(PublishError, match="returned"):
            publisher.publish([("", "there", b"a"), ("", "nowhere", b"b")], PERSISTENT,
                              mandatory=True)
        with pytest.raises(PublishError):  # an exchange that does not exist closes the channel
            publisher.publish([("no-such-exchange", "k", b"c")], PERSISTENT)
        publisher.publish([("", "there", b"d")], PERSISTENT, mandatory=True)
        assert _count(amqp_url, "there") == 2
    finally:
        publisher.close()


def test_the_transport_publishes_a_prepared_batch_that_consumers_read(amqp_url: str) -> None:
    transport = RabbitmqTransport(amqp_url)
    try:
        queue = node_queue("n-1")
        batch = transport.prepare([(queue, b"payload-%d" % i) for i in range(100)])
        transport.publish(batch)
        transport.publish(batch)  # as after a failed attempt: the same bytes again
        assert transport.pending(queue) == 200
        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        try:
            ch = conn.channel()
            _method, props, body = ch.basic_get(queue, auto_ack=True)
            assert props.delivery_mode == 2
            import dramatiq

            assert payload_of(dramatiq.Message.decode(body)) == b"payload-0"
        finally:
            conn.close()
    finally:
        transport.close()
