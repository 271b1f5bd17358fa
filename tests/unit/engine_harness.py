"""A deterministic driver for the scheduling engine.

It plays the leader and the worker nodes around an `Engine`, on a simulated clock:
- the leader part calls `tick` at every wake-up the engine asks for, carries out the actions
  it returns and keeps a ledger of `drain_changes()`, so a new engine can take over (failover);
- the worker part answers each `Dispatch` with `run_started` and, after the service's duration,
  `run_finished`; it answers daemon controls with `daemon_event` (started, paused, resumed);
- every run and daemon stretch on a node is recorded as an `Interval`, so tests can say who ran,
  where, when and in which order.
"""

from __future__ import annotations

import copy
import heapq
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from coordinator.core.engine import Action, Changes, Control, Dispatch, Engine, Record, State
from coordinator.core.node import Node
from coordinator.core.run import Run
from protocol.service import Kind, Placement, Service

T0 = datetime(2025, 1, 6, tzinfo=UTC).timestamp()  # a Monday, 00:00 UTC


def at(hh: int, mm: int = 0, ss: float = 0.0, day: int = 0) -> float:
    """An instant on the harness's first day (UTC)."""
    return T0 + day * 86400 + hh * 3600 + mm * 60 + ss


@dataclass
class Interval:
    """A stretch of execution on a node: a run, or a daemon between start/resume and pause."""

    service: str
    node: str
    start: float
    end: float | None = None
    run_id: str = ""
    trigger: str = ""
    slot: float | None = None
    attempt: int = 1
    outcome: str | None = None

    def overlaps(self, other: Interval) -> bool:
        a_end = math.inf if self.end is None else self.end
        b_end = math.inf if other.end is None else other.end
        return self.start < b_end and other.start < a_end


@dataclass
class Ledger:
    """What the leader would have persisted: the sum of drained changes."""

    runs: dict[str, Run] = field(default_factory=dict)
    cursors: dict[str, float] = field(default_factory=dict)
    overrides: dict[str, dict[str, object]] = field(default_factory=dict)
    last_runs: dict[str, float] = field(default_factory=dict)
    finished: list[Run] = field(default_factory=list)

    def absorb(self, ch: Changes) -> None:
        for run_id, run in ch.runs.items():
            if run is None:
                self.runs.pop(run_id, None)
            else:
                self.runs[run_id] = copy.deepcopy(run)
        self.cursors.update(ch.cursors)
        self.overrides.update(copy.deepcopy(ch.overrides))
        self.last_runs.update(ch.last_runs)
        self.finished += [copy.deepcopy(r) for r in ch.finished]

    def state(self) -> State:
        return State(
            cursors=dict(self.cursors),
            runs=[copy.deepcopy(r) for r in self.runs.values()],
            overrides=copy.deepcopy(self.overrides),
            last_runs=dict(self.last_runs),
        )


Outcome = Callable[[Run], str]


class Harness:
    def __init__(
        self,
        services: Iterable[Service],
        nodes: Iterable[Node] = (),
        *,
        tz: str = "UTC",
        start: float = T0,
        state: State | None = None,
        epoch: int = 1,
        durations: dict[str, float] | None = None,
        default_duration: float = 1.0,
        outcome: Outcome | None = None,
        start_delay: float = 0.0,
        pause_delay: float = 0.0,
        order_ttl: float = 60.0,
        expiry_grace: float = 30.0,
        rank: Callable[[str], list[str]] | None = None,
        lead: float = 0.0,
    ) -> None:
        self.services = list(services)
        self.tz = tz
        self.now = start
        self.epoch = epoch
        self.durations = dict(durations or {})
        self.default_duration = default_duration
        self.outcome = outcome or (lambda run: "succeeded")
        self.start_delay = start_delay
        self.pause_delay = pause_delay
        self.engine_options = dict(order_ttl=order_ttl, expiry_grace=expiry_grace, rank=rank,
                                   lead=lead)
        self.nodes: dict[str, Node] = {n.id: n for n in nodes}
        self.deaf: set[str] = set()  # nodes that drop the orders and controls they receive
        self.drop_orders: set[str] = set()  # run ids whose next order is lost on the way
        self.hang: set[str] = set()  # services whose runs start and never report an end
        self.ledger = Ledger()
        self.intervals: list[Interval] = []
        self.records: list[Run] = []  # a snapshot of every Record action, in order
        self.dispatches: list[Run] = []  # a snapshot of every Dispatch action, in order
        self.controls: list[tuple[float, str, str, str]] = []  # (time, service, node, action)
        self.worker_seen: set[str] = set()  # run ids the workers accepted (they dedupe)
        self.worker_epoch: dict[str, int] = {}  # per node: the epoch of the last control
        self._since: dict[tuple[str, str], float] = {}  # daemon interval begun, per node
        # every daemon report sent: (service, node, state, at, started_at, epoch)
        self.reports: list[tuple[str, str, str, float, float | None, int]] = []
        self._open: dict[tuple[str, str], Interval] = {}  # (run id or daemon key, node)
        self._events: list[tuple[float, int, str, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._inbox: list[Callable[[], list[Action]]] = []  # while no leader runs
        self.engine: Engine | None = None
        self._lead(state)

    # == leader ===========================================================================
    def _lead(self, state: State | None) -> None:
        """Take the lead as the leader does: nodes, start, redispatch, daemons."""
        engine = Engine(self.services, self.tz, **self.engine_options)  # type: ignore[arg-type]
        self.engine = engine
        for node in self.nodes.values():
            engine.node_up(node, self.now)
        actions = engine.start(self.now, state, self.epoch)
        actions += engine.redispatch(self.now)
        self.apply(actions)
        inbox, self._inbox = self._inbox, []
        for call in inbox:
            self.apply(call())

    def kill_leader(self) -> None:
        """The leader dies: nothing is scheduled until `failover`; worker events wait."""
        self.engine = None

    def failover(self, now: float | None = None) -> None:
        """A new leader (next epoch) takes over from the ledger at `now`."""
        if now is not None:
            self.advance(now)
        self.engine = None
        self.epoch += 1
        self._lead(self.ledger.state())

    def _call(self, fn: Callable[[Engine, float], list[Action]]) -> None:
        """Deliver a worker event: `fn(engine, now)`, `now` being the leader's clock when it
        handles the event (after a failover, later than when the event happened)."""
        if self.engine is None:
            self._inbox.append(lambda: fn(self.engine, self.now))  # type: ignore[arg-type]
            return
        self.apply(fn(self.engine, self.now))

    def apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Dispatch):
                self.dispatches.append(copy.deepcopy(action.run))
                self._deliver(action.run)
            elif isinstance(action, Control):
                self.controls.append((self.now, action.service.name, action.node, action.action))
                self._control(action)
            elif isinstance(action, Record):
                self.records.append(copy.deepcopy(action.run))
        if self.engine is not None:
            self.ledger.absorb(self.engine.drain_changes())

    # == simulated time ===================================================================
    def advance(self, to: float) -> None:
        """Run everything due up to and including `to`, in time order."""
        for _ in range(1_000_000):
            t_ev = self._events[0][0] if self._events else math.inf
            wake = self.engine.next_wakeup() if self.engine is not None else None
            t_wk = math.inf if wake is None else wake
            t = min(t_ev, t_wk)
            if t > to:
                break
            self.now = max(self.now, t)
            if t_ev <= t_wk:
                _, _, _, fn = heapq.heappop(self._events)
                fn()
            else:
                self.apply(self.engine.tick(self.now))  # type: ignore[union-attr]
        else:
            raise AssertionError("the simulation does not settle")
        self.now = max(self.now, to)
        if self.engine is not None:
            self.apply(self.engine.tick(self.now))

    def run_for(self, seconds: float) -> None:
        self.advance(self.now + seconds)

    def _later(self, delay: float, node: str, fn: Callable[[], None]) -> None:
        heapq.heappush(self._events, (self.now + delay, next(self._seq), node, fn))

    # == workers ==========================================================================
    def _deliver(self, run: Run) -> None:
        node = run.node
        assert node is not None
        if run.run_id in self.drop_orders:
            self.drop_orders.discard(run.run_id)
            return
        if node not in self.nodes or node in self.deaf or run.run_id in self.worker_seen:
            return
        self.worker_seen.add(run.run_id)
        snapshot = copy.deepcopy(run)
        delay = self.start_delay  # an order sent ahead is held until its start instant
        if run.start_at is not None:
            delay = max(delay, run.start_at - self.now)
        self._later(delay, node, lambda: self._start_run(snapshot))

    def _start_run(self, run: Run) -> None:
        node = run.node
        assert node is not None
        iv = Interval(run.service, node, self.now, run_id=run.run_id, trigger=run.trigger.value,
                      slot=run.slot, attempt=run.attempt)
        self.intervals.append(iv)
        self._open[(run.run_id, node)] = iv
        started = self.now
        self._call(lambda e, now: e.run_started(run.run_id, node, started, now))
        if run.service in self.hang:
            return  # the worker never reports how it ended (its reporter is stuck)
        duration = self.durations.get(run.service, self.default_duration)
        self._later(duration, node, lambda: self._finish_run(run, iv))

    def _finish_run(self, run: Run, iv: Interval) -> None:
        node = run.node
        assert node is not None
        outcome = self.outcome(run)
        iv.end = self.now
        iv.outcome = outcome
        self._open.pop((run.run_id, node), None)
        ended = self.now
        self._call(lambda e, now: e.run_finished(
            run.run_id, node, outcome, now, started_at=iv.start, finished_at=ended,
            error="boom" if outcome == "failed" else None,
        ))

    def _control(self, c: Control) -> None:
        service, node = c.service.name, c.node
        if node not in self.nodes or node in self.deaf:
            return
        key = (f"daemon:{service}", node)
        self.worker_epoch[node] = max(self.worker_epoch.get(node, 0), self.epoch)
        if c.action in ("start", "resume"):
            if key not in self._open:
                iv = Interval(service, node, self.now, run_id=key[0], trigger="daemon")
                self.intervals.append(iv)
                self._open[key] = iv
            event = "started" if c.action == "start" else "resumed"
            self._later(0.0, node, lambda: self._daemon_event(service, node, event))
        elif c.action == "pause":
            def parked() -> None:
                iv = self._open.pop(key, None)
                if iv is not None:
                    iv.end = self.now
                    iv.outcome = "paused"
                self._daemon_event(service, node, "paused")
            self._later(self.pause_delay, node, parked)
        elif c.action == "stop":
            iv = self._open.pop(key, None)
            if iv is not None:
                iv.end = self.now
                iv.outcome = "stopped"

    def _daemon_event(self, service: str, node: str, state: str) -> None:
        """Report as a worker does: when it happened, and an end names the instant its
        interval began."""
        epoch = self.worker_epoch.get(node, 0)  # reports carry the epoch of the last control
        key = (service, node)
        at, started_at = self.now, None
        if state in ("started", "resumed"):
            self._since[key] = at
        else:
            started_at = self._since.pop(key, None)
        self.reports.append((service, node, state, at, started_at, epoch))
        self._call(lambda e, now: e.daemon_event(service, node, state, now, epoch=epoch,
                                                 at=at, started_at=started_at))

    # == nodes and operators ==============================================================
    def node_up(self, node: Node) -> None:
        self.nodes[node.id] = node
        self._call(lambda e, now: e.node_up(node, now))

    def kill_node(self, node_id: str, *, tell: bool = True) -> None:
        """The node dies and is fenced off: its work stops, the engine is told (with
        `tell=False`, not: nobody leads, and the next leader only finds it missing)."""
        self._stop_work(node_id)
        if tell:
            self._call(lambda e, now: e.node_down(node_id, now))

    def restart_node(self, node: Node, *, tell: bool = True) -> None:
        """The node's process dies and a new one announces itself (a new session, named by
        `node.incarnation`) before the old session is seen to end. With `tell=False` the
        leader is not told now (nobody leads, or the news is yet to arrive)."""
        self._stop_work(node.id)
        self.nodes[node.id] = node
        if tell:
            self._call(lambda e, now: e.node_up(node, now))

    def _stop_work(self, node_id: str) -> None:
        self.nodes.pop(node_id, None)
        self._events = [e for e in self._events if e[2] != node_id]
        heapq.heapify(self._events)
        for key in [k for k in self._open if k[1] == node_id]:
            iv = self._open.pop(key)
            iv.end = self.now
            iv.outcome = "lost"

    def manual(self, service: str, request_id: str, node: str | None = None) -> list[Action]:
        assert self.engine is not None
        actions = self.engine.manual_run(service, self.now, request_id, node)
        self.apply(actions)
        return actions

    def update(self, service: str, **kwargs: object) -> None:
        assert self.engine is not None
        self.apply(self.engine.update_service(service, self.now, **kwargs))  # type: ignore[arg-type]

    # == views ============================================================================
    def runs_of(self, service: str) -> list[Interval]:
        return [iv for iv in self.intervals if iv.service == service and iv.trigger != "daemon"]

    def daemon_spans(self, service: str) -> list[Interval]:
        return [iv for iv in self.intervals if iv.service == service and iv.trigger == "daemon"]

    def slots_run(self, service: str) -> list[float]:
        return [iv.slot for iv in self.runs_of(service) if iv.slot is not None]

    def finished(self, service: str | None = None, state: str | None = None) -> list[Run]:
        """Terminal records (the engine's history) for a service and/or state."""
        return [
            r for r in self.ledger.finished
            if (service is None or r.service == service)
            and (state is None or r.state.value == state)
        ]

    def conflicting_overlaps(self) -> list[tuple[Interval, Interval]]:
        """Pairs of intervals of services whose run groups intersect that overlap in time."""
        by_name = {s.name: s for s in self.services}
        out = []
        ivs = sorted(self.intervals, key=lambda iv: iv.start)
        for i, a in enumerate(ivs):
            for b in ivs[i + 1:]:
                if b.start >= (math.inf if a.end is None else a.end):
                    break
                groups_a, groups_b = by_name[a.service].run_groups, by_name[b.service].run_groups
                conflict = a.service != b.service and not groups_a.isdisjoint(groups_b)
                if conflict and a.overlaps(b):
                    out.append((a, b))
        return out


# == building blocks =========================================================================
def node(node_id: str, *roles: str, capacity: int = 64, incarnation: str | None = None) -> Node:
    return Node(node_id, frozenset(roles), capacity, incarnation=incarnation)


def service(
    name: str,
    schedule=None,  # type: ignore[no-untyped-def]
    *,
    roles: Iterable[str] = ("Master",),
    groups: Iterable[str] = (),
    kind: Kind | None = None,
    **kwargs: object,
) -> Service:
    if kind is None:
        kind = Kind.DAEMON if schedule is None else Kind(schedule.kind)
    if kind is Kind.DAEMON:
        kwargs.setdefault("placement", Placement.ALL)
    return Service(
        name=name,
        kind=kind,
        schedule=schedule,
        allowed_roles=frozenset(roles),
        run_groups=frozenset(groups),
        **kwargs,  # type: ignore[arg-type]
    )
