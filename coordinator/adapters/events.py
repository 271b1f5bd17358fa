"""Run lifecycle events for integrations: the `rota.events` topic exchange.

Every run state change is published with routing key `run.<state>` and a msgpack
`protocol.RunRecord` body. The leader hands each turn's records over as one batch
(`publish_batch`). `RabbitEventBus` publishes from its own thread, a turn's batch (or several
waiting ones) at a time with publisher confirms waited for once (every event of it is
persisted, or the batch is published again), and reconnects with backoff; `MemoryEventBus`
calls subscribers in process. The records that end runs are kept by RabbitMQ in the
`rota.history` stream bound to the exchange (`coordinator/adapters/history.py`).

While RabbitMQ is unreachable, `RabbitEventBus` keeps up to `max_pending` events; beyond that
`publish_batch` waits for room (the caller is held up, no event is dropped), logs a warning and
counts each wait in `waits_full`. A batch larger than the bound is taken alone once nothing
else is pending. Only `close()` gives up on what is still pending, and says how many.

The URL may name several nodes of one RabbitMQ cluster, separated by ";"
(`protocol.amqp.parameters`): the bus connects to the first that answers, and to the next one
when its node goes away.

`publish_batch(events, then)` calls `then` once the batch is stored: the leader acknowledges a
turn's reports only then, so a leader killed before its events left has the reports taken
again by its successor, which records what they say (daemon intervals included) once more.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from coordinator.adapters.history import declare_history
from protocol.backoff import Backoff

log = logging.getLogger("rota.events")

EXCHANGE = "rota.events"
MAX_PENDING = 100_000
"""Events `RabbitEventBus` keeps while RabbitMQ is unreachable before `publish` waits."""
BATCH = 1000
"""Most events confirmed in one round, unless a single turn's batch is larger."""

Event = tuple[str, bytes]
"""(routing key, body)."""


Done = Callable[[], None]
"""Called once every event of a batch is stored by RabbitMQ (in process: delivered)."""


class EventBus(Protocol):
    def publish(self, routing_key: str, payload: bytes) -> None: ...

    def publish_batch(self, events: Sequence[Event], then: Done | None = None) -> None: ...

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

    def publish_batch(self, events: Sequence[Event], then: Done | None = None) -> None:
        for key, payload in events:
            self.publish(key, payload)
        if then is not None:
            then()

    def close(self) -> None:
        pass


class RabbitEventBus:
    """Publishes to the durable topic exchange `rota.events` from a background thread."""

    def __init__(self, amqp_url: str, max_pending: int = MAX_PENDING) -> None:
        from protocol.amqp import parameters

        parameters(amqp_url)  # a malformed URL fails here, not in the publishing thread
        self.amqp_url = amqp_url
        self.max_pending = max_pending
        self.waits_full = 0  # times a publisher had to wait for room
        self._pending: deque[list[Event]] = deque()
        self._then: deque[Done | None] = deque()  # beside each pending batch
        self._count = 0  # events in `_pending`
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self._thread.start()

    def publish(self, routing_key: str, payload: bytes) -> None:
        """Queue an event for publishing; waits while `max_pending` events are pending."""
        self.publish_batch([(routing_key, payload)])

    def publish_batch(self, events: Sequence[Event], then: Done | None = None) -> None:
        """Queue a batch, published in one confirm round; waits while there is no room.
        `then` is called from the publisher's thread once the whole batch is confirmed (never,
        if the bus closes first)."""
        batch = list(events)
        if not batch:
            if then is not None:
                then()
            return
        with self._cond:
            if not self._room(len(batch)):
                self.waits_full += 1
                log.warning("event queue full (%d events pending): %d event(s) wait for "
                            "RabbitMQ", self._count, len(batch))
                while not self._room(len(batch)) and not self._closing:
                    self._cond.wait(1.0)
                if self._closing and not self._room(len(batch)):
                    log.error("event bus closed with its queue full: %d event(s) not "
                              "published", len(batch))
                    return
            self._pending.append(batch)
            self._then.append(then)
            self._count += len(batch)
            self._cond.notify_all()

    def _room(self, n: int) -> bool:
        return self._count == 0 or self._count + n <= self.max_pending

    def close(self) -> None:
        """Publish what is pending if RabbitMQ is there (waiting up to 5 s), then stop."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(5)
        with self._cond:
            if self._count:
                log.error("event bus closing with %d events not published (RabbitMQ "
                          "unreachable)", self._count)

    def _take(self) -> list[Event] | None:
        """Wait for pending batches and take whole ones, up to `BATCH` events (at least one
        batch); None once closing with nothing pending."""
        with self._cond:
            while not self._pending and not self._closing:
                self._cond.wait()
            if not self._pending:
                return None
            taken = list(self._pending[0])
            n = 1
            while n < len(self._pending) and len(taken) + len(self._pending[n]) <= BATCH:
                taken += self._pending[n]
                n += 1
            return taken

    def _done(self, taken: int) -> None:
        """The first `taken` pending events are confirmed: make room, and say so to whoever
        waits for those batches."""
        done: list[Done] = []
        with self._cond:
            while taken > 0 and self._pending:
                first = self._pending.popleft()
                then = self._then.popleft()
                if then is not None:
                    done.append(then)
                taken -= len(first)
                self._count -= len(first)
            self._cond.notify_all()
        for then in done:
            try:
                then()
            except Exception:
                log.exception("after publishing events")

    def _run(self) -> None:
        import pika

        from protocol.amqp import ConfirmPublisher, parameters

        props = pika.BasicProperties(delivery_mode=2, content_type="application/msgpack")
        backoff = Backoff()
        publisher: ConfirmPublisher | None = None
        while True:
            batch = self._take()
            if batch is None:
                break
            try:
                if publisher is None:
                    params = parameters(self.amqp_url)
                    conn = pika.BlockingConnection(params)
                    try:  # the exchange, and the history stream bound to it
                        declare_history(conn.channel())
                    finally:
                        conn.close()
                    publisher = ConfirmPublisher(params, name="events-publisher")
                publisher.publish([(EXCHANGE, key, body) for key, body in batch], props)
                backoff.reset()
                self._done(len(batch))
            except Exception as exc:
                if publisher is not None:
                    publisher.close()
                    publisher = None
                if self._closing:
                    break
                wait = backoff.next()
                log.warning("event publisher lost RabbitMQ (%s); retrying in %.1fs", exc, wait)
                with self._cond:
                    if not self._closing:
                        self._cond.wait(wait)
        if publisher is not None:
            publisher.close()
