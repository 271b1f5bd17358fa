"""The RabbitMQ transport: dramatiq's `RabbitmqBroker` (pika), with batches in AMQP transactions.

Single messages (`send`) go through dramatiq with publisher confirms. A batch (`publish`) goes
out on a channel of its own inside one AMQP transaction: every message of it is persisted when
`tx_commit` returns, or none is, and the caller retries the whole batch (receivers ignore a run
id they have already seen).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pika
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from protocol.transport import DEAD, REQUESTS, RESULTS
from protocol.transport_dramatiq import (
    BatchPublisher,
    DramatiqTransport,
    envelope,
    install_encoder,
)

log = logging.getLogger("rota.transport")


class _Transaction(BatchPublisher):
    """A connection and transactional channel of its own; reopened after any failure."""

    def __init__(self, transport: RabbitmqTransport) -> None:
        self.transport = transport
        self._conn: Any = None
        self._channel: Any = None
        self._declared: set[str] = set()

    def publish(self, items: Sequence[tuple[str, bytes]]) -> None:
        if not items:
            return
        try:
            for queue in {q for q, _ in items} - self._declared:
                self.transport.rabbit.declare_queue(queue, ensure=True)
                self._declared.add(queue)
            ch = self._open()
            props = pika.BasicProperties(delivery_mode=2)
            for queue, payload in items:
                ch.basic_publish("", queue, envelope(queue, payload).encode(), props)
            ch.tx_commit()
        except Exception:
            self.close()
            self._declared.clear()
            raise

    def _open(self) -> Any:
        if self._channel is None or not self._channel.is_open:
            self.close()
            self._conn = pika.BlockingConnection(self.transport.rabbit.parameters)
            self._channel = self._conn.channel()
            self._channel.tx_select()
        return self._channel

    def close(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass


class RabbitmqTransport(DramatiqTransport):
    def __init__(self, amqp_url: str) -> None:
        install_encoder()
        self.rabbit = RabbitmqBroker(url=amqp_url, confirm_delivery=True, middleware=[])
        super().__init__(self.rabbit)
        try:  # create them now, so that readers may attach before the first message
            for q in (RESULTS, REQUESTS, DEAD):
                self.rabbit.declare_queue(q, ensure=True)
        except Exception as exc:  # not reachable yet: declared lazily on first use
            log.warning("RabbitMQ not reachable yet (%s); queues will be declared on use", exc)

    def batch_publisher(self) -> BatchPublisher:
        return _Transaction(self)

    def pending(self, queue: str) -> int:
        count: int = self.rabbit.get_queue_message_counts(queue)[0]
        return count
