"""Baseline throughput of the raw clients Rota builds on, for comparison with Rota's own numbers.

    python -m bench.baselines [--dir DIR] [--quick]

Starts the local servers with ops.localservers (or reuses them if already up in DIR) and prints
what pika and kazoo do alone on them: persistent publishes with a confirm each, with confirms
per batch and in AMQP transactions per batch; consume with an ack each; sequential and
pipelined ZooKeeper writes; multi-op ZooKeeper transactions. `python -m bench.cluster` measures
the same in its own run, beside Rota's figures.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
from kazoo.client import KazooClient

from ops import localservers
from protocol.amqp import parameters

MESSAGE_SIZE = 256
ZNODE_SIZE = 64


def pika_publish_rate(amqp_url: str, n: int = 5000, size: int = MESSAGE_SIZE) -> float:
    """Messages/s for ``n`` persistent messages published one by one with publisher confirms.

    Uses a BlockingConnection (each publish waits for its confirm) and a fresh durable queue,
    which is purged and deleted afterwards.
    """
    connection = pika.BlockingConnection(parameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        queue = f"bench-baseline-{uuid.uuid4().hex[:8]}"
        channel.queue_declare(queue, durable=True)
        properties = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
        body = b"x" * size
        try:
            for _ in range(min(100, n)):  # warm-up, not measured
                channel.basic_publish("", queue, body, properties)
            began = time.perf_counter()
            for _ in range(n):
                channel.basic_publish("", queue, body, properties)
            elapsed = time.perf_counter() - began
        finally:
            channel.queue_purge(queue)
            channel.queue_delete(queue)
    finally:
        if connection.is_open:
            connection.close()
    return n / elapsed


def pika_batch_confirm_rate(
    amqp_url: str, n: int = 5000, batch: int = 100, size: int = MESSAGE_SIZE
) -> float:
    """Messages/s for ``n`` persistent messages published in batches of ``batch``, each batch
    waiting for all its publisher confirms before the next is published.

    Uses pika's asynchronous SelectConnection, which streams the publishes of a batch and
    receives their confirms (RabbitMQ acknowledges several at once with ``multiple``). One
    batch before the measured ones warms up the channel.
    """
    queue = f"bench-baseline-{uuid.uuid4().hex[:8]}"
    body = b"x" * size
    properties = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
    total = n + batch
    outstanding: set[int] = set()
    sent = 0
    began = ended = 0.0
    errors: list[str] = []
    channel_box: list[Any] = []
    connection: pika.SelectConnection

    def on_open(conn: pika.SelectConnection) -> None:
        conn.channel(on_open_callback=on_channel)

    def on_channel(ch: Any) -> None:
        channel_box.append(ch)
        ch.confirm_delivery(on_confirm, callback=lambda _frame: ch.queue_declare(
            queue, durable=True, callback=lambda _f: publish_batch()))

    def publish_batch() -> None:
        nonlocal sent
        ch = channel_box[0]
        for _ in range(min(batch, total - sent)):
            ch.basic_publish("", queue, body, properties)
            sent += 1
            outstanding.add(sent)

    def on_confirm(frame: Any) -> None:
        nonlocal began, ended
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            errors.append(f"publish {method.delivery_tag} nacked")
        tag = method.delivery_tag
        if method.multiple:
            outstanding.difference_update([t for t in outstanding if t <= tag])
        else:
            outstanding.discard(tag)
        if outstanding:
            return
        if sent == batch:  # the warm-up batch is confirmed: measure from here
            began = time.perf_counter()
        if sent < total:
            publish_batch()
            return
        ended = time.perf_counter()
        ch = channel_box[0]
        ch.queue_delete(queue, callback=lambda _f: connection.close())

    def give_up(reason: str) -> None:
        errors.append(reason)
        connection.ioloop.stop()

    connected = False

    def opened(conn: pika.SelectConnection) -> None:
        nonlocal connected
        connected = True
        on_open(conn)

    # Several nodes' URLs: the first node that accepts the connection, tried in turn.
    nodes = parameters(amqp_url)
    for tried, params in enumerate(nodes, 1):
        connected = False
        errors.clear()
        where = f"{params.host}:{params.port}"
        connection = pika.SelectConnection(
            params, on_open_callback=opened,
            on_open_error_callback=lambda _c, exc, where=where: give_up(
                f"cannot connect to {where}: {exc!r}"),
            on_close_callback=lambda conn, _reason: conn.ioloop.stop(),
        )
        connection.ioloop.call_later(300, lambda: give_up("no confirms within 300 s"))
        connection.ioloop.start()
        if connected or tried == len(nodes):
            break
    if errors:
        raise RuntimeError("; ".join(errors))
    return n / (ended - began)


def pika_tx_rate(amqp_url: str, n: int = 5000, batch: int = 100,
                 size: int = MESSAGE_SIZE) -> float:
    """Messages/s for ``n`` persistent messages published in AMQP transactions of ``batch``
    (``tx.select`` once, then ``batch`` publishes and a ``tx.commit`` that waits for the broker).
    """
    connection = pika.BlockingConnection(parameters(amqp_url))
    try:
        channel = connection.channel()
        queue = f"bench-baseline-{uuid.uuid4().hex[:8]}"
        channel.queue_declare(queue, durable=True)
        channel.tx_select()
        properties = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
        body = b"x" * size
        try:
            for _ in range(batch):  # warm-up, not measured
                channel.basic_publish("", queue, body, properties)
            channel.tx_commit()
            began = time.perf_counter()
            sent = 0
            while sent < n:
                k = min(batch, n - sent)
                for _ in range(k):
                    channel.basic_publish("", queue, body, properties)
                channel.tx_commit()
                sent += k
            elapsed = time.perf_counter() - began
        finally:
            channel.queue_delete(queue)
            channel.tx_commit()
    finally:
        if connection.is_open:
            connection.close()
    return n / elapsed


def pika_consume_ack_rate(amqp_url: str, n: int = 5000, prefetch: int = 100,
                          size: int = MESSAGE_SIZE) -> float:
    """Messages/s consumed from a durable queue holding ``n`` persistent messages, each
    acknowledged on its own (prefetch ``prefetch``); from the first delivery to the last ack.
    """
    connection = pika.BlockingConnection(parameters(amqp_url))
    try:
        channel = connection.channel()
        queue = f"bench-baseline-{uuid.uuid4().hex[:8]}"
        channel.queue_declare(queue, durable=True)
        properties = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
        body = b"x" * size
        try:
            channel.tx_select()
            for i in range(n):
                channel.basic_publish("", queue, body, properties)
                if i % 500 == 499:
                    channel.tx_commit()
            channel.tx_commit()
            consumer = connection.channel()
            consumer.basic_qos(prefetch_count=prefetch)
            got = 0
            began = 0.0
            for method, _props, _body in consumer.consume(queue, inactivity_timeout=10):
                if method is None:
                    raise RuntimeError(f"only {got} of {n} messages arrived")
                if got == 0:
                    began = time.perf_counter()
                consumer.basic_ack(method.delivery_tag)
                got += 1
                if got == n:
                    break
            elapsed = time.perf_counter() - began
            consumer.cancel()
        finally:
            channel.queue_delete(queue)
            channel.tx_commit()
    finally:
        if connection.is_open:
            connection.close()
    return (n - 1) / elapsed if elapsed > 0 else float("nan")


def _kazoo(zk_hosts: str) -> KazooClient:
    client = KazooClient(hosts=zk_hosts, timeout=10.0)
    client.start(timeout=30.0)
    return client


def zk_write_rate(zk_hosts: str, n: int = 2000, size: int = ZNODE_SIZE) -> float:
    """Writes/s for ``n`` sequential ``set`` calls on one znode (each waits for its reply)."""
    client = _kazoo(zk_hosts)
    path = f"/bench-baseline-{uuid.uuid4().hex[:8]}"
    try:
        client.create(path, b"")
        payload = b"x" * size
        try:
            for _ in range(min(100, n)):  # warm-up, not measured
                client.set(path, payload)
            began = time.perf_counter()
            for _ in range(n):
                client.set(path, payload)
            elapsed = time.perf_counter() - began
        finally:
            client.delete(path)
    finally:
        client.stop()
        client.close()
    return n / elapsed


def zk_pipelined_write_rate(zk_hosts: str, n: int = 5000, window: int = 500,
                            size: int = ZNODE_SIZE) -> float:
    """Writes/s for ``n`` ``set`` calls on one znode sent asynchronously, up to ``window``
    in flight: the server's write throughput rather than one round trip per write."""
    client = _kazoo(zk_hosts)
    path = f"/bench-baseline-{uuid.uuid4().hex[:8]}"
    try:
        client.create(path, b"")
        payload = b"x" * size
        try:
            for _ in range(100):  # warm-up, not measured
                client.set(path, payload)
            began = time.perf_counter()
            sent = 0
            while sent < n:
                k = min(window, n - sent)
                pending = [client.set_async(path, payload) for _ in range(k)]
                for result in pending:
                    result.get(timeout=30)
                sent += k
            elapsed = time.perf_counter() - began
        finally:
            client.delete(path)
    finally:
        client.stop()
        client.close()
    return n / elapsed


def zk_multi_commit_rate(zk_hosts: str, commits: int = 200, ops: int = 100,
                         size: int = ZNODE_SIZE) -> float:
    """Commits/s of multi-op transactions, each setting ``ops`` distinct znodes of ``size``
    bytes (one ZooKeeper transaction each, applied all or nothing), one after another."""
    client = _kazoo(zk_hosts)
    root = f"/bench-baseline-{uuid.uuid4().hex[:8]}"
    try:
        paths = [f"{root}/k{i:04d}" for i in range(ops)]
        client.create(root, b"")
        for path in paths:
            client.create(path, b"")
        payload = b"x" * size

        def commit() -> None:
            tx = client.transaction()
            for path in paths:
                tx.set_data(path, payload)
            results = tx.commit()
            if any(isinstance(r, Exception) for r in results):
                raise RuntimeError(f"multi-op commit failed: {results[:3]}")

        try:
            for _ in range(min(20, commits)):  # warm-up, not measured
                commit()
            began = time.perf_counter()
            for _ in range(commits):
                commit()
            elapsed = time.perf_counter() - began
        finally:
            client.delete(root, recursive=True)
    finally:
        client.stop()
        client.close()
    return commits / elapsed


BATCH = 100
MULTI_OPS = 100


@dataclass(frozen=True)
class Baseline:
    key: str
    label: str
    value: float
    unit: str


def measure(
    amqp_url: str, zk_hosts: str, quick: bool = False,
    report: Callable[[Baseline], None] | None = None,
) -> dict[str, Baseline]:
    """Every baseline, by key; ``report`` is called with each as soon as it is measured."""
    n = 2000 if quick else 5000
    writes = 1000 if quick else 2000
    commits = 100 if quick else 200
    plan: list[tuple[str, str, str, Callable[[], float]]] = [
        ("publish_each", f"pika: {n} persistent {MESSAGE_SIZE} B publishes, each confirmed",
         "msg/s", lambda: pika_publish_rate(amqp_url, n)),
        ("publish_batch", f"pika: the same, confirms awaited per batch of {BATCH}",
         "msg/s", lambda: pika_batch_confirm_rate(amqp_url, n, BATCH)),
        ("publish_tx", f"pika: the same, one AMQP transaction per batch of {BATCH}",
         "msg/s", lambda: pika_tx_rate(amqp_url, n, BATCH)),
        ("consume_ack", f"pika: consume {n} persistent messages, an ack each",
         "msg/s", lambda: pika_consume_ack_rate(amqp_url, n)),
        ("zk_write", f"kazoo: {writes} sequential {ZNODE_SIZE} B sets on one znode",
         "writes/s", lambda: zk_write_rate(zk_hosts, writes)),
        ("zk_pipelined", f"kazoo: {n} {ZNODE_SIZE} B sets, up to 500 in flight",
         "writes/s", lambda: zk_pipelined_write_rate(zk_hosts, n)),
        ("zk_multi", f"kazoo: {commits} multi-op commits of {MULTI_OPS} sets each",
         "commits/s", lambda: zk_multi_commit_rate(zk_hosts, commits, MULTI_OPS)),
    ]
    out: dict[str, Baseline] = {}
    for key, label, unit, run in plan:
        result = Baseline(key, label, run(), unit)
        out[key] = result
        if report is not None:
            report(result)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.baselines",
        description="Measure what pika and kazoo do alone against the local servers.",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=localservers.DEFAULT_DIR,
        help="state directory of the local servers (default: %(default)s/)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer messages and writes")
    args = parser.parse_args(argv)

    previous = localservers.load(args.dir)
    keep_running = previous is not None and localservers.is_up(previous)
    try:
        servers = localservers.start(args.dir)
    except localservers.ServerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        measure(servers.amqp_url, servers.zk_hosts, args.quick,
                lambda b: print(f"{b.label:<62} {b.value:9,.0f} {b.unit}", flush=True))
    finally:
        if not keep_running:
            localservers.stop(servers.state_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
