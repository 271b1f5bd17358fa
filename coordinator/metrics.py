"""Prometheus metrics of a coordinator (served on /metrics by the HTTP adapter)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LEADER = Gauge("rota_leader", "1 while this coordinator is the leader")
EPOCH = Gauge("rota_epoch", "Fencing epoch of the current leadership term")
NODES = Gauge("rota_nodes_live", "Worker nodes with a live session")
LEDGER_TRANSACTIONS = Counter(
    "rota_ledger_transactions_total", "Ledger transactions committed (ZooKeeper multi-ops)"
)
LEDGER_WRITES = Counter(
    "rota_ledger_writes_total", "Writes in ledger transactions (znodes created, set, deleted)"
)
LEDGER_BYTES = Counter(
    "rota_ledger_bytes_total", "Bytes in ledger transactions (data and paths of znodes written)"
)
DISPATCHED = Counter("rota_orders_dispatched_total", "Run orders published to node queues")
RUNS = Counter("rota_runs_total", "Finished runs by service and outcome", ["service", "outcome"])
DEAD_LETTERS = Counter(
    "rota_dead_letters_total", "Messages refused and dead-lettered", ["queue", "reason"]
)
LATENESS = Histogram(
    "rota_run_lateness_seconds",
    "Slot instant to utility start on the worker",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
