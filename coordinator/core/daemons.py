"""Daemons: one instance per enabled daemon and eligible live node, holding its run groups
while it runs, paused for a conflicting run and resumed after it; and the intervals it
ran, as the records of its history.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from coordinator.core import placement
from coordinator.core.actions import Action, Control, ControlAction, DaemonInterval
from coordinator.core.base import EngineBase
from coordinator.core.rungroup import Claim
from protocol.service import Placement


class DaemonState(StrEnum):
    WAITING = "waiting"  # for its run groups
    STARTING = "starting"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"


@dataclass(slots=True)
class DaemonInstance:
    service: str
    node: str
    state: DaemonState = DaemonState.WAITING

    @property
    def key(self) -> str:
        return daemon_key(self.service, self.node)


def daemon_key(service: str, node: str) -> str:
    return f"daemon:{service}@{node}"


@dataclass(frozen=True, slots=True)
class OpenInterval:
    """A daemon interval seen opening: a start or resume whose end is yet to come."""

    service: str
    node: str
    began: float
    run_groups: tuple[str, ...]
    epoch: int

    def lost(self, at: float, reason: str) -> DaemonInterval:
        return DaemonInterval(self.service, self.node, self.began, max(self.began, at), "lost",
                              self.run_groups, self.epoch, reason=reason)


class Daemons(EngineBase):
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
                        actions.append(Control(svc, inst.node, ControlAction.STOP))
                    for claim in self.locks.release(key):
                        actions += self._granted(claim, now)
            for node_id in sorted(want):
                inst = DaemonInstance(svc.name, node_id)
                if inst.key in self.daemons:
                    continue
                self.daemons[inst.key] = inst
                claim = Claim(inst.key, svc.name, svc.run_groups, now)
                if self.locks.request(claim):
                    inst.state = DaemonState.STARTING
                    actions.append(Control(svc, node_id, ControlAction.START))
        return actions

    def _pause_blocking_daemons(self, claim: Claim, now: float) -> list[Action]:
        # A daemon still `starting` is paused once it reports started or resumed: a `paused`
        # report that arrives before then may be an old one (sent to a previous leader), and
        # must not be taken as the answer to this pause.
        actions: list[Action] = []
        for holder in self.locks.blockers(claim):
            inst = self.daemons.get(holder.key)
            if inst is not None and inst.state is DaemonState.RUNNING:
                inst.state = DaemonState.PAUSING
                actions.append(
                    Control(self.services[inst.service], inst.node, ControlAction.PAUSE)
                )
        return actions

    def daemon_event(
        self,
        service: str,
        node: str,
        state: str,
        now: float,
        *,
        epoch: int | None = None,
        at: float | None = None,
        started_at: float | None = None,
        error: str | None = None,
        output_tail: str = "",
    ) -> list[Action]:
        """A worker reports a daemon's state: started, paused, resumed, exited, stopped.

        `epoch` is the one the report carries (that of the last control the node obeyed); a
        report older than this leader's epoch answers a previous leader and is ignored, but
        the interval it opens or closes is recorded all the same. `at` is when it happened on
        the worker; an end carries `started_at`, when the interval it ends began.
        """
        key = daemon_key(service, node)
        if self._stale_report(key, state, now if at is None else at, started_at):
            return []
        actions = self._interval(service, node, state, now if at is None else at,
                                 started_at, self.epoch if epoch is None else epoch,
                                 error, output_tail)
        if epoch is not None and epoch < self.epoch:
            return actions
        inst = self.daemons.get(key)
        if inst is None:
            return actions
        if state in ("started", "resumed"):
            if inst.state in (DaemonState.STARTING, DaemonState.RUNNING):
                inst.state = DaemonState.RUNNING
                self.last_run[service] = now
                self._changes.last_runs[service] = now
                # A conflicting run may have queued while it was starting.
                for w in self.locks.waiting():
                    if any(b.key == key for b in self.locks.blockers(w)):
                        actions += self._pause_blocking_daemons(w, now)
                        break
        elif state == "paused" and inst.state is DaemonState.PAUSING:
            inst.state = DaemonState.PAUSED
            for claim in self.locks.release(key):
                actions += self._granted(claim, now)
            svc = self.services[service]
            if self.locks.request(Claim(key, service, svc.run_groups, now)):
                inst.state = DaemonState.RUNNING
                actions.append(Control(svc, node, ControlAction.RESUME))
        return actions

    def _stale_report(self, key: str, state: str, at: float, started_at: float | None) -> bool:
        """A report about an interval older than what is known of this daemon: delivered
        twice, or overtaken. Acting on it could take a daemon for paused while it runs.

        An interval is named by the worker's instant it began: a start or resume older than
        the open interval, or an end of an interval already closed or older than the open
        one, is stale. A `paused` without `started_at` (a worker acknowledging a pause of a
        daemon it had parked already) is stale while an interval is known to be open.
        """
        opened = self.intervals.get(key)
        closed = self.closed_began.get(key)
        if state in ("started", "resumed"):
            return ((opened is not None and at < opened.began)
                    or (closed is not None and at <= closed))
        if state in ("paused", "stopped", "exited"):
            if started_at is None:
                return state == "paused" and opened is not None
            return ((opened is not None and started_at < opened.began)
                    or (closed is not None and started_at <= closed))
        return False

    def _interval(
        self, service: str, node: str, state: str, at: float, started_at: float | None,
        epoch: int, error: str | None, output_tail: str,
    ) -> list[Action]:
        """The interval a daemon report opens or closes, as an action to record."""
        key = daemon_key(service, node)
        svc = self.services.get(service)
        groups = tuple(sorted(svc.run_groups)) if svc else ()
        if state in ("started", "resumed"):
            out: list[Action] = []
            opened = self.intervals.get(key)
            if opened is not None and opened.began != at and state == "started":
                # A fresh start while an interval is open: the node's worker was restarted
                # and the instance it ran ended with it.
                out.append(opened.lost(at, "its worker restarted"))
            self.intervals[key] = OpenInterval(service, node, at, groups, epoch)
            out.append(DaemonInterval(service, node, at, None, "running", groups, epoch, error,
                                      output_tail, reason=state))
            return out
        if state in ("paused", "stopped", "exited") and started_at is not None:
            self.intervals.pop(key, None)
            self.closed_began[key] = max(started_at, self.closed_began.get(key, started_at))
            outcome = "failed" if state == "exited" else "succeeded"
            return [DaemonInterval(service, node, started_at, at, outcome, groups, epoch, error,
                                   output_tail, reason=state)]
        return []

    def _close_intervals(self, node_id: str, now: float, reason: str) -> list[Action]:
        """End the daemon intervals of a node whose session ended: its daemons died with it."""
        out: list[Action] = []
        for key in [k for k, iv in self.intervals.items() if iv.node == node_id]:
            out.append(self.intervals.pop(key).lost(now, reason))
        return out
