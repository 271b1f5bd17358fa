"""The RabbitMQ transport: dramatiq's `RabbitmqBroker` (pika), with batches confirmed as a whole.

Single messages (`send`) go out with publisher confirms on the broker's channel of the calling
thread. A batch (`publish`) is streamed on a connection of its own in confirm mode and waited
for once (`protocol.amqp.ConfirmPublisher`): every message of it is persisted when the call
returns; otherwise it raises and the caller publishes the whole batch again (receivers ignore a
run id they have already seen). Messages are mandatory: one that no queue takes fails its batch.
`bench/publish_modes.py` measures this against an AMQP transaction per batch.

Every message goes through the exchange that feeds its queue (`protocol.topology`), never the
default exchange, so that each role's RabbitMQ user needs write access to the exchanges of what
it sends and nothing more. A transport made for the coordinator (or for no particular role)
declares the exchanges and binds the queues it declares; one made for a worker declares the
queue it consumes and binds nothing, and one made for an operator declares nothing.

Queues: each queue (`rota.node.<id>`, `rota.results`, `rota.requests`, `rota.deadletter`) is
declared with its `.DQ` (which dramatiq's worker consumes for delayed messages; Rota sends none,
so it stays empty) and its `.XQ`. dramatiq's released broker declares classic queues only;
`_RotaBroker` declares all three as quorum queues, replicated across a RabbitMQ cluster, with
the arguments of `protocol.topology.queue_arguments`: a delivery limit, and at-least-once
dead-lettering to the `.XQ` through `rota.x.unreadable`. RabbitMQ cannot turn an existing
classic queue (left by an earlier Rota) into a quorum queue and refuses the declaration; that
raises `QueueMismatch`, which names the queue and what to do, rather than being retried.

The URL may name several nodes of one cluster, separated by ";" (`protocol.amqp.parameters`):
each connection goes to the first that answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
from dramatiq.brokers.rabbitmq import MAX_DECLARE_ATTEMPTS, RabbitmqBroker
from dramatiq.common import dq_name, q_name, xq_name
from dramatiq.errors import ConnectionClosed

from protocol import topology
from protocol.amqp import ConfirmPublisher, parameters
from protocol.transport import (
    DEAD,
    REQUESTS,
    RESULTS,
    Batch,
    Consumer,
    Delivery,
    QueueMismatch,
    RefusedByBroker,
)
from protocol.transport_dramatiq import BatchPublisher, DramatiqTransport, install_encoder

log = logging.getLogger("rota.transport")

_PERSISTENT = pika.BasicProperties(delivery_mode=2)
_SEND_ATTEMPTS = 6


class _RotaBroker(RabbitmqBroker):
    """dramatiq's broker on Rota's topology: quorum queues that dead-letter to
    `rota.x.unreadable`, publishing through the exchange that feeds the queue, connections to
    the first node of `url` (";"-separated URLs) that answers."""

    def __init__(self, url: str, role: str | None) -> None:
        super().__init__(confirm_delivery=True, middleware=[])
        self.parameters = parameters(url)  # a list: pika tries each node in turn
        self.role = role
        self.binds = topology.declares_topology(role)

    def _build_queue_arguments(self, queue_name: str) -> dict[str, Any]:
        return topology.queue_arguments(queue_name)

    def _declare_queue(self, queue_name: str) -> Any:
        return self._declare(queue_name, self._build_queue_arguments(queue_name))

    def _declare_dq_queue(self, queue_name: str) -> Any:
        return self._declare(dq_name(queue_name), self._build_queue_arguments(queue_name))

    def _declare_xq_queue(self, queue_name: str) -> Any:
        return self._declare(xq_name(queue_name), topology.dead_queue_arguments())

    def _declare(self, queue: str, arguments: dict[str, Any]) -> Any:
        """Every queue declaration of this broker; `QueueMismatch` when RabbitMQ holds `queue`
        with other arguments (it closes the channel: the next call opens another)."""
        try:
            return self.channel.queue_declare(queue=queue, durable=True, arguments=arguments)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 406:  # PRECONDITION_FAILED: inequivalent arguments
                raise
            del self.channel
            raise QueueMismatch(queue, self.parameters[0].virtual_host, exc.reply_text) \
                from None

    def declare_exchanges(self) -> None:
        """Rota's exchanges, declared once per connection of the calling thread."""
        connection = self.connection
        if getattr(self.state, "exchanges_on", None) is connection:
            return
        for exchange in topology.EXCHANGES:
            self.channel.exchange_declare(exchange, exchange_type="direct", durable=True)
        self.state.exchanges_on = connection

    def _ensure_queue(self, canonical_queue_name):
        attempts = 0
        while True:
            try:
                if canonical_queue_name in self.queues_pending:
                    self._declare_bound(canonical_queue_name)
                    self.queues_pending.discard(canonical_queue_name)
                break
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as e:
                del self.connection
                attempts += 1
                if attempts >= MAX_DECLARE_ATTEMPTS or getattr(e, "reply_code", 0) == 403:
                    raise ConnectionClosed(e) from None

    def _declare_bound(self, queue: str) -> None:
        """The queue, its .DQ and .XQ; with the coordinator's rights, the queue bound to the
        exchange that feeds it and the .XQ to `rota.x.unreadable`. A worker binds nothing, so
        it consumes its queue whether or not a coordinator has declared the exchanges yet."""
        if self.binds:
            self.declare_exchanges()
        self._declare_queue(queue)
        self._declare_dq_queue(queue)
        self._declare_xq_queue(queue)
        if not self.binds:
            return
        self.channel.queue_bind(xq_name(queue), topology.UNREADABLE_EXCHANGE,
                                routing_key=xq_name(queue))
        exchange = topology.exchange_for(queue)
        if exchange:
            self.channel.queue_bind(queue, exchange, routing_key=queue)

    def enqueue(self, message, *, delay=None):
        """Publish `message` on its queue's exchange, confirmed; the coordinator makes sure
        the queue is there first. Delayed delivery is not Rota's: refused."""
        if delay is not None:
            raise ValueError("Rota does not send delayed messages")
        queue = message.queue_name
        attempts = 0
        while True:
            try:
                if self.binds:
                    self.declare_queue(queue, ensure=True)
                self.channel.basic_publish(
                    exchange=topology.exchange_for(queue), routing_key=queue,
                    body=message.encode(), properties=_PERSISTENT, mandatory=True,
                )
                return message
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError,
                    ConnectionClosed) as e:
                del self.connection
                code = getattr(e, "reply_code", None)
                if code == 403 or (code == 404 and not self.binds):
                    raise RefusedByBroker(f"RabbitMQ refused to publish to {queue}: "
                                          f"{getattr(e, 'reply_text', e)}") from None
                if code == 404 or isinstance(e, pika.exceptions.UnroutableError):
                    self.queues_pending.add(q_name(queue))  # declared and bound again
                attempts += 1
                if attempts >= _SEND_ATTEMPTS:
                    raise ConnectionClosed(e) from None
                time.sleep(0.05 * attempts)


class _Confirmed(BatchPublisher):
    """A confirm-mode connection of its own; with the coordinator's rights, queues declared and
    bound once, again after a failure."""

    def __init__(self, transport: RabbitmqTransport) -> None:
        self.transport = transport
        self.publisher = ConfirmPublisher(transport.rabbit.parameters, name="amqp-batches")
        self._declared: set[str] = set()

    def publish(self, batch: Batch) -> None:
        if not batch.items:
            return
        rabbit = self.transport.rabbit
        try:
            if rabbit.binds:
                for queue in {q for q, _ in batch.items} - self._declared:
                    rabbit.queues_pending.add(q_name(queue))  # declared again after a failure
                    rabbit.declare_queue(queue, ensure=True)
                    self._declared.add(queue)
            self.publisher.publish(
                [(topology.exchange_for(q), q, data) for q, data in batch.items], _PERSISTENT,
                mandatory=True)
        except Exception:
            self._declared.clear()
            raise

    def close(self) -> None:
        self.publisher.close()


class RabbitmqTransport(DramatiqTransport):
    """Rota's queues on RabbitMQ, for `role` (`protocol.topology.ROLES`; None: every right)."""

    def __init__(self, amqp_url: str, role: str | None = None) -> None:
        if role is not None and role not in topology.ROLES:
            raise ValueError(f"unknown role {role!r}; one of {', '.join(topology.ROLES)}")
        install_encoder()
        self.role = role
        self.rabbit = _RotaBroker(amqp_url, role)
        super().__init__(self.rabbit)
        if not self.rabbit.binds:
            return
        try:  # create them now, so that readers may attach before the first message
            self.rabbit.declare_exchanges()
            for q in (RESULTS, REQUESTS, DEAD):
                self.rabbit.declare_queue(q, ensure=True)
        except QueueMismatch:
            self.rabbit.close()
            raise
        except Exception as exc:  # not reachable yet: declared lazily on first use
            log.warning("RabbitMQ not reachable yet (%s); queues will be declared on use", exc)

    def declare(self, queue: str) -> None:
        """Declare `queue` now (with its .DQ and .XQ), bound as the role allows."""
        self.rabbit.declare_queue(queue, ensure=True)

    def serve(
        self,
        queue: str,
        handler: Callable[[Delivery], None],
        *,
        threads: int = 4,
        refused: Callable[[str], None] | None = None,
    ) -> Consumer:
        """As `DramatiqTransport.serve`, with `queue` declared first: a queue RabbitMQ holds
        under other arguments fails here (`QueueMismatch`) instead of in dramatiq's consumer
        threads, which would retry it forever; an unreachable RabbitMQ is left to them."""
        try:
            self.rabbit.declare_queue(queue, ensure=True)
        except QueueMismatch:
            raise
        except Exception as exc:
            log.warning("RabbitMQ not reachable yet (%s); %s will be declared on use", exc,
                        queue)
        finally:
            del self.rabbit.connection  # this thread's: the consumers open their own
        return super().serve(queue, handler, threads=threads, refused=refused)

    def batch_publisher(self) -> BatchPublisher:
        return _Confirmed(self)

    def pending(self, queue: str) -> int:
        count: int = self.rabbit.get_queue_message_counts(queue)[0]
        return count
