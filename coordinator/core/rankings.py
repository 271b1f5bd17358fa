"""RankingS: the façade the leader drives, like `Engine` — it never reads the clock.

- `run_finished(run, now)`: feed StatS;
- `tick(now)`: compute the rankings due, returning what changed (RankingUpdates),
  threshold actions and the rankings to store, per `store_interval`;
- `get_ranking`, `get_ranking_summary`, `schedule_queries`, `get_schedule`: the API calls;
- `snapshot()` / `restore()`: stats, schedule and threshold streaks for a successor;
  `load_stored()`: rankings a predecessor stored (profiles with `Stored` only);
- `flush()`: what a clean shutdown stores; `node_order(ranking)` and `nodes_out()`: what
  placement reads.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from coordinator.core.ranking import Ranking, RankingSummary, RankingUpdate, compute_ranking
from coordinator.core.ranking import ranking_update as diff
from coordinator.core.ranking_schedule import RankingScheduler, ScheduledRanking
from coordinator.core.ranking_thresholds import ThresholdAction, Thresholds
from coordinator.core.stats import FinishedRun, StatS
from protocol.rankings import DEFAULT_TENANT, RankingError, RankingsConfig

Key = tuple[str, str]


class RankingNotFound(RankingError):
    """No such ranking profile, or it was not computed yet."""


@dataclass
class RankingsTurn:
    """What a tick produced, for the leader to export and keep."""

    updates: list[RankingUpdate] = field(default_factory=list)
    actions: list[ThresholdAction] = field(default_factory=list)
    store: list[Ranking] = field(default_factory=list)
    computed: list[Key] = field(default_factory=list)


class RankingS:
    """Stat queues, ranking profiles, their schedule, thresholds and the last rankings."""

    def __init__(self, config: RankingsConfig, tz: ZoneInfo, rng: random.Random) -> None:
        self.config = config
        self.rng = rng
        self.stats = StatS(config.stats.values())
        self.scheduler = RankingScheduler(config.rankings, tz)
        self.thresholds = Thresholds(config.thresholds)
        self.rankings: dict[Key, Ranking] = {}
        self.dirty: set[Key] = set()  # stored profiles changed since the last store
        self.last_store: float | None = None

    # -- lifecycle --------------------------------------------------------------------

    def start(self, now: float, state: Mapping[str, Any] | None = None,
              stored: Iterable[Ranking] = ()) -> int:
        """Begin a term: continue a predecessor's `state` (from `snapshot()`), and schedule
        the configured rankings (those not scheduled already); load the stored rankings.
        Returns how many rankings are scheduled."""
        self.load_stored(stored)
        self.last_store = now
        if state is not None:
            self.stats = StatS.restore(self.config.stats.values(), state["stats"])
            self.scheduler.restore(state["schedule"], now)
            self.thresholds.restore(state["thresholds"])
        self.scheduler.schedule_configured(self.config.settings.scheduled_ids, now,
                                           keep=state is not None)
        return len(self.scheduler.entries)

    def snapshot(self) -> dict[str, Any]:
        return {"stats": self.stats.snapshot(), "schedule": self.scheduler.snapshot(),
                "thresholds": self.thresholds.snapshot()}

    def load_stored(self, rankings: Iterable[Ranking]) -> None:
        for ranking in rankings:
            profile = self.config.rankings.get((ranking.tenant, ranking.id))
            if profile is not None and profile.stored:
                self.rankings[(ranking.tenant, ranking.id)] = ranking

    def flush(self) -> list[Ranking]:
        """Rankings to store at a clean shutdown (changed since the last store)."""
        if self.config.settings.store_interval == 0:
            return []
        out = [self.rankings[k] for k in sorted(self.dirty)]
        self.dirty.clear()
        return out

    # -- feeding and computing ------------------------------------------------------------

    def run_finished(self, run: FinishedRun, now: float) -> list[Key]:
        return self.stats.process_run(run, now)

    def compute(self, tenant: str, ranking_id: str, now: float,
                turn: RankingsTurn | None = None) -> Ranking:
        """Query the profile's stats and rank them now."""
        turn = turn if turn is not None else RankingsTurn()
        profile = self.config.rankings.get((tenant, ranking_id))
        if profile is None:
            raise RankingNotFound(f"tenant {tenant!r} has no ranking profile {ranking_id!r}")
        metrics = {sid: self.stats.metrics(tenant, sid, now, profile.metric_ids or None)
                   for sid in profile.stat_ids}
        ranking = compute_ranking(profile, metrics, now, self.rng)
        key = (tenant, ranking_id)
        update = diff(self.rankings.get(key), ranking)
        self.rankings[key] = ranking
        turn.computed.append(key)
        if update is not None:
            turn.updates.append(update)
        turn.actions.extend(self.thresholds.evaluate(profile, ranking))
        interval = self.config.settings.store_interval
        if profile.stored and interval == -1:
            turn.store.append(ranking)
        elif profile.stored and interval > 0 and update is not None:
            self.dirty.add(key)
        return ranking

    def tick(self, now: float) -> RankingsTurn:
        turn = RankingsTurn()
        for tenant, ranking_id in self.scheduler.due(now):
            self.compute(tenant, ranking_id, now, turn)
        interval = self.config.settings.store_interval
        if interval > 0 and self.last_store is not None and now >= self.last_store + interval:
            turn.store.extend(self.rankings[k] for k in sorted(self.dirty))
            self.dirty.clear()
            self.last_store = now
        return turn

    def next_wakeup(self) -> float | None:
        times = [self.scheduler.next_wakeup()]
        interval = self.config.settings.store_interval
        if interval > 0 and self.dirty and self.last_store is not None:
            times.append(self.last_store + interval)
        present = [t for t in times if t is not None]
        return min(present) if present else None

    # -- the API calls -------------------------------------------------------------------

    def get_ranking(self, tenant: str, ranking_id: str) -> Ranking:
        ranking = self.rankings.get((tenant, ranking_id))
        if ranking is None:
            if (tenant, ranking_id) not in self.config.rankings:
                raise RankingNotFound(f"tenant {tenant!r} has no ranking profile "
                                      f"{ranking_id!r}")
            raise RankingNotFound(f"ranking {tenant}/{ranking_id} was not computed yet")
        return ranking

    def get_ranking_summary(self, tenant: str, ranking_id: str) -> RankingSummary:
        return self.get_ranking(tenant, ranking_id).summary()

    def schedule_queries(self, tenant: str, ranking_ids: Iterable[str], now: float) -> int:
        return self.scheduler.schedule_queries(tenant, ranking_ids, now)

    def get_schedule(self, tenant: str, prefixes: Iterable[str] = ()) -> list[ScheduledRanking]:
        return self.scheduler.get_schedule(tenant, prefixes)

    # -- what placement reads ----------------------------------------------------------

    def node_order(self, ranking_id: str, tenant: str = DEFAULT_TENANT) -> list[str]:
        """Nodes best first by a ranking, for `rank_by`: each ranked stat queue whose filter
        names exactly one node stands for that node; nodes taken out are left out."""
        ranking = self.rankings.get((tenant, ranking_id))
        if ranking is None:
            return []
        out = self.thresholds.nodes_out()
        order: list[str] = []
        for stat_id in ranking.sorted_stat_ids:
            queue = self.stats.queues.get((tenant, stat_id))
            if queue is None or len(queue.profile.nodes) != 1:
                continue
            (node,) = queue.profile.nodes
            if node not in out and node not in order:
                order.append(node)
        return order

    def nodes_out(self) -> frozenset[str]:
        return self.thresholds.nodes_out()
