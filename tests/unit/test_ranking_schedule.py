"""Ranking schedules: every form and the refusals; scheduling from configuration and by
call; GetSchedule; due times; snapshot and restore."""

from __future__ import annotations

from datetime import UTC, datetime

import msgpack
import pytest

from coordinator.core.ranking_schedule import RankingScheduler
from protocol.ranking_schedule import Every, parse_duration, parse_ranking_schedule
from protocol.rankings import RankingError, RankingProfile
from protocol.schedule import Cron, ScheduleError, zone

UTC_TZ = zone("UTC")


def at(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[misc]


T0 = at(2025, 6, 2, 10, 0, 7)  # a Monday, 10:00:07 UTC


def nexts(expr: str, start: float = T0, n: int = 3, tz: str = "UTC") -> list[str]:
    schedule = parse_ranking_schedule(expr)
    out, t = [], start
    for _ in range(n):
        t = schedule.next_after(t, zone(tz))
        out.append(datetime.fromtimestamp(t, UTC).strftime("%m-%d %H:%M:%S"))
    return out


def test_five_field_cron() -> None:
    assert nexts("*/15 * * * *") == ["06-02 10:15:00", "06-02 10:30:00", "06-02 10:45:00"]


def test_six_fields_take_seconds_last() -> None:
    assert nexts("*/15 * * * * 30") == ["06-02 10:00:30", "06-02 10:15:30", "06-02 10:30:30"]
    assert nexts("* * * * * 10,40") == ["06-02 10:00:10", "06-02 10:00:40", "06-02 10:01:10"]
    assert nexts("* * * * * *") == ["06-02 10:00:08", "06-02 10:00:09", "06-02 10:00:10"]


def test_cron_reads_the_system_time_zone() -> None:
    assert nexts("0 9 * * *", tz="Europe/Berlin", n=1) == ["06-03 07:00:00"]


@pytest.mark.parametrize("expr, expected", [
    ("@hourly", ["06-02 11:00:00", "06-02 12:00:00"]),
    ("@daily", ["06-03 00:00:00", "06-04 00:00:00"]),
    ("@midnight", ["06-03 00:00:00", "06-04 00:00:00"]),
    ("@weekly", ["06-08 00:00:00", "06-15 00:00:00"]),  # Sundays
    ("@monthly", ["07-01 00:00:00", "08-01 00:00:00"]),
    ("@yearly", ["01-01 00:00:00", "01-01 00:00:00"]),
    ("@annually", ["01-01 00:00:00", "01-01 00:00:00"]),
])
def test_descriptors(expr: str, expected: list[str]) -> None:
    assert nexts(expr, n=2) == expected


@pytest.mark.parametrize("expr, seconds", [
    ("@every 30s", 30.0), ("@every 1m30s", 90.0), ("@every 2h", 7200.0),
    ("@every 1.5h", 5400.0), ("@every 1h2m3s", 3723.0), ("@every 1500ms", 1.5),
    ("  @every   45s ", 45.0),
])
def test_every(expr: str, seconds: float) -> None:
    schedule = parse_ranking_schedule(expr)
    assert schedule == Every(seconds)
    assert schedule.next_after(T0, UTC_TZ) == T0 + seconds


@pytest.mark.parametrize("expr, message", [
    ("0 */5 * * * *", "ambiguous"),         # Quartz: every 5 min; croniter: every second
    ("0 0 12 * * 1", "ambiguous"),          # Quartz: Mondays 12:00; croniter: the 12th
    ("*/5 * * * * 0", "ambiguous"),         # Quartz: Sundays every 5 s
    ("0 0 12 ? * MON", "Quartz"),
    ("0 0 12 * * ? 2025", "Quartz"),
    ("0 0 1 1 * 0 2030", "seven|7 fields"),
    ("* * * *", "4 fields"),
    ("61 * * * *", "bad cron"),
    ("0 0 31 2 *", "never fires"),
    ("@every", "@every <duration>"),
    ("@every 0s", "below one second"),
    ("@every 500ms", "below one second"),
    ("@every 5", "bad duration"),
    ("@every 5x", "bad duration"),
    ("@every -5s", "bad duration"),
    ("@every30s", "@every <duration>"),
    ("@fortnightly", "unknown descriptor"),
    ("", "empty schedule"),
])
def test_refusals(expr: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        parse_ranking_schedule(expr)


def test_six_fields_that_read_the_same_both_ways_or_only_one_way_are_accepted() -> None:
    # seconds 30 cannot be a weekday: only croniter's reading is valid
    assert parse_ranking_schedule("*/15 * * * * 30") == Cron("*/15 * * * * 30")
    # all stars read the same either way
    assert parse_ranking_schedule("* * * * * *") == Cron("* * * * * *")


def test_parse_duration() -> None:
    assert parse_duration("1m30s") == 90.0
    with pytest.raises(ScheduleError):
        parse_duration("1m 30s")


# -- the scheduler -------------------------------------------------------------------------


def profile(tenant: str, rid: str, schedule: str = "@every 1m") -> RankingProfile:
    return RankingProfile(tenant, rid, schedule, ("s",), sorting="*desc",
                          sorting_parameters=("*asr",))


PROFILES = {(p.tenant, p.id): p for p in [
    profile("acme", "r1", "@every 1m"), profile("acme", "r2", "*/5 * * * *"),
    profile("acme", "other", "@hourly"), profile("beta", "r1", "@every 30s"),
]}


def scheduler() -> RankingScheduler:
    return RankingScheduler(PROFILES, UTC_TZ)


def scheduled(s: RankingScheduler) -> set[tuple[str, str]]:
    return set(s.entries)


def test_empty_scheduled_ids_schedule_every_profile_of_every_tenant() -> None:
    for empty in (None, {}):
        s = scheduler()
        assert s.schedule_configured(empty, T0) == 4
        assert scheduled(s) == set(PROFILES)


def test_a_tenant_with_an_empty_list_schedules_all_its_profiles() -> None:
    s = scheduler()
    assert s.schedule_configured({"acme": []}, T0) == 3
    assert scheduled(s) == {("acme", "r1"), ("acme", "r2"), ("acme", "other")}


def test_listed_ids_schedule_only_those() -> None:
    s = scheduler()
    assert s.schedule_configured({"acme": ["r2"], "beta": []}, T0) == 2
    assert scheduled(s) == {("acme", "r2"), ("beta", "r1")}


def test_schedule_queries_counts_and_refuses_unknown_ids() -> None:
    s = scheduler()
    assert s.schedule_queries("acme", ["r1", "r1", "r2"], T0) == 2
    with pytest.raises(RankingError, match="no ranking profile 'nope'"):
        s.schedule_queries("acme", ["other", "nope"], T0)
    assert scheduled(s) == {("acme", "r1"), ("acme", "r2")}  # nothing of the refused call
    assert s.schedule_queries("beta", [], T0) == 1  # empty: all of the tenant's


def test_get_schedule_is_sorted_by_next_and_filtered_by_prefix() -> None:
    s = scheduler()
    s.schedule_configured(None, T0)
    rows = s.get_schedule("acme")
    assert [(r.id, r.next) for r in rows] == [
        ("r1", T0 + 60), ("r2", at(2025, 6, 2, 10, 5)), ("other", at(2025, 6, 2, 11))]
    assert all(r.previous is None for r in rows)
    assert [r.id for r in s.get_schedule("acme", ["r"])] == ["r1", "r2"]
    assert [r.id for r in s.get_schedule("acme", ["ot", "r2"])] == ["r2", "other"]
    assert s.get_schedule("nobody") == []


def test_due_runs_each_once_and_moves_it_on_with_previous() -> None:
    s = scheduler()
    s.schedule_queries("acme", ["r1", "r2"], T0)
    assert s.next_wakeup() == T0 + 60
    assert s.due(T0 + 59) == []
    assert s.due(T0 + 60) == [("acme", "r1")]
    r1 = s.entries[("acme", "r1")]
    assert (r1.previous, r1.next) == (T0 + 60, T0 + 120)
    # An outage: many times passed; each ranking runs once, in time order (r1 was due at
    # 10:02:07, r2 at 10:05).
    late = at(2025, 6, 2, 10, 31)
    assert s.due(late) == [("acme", "r1"), ("acme", "r2")]
    assert s.entries[("acme", "r2")].next == at(2025, 6, 2, 10, 35)
    # @every stays on its grid (T0 + k minutes), a late turn does not shift it.
    assert s.entries[("acme", "r1")].next == T0 + 31 * 60
    assert s.entries[("acme", "r1")].previous == late


def test_rescheduling_replaces_the_old_schedule() -> None:
    s = scheduler()
    s.schedule_queries("acme", ["r1"], T0)
    s.due(T0 + 60)
    assert s.schedule_queries("acme", ["r1"], T0 + 90) == 1
    r1 = s.entries[("acme", "r1")]
    assert (r1.next, r1.previous) == (T0 + 150, T0 + 60)
    assert s.due(T0 + 120) == []  # the old time is gone
    assert s.due(T0 + 150) == [("acme", "r1")]
    assert [r.id for r in s.get_schedule("acme")] == ["r1"]


def test_snapshot_restore_keeps_the_schedule() -> None:
    s = scheduler()
    s.schedule_configured(None, T0)
    s.due(T0 + 60)
    data = msgpack.unpackb(msgpack.packb(s.snapshot()))
    successor = RankingScheduler(PROFILES, UTC_TZ)
    successor.restore(data, T0 + 70)
    assert successor.get_schedule("acme") == s.get_schedule("acme")
    assert successor.get_schedule("beta") == s.get_schedule("beta")
    assert successor.due(T0 + 120) == s.due(T0 + 120)


def test_restore_drops_removed_profiles_and_replans_changed_schedules() -> None:
    s = scheduler()
    s.schedule_configured(None, T0)
    changed = dict(PROFILES)
    del changed[("beta", "r1")]
    changed[("acme", "r2")] = profile("acme", "r2", "@every 10s")
    successor = RankingScheduler(changed, UTC_TZ)
    successor.restore(s.snapshot(), T0 + 5)
    assert set(successor.entries) == {("acme", "r1"), ("acme", "r2"), ("acme", "other")}
    assert successor.entries[("acme", "r2")].next == T0 + 15
    assert successor.entries[("acme", "r1")].next == T0 + 60


def test_keep_schedules_only_what_is_not_scheduled_yet() -> None:
    s = scheduler()
    s.schedule_queries("acme", ["r1"], T0)
    s.due(T0 + 60)
    assert s.schedule_configured(None, T0 + 90, keep=True) == 3
    r1 = s.entries[("acme", "r1")]
    assert (r1.next, r1.previous) == (T0 + 120, T0 + 60)  # kept
    assert scheduled(s) == set(PROFILES)
