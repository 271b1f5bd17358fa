"""The leader's RankingS: fed by the runs its turns end, computed on the rankings' schedule,
kept in the ledger for a successor, exported on `rota.events` and as gauges, and published
to readers as an immutable `RankingsView` after each turn.

Ledger keys (batched with the turn's commit):
- `rankings/state/<n>`: the core's snapshot (stat windows, schedule, threshold streaks and
  the ids of the runs fed lately), msgpack, split into parts of at most `PART_BYTES`; at most
  `STATE_MAX_BYTES` in all (the oldest runs of the longest windows are dropped beyond it).
  Written with every computation when `store_interval` is -1, at most every
  `store_interval` seconds when > 0 (every `STATE_EVERY` when 0), when rankings are
  scheduled by a call, and at a clean shutdown — never once per run;
- `rankings/stored/<tenant>/<id>`: a stored ranking (`Ranking.to_dict()`, msgpack), for
  profiles with `stored = true`, as `store_interval` says.

A successor loads both; it also feeds the ended runs the ledger still holds that the last
state written had not taken, so a leader killed between two writes loses no run.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import msgpack

from coordinator import metrics
from coordinator.core.ranking import Ranking
from coordinator.core.ranking_schedule import ScheduledRanking
from coordinator.core.ranking_thresholds import ReturnNode, TakeNodeOut, ThresholdAlert
from coordinator.core.rankings import RankingNotFound, RankingS
from coordinator.core.run import Run
from coordinator.core.stats import FinishedRun
from protocol import RankingAlert, RankingUpdate, encode
from protocol.rankings import DEFAULT_TENANT, RankingsConfig

log = logging.getLogger("rota.rankings")

STATE = "rankings/state/"
STORED = "rankings/stored/"
PART_BYTES = 200_000
STATE_MAX_BYTES = 2_000_000
RANKING_MAX_BYTES = 500_000
STATE_EVERY = 60.0
"""Seconds between two writes of the state when rankings are not stored (`store_interval`
0): the stats and the schedule still survive a failover."""
RECENT_RUNS = 10_000
"""Ids of the latest runs fed, kept with the state so a successor feeds the rest."""

Key = tuple[str, str]
Event = tuple[str, bytes]


@dataclass(frozen=True)
class RankingsView:
    """The rankings as of the end of a leader turn. Built by the leader and never changed
    after: readers (HTTP API, JSON-RPC, page) take it without any lock."""

    rankings: Mapping[Key, Ranking] = field(default_factory=lambda: MappingProxyType({}))
    schedule: tuple[ScheduledRanking, ...] = ()
    profiles: tuple[Key, ...] = ()
    nodes_out: frozenset[str] = frozenset()

    def get_ranking(self, tenant: str, ranking_id: str) -> Ranking:
        found = self.rankings.get((tenant, ranking_id))
        if found is None:
            if (tenant, ranking_id) not in self.profiles:
                raise RankingNotFound(f"tenant {tenant!r} has no ranking profile "
                                      f"{ranking_id!r}")
            raise RankingNotFound(f"ranking {tenant}/{ranking_id} was not computed yet")
        return found

    def get_schedule(self, tenant: str, prefixes: Iterable[str] = ()) -> list[ScheduledRanking]:
        wanted = tuple(prefixes)
        return [e for e in self.schedule
                if e.tenant == tenant and (not wanted or e.id.startswith(wanted))]


@dataclass
class RankingsOut:
    """What one turn of RankingS adds to the leader's turn."""

    writes: dict[str, bytes | None] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)


def finished_run(run: Run) -> FinishedRun:
    return FinishedRun(
        service=run.service, node=run.node, trigger=run.trigger.value,
        outcome=run.state.value, slot=run.slot, queued_at=run.queued_at,
        dispatched_at=run.dispatched_at, started_at=run.started_at,
        finished_at=run.finished_at, metrics=dict(run.metrics),
    )


def _stored_key(tenant: str, ranking_id: str) -> str:
    return f"{STORED}{quote(tenant, safe='')}/{quote(ranking_id, safe='')}"


class LeaderRankings:
    """RankingS as one leader term drives it. Not thread-safe: only the leader's turn loop
    calls it; readers use `view`."""

    def __init__(self, config: RankingsConfig, tz: ZoneInfo,
                 rng: random.Random | None = None) -> None:
        self.config = config
        self.core = RankingS(config, tz, rng or random.Random())
        self.now = 0.0
        self.view = RankingsView(profiles=tuple(sorted(config.rankings)))
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._state_dirty = False
        self._state_force = False
        self._state_at = float("-inf")
        self._parts = 0  # state parts in the ledger now

    @property
    def enabled(self) -> bool:
        return bool(self.config.rankings or self.config.stats)

    # -- the term -----------------------------------------------------------------------
    def start(self, loaded: Mapping[str, bytes], ended: Iterable[Run], now: float) -> None:
        """Continue from what the ledger holds: the state, the stored rankings, and the
        ended runs the state had not taken yet."""
        self.now = now
        parts = sorted((k for k in loaded if k.startswith(STATE)),
                       key=lambda k: int(k[len(STATE):]))
        self._parts = len(parts)
        state: dict[str, Any] | None = None
        if parts:
            try:
                state = msgpack.unpackb(b"".join(loaded[k] for k in parts), raw=False,
                                        strict_map_key=False)
            except Exception as exc:
                log.error("the rankings' state in the ledger cannot be read (%s): the stats "
                          "and the schedule start afresh", exc)
        stored = []
        for key, value in loaded.items():
            if key.startswith(STORED):
                try:
                    stored.append(Ranking.from_dict(msgpack.unpackb(value, raw=False)))
                except Exception as exc:
                    log.error("stored ranking %s cannot be read (%s): left out", key, exc)
        try:
            self.core.start(now, state, stored)
        except Exception as exc:  # a snapshot this code cannot read: start afresh
            log.error("the rankings' state cannot be continued (%s): starting afresh", exc)
            state = None
            self.core = RankingS(self.config, self.core.scheduler.tz, self.core.rng)
            self.core.start(now, None, stored)
        if state is not None:
            self._recent = OrderedDict.fromkeys(str(i) for i in state.get("recent", ()))
            self.feed([r for r in ended if r.run_id not in self._recent], now)
        self._state_dirty = self._state_force = True  # the first turn writes the schedule
        self._publish()

    def feed(self, runs: Iterable[Run], now: float) -> int:
        """Feed the runs that ended (each once) to the stat queues."""
        fed = 0
        for run in runs:
            if not run.state.terminal or run.run_id in self._recent:
                continue
            self._recent[run.run_id] = None
            self.core.run_finished(finished_run(run), now)
            fed += 1
        while len(self._recent) > RECENT_RUNS:
            self._recent.popitem(last=False)
        if fed:
            self._state_dirty = True
        return fed

    def schedule_queries(self, tenant: str, ranking_ids: Iterable[str], now: float) -> int:
        """RankingSv1.ScheduleQueries; the new schedule is written with this turn."""
        count = self.core.schedule_queries(tenant, ranking_ids, now)
        self._state_dirty = self._state_force = True
        self._publish()
        return count

    def turn(self, now: float, epoch: int) -> RankingsOut:
        """Compute what is due; return the ledger writes and events of this turn."""
        self.now = now
        out = RankingsOut()
        result = self.core.tick(now)
        interval = self.config.settings.store_interval
        for ranking in result.store:
            self._store(ranking, out.writes)
        node_of: dict[tuple[str, str], str] = {}
        returned: dict[tuple[str, str], str] = {}
        for action in result.actions:
            if isinstance(action, TakeNodeOut):
                node_of[(action.tenant, action.threshold_id)] = action.node
            elif isinstance(action, ReturnNode):
                returned[(action.tenant, action.threshold_id)] = action.node
        for action in result.actions:
            if isinstance(action, ThresholdAlert):
                key = (action.tenant, action.threshold_id)
                node = node_of.get(key) if action.state == "firing" else returned.get(key)
                msg = RankingAlert(
                    tenant=action.tenant, threshold_id=action.threshold_id,
                    ranking_id=action.ranking_id, stat_id=action.stat_id, state=action.state,
                    at=action.at, message=action.message, node_out=node, epoch=epoch)
                out.events.append((msg.routing_key, encode(msg)))
                metrics.RANKING_ALERTS.labels(action.tenant, action.threshold_id,
                                              action.state).inc()
                log.warning("ranking threshold %s/%s %s: %s", action.tenant,
                            action.threshold_id, action.state, action.message)
        for update in result.updates:
            upd = RankingUpdate(
                tenant=update.tenant, id=update.id, last_update=update.last_update,
                sorted_stat_ids=list(update.sorted_stat_ids),
                moved=[{"stat_id": m.stat_id, "before": m.before, "after": m.after}
                       for m in update.moved], epoch=epoch)
            out.events.append((upd.routing_key, encode(upd)))
            metrics.RANKING_UPDATES.labels(update.tenant, update.id).inc()
        if result.computed:
            self._state_dirty = True
            self._show(result.computed)
        if interval == -1:  # with every computation
            due = self._state_force or bool(result.computed)
        else:
            every = STATE_EVERY if interval == 0 else interval
            due = self._state_force or now >= self._state_at + every
        if self._state_dirty and due:
            self._write_state(now, out.writes)
        if result.computed or result.actions:
            self._publish()
        return out

    def flush(self, now: float) -> dict[str, bytes | None]:
        """What a clean shutdown writes: the rankings changed since the last store, and the
        state."""
        writes: dict[str, bytes | None] = {}
        for ranking in self.core.flush():
            self._store(ranking, writes)
        self._write_state(now, writes)
        return writes

    def next_wakeup(self) -> float | None:
        times = [self.core.next_wakeup()]
        if self._state_dirty and self.config.settings.store_interval != -1:
            interval = self.config.settings.store_interval
            times.append(self._state_at + (STATE_EVERY if interval == 0 else interval))
        present = [t for t in times if t is not None]
        return min(present) if present else None

    # -- placement ----------------------------------------------------------------------
    def rank(self, ranking_id: str) -> list[str]:
        """The engine's `rank` callable: nodes best first, or [] when the ranking is empty
        or stale (older than two periods of its schedule, or no longer scheduled)."""
        key = (DEFAULT_TENANT, ranking_id)
        ranking = self.core.rankings.get(key)
        entry = self.core.scheduler.entries.get(key)
        if ranking is None or entry is None:
            return []
        period = entry.next - (entry.previous if entry.previous is not None
                               else ranking.last_update)
        if self.now - ranking.last_update > 2 * max(period, 1.0):
            return []
        return self.core.node_order(ranking_id)

    def nodes_out(self) -> frozenset[str]:
        return self.core.nodes_out()

    # -- inside -------------------------------------------------------------------------
    def _store(self, ranking: Ranking, writes: dict[str, bytes | None]) -> None:
        value = msgpack.packb(ranking.to_dict())
        if len(value) > RANKING_MAX_BYTES:
            log.warning("ranking %s/%s is %d bytes, over %d: not stored", ranking.tenant,
                        ranking.id, len(value), RANKING_MAX_BYTES)
            return
        writes[_stored_key(ranking.tenant, ranking.id)] = value

    def _write_state(self, now: float, writes: dict[str, bytes | None]) -> None:
        snap = self.core.snapshot()
        snap["recent"] = list(self._recent)
        data = msgpack.packb(snap)
        while len(data) > STATE_MAX_BYTES:
            if not _trim(snap):
                log.warning("the rankings' state is over %d bytes: not written",
                            STATE_MAX_BYTES)
                return
            data = msgpack.packb(snap)
        parts = [data[i:i + PART_BYTES] for i in range(0, len(data), PART_BYTES)] or [b""]
        for i, part in enumerate(parts):
            writes[f"{STATE}{i}"] = part
        for i in range(len(parts), self._parts):
            writes[f"{STATE}{i}"] = None
        self._parts = len(parts)
        self._state_at = now
        self._state_dirty = self._state_force = False

    def _show(self, computed: Iterable[Key]) -> None:
        for key in computed:
            profile = self.config.rankings.get(key)
            ranking = self.core.rankings.get(key)
            if profile is None or ranking is None:
                continue
            position = {s: i + 1 for i, s in enumerate(ranking.sorted_stat_ids)}
            for stat_id in profile.stat_ids:
                metrics.RANK.labels(key[0], key[1], stat_id).set(position.get(stat_id, 0))
        out = self.core.nodes_out()
        for node in sorted({t.take_out_node for t in self.config.thresholds.values()
                            if t.take_out_node}):
            metrics.NODE_OUT.labels(node).set(1 if node in out else 0)

    def _publish(self) -> None:
        schedule = [e for (t, _), e in self.core.scheduler.entries.items()]
        schedule.sort(key=lambda e: (e.next, e.tenant, e.id))
        self.view = RankingsView(
            rankings=MappingProxyType(dict(self.core.rankings)), schedule=tuple(schedule),
            profiles=tuple(sorted(self.config.rankings)), nodes_out=self.core.nodes_out())


def _trim(snap: dict[str, Any]) -> bool:
    """Halve the longest stat window (its oldest runs go) and the recent ids; False when
    there is nothing left to drop."""
    queues = snap["stats"]["queues"]
    recent = snap.get("recent") or []
    longest = max(queues, key=lambda k: len(queues[k]), default=None)
    if longest is not None and len(queues[longest]) > 1:
        items = queues[longest]
        queues[longest] = items[len(items) // 2:]
        snap["recent"] = recent[len(recent) // 2:]
        return True
    if recent:
        snap["recent"] = []
        return True
    return False

