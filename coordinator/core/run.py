"""Runs and their state machine.

    queued ──> dispatched ──> running ──> succeeded | failed | timed_out | rejected
       │            │            └──────> lost (its node died)
       │            └──> rejected (worker refused: stale epoch, past deadline) | lost | expired
       └──> expired (never started before its deadline)

Slots that never become a run are recorded directly as skipped or missed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class RunState(StrEnum):
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    LOST = "lost"
    EXPIRED = "expired"
    REJECTED = "rejected"
    SKIPPED = "skipped"
    MISSED = "missed"

    @property
    def terminal(self) -> bool:
        return self not in _ACTIVE


_ACTIVE = {RunState.QUEUED, RunState.DISPATCHED, RunState.RUNNING}

_ALLOWED: dict[RunState, set[RunState]] = {
    RunState.QUEUED: {RunState.DISPATCHED, RunState.EXPIRED, RunState.SKIPPED, RunState.LOST},
    RunState.DISPATCHED: {
        RunState.RUNNING,
        RunState.REJECTED,
        RunState.LOST,
        RunState.EXPIRED,
        RunState.SUCCEEDED,  # a fast run whose "started" event arrived after "finished"
        RunState.FAILED,
        RunState.TIMED_OUT,
    },
    RunState.RUNNING: {
        RunState.SUCCEEDED,
        RunState.FAILED,
        RunState.TIMED_OUT,
        RunState.LOST,
        RunState.REJECTED,  # a worker refusing an order it had reported started
    },
}


class Trigger(StrEnum):
    SCHEDULED = "scheduled"
    MANUAL = "manual"
    RETRY = "retry"


class TransitionError(ValueError):
    pass


@dataclass(slots=True)
class Run:
    run_id: str
    service: str
    trigger: Trigger
    slot: float | None
    queued_at: float
    run_groups: frozenset[str]
    node: str | None = None  # fixed for `all` placement; chosen at dispatch for `one`
    target: str = ""  # the overlap key: node id for `all`, "" for `one`
    attempt: int = 1
    state: RunState = RunState.QUEUED
    dispatched_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    deadline: float | None = None
    epoch: int = 0
    error: str | None = None
    output_tail: str = ""
    reason: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    incarnation: str | None = None  # the session of `node` it was dispatched to
    placement: str | None = None  # why it went to its node (`one` services)

    @property
    def start_at(self) -> float | None:
        """When its worker is to start it: its slot, for a scheduled run dispatched ahead of
        the slot; None for a run to start as soon as its order arrives."""
        if (self.trigger is Trigger.SCHEDULED and self.slot is not None
                and self.dispatched_at is not None and self.dispatched_at < self.slot):
            return self.slot
        return None

    def move(self, to: RunState) -> None:
        if to not in _ALLOWED.get(self.state, set()):
            raise TransitionError(f"run {self.run_id}: {self.state} -> {to} is not allowed")
        self.state = to

    @property
    def active(self) -> bool:
        return not self.state.terminal

    @property
    def outcome(self) -> str | None:
        return self.state.value if self.state.terminal else None
