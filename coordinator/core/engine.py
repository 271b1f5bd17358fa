"""The scheduling engine: the pure heart of the leader.

It owns the timeline of slots, the runs in flight, the run-group lock book, daemon
instances, operator overrides and Last Run. It never touches a broker, ZooKeeper or the
real clock: every method takes `now`, and returns the actions the leader must carry out
(dispatch an order, control a daemon, record a run). Whatever must survive a failover is
reported through `drain_changes()` so the leader can write it to the ledger in one batch.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from zoneinfo import ZoneInfo

from coordinator.core import placement
from coordinator.core.node import Node
from coordinator.core.run import Run, RunState, Trigger
from coordinator.core.rungroup import Claim, LockBook
from coordinator.core.slot import Timeline
from protocol import run_id_for
from protocol.schedule import Schedule, ScheduleError, zone
from protocol.service import Kind, Overlap, Placement, Service

MAX_MISSED_RECORDS = 100  # per service and recovery; the rest are summed up in one record


# -- actions ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Dispatch:
    """Send a run order to `run.node`."""

    run: Run
    service: Service


@dataclass(frozen=True, slots=True)
class Control:
    """Tell `node` to start, stop, pause or resume the daemon `service`."""

    service: Service
    node: str
    action: str


@dataclass(frozen=True, slots=True)
class Record:
    """A run changed state: publish it, and keep it in history when it is terminal.

    Holds a copy of the run as it was when recorded: the run itself moves on.
    """

    run: Run

    def __post_init__(self) -> None:
        object.__setattr__(self, "run", replace(self.run))


Action = Dispatch | Control | Record


@dataclass(slots=True)
class DaemonInstance:
    service: str
    node: str
    state: str = "waiting"  # waiting | starting | running | pausing | paused | stopped

    @property
    def key(self) -> str:
        return f"daemon:{self.service}@{self.node}"


@dataclass
class Changes:
    """What the ledger must persist since the last drain."""

    runs: dict[str, Run | None] = field(default_factory=dict)  # None: no longer active
    cursors: dict[str, float] = field(default_factory=dict)
    overrides: dict[str, dict[str, object]] = field(default_factory=dict)
    last_runs: dict[str, float] = field(default_factory=dict)
    finished: list[Run] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.runs or self.cursors or self.overrides or self.last_runs)


@dataclass
class State:
    """What a new leader restores from the ledger."""

    cursors: dict[str, float] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    overrides: dict[str, dict[str, object]] = field(default_factory=dict)
    last_runs: dict[str, float] = field(default_factory=dict)


class RefusedError(ValueError):
    """An operator request the engine will not carry out; the message says why."""


class Engine:
    def __init__(
        self,
        services: Iterable[Service],
        timezone: str = "UTC",
        *,
        order_ttl: float = 60.0,
        expiry_grace: float = 30.0,
        report_grace: float = 30.0,
        rank: Callable[[str], list[str]] | None = None,
        remember_ended: int = 10_000,
    ) -> None:
        self.base: dict[str, Service] = {s.name: s for s in services}
        self.services: dict[str, Service] = dict(self.base)
        self.tz: ZoneInfo = zone(timezone)
        self.order_ttl = order_ttl
        self.expiry_grace = expiry_grace
        self.report_grace = report_grace  # at least this long past a run's timeout
        self.rank = rank
        self.epoch = 0
        self.nodes: dict[str, Node] = {}
        self.runs: dict[str, Run] = {}
        self.locks = LockBook()
        self.daemons: dict[str, DaemonInstance] = {}
        self.last_run: dict[str, float] = {}
        self.overrides: dict[str, dict[str, object]] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()  # ids of runs ended lately
        self._remember_ended = remember_ended
        self.timeline = Timeline()
        self._inflight: dict[tuple[str, str], str] = {}  # (service, target) -> run id
        self._pending: dict[tuple[str, str], deque[str]] = {}  # waiting behind in-flight
        self._timers: list[tuple[float, int, str, str]] = []  # (when, seq, kind, key)
        self._seq = itertools.count()
        self._load: dict[str, int] = {}
        self._full: deque[str] = deque()  # runs granted their groups, waiting for capacity
        self._changes = Changes()
        self._started = False

    # == lifecycle ==========================================================================
    def start(self, now: float, state: State | None = None, epoch: int = 0) -> list[Action]:
        """Begin leading at `now`, resuming from `state` (None: a fresh cluster)."""
        self.epoch = epoch
        state = state or State()
        actions: list[Action] = []
        for name, ov in state.overrides.items():
            if name in self.base:
                self.overrides[name] = dict(ov)
                self.services[name] = self._apply(self.base[name], ov)
        self.last_run.update({k: v for k, v in state.last_runs.items() if k in self.base})
        for run in state.runs:
            self._adopt(run, now)
        actions += self._end_runs_of_ended_sessions(now)
        # Daemons may still be running on their nodes: they hold their run groups before any
        # run is granted (a conflicting run then pauses them as usual).
        self._started = True
        actions += self._reconcile_daemons(now)
        # Adopted queued runs keep their place ahead of any slot recovered below.
        actions += self._requeue_adopted(now)
        for svc in self.services.values():
            if svc.is_daemon or not svc.enabled or svc.schedule is None:
                continue
            cursor = state.cursors.get(svc.name)
            if cursor is None:
                # Slots are handled from now on: a successor recovers any it misses.
                self._changes.cursors[svc.name] = now
                self._set_next(svc, now)
            else:
                actions += self._recover(svc, cursor, now)
        return actions

    def _adopt(self, run: Run, now: float) -> None:
        """Take over an active run from the ledger."""
        if run.service not in self.services or not run.active:
            return
        self.runs[run.run_id] = run
        key = (run.service, run.target)
        if run.state in (RunState.DISPATCHED, RunState.RUNNING):
            self._inflight[key] = run.run_id
            if run.node:
                self._load[run.node] = self._load.get(run.node, 0) + 1
            self.locks.hold(Claim(run.run_id, run.service, run.run_groups, run.queued_at))
            if run.state is RunState.DISPATCHED:
                self._timer(self._expiry_of(run), "expire", run.run_id)
            else:
                self._timer(self._overdue_at(run, now), "overdue", run.run_id)
        # queued runs are queued again, in their original order, by _requeue_adopted

    def _end_runs_of_ended_sessions(self, now: float) -> list[Action]:
        """Adopted runs whose node session ended while no leader was watching are lost: the
        node is gone, or it came back in a new session (restart, or expiry)."""
        out: list[Action] = []
        for run in list(self.runs.values()):
            if run.state not in (RunState.DISPATCHED, RunState.RUNNING) or not run.node:
                continue
            node = self.nodes.get(run.node)
            if node is None:
                why = "died"
            elif run.incarnation is not None and node.incarnation != run.incarnation:
                why = "restarted"
            else:
                continue
            out += self._end(run, RunState.LOST, now,
                             reason=f"node {run.node} {why} while no leader was running")
        return out

    def _requeue_adopted(self, now: float) -> list[Action]:
        """Queue adopted queued runs again, in their original order."""
        out: list[Action] = []
        queued = sorted(
            (r for r in self.runs.values() if r.state is RunState.QUEUED),
            key=lambda r: (r.queued_at, r.run_id),
        )
        for run in queued:
            key = (run.service, run.target)
            if run.attempt > 1 and run.queued_at > now:
                self._timer(run.queued_at, "retry", run.run_id)  # still in its retry delay
            elif key in self._inflight:
                self._pending.setdefault(key, deque()).append(run.run_id)
            else:
                out += self._ready(run, now)
        return out

    def redispatch(self, now: float) -> list[Action]:
        """Orders for adopted runs that were recorded as dispatched but may never have left
        (runs dispatched by this term itself were sent already).

        Workers recognise a re-sent order by its run id and ignore duplicates. An order whose
        deadline has passed is not sent again (a worker would refuse it): its expiry timer
        ends the run unless the worker reports it started. (Adopted queued runs were queued
        again by `start`.)
        """
        out: list[Action] = []
        for run in self.runs.values():
            if (run.state is RunState.DISPATCHED and run.node and run.epoch < self.epoch
                    and run.deadline is not None and run.deadline > now):
                out.append(Dispatch(run, self.services[run.service]))
        return out

    # == time ===============================================================================
    def next_wakeup(self) -> float | None:
        nxt = self.timeline.peek()
        if self._timers and (nxt is None or self._timers[0][0] < nxt):
            nxt = self._timers[0][0]
        return nxt

    def tick(self, now: float) -> list[Action]:
        """Fire every slot and timer due at or before `now`."""
        actions: list[Action] = []
        while True:
            due_now = list(self.timeline.pop_due(now))
            if not due_now:
                break
            for name, due in due_now:
                svc = self.services.get(name)
                if svc is None or not svc.enabled or svc.schedule is None:
                    continue
                actions += self._fire(svc, due, now)
                self._set_next(svc, due)
        while self._timers and self._timers[0][0] <= now:
            _, _, kind, key = heapq.heappop(self._timers)
            if kind == "expire":
                actions += self._expire(key, now)
            elif kind == "overdue":
                actions += self._overdue(key, now)
            elif kind == "retry":
                run = self.runs.get(key)
                if run is not None and run.state is RunState.QUEUED:
                    actions += self._admit(run, now)
        return actions

    def _set_next(self, svc: Service, after: float) -> None:
        assert svc.schedule is not None
        self.timeline.set(svc.name, svc.schedule.next_after(after, self.tz))

    def _recover(self, svc: Service, cursor: float, now: float) -> list[Action]:
        """Slots between the last one handled and now: the latest runs if young enough."""
        assert svc.schedule is not None
        actions: list[Action] = []
        due: list[float] = []
        t = svc.schedule.next_after(cursor, self.tz)
        skipped_count = 0
        while t <= now:
            due.append(t)
            if len(due) > MAX_MISSED_RECORDS + 1:
                due.pop(0)
                skipped_count += 1
            t = svc.schedule.next_after(t, self.tz)
        self.timeline.set(svc.name, t)
        if not due:
            return actions
        latest = due[-1]
        run_latest = now - latest <= svc.catch_up
        missed = due if not run_latest else due[:-1]
        for i, slot in enumerate(missed):
            reason = "missed while no leader was running"
            if i == 0 and skipped_count:
                reason += f" (and {skipped_count} earlier slots)"
            actions += self._record_missed(svc, slot, now, reason)
        if run_latest:
            actions += self._fire(svc, latest, now)
        self._changes.cursors[svc.name] = due[-1]
        return actions

    def _record_missed(self, svc: Service, slot: float, now: float, reason: str) -> list[Action]:
        run = Run(
            run_id=run_id_for(svc.name, slot, None),
            service=svc.name,
            trigger=Trigger.SCHEDULED,
            slot=slot,
            queued_at=now,
            run_groups=svc.run_groups,
            state=RunState.MISSED,
            reason=reason,
            epoch=self.epoch,
        )
        return self._finish_record(run)

    # == slots and runs =====================================================================
    def _fire(self, svc: Service, slot: float, now: float) -> list[Action]:
        self._changes.cursors[svc.name] = slot
        tg = placement.targets(svc, self.nodes.values())
        if tg is None:
            tg = [""]
        elif not tg:
            return self._skip(svc, slot, "", now, "no live node holds an allowed role")
        actions: list[Action] = []
        for target in tg:
            run = Run(
                run_id=run_id_for(svc.name, slot, target or None),
                service=svc.name,
                trigger=Trigger.SCHEDULED,
                slot=slot,
                queued_at=now,
                run_groups=svc.run_groups,
                node=target or None,
                target=target,
                epoch=self.epoch,
            )
            if run.run_id in self.runs:
                continue  # already created for this slot (recovery overlap)
            actions += self._admit(run, now)
        return actions

    def _skip(
        self, svc: Service, slot: float, target: str, now: float, reason: str
    ) -> list[Action]:
        run = Run(
            run_id=run_id_for(svc.name, slot, target or None),
            service=svc.name,
            trigger=Trigger.SCHEDULED,
            slot=slot,
            queued_at=now,
            run_groups=svc.run_groups,
            node=target or None,
            target=target,
            state=RunState.SKIPPED,
            reason=reason,
            epoch=self.epoch,
        )
        return self._finish_record(run)

    def _admit(self, run: Run, now: float) -> list[Action]:
        """A new run: apply the overlap policy, then ask for its run groups."""
        svc = self.services[run.service]
        key = (run.service, run.target)
        if key in self._inflight:
            pending = self._pending.setdefault(key, deque())
            if run.trigger is Trigger.SCHEDULED:
                if svc.overlap is Overlap.SKIP:
                    return self._skip(
                        svc, run.slot or now, run.target, now, "previous run still running"
                    )
                current = self.runs.get(self._inflight[key])
                waiting = (
                    current is not None
                    and current.state is RunState.QUEUED
                    and current.trigger is Trigger.SCHEDULED
                )
                if waiting or any(self.runs[r].trigger is Trigger.SCHEDULED for r in pending):
                    return self._skip(
                        svc, run.slot or now, run.target, now,
                        "coalesced: a run of this service is already waiting",
                    )
            self.runs[run.run_id] = run
            pending.append(run.run_id)
            self._changes.runs[run.run_id] = run
            return [Record(run)]
        self.runs[run.run_id] = run
        self._changes.runs[run.run_id] = run
        return self._ready(run, now)

    def _ready(self, run: Run, now: float) -> list[Action]:
        """The run may go as soon as its run groups are free."""
        self._inflight[(run.service, run.target)] = run.run_id
        claim = Claim(run.run_id, run.service, run.run_groups, run.queued_at)
        if self.locks.request(claim):
            return self._dispatch(run, now)
        actions: list[Action] = [Record(run)]
        actions += self._pause_blocking_daemons(claim, now)
        return actions

    def _dispatch(self, run: Run, now: float) -> list[Action]:
        svc = self.services[run.service]
        if run.node is None:
            run.node = placement.choose_one(svc, self.nodes.values(), self._load, self.rank)
        elif run.node not in self.nodes:
            run.node = None
        if run.node is None:
            if not run.target and placement.eligible(svc, self.nodes.values()):
                # Every eligible node is at capacity: wait (FIFO) until one frees a slot.
                if run.run_id not in self._full:
                    self._full.append(run.run_id)
                return []
            return self._end(
                run, RunState.EXPIRED, now, reason="no live node holds an allowed role"
            )
        run.move(RunState.DISPATCHED)
        run.dispatched_at = now
        run.incarnation = self.nodes[run.node].incarnation
        run.deadline = now + self.order_ttl
        run.epoch = self.epoch
        self._load[run.node] = self._load.get(run.node, 0) + 1
        self.last_run[run.service] = now
        self._changes.last_runs[run.service] = now
        self._changes.runs[run.run_id] = run
        self._timer(self._expiry_of(run), "expire", run.run_id)
        return [Dispatch(run, svc), Record(run)]

    def _expiry_of(self, run: Run) -> float:
        return (run.deadline or run.queued_at) + self.expiry_grace

    def _expire(self, run_id: str, now: float) -> list[Action]:
        run = self.runs.get(run_id)
        if run is None or run.state is not RunState.DISPATCHED:
            return []
        return self._end(
            run, RunState.EXPIRED, now, reason="order was not started before its deadline"
        )

    def _report_grace(self, timeout: float) -> float:
        return max(self.report_grace, 0.1 * timeout)

    def _overdue_at(self, run: Run, now: float) -> float:
        """When a running run whose end was never reported is given up: its timeout (the
        worker kills it then) plus a grace for the report to arrive, counted from the later
        of its start (worker clock) and its dispatch (leader clock)."""
        svc = self.services[run.service]
        begun = [t for t in (run.started_at, run.dispatched_at) if t is not None]
        return (max(begun) if begun else now) + svc.timeout + self._report_grace(svc.timeout)

    def _overdue(self, run_id: str, now: float) -> list[Action]:
        run = self.runs.get(run_id)
        if run is None or run.state is not RunState.RUNNING:
            return []
        svc = self.services[run.service]
        return self._end(
            run, RunState.LOST, now,
            reason=(f"no report from node {run.node} within its timeout ({svc.timeout:g} s) "
                    f"and a grace of {self._report_grace(svc.timeout):g} s: presumed lost"),
        )

    def _end(
        self,
        run: Run,
        state: RunState,
        now: float,
        *,
        reason: str | None = None,
        error: str | None = None,
    ) -> list[Action]:
        """A run reached a terminal state: free its node slot and groups, start who waits."""
        was_placed = run.state in (RunState.DISPATCHED, RunState.RUNNING)
        run.move(state)
        run.finished_at = run.finished_at or now
        if reason:
            run.reason = reason
        if error:
            run.error = error
        if was_placed and run.node:
            self._load[run.node] = max(0, self._load.get(run.node, 0) - 1)
        if run.run_id in self._full:
            self._full.remove(run.run_id)
        actions = self._finish_record(run)
        self.runs.pop(run.run_id, None)
        key = (run.service, run.target)
        if self._inflight.get(key) == run.run_id:
            del self._inflight[key]
        pending = self._pending.get(key)
        if pending is not None and run.run_id in pending:
            pending.remove(run.run_id)
        for claim in self.locks.release(run.run_id):
            actions += self._granted(claim, now)
        actions += self._retry_if_due(run, now)
        if key not in self._inflight and pending:
            nxt = self.runs[pending.popleft()]
            if not pending:
                del self._pending[key]
            actions += self._ready(nxt, now)
        if was_placed and self._full:
            actions += self._place_waiting(now)
        return actions

    def _place_waiting(self, now: float) -> list[Action]:
        """Dispatch runs that waited for a node with free capacity, oldest first."""
        actions: list[Action] = []
        for run_id in list(self._full):
            run = self.runs.get(run_id)
            if run is None or run.state is not RunState.QUEUED:
                self._full.remove(run_id)
                continue
            self._full.remove(run_id)
            actions += self._dispatch(run, now)
            if run_id in self._full:
                break  # still no room: later ones wait behind it
        return actions

    def knows(self, run_id: str) -> bool:
        """Whether `run_id` is a run of this cluster: active, or ended lately (reports of
        it may still arrive, late or twice)."""
        return run_id in self.runs or run_id in self._ended

    def note_ended(self, run_id: str) -> None:
        self._ended[run_id] = None
        self._ended.move_to_end(run_id)
        while len(self._ended) > self._remember_ended:
            self._ended.popitem(last=False)

    def _finish_record(self, run: Run) -> list[Action]:
        self.note_ended(run.run_id)
        self._changes.runs[run.run_id] = None
        self._changes.finished.append(run)
        return [Record(run)]

    def _retry_if_due(self, run: Run, now: float) -> list[Action]:
        svc = self.services.get(run.service)
        if (
            svc is None
            or run.state not in (RunState.FAILED, RunState.TIMED_OUT)
            or run.attempt > svc.retries
        ):
            return []
        if run.trigger is Trigger.MANUAL:
            # Manual runs have no slot: the retry's id derives from the request's run id, so
            # two requests (or a request and a slot) at the same instant keep distinct ids.
            root = run.run_id.rsplit("~", 1)[0] if run.attempt > 1 else run.run_id
            retry_id = f"{root}~{run.attempt + 1}"
        else:
            retry_id = run_id_for(svc.name, run.slot or run.queued_at, run.target or None,
                                  run.attempt + 1)
        retry = replace(
            run,
            run_id=retry_id,
            trigger=Trigger.RETRY if run.trigger is not Trigger.MANUAL else Trigger.MANUAL,
            attempt=run.attempt + 1,
            state=RunState.QUEUED,
            queued_at=now + svc.retry_delay,
            node=run.node if svc.placement is Placement.ALL else None,
            dispatched_at=None, started_at=None, finished_at=None, deadline=None,
            error=None, output_tail="", reason=None, metrics={},
        )
        self.runs[retry.run_id] = retry
        self._changes.runs[retry.run_id] = retry
        self._timer(retry.queued_at, "retry", retry.run_id)
        return [Record(retry)]

    def _granted(self, claim: Claim, now: float) -> list[Action]:
        if claim.key.startswith("daemon:"):
            inst = self.daemons.get(claim.key)
            if inst is None:
                out: list[Action] = []
                for granted in self.locks.release(claim.key):
                    out += self._granted(granted, now)
                return out
            action = "resume" if inst.state == "paused" else "start"
            inst.state = "running" if action == "resume" else "starting"
            return [Control(self.services[inst.service], inst.node, action)]
        run = self.runs.get(claim.key)
        if run is None or run.state is not RunState.QUEUED:
            return []
        return self._dispatch(run, now)

    def _timer(self, when: float, kind: str, key: str) -> None:
        heapq.heappush(self._timers, (when, next(self._seq), kind, key))

    # == worker events ======================================================================
    def run_started(self, run_id: str, node: str, at: float, now: float) -> list[Action]:
        run = self.runs.get(run_id)
        if run is None or run.state is not RunState.DISPATCHED or run.node != node:
            return []
        run.move(RunState.RUNNING)
        run.started_at = at
        self._changes.runs[run_id] = run
        self._timer(self._overdue_at(run, now), "overdue", run_id)
        return [Record(run)]

    def run_finished(
        self,
        run_id: str,
        node: str,
        outcome: str,
        now: float,
        *,
        started_at: float | None = None,
        finished_at: float | None = None,
        error: str | None = None,
        output_tail: str = "",
        reason: str | None = None,
        metrics: dict[str, float] | None = None,
    ) -> list[Action]:
        run = self.runs.get(run_id)
        if run is None or run.state not in (RunState.DISPATCHED, RunState.RUNNING):
            return []
        if run.node != node:
            return []
        state = RunState(outcome)
        if state not in (
            RunState.SUCCEEDED, RunState.FAILED, RunState.TIMED_OUT, RunState.REJECTED
        ):
            raise ValueError(f"not a finishing outcome: {outcome!r}")
        run.started_at = run.started_at or started_at
        run.finished_at = finished_at or now
        run.output_tail = output_tail
        run.metrics = dict(metrics or {})
        return self._end(run, state, now, reason=reason, error=error)

    # == nodes ==============================================================================
    def node_up(self, node: Node, now: float) -> list[Action]:
        """A node announced itself. An announcement from a new session of a known node
        means the old session ended (the process restarted, or its session expired): what
        ran there is lost, as if the node had gone and come back."""
        old = self.nodes.get(node.id)
        self.nodes[node.id] = node
        if not self._started:
            return []
        actions: list[Action] = []
        if old is not None and old.incarnation != node.incarnation:
            actions += self._lose_work(node.id, now, "restarted")
        return (actions + self._reconcile_daemons(now)
                + (self._place_waiting(now) if self._full else []))

    def node_down(self, node_id: str, now: float) -> list[Action]:
        """The node is certainly fenced off (its session expired): its runs are lost."""
        self.nodes.pop(node_id, None)
        actions = self._lose_work(node_id, now, "died")
        self._load.pop(node_id, None)
        return actions + self._reconcile_daemons(now)

    def _lose_work(self, node_id: str, now: float, why: str) -> list[Action]:
        """End what a node's ended session ran: its runs are lost, its daemons forgotten,
        their run groups freed. Runs waiting to go to a node that merely restarted stay."""
        actions: list[Action] = []
        reason = f"node {node_id} {why}"
        for run in [r for r in self.runs.values() if r.node == node_id]:
            if run.state in (RunState.DISPATCHED, RunState.RUNNING):
                actions += self._end(run, RunState.LOST, now, reason=reason)
            elif run.state is RunState.QUEUED and run.target and node_id not in self.nodes:
                actions += self._end(run, RunState.LOST, now, reason=reason)
        for inst in [d for d in self.daemons.values() if d.node == node_id]:
            del self.daemons[inst.key]
            for claim in self.locks.release(inst.key):
                actions += self._granted(claim, now)
        return actions

    # == daemons ============================================================================
    def _reconcile_daemons(self, now: float) -> list[Action]:
        """Make the daemon instances match enabled daemons x eligible live nodes."""
        actions: list[Action] = []
        for svc in self.services.values():
            if not svc.is_daemon:
                continue
            want: set[str] = set()
            if svc.enabled:
                nodes = placement.eligible(svc, self.nodes.values())
                if svc.placement is Placement.ALL:
                    want = {n.id for n in nodes}
                else:
                    have = [d.node for d in self.daemons.values() if d.service == svc.name]
                    keep = [n for n in have if n in self.nodes]
                    want = {keep[0]} if keep else ({nodes[0].id} if nodes else set())
            have_keys = {k for k, d in self.daemons.items() if d.service == svc.name}
            for key in have_keys:
                inst = self.daemons[key]
                if inst.node not in want:
                    del self.daemons[key]
                    if inst.node in self.nodes:
                        actions.append(Control(svc, inst.node, "stop"))
                    for claim in self.locks.release(key):
                        actions += self._granted(claim, now)
            for node_id in sorted(want):
                inst = DaemonInstance(svc.name, node_id)
                if inst.key in self.daemons:
                    continue
                self.daemons[inst.key] = inst
                claim = Claim(inst.key, svc.name, svc.run_groups, now)
                if self.locks.request(claim):
                    inst.state = "starting"
                    actions.append(Control(svc, node_id, "start"))
        return actions

    def restart_daemons(self) -> list[Action]:
        """Re-send start to every daemon instance that holds its groups (after failover)."""
        return [
            Control(self.services[d.service], d.node, "start")
            for d in self.daemons.values()
            if d.state in ("starting", "running")
        ]

    def _pause_blocking_daemons(self, claim: Claim, now: float) -> list[Action]:
        # A daemon still `starting` is paused once it reports started or resumed: a `paused`
        # report that arrives before then may be an old one (sent to a previous leader), and
        # must not be taken as the answer to this pause.
        actions: list[Action] = []
        for holder in self.locks.blockers(claim):
            inst = self.daemons.get(holder.key)
            if inst is not None and inst.state == "running":
                inst.state = "pausing"
                actions.append(Control(self.services[inst.service], inst.node, "pause"))
        return actions

    def daemon_event(
        self, service: str, node: str, state: str, now: float, *, epoch: int | None = None
    ) -> list[Action]:
        """A worker reports a daemon's state: started, paused, resumed, exited, stopped.

        `epoch` is the one the report carries (that of the last control the node obeyed); a
        report older than this leader's epoch answers a previous leader and is ignored.
        """
        if epoch is not None and epoch < self.epoch:
            return []
        key = DaemonInstance(service, node).key
        inst = self.daemons.get(key)
        if inst is None:
            return []
        actions: list[Action] = []
        if state in ("started", "resumed"):
            if inst.state in ("starting", "running"):
                inst.state = "running"
                self.last_run[service] = now
                self._changes.last_runs[service] = now
                # A conflicting run may have queued while it was starting.
                for w in self.locks.waiting():
                    if any(b.key == key for b in self.locks.blockers(w)):
                        actions += self._pause_blocking_daemons(w, now)
                        break
        elif state == "paused" and inst.state == "pausing":
            inst.state = "paused"
            for claim in self.locks.release(key):
                actions += self._granted(claim, now)
            svc = self.services[service]
            if self.locks.request(Claim(key, service, svc.run_groups, now)):
                inst.state = "running"
                actions.append(Control(svc, node, "resume"))
        return actions

    # == operators ==========================================================================
    def manual_run(self, service: str, now: float, request_id: str) -> list[Action]:
        """Run `service` now, regardless of its schedule. Raises RefusedError with a reason."""
        svc = self.services.get(service)
        if svc is None:
            raise RefusedError(f"unknown service {service!r}")
        if svc.is_daemon:
            raise RefusedError(f"{service!r} is a daemon: daemons cannot be run manually")
        tg = placement.targets(svc, self.nodes.values())
        if tg is None:
            tg = [""]
        elif not tg:
            raise RefusedError(f"no live node holds an allowed role for {service!r}")
        actions: list[Action] = []
        for target in tg:
            rid = f"manual-{request_id}" + (f"@{target}" if target else "")
            if rid in self.runs:
                continue  # the same request delivered twice
            run = Run(
                run_id=rid,
                service=svc.name,
                trigger=Trigger.MANUAL,
                slot=None,
                queued_at=now,
                run_groups=svc.run_groups,
                node=target or None,
                target=target,
                epoch=self.epoch,
            )
            actions += self._admit(run, now)
        return actions

    def update_service(
        self,
        service: str,
        now: float,
        *,
        enabled: bool | None = None,
        schedule: Schedule | None = None,
    ) -> list[Action]:
        """Operator edit: status and schedule. Takes effect at the next slot."""
        base = self.base.get(service)
        if base is None:
            raise RefusedError(f"unknown service {service!r}")
        if schedule is not None and base.is_daemon:
            raise RefusedError(f"{service!r} is a daemon: it has no schedule to edit")
        if schedule is not None and schedule.kind != base.kind.value:
            # Switching between periodic/fixed/cron is allowed, as in the edit dialog.
            pass
        ov = dict(self.overrides.get(service, {}))
        if enabled is not None:
            ov["enabled"] = bool(enabled)
        if schedule is not None:
            ov["schedule"] = schedule.to_dict()
        svc = self._apply(base, ov)
        actions: list[Action] = []
        old = self.services[service]
        due = self.timeline.due_of(service)
        while old.schedule is not None and due is not None and due <= now:
            # A slot that came before the edit (not yet ticked) is handled as it was set up.
            actions += self._fire(old, due, now)
            due = old.schedule.next_after(due, self.tz)
        self.overrides[service] = ov
        self._changes.overrides[service] = ov
        self.services[service] = svc
        if svc.is_daemon:
            return self._reconcile_daemons(now)
        if svc.enabled and svc.schedule is not None:
            # Slots are handled from now on under this schedule; a successor recovers from here,
            # not from slots of the old schedule or from the time the service was disabled.
            self._changes.cursors[service] = now
            self._set_next(svc, now)
        else:
            self.timeline.remove(service)
        return actions

    @staticmethod
    def _apply(base: Service, ov: dict[str, object]) -> Service:
        from protocol.schedule import schedule_from_dict

        svc = base
        if "enabled" in ov:
            svc = replace(svc, enabled=bool(ov["enabled"]))
        if "schedule" in ov and not base.is_daemon:
            sched = schedule_from_dict(ov["schedule"])  # type: ignore[arg-type]
            if sched is None:
                raise ScheduleError("a scheduled service cannot become a daemon")
            svc = replace(svc, schedule=sched, kind=Kind(sched.kind))
        return svc

    # == views ==============================================================================
    def in_queue_since(self, service: str) -> float | None:
        times = [
            r.queued_at for r in self.runs.values()
            if r.service == service
            and r.state is RunState.QUEUED
            and r.attempt == 1  # not retries (of scheduled or manual runs) in their delay
        ]
        times += [
            c.since for c in self.locks.waiting()
            if c.service == service and c.key.startswith("daemon:")
        ]
        return min(times) if times else None

    def drain_changes(self) -> Changes:
        out, self._changes = self._changes, Changes()
        return out
