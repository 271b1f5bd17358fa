"""Baseline throughput of the raw clients Rota builds on, for comparison with Rota's own numbers.

    python -m bench.baselines [--dir DIR] [--messages N] [--writes N]

Starts the local servers with ops.localservers (or reuses them if already up in DIR) and prints
the publish rate of pika with publisher confirms and the sequential write rate of kazoo.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import pika
from kazoo.client import KazooClient

from ops import localservers

MESSAGE_SIZE = 256
ZNODE_SIZE = 64


def pika_publish_rate(amqp_url: str, n: int = 5000, size: int = MESSAGE_SIZE) -> float:
    """Messages/s for ``n`` persistent messages published one by one with publisher confirms.

    Uses a BlockingConnection (each publish waits for its confirm) and a fresh durable queue,
    which is purged and deleted afterwards.
    """
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
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


def zk_write_rate(zk_hosts: str, n: int = 2000, size: int = ZNODE_SIZE) -> float:
    """Writes/s for ``n`` sequential ``set`` calls on one znode (each waits for its reply)."""
    client = KazooClient(hosts=zk_hosts, timeout=10.0)
    client.start(timeout=30.0)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.baselines",
        description="Measure pika publish and kazoo write rates against the local servers.",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=localservers.DEFAULT_DIR,
        help="state directory of the local servers (default: %(default)s/)",
    )
    parser.add_argument("--messages", type=int, default=5000, metavar="N", help="default: 5000")
    parser.add_argument("--writes", type=int, default=2000, metavar="N", help="default: 2000")
    args = parser.parse_args(argv)

    previous = localservers.load(args.dir)
    keep_running = previous is not None and localservers.is_up(previous)
    try:
        servers = localservers.start(args.dir)
    except localservers.ServerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        publish = pika_publish_rate(servers.amqp_url, args.messages)
        label = f"pika: {args.messages} persistent {MESSAGE_SIZE} B publishes, confirmed"
        print(f"{label:<58} {publish:8.0f} msg/s", flush=True)
        writes = zk_write_rate(servers.zk_hosts, args.writes)
        label = f"kazoo: {args.writes} sequential {ZNODE_SIZE} B sets on one znode"
        print(f"{label:<58} {writes:8.0f} writes/s", flush=True)
    finally:
        if not keep_running:
            localservers.stop(servers.state_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
