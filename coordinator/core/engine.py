"""The scheduling engine: the pure heart of the leader.

It owns the timeline of slots, the runs in flight, the run-group lock book, daemon
instances, operator overrides and Last Run. It never touches a broker, ZooKeeper or the
real clock: every method takes `now`, and returns the actions the leader must carry out
(dispatch an order, control a daemon, record a run). Whatever must survive a failover is
reported through `drain_changes()` so the leader can write it to the ledger in one batch.

`Engine` is a facade over its parts, one module each: admission (runs from slots and
requests to their end), recovery (taking over from the ledger), daemons, membership (nodes)
and overrides (operators); their shared state is in `base`.
"""

from __future__ import annotations

import heapq

from coordinator.core.actions import (
    Action,
    Changes,
    Control,
    ControlAction,
    DaemonInterval,
    Dispatch,
    Record,
    RefusedError,
    State,
)
from coordinator.core.admission import Admission
from coordinator.core.base import TimerKind
from coordinator.core.daemons import DaemonInstance, Daemons, DaemonState
from coordinator.core.membership import Membership
from coordinator.core.overrides import Overrides
from coordinator.core.recovery import MAX_MISSED_RECORDS, Recovery
from coordinator.core.run import RunState

__all__ = [
    "MAX_MISSED_RECORDS", "Action", "Changes", "Control", "ControlAction", "DaemonInstance",
    "DaemonInterval", "DaemonState", "Dispatch", "Engine", "Record", "RefusedError", "State",
]


class Engine(Admission, Recovery, Daemons, Membership, Overrides):
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
        with self.timeline.loading():
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

    def next_wakeup(self) -> float | None:
        nxt = self.timeline.peek()
        if nxt is not None:
            nxt -= self.lead
        for heap in (self._at_slot, self._timers):
            if heap and (nxt is None or heap[0][0] < nxt):
                nxt = heap[0][0]
        return nxt

    def tick(self, now: float) -> list[Action]:
        """Fire every slot and timer due at or before `now`; with a lead time, dispatch
        ahead the slots due within it that may go ahead (`Admission._goes_ahead`)."""
        actions: list[Action] = []
        while True:
            due_now = list(self.timeline.pop_due(now + self.lead))
            if not due_now:
                break
            for name, due in due_now:
                svc = self.services.get(name)
                if svc is None or not svc.enabled or svc.schedule is None:
                    continue
                if due <= now:
                    actions += self._fire(svc, due, now)
                elif self._goes_ahead(svc):
                    actions += self._fire_ahead(svc, due, now)
                else:
                    self._defer(svc, due)
                self._set_next(svc, due)
        actions += self._fire_deferred(now)
        while self._timers and self._timers[0][0] <= now:
            _, _, kind, key = heapq.heappop(self._timers)
            if kind is TimerKind.EXPIRE:
                actions += self._expire(key, now)
            elif kind is TimerKind.OVERDUE:
                actions += self._overdue(key, now)
            elif kind is TimerKind.RETRY:
                run = self.runs.get(key)
                if run is not None and run.state is RunState.QUEUED:
                    actions += self._admit(run, now)
        return actions

    def in_queue_since(self, service: str) -> float | None:
        return self.in_queue().get(service)

    def in_queue(self) -> dict[str, float]:
        """In Queue, per service: since when its oldest run has waited for its first attempt
        (retries in their delay do not count, of scheduled or manual runs), or its daemon for
        its run groups. Services with nothing waiting are left out."""
        out: dict[str, float] = {}
        waiting = [
            (r.service, r.queued_at) for r in self.runs.values()
            if r.state is RunState.QUEUED and r.attempt == 1
        ]
        waiting += [(c.service, c.since) for c in self.locks.waiting()
                    if c.key.startswith("daemon:")]
        for service, since in waiting:
            out[service] = min(out.get(service, since), since)
        return out

    def waiting(self) -> tuple[int, int, float | None]:
        """Runs waiting for their run groups, runs granted them but waiting for a node with
        room, and since when the oldest of either has waited (None: nothing waits)."""
        for_groups = [c.since for c in self.locks.waiting() if not c.key.startswith("daemon:")]
        for_room = [self.runs[r].queued_at for r in self._full if r in self.runs]
        oldest = min(for_groups + for_room, default=None)
        return len(for_groups), len(for_room), oldest

    def groups_held(self) -> set[str]:
        """Run groups some run or daemon holds now."""
        return {g for c in self.locks.holders() for g in c.groups}

    def drain_changes(self) -> Changes:
        out, self._changes = self._changes, Changes()
        return out
