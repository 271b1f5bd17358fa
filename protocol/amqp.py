"""Batches published to RabbitMQ with publisher confirms, streamed and waited for once.

`ConfirmPublisher.publish` hands a whole batch to a pika `SelectConnection` running on an I/O
thread of its own, which streams every message of it on a channel in confirm mode; the call
returns once RabbitMQ has confirmed the last one (for persistent messages on durable queues:
once it has stored them). A negative confirm, a returned message (with `mandatory`), a lost
connection or no confirm within `timeout` raises: maybe none of the batch was stored, and the
caller publishes it again. One batch is in flight at a time per publisher.

pika's `BlockingConnection` in confirm mode waits for each message's confirm before sending the
next one; this publisher pays that round trip once per batch instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import pika
from pika.spec import Basic

log = logging.getLogger("rota.transport")

Item = tuple[str, str, bytes]
"""(exchange, routing key, body)."""


class PublishError(ConnectionError):
    """A batch was not confirmed as a whole; publish it again."""


class _Batch:
    def __init__(self, items: Sequence[Item], properties: pika.BasicProperties,
                 mandatory: bool) -> None:
        self.items = items
        self.properties = properties
        self.mandatory = mandatory
        self.outstanding = len(items)
        self.error: str | None = None
        self.done = threading.Event()

    def fail(self, why: str) -> None:
        if self.error is None:
            self.error = why
        self.done.set()


class ConfirmPublisher:
    """Publishes batches over one connection of its own, reopened after any failure."""

    def __init__(self, parameters: pika.connection.Parameters, *, timeout: float = 30.0,
                 name: str = "amqp-publisher") -> None:
        self.parameters = parameters
        self.timeout = timeout
        self.name = name
        self._lock = threading.Lock()  # one batch in flight
        self._conn: Any = None
        self._channel: Any = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._open_error: str | None = None
        self._tag = 0
        self._unconfirmed: OrderedDict[int, _Batch] = OrderedDict()
        self._current: _Batch | None = None

    # -- the caller's side ----------------------------------------------------------------
    def publish(self, items: Sequence[Item], properties: pika.BasicProperties, *,
                mandatory: bool = False) -> None:
        """Every item is stored when this returns; raises `PublishError` otherwise."""
        if not items:
            return
        with self._lock:
            conn = self._open()
            batch = _Batch(items, properties, mandatory)
            thread = self._thread
            conn.ioloop.add_callback_threadsafe(lambda: self._send(batch))
            deadline = time.monotonic() + self.timeout
            while not batch.done.wait(0.25):
                if thread is None or not thread.is_alive():  # the loop ended before sending
                    self._shut()
                    raise PublishError(batch.error or "connection closed")
                if time.monotonic() > deadline:
                    self._shut()
                    raise PublishError(f"no confirm within {self.timeout:g} s")
            if batch.error is not None:
                self._shut()
                raise PublishError(batch.error)

    def close(self) -> None:
        with self._lock:
            self._shut()

    def _open(self) -> Any:
        if self._conn is not None and self._thread is not None and self._thread.is_alive() \
                and self._channel is not None and self._channel.is_open:
            return self._conn
        self._shut()
        self._ready.clear()
        self._open_error = None
        self._tag = 0
        self._unconfirmed.clear()
        conn = pika.SelectConnection(
            self.parameters, on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error, on_close_callback=self._on_closed,
        )
        self._conn = conn
        self._thread = threading.Thread(target=conn.ioloop.start, name=self.name, daemon=True)
        self._thread.start()
        if not self._ready.wait(self.timeout) or self._open_error is not None:
            why = self._open_error or f"not open within {self.timeout:g} s"
            self._shut()
            raise PublishError(f"cannot open a confirm channel: {why}")
        return conn

    def _shut(self) -> None:
        conn, thread = self._conn, self._thread
        self._conn = self._channel = self._thread = None
        if conn is None:
            return

        def stop() -> None:
            try:
                if conn.is_open:
                    conn.close()  # `_on_closed` stops the loop
                else:
                    conn.ioloop.stop()
            except Exception:
                conn.ioloop.stop()

        try:
            conn.ioloop.add_callback_threadsafe(stop)
        except Exception:
            pass
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    # -- the I/O thread ---------------------------------------------------------------------
    def _on_open(self, conn: Any) -> None:
        conn.channel(on_open_callback=self._on_channel)

    def _on_channel(self, channel: Any) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(self._on_confirm, callback=lambda _frame: self._ready.set())

    def _on_open_error(self, conn: Any, error: BaseException) -> None:
        self._open_error = str(error) or type(error).__name__
        self._ready.set()
        conn.ioloop.stop()

    def _on_closed(self, conn: Any, error: BaseException) -> None:
        self._fail_all(f"connection closed: {error}")
        if not self._ready.is_set():
            self._open_error = str(error)
            self._ready.set()
        conn.ioloop.stop()

    def _on_channel_closed(self, channel: Any, error: BaseException) -> None:
        self._fail_all(f"channel closed: {error}")
        conn = self._conn
        if conn is not None and conn.is_open:
            conn.close()

    def _fail_all(self, why: str) -> None:
        for batch in set(self._unconfirmed.values()):
            batch.fail(why)
        self._unconfirmed.clear()
        if self._current is not None:
            self._current.fail(why)

    def _send(self, batch: _Batch) -> None:
        channel = self._channel
        if channel is None or not channel.is_open:
            batch.fail("channel closed")
            return
        self._current = batch
        try:
            for exchange, key, body in batch.items:
                self._tag += 1
                self._unconfirmed[self._tag] = batch
                channel.basic_publish(exchange, key, body, batch.properties,
                                      mandatory=batch.mandatory)
        except Exception as exc:
            self._fail_all(f"publish failed: {exc}")

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag, multiple = method.delivery_tag, method.multiple
        nacked = isinstance(method, Basic.Nack)
        if multiple:
            while self._unconfirmed:
                first = next(iter(self._unconfirmed))
                if first > tag:
                    break
                self._confirm(self._unconfirmed.popitem(last=False)[1], nacked)
        else:
            batch = self._unconfirmed.pop(tag, None)
            if batch is not None:
                self._confirm(batch, nacked)

    @staticmethod
    def _confirm(batch: _Batch, nacked: bool) -> None:
        if nacked:
            batch.fail("RabbitMQ refused to store a message (nack)")
        batch.outstanding -= 1
        if batch.outstanding <= 0:
            batch.done.set()

    def _on_return(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        # Only one batch is in flight: a returned message (no queue took it) is one of it.
        if self._current is not None:
            self._current.fail(f"message returned by RabbitMQ: {method.reply_text} "
                               f"(routing key {method.routing_key!r})")
