"""The operator's view of the service table: the seed's columns, computed from the engine.

Status, Name, Schedule, Allowed Nodes, Run Groups, Last Run, In Queue, grouped as the
seed groups them (Daemon / Periodical / Fixed Time, and Cron for cron services).
"""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.core.engine import DaemonState, Engine
from coordinator.core.run import RunState
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


def rows(engine: Engine) -> list[Row]:
    """One row per service, in display order. In Queue is the engine's own computation
    (`Engine.in_queue`): runs waiting for their first attempt, and daemons waiting
    for their run groups; retries in their delay do not count."""
    running: dict[str, int] = {}
    for run in engine.runs.values():
        if run.state in (RunState.DISPATCHED, RunState.RUNNING):
            running[run.service] = running.get(run.service, 0) + 1
    for d in engine.daemons.values():
        if d.state in (DaemonState.STARTING, DaemonState.RUNNING, DaemonState.PAUSING):
            running[d.service] = running.get(d.service, 0) + 1
    queued = engine.in_queue()
    out: list[Row] = []
    for kind in GROUP_ORDER:
        for svc in engine.services.values():
            if svc.kind is not kind:
                continue
            out.append(
                Row(
                    name=svc.name,
                    kind=kind.value,
                    enabled=svc.enabled,
                    schedule=schedule_text(svc),
                    allowed_nodes=sorted(svc.allowed_roles),
                    run_groups=sorted(svc.run_groups),
                    last_run=engine.last_run.get(svc.name),
                    in_queue=queued.get(svc.name),
                    running=running.get(svc.name, 0),
                    description=svc.description,
                )
            )
    return out


@dataclass(frozen=True)
class Snapshot:
    """What the page and the table show, as of the end of one leader turn. Built by the
    leader's thread and never changed after: readers take it without any lock."""

    rows: tuple[Row, ...]
    epoch: int
    active: int  # runs queued, dispatched or running
    waiting: int  # runs and daemons waiting for their run groups
    daemons_running: int


def snapshot(engine: Engine) -> Snapshot:
    return Snapshot(
        rows=tuple(rows(engine)),
        epoch=engine.epoch,
        active=len(engine.runs),
        waiting=len(engine.locks.waiting()),
        daemons_running=sum(1 for d in engine.daemons.values()
                            if d.state is DaemonState.RUNNING),
    )
