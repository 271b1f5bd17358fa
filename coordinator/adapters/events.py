"""Run lifecycle events for integrations: the `rota.events` topic exchange.

Every run state change is published with routing key `run.<state>` and a msgpack
`protocol.RunRecord` body. `RabbitEventBus` publishes from its own thread in AMQP
transactions (one commit per batch: every event of it is persisted, or none is and the batch
is published again) and reconnects with backoff; `MemoryEventBus` calls subscribers in process.

While RabbitMQ is unreachable, `RabbitEventBus` keeps up to `max_pending` events; beyond that
`publish` waits for room (the caller is held up, no event is dropped), logs a warning and
counts each wait in `waits_full`. Only `close()` gives up on what is still pending, and says
how many.
"""

from __future__ import annotations

import fnmatch
import logging
import queue
import threading
from collections.abc import Callable
from typing import Protocol

from protocol.backoff import Backoff

log = logging.getLogger("rota.events")

EXCHANGE = "rota.events"
MAX_PENDING = 100_000
"""Events `RabbitEventBus` keeps while RabbitMQ is unreachable before `publish` waits."""
BATCH = 1000
"""Most events committed in one transaction."""


class EventBus(Protocol):
    def publish(self, routing_key: str, payload: bytes) -> None: ...

    def close(self) -> None: ...


class MemoryEventBus:
    def __init__(self) -> None:
        self._subs: list[tuple[str, Callable[[str, bytes], None]]] = []
        self._lock = threading.Lock()

    def subscribe(self, pattern: str, handler: Callable[[str, bytes], None]) -> None:
        """`pattern` uses shell wildcards over the routing key, e.g. `run.*`."""
        with self._lock:
            self._subs.append((pattern, handler))

    def publish(self, routing_key: str, payload: bytes) -> None:
        with self._lock:
            subs = list(self._subs)
        for pattern, handler in subs:
            if fnmatch.fnmatchcase(routing_key, pattern):
                try:
                    handler(routing_key, payload)
                except Exception:
                    log.exception("event subscriber failed")

    def close(self) -> None:
        pass


class RabbitEventBus:
    """Publishes to the durable topic exchange `rota.events` from a background thread."""

    def __init__(self, amqp_url: str, max_pending: int = MAX_PENDING) -> None:
        self.amqp_url = amqp_url
        self.waits_full = 0  # times `publish` had to wait for room
        self._q: queue.Queue[tuple[str, bytes] | None] = queue.Queue(max_pending)
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self._stop = threading.Event()
        self._thread.start()

    def publish(self, routing_key: str, payload: bytes) -> None:
        """Queue an event for publishing; waits while `max_pending` events are pending."""
        try:
            self._q.put_nowait((routing_key, payload))
            return
        except queue.Full:
            self.waits_full += 1
            log.warning("event queue full (%d events pending): %s waits for RabbitMQ",
                        self._q.maxsize, routing_key)
        while not self._stop.is_set():
            try:
                self._q.put((routing_key, payload), timeout=1.0)
                return
            except queue.Full:
                continue
        log.error("event bus closed with its queue full: %s not published", routing_key)

    def close(self) -> None:
        self._stop.set()
        try:
            self._q.put(None, timeout=1)
        except queue.Full:
            log.error("event bus closing with %d events not published (RabbitMQ unreachable)",
                      self._q.qsize())
        self._thread.join(5)

    def _run(self) -> None:
        import pika

        backoff = Backoff()
        batch: list[tuple[str, bytes]] = []
        closing = False
        while True:
            try:
                conn = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
                ch = conn.channel()
                ch.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
                ch.tx_select()  # one commit per batch: every event in it is persisted, or none
                props = pika.BasicProperties(delivery_mode=2, content_type="application/msgpack")
                backoff.reset()
                while True:
                    if not batch:
                        closing = self._take(batch)
                    for key, body in batch:
                        ch.basic_publish(EXCHANGE, key, body, props)
                    ch.tx_commit()
                    batch = []
                    if closing:
                        conn.close()
                        return
            except Exception as exc:
                if closing or (self._stop.is_set() and not batch):
                    return
                wait = backoff.next()
                log.warning("event publisher lost RabbitMQ (%s); retrying in %.1fs", exc, wait)
                self._stop.wait(wait)

    def _take(self, batch: list[tuple[str, bytes]], limit: int = BATCH) -> bool:
        """Block for one event, then take what else is waiting. True: close after this."""
        item = self._q.get()
        while item is not None:
            batch.append(item)
            if len(batch) >= limit:
                return False
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return False
        return True
