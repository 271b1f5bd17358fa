"""What the engine asks the leader to carry out, and what it asks the ledger to keep.

Every engine method returns a list of actions; `Changes` collects, between two drains, what
must survive a failover; `State` is what a new leader restores from the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum

from coordinator.core.run import Run
from protocol.service import Service


class ControlAction(StrEnum):
    START = "start"
    STOP = "stop"
    PAUSE = "pause"
    RESUME = "resume"


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
    action: ControlAction


@dataclass(frozen=True, slots=True)
class Record:
    """A run changed state: publish it, and keep it in history when it is terminal.

    Holds a copy of the run as it was when recorded: the run itself moves on.
    """

    run: Run

    def __post_init__(self) -> None:
        object.__setattr__(self, "run", replace(self.run))


@dataclass(frozen=True, slots=True)
class DaemonInterval:
    """A daemon's stretch on a node, from a start or resume to a pause, stop, exit or loss:
    publish it as a record (open while `finished` is None). It is named after the instant the
    worker began it, which the worker sends again with the end, so any leader can close it."""

    service: str
    node: str
    began: float
    finished: float | None
    state: str  # running | succeeded | failed | lost
    run_groups: tuple[str, ...]
    epoch: int
    error: str | None = None
    output_tail: str = ""
    reason: str | None = None

    @property
    def run_id(self) -> str:
        return f"daemon:{self.service}@{self.node}#{self.began:.3f}"


Action = Dispatch | Control | Record | DaemonInterval


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
