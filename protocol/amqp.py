"""Batches published to RabbitMQ with publisher confirms, streamed and waited for once.

`ConfirmPublisher.publish` hands a whole batch to a pika `SelectConnection` running on an I/O
thread of its own, which streams every message of it on a channel in confirm mode; the call
returns once RabbitMQ has confirmed the last one (for persistent messages on durable queues:
once it has stored them). A negative confirm, a returned message (with `mandatory`), a lost
connection or no confirm within `timeout` raises: maybe none of the batch was stored, and the
caller publishes it again. One batch is in flight at a time per publisher.

pika's `BlockingConnection` in confirm mode waits for each message's confirm before sending the
next one; this publisher pays that round trip once per batch instead.

Every AMQP URL Rota takes (`--amqp`, ROTA_AMQP_URL, the per-role URLs) may name several nodes of
one RabbitMQ cluster, separated by ";" (dramatiq's convention). `parameters(urls)` turns such a
string into pika connection parameters, refusing a malformed URL by its position and host;
every connection Rota opens goes through it. A `BlockingConnection` given the list tries each
node in turn; `ConfirmPublisher` does the same for its `SelectConnection`, starting from the
node that worked last.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import pika
from pika.spec import Basic

log = logging.getLogger("rota.transport")

SEPARATOR = ";"
"""Between the URLs of several nodes of one cluster in one string (dramatiq's convention)."""


class AmqpUrlError(ValueError):
    """An AMQP URL Rota cannot use; the message says which one (never its password)."""


def split_urls(urls: str) -> list[str]:
    """The URLs in `urls` (one, or several separated by ";"), stripped of spaces."""
    return [part.strip() for part in urls.split(SEPARATOR)]


def redact(url: str) -> str:
    """`url` without its password, fit for logs and error messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        return parts._replace(netloc=f"{user}:***@{netloc}").geturl()
    except ValueError:
        return "<unparseable URL>"


def parameters(urls: str) -> list[pika.URLParameters]:
    """pika connection parameters for each URL in `urls` (one, or several separated by ";",
    each a node of the same cluster), in order; `AmqpUrlError` names a malformed one."""
    found = split_urls(urls)
    out: list[pika.URLParameters] = []
    for n, url in enumerate(found, 1):
        which = f"AMQP URL {n} of {len(found)}" if len(found) > 1 else "AMQP URL"
        if not url:
            raise AmqpUrlError(f"{which} is empty (several URLs are separated by "
                               f"{SEPARATOR!r}: amqp://host-a:5672/vhost;amqp://host-b:5672/vhost)")
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError as exc:
            raise AmqpUrlError(f"{which} {redact(url)!r} is malformed: {exc}") from None
        if parts.scheme not in ("amqp", "amqps"):
            raise AmqpUrlError(f"{which} {redact(url)!r} must start with amqp:// or amqps://")
        if not parts.hostname:
            raise AmqpUrlError(f"{which} {redact(url)!r} names no host")
        try:
            out.append(pika.URLParameters(url))
        except Exception as exc:
            raise AmqpUrlError(f"{which} {redact(url)!r} is refused by pika: {exc}") from None
    return out


def hosts(urls: str) -> str:
    """The host:port of each URL in `urls`, for messages ("a:5672, b:5672")."""
    out = []
    for url in split_urls(urls):
        try:
            parts = urlsplit(url)
            port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
            out.append(f"{parts.hostname}:{port}")
        except ValueError:
            out.append(redact(url))
    return ", ".join(out)


def _where(params: pika.connection.Parameters) -> str:
    return f"{params.host}:{params.port}"

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
    """Publishes batches over one connection of its own, reopened after any failure.

    With several nodes' parameters, a connection that cannot be opened is tried on the next
    node, round-robin, until one opens or each has failed once (then `publish` raises and the
    caller's retry policy applies); a connection that opens stays on its node."""

    def __init__(self,
                 parameters: pika.connection.Parameters | Sequence[pika.connection.Parameters],
                 *, timeout: float = 30.0, name: str = "amqp-publisher") -> None:
        self.parameters = (list(parameters) if isinstance(parameters, Sequence)
                           else [parameters])
        if not self.parameters:
            raise ValueError("ConfirmPublisher needs the parameters of at least one node")
        self._next = 0  # the node tried first: the one that opened last
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
        failures: list[str] = []
        for _ in range(len(self.parameters)):
            params = self.parameters[self._next]
            try:
                return self._open_on(params)
            except PublishError as exc:
                failures.append(f"{_where(params)}: {exc}")
                self._next = (self._next + 1) % len(self.parameters)
                if len(self.parameters) > 1:
                    log.warning("%s: cannot open a confirm channel on %s (%s); trying the next "
                                "node", self.name, _where(params), exc)
        nodes = "" if len(failures) == 1 else f" on any of {len(failures)} nodes"
        raise PublishError(f"cannot open a confirm channel{nodes}: {'; '.join(failures)}")

    def _open_on(self, params: pika.connection.Parameters) -> Any:
        """A connection to one node with a channel in confirm mode; `PublishError` if not."""
        self._ready.clear()
        self._open_error = None
        self._tag = 0
        self._unconfirmed.clear()
        conn = pika.SelectConnection(
            params, on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error, on_close_callback=self._on_closed,
        )
        self._conn = conn
        self._thread = threading.Thread(target=conn.ioloop.start, name=self.name, daemon=True)
        self._thread.start()
        if not self._ready.wait(self.timeout) or self._open_error is not None:
            why = self._open_error or f"not open within {self.timeout:g} s"
            self._shut()
            raise PublishError(why)
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
