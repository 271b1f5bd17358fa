"""Prometheus metrics of a coordinator (served on /metrics by the HTTP adapter).

Labels stay bounded whatever arrives from the network: `service` is only ever a catalogue
service, `node` only a node with a live registration (or named by a ranking threshold),
`role`, `group`, `tenant`, `ranking`, `stat` and `threshold` only names the catalogue
declares. Run outcomes are counted from the leader's own records of runs that ended (never
from a report as such), so a forged or unknown report adds no series.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram, Summary, disable_created_metrics

from coordinator.core.run import Run, RunState

# No `_created` series: a third of every counter's and histogram's lines, which Prometheus
# does not need (it detects counter resets itself).
disable_created_metrics()

LEADER = Gauge("rota_leader", "1 while this coordinator is the leader")
EPOCH = Gauge("rota_epoch", "Fencing epoch of the current leadership term")
NODES = Gauge("rota_nodes_live", "Worker nodes with a live session")
NODES_BY_ROLE = Gauge(
    "rota_nodes_live_by_role", "Worker nodes with a live session holding each catalogue role",
    ["role"],
)
LEDGER_TRANSACTIONS = Counter(
    "rota_ledger_transactions_total", "Ledger transactions committed (ZooKeeper multi-ops)"
)
LEDGER_WRITES = Counter(
    "rota_ledger_writes_total", "Writes in ledger transactions (znodes created, set, deleted)"
)
LEDGER_BYTES = Counter(
    "rota_ledger_bytes_total", "Bytes in ledger transactions (data and paths of znodes written)"
)
LEDGER_COMMIT = Histogram(
    "rota_ledger_commit_seconds", "Time to commit one turn's ledger writes to ZooKeeper",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
TURN = Histogram(
    "rota_turn_seconds", "Time the leader spends on one turn (inbox, slots, ledger, publish)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
DISPATCHED = Counter("rota_orders_dispatched_total", "Run orders published to node queues")
RUNS = Counter(
    "rota_runs_total", "Runs that ended, by service, node (empty if never placed) and outcome",
    ["service", "node", "outcome"],
)
DEAD_LETTERS = Counter(
    "rota_dead_letters_total", "Messages refused and dead-lettered", ["queue", "reason"]
)
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Quantiles come from cluster-wide histograms; per service, only a sum and a count (the mean),
# so that a catalogue of 100,000 services costs two series each, not two histograms each.
LATENESS = Histogram(
    "rota_run_lateness_seconds", "Slot instant to utility start on the worker, all services",
    buckets=_SECONDS,
)
DURATION = Histogram(
    "rota_run_duration_seconds", "Utility start to end on the worker, all services",
    buckets=(0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600),
)
SERVICE_LATENESS = Summary(
    "rota_service_lateness_seconds",
    "Slot instant to utility start on the worker, by service (sum and count)", ["service"],
)
SERVICE_DURATION = Summary(
    "rota_service_duration_seconds", "Utility start to end on the worker, by service "
    "(sum and count)", ["service"],
)
QUEUE_WAIT = Histogram(
    "rota_run_queue_wait_seconds",
    "Queued (slot due or request taken) to dispatched: time spent waiting for run groups or "
    "capacity", buckets=_SECONDS + (300, 900, 3600),
)
WAITING = Gauge(
    "rota_runs_waiting", "Runs waiting now, by what they wait for (run_groups, capacity)",
    ["reason"],
)
OLDEST_WAITING = Gauge(
    "rota_run_oldest_waiting_seconds", "Age of the oldest run waiting for run groups or capacity"
)
GROUPS_HELD = Gauge(
    "rota_run_group_held", "1 while a run or daemon holds the run group", ["group"]
)
DAEMON_EXITS = Counter(
    "rota_daemon_exits_total",
    "Daemon instances that exited on their own (each is restarted with backoff)",
    ["service", "node"],
)

RANK = Gauge(
    "rota_ranking_position",
    "Position of a stat queue in a ranking (1 = first; 0 = not ranked), by the catalogue's "
    "tenant, ranking and stat ids", ["tenant", "ranking", "stat"],
)
NODE_OUT = Gauge(
    "rota_node_out_of_placement",
    "1 while a ranking threshold keeps the node out of placement (nodes named by thresholds)",
    ["node"],
)
RANKING_UPDATES = Counter(
    "rota_ranking_updates_total", "Ranking computations that changed the ranking",
    ["tenant", "ranking"],
)
RANKING_ALERTS = Counter(
    "rota_ranking_alerts_total", "Ranking thresholds that fired or recovered",
    ["tenant", "threshold", "state"],
)


def count_ended(runs: Iterable[Run]) -> None:
    """Count the runs of one turn's records that ended: outcome, lateness, duration, wait.

    A run recorded several times in one turn (queued, then ended) is counted once."""
    seen: set[str] = set()
    for run in runs:
        if not run.state.terminal or run.run_id in seen:
            continue
        seen.add(run.run_id)
        key = (run.service, run.node or "", run.state.value)
        counter = _RUNS_OF.get(key)
        if counter is None:
            counter = _RUNS_OF[key] = RUNS.labels(*key)
        counter.inc()
        if run.started_at is not None:
            timings = _TIMINGS_OF.get(run.service)
            if timings is None:
                timings = _TIMINGS_OF[run.service] = (SERVICE_LATENESS.labels(run.service),
                                                      SERVICE_DURATION.labels(run.service))
            if run.slot is not None and run.state is not RunState.REJECTED:
                late = max(0.0, run.started_at - run.slot)
                LATENESS.observe(late)
                timings[0].observe(late)
            if run.finished_at is not None:
                took = max(0.0, run.finished_at - run.started_at)
                DURATION.observe(took)
                timings[1].observe(took)
        if run.dispatched_at is not None:
            QUEUE_WAIT.observe(max(0.0, run.dispatched_at - run.queued_at))


# The children of the per-run series, looked up once each (`labels` checks and locks every
# call). These series are never cleared, so a cached child stays the registered one.
_RUNS_OF: dict[tuple[str, str, str], Counter] = {}
_TIMINGS_OF: dict[str, tuple[Summary, Summary]] = {}


def show_state(
    *, roles: Iterable[str], groups: Iterable[str], live_roles: Iterable[frozenset[str]],
    held: set[str], waiting_for_groups: int, waiting_for_capacity: int, oldest_wait: float,
) -> None:
    """Set the gauges that describe the leader's state now."""
    live = list(live_roles)
    for role in roles:
        NODES_BY_ROLE.labels(role).set(sum(1 for r in live if role in r))
    for group in groups:
        GROUPS_HELD.labels(group).set(1 if group in held else 0)
    WAITING.labels("run_groups").set(waiting_for_groups)
    WAITING.labels("capacity").set(waiting_for_capacity)
    OLDEST_WAITING.set(oldest_wait)


def forget_state() -> None:
    """Drop the state gauges when this coordinator stops leading: only the leader reports
    them, so a standby never shows a state it no longer knows."""
    for gauge in (NODES_BY_ROLE, GROUPS_HELD, WAITING, RANK, NODE_OUT):
        gauge.clear()
    OLDEST_WAITING.set(0)
