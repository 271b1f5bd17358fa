"""The operator's view of the service table: the seed's columns, computed from the engine.

Status, Name, Schedule, Allowed Nodes, Run Groups, Last Run, In Queue, grouped as the
seed groups them (Daemon / Periodical / Fixed Time, and Cron for cron services).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

from coordinator.core.engine import DaemonState, Engine
from coordinator.core.run import RunState
from protocol.schedule import Cron, FixedTimes, Periodic
from protocol.service import Kind, Service

GROUP_TITLES = {
    Kind.DAEMON: "Daemon Services",
    Kind.FIXED: "Fixed Time Services",
    Kind.PERIODIC: "Periodical Services",
    Kind.CRON: "Cron Services",
}
GROUP_ORDER = (Kind.DAEMON, Kind.FIXED, Kind.PERIODIC, Kind.CRON)


@dataclass(frozen=True)
class Row:
    name: str
    kind: str
    enabled: bool
    schedule: str
    allowed_nodes: list[str]
    run_groups: list[str]
    last_run: float | None
    in_queue: float | None
    running: int
    description: str
    group: str = ""
    placement: str = "one"
    definition: dict[str, Any] = field(default_factory=dict)
    """What the edit dialog fills in: kind, enabled, period, align, run_at, cron."""


class ActiveRun(NamedTuple):
    """A run not ended yet, as of the end of a turn (queued, dispatched or running)."""

    run_id: str
    service: str
    node: str | None
    trigger: str
    slot: float | None
    queued_at: float
    started_at: float | None
    state: str
    attempt: int


class NodeView(NamedTuple):
    id: str
    roles: tuple[str, ...]
    live_since: float | None
    runs_now: int
    daemons: tuple[str, ...]
    capacity: int
    out_of_placement: bool = False
    """A ranking threshold keeps `one` runs off this node until it recovers."""


def definition(svc: Service) -> dict[str, Any]:
    sched = svc.schedule
    return {
        "kind": svc.kind.value,
        "enabled": svc.enabled,
        "period": sched.period if isinstance(sched, Periodic) else None,
        "align": sched.align if isinstance(sched, Periodic) else None,
        "run_at": ([f"{h:02d}:{m:02d}" for h, m in sched.times]
                   if isinstance(sched, FixedTimes) else []),
        "cron": sched.expr if isinstance(sched, Cron) else None,
    }


def ago(seconds: float) -> str:
    """`HH:MM:SS ago`, with days in front past 24 hours, as the seed's table shows."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    text = f"{h:02d}:{m:02d}:{s:02d}"
    return f"{days}d {text}" if days else text


def schedule_text(svc: Service) -> str:
    if svc.schedule is None:
        return "—"
    return svc.schedule.describe()


_STATIC: dict[int, tuple[Service, tuple[Any, ...]]] = {}
"""What a row shows of a service that only changes with the service, by service object: a
turn rebuilds the table from it without recomputing texts and lists for every service."""


def _static(svc: Service) -> tuple[Any, ...]:
    found = _STATIC.get(id(svc))
    if found is not None and found[0] is svc:
        return found[1]
    parts = (svc.name, schedule_text(svc), sorted(svc.allowed_roles), sorted(svc.run_groups),
             svc.description, svc.group or GROUP_TITLES[svc.kind], svc.placement.value,
             definition(svc))
    _STATIC[id(svc)] = (svc, parts)
    return parts


def rows(engine: Engine, active: list[ActiveRun] | None = None,
         daemons_on: dict[str, list[str]] | None = None,
         runs_on: dict[str, int] | None = None) -> list[Row]:
    """One row per service, in display order. In Queue is the engine's own computation
    (`Engine.in_queue`): runs waiting for their first attempt, and daemons waiting
    for their run groups; retries in their delay do not count."""
    running = _running(engine, active, daemons_on, runs_on)
    return build_rows(engine.services, engine.last_run, engine.in_queue(), running)


def _running(engine: Engine, active: list[ActiveRun] | None = None,
             daemons_on: dict[str, list[str]] | None = None,
             runs_on: dict[str, int] | None = None) -> dict[str, int]:
    """Runs and daemons going now, by service (and the active runs, daemons and runs by
    node, into the lists given): work in proportion to what runs, not to the services."""
    running: dict[str, int] = {}
    for run in engine.runs.values():
        if run.state in (RunState.DISPATCHED, RunState.RUNNING):
            running[run.service] = running.get(run.service, 0) + 1
            if runs_on is not None and run.node:
                runs_on[run.node] = runs_on.get(run.node, 0) + 1
        if active is not None:
            active.append(ActiveRun(run.run_id, run.service, run.node, run.trigger.value,
                                    run.slot, run.queued_at, run.started_at, run.state.value,
                                    run.attempt))
    for d in engine.daemons.values():
        if d.state in (DaemonState.STARTING, DaemonState.RUNNING, DaemonState.PAUSING):
            running[d.service] = running.get(d.service, 0) + 1
            if daemons_on is not None:
                daemons_on.setdefault(d.node, []).append(d.service)
    return running


def _row(svc: Service, last_run: Mapping[str, float], queued: Mapping[str, float],
         running: Mapping[str, int]) -> Row:
    name, schedule, allowed, groups, description, group, placement, defn = _static(svc)
    return Row(name, svc.kind.value, svc.enabled, schedule, allowed, groups,
               last_run.get(name), queued.get(name), running.get(name, 0),
               description, group, placement, defn)


def build_rows(services: Mapping[str, Service], last_run: Mapping[str, float],
               queued: Mapping[str, float], running: Mapping[str, int]) -> list[Row]:
    """The table's rows, in display order, from the services and what changes with runs."""
    out: list[Row] = []
    for kind in GROUP_ORDER:
        out += [_row(svc, last_run, queued, running)
                for svc in services.values() if svc.kind is kind]
    if len(_STATIC) > 2 * len(services) + 1000:
        _STATIC.clear()  # services replaced by edits or reloads: drop what no one uses
    return out


@dataclass(frozen=True)
class Snapshot:
    """What the page and the table show, as of the end of one leader turn. Built by the
    leader's thread and never changed after: readers take it without any lock.

    The leader copies only what changes with runs (last runs, queued and running counts);
    the rows, whose number grows with the catalogue, are built by the first reader that
    asks for them, on its own thread."""

    epoch: int
    active: int  # runs queued, dispatched or running
    waiting: int  # runs and daemons waiting for their run groups
    daemons_running: int
    runs: tuple[ActiveRun, ...] = ()
    nodes: tuple[NodeView, ...] = ()
    leader: str = ""
    services: dict[str, Service] = field(default_factory=dict)
    """The services as they run now (operator edits applied), by name."""
    last_run: dict[str, float] = field(default_factory=dict)
    queued: dict[str, float] = field(default_factory=dict)
    running: dict[str, int] = field(default_factory=dict)

    @cached_property
    def rows(self) -> tuple[Row, ...]:
        return tuple(build_rows(self.services, self.last_run, self.queued, self.running))

    def row(self, name: str) -> Row | None:
        svc = self.services.get(name)
        return None if svc is None else _row(svc, self.last_run, self.queued, self.running)


def snapshot(engine: Engine, leader: str = "") -> Snapshot:
    active: list[ActiveRun] = []
    daemons_on: dict[str, list[str]] = {}
    runs_on: dict[str, int] = {}
    running = _running(engine, active, daemons_on, runs_on)
    nodes = tuple(
        NodeView(n.id, tuple(sorted(n.roles)), n.started_at, runs_on.get(n.id, 0),
                 tuple(sorted(daemons_on.get(n.id, ()))), n.capacity, n.id in engine.nodes_out)
        for n in sorted(engine.nodes.values(), key=lambda n: n.id)
    )
    return Snapshot(
        epoch=engine.epoch,
        active=len(engine.runs),
        waiting=len(engine.locks.waiting()),
        daemons_running=sum(1 for d in engine.daemons.values()
                            if d.state is DaemonState.RUNNING),
        runs=tuple(active),
        nodes=nodes,
        leader=leader,
        services=dict(engine.services),
        last_run=dict(engine.last_run),
        queued=engine.in_queue(),
        running=running,
    )
