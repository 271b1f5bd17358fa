"""Benchmarks of the pure core: slot computation, timeline, lock book, engine dispatch.

Prints numbers, asserts nothing. Run with `ops/bench` (or `python -m bench.core`).
"""

from __future__ import annotations

import argparse
import gc
import random
import time
import tracemalloc
from datetime import UTC, datetime

from coordinator.core.engine import Dispatch, Engine
from coordinator.core.node import Node
from coordinator.core.rungroup import Claim, LockBook
from coordinator.core.slot import Timeline
from protocol.schedule import Cron, FixedTimes, Periodic, Schedule, zone
from protocol.service import Kind, Service, Utility

T0 = datetime(2026, 11, 22, tzinfo=UTC).timestamp()
ROLES = ("Master", "Redundancy", "Reporting", "Processing", "Calculation")


def make_services(n: int, seed: int = 1) -> list[Service]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        r = rnd.random()
        sched: Schedule
        if r < 0.8:
            period = rnd.choice((1, 2, 5, 6, 10, 15, 16, 30, 60))
            kind, sched = Kind.PERIODIC, Periodic(period, rnd.randrange(period))
        elif r < 0.95:
            kind, sched = Kind.FIXED, FixedTimes(((rnd.randrange(24), rnd.randrange(60)),))
        else:
            kind, sched = Kind.CRON, Cron(f"{rnd.randrange(60)} */{rnd.randrange(1, 7)} * * *")
        groups = frozenset({f"g{rnd.randrange(50)}"}) if rnd.random() < 0.1 else frozenset()
        out.append(Service(
            name=f"svc-{i:06d}", kind=kind, schedule=sched,
            allowed_roles=frozenset(rnd.sample(ROLES, rnd.randint(1, 3))), run_groups=groups,
            utility=Utility(callable="workers.demo:noop"),
        ))
    return out


def line(label: str, value: str) -> None:
    print(f"  {label:<58} {value}", flush=True)


def bench_slots(n: int) -> None:
    print(f"slot computation, {n:,} services (80% periodic, 15% fixed, 5% cron), UTC:")
    services = make_services(n)
    tz = zone("UTC")

    def build() -> Timeline:
        tl = Timeline()
        for s in services:
            assert s.schedule is not None
            tl.set(s.name, s.schedule.next_after(T0, tz))
        return tl

    t = time.perf_counter()
    timeline = build()
    took = time.perf_counter() - t
    line("build the timeline (first slot of each)", f"{took:.2f} s ({n / took:,.0f} slots/s)")
    gc.collect()
    tracemalloc.start()
    kept = (make_services(n), build())
    current, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del kept
    line("memory of services + timeline", f"{current / 2**20:.1f} MiB "
         f"({current / n:.0f} B/service)")
    by_name = {s.name: s for s in services}
    fired = 0
    t = time.perf_counter()
    horizon = T0 + 3600
    while True:
        due = timeline.peek()
        if due is None or due > horizon:
            break
        for name, when in list(timeline.pop_due(due)):
            sched = by_name[name].schedule
            assert sched is not None
            timeline.set(name, sched.next_after(when, tz))
            fired += 1
    took = time.perf_counter() - t
    line("one simulated hour: pop due + compute next slot", f"{fired:,} slots in {took:.2f} s "
         f"= {fired / took:,.0f} slots/s")
    for label, sched in (("periodic next_after", Periodic(6, 3)),
                         ("fixed next_after", FixedTimes(((5, 30), (17, 45)))),
                         ("cron next_after", Cron("*/5 * * * *")),
                         ("periodic next_after, America/New_York", Periodic(5, 2))):
        tz2 = zone("America/New_York") if "New_York" in label else tz
        k = 20000 if "cron" not in label else 3000
        x = T0
        t = time.perf_counter()
        for _ in range(k):
            x = sched.next_after(x, tz2)
        line(label, f"{k / (time.perf_counter() - t):,.0f} /s")


def bench_lockbook(n_ops: int = 200_000) -> None:
    print("run-group lock book:")
    rnd = random.Random(2)
    book = LockBook()
    groups = [frozenset({f"g{rnd.randrange(20)}", f"g{rnd.randrange(20)}"}) for _ in range(500)]
    held: list[str] = []
    t = time.perf_counter()
    for i in range(n_ops // 2):
        key = f"r{i}"
        book.request(Claim(key, f"s{i % 500}", groups[i % 500], float(i)))
        held.append(key)
        if len(held) > 30:
            book.release(held.pop(rnd.randrange(len(held))))
    took = time.perf_counter() - t
    line("request + release (20 groups, ~30 live claims)", f"{n_ops / took:,.0f} ops/s")
    line("waiting at the end", f"{len(book.waiting())}")


def bench_engine_burst(n: int = 1000) -> None:
    print(f"engine: a burst of {n:,} one-minute services due at the same instant:")
    services = [
        Service(f"burst-{i:04d}", Kind.PERIODIC, Periodic(1, 0), frozenset({"Master"}),
                utility=Utility(callable="workers.demo:noop"))
        for i in range(n)
    ]
    engine = Engine(services)
    for k in range(3):
        engine.node_up(Node(f"n{k}", frozenset({"Master"}), capacity=10_000), T0)
    engine.start(T0)
    due = engine.next_wakeup()
    assert due is not None
    t = time.perf_counter()
    actions = engine.tick(due)
    changes = engine.drain_changes()
    took = time.perf_counter() - t
    dispatched = [a for a in actions if isinstance(a, Dispatch)]
    line("tick: runs dispatched", f"{len(dispatched):,} in {took * 1000:.1f} ms")
    line("ledger writes batched into one change set", f"{len(changes.runs):,} runs, "
         f"{len(changes.cursors):,} cursors")
    t = time.perf_counter()
    for a in dispatched:
        engine.run_started(a.run.run_id, a.run.node or "", due, due)
        engine.run_finished(a.run.run_id, a.run.node or "", "succeeded", due)
    took = time.perf_counter() - t
    line("engine CPU for start + finish events", f"{2 * len(dispatched) / took:,.0f} events/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--services", type=int, default=100_000)
    p.add_argument("--core-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    bench_slots(args.services)
    bench_lockbook()
    bench_engine_burst()


if __name__ == "__main__":
    main()
