"""Publishing a batch so that RabbitMQ has stored all of it: AMQP transactions against
publisher confirms (per message, and streamed per batch).

    python -m bench.publish_modes [--amqp URL] [--sizes 1,10,100,1000] [--rounds 2]

For each batch size it publishes persistent 256-byte messages to a fresh durable queue in
three ways and prints messages/s (the best of `--rounds` rounds, modes interleaved):
- `tx`: one AMQP transaction per batch (`tx_select` once, publish the batch, `tx_commit`);
- `confirm each`: pika's `BlockingConnection` in confirm mode, which waits for each
  message's confirm before the next;
- `confirm batch`: `protocol.amqp.ConfirmPublisher`, which streams the batch and waits once
  for all of its confirms.
All three give the same guarantee: when the call returns, every message of the batch is stored.
The URL defaults to `ROTA_AMQP_URL` (see `python -m ops.localservers env`); the URLs of
several nodes of one cluster, joined by ";", are tried in turn.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence

import pika

from protocol.amqp import ConfirmPublisher, parameters

MESSAGE_SIZE = 256
PROPS = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
Publish = Callable[[list[tuple[str, str, bytes]]], None]
Nodes = list[pika.URLParameters]
"""The parameters of each node named by the URL (several nodes' URLs joined by ";")."""


def _tx(params: Nodes) -> tuple[Publish, Callable[[], None]]:
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.tx_select()

    def publish(batch: list[tuple[str, str, bytes]]) -> None:
        for exchange, key, body in batch:
            ch.basic_publish(exchange, key, body, PROPS)
        ch.tx_commit()

    return publish, conn.close


def _confirm_each(params: Nodes) -> tuple[Publish, Callable[[], None]]:
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.confirm_delivery()

    def publish(batch: list[tuple[str, str, bytes]]) -> None:
        for exchange, key, body in batch:
            ch.basic_publish(exchange, key, body, PROPS, mandatory=True)

    return publish, conn.close


def _confirm_batch(params: Nodes) -> tuple[Publish, Callable[[], None]]:
    publisher = ConfirmPublisher(params, name="bench-confirm")

    def publish(batch: list[tuple[str, str, bytes]]) -> None:
        publisher.publish(batch, PROPS, mandatory=True)

    return publish, publisher.close


MODES: dict[str, Callable[[Nodes], tuple[Publish, Callable[[], None]]]] = {
    "tx": _tx, "confirm each": _confirm_each, "confirm batch": _confirm_batch,
}


def rate(params: Nodes, mode: str, queue: str, size: int, total: int) -> float:
    publish, close = MODES[mode](params)
    body = b"x" * MESSAGE_SIZE
    batch = [("", queue, body)] * size
    try:
        publish(batch)  # warm-up, not measured
        batches = max(1, total // size)
        began = time.perf_counter()
        for _ in range(batches):
            publish(batch)
        return batches * size / (time.perf_counter() - began)
    finally:
        close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.publish_modes",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--amqp", default=os.environ.get("ROTA_AMQP_URL"))
    parser.add_argument("--sizes", default="1,10,100,1000")
    parser.add_argument("--messages", type=int, default=2000,
                        help="messages per measurement (at least 5 batches); default 2000")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if not args.amqp:
        print("error: give --amqp or set ROTA_AMQP_URL", file=sys.stderr)
        return 2
    params = parameters(args.amqp)
    queue = f"bench-publish-{uuid.uuid4().hex[:8]}"
    setup = pika.BlockingConnection(params)
    ch = setup.channel()
    ch.queue_declare(queue, durable=True)
    try:
        print(f"{'batch':>6} " + " ".join(f"{m:>15}" for m in MODES) + "   (msgs/s, best of "
              f"{args.rounds})", flush=True)
        for size in (int(s) for s in args.sizes.split(",")):
            best = dict.fromkeys(MODES, 0.0)
            for _ in range(args.rounds):
                for mode in MODES:
                    total = max(args.messages, 5 * size)
                    best[mode] = max(best[mode], rate(params, mode, queue, size, total))
                    ch.queue_purge(queue)
            print(f"{size:>6} " + " ".join(f"{best[m]:>15.0f}" for m in MODES), flush=True)
    finally:
        ch.queue_delete(queue)
        setup.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
