"""The engine's state, shared by the parts that make up `Engine` (coordinator/core/engine.py).

Each part (admission, recovery, daemons, membership, overrides) is a mixin over this base: the
state lives here, with the few helpers every part uses, and the base names the methods one
part calls on another, so each module can be read (and type-checked) alone.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from enum import StrEnum
from zoneinfo import ZoneInfo

from coordinator.core.actions import Action, Changes, Record
from coordinator.core.node import Node
from coordinator.core.run import Run, RunState
from coordinator.core.rungroup import Claim, LockBook
from coordinator.core.slot import Timeline
from protocol.schedule import zone
from protocol.service import Service


class TimerKind(StrEnum):
    EXPIRE = "expire"  # a dispatched run not started by its deadline (plus a grace)
    OVERDUE = "overdue"  # a running run whose end was not reported in time
    RETRY = "retry"  # a retry's delay is over


class EngineBase:
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
        lead: float = 0.0,
    ) -> None:
        from coordinator.core.daemons import DaemonInstance, OpenInterval

        self.base: dict[str, Service] = {s.name: s for s in services}
        self.services: dict[str, Service] = dict(self.base)
        self.tz: ZoneInfo = zone(timezone)
        self.order_ttl = order_ttl
        self.expiry_grace = expiry_grace
        self.report_grace = report_grace  # at least this long past a run's timeout
        self.rank = rank
        if not 0 <= lead < order_ttl:
            raise ValueError(f"lead time must be >= 0 and under the order deadline "
                             f"({order_ttl:g} s), got {lead:g}")
        self.lead = lead  # dispatch runs this long before their slot (0: at the slot)
        self.nodes_out: frozenset[str] = frozenset()
        """Nodes taken out of placement (by ranking thresholds): no `one` run goes there."""
        self.epoch = 0
        self.nodes: dict[str, Node] = {}  # the live nodes: the one record of membership
        self.runs: dict[str, Run] = {}
        self.locks = LockBook()
        self.daemons: dict[str, DaemonInstance] = {}
        self.intervals: dict[str, OpenInterval] = {}  # open daemon intervals, by daemon key
        self.closed_began: dict[str, float] = {}  # by daemon key: the latest interval closed
        self.last_run: dict[str, float] = {}
        self.overrides: dict[str, dict[str, object]] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()  # ids of runs ended lately
        self._remember_ended = remember_ended
        self.timeline = Timeline()
        # Slots popped within the lead time that may not go ahead: they fire at their instant.
        self._at_slot: list[tuple[float, int, str]] = []  # (slot, seq, service)
        self._deferred: dict[str, int] = {}  # service -> its slots in _at_slot
        self._ahead_all: dict[str, float] = {}  # `all` service -> slot dispatched ahead
        self._inflight: dict[tuple[str, str], str] = {}  # (service, target) -> run id
        self._pending: dict[tuple[str, str], deque[str]] = {}  # waiting behind in-flight
        self._timers: list[tuple[float, int, TimerKind, str]] = []  # (when, seq, kind, key)
        self._seq = itertools.count()
        self._load: dict[str, int] = {}
        self._full: deque[str] = deque()  # runs granted their groups, waiting for capacity
        self._changes = Changes()
        self._started = False

    def _set_next(self, svc: Service, after: float) -> None:
        assert svc.schedule is not None
        self.timeline.set(svc.name, svc.schedule.next_after(after, self.tz))

    def runs_of_request(self, request_id: str) -> list[str]:
        """The ids of the runs a manual-run request made, active or ended lately."""
        prefix = f"manual-{request_id}"
        return sorted(r for r in itertools.chain(self.runs, self._ended)
                      if r == prefix or r.startswith(prefix + "@"))

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

    def _timer(self, when: float, kind: TimerKind, key: str) -> None:
        heapq.heappush(self._timers, (when, next(self._seq), kind, key))

    # -- implemented by the parts ---------------------------------------------------------
    def _admit(self, run: Run, now: float) -> list[Action]:
        raise NotImplementedError

    def _ready(self, run: Run, now: float) -> list[Action]:
        raise NotImplementedError

    def _take_deferred(self, name: str) -> list[float]:
        raise NotImplementedError

    def _ahead_for_new_node(self, now: float) -> list[Action]:
        raise NotImplementedError

    def _fire(self, svc: Service, slot: float, now: float) -> list[Action]:
        raise NotImplementedError

    def _end(
        self, run: Run, state: RunState, now: float, *, reason: str | None = None,
        error: str | None = None,
    ) -> list[Action]:
        raise NotImplementedError

    def _granted(self, claim: Claim, now: float) -> list[Action]:
        raise NotImplementedError

    def _place_waiting(self, now: float) -> list[Action]:
        raise NotImplementedError

    def _expiry_of(self, run: Run) -> float:
        raise NotImplementedError

    def _overdue_at(self, run: Run, now: float) -> float:
        raise NotImplementedError

    def _reconcile_daemons(self, now: float) -> list[Action]:
        raise NotImplementedError

    def _pause_blocking_daemons(self, claim: Claim, now: float) -> list[Action]:
        raise NotImplementedError

    def _close_intervals(self, node_id: str, now: float, reason: str) -> list[Action]:
        raise NotImplementedError
