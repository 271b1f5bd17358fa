"""Message transport: the interface the scheduler's two sides talk to, and its queues.

`Transport` is the one interface: publish a batch, consume a queue with acknowledgeable
deliveries (or serve it on several threads), dead-letter refused input. Two implementations sit
behind it, both over dramatiq: `RabbitmqTransport` (protocol/transport_rabbitmq.py) for a real
cluster and `MemoryTransport` (protocol/transport_memory.py) for the embedded one; what they
share is in protocol/transport_dramatiq.py. `make_transport` picks one from an optional AMQP
URL.

Queues:
- `rota.node.<node-id>`: run orders and daemon controls for one worker node (durable);
- `rota.results`: run events from workers to the leader;
- `rota.requests`: operator requests (manual runs, service edits) to the leader;
- `rota.deadletter`: refused input, each with the reason it was refused.
Beside each, `<queue>.XQ` keeps envelopes the transport could not decode, byte for byte, and
messages given back to the queue more often than `protocol.topology.DELIVERY_LIMIT`.
On RabbitMQ each queue is a quorum queue fed by an exchange of its own (`protocol.topology`).
"""

from __future__ import annotations

import abc
import functools
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from protocol import DeadLetter, ProtocolError, encode

if TYPE_CHECKING:
    import dramatiq

log = logging.getLogger("rota.transport")

RESULTS = "rota.results"
REQUESTS = "rota.requests"
DEAD = "rota.deadletter"
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


class RefusedByBroker(ConnectionError):
    """The broker refused an operation for good: no permission, or no such exchange."""


class QueueMismatch(RefusedByBroker):
    """RabbitMQ holds a queue of Rota's under other arguments than Rota declares (a classic
    queue left by an earlier Rota, which RabbitMQ cannot turn into a quorum queue): retrying
    cannot help; the message says what to do."""

    def __init__(self, queue: str, vhost: str, detail: str) -> None:
        self.queue, self.vhost = queue, vhost
        super().__init__(
            f"RabbitMQ already has queue {queue!r} in vhost {vhost!r} with other arguments than "
            f"Rota declares ({detail}). Rota declares its queues as quorum queues (replicated, "
            "with a delivery limit); a queue left by an earlier Rota is a classic queue, which "
            "RabbitMQ cannot convert. Let the earlier version's consumers drain it (`rabbitmqctl "
            f"list_queues -p {vhost} name type messages` shows what is left), delete it with "
            f"`rabbitmqctl delete_queue -p {vhost} {queue}`, and start Rota again: it declares "
            "the queue anew.")


@functools.lru_cache(maxsize=4096)
def node_queue(node_id: str) -> str:
    return "rota.node." + _SAFE.sub("_", node_id)


@dataclass(frozen=True, slots=True)
class Batch:
    """Messages encoded for the wire once (`Transport.prepare`): published again as they are
    after a failure, never encoded twice."""

    items: tuple[tuple[str, bytes], ...]  # (queue, the transport's wire bytes)

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class Delivery:
    """One message taken from a queue, to be acknowledged once it is safely handled.

    `payload` is the protocol payload, or None with `error` saying why the envelope carries
    none (`raw` then holds the whole envelope, for the dead letter).
    """

    payload: bytes | None
    error: ProtocolError | None
    _ack: Callable[[], None]
    raw: bytes = b""
    batch: AckBatch | None = None
    """Set when the consumer can acknowledge several deliveries at once (`ack_all`)."""
    token: object = None
    """What `batch` needs to acknowledge this delivery."""

    def ack(self) -> None:
        self._ack()


class AckBatch(abc.ABC):
    """A consumer's way to acknowledge many deliveries in one hand-over to its connection."""

    @abc.abstractmethod
    def ack_many(self, tokens: Sequence[object]) -> None:
        """Acknowledge the deliveries `tokens` name; never raises (an unacknowledged
        delivery is redelivered)."""


def ack_all(deliveries: Sequence[Delivery]) -> None:
    """Acknowledge `deliveries`, in one hand-over per consumer where it allows it (a turn's
    reports cost one wake-up of the reader's connection, not one each)."""
    groups: dict[int, tuple[AckBatch, list[object]]] = {}
    for d in deliveries:
        if d.batch is None:
            d.ack()
        else:
            groups.setdefault(id(d.batch), (d.batch, []))[1].append(d.token)
    for batch, tokens in groups.values():
        batch.ack_many(tokens)


class Consumer(abc.ABC):
    """A running consumption of one queue."""

    @abc.abstractmethod
    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking messages; unacknowledged ones go back to the queue."""


class Transport(abc.ABC):
    """Rota's queues: what the leader and the workers need of a message broker."""

    @abc.abstractmethod
    def declare(self, queue: str) -> None:
        """Make sure `queue` exists (durable on RabbitMQ)."""

    @abc.abstractmethod
    def prepare(self, items: Sequence[tuple[str, bytes]]) -> Batch:
        """(queue, payload) pairs encoded once for the wire, to `publish` (again if need be)."""

    @abc.abstractmethod
    def publish(self, items: Sequence[tuple[str, bytes]] | Batch) -> None:
        """Publish (queue, payload) pairs, or a prepared `Batch`, as one batch: when this
        returns every one is stored; when it raises, maybe none is, and the caller publishes
        the batch again (prepare it first to encode it once). Thread-safe: each publishing
        thread has a channel of its own."""

    @abc.abstractmethod
    def send(self, queue: str, payload: bytes) -> None:
        """Publish one payload, stored when this returns."""

    @abc.abstractmethod
    def consume(
        self, queue: str, handler: Callable[[Delivery], None], *, prefetch: int = 500
    ) -> Consumer:
        """Hand each delivery of `queue` to `handler`, in order, on one thread of its own; at
        most `prefetch` may wait unacknowledged. The handler (or whoever it hands the delivery
        to) calls `ack()` once it is safely handled; reconnects after a broker outage."""

    @abc.abstractmethod
    def serve(
        self,
        queue: str,
        handler: Callable[[Delivery], None],
        *,
        threads: int = 4,
        refused: Callable[[str], None] | None = None,
    ) -> Consumer:
        """Hand deliveries of `queue` to `handler` on `threads` threads at once; each is
        acknowledged when the handler returns. Envelopes not fit for Rota (undecodable, for
        another actor) go to `<queue>.XQ`; those asking for delayed delivery are
        dead-lettered and counted by `refused(reason)`; the handler never sees them."""

    @abc.abstractmethod
    def pending(self, queue: str) -> int:
        """Messages waiting in `queue` (ready, not yet taken by a consumer)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def dead_letter(
        self, source: str, original: bytes, error: ProtocolError | str, at: float
    ) -> None:
        """Record refused input on `rota.deadletter` with its reason; never raises."""
        reason = error.reason if isinstance(error, ProtocolError) else "refused"
        detail = str(error)
        log.warning("refused message on %s: %s", source, detail)
        try:
            self.send(DEAD, encode(DeadLetter(
                original=original[: 64 * 1024], reason=reason, detail=detail, source=source,
                at=at,
            )))
        except Exception:  # the dead-letter queue itself is unavailable: the log line stays
            log.exception("could not dead-letter a message from %s", source)


def make_transport(amqp_url: str | None, role: str | None = None) -> Transport:
    """RabbitMQ at `amqp_url`, or queues in this process when no URL is given.

    `role` (coordinator, worker or operator; `protocol.topology`) says what the transport
    declares on RabbitMQ, so that it needs no more than that role's permissions; None declares
    everything, as the coordinator does. The in-memory transport has no permissions."""
    if amqp_url:
        from protocol.transport_rabbitmq import RabbitmqTransport

        return RabbitmqTransport(amqp_url, role)
    from protocol.transport_memory import MemoryTransport

    return MemoryTransport()


# -- for callers that still hold a dramatiq broker ----------------------------------------------
# The coordinator takes a Transport (or a broker made by `make_broker`); some tests publish
# through a broker. These thin wrappers find the broker's transport.


def actor_name_for(queue: str) -> str:
    from protocol.transport_dramatiq import actor_name_for as name

    return name(queue)


def payload_of(message: Any) -> bytes:
    from protocol.transport_dramatiq import payload_of as payload

    return payload(message)


def broker_of(transport: Transport) -> dramatiq.Broker:
    """The dramatiq broker under `transport`."""
    broker: dramatiq.Broker = transport.broker  # type: ignore[attr-defined]
    return broker


def _of(broker: dramatiq.Broker) -> Transport:
    found: Transport | None = getattr(broker, "rota_transport", None)
    if found is None:
        raise TypeError("not a broker made by make_broker or make_transport")
    return found


def make_broker(amqp_url: str | None) -> dramatiq.Broker:
    """The dramatiq broker of `make_transport(amqp_url)`."""
    return broker_of(make_transport(amqp_url))


def send(broker: dramatiq.Broker, queue: str, payload: bytes) -> None:
    _of(broker).send(queue, payload)


_DRAMATIQ_NAMES = {"REFUSED", "MsgpackEncoder", "RefuseFlagged", "install_encoder"}


def __getattr__(name: str) -> Any:
    if name in _DRAMATIQ_NAMES:
        from protocol import transport_dramatiq

        return getattr(transport_dramatiq, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
