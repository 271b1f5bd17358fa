"""The RabbitMQ event bus keeps a bounded number of events while RabbitMQ is away."""

from __future__ import annotations

import socket
import threading
import time

from coordinator.adapters.events import RabbitEventBus


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # nothing listens there once the socket is closed


def test_publish_waits_at_the_bound_instead_of_dropping_an_event() -> None:
    bus = RabbitEventBus(f"amqp://guest:guest@127.0.0.1:{_closed_port()}/%2F", max_pending=3)
    try:
        for i in range(3):
            bus.publish("run.succeeded", b"%d" % i)
        fourth = threading.Thread(target=bus.publish, args=("run.failed", b"3"), daemon=True)
        fourth.start()
        fourth.join(1.0)
        assert fourth.is_alive(), "the event beyond the bound was not kept waiting"
        assert bus.waits_full == 1
    finally:
        began = time.monotonic()
        bus.close()
    fourth.join(5)
    assert not fourth.is_alive(), "closing the bus left a publisher waiting"
    assert time.monotonic() - began < 15
