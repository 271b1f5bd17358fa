"""What the ledger costs ZooKeeper under churn, and how fast a successor loads it.

    python -m bench.ledger [--only churn-1500,churn-100k] [--turns 600]

Needs ZooKeeper (`ROTA_ZK`; each scenario gets a fresh chroot, removed afterwards). The
ledger's own code (`coordinator.ledger.Ledger` turning engine changes into writes, and the
`ZkTerm` committing them) is driven by synthetic leader turns, without RabbitMQ or workers:

- **churn-1500**: 1,500 services, 75 of them firing per turn (20 turns a second is 1,500 runs/s,
  the cluster bench's throughput scenario): each turn sets their cursors and last-run times,
  dispatches a run for each, and ends the runs dispatched two turns earlier (deleted from the
  active runs, kept among the recently ended).
- **churn-100k**: 100,000 services (10% with overrides, 1,000 active runs kept throughout),
  100 of them firing per turn; then a successor loads the ledger (the 1 s target).

Printed per scenario: request bytes written per turn (mean, p50, max) and per run, ZooKeeper
transactions and znode writes per turn, the largest sum of bytes over any 500 consecutive
transactions (ZooKeeper keeps the last 500 committed proposals in memory: this is what the
ledger adds to its heap), commit wall time per turn, and the successor's load and
load + restore times. Bytes are counted at the kazoo client (data and path of every create and
set of a transaction), so the figure does not depend on how the term counts.
"""

from __future__ import annotations

import argparse
import gc
import os
import queue
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kazoo.client import KazooClient, TransactionRequest
from kazoo.protocol.serialization import Create, SetData

from coordinator.core.actions import Changes
from coordinator.core.run import Run, RunState, Trigger
from coordinator.ledger import Ledger
from protocol.coordination import Term
from protocol.zk import ZkCoordination

ZK_MEMORY_PROPOSALS = 500  # ZooKeeper's commitLogCount default


def line(label: str, value: str) -> None:
    print(f"    {label:<58} {value}", flush=True)


@dataclass
class Counted:
    """Bytes of each ledger transaction, as the kazoo client sends them."""

    sizes: list[int] = field(default_factory=list)

    def hook(self, client: KazooClient) -> None:
        sizes = self.sizes

        class Tx(TransactionRequest):  # type: ignore[misc]
            def commit_async(self) -> Any:
                size = 0
                for op in self.operations:
                    if isinstance(op, Create | SetData):
                        size += len(op.path) + len(op.data or b"")
                sizes.append(size)
                return super().commit_async()

        client.transaction = lambda: Tx(client)  # type: ignore[method-assign]


class Leadership:
    """One contender on a chroot; `term()` hands over its next term."""

    def __init__(self, hosts: str) -> None:
        self.coord = ZkCoordination(hosts, identifier="bench", session_timeout=4.0)
        self._terms: queue.Queue[tuple[Term, threading.Event]] = queue.Queue()
        self._thread = threading.Thread(target=self.coord.contend, args=("bench", self._lead),
                                        daemon=True)
        self._thread.start()

    def _lead(self, term: Term) -> None:
        done = threading.Event()
        self._terms.put((term, done))
        while not done.wait(0.05) and not term.lost():
            pass

    def term(self) -> tuple[Term, threading.Event]:
        return self._terms.get(timeout=30)

    def close(self) -> None:
        self.coord.close()


def _run(service: str, slot: float, state: RunState) -> Run:
    return Run(run_id=f"{service}@{slot:.0f}", service=service, trigger=Trigger.SCHEDULED,
               slot=slot, queued_at=slot, run_groups=frozenset(), node="bench-proc",
               state=state, dispatched_at=slot, deadline=slot + 60, epoch=1,
               incarnation="0123456789abcdef")


@dataclass
class Scenario:
    name: str
    services: int
    per_turn: int
    turns: int
    overrides: int = 0
    standing_runs: int = 0  # active runs kept throughout (long-running ones)


def prefill(n: Scenario) -> Changes:
    names = [f"Service {i:06d}" for i in range(n.services)]
    return Changes(
        cursors={s: 1.8e9 for s in names}, last_runs={s: 1.8e9 - 5 for s in names},
        overrides={s: {"enabled": True, "period": 7} for s in names[:: max(1, n.services //
                                                                        max(1, n.overrides))]}
        if n.overrides else {},
        runs={r.run_id: r for r in (_run(names[(i * 97) % n.services], 1.8e9, RunState.RUNNING)
                                    for i in range(n.standing_runs))},
    )


def churn(n: Scenario, term: Term, ledger: Ledger, counted: Counted) -> dict[str, float]:
    names = [f"Service {i:06d}" for i in range(n.services)]
    dispatched: list[list[Run]] = []
    per_turn: list[int] = []
    ops: list[int] = []
    txns: list[int] = []
    spent = 0.0
    now = 1.8e9 + 10
    for t in range(n.turns):
        now += 0.05
        fire = [names[(t * n.per_turn + j) % n.services] for j in range(n.per_turn)]
        runs = [_run(s, now, RunState.DISPATCHED) for s in fire]
        changes = Changes(cursors={s: now for s in fire}, last_runs={s: now for s in fire},
                          runs={r.run_id: r for r in runs})
        dispatched.append(runs)
        if len(dispatched) > 2:
            for run in dispatched.pop(0):
                run.state, run.started_at, run.finished_at = (RunState.SUCCEEDED, now - 0.02,
                                                              now - 0.01)
                changes.runs[run.run_id] = None
                changes.finished.append(run)
        writes = ledger.writes(changes)
        before, t0, o0, x0 = len(counted.sizes), time.perf_counter(), term.ops, term.transactions
        term.commit(writes)
        spent += time.perf_counter() - t0
        per_turn.append(sum(counted.sizes[before:]))
        ops.append(term.ops - o0)
        txns.append(term.transactions - x0)
    return {"bytes_mean": statistics.fmean(per_turn), "bytes_p50": statistics.median(per_turn),
            "bytes_max": max(per_turn), "ops": statistics.fmean(ops),
            "txns": statistics.fmean(txns), "commit_s": spent / n.turns}


def window_peak(sizes: Sequence[int], width: int = ZK_MEMORY_PROPOSALS) -> int:
    best = run = sum(sizes[:width])
    for i in range(width, len(sizes)):
        run += sizes[i] - sizes[i - width]
        best = max(best, run)
    return best


def scenario(hosts: str, n: Scenario) -> None:
    chroot = f"/bench-ledger-{uuid.uuid4().hex[:8]}"
    root = KazooClient(hosts=hosts, timeout=10.0)
    root.start(timeout=15)
    root.ensure_path(chroot)
    lead = Leadership(hosts + chroot)
    try:
        print(f"{n.name}: {n.services:,} services, {n.per_turn} firing per turn, {n.turns} "
              f"turns, {n.overrides:,} overrides, {n.standing_runs:,} standing active runs",
              flush=True)
        counted = Counted()
        counted.hook(lead.coord.client)
        term, done = lead.term()
        ledger = Ledger()
        ledger.restore(term.load())
        t0 = time.perf_counter()
        term.commit(ledger.writes(prefill(n)))
        line("prefill: written in", f"{time.perf_counter() - t0:.2f} s "
             f"({len(counted.sizes)} transactions, {sum(counted.sizes) / 1e6:.1f} MB)")
        counted.sizes.clear()
        got = churn(n, term, ledger, counted)
        runs = n.per_turn  # one dispatched and one ended per turn once under way
        line("bytes written per turn: mean / p50 / max",
             f"{got['bytes_mean'] / 1e3:,.1f} / {got['bytes_p50'] / 1e3:,.1f} / "
             f"{got['bytes_max'] / 1e3:,.1f} kB")
        line("bytes written per run", f"{got['bytes_mean'] / runs:,.0f} B")
        line("ZooKeeper transactions / znode writes per turn",
             f"{got['txns']:.2f} / {got['ops']:.2f}")
        line(f"bytes in any {ZK_MEMORY_PROPOSALS} consecutive transactions, max",
             f"{window_peak(counted.sizes) / 1e6:,.1f} MB")
        line("commit wall time per turn, mean", f"{got['commit_s'] * 1000:.1f} ms")
        done.set()
        newer, done2 = lead.term()
        # A successor is another process: keep what this one made out of its collections.
        del term, ledger
        gc.collect()
        gc.freeze()
        t0 = time.perf_counter()
        loaded = newer.load()
        loaded_in = time.perf_counter() - t0
        state = Ledger().restore(loaded)
        restored_in = time.perf_counter() - t0
        line("successor: load / load + restore",
             f"{loaded_in * 1000:,.0f} ms / {restored_in * 1000:,.0f} ms "
             f"({len(state.cursors):,} cursors, {len(state.runs):,} active runs, "
             f"{len(state.overrides):,} overrides)")
        done2.set()
        gc.unfreeze()
    finally:
        lead.close()
        root.delete(chroot, recursive=True)
        root.stop()
        root.close()


SCENARIOS: dict[str, Callable[[int], Scenario]] = {
    "churn-1500": lambda turns: Scenario("churn-1500", 1500, 75, turns),
    "churn-100k": lambda turns: Scenario("churn-100k", 100_000, 100, turns // 2,
                                         overrides=10_000, standing_runs=1000),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", default=",".join(SCENARIOS))
    parser.add_argument("--turns", type=int, default=600)
    args = parser.parse_args(argv)
    hosts = os.environ.get("ROTA_ZK")
    if not hosts:
        print("set ROTA_ZK to a ZooKeeper to measure against", file=sys.stderr)
        return 2
    for name in args.only.split(","):
        scenario(hosts, SCENARIOS[name](args.turns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
