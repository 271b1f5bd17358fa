"""RankingS configuration: stat queues, ranking profiles, threshold profiles, settings.

The model both sides and the API share; the catalogue loads it from `[[stat]]`,
`[[ranking]]`, `[[threshold]]` and `[rankings]` (`protocol/catalogue_rankings.py`), and the
pure core (`coordinator/core/stats.py`, `ranking.py`, `ranking_schedule.py`,
`rankings.py`) computes with it. Field names follow CGRateS in `to_dict` (`Tenant`, `ID`,
`Schedule`, `StatIDs`, ...), snake_case in Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from protocol.messages import RECORD_TRIGGERS

DEFAULT_TENANT = "rota"

RUN_METRICS = (
    "*runs",          # runs in the window
    "*failures",      # runs whose outcome is not succeeded
    "*asr",           # success ratio, percent
    "*acd",           # average duration (started -> finished), seconds
    "*tcd",           # total duration, seconds
    "*pdd",           # average start lateness (slot or request -> started), seconds
    "*queue",         # average queue wait (queued -> dispatched), seconds
    "*max_duration",  # longest duration, seconds
    "*p95_duration",  # 95th percentile of durations (nearest rank), seconds
)
REPORTED_METRICS = ("*sum", "*average", "*highest", "*lowest")  # as "*sum#<reported name>"
SORTINGS = ("*asc", "*desc")
OUTCOMES = ("succeeded", "failed", "timed_out", "lost", "expired", "rejected", "skipped",
            "missed")
TRIGGERS = tuple(sorted(RECORD_TRIGGERS))
THRESHOLD_KINDS = ("last", "above", "below")
NA = -1.0
"""A metric with fewer items than its queue's `min_items`, as in CGRateS."""


class RankingError(ValueError):
    """A ranking request or definition that cannot be used; the message names the problem."""


def check_metric_id(metric_id: object) -> str:
    """A metric id of the stat queues: one of RUN_METRICS or `*sum#name` and its kin."""
    if not isinstance(metric_id, str) or not metric_id:
        raise RankingError(f"bad metric id {metric_id!r}: expected a non-empty string")
    if ":" in metric_id:
        raise RankingError(f"bad metric id {metric_id!r}: ':' is reserved for sorting "
                           "parameters (Metric:false)")
    if metric_id in RUN_METRICS:
        return metric_id
    kind, sep, name = metric_id.partition("#")
    if sep and kind in REPORTED_METRICS and name.strip():
        return metric_id
    raise RankingError(
        f"unknown metric {metric_id!r}: expected one of {', '.join(RUN_METRICS)} or "
        f"{'|'.join(REPORTED_METRICS)}#<reported metric>, e.g. *sum#acc"
    )


def parse_sorting_parameter(text: str) -> tuple[str, bool]:
    """`"M"` / `"M:true"` → (M, False); `"M:false"` → (M, True: reversed). Any suffix other
    than `false` keeps the normal order."""
    metric, sep, suffix = text.rpartition(":")
    if not sep:
        return text, False
    return metric, suffix == "false"


def check_sorting(sorting: object) -> str:
    if sorting not in SORTINGS:
        raise RankingError(f"unknown sorting {sorting!r}: expected one of {' | '.join(SORTINGS)}")
    return str(sorting)


@dataclass(frozen=True, slots=True)
class StatQueueProfile:
    """A stat queue over finished runs: which runs it takes, its window, its metrics.

    Empty filter sets take everything. The window keeps at most `queue_length` runs and
    drops runs older than `ttl` seconds (either, both, or neither).
    """

    tenant: str
    id: str
    services: frozenset[str] = frozenset()
    nodes: frozenset[str] = frozenset()
    outcomes: frozenset[str] = frozenset()
    triggers: frozenset[str] = frozenset()
    ttl: float | None = None
    queue_length: int | None = None
    min_items: int = 1
    metric_ids: tuple[str, ...] = RUN_METRICS

    def __post_init__(self) -> None:
        for metric_id in self.metric_ids:
            check_metric_id(metric_id)
        if self.ttl is not None and not (math.isfinite(self.ttl) and self.ttl > 0):
            raise RankingError(f"stat {self.id!r}: ttl must be above 0, got {self.ttl}")
        if self.queue_length is not None and self.queue_length < 1:
            raise RankingError(f"stat {self.id!r}: queue_length must be 1 or more")
        if self.min_items < 0:
            raise RankingError(f"stat {self.id!r}: min_items must not be negative")

    def matches(self, service: str, node: str | None, outcome: str, trigger: str) -> bool:
        return ((not self.services or service in self.services)
                and (not self.nodes or node in self.nodes)
                and (not self.outcomes or outcome in self.outcomes)
                and (not self.triggers or trigger in self.triggers))


@dataclass(frozen=True, slots=True)
class RankingProfile:
    """A RankingProfile, field for field as in CGRateS."""

    tenant: str
    id: str
    schedule: str
    stat_ids: tuple[str, ...]
    metric_ids: tuple[str, ...] = ()
    sorting: str = "*desc"
    sorting_parameters: tuple[str, ...] = ()
    stored: bool = False
    threshold_ids: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "Tenant": self.tenant, "ID": self.id, "Schedule": self.schedule,
            "StatIDs": list(self.stat_ids), "MetricIDs": list(self.metric_ids),
            "Sorting": self.sorting, "SortingParameters": list(self.sorting_parameters),
            "Stored": self.stored, "ThresholdIDs": list(self.threshold_ids),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RankingProfile:
        return cls(
            tenant=str(data["Tenant"]), id=str(data["ID"]), schedule=str(data["Schedule"]),
            stat_ids=tuple(data.get("StatIDs") or ()),
            metric_ids=tuple(data.get("MetricIDs") or ()),
            sorting=str(data.get("Sorting", "*desc")),
            sorting_parameters=tuple(data.get("SortingParameters") or ()),
            stored=bool(data.get("Stored", False)),
            threshold_ids=tuple(data.get("ThresholdIDs") or ()),
        )


@dataclass(frozen=True, slots=True)
class ThresholdProfile:
    """A rule evaluated on each update of the rankings it names (all of its tenant's when
    `ranking_ids` is empty), about one stat:

    - `last`: the stat is last in the ranking for `updates` consecutive updates;
    - `above` / `below`: `metric` of the stat is above / below `value` for `updates`
      consecutive updates.

    It fires once when the condition starts to hold and recovers once when it stops. Firing
    produces an alert and, with `take_out_node`, takes that node out of placement until the
    threshold recovers.
    """

    tenant: str
    id: str
    stat_id: str
    kind: str
    ranking_ids: tuple[str, ...] = ()
    metric: str | None = None
    value: float | None = None
    updates: int = 1
    take_out_node: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in THRESHOLD_KINDS:
            raise RankingError(f"threshold {self.id!r}: unknown kind {self.kind!r}: expected "
                               f"{' | '.join(THRESHOLD_KINDS)}")
        if self.kind != "last" and (self.metric is None or self.value is None):
            raise RankingError(f"threshold {self.id!r}: kind {self.kind} needs metric and value")
        if self.updates < 1:
            raise RankingError(f"threshold {self.id!r}: updates must be 1 or more")


@dataclass(frozen=True, slots=True)
class RankingsSettings:
    """`[rankings]`: `store_interval` seconds (0 never stored, -1 on every computation, >0
    at that interval, changed rankings only); `scheduled_ids` tenant → ranking ids scheduled
    at start (None or empty: every profile of every tenant; a tenant with an empty list: all
    of that tenant's profiles)."""

    store_interval: float = 0.0
    scheduled_ids: dict[str, tuple[str, ...]] | None = None


@dataclass(frozen=True)
class RankingsConfig:
    """Everything RankingS reads from the catalogue; keys are (tenant, id)."""

    settings: RankingsSettings = field(default_factory=RankingsSettings)
    stats: dict[tuple[str, str], StatQueueProfile] = field(default_factory=dict)
    rankings: dict[tuple[str, str], RankingProfile] = field(default_factory=dict)
    thresholds: dict[tuple[str, str], ThresholdProfile] = field(default_factory=dict)
