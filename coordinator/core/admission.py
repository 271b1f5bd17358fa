"""Run admission: a slot or request becomes a run; the overlap policy, run groups, placement,
dispatch, the end of a run (and who goes next), retries and the timers that end runs whose
worker went silent.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import replace

from coordinator.core import placement
from coordinator.core.actions import Action, Control, ControlAction, Dispatch, Record
from coordinator.core.base import EngineBase, TimerKind
from coordinator.core.daemons import DaemonState
from coordinator.core.run import Run, RunState, Trigger
from coordinator.core.rungroup import Claim
from protocol import run_id_for
from protocol.service import Overlap, Placement, Service


class Admission(EngineBase):
    # -- dispatching ahead ------------------------------------------------------------------
    def _goes_ahead(self, svc: Service) -> bool:
        """Whether a slot of `svc` due within the lead time may be dispatched now, its order
        carrying the slot as the instant to start: only when nothing about it can change
        before the slot. A run holding run groups waits for the leader's grant, and a run
        behind one of the same service in flight waits for that run's end (overlap policy),
        so those fire at their slot, as do later slots of a service with a slot waiting."""
        if svc.run_groups or svc.name in self._deferred:
            return False
        if not placement.any_eligible(svc, self.nodes.values()):
            return False  # whether a node comes up before the slot is for the slot to tell
        tg = placement.targets(svc, self.nodes.values())
        keys = [(svc.name, t) for t in (tg if tg is not None else [""])]
        return not any(k in self._inflight or k in self._pending for k in keys)

    def _fire_ahead(self, svc: Service, slot: float, now: float) -> list[Action]:
        if svc.placement is Placement.ALL:
            self._ahead_all[svc.name] = slot
        return self._fire(svc, slot, now)

    def _ahead_for_new_node(self, now: float) -> list[Action]:
        """A node came up: `all` slots dispatched ahead whose instant has not come owe it a
        run too, as they would had they fired at their instant."""
        actions: list[Action] = []
        for name, slot in list(self._ahead_all.items()):
            svc = self.services.get(name)
            if slot <= now or svc is None or not svc.enabled or svc.schedule is None:
                del self._ahead_all[name]
                continue
            actions += self._fire(svc, slot, now)  # runs only for targets it lacks
        return actions

    def _defer(self, svc: Service, slot: float) -> None:
        """Fire `svc`'s `slot` at its instant instead of ahead."""
        heapq.heappush(self._at_slot, (slot, next(self._seq), svc.name))
        self._deferred[svc.name] = self._deferred.get(svc.name, 0) + 1

    def _fire_deferred(self, now: float) -> list[Action]:
        actions: list[Action] = []
        while self._at_slot and self._at_slot[0][0] <= now:
            slot, _, name = heapq.heappop(self._at_slot)
            self._undefer(name)
            svc = self.services.get(name)
            if svc is not None and svc.enabled and svc.schedule is not None:
                actions += self._fire(svc, slot, now)
        return actions

    def _undefer(self, name: str) -> None:
        left = self._deferred.get(name, 0) - 1
        if left > 0:
            self._deferred[name] = left
        else:
            self._deferred.pop(name, None)

    def _take_deferred(self, name: str) -> list[float]:
        """Remove the deferred slots of `name` (an operator edits it): their instants."""
        if name not in self._deferred:
            return []
        taken = sorted(e[0] for e in self._at_slot if e[2] == name)
        self._at_slot = [e for e in self._at_slot if e[2] != name]
        heapq.heapify(self._at_slot)
        del self._deferred[name]
        return taken

    # -- slots and runs ---------------------------------------------------------------------
    def _fire(self, svc: Service, slot: float, now: float) -> list[Action]:
        self._changes.cursors[svc.name] = slot
        tg = placement.targets(svc, self.nodes.values())
        if tg is None:
            tg = [""]
        elif not tg:
            return self._skip(svc, slot, "", now, "no live node holds an allowed role")
        actions: list[Action] = []
        for target in tg:
            run = self._slot_run(svc, slot, target, now)
            if self.knows(run.run_id):
                # Already created for this slot: recovery overlap, or an edit made after the
                # slot's order went ahead set the timeline to the same slot again.
                continue
            actions += self._admit(run, now)
        return actions

    def _slot_run(
        self, svc: Service, slot: float, target: str, now: float,
        state: RunState = RunState.QUEUED, reason: str | None = None,
    ) -> Run:
        """The run of `svc`'s `slot` on `target` ("" when not yet placed)."""
        return Run(
            run_id=run_id_for(svc.name, slot, target or None),
            service=svc.name,
            trigger=Trigger.SCHEDULED,
            slot=slot,
            queued_at=now,
            run_groups=svc.run_groups,
            node=target or None,
            target=target,
            state=state,
            reason=reason,
            epoch=self.epoch,
        )

    def _skip(
        self, svc: Service, slot: float, target: str, now: float, reason: str
    ) -> list[Action]:
        run = self._slot_run(svc, slot, target, now, state=RunState.SKIPPED, reason=reason)
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
            run.node, run.placement = placement.choose_one(
                svc, self.nodes.values(), self._load, self.rank, self.nodes_out)
        elif run.node not in self.nodes:
            run.node = None
        if run.node is None:
            if not run.target and placement.any_eligible(svc, self.nodes.values()):
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
        initiated = run.start_at or now  # a run dispatched ahead is initiated at its slot
        self.last_run[run.service] = initiated
        self._changes.last_runs[run.service] = initiated
        self._changes.runs[run.run_id] = run
        self._timer(self._expiry_of(run), TimerKind.EXPIRE, run.run_id)
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
        self._timer(retry.queued_at, TimerKind.RETRY, retry.run_id)
        return [Record(retry)]

    def _granted(self, claim: Claim, now: float) -> list[Action]:
        if claim.key.startswith("daemon:"):
            inst = self.daemons.get(claim.key)
            if inst is None:
                out: list[Action] = []
                for granted in self.locks.release(claim.key):
                    out += self._granted(granted, now)
                return out
            paused = inst.state is DaemonState.PAUSED
            action = ControlAction.RESUME if paused else ControlAction.START
            inst.state = DaemonState.RUNNING if paused else DaemonState.STARTING
            return [Control(self.services[inst.service], inst.node, action)]
        run = self.runs.get(claim.key)
        if run is None or run.state is not RunState.QUEUED:
            return []
        return self._dispatch(run, now)

    def run_started(self, run_id: str, node: str, at: float, now: float) -> list[Action]:
        run = self.runs.get(run_id)
        if run is None or run.state is not RunState.DISPATCHED or run.node != node:
            return []
        run.move(RunState.RUNNING)
        run.started_at = at
        self._changes.runs[run_id] = run
        self._timer(self._overdue_at(run, now), TimerKind.OVERDUE, run_id)
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
