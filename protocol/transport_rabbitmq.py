"""The RabbitMQ transport: dramatiq's `RabbitmqBroker` (pika), with batches confirmed as a whole.

Single messages (`send`) go through dramatiq with publisher confirms. A batch (`publish`) is
streamed on a connection of its own in confirm mode and waited for once
(`protocol.amqp.ConfirmPublisher`): every message of it is persisted when the call returns;
otherwise it raises and the caller publishes the whole batch again (receivers ignore a run id
they have already seen). Messages are mandatory: one that no queue takes fails its batch.
`bench/publish_modes.py` measures this against an AMQP transaction per batch.
"""

from __future__ import annotations

import logging

import pika
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from protocol.amqp import ConfirmPublisher
from protocol.transport import DEAD, REQUESTS, RESULTS, Batch
from protocol.transport_dramatiq import BatchPublisher, DramatiqTransport, install_encoder

log = logging.getLogger("rota.transport")

_PERSISTENT = pika.BasicProperties(delivery_mode=2)


class _Confirmed(BatchPublisher):
    """A confirm-mode connection of its own; queues declared once, again after a failure."""

    def __init__(self, transport: RabbitmqTransport) -> None:
        self.transport = transport
        self.publisher = ConfirmPublisher(transport.rabbit.parameters, name="amqp-batches")
        self._declared: set[str] = set()

    def publish(self, batch: Batch) -> None:
        if not batch.items:
            return
        try:
            for queue in {q for q, _ in batch.items} - self._declared:
                self.transport.rabbit.declare_queue(queue, ensure=True)
                self._declared.add(queue)
            self.publisher.publish([("", q, data) for q, data in batch.items], _PERSISTENT,
                                   mandatory=True)
        except Exception:
            self._declared.clear()
            raise

    def close(self) -> None:
        self.publisher.close()


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
        return _Confirmed(self)

    def pending(self, queue: str) -> int:
        count: int = self.rabbit.get_queue_message_counts(queue)[0]
        return count
