"""What the RabbitMQ and in-memory transports share: Rota's queues over a dramatiq broker.

Every message travels as a dramatiq `Message` whose single argument is a `protocol`-encoded
payload; dramatiq's envelope is encoded with msgpack (`MsgpackEncoder`). Dramatiq declares a
`.XQ` dead-letter queue beside each queue; envelopes it cannot decode go there. Envelopes that
ask dramatiq to hold them (an `eta` option) are refused: a worker would keep them
unacknowledged in memory, and a few would fill its prefetch window and stall its queue.
"""

from __future__ import annotations

import abc
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import dramatiq
import msgpack
from dramatiq.encoder import Encoder
from dramatiq.errors import DecodeError
from dramatiq.middleware import Middleware, SkipMessage

from protocol import ProtocolError
from protocol.backoff import Backoff
from protocol.transport import (
    DEAD,
    REQUESTS,
    RESULTS,
    AckBatch,
    Batch,
    Consumer,
    Delivery,
    RefusedByBroker,
    Transport,
)

log = logging.getLogger("rota.transport")

REFUSED = "rota_refused"
"""Envelope option set by the decoder on an envelope Rota refuses, with the reason."""


@functools.lru_cache(maxsize=4096)
def actor_name_for(queue: str) -> str:
    return "rota_" + queue.replace(".", "_").replace("-", "_")


def envelope(queue: str, payload: bytes) -> dramatiq.Message:
    """The dramatiq message that carries `payload` on `queue`."""
    return dramatiq.Message(
        queue_name=queue, actor_name=actor_name_for(queue), args=(payload,), kwargs={},
        options={},
    )


def wire(queue: str, payload: bytes) -> bytes:
    """The encoded envelope of `payload` on `queue`: what `envelope(queue, payload).encode()`
    gives with `MsgpackEncoder`, made without building a dramatiq `Message`."""
    return msgpack.packb({
        "queue_name": queue, "actor_name": actor_name_for(queue), "args": [payload],
        "kwargs": {}, "options": {}, "message_id": str(uuid.uuid4()),
        "message_timestamp": int(time.time() * 1000),
    }, use_bin_type=True)


class MsgpackEncoder(Encoder):
    """dramatiq envelope encoder: msgpack, so payload bytes travel as they are."""

    def encode(self, data):
        return msgpack.packb(data, use_bin_type=True)

    def decode(self, data):
        try:
            out = msgpack.unpackb(data, raw=False)
        except Exception as exc:
            raise DecodeError(f"not a msgpack envelope: {exc}", data, exc) from None
        if not isinstance(out, dict):
            raise DecodeError("envelope is not a map", data, None)
        options = out.get("options")
        if isinstance(options, dict) and "eta" in options:
            # Never let dramatiq hold a message for later: flag it for `RefuseFlagged`.
            options = {k: v for k, v in options.items() if k != "eta"}
            options[REFUSED] = ("envelope option 'eta' (delayed delivery) is not accepted: "
                                "orders run when they arrive or are refused")
            out["options"] = options
        return out


def install_encoder() -> None:
    dramatiq.set_encoder(MsgpackEncoder())


def payload_of(message: dramatiq.Message) -> bytes:
    """The protocol payload inside a dramatiq envelope; ProtocolError if there is none."""
    args = message.args
    if len(args) != 1 or not isinstance(args[0], bytes | bytearray) or message.kwargs:
        raise ProtocolError("garbage", "envelope must carry exactly one bytes argument")
    return bytes(args[0])


class RefuseFlagged(Middleware):
    """Dead-letters envelopes the decoder flagged, before any actor sees them."""

    def __init__(self, transport: DramatiqTransport) -> None:
        self.transport = transport

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        reason = message.options.get(REFUSED)
        if not reason:
            return
        payload = message.args[0] if len(message.args) == 1 else None
        original = bytes(payload) if isinstance(payload, bytes | bytearray) else \
            msgpack.packb([list(message.args), message.kwargs], default=repr, use_bin_type=True)
        self.transport.dead_letter(message.queue_name, original,
                                   ProtocolError("bad_value", str(reason)), time.time())
        counted = self.transport._refused.get(message.queue_name)
        if counted is not None:
            counted("bad_value")
        raise SkipMessage(str(reason))


def _no_ack() -> None:
    """Served deliveries are acknowledged when their handler returns."""


class _Reader(Consumer):
    """Reads a queue on its own thread and hands each delivery to `handler`."""

    def __init__(
        self, broker: dramatiq.Broker, queue: str, handler: Callable[[Delivery], None],
        prefetch: int,
    ) -> None:
        self.broker = broker
        self.queue = queue
        self.handler = handler
        self.prefetch = prefetch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"reader:{queue}", daemon=True)

    def start(self) -> _Reader:
        self.broker.declare_queue(self.queue)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                consumer = self.broker.consume(self.queue, prefetch=self.prefetch, timeout=100)
            except Exception as exc:
                wait = backoff.next()
                # Refused for good (a queue left under other arguments): said loudly, and
                # retried all the same, so that deleting the queue is enough to recover.
                level = logging.ERROR if isinstance(exc, RefusedByBroker) else logging.WARNING
                log.log(level, "cannot consume %s (%s); retrying in %.1fs", self.queue, exc, wait)
                self._stop.wait(wait)
                continue
            backoff.reset()
            # RabbitMQ's consumers take acknowledgements in batches; others (the stub
            # broker's) one at a time.
            acks = (_ConsumerAcks(consumer) if hasattr(consumer, "known_tags")
                    and hasattr(consumer, "connection") else None)
            try:
                for proxy in consumer:
                    if self._stop.is_set():
                        break
                    if proxy is None:
                        continue
                    self.handler(self._delivery(consumer, proxy, acks))
            except Exception as exc:
                if not self._stop.is_set():
                    log.warning("lost %s (%s); reconnecting", self.queue, exc)
                    self._stop.wait(backoff.peek())
            finally:
                try:
                    consumer.close()
                except Exception:
                    pass

    @staticmethod
    def _delivery(consumer, proxy, acks: _ConsumerAcks | None) -> Delivery:
        def ack() -> None:
            try:
                consumer.ack(proxy)
            except Exception:  # the channel is gone: RabbitMQ redelivers it
                log.debug("ack failed; the message will be redelivered")

        try:
            return Delivery(payload_of(proxy), None, ack, batch=acks, token=proxy)
        except ProtocolError as exc:
            try:
                raw = proxy._message.encode()
            except Exception:
                raw = b""
            return Delivery(None, exc, ack, raw, batch=acks, token=proxy)


class _ConsumerAcks(AckBatch):
    """Acknowledges many deliveries of one dramatiq consumer with one callback handed to its
    connection's thread, instead of one callback (and one wake-up of that thread) each."""

    def __init__(self, consumer) -> None:
        self.consumer = consumer

    def ack_many(self, tokens: Sequence[object]) -> None:
        consumer = self.consumer
        tags = []
        for proxy in tokens:
            tag = proxy._tag  # type: ignore[attr-defined]
            if tag in consumer.known_tags:  # else: a channel since replaced; redelivered
                consumer.known_tags.discard(tag)
                tags.append(tag)
        if not tags:
            return
        channel = consumer.channel

        def ack() -> None:
            for tag in tags:
                channel.basic_ack(tag)

        try:
            consumer.connection.add_callback_threadsafe(ack)
        except Exception:  # the connection is gone: RabbitMQ redelivers them
            log.debug("acks failed; %d message(s) will be redelivered", len(tags))


class _Served(Consumer):
    def __init__(self, transport: DramatiqTransport, queue: str, worker: dramatiq.Worker) -> None:
        self.transport = transport
        self.queue = queue
        self.worker: dramatiq.Worker | None = worker

    def stop(self, timeout: float = 5.0) -> None:
        worker, self.worker = self.worker, None
        if worker is not None:
            worker.stop(timeout=int(timeout * 1000))
        self.transport._handlers.pop(self.queue, None)


class BatchPublisher(abc.ABC):
    """Publishes prepared batches from one thread: all of a batch is stored, or none is."""

    @abc.abstractmethod
    def publish(self, batch: Batch) -> None: ...

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        pass


class DramatiqTransport(Transport):
    """A `Transport` over a dramatiq broker (`broker`); subclasses say how batches go out."""

    def __init__(self, broker: dramatiq.Broker) -> None:
        self.broker = broker
        # Lets the wrappers kept in protocol.transport find the transport of a broker.
        broker.rota_transport = self  # type: ignore[attr-defined]
        self._handlers: dict[str, Callable[[Delivery], None]] = {}
        self._refused: dict[str, Callable[[str], None]] = {}
        self._publishers = threading.local()  # each publishing thread has a channel of its own
        self._all_publishers: list[BatchPublisher] = []
        self._publish_lock = threading.Lock()
        for q in (RESULTS, REQUESTS, DEAD):
            broker.declare_queue(q)

    @abc.abstractmethod
    def batch_publisher(self) -> BatchPublisher:
        """A publisher of batches of its own, for one thread."""

    def declare(self, queue: str) -> None:
        self.broker.declare_queue(queue)

    def prepare(self, items: Sequence[tuple[str, bytes]]) -> Batch:
        return Batch(tuple((queue, wire(queue, payload)) for queue, payload in items))

    def publish(self, items: Sequence[tuple[str, bytes]] | Batch) -> None:
        if not items:
            return
        batch = items if isinstance(items, Batch) else self.prepare(items)
        publisher: BatchPublisher | None = getattr(self._publishers, "one", None)
        if publisher is None:
            publisher = self._publishers.one = self.batch_publisher()
            with self._publish_lock:
                self._all_publishers.append(publisher)
        publisher.publish(batch)

    def send(self, queue: str, payload: bytes) -> None:
        self.broker.declare_queue(queue)
        self.broker.enqueue(envelope(queue, payload))

    def consume(
        self, queue: str, handler: Callable[[Delivery], None], *, prefetch: int = 500
    ) -> Consumer:
        return _Reader(self.broker, queue, handler, prefetch).start()

    def serve(
        self,
        queue: str,
        handler: Callable[[Delivery], None],
        *,
        threads: int = 4,
        refused: Callable[[str], None] | None = None,
    ) -> Consumer:
        self.broker.declare_queue(queue)
        self._handlers[queue] = handler
        if refused is not None:
            self._refused[queue] = refused
        name = actor_name_for(queue)
        if name not in self.broker.actors:
            dramatiq.Actor(
                self._actor_for(queue), broker=self.broker, actor_name=name,
                queue_name=queue, priority=0, options={"max_retries": 0},
            )
        if not any(isinstance(m, RefuseFlagged) for m in self.broker.middleware):
            self.broker.add_middleware(RefuseFlagged(self))
        worker = dramatiq.Worker(self.broker, queues={queue}, worker_threads=threads,
                                 worker_timeout=100)
        worker.start()
        return _Served(self, queue, worker)

    def _actor_for(self, queue: str) -> Callable[..., None]:
        def take(*args: object, **kwargs: object) -> None:
            handler = self._handlers.get(queue)
            if handler is None:  # nobody serves the queue any more: RabbitMQ keeps it
                raise RuntimeError(f"{queue} is not served here")
            payload = args[0] if len(args) == 1 and not kwargs else None
            if isinstance(payload, bytes | bytearray):
                handler(Delivery(bytes(payload), None, _no_ack))
                return
            raw = msgpack.packb([list(args), kwargs], default=repr, use_bin_type=True)
            handler(Delivery(None, ProtocolError(
                "garbage", "envelope must carry exactly one bytes argument, got "
                f"{len(args)} argument(s) and {len(kwargs)} keyword(s)"), _no_ack, raw))

        return take

    def close(self) -> None:
        with self._publish_lock:
            publishers, self._all_publishers = self._all_publishers, []
        for publisher in publishers:
            publisher.close()
        self.broker.close()
