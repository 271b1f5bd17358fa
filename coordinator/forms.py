"""Every form a run takes outside the engine, made in one place.

- the order a worker executes (`order_of`) and the control a daemon obeys (`control_of`);
- the record published on `rota.events` and kept in history (`record_of`, `interval_record`,
  and the records of refused orders and requests);
- the ledger entry a successor resumes from (`run_to_message`, `run_from_message`);
- an operator edit's change-log entry on `rota.events` (`change_of`).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from coordinator.core.actions import Control, DaemonInterval
from coordinator.core.run import Run, RunState, Trigger
from protocol import DaemonControl, LedgerRun, RunEvent, RunOrder, RunRecord, ServiceChange
from protocol.service import Service

Params = dict[str, str | int | float | bool]

FINAL_STATES = frozenset(s.value for s in RunState if s.terminal)


# -- to the workers --------------------------------------------------------------------
def params_of(raw: Mapping[str, object]) -> Params:
    """A service's parameters as orders carry them (the catalogue admits no other values)."""
    return {k: v for k, v in raw.items() if isinstance(v, str | int | float | bool)}


def order_of(run: Run, svc: Service, epoch: int, now: float, params: Params) -> RunOrder:
    assert run.node is not None and run.deadline is not None
    return RunOrder(
        run_id=run.run_id, service=svc.name, node=run.node, trigger=run.trigger.value,
        slot=run.slot, attempt=run.attempt, epoch=epoch, issued_at=now,
        deadline=run.deadline, timeout=svc.timeout, callable=svc.utility.callable,
        command=list(svc.utility.command) if svc.utility.command else None,
        run_groups=sorted(svc.run_groups), params=params,
        allowed_roles=sorted(svc.allowed_roles), incarnation=run.incarnation,
        start_at=run.start_at,
    )


def control_of(c: Control, epoch: int, now: float, params: Params,
               incarnation: str | None, seq: int = 0) -> DaemonControl:
    svc = c.service
    return DaemonControl(
        control_id=uuid.uuid4().hex[:16], service=svc.name, node=c.node, seq=seq,
        action=c.action.value, epoch=epoch, issued_at=now, callable=svc.utility.callable,
        command=list(svc.utility.command) if svc.utility.command else None,
        run_groups=sorted(svc.run_groups), params=params,
        allowed_roles=sorted(svc.allowed_roles), incarnation=incarnation,
    )


# -- to rota.events and history ----------------------------------------------------------
def record_of(run: Run) -> RunRecord:
    return RunRecord(
        run_id=run.run_id,
        service=run.service,
        node=run.node,
        trigger=run.trigger.value,
        slot=run.slot,
        queued_at=run.queued_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        state=run.state.value,
        outcome=run.outcome,
        run_groups=sorted(run.run_groups),
        epoch=run.epoch,
        error=run.error,
        output_tail=run.output_tail,
        reason=run.reason,
        attempt=run.attempt,
        placement=run.placement,
    )


def interval_record(iv: DaemonInterval) -> RunRecord:
    """A daemon interval as a run record: open (running) until it has a finish."""
    return RunRecord(
        run_id=iv.run_id, service=iv.service, node=iv.node, trigger="daemon", slot=None,
        queued_at=iv.began, started_at=iv.began, finished_at=iv.finished, state=iv.state,
        outcome=None if iv.finished is None else iv.state, run_groups=list(iv.run_groups),
        epoch=iv.epoch, error=iv.error, output_tail=iv.output_tail, reason=iv.reason,
        attempt=1,
    )


def refused_order_record(ev: RunEvent) -> RunRecord:
    """A worker refused an order this leader never gave (forged, or a deposed leader's)."""
    return RunRecord(
        run_id=ev.run_id, service=ev.service, node=ev.node, trigger=Trigger.SCHEDULED.value,
        slot=None, queued_at=ev.at, started_at=None, finished_at=ev.at,
        state=RunState.REJECTED.value, outcome=RunState.REJECTED.value, run_groups=[],
        epoch=ev.epoch, error=None, output_tail="", reason=ev.reason, attempt=1,
    )


def refused_request_record(request_id: str, service: str, reason: str, now: float,
                           epoch: int) -> RunRecord:
    """An operator request the engine refused, shown as a rejected manual run."""
    return RunRecord(
        run_id=f"manual-{request_id}", service=service, node=None,
        trigger=Trigger.MANUAL.value, slot=None, queued_at=now, started_at=None,
        finished_at=now, state=RunState.REJECTED.value, outcome=RunState.REJECTED.value,
        run_groups=[], epoch=epoch, error=None, output_tail="", reason=reason, attempt=1,
    )


def change_of(request_id: str, at: float, by: str, service: str, field: str, old: object,
              new: object, epoch: int, refused: str | None = None) -> ServiceChange:
    """One field of an operator edit, applied or (with its reason) refused."""
    return ServiceChange(
        request_id=request_id, at=at, by=by, service=service, field=field,
        old=_change_value(old), new=_change_value(new),
        outcome="refused" if refused else "applied", reason=refused, epoch=epoch,
    )


def _change_value(value: object) -> str | int | float | bool | None:
    """A value as the change log keeps it: scalars as they are, anything else as text."""
    if value is None or isinstance(value, bool | str):
        return value if not isinstance(value, str) else value[:200]
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return value
    if isinstance(value, float) and value == value and abs(value) != float("inf"):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return ", ".join(value)[:200]
    return repr(value)[:200]


def is_final(rec: RunRecord) -> bool:
    """Whether the record ends its run (or daemon interval): history keeps those."""
    return rec.state in FINAL_STATES or (rec.trigger == "daemon" and rec.finished_at is not None)


# -- to and from the ledger --------------------------------------------------------------
def run_to_message(run: Run) -> LedgerRun:
    return LedgerRun(
        run_id=run.run_id,
        service=run.service,
        node=run.node,
        target=run.target,
        trigger=run.trigger.value,
        slot=run.slot,
        queued_at=run.queued_at,
        dispatched_at=run.dispatched_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        deadline=run.deadline,
        state=run.state.value,
        run_groups=sorted(run.run_groups),
        epoch=run.epoch,
        attempt=run.attempt,
        error=run.error,
        output_tail=run.output_tail,
        reason=run.reason,
        metrics=dict(run.metrics),
        incarnation=run.incarnation,
        placement=run.placement,
    )


def run_from_message(m: LedgerRun) -> Run:
    return Run(
        run_id=m.run_id,
        service=m.service,
        trigger=Trigger(m.trigger),
        slot=m.slot,
        queued_at=m.queued_at,
        run_groups=frozenset(m.run_groups),
        node=m.node,
        target=m.target,
        attempt=m.attempt,
        state=RunState(m.state),
        dispatched_at=m.dispatched_at,
        started_at=m.started_at,
        finished_at=m.finished_at,
        deadline=m.deadline,
        epoch=m.epoch,
        error=m.error,
        output_tail=m.output_tail,
        reason=m.reason,
        metrics=dict(m.metrics),
        incarnation=m.incarnation,
        placement=m.placement,
    )
