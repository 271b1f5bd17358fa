"""When each ranking is queried: the scheduled rankings, their next and previous times.

Rankings are scheduled from configuration (`scheduled_ids`) when RankingS starts and by
call (`schedule_queries`, re-scheduling replaces the old schedule). Times come from the
caller's clock (`now`), never from this module; `due(now)` hands out the rankings whose
time has come, once each even when several of their times passed (an outage), and moves
them to their next time. The state is snapshotted so a successor keeps the schedule.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from protocol.ranking_schedule import Every, RankingSchedule, parse_ranking_schedule
from protocol.rankings import RankingError, RankingProfile
from protocol.schedule import ScheduleError

SNAPSHOT_VERSION = 1
Key = tuple[str, str]


@lru_cache(maxsize=1024)
def schedule_of(expr: str) -> RankingSchedule:
    return parse_ranking_schedule(expr)


@dataclass(frozen=True, slots=True)
class ScheduledRanking:
    """One entry of GetSchedule: `previous` is when it last ran (None: not since it was
    scheduled)."""

    tenant: str
    id: str
    schedule: str
    next: float
    previous: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"RankingID": self.id, "Next": self.next, "Previous": self.previous}


class RankingScheduler:
    """The scheduled rankings of every tenant, ordered by next time."""

    def __init__(self, profiles: Mapping[Key, RankingProfile], tz: ZoneInfo) -> None:
        self.profiles = profiles
        self.tz = tz
        self.entries: dict[Key, ScheduledRanking] = {}
        self._heap: list[tuple[float, str, str]] = []

    def _next(self, profile: RankingProfile, after: float) -> float:
        try:
            return schedule_of(profile.schedule).next_after(after, self.tz)
        except ScheduleError as exc:
            raise RankingError(f"ranking {profile.tenant}/{profile.id}: {exc}") from exc

    def _put(self, entry: ScheduledRanking) -> None:
        self.entries[(entry.tenant, entry.id)] = entry
        heapq.heappush(self._heap, (entry.next, entry.tenant, entry.id))

    def schedule_queries(self, tenant: str, ids: Iterable[str], now: float) -> int:
        """Schedule the rankings `ids` of `tenant` (all of its profiles when `ids` is empty)
        from `now`; returns how many were scheduled. Unknown ids are a RankingError and
        nothing is scheduled."""
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            wanted = sorted(i for t, i in self.profiles if t == tenant)
        unknown = [i for i in wanted if (tenant, i) not in self.profiles]
        if unknown:
            raise RankingError(f"tenant {tenant!r} has no ranking profile "
                               f"{', '.join(map(repr, unknown))}")
        planned = [(self.profiles[(tenant, i)], self._next(self.profiles[(tenant, i)], now))
                   for i in wanted]
        for profile, at in planned:
            old = self.entries.get((tenant, profile.id))
            self._put(ScheduledRanking(tenant, profile.id, profile.schedule, at,
                                       old.previous if old else None))
        return len(planned)

    def schedule_configured(self, scheduled_ids: Mapping[str, Iterable[str]] | None,
                            now: float, *, keep: bool = False) -> int:
        """`scheduled_ids` as configured: empty or None schedules every profile of every
        tenant; a tenant with an empty list, all of that tenant's profiles. With `keep`,
        rankings already scheduled keep their times (a successor adding the profiles its
        predecessor did not have). Returns how many were scheduled now."""
        if not scheduled_ids:
            tenants: dict[str, list[str]] = {t: [] for t, _ in sorted(self.profiles)}
        else:
            tenants = {t: list(ids) for t, ids in scheduled_ids.items()}
        count = 0
        for tenant, ids in tenants.items():
            wanted = ids or sorted(i for t, i in self.profiles if t == tenant)
            if keep:
                wanted = [i for i in wanted if (tenant, i) not in self.entries]
            if wanted:
                count += self.schedule_queries(tenant, wanted, now)
        return count

    def unschedule(self, tenant: str, ranking_id: str) -> bool:
        return self.entries.pop((tenant, ranking_id), None) is not None

    def get_schedule(self, tenant: str, prefixes: Iterable[str] = ()) -> list[ScheduledRanking]:
        """The tenant's scheduled rankings whose id starts with one of `prefixes` (all when
        none), sorted by next time, then id."""
        wanted = tuple(prefixes)
        rows = [e for (t, i), e in self.entries.items()
                if t == tenant and (not wanted or i.startswith(wanted))]
        return sorted(rows, key=lambda e: (e.next, e.id))

    def next_wakeup(self) -> float | None:
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap:
            at, tenant, rid = heap[0]
            entry = self.entries.get((tenant, rid))
            if entry is not None and entry.next == at:
                return
            heapq.heappop(heap)  # replaced or unscheduled

    def due(self, now: float) -> list[Key]:
        """The rankings due at `now`, in time order; each is moved to its next time after
        `now` (times missed meanwhile are not run one by one) with `previous` = now."""
        out: list[Key] = []
        while True:
            self._drop_stale()
            if not self._heap or self._heap[0][0] > now:
                return out
            _, tenant, rid = heapq.heappop(self._heap)
            entry = self.entries[(tenant, rid)]
            profile = self.profiles.get((tenant, rid))
            if profile is None:  # its profile is gone
                del self.entries[(tenant, rid)]
                continue
            self._put(ScheduledRanking(tenant, rid, profile.schedule,
                                       self._following(profile, entry, now), now))
            out.append((tenant, rid))

    def _following(self, profile: RankingProfile, entry: ScheduledRanking, now: float) -> float:
        """The next time after `now`; `@every` stays on its grid (planned + k × interval),
        so a late turn does not make it drift."""
        schedule = schedule_of(profile.schedule)
        if isinstance(schedule, Every) and profile.schedule == entry.schedule:
            steps = math.floor((now - entry.next) / schedule.seconds) + 1
            return entry.next + steps * schedule.seconds
        return self._next(profile, now)

    def snapshot(self) -> dict[str, Any]:
        return {"v": SNAPSHOT_VERSION,
                "entries": [[e.tenant, e.id, e.schedule, e.next, e.previous]
                            for e in self.entries.values()]}

    def restore(self, data: Mapping[str, Any], now: float) -> None:
        """Take over a predecessor's schedule. An entry whose profile is gone is dropped;
        one whose profile changed its schedule is re-planned from `now`."""
        if data.get("v") != SNAPSHOT_VERSION:
            raise ValueError(f"unknown ranking schedule snapshot version {data.get('v')!r}")
        self.entries.clear()
        self._heap.clear()
        for tenant, rid, expr, at, previous in data["entries"]:
            profile = self.profiles.get((tenant, rid))
            if profile is None:
                continue
            if profile.schedule != expr:
                at = self._next(profile, now)
            self._put(ScheduledRanking(tenant, rid, profile.schedule, float(at),
                                       None if previous is None else float(previous)))
