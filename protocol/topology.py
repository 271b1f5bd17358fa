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

`PERMISSIONS` gives each role's configure, write and read regular expressions (RabbitMQ matches
them against queue and exchange names alike); ops/localservers.py and the compose definitions
set them.
"""

from __future__ import annotations

import functools

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
