"""Publishing confirmed batches without a reachable RabbitMQ, and the AMQP URLs Rota takes."""

from __future__ import annotations

import socket
import threading
import time

import pika
import pytest

from protocol.amqp import AmqpUrlError, ConfirmPublisher, PublishError, hosts, parameters


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # nothing listens there once the socket is closed


def test_an_unreachable_broker_fails_the_batch_promptly_and_leaves_no_thread() -> None:
    params = pika.URLParameters(f"amqp://guest:guest@127.0.0.1:{_closed_port()}/%2F")
    publisher = ConfirmPublisher(params, timeout=5.0, name="test-confirm")
    for _ in range(2):  # and again: each attempt opens afresh
        began = time.monotonic()
        with pytest.raises(PublishError, match="cannot open"):
            publisher.publish([("", "q", b"x")], pika.BasicProperties(delivery_mode=2))
        assert time.monotonic() - began < 5.0
    publisher.close()
    time.sleep(0.2)
    assert not [t for t in threading.enumerate() if t.name == "test-confirm"]


def test_an_empty_batch_needs_no_connection() -> None:
    params = pika.URLParameters(f"amqp://guest:guest@127.0.0.1:{_closed_port()}/%2F")
    ConfirmPublisher(params).publish([], pika.BasicProperties())


def test_one_url_or_several_separated_by_semicolons() -> None:
    [one] = parameters("amqp://u:p@mq:5673/v")
    assert (one.host, one.port, one.virtual_host) == ("mq", 5673, "v")
    several = parameters(" amqp://u:p@mq-1:5672/v ; amqps://u:p@mq-2/v")
    assert [(p.host, p.port) for p in several] == [("mq-1", 5672), ("mq-2", 5671)]
    assert hosts("amqp://u:p@mq-1/v;amqps://mq-2:7000/") == "mq-1:5672, mq-2:7000"


@pytest.mark.parametrize(("urls", "says"), [
    ("amqp://u:secret@mq-1/v;", "AMQP URL 2 of 2 is empty"),
    ("amqp://u:secret@mq-1/v;http://u:secret@mq-2/v", "AMQP URL 2 of 2 'http://u:***@mq-2/v' "
                                                      "must start with amqp://"),
    ("amqp://u:secret@mq-1:port/v", "AMQP URL 'amqp://u:***@mq-1:port/v' is malformed"),
    ("amqp:///v", "names no host"),
])
def test_a_bad_url_is_named_without_its_password(urls: str, says: str) -> None:
    with pytest.raises(AmqpUrlError) as refused:
        parameters(urls)
    assert says in str(refused.value)
    assert "secret" not in str(refused.value)


def test_each_node_is_tried_once_and_every_failure_is_named() -> None:
    ports = [_closed_port(), _closed_port()]
    urls = ";".join(f"amqp://guest:guest@127.0.0.1:{port}/%2F" for port in ports)
    publisher = ConfirmPublisher(parameters(urls), timeout=5.0, name="test-confirm")
    try:
        with pytest.raises(PublishError, match="on any of 2 nodes") as failed:
            publisher.publish([("", "q", b"x")], pika.BasicProperties(delivery_mode=2))
        assert all(f"127.0.0.1:{port}" in str(failed.value) for port in ports)
    finally:
        publisher.close()
