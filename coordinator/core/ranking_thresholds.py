"""Thresholds on rankings: rules evaluated on each computation of a ranking, whose actions
are data (an alert; taking a node out of placement, and returning it).

Which thresholds a ranking feeds: its profile's `ThresholdIDs` (`["*none"]`: none), or,
when empty, every threshold of its tenant; either way only thresholds whose `ranking_ids`
are empty or name the ranking. A threshold keeps a streak per ranking: it fires once when
its condition has held for `updates` consecutive computations and recovers once when the
condition stops holding. A metric that is N/A (-1) or missing crosses nothing.

A node taken out by several thresholds returns when the last of them recovers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from coordinator.core.ranking import Ranking
from protocol.rankings import NA, RankingProfile, ThresholdProfile

SNAPSHOT_VERSION = 1
Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class ThresholdAlert:
    """A threshold fired (`state` "firing") or recovered ("recovered")."""

    tenant: str
    threshold_id: str
    ranking_id: str
    stat_id: str
    state: str
    at: float
    message: str


@dataclass(frozen=True, slots=True)
class TakeNodeOut:
    """Place nothing on `node` until it is returned."""

    node: str
    tenant: str
    threshold_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class ReturnNode:
    """`node` may be placed on again: every threshold that took it out recovered."""

    node: str
    tenant: str
    threshold_id: str


ThresholdAction = ThresholdAlert | TakeNodeOut | ReturnNode


def _describe(t: ThresholdProfile, ranking_id: str) -> str:
    if t.kind == "last":
        cond = f"stat {t.stat_id} is last in ranking {ranking_id}"
    else:
        cond = f"{t.metric} of stat {t.stat_id} is {t.kind} {t.value:g} in ranking {ranking_id}"
    return cond + (f" for {t.updates} updates" if t.updates > 1 else "")


def holds(threshold: ThresholdProfile, ranking: Ranking) -> bool:
    if threshold.kind == "last":
        order = ranking.sorted_stat_ids
        return bool(order) and order[-1] == threshold.stat_id
    value = ranking.metrics.get(threshold.stat_id, {}).get(threshold.metric or "")
    if value is None or value == NA or threshold.value is None:
        return False
    return value > threshold.value if threshold.kind == "above" else value < threshold.value


class Thresholds:
    """Threshold profiles and their streaks."""

    def __init__(self, profiles: Mapping[Key, ThresholdProfile]) -> None:
        self.profiles = profiles
        self.streaks: dict[tuple[str, str, str], int] = {}  # tenant, threshold, ranking
        self.firing: set[tuple[str, str, str]] = set()
        self.out: dict[str, set[tuple[str, str]]] = {}  # node → thresholds holding it out

    def selected(self, profile: RankingProfile) -> list[ThresholdProfile]:
        ids = profile.threshold_ids
        if ids == ("*none",):
            return []
        if ids:
            chosen = [self.profiles[(profile.tenant, i)] for i in ids
                      if (profile.tenant, i) in self.profiles]
        else:
            chosen = [t for (tenant, _), t in sorted(self.profiles.items())
                      if tenant == profile.tenant]
        return [t for t in chosen if not t.ranking_ids or profile.id in t.ranking_ids]

    def evaluate(self, profile: RankingProfile, ranking: Ranking) -> list[ThresholdAction]:
        actions: list[ThresholdAction] = []
        for t in self.selected(profile):
            key = (t.tenant, t.id, ranking.id)
            text = _describe(t, ranking.id)
            if holds(t, ranking):
                streak = self.streaks[key] = self.streaks.get(key, 0) + 1
                if streak >= t.updates and key not in self.firing:
                    self.firing.add(key)
                    actions.append(ThresholdAlert(t.tenant, t.id, ranking.id, t.stat_id,
                                                  "firing", ranking.last_update, text))
                    if t.take_out_node:
                        holders = self.out.setdefault(t.take_out_node, set())
                        if not holders:
                            actions.append(TakeNodeOut(t.take_out_node, t.tenant, t.id, text))
                        holders.add((t.tenant, t.id))
            else:
                self.streaks.pop(key, None)
                if key in self.firing:
                    self.firing.discard(key)
                    actions.append(ThresholdAlert(t.tenant, t.id, ranking.id, t.stat_id,
                                                  "recovered", ranking.last_update,
                                                  f"no longer: {text}"))
                    if t.take_out_node and not self._still_firing(t):
                        holders = self.out.get(t.take_out_node, set())
                        holders.discard((t.tenant, t.id))
                        if not holders:
                            self.out.pop(t.take_out_node, None)
                            actions.append(ReturnNode(t.take_out_node, t.tenant, t.id))
        return actions

    def _still_firing(self, t: ThresholdProfile) -> bool:
        return any(k[0] == t.tenant and k[1] == t.id for k in self.firing)

    def nodes_out(self) -> frozenset[str]:
        """Nodes placement must skip now."""
        return frozenset(self.out)

    def snapshot(self) -> dict[str, Any]:
        return {
            "v": SNAPSHOT_VERSION,
            "streaks": [[*k, n] for k, n in self.streaks.items()],
            "firing": [list(k) for k in self.firing],
            "out": {node: [list(h) for h in holders] for node, holders in self.out.items()},
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        if data.get("v") != SNAPSHOT_VERSION:
            raise ValueError(f"unknown threshold snapshot version {data.get('v')!r}")
        self.streaks = {(str(t), str(i), str(r)): int(n) for t, i, r, n in data["streaks"]}
        self.firing = {(str(t), str(i), str(r)) for t, i, r in data["firing"]}
        self.out = {str(node): {(str(t), str(i)) for t, i in holders}
                    for node, holders in dict(data["out"]).items()}
