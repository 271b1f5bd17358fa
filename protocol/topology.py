"""Rota's RabbitMQ topology, and what each role may do on it.

Nothing is published through the default exchange: RabbitMQ checks `basic.publish` against the
exchange only, and write access to the default exchange (`amq.default`) would let a user put a
message on any queue. Each queue is fed by an exchange of its own instead, with the queue's name
as routing key, and each role gets write access to the exchanges of what it may send:

| exchange (direct)    | feeds                    | bound by     | written by            |
|----------------------|--------------------------|--------------|-----------------------|
| `rota.x.orders`      | `rota.node.<id>`         | coordinator  | coordinator           |
| `rota.x.results`     | `rota.results`           | coordinator  | worker                |
| `rota.x.requests`    | `rota.requests`          | coordinator  | operator, coordinator |
| `rota.x.deadletter`  | `rota.deadletter`        | coordinator  | coordinator, worker   |
| `rota.x.unreadable`  | `<queue>.XQ`             | coordinator  | RabbitMQ (dead-lettering) |

`rota.events` (topic) carries run records and service changes from the leader; the streams
`rota.history` and `rota.changes` are bound to it. Only the coordinator declares exchanges and
binds queues; it declares and binds each node queue (and its `.XQ`, where RabbitMQ sets aside
envelopes the transport could not decode) before its first order to it. A worker declares its
own node queue, to consume it, and binds nothing. Queues dead-letter to `rota.x.unreadable`,
so that declaring them needs no access to the default exchange either (RabbitMQ asks the
declarer for write access to the dead-letter exchange).

Every queue Rota declares for messages is a quorum queue (`queue_arguments`,
`dead_queue_arguments`): replicated on the nodes of a RabbitMQ cluster (three by default,
RabbitMQ's `quorum_cluster_size`), so that losing one node loses no order, report or request.
A message a consumer takes and gives back (its connection closed, its process killed, a requeue)
more than `DELIVERY_LIMIT` times is dead-lettered to its `.XQ` like an undecodable envelope.
The history streams are replicated by nature (`coordinator/adapters/history.py`).

`PERMISSIONS` gives each role's configure, write and read regular expressions (RabbitMQ matches
them against queue and exchange names alike); ops/localservers.py and the compose definitions
set them.
"""

from __future__ import annotations

import functools
import os
from typing import Any

ORDERS_EXCHANGE = "rota.x.orders"
RESULTS_EXCHANGE = "rota.x.results"
REQUESTS_EXCHANGE = "rota.x.requests"
DEAD_EXCHANGE = "rota.x.deadletter"
UNREADABLE_EXCHANGE = "rota.x.unreadable"
EXCHANGES = (ORDERS_EXCHANGE, RESULTS_EXCHANGE, REQUESTS_EXCHANGE, DEAD_EXCHANGE,
             UNREADABLE_EXCHANGE)
"""Rota's direct exchanges, declared by the coordinator."""

NODE_PREFIX = "rota.node."
_FED_BY = {
    "rota.results": RESULTS_EXCHANGE,
    "rota.requests": REQUESTS_EXCHANGE,
    "rota.deadletter": DEAD_EXCHANGE,
}

DELIVERY_LIMIT = 10
"""Times a message may be given back to its queue (a consumer's connection closed before the
ack, a process killed while holding it, a requeue) before RabbitMQ dead-letters it to its
`.XQ`: delivered at most 11 times. A message that kills whoever takes it (a report that crashes
each leader in turn) stops after that many restarts instead of forever; an innocent message
given back by failovers (each leader killed with reports unacknowledged, a worker's connection
lost with orders prefetched, a RabbitMQ node gone) never comes near it in practice. It is part
of the queue's definition: RabbitMQ refuses to declare an existing queue with another value, so
change it with a policy (`delivery-limit`), not here."""
DEAD_LETTER_STRATEGY = "at-least-once"
"""RabbitMQ keeps a dead-lettered message in its quorum queue until the `.XQ` has confirmed it
(at-most-once, the default, drops it when it cannot be routed, e.g. to a worker's node queue
whose `.XQ` the coordinator has not bound yet): a poison message is evidence to keep."""
OVERFLOW = "reject-publish"
"""What at-least-once dead-lettering needs (no `drop-head`). Rota sets no length limit, so it
only matters under an operator's `max-length` policy: publishers are refused (and retry)
instead of the oldest messages being dropped."""
DEAD_MESSAGE_TTL = int(os.getenv("dramatiq_dead_message_ttl", 86400000 * 7))
"""How long a `.XQ` keeps a message, in milliseconds (dramatiq's setting: a week)."""


def queue_arguments(queue: str) -> dict[str, Any]:
    """The arguments of `queue` (and of the `.DQ` dramatiq declares beside it): a quorum queue
    dead-lettering to its `.XQ` through `rota.x.unreadable` after `DELIVERY_LIMIT` returns."""
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": UNREADABLE_EXCHANGE,
        "x-dead-letter-routing-key": dead_queue(queue),
        "x-dead-letter-strategy": DEAD_LETTER_STRATEGY,
        "x-overflow": OVERFLOW,
        "x-delivery-limit": DELIVERY_LIMIT,
    }


def dead_queue_arguments() -> dict[str, Any]:
    """The arguments of a `.XQ`: a quorum queue whose messages expire after a week. It has no
    delivery limit (it would drop what an operator reads and gives back) and dead-letters
    nothing."""
    return {"x-queue-type": "quorum", "x-message-ttl": DEAD_MESSAGE_TTL}


def dead_queue(queue: str) -> str:
    """The `.XQ` beside `queue` (dramatiq's `xq_name`)."""
    for suffix in (".DQ", ".XQ"):
        if queue.endswith(suffix):
            queue = queue[: -len(suffix)]
    return queue + ".XQ"


COORDINATOR = "coordinator"
WORKER = "worker"
OPERATOR = "operator"
ROLES = (COORDINATOR, WORKER, OPERATOR)


@functools.lru_cache(maxsize=4096)
def exchange_for(queue: str) -> str:
    """The exchange that feeds `queue` (routing key: the queue's name); "" (the default
    exchange) for a queue that is not Rota's."""
    if queue.startswith(NODE_PREFIX):
        return ORDERS_EXCHANGE
    return _FED_BY.get(queue, "")


def declares_topology(role: str | None) -> bool:
    """Whether `role` declares the exchanges and binds queues to them (None: a process with
    every right, such as the embedded cluster on a real broker)."""
    return role is None or role == COORDINATOR


_SHARED = r"rota\.(results|requests|deadletter)(\.DQ|\.XQ)?"
_STREAMS = r"rota\.(history|changes)"
_NODE = r"rota\.node\..+"

PERMISSIONS: dict[str, tuple[str, str, str]] = {
    # The leader declares every exchange, its input queues, the history and change-log
    # streams and the node queues it dispatches to (so that an order waits in the queue of a
    # node that has not consumed yet), and binds them. It reads results and requests, and the
    # streams (its HTTP API answers from them).
    COORDINATOR: (
        rf"^(rota\.x\..+|rota\.events|{_STREAMS}|{_SHARED}|{_NODE})$",
        rf"^(rota\.x\.(orders|requests|deadletter|unreadable)|rota\.events|{_STREAMS}"
        rf"|{_SHARED}|{_NODE})$",
        rf"^(rota\.x\..+|rota\.events|{_STREAMS}|{_SHARED}|{_NODE})$",
    ),
    # A worker declares and reads node queues and binds nothing; it publishes results and
    # dead letters, and names rota.x.unreadable as its queue's dead-letter exchange.
    WORKER: (
        rf"^{_NODE}$",
        r"^rota\.x\.(results|deadletter|unreadable)$",
        rf"^{_NODE}$",
    ),
    # An operator publishes manual-run and edit requests (`rota run/set --amqp`), nothing
    # else: it follows runs and reads history through a coordinator's HTTP API.
    OPERATOR: (r"^$", r"^rota\.x\.requests$", r"^$"),
}
"""Role -> (configure, write, read) regular expressions for RabbitMQ's set_permissions."""
