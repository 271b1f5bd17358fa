"""Message transport: Rota's queues over a dramatiq broker.

One interface, dramatiq's `Broker`, two implementations: `RabbitmqBroker` for a real
cluster and `StubBroker` for the embedded one. Every message travels as a dramatiq
`Message` whose single argument is a `protocol`-encoded payload; dramatiq's envelope is
encoded with msgpack (`MsgpackEncoder`).

Queues:
- `rota.node.<node-id>`: run orders and daemon controls for one worker node (durable);
- `rota.results`: run events from workers to the leader;
- `rota.requests`: operator requests (manual runs, service edits) to the leader;
- `rota.deadletter`: refused input, each with the reason it was refused.
Dramatiq declares a `.XQ` dead-letter queue beside each; envelopes it cannot decode go there.
Envelopes that ask dramatiq to hold them (an `eta` option) are refused: a worker would keep them
unacknowledged in memory, and a few would fill its prefetch window and stall its queue.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import dramatiq
import msgpack
from dramatiq.brokers.stub import StubBroker
from dramatiq.encoder import Encoder
from dramatiq.errors import DecodeError
from dramatiq.middleware import Middleware, SkipMessage

from protocol import DeadLetter, ProtocolError, encode

log = logging.getLogger("rota.transport")

RESULTS = "rota.results"
REQUESTS = "rota.requests"
DEAD = "rota.deadletter"
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def node_queue(node_id: str) -> str:
    return "rota.node." + _SAFE.sub("_", node_id)


def actor_name_for(queue: str) -> str:
    return "rota_" + queue.replace(".", "_").replace("-", "_")


class MsgpackEncoder(Encoder):
    """dramatiq envelope encoder: msgpack, so payload bytes travel as they are."""

    def encode(self, data):  # type: ignore[no-untyped-def]
        return msgpack.packb(data, use_bin_type=True)

    def decode(self, data):  # type: ignore[no-untyped-def]
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


REFUSED = "rota_refused"
"""Envelope option set by the decoder on an envelope Rota refuses, with the reason."""


class RefuseFlagged(Middleware):
    """Dead-letters envelopes the decoder flagged, before any actor sees them."""

    def __init__(self, counted: Callable[[str], None] | None = None) -> None:
        self.counted = counted

    def before_process_message(self, broker: dramatiq.Broker, message: dramatiq.Message) -> None:
        reason = message.options.get(REFUSED)
        if not reason:
            return
        payload = message.args[0] if len(message.args) == 1 else None
        original = bytes(payload) if isinstance(payload, bytes | bytearray) else \
            msgpack.packb([list(message.args), message.kwargs], default=repr, use_bin_type=True)
        dead_letter(broker, message.queue_name, original,
                    ProtocolError("bad_value", str(reason)), time.time())
        if self.counted is not None:
            self.counted("bad_value")
        raise SkipMessage(str(reason))


def install_encoder() -> None:
    dramatiq.set_encoder(MsgpackEncoder())


def make_broker(amqp_url: str | None) -> dramatiq.Broker:
    """A RabbitMQ broker with publisher confirms, or an in-memory one when no URL is given."""
    install_encoder()
    if amqp_url:
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        broker: dramatiq.Broker = RabbitmqBroker(
            url=amqp_url, confirm_delivery=True, middleware=[]
        )
    else:
        broker = StubBroker(middleware=[])
    for q in (RESULTS, REQUESTS, DEAD):
        broker.declare_queue(q)
    if amqp_url:
        try:  # create them now, so that readers may attach before the first message
            for q in (RESULTS, REQUESTS, DEAD):
                broker.declare_queue(q, ensure=True)  # type: ignore[call-arg]
        except Exception as exc:  # not reachable yet: declared lazily on first use
            log.warning("RabbitMQ not reachable yet (%s); queues will be declared on use", exc)
    return broker


def send(broker: dramatiq.Broker, queue: str, payload: bytes) -> None:
    """Publish one protocol payload to a queue (confirmed by RabbitMQ before returning)."""
    broker.declare_queue(queue)
    broker.enqueue(
        dramatiq.Message(
            queue_name=queue,
            actor_name=actor_name_for(queue),
            args=(payload,),
            kwargs={},
            options={},
        )
    )


class Publisher:
    """Publishes a batch of payloads with a single round of confirmation.

    On RabbitMQ the batch goes out on a channel of its own inside one AMQP transaction: every
    message is persisted when `tx_commit` returns, or none is (the caller retries the batch;
    workers ignore a run id they have already seen). The envelopes are dramatiq messages, as
    `send` makes them. Use it from one thread. With the stub broker it simply enqueues.
    """

    def __init__(self, broker: dramatiq.Broker) -> None:
        self.broker = broker
        self._conn: object | None = None
        self._channel: object | None = None
        self._declared: set[str] = set()

    def send_many(self, items: list[tuple[str, bytes]]) -> None:
        if not items:
            return
        if isinstance(self.broker, StubBroker):
            for queue, payload in items:
                send(self.broker, queue, payload)
            return
        import pika

        try:
            for queue in {q for q, _ in items} - self._declared:
                self.broker.declare_queue(queue, ensure=True)  # type: ignore[call-arg]
                self._declared.add(queue)
            ch = self._open()
            props = pika.BasicProperties(delivery_mode=2)
            for queue, payload in items:
                body = dramatiq.Message(
                    queue_name=queue, actor_name=actor_name_for(queue), args=(payload,),
                    kwargs={}, options={},
                ).encode()
                ch.basic_publish("", queue, body, props)  # type: ignore[attr-defined]
            ch.tx_commit()  # type: ignore[attr-defined]
        except Exception:
            self.close()
            self._declared.clear()
            raise

    def _open(self) -> object:
        import pika

        if self._channel is None or not self._channel.is_open:  # type: ignore[attr-defined]
            self.close()
            params = self.broker.parameters  # type: ignore[attr-defined]
            self._conn = pika.BlockingConnection(params)
            self._channel = self._conn.channel()  # type: ignore[attr-defined]
            self._channel.tx_select()  # type: ignore[attr-defined]
        return self._channel

    def close(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None:
            try:
                conn.close()  # type: ignore[attr-defined]
            except Exception:
                pass


def payload_of(message: dramatiq.Message) -> bytes:
    """The protocol payload inside a dramatiq envelope; ProtocolError if there is none."""
    args = message.args
    if len(args) != 1 or not isinstance(args[0], bytes | bytearray) or message.kwargs:
        raise ProtocolError("garbage", "envelope must carry exactly one bytes argument")
    return bytes(args[0])


def dead_letter(
    broker: dramatiq.Broker, source: str, original: bytes, error: ProtocolError | str, at: float
) -> None:
    """Record refused input on `rota.deadletter` with its reason."""
    reason = error.reason if isinstance(error, ProtocolError) else "refused"
    detail = str(error)
    log.warning("refused message on %s: %s", source, detail)
    try:
        send(
            broker,
            DEAD,
            encode(
                DeadLetter(
                    original=original[: 64 * 1024], reason=reason, detail=detail,
                    source=source, at=at,
                )
            ),
        )
    except Exception:  # the dead-letter queue itself is unavailable: the log line stays
        log.exception("could not dead-letter a message from %s", source)


@dataclass
class Delivery:
    """One message taken from a queue, to be acknowledged once it is safely handled."""

    payload: bytes | None
    error: ProtocolError | None
    _ack: Callable[[], None]
    raw: bytes = b""  # the whole envelope, for dead letters

    def ack(self) -> None:
        self._ack()


class QueueReader:
    """Reads a queue on its own thread and hands each delivery to `handler`.

    Deliveries are acknowledged by whoever handles them (the leader acks run events only
    after writing them to its ledger). Closing the reader returns unacknowledged messages
    to RabbitMQ.
    """

    def __init__(
        self,
        broker: dramatiq.Broker,
        queue: str,
        handler: Callable[[Delivery], None],
        *,
        prefetch: int = 500,
    ) -> None:
        self.broker = broker
        self.queue = queue
        self.handler = handler
        self.prefetch = prefetch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"reader:{queue}", daemon=True)

    def start(self) -> QueueReader:
        self.broker.declare_queue(self.queue)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                consumer = self.broker.consume(self.queue, prefetch=self.prefetch, timeout=100)
            except Exception as exc:
                log.warning("cannot consume %s (%s); retrying in %.1fs", self.queue, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.2
            try:
                for proxy in consumer:
                    if self._stop.is_set():
                        break
                    if proxy is None:
                        continue
                    self.handler(self._delivery(consumer, proxy))
            except Exception as exc:
                if not self._stop.is_set():
                    log.warning("lost %s (%s); reconnecting", self.queue, exc)
                    self._stop.wait(backoff)
            finally:
                try:
                    consumer.close()
                except Exception:
                    pass

    @staticmethod
    def _delivery(consumer, proxy) -> Delivery:  # type: ignore[no-untyped-def]
        def ack() -> None:
            try:
                consumer.ack(proxy)
            except Exception:  # the channel is gone: RabbitMQ redelivers it
                log.debug("ack failed; the message will be redelivered")

        try:
            return Delivery(payload_of(proxy), None, ack)
        except ProtocolError as exc:
            try:
                raw = proxy._message.encode()
            except Exception:
                raw = b""
            return Delivery(None, exc, ack, raw)
