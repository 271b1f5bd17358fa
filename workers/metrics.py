"""Prometheus metrics of a worker node."""

from __future__ import annotations

from prometheus_client import Counter

RUNS = Counter("rota_worker_runs_total", "Runs executed on this node by outcome", ["outcome"])
REJECTED = Counter(
    "rota_worker_orders_rejected_total", "Orders this node refused, by reason", ["reason"]
)
DUPLICATES = Counter("rota_worker_duplicate_orders_total", "Re-sent orders ignored by run id")
DEAD_LETTERS = Counter(
    "rota_worker_dead_letters_total", "Malformed messages dead-lettered by this node", ["reason"]
)
