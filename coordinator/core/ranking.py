"""Rankings: stat queues ordered by their metrics, as a RankingProfile says.

Sorting rules (`sort_stat_ids`), per sorting parameter in order:
- `*asc` puts lower values first, `*desc` higher ones; `Metric:false` reverses that metric
  (any other suffix, or none, keeps the strategy's order);
- a stat missing the metric sorts after every stat that has it, in both directions and
  whatever the suffix;
- N/A (-1) is a value like any other, not a missing metric;
- equal values go to the next parameter; stats equal on all of them are in random order
  (from the injected random source).
Stats with no metrics are left out. An unknown sorting is a RankingError.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from protocol.rankings import (
    RankingError,
    RankingProfile,
    check_sorting,
    parse_sorting_parameter,
)

__all__ = [
    "Moved", "Ranking", "RankingError", "RankingProfile", "RankingSummary", "RankingUpdate",
    "compute_ranking", "ranking_update", "sort_stat_ids",
]

Metrics = Mapping[str, Mapping[str, float]]
"""stat id → metric id → value."""

def sort_stat_ids(
    metrics: Metrics,
    sorting: str,
    parameters: Sequence[str],
    rng: random.Random,
) -> list[str]:
    """Stat ids ordered by `sorting` over `parameters` (stats with no metrics left out)."""
    check_sorting(sorting)
    sign = -1.0 if sorting == "*desc" else 1.0
    ids = [stat_id for stat_id, values in metrics.items() if values]
    rows = [metrics[stat_id] for stat_id in ids]
    columns: list[list[float]] = []
    for text in parameters:
        metric, reverse = parse_sorting_parameter(text)
        direction = -sign if reverse else sign
        column = [values.get(metric) for values in rows]
        if None in column:  # missing sorts after present: a 0/1 column first
            columns.append([1.0 if v is None else 0.0 for v in column])
            columns.append([0.0 if v is None else direction * v for v in column])
        else:
            columns.append([direction * v for v in column])  # type: ignore[operator]
    rand = rng.random
    columns.append([rand() for _ in ids])  # full ties: random order
    # Equal random draws (practically never) fall back to the id, keeping keys comparable.
    keyed = sorted(zip(*columns, ids, strict=True))
    return [key[-1] for key in keyed]


def _iso(instant: float) -> str:
    return datetime.fromtimestamp(instant, UTC).isoformat().replace("+00:00", "Z")


def _instant(text: object) -> float:
    if isinstance(text, int | float):
        return float(text)
    return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True, slots=True)
class Ranking:
    """A Ranking as CGRateS defines it: the last computation of a profile."""

    tenant: str
    id: str
    last_update: float
    metrics: dict[str, dict[str, float]]
    sorting: str
    sorting_parameters: tuple[str, ...]
    sorted_stat_ids: tuple[str, ...]

    def summary(self) -> RankingSummary:
        return RankingSummary(self.tenant, self.id, self.last_update, self.sorted_stat_ids)

    def to_dict(self) -> dict[str, Any]:
        """CGRateS field names; LastUpdate as RFC 3339 UTC."""
        return {
            "Tenant": self.tenant, "ID": self.id, "LastUpdate": _iso(self.last_update),
            "Metrics": {s: dict(m) for s, m in self.metrics.items()},
            "Sorting": self.sorting, "SortingParameters": list(self.sorting_parameters),
            "SortedStatIDs": list(self.sorted_stat_ids),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Ranking:
        return cls(
            tenant=str(data["Tenant"]), id=str(data["ID"]),
            last_update=_instant(data["LastUpdate"]),
            metrics={str(s): {str(k): float(v) for k, v in dict(m).items()}
                     for s, m in dict(data.get("Metrics") or {}).items()},
            sorting=str(data["Sorting"]),
            sorting_parameters=tuple(data.get("SortingParameters") or ()),
            sorted_stat_ids=tuple(data.get("SortedStatIDs") or ()),
        )


@dataclass(frozen=True, slots=True)
class RankingSummary:
    """A RankingSummary as CGRateS defines it."""

    tenant: str
    id: str
    last_update: float
    sorted_stat_ids: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"Tenant": self.tenant, "ID": self.id, "LastUpdate": _iso(self.last_update),
                "SortedStatIDs": list(self.sorted_stat_ids)}


def compute_ranking(
    profile: RankingProfile,
    stat_metrics: Mapping[str, Mapping[str, float] | None],
    now: float,
    rng: random.Random,
) -> Ranking:
    """Rank the stats of `profile` from their metrics (None: the stat does not exist).

    `MetricIDs`, when set, limit the metrics kept and sorted on.
    """
    check_sorting(profile.sorting)
    limit = tuple(dict.fromkeys(profile.metric_ids))
    kept: dict[str, dict[str, float]] = {}
    for stat_id in profile.stat_ids:
        values = stat_metrics.get(stat_id)
        if not values:
            continue
        chosen = {m: values[m] for m in limit if m in values} if limit else dict(values)
        if chosen:
            kept[stat_id] = chosen
    order = sort_stat_ids(kept, profile.sorting, profile.sorting_parameters, rng)
    return Ranking(
        tenant=profile.tenant, id=profile.id, last_update=now, metrics=kept,
        sorting=profile.sorting, sorting_parameters=tuple(profile.sorting_parameters),
        sorted_stat_ids=tuple(order),
    )


@dataclass(frozen=True, slots=True)
class Moved:
    """A stat whose position changed: 0-based; None when it was not (or is no longer)
    ranked."""

    stat_id: str
    before: int | None
    after: int | None


@dataclass(frozen=True, slots=True)
class RankingUpdate:
    """What changed in a ranking, as data (the `ranking.update` event's content)."""

    tenant: str
    id: str
    last_update: float
    sorted_stat_ids: tuple[str, ...]
    moved: tuple[Moved, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "Tenant": self.tenant, "ID": self.id, "LastUpdate": _iso(self.last_update),
            "SortedStatIDs": list(self.sorted_stat_ids),
            "Moved": [{"StatID": m.stat_id, "Before": m.before, "After": m.after}
                      for m in self.moved],
        }


def ranking_update(previous: Ranking | None, current: Ranking) -> RankingUpdate | None:
    """The update from `previous` to `current`, or None when neither the order nor any
    metric changed."""
    if (previous is not None and previous.sorted_stat_ids == current.sorted_stat_ids
            and previous.metrics == current.metrics):
        return None
    before = {s: i for i, s in enumerate(previous.sorted_stat_ids)} if previous else {}
    after = {s: i for i, s in enumerate(current.sorted_stat_ids)}
    moved = [Moved(s, before.get(s), i) for s, i in after.items() if before.get(s) != i]
    moved += [Moved(s, i, None) for s, i in before.items() if s not in after]
    return RankingUpdate(current.tenant, current.id, current.last_update,
                         current.sorted_stat_ids, tuple(moved))

