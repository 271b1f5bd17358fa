"""Run lifecycle events for integrations: the `rota.events` topic exchange.

Every run state change is published with routing key `run.<state>` and a msgpack
`protocol.RunRecord` body. `RabbitEventBus` publishes from its own thread with publisher
confirms and reconnects with backoff; `MemoryEventBus` calls subscribers in process.
"""

from __future__ import annotations

import fnmatch
import logging
import queue
import threading
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("rota.events")

EXCHANGE = "rota.events"


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

    def __init__(self, amqp_url: str, max_pending: int = 100_000) -> None:
        self.amqp_url = amqp_url
        self._q: queue.Queue[tuple[str, bytes] | None] = queue.Queue(max_pending)
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self._stop = threading.Event()
        self._thread.start()

    def publish(self, routing_key: str, payload: bytes) -> None:
        try:
            self._q.put_nowait((routing_key, payload))
        except queue.Full:
            log.error("event queue full: dropping %s", routing_key)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything published so far is confirmed by RabbitMQ."""
        done = threading.Event()
        self._q.put(("__flush__", b""))
        self._flushed = done
        done.wait(timeout)

    def close(self) -> None:
        self._stop.set()
        self._q.put(None)
        self._thread.join(5)

    def _run(self) -> None:
        import pika

        backoff = 0.2
        batch: list[tuple[str, bytes]] = []
        closing = False
        while True:
            try:
                conn = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
                ch = conn.channel()
                ch.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
                ch.tx_select()  # one commit per batch: every event in it is persisted, or none
                props = pika.BasicProperties(delivery_mode=2, content_type="application/msgpack")
                backoff = 0.2
                while True:
                    if not batch:
                        closing = self._take(batch)
                    for key, body in batch:
                        if key != "__flush__":
                            ch.basic_publish(EXCHANGE, key, body, props)
                    ch.tx_commit()
                    if any(key == "__flush__" for key, _ in batch):
                        getattr(self, "_flushed", threading.Event()).set()
                    batch = []
                    if closing:
                        conn.close()
                        return
            except Exception as exc:
                if closing or (self._stop.is_set() and not batch):
                    return
                log.warning("event publisher lost RabbitMQ (%s); retrying in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _take(self, batch: list[tuple[str, bytes]], limit: int = 1000) -> bool:
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
