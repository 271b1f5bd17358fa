"""Recovery: a new leader adopts the active runs of the ledger, ends those whose node session
ended meanwhile, queues again what waited, re-sends orders that may never have left, and
recovers the slots missed while no leader ran.
"""

from __future__ import annotations

from collections import deque

from coordinator.core.actions import Action, Dispatch
from coordinator.core.base import EngineBase, TimerKind
from coordinator.core.run import Run, RunState, Trigger
from coordinator.core.rungroup import Claim
from protocol import run_id_for
from protocol.service import Service

MAX_MISSED_RECORDS = 100  # per service and recovery; the rest are summed up in one record

class Recovery(EngineBase):
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
                self._timer(self._expiry_of(run), TimerKind.EXPIRE, run.run_id)
            else:
                self._timer(self._overdue_at(run, now), TimerKind.OVERDUE, run.run_id)
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
                self._timer(run.queued_at, TimerKind.RETRY, run.run_id)  # still in its retry delay
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

    def _recover(self, svc: Service, cursor: float, now: float) -> list[Action]:
        """Slots between the last one handled and now: the latest runs if young enough."""
        assert svc.schedule is not None
        t = svc.schedule.next_after(cursor, self.tz)
        if t > now:  # nothing missed: the usual case, kept short for 100,000 services
            self.timeline.set(svc.name, t)
            return []
        actions: list[Action] = []
        due: list[float] = []
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
