"""Prometheus metrics of a worker node, each labelled with the node (several nodes may share
one process, as in the embedded cluster); other labels take a fixed set of values."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, disable_created_metrics

disable_created_metrics()  # no `_created` series (see coordinator/metrics.py)

RUNS = Counter(
    "rota_worker_runs_total", "Runs executed on this node by outcome", ["node", "outcome"]
)
REJECTED = Counter(
    "rota_worker_orders_rejected_total", "Orders this node refused, by reason", ["node", "reason"]
)
DUPLICATES = Counter(
    "rota_worker_duplicate_orders_total", "Re-sent orders ignored by run id", ["node"]
)
SUPERSEDED = Counter(
    "rota_worker_held_orders_superseded_total",
    "Orders held for their start instant whose leader was superseded before it (not started; "
    "the current leader sends them again)",
    ["node"],
)
DEAD_LETTERS = Counter(
    "rota_worker_dead_letters_total", "Malformed messages dead-lettered by this node",
    ["node", "reason"],
)
OUTBOX = Gauge(
    "rota_worker_outbox_events", "Run events waiting to be published to rota.results", ["node"]
)
OUTBOX_FULL = Counter(
    "rota_worker_outbox_full_total",
    "Times a run event had to wait for room in the full outbox (RabbitMQ unreachable)",
    ["node"],
)
BAD_REPORTS = Counter(
    "rota_worker_bad_reports_total",
    "Run events carrying a value that cannot be sent (the run is reported failed instead)",
    ["node"],
)
