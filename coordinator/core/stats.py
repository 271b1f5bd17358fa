"""StatS over runs: stat queues fed by finished runs, answering metrics in the CGRateS style.

Each queue (`protocol.rankings.StatQueueProfile`) takes the finished runs its filter
matches, keeps them in a window (at most `queue_length` runs, none older than `ttl`
seconds after it took them) and answers its metrics. A metric counts only the runs it
applies to (durations need a start and an end, `*sum#acc` needs a reported `acc`); with
fewer than `min_items` such runs it is N/A, the value -1.

State is snapshotted as plain lists and dicts (msgpack-friendly) so a successor continues
the stats: `StatS.restore(profiles, stats.snapshot())` answers the same metrics.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from protocol.rankings import NA, REPORTED_METRICS, StatQueueProfile

SNAPSHOT_VERSION = 1


@dataclass(frozen=True, slots=True)
class FinishedRun:
    """What a finished run record carries, as StatS reads it. Times are epoch seconds."""

    service: str
    node: str | None
    trigger: str
    outcome: str
    slot: float | None = None
    queued_at: float | None = None
    dispatched_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Item:
    """One run as a queue keeps it: only what its metrics need."""

    expires: float | None  # instant the ttl drops it; None without a ttl
    ok: bool
    duration: float | None
    lateness: float | None
    wait: float | None
    reported: dict[str, float]

    def pack(self) -> list[Any]:
        return [self.expires, self.ok, self.duration, self.lateness, self.wait, self.reported]

    @classmethod
    def unpack(cls, data: list[Any]) -> _Item:
        expires, ok, duration, lateness, wait, reported = data
        return cls(expires, bool(ok), duration, lateness, wait,
                   {str(k): float(v) for k, v in dict(reported).items()})


def _span(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return max(0.0, end - start)


def item_of(run: FinishedRun, expires: float | None) -> _Item:
    reported = {k: float(v) for k, v in run.metrics.items() if math.isfinite(float(v))}
    return _Item(
        expires=expires,
        ok=run.outcome == "succeeded",
        duration=_span(run.started_at, run.finished_at),
        # start lateness: from the slot, or from the request for a run without one
        lateness=_span(run.slot if run.slot is not None else run.queued_at, run.started_at),
        wait=_span(run.queued_at, run.dispatched_at),
        reported=reported,
    )


class _Series:
    """Values of one kind in a window, kept sorted (for max, min, p95); the sum is exact
    (`math.fsum`), so it does not depend on the order values came and went."""

    __slots__ = ("ordered", "_total")

    def __init__(self) -> None:
        self.ordered: list[float] = []
        self._total: float | None = 0.0

    @property
    def count(self) -> int:
        return len(self.ordered)

    @property
    def total(self) -> float:
        if self._total is None:
            self._total = math.fsum(self.ordered)
        return self._total

    def add(self, value: float) -> None:
        insort(self.ordered, value)
        self._total = None

    def remove(self, value: float) -> None:
        del self.ordered[bisect_left(self.ordered, value)]  # the exact float added before
        self._total = None

    def average(self) -> float:
        return self.total / self.count

    def percentile(self, p: float) -> float:
        """Nearest rank: the smallest value with at least p% of the values at or below it."""
        rank = max(1, math.ceil(p / 100.0 * self.count))
        return self.ordered[rank - 1]


class StatQueue:
    """One stat queue: its window of runs and running aggregates."""

    def __init__(self, profile: StatQueueProfile) -> None:
        self.profile = profile
        self.items: deque[_Item] = deque()
        self.ok = 0
        self.durations = _Series()
        self.lateness = _Series()
        self.waits = _Series()
        self.reported: dict[str, _Series] = {}

    def add(self, run: FinishedRun, now: float) -> None:
        ttl = self.profile.ttl
        self._push(item_of(run, None if ttl is None else now + ttl))
        limit = self.profile.queue_length
        while limit is not None and len(self.items) > limit:
            self._pop()
        self.expire(now)

    def expire(self, now: float) -> None:
        """Drop the runs whose ttl has passed (items expire in the order they came)."""
        while self.items and self.items[0].expires is not None and self.items[0].expires <= now:
            self._pop()

    def _push(self, item: _Item) -> None:
        self.items.append(item)
        self.ok += item.ok
        for series, value in ((self.durations, item.duration), (self.lateness, item.lateness),
                              (self.waits, item.wait)):
            if value is not None:
                series.add(value)
        for name, value in item.reported.items():
            self.reported.setdefault(name, _Series()).add(value)

    def _pop(self) -> None:
        item = self.items.popleft()
        self.ok -= item.ok
        for series, value in ((self.durations, item.duration), (self.lateness, item.lateness),
                              (self.waits, item.wait)):
            if value is not None:
                series.remove(value)
        for name, value in item.reported.items():
            series = self.reported[name]
            series.remove(value)
            if not series.count:
                del self.reported[name]

    def metric(self, metric_id: str) -> float:
        """One metric's value now; -1 (N/A) below min_items."""
        need = self.profile.min_items
        runs = len(self.items)
        if metric_id in ("*runs", "*failures", "*asr"):
            if runs < need or runs == 0:
                return NA
            if metric_id == "*runs":
                return float(runs)
            if metric_id == "*failures":
                return float(runs - self.ok)
            return 100.0 * self.ok / runs
        series = {"*acd": self.durations, "*tcd": self.durations,
                  "*max_duration": self.durations, "*p95_duration": self.durations,
                  "*pdd": self.lateness, "*queue": self.waits}.get(metric_id)
        kind = ""
        if series is None:
            kind, _, name = metric_id.partition("#")
            if kind not in REPORTED_METRICS:
                raise KeyError(metric_id)
            series = self.reported.get(name)
        if series is None or series.count < need or series.count == 0:
            return NA
        if metric_id == "*tcd" or kind == "*sum":
            return series.total
        if metric_id in ("*max_duration",) or kind == "*highest":
            return series.ordered[-1]
        if kind == "*lowest":
            return series.ordered[0]
        if metric_id == "*p95_duration":
            return series.percentile(95.0)
        return series.average()

    def metrics(self, metric_ids: Iterable[str] | None = None) -> dict[str, float]:
        """The queue's metrics (only those of `metric_ids` it has, when given)."""
        ids = self.profile.metric_ids
        if metric_ids is not None:
            wanted = set(metric_ids)
            ids = tuple(m for m in ids if m in wanted)
        return {m: self.metric(m) for m in ids}


class StatS:
    """Every stat queue of the configuration, fed by finished runs."""

    def __init__(self, profiles: Iterable[StatQueueProfile]) -> None:
        self.queues: dict[tuple[str, str], StatQueue] = {
            (p.tenant, p.id): StatQueue(p) for p in profiles
        }

    def process_run(self, run: FinishedRun, now: float) -> list[tuple[str, str]]:
        """Feed a finished run to every queue whose filter takes it; returns those queues."""
        taken = []
        for key, queue in self.queues.items():
            if queue.profile.matches(run.service, run.node, run.outcome, run.trigger):
                queue.add(run, now)
                taken.append(key)
        return taken

    def metrics(self, tenant: str, stat_id: str, now: float,
                metric_ids: Iterable[str] | None = None) -> dict[str, float] | None:
        """A queue's metrics now, or None when it does not exist."""
        queue = self.queues.get((tenant, stat_id))
        if queue is None:
            return None
        queue.expire(now)
        return queue.metrics(metric_ids)

    def snapshot(self) -> dict[str, Any]:
        return {
            "v": SNAPSHOT_VERSION,
            "queues": {f"{t}\x1f{i}": [it.pack() for it in q.items]
                       for (t, i), q in self.queues.items()},
        }

    @classmethod
    def restore(cls, profiles: Iterable[StatQueueProfile], data: Mapping[str, Any]) -> StatS:
        """Queues for `profiles`, holding the runs a snapshot kept (queues no longer
        configured are dropped; a shorter queue_length keeps the latest runs; a changed ttl
        applies to the runs taken from now on)."""
        if data.get("v") != SNAPSHOT_VERSION:
            raise ValueError(f"unknown StatS snapshot version {data.get('v')!r}")
        stats = cls(profiles)
        for name, items in dict(data["queues"]).items():
            tenant, _, stat_id = str(name).partition("\x1f")
            queue = stats.queues.get((tenant, stat_id))
            if queue is None:
                continue
            for packed in items:
                queue._push(_Item.unpack(packed))
            limit = queue.profile.queue_length
            while limit is not None and len(queue.items) > limit:
                queue._pop()
        return stats
