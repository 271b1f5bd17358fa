"""The catalogue's RankingS tables: `[rankings]`, `[[stat]]`, `[[ranking]]`, `[[threshold]]`.

Validated like the services: every problem is collected, each naming the file, the table
(`stat "tenant/id"`, `ranking "tenant/id"`, `threshold "tenant/id"` or `[rankings]`) and the
field. `docs/rankings.md` has the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from protocol.catalogue import (
    _Bad,
    _boolean,
    _integer,
    _seconds,
    _shown,
    _string,
    _string_list,
    _suggest,
)
from protocol.ranking_schedule import parse_ranking_schedule
from protocol.rankings import (
    DEFAULT_TENANT,
    OUTCOMES,
    RUN_METRICS,
    SORTINGS,
    THRESHOLD_KINDS,
    TRIGGERS,
    RankingError,
    RankingProfile,
    RankingsConfig,
    RankingsSettings,
    StatQueueProfile,
    ThresholdProfile,
    check_metric_id,
    parse_sorting_parameter,
)
from protocol.schedule import ScheduleError

if TYPE_CHECKING:
    from protocol.catalogue import _Parser

TOP_KEYS = ("rankings", "stat", "ranking", "threshold")
_SETTINGS_KEYS = ("store_interval", "scheduled_ids")
_STAT_KEYS = ("tenant", "id", "services", "nodes", "outcomes", "triggers", "ttl",
              "queue_length", "min_items", "metrics")
_RANKING_KEYS = ("tenant", "id", "schedule", "stat_ids", "metric_ids", "sorting",
                 "sorting_parameters", "stored", "threshold_ids")
_THRESHOLD_KEYS = ("tenant", "id", "ranking_ids", "stat_id", "kind", "metric", "value",
                   "updates", "take_out_node")

Key = tuple[str, str]
T = TypeVar("T")


def _metric_list(value: object) -> list[str]:
    out = _string_list(value)
    for metric_id in out:
        try:
            check_metric_id(metric_id)
        except RankingError as exc:
            raise _Bad(str(exc)) from None
    return out


def _choices(allowed: tuple[str, ...]) -> Callable[[object], list[str]]:
    def read(value: object) -> list[str]:
        out = _string_list(value)
        for item in out:
            if item not in allowed:
                raise _Bad(f"unknown value {item!r}{_suggest(item, allowed)}: expected "
                           f"{' | '.join(allowed)}")
        return out
    return read


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Bad(f"expected a number, got {_shown(value)}")
    if not math.isfinite(float(value)):
        raise _Bad(f"must be finite, got {value}")
    return float(value)


def _store_interval(value: object) -> float:
    number = _number(value)
    if number < 0 and number != -1:
        raise _Bad(f"expected 0 (never stored), -1 (stored on every computation) or a "
                   f"number of seconds above 0, got {value}")
    return number


class _RankingsParser:
    def __init__(self, parser: _Parser) -> None:
        self.p = parser

    def tables(self, data: dict[str, object], key: str) -> list[dict[str, object]]:
        raw = data.get(key, [])
        if isinstance(raw, dict):
            self.p.error("", key, f"write each one as [[{key}]] (an array of tables)")
            return []
        if not isinstance(raw, list):
            self.p.error("", key, f"expected [[{key}]] tables, got {_shown(raw)}")
            return []
        out = []
        for index, entry in enumerate(raw, start=1):
            if isinstance(entry, dict):
                out.append(entry)
            else:
                self.p.error(f"{key} #{index}", None, f"expected a table, got {_shown(entry)}")
        return out

    def ident(self, kind: str, index: int, entry: dict[str, object],
              known: tuple[str, ...]) -> tuple[str, Key | None]:
        """Where to report problems of this table, and its (tenant, id) when valid."""
        tenant = entry.get("tenant", DEFAULT_TENANT)
        ident = entry.get("id")
        good = (isinstance(tenant, str) and tenant.strip() and isinstance(ident, str)
                and ident.strip())
        where = f'{kind} "{tenant}/{ident}"' if good else f"{kind} #{index}"
        if "tenant" in entry:
            self.p.read(where, entry, "tenant", _string)
        if "id" not in entry:
            self.p.error(where, "id", "missing")
        else:
            self.p.read(where, entry, "id", _string)
        for key in entry:
            if key not in known:
                self.p.error(where, key, f"unknown key{_suggest(key, known)}")
        return where, ((str(tenant), str(ident)) if good else None)

    def unique(self, kind: str, where: str, key: Key | None, seen: dict[Key, str]) -> bool:
        if key is None:
            return False
        if key in seen:
            self.p.error(where, "id", f"duplicate: another {kind} of tenant {key[0]!r} has "
                         f"id {key[1]!r}")
            return False
        seen[key] = where
        return True

    def opt(self, where: str, entry: dict[str, object], key: str,
            reader: Callable[[object], T], default: T) -> T:
        """`reader(entry[key])`, or `default` when absent or bad (bad is recorded)."""
        if key not in entry:
            return default
        got = self.p.read(where, entry, key, reader)
        return default if got is None else got  # type: ignore[return-value]

    def stat(self, index: int, entry: dict[str, object],
             seen: dict[Key, str]) -> StatQueueProfile | None:
        where, key = self.ident("stat", index, entry, _STAT_KEYS)
        before = len(self.p.errors)
        unique = self.unique("stat", where, key, seen)
        services: list[str] = self.opt(where, entry, "services", _string_list, [])
        nodes: list[str] = self.opt(where, entry, "nodes", _string_list, [])
        outcomes: list[str] = self.opt(where, entry, "outcomes", _choices(OUTCOMES), [])
        triggers: list[str] = self.opt(where, entry, "triggers", _choices(TRIGGERS), [])
        ttl: float | None = self.opt(where, entry, "ttl", _positive_seconds, None)
        length: int | None = self.opt(where, entry, "queue_length", _at_least(1), None)
        min_items = self.opt(where, entry, "min_items", _at_least(0), 1)
        metrics = self.opt(where, entry, "metrics", _nonempty_metrics, list(RUN_METRICS))
        if len(self.p.errors) > before or not unique or key is None:
            return None
        return StatQueueProfile(
            tenant=key[0], id=key[1], services=frozenset(services), nodes=frozenset(nodes),
            outcomes=frozenset(outcomes), triggers=frozenset(triggers), ttl=ttl,
            queue_length=length, min_items=min_items, metric_ids=tuple(metrics),
        )

    def ranking(self, index: int, entry: dict[str, object], seen: dict[Key, str],
                stats: dict[Key, str], thresholds: dict[Key, str]) -> RankingProfile | None:
        """`stats` and `thresholds`: every one declared (valid or not), so a ranking naming
        a declared but faulty one is not also told it does not exist."""
        where, key = self.ident("ranking", index, entry, _RANKING_KEYS)
        before = len(self.p.errors)
        unique = self.unique("ranking", where, key, seen)
        tenant = key[0] if key else DEFAULT_TENANT
        schedule = self.need(where, entry, "schedule", _ranking_schedule,
                             'a cron expression, "@every 30s" or "@hourly"')
        stat_ids = self.need(where, entry, "stat_ids", _nonempty_strings, "the stat ids ranked")
        for stat_id in stat_ids or []:
            if (tenant, stat_id) not in stats:
                known = [sid for (t, sid) in stats if t == tenant]
                self.p.error(where, "stat_ids", f"unknown stat {stat_id!r}"
                             f"{_suggest(stat_id, known)}: no [[stat]] of tenant {tenant!r} "
                             "has that id")
        metric_ids: list[str] = self.opt(where, entry, "metric_ids", _metric_list, [])
        sorting = self.need(where, entry, "sorting", _sorting, " | ".join(SORTINGS))
        params = self.need(where, entry, "sorting_parameters", _nonempty_strings,
                           'metrics to sort by, e.g. ["*asr", "*acd:false"]')
        for text in params or []:
            metric, _ = parse_sorting_parameter(text)
            try:
                check_metric_id(metric)
            except RankingError as exc:
                self.p.error(where, "sorting_parameters", str(exc))
                continue
            if metric_ids and metric not in metric_ids:
                self.p.error(where, "sorting_parameters", f"{metric!r} is not among "
                             "metric_ids, which limit the metrics queried")
        stored = self.opt(where, entry, "stored", _boolean, False)
        threshold_ids: list[str] = self.opt(where, entry, "threshold_ids", _string_list, [])
        for tid in threshold_ids:
            if tid != "*none" and (tenant, tid) not in thresholds:
                self.p.error(where, "threshold_ids", f"unknown threshold {tid!r}: no "
                             f"[[threshold]] of tenant {tenant!r} has that id")
        if "*none" in threshold_ids and len(threshold_ids) > 1:
            self.p.error(where, "threshold_ids", '"*none" stands alone')
        if (len(self.p.errors) > before or not unique or key is None or schedule is None
                or stat_ids is None or sorting is None or params is None):
            return None
        return RankingProfile(
            tenant=key[0], id=key[1], schedule=schedule, stat_ids=tuple(stat_ids),
            metric_ids=tuple(metric_ids), sorting=sorting, sorting_parameters=tuple(params),
            stored=stored, threshold_ids=tuple(threshold_ids),
        )

    def threshold(self, index: int, entry: dict[str, object],
                  seen: dict[Key, str]) -> ThresholdProfile | None:
        where, key = self.ident("threshold", index, entry, _THRESHOLD_KEYS)
        before = len(self.p.errors)
        unique = self.unique("threshold", where, key, seen)
        kind = self.need(where, entry, "kind", _kind, " | ".join(THRESHOLD_KINDS))
        stat_id = self.need(where, entry, "stat_id", _string, "the stat it watches")
        ranking_ids: list[str] = self.opt(where, entry, "ranking_ids", _string_list, [])
        metric: str | None = None
        value: float | None = None
        if kind in ("above", "below"):
            metric = self.need(where, entry, "metric", _metric_id, "the metric compared")
            value = self.need(where, entry, "value", _number, "the value it crosses")
        else:
            for name in ("metric", "value"):
                if name in entry:
                    self.p.error(where, name, "only for kind above | below")
        updates = self.opt(where, entry, "updates", _at_least(1), 1)
        node: str | None = self.opt(where, entry, "take_out_node", _string, None)
        if len(self.p.errors) > before or not unique or key is None or kind is None:
            return None
        return ThresholdProfile(
            tenant=key[0], id=key[1], stat_id=str(stat_id), kind=kind,
            ranking_ids=tuple(ranking_ids), metric=metric, value=value, updates=updates,
            take_out_node=node,
        )

    def settings(self, data: dict[str, object], rankings: dict[Key, str]) -> RankingsSettings:
        where = "[rankings]"
        raw = data.get("rankings", {})
        if not isinstance(raw, dict):
            self.p.error(where, None, "must be a table: write [rankings]")
            return RankingsSettings()
        for key in raw:
            if key not in _SETTINGS_KEYS:
                self.p.error(where, key, f"unknown key{_suggest(key, _SETTINGS_KEYS)}")
        interval = self.opt(where, raw, "store_interval", _store_interval, 0.0)
        scheduled: dict[str, tuple[str, ...]] | None = None
        if "scheduled_ids" in raw:
            table = raw["scheduled_ids"]
            if not isinstance(table, dict):
                self.p.error(where, "scheduled_ids", "expected a table of tenant = [ranking "
                             f'ids], e.g. {{ "{DEFAULT_TENANT}" = [] }}, got {_shown(table)}')
            else:
                scheduled = {}
                for tenant in table:
                    got = self.p.read(where, table, tenant, _string_list)
                    if not isinstance(got, list):
                        continue
                    for rid in got:
                        if (tenant, rid) not in rankings:
                            self.p.error(where, "scheduled_ids", f"tenant {tenant!r}: unknown "
                                         f"ranking {rid!r}")
                    if not got and not any(t == tenant for t, _ in rankings):
                        self.p.error(where, "scheduled_ids",
                                     f"tenant {tenant!r} has no [[ranking]]")
                    scheduled[tenant] = tuple(got)
        return RankingsSettings(store_interval=interval, scheduled_ids=scheduled or None)

    def need(self, where: str, entry: dict[str, object], key: str,
             reader: Callable[[object], T], hint: str) -> T | None:
        """`reader(entry[key])`, or None when missing or bad (recorded)."""
        if key not in entry:
            self.p.error(where, key, f"missing: {hint}")
            return None
        return self.p.read(where, entry, key, reader)  # type: ignore[return-value]


def _nonempty_strings(value: object) -> list[str]:
    return _string_list(value, nonempty=True)


def _ranking_schedule(value: object) -> str:
    text = _string(value)
    try:
        parse_ranking_schedule(text)
    except ScheduleError as exc:
        raise _Bad(str(exc)) from None
    return text


def _nonempty_metrics(value: object) -> list[str]:
    out = _metric_list(value)
    if not out:
        raise _Bad("must not be empty: leave it out for the run metrics")
    return out


def _positive_seconds(value: object) -> float | None:
    return _seconds(value, positive=True)


def _at_least(minimum: int) -> Callable[[object], int]:
    return lambda value: _integer(value, minimum=minimum)


def _sorting(value: object) -> str:
    text = _string(value)
    if text not in SORTINGS:
        raise _Bad(f"unknown sorting {text!r}: expected {' | '.join(SORTINGS)}")
    return text


def _kind(value: object) -> str:
    text = _string(value)
    if text not in THRESHOLD_KINDS:
        raise _Bad(f"unknown kind {text!r}: expected {' | '.join(THRESHOLD_KINDS)}")
    return text


def _metric_id(value: object) -> str:
    try:
        return check_metric_id(value)
    except RankingError as exc:
        raise _Bad(str(exc)) from None


def parse_rankings(parser: _Parser, data: dict[str, object]) -> RankingsConfig:
    """The RankingS part of a catalogue's TOML data; problems go to `parser.errors`."""
    rp = _RankingsParser(parser)
    stats: dict[Key, StatQueueProfile] = {}
    stat_names: dict[Key, str] = {}
    for index, entry in enumerate(rp.tables(data, "stat"), start=1):
        stat = rp.stat(index, entry, stat_names)
        if stat is not None:
            stats[(stat.tenant, stat.id)] = stat
    thresholds: dict[Key, ThresholdProfile] = {}
    threshold_names: dict[Key, str] = {}
    for index, entry in enumerate(rp.tables(data, "threshold"), start=1):
        threshold = rp.threshold(index, entry, threshold_names)
        if threshold is not None:
            thresholds[(threshold.tenant, threshold.id)] = threshold
    rankings: dict[Key, RankingProfile] = {}
    ranking_names: dict[Key, str] = {}
    for index, entry in enumerate(rp.tables(data, "ranking"), start=1):
        ranking = rp.ranking(index, entry, ranking_names, stat_names, threshold_names)
        if ranking is not None:
            rankings[(ranking.tenant, ranking.id)] = ranking
    for key, threshold in thresholds.items():
        where = threshold_names[key]
        for rid in threshold.ranking_ids:
            if (threshold.tenant, rid) not in ranking_names:
                parser.error(where, "ranking_ids", f"unknown ranking {rid!r}: no [[ranking]] "
                             f"of tenant {threshold.tenant!r} has that id")
        if (threshold.tenant, threshold.stat_id) not in stat_names:
            parser.error(where, "stat_id", f"unknown stat {threshold.stat_id!r}: no [[stat]] "
                         f"of tenant {threshold.tenant!r} has that id")
    settings = rp.settings(data, ranking_names)
    return RankingsConfig(settings=settings, stats=stats, rankings=rankings,
                          thresholds=thresholds)
