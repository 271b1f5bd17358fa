"""A confirmed batch that cannot reach RabbitMQ fails at once, and the publisher stays usable."""

from __future__ import annotations

import socket
import threading
import time

import pika
import pytest

from protocol.amqp import ConfirmPublisher, PublishError


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
