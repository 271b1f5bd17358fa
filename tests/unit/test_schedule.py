"""Schedules: periodic alignment, fixed times and cron, across DST changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from croniter import croniter
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.schedule import (
    Cron,
    FixedTimes,
    Periodic,
    ScheduleError,
    first_instant,
    parse_hhmm,
    schedule_from_dict,
    zone,
)

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]
NY = zone("America/New_York")
BERLIN = zone("Europe/Berlin")

# 2025 transitions. New York: 2025-03-09 02:00 EST -> 03:00 EDT (07:00 UTC),
# 2025-11-02 02:00 EDT -> 01:00 EST (06:00 UTC). Berlin: 2025-03-30 02:00 CET -> 03:00 CEST
# (01:00 UTC), 2025-10-26 03:00 CEST -> 02:00 CET (01:00 UTC).
NY_SPRING = datetime(2025, 3, 9, 7, 0, tzinfo=UTC).timestamp()
NY_FALL = datetime(2025, 11, 2, 6, 0, tzinfo=UTC).timestamp()
BERLIN_SPRING = datetime(2025, 3, 30, 1, 0, tzinfo=UTC).timestamp()
BERLIN_FALL = datetime(2025, 10, 26, 1, 0, tzinfo=UTC).timestamp()
TRANSITIONS = {
    "America/New_York": (NY_SPRING, NY_FALL),
    "Europe/Berlin": (BERLIN_SPRING, BERLIN_FALL),
}


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


def local(instant: float, tz_name: str) -> datetime:
    return datetime.fromtimestamp(instant, zone(tz_name))


def wall(instant: float, tz_name: str) -> str:
    return local(instant, tz_name).strftime("%Y-%m-%d %H:%M:%S%z")


def series(schedule, start: float, tz_name: str, n: int) -> list[float]:
    out, t = [], start
    for _ in range(n):
        t = schedule.next_after(t, zone(tz_name))
        out.append(t)
    return out


# == periodic =================================================================================
class TestPeriodic:
    def test_period_5_align_2_fires_at_02_07_12(self) -> None:
        got = series(Periodic(5, 2), utc(2025, 1, 6, 10, 0), "UTC", 4)
        assert [wall(t, "UTC")[11:16] for t in got] == ["10:02", "10:07", "10:12", "10:17"]

    def test_slot_is_strictly_after_the_instant(self) -> None:
        at = utc(2025, 1, 6, 10, 7)
        assert Periodic(5, 2).next_after(at, zone("UTC")) == utc(2025, 1, 6, 10, 12)
        assert Periodic(5, 2).next_after(at - 0.5, zone("UTC")) == at

    def test_instant_a_hair_before_a_slot(self) -> None:
        # 03:00:00 minus a fraction of a microsecond: rounding it to whole microseconds must
        # not push the slot at 03:00:00 into the past.
        slot = utc(1972, 2, 16, 3, 0)
        instant = 67057199.99999976
        assert instant < slot
        assert Periodic(1).next_after(instant, zone("UTC")) == slot
        assert Cron("0 3 * * *").next_after(instant, zone("UTC")) == slot
        assert Cron("0 3 * * * 0").next_after(instant, zone("UTC")) == slot
        assert FixedTimes.parse(["03:00"]).next_after(instant, zone("UTC")) == slot

    def test_period_16_restarts_at_local_midnight(self) -> None:
        # 16 does not divide 1440: the last slot of the day is 23:44, the next is 00:00.
        got = series(Periodic(16), utc(2025, 1, 6, 23, 30), "UTC", 3)
        assert [wall(t, "UTC")[11:16] for t in got] == ["23:44", "00:00", "00:16"]

    def test_period_16_restarts_at_midnight_of_the_system_zone(self) -> None:
        # Berlin midnight is 23:00 UTC in winter.
        got = series(Periodic(16), utc(2025, 1, 6, 22, 30), "Europe/Berlin", 3)
        assert [wall(t, "Europe/Berlin")[11:16] for t in got] == ["23:44", "00:00", "00:16"]
        assert got[1] == utc(2025, 1, 6, 23, 0)

    def test_period_60_align_30(self) -> None:
        got = series(Periodic(60, 30), utc(2025, 1, 6, 9, 59), "Asia/Kolkata", 2)
        assert [wall(t, "Asia/Kolkata")[11:16] for t in got] == ["15:30", "16:30"]

    def test_period_over_60_is_refused_with_use_fixed_time(self) -> None:
        with pytest.raises(ScheduleError, match="use fixed time"):
            Periodic(61)

    @pytest.mark.parametrize("period", [0, -5])
    def test_period_below_one_is_refused(self, period: int) -> None:
        with pytest.raises(ScheduleError, match="below 1 minute"):
            Periodic(period)

    @pytest.mark.parametrize(("period", "align"), [(5, 5), (5, 7), (1, 1), (60, 60), (5, -1)])
    def test_align_outside_0_to_period_minus_1_is_refused(self, period: int, align: int) -> None:
        with pytest.raises(ScheduleError, match="align"):
            Periodic(period, align)

    @pytest.mark.parametrize("bad", [5.5, "5", True, None])
    def test_period_must_be_whole_minutes(self, bad: object) -> None:
        with pytest.raises(ScheduleError, match="whole number"):
            Periodic(bad)  # type: ignore[arg-type]

    def test_gap_minutes_do_not_fire_and_repeated_hour_fires_twice(self) -> None:
        spring = series(Periodic(30), NY_SPRING - 3600, "America/New_York", 3)
        assert [wall(t, "America/New_York") for t in spring] == [
            "2025-03-09 01:30:00-0500",
            "2025-03-09 03:00:00-0400",
            "2025-03-09 03:30:00-0400",
        ]
        fall = series(Periodic(30), NY_FALL - 3600 - 60, "America/New_York", 5)
        assert [wall(t, "America/New_York") for t in fall] == [
            "2025-11-02 01:00:00-0400",
            "2025-11-02 01:30:00-0400",
            "2025-11-02 01:00:00-0500",
            "2025-11-02 01:30:00-0500",
            "2025-11-02 02:00:00-0500",
        ]

    def test_describe_and_round_trip(self) -> None:
        p = Periodic(6, 3)
        assert p.describe() == "6 min +3"
        assert Periodic(5).describe() == "5 min"
        assert schedule_from_dict(p.to_dict()) == p

    @settings(max_examples=300, deadline=None)
    @given(
        data=st.data(),
        period=st.integers(1, 60),
        instant=st.floats(utc(1972, 1, 1), utc(2037, 12, 31), allow_nan=False),
        tz_name=st.sampled_from(ZONES),
    )
    def test_next_after_is_the_first_matching_wall_minute(
        self, data: st.DataObject, period: int, instant: float, tz_name: str
    ) -> None:
        align = data.draw(st.integers(0, period - 1), label="align")
        sched = Periodic(period, align)

        def matches(t: float) -> bool:
            lt = local(t, tz_name)
            mod = lt.hour * 60 + lt.minute
            return lt.second == 0 and (mod - align) % period == 0

        got = sched.next_after(instant, zone(tz_name))
        assert got > instant
        assert matches(got), wall(got, tz_name)
        # Every whole minute strictly between the instant and the slot must not match
        # (all the zones used have whole-minute offsets, so whole minutes are UTC minutes).
        t = (int(instant) // 60 + 1) * 60
        while t < got:
            assert not matches(t), f"{wall(t, tz_name)} matches before {wall(got, tz_name)}"
            t += 60

    @settings(max_examples=100, deadline=None)
    @given(
        period=st.sampled_from([1, 5, 7, 15, 16, 30, 45, 60]),
        tz_name=st.sampled_from(["America/New_York", "Europe/Berlin", "Australia/Lord_Howe"]),
        which=st.integers(0, 1),
        offset=st.floats(-3 * 3600, 3 * 3600, allow_nan=False),
    )
    def test_next_after_near_transitions(
        self, period: int, tz_name: str, which: int, offset: float
    ) -> None:
        if tz_name == "Australia/Lord_Howe":
            # 2025-04-06 02:00 +11 -> 01:30 +10:30; 2025-10-05 02:00 +10:30 -> 02:30 +11.
            transition = [utc(2025, 4, 5, 15, 0), utc(2025, 10, 4, 15, 30)][which]
        else:
            transition = TRANSITIONS[tz_name][which]
        instant = transition + offset
        got = series(Periodic(period), instant, tz_name, 8)
        assert all(b > a for a, b in zip([instant, *got], got, strict=False))
        for t in got:
            lt = local(t, tz_name)
            assert lt.second == 0 and (lt.hour * 60 + lt.minute) % period == 0
        # Real minutes between consecutive slots never exceed the period by more than the
        # size of the gap (the DST shift), and nothing matching is skipped.
        t = (int(instant) // 60 + 1) * 60
        expected = []
        while len(expected) < len(got):
            lt = local(t, tz_name)
            if (lt.hour * 60 + lt.minute) % period == 0:
                expected.append(t)
            t += 60
        assert got == expected


# == fixed times ==============================================================================
class TestFixedTimes:
    def test_parse_and_sort(self) -> None:
        f = FixedTimes.parse(["05:30", "01:20", "05:30"])
        assert f.times == ((1, 20), (5, 30))
        assert f.describe() == "01:20, 05:30"
        assert schedule_from_dict(f.to_dict()) == f
        assert FixedTimes.parse("03:20").times == ((3, 20),)

    @pytest.mark.parametrize("bad", ["24:00", "5:30", "05:60", "0530", "", "ab:cd", None])
    def test_bad_run_time_is_refused(self, bad: object) -> None:
        with pytest.raises(ScheduleError, match="bad run time"):
            parse_hhmm(bad)  # type: ignore[arg-type]

    def test_needs_a_time(self) -> None:
        with pytest.raises(ScheduleError, match="at least one"):
            FixedTimes(())
        with pytest.raises(ScheduleError, match="bad run time"):
            FixedTimes(((25, 0),))

    def test_several_times_a_day(self) -> None:
        f = FixedTimes.parse(["01:10", "13:10"])
        got = series(f, utc(2025, 1, 6, 12, 0), "UTC", 3)
        assert [wall(t, "UTC") for t in got] == [
            "2025-01-06 13:10:00+0000",
            "2025-01-07 01:10:00+0000",
            "2025-01-07 13:10:00+0000",
        ]

    def test_run_time_is_in_the_system_zone(self) -> None:
        got = FixedTimes.parse(["05:30"]).next_after(utc(2025, 1, 6), BERLIN)
        assert got == utc(2025, 1, 6, 4, 30)
        got = FixedTimes.parse(["05:30"]).next_after(utc(2025, 7, 6), BERLIN)
        assert got == utc(2025, 7, 6, 3, 30)

    def test_spring_forward_gap_runs_at_the_first_instant_after_it(self) -> None:
        f = FixedTimes.parse(["02:30"])
        got = series(f, NY_SPRING - 6 * 3600, "America/New_York", 2)
        assert got[0] == NY_SPRING  # 03:00 EDT
        assert wall(got[0], "America/New_York") == "2025-03-09 03:00:00-0400"
        assert wall(got[1], "America/New_York") == "2025-03-10 02:30:00-0400"
        berlin = FixedTimes.parse(["02:15"]).next_after(BERLIN_SPRING - 3600, BERLIN)
        assert berlin == BERLIN_SPRING

    def test_fall_back_repeated_time_runs_once_at_its_first_occurrence(self) -> None:
        f = FixedTimes.parse(["01:30"])
        got = series(f, NY_FALL - 6 * 3600, "America/New_York", 2)
        assert wall(got[0], "America/New_York") == "2025-11-02 01:30:00-0400"
        assert wall(got[1], "America/New_York") == "2025-11-03 01:30:00-0500"
        # Asked from inside the second pass of the repeated hour: the next is tomorrow.
        second_pass = NY_FALL + 10 * 60  # 01:10 EST
        assert FixedTimes.parse(["01:30"]).next_after(second_pass, NY) == got[1]

    def test_two_times_inside_one_gap_fire_once(self) -> None:
        f = FixedTimes.parse(["02:10", "02:40", "03:00"])
        got = series(f, NY_SPRING - 3 * 3600, "America/New_York", 2)
        assert got[0] == NY_SPRING
        assert wall(got[1], "America/New_York") == "2025-03-10 02:10:00-0400"

    def test_first_instant(self) -> None:
        assert first_instant(datetime(2025, 3, 9, 2, 30), NY) == NY_SPRING
        assert first_instant(datetime(2025, 11, 2, 1, 30), NY) == NY_FALL - 1800
        assert first_instant(datetime(2025, 1, 6, 12, 0), NY) == utc(2025, 1, 6, 17, 0)


# == cron =====================================================================================
class TestCron:
    def test_bad_expression_is_refused(self) -> None:
        with pytest.raises(ScheduleError, match="bad cron expression"):
            Cron("every minute")
        with pytest.raises(ScheduleError, match="bad cron expression"):
            Cron(42)  # type: ignore[arg-type]

    def test_five_fields(self) -> None:
        got = series(Cron("*/20 9 * * 1-5"), utc(2025, 1, 10, 9, 30), "UTC", 3)  # a Friday
        assert [wall(t, "UTC") for t in got] == [
            "2025-01-10 09:40:00+0000",
            "2025-01-13 09:00:00+0000",
            "2025-01-13 09:20:00+0000",
        ]
        assert not Cron("*/20 9 * * 1-5").has_seconds

    def test_seconds_field_is_last(self) -> None:
        c = Cron("*/10 * * * * */15")
        assert c.has_seconds
        got = series(c, utc(2025, 1, 6, 10, 0), "UTC", 5)
        assert [wall(t, "UTC")[11:19] for t in got] == [
            "10:00:15", "10:00:30", "10:00:45", "10:10:00", "10:10:15",
        ]
        assert c.next_after(utc(2025, 1, 6, 10, 0) + 0.5, zone("UTC")) == utc(2025, 1, 6, 10, 0, 15)
        assert schedule_from_dict(c.to_dict()) == c

    def test_spring_forward_and_fall_back(self) -> None:
        spring = Cron("30 2 * * *").next_after(NY_SPRING - 6 * 3600, NY)
        assert spring == NY_SPRING
        got = series(Cron("*/20 1 * * *"), NY_FALL - 2 * 3600, "America/New_York", 4)
        assert [wall(t, "America/New_York") for t in got] == [
            "2025-11-02 01:00:00-0400",
            "2025-11-02 01:20:00-0400",
            "2025-11-02 01:40:00-0400",
            "2025-11-03 01:00:00-0500",
        ]

    def test_unknown_kind_and_zone(self) -> None:
        with pytest.raises(ScheduleError, match="unknown schedule kind"):
            schedule_from_dict({"kind": "weekly"})
        with pytest.raises(ScheduleError, match="unknown time zone"):
            zone("Mars/Olympus_Mons")
        assert schedule_from_dict({"kind": "daemon"}) is None


# == DST properties for fixed times and cron ===================================================
def _oracle(matches, start: float, end: float, tz_name: str) -> list[float]:
    """Slots in (start, end], by brute force over whole minutes.

    A minute is a slot when its wall time matches and it is the first occurrence of that wall
    time; a spring-forward transition is a slot when a matching wall time lies in its gap.
    """
    tz = zone(tz_name)
    out: list[float] = []
    t = (int(start) // 60 + 1) * 60
    prev = datetime.fromtimestamp(t - 60, tz).replace(tzinfo=None)
    while t <= end:
        lt = datetime.fromtimestamp(t, tz)
        naive = lt.replace(tzinfo=None)
        hit = matches(naive) and lt.fold == 0
        if naive - prev > timedelta(minutes=1):  # a gap: wall times (prev, naive) never occur
            gap = prev + timedelta(minutes=1)
            while gap < naive and not hit:
                hit = matches(gap)
                gap += timedelta(minutes=1)
        if hit:
            out.append(float(t))
        prev = naive
        t += 60
    return out


_TIME_SETS = st.lists(
    st.sampled_from(
        [(0, 0), (0, 30), (1, 0), (1, 30), (1, 59), (2, 0), (2, 15), (2, 30), (2, 59),
         (3, 0), (3, 30), (12, 0), (23, 59)]
    ),
    min_size=1,
    max_size=4,
)


# Cron expressions with the same rule as a plain predicate on the wall time, so the brute-force
# oracle stays fast (croniter.match per minute is slow).
_CRON_CASES = {
    "30 2 * * *": lambda n: (n.hour, n.minute) == (2, 30),
    "*/20 1-3 * * *": lambda n: 1 <= n.hour <= 3 and n.minute % 20 == 0,
    "0 * * * *": lambda n: n.minute == 0,
    "15,45 2 * * *": lambda n: n.hour == 2 and n.minute in (15, 45),
    "59 1 * * *": lambda n: (n.hour, n.minute) == (1, 59),
    "0 2 * * *": lambda n: (n.hour, n.minute) == (2, 0),
    "*/7 * * * *": lambda n: n.minute % 7 == 0,
}


class TestDstProperties:
    @settings(max_examples=60, deadline=None)
    @given(
        times=_TIME_SETS,
        tz_name=st.sampled_from(["America/New_York", "Europe/Berlin"]),
        which=st.integers(0, 1),
        offset=st.floats(-2 * 86400, 86400, allow_nan=False),
    )
    def test_fixed_times_increase_and_never_repeat_a_wall_time(
        self, times: list[tuple[int, int]], tz_name: str, which: int, offset: float
    ) -> None:
        sched = FixedTimes(tuple(times))
        start = TRANSITIONS[tz_name][which] + offset
        got = series(sched, start, tz_name, 3 * len(sched.times))
        assert all(b > a for a, b in zip([start, *got], got, strict=False))
        walls = [local(t, tz_name).replace(tzinfo=None) for t in got]
        assert len(set(walls)) == len(walls)
        wanted = set(sched.times)
        expected = _oracle(lambda n: (n.hour, n.minute) in wanted, start, got[-1], tz_name)
        assert got == expected

    @settings(max_examples=60, deadline=None)
    @given(
        case=st.sampled_from(list(_CRON_CASES)),
        tz_name=st.sampled_from(["America/New_York", "Europe/Berlin"]),
        which=st.integers(0, 1),
        offset=st.floats(-86400, 6 * 3600, allow_nan=False),
    )
    def test_cron_increases_and_never_repeats_a_wall_time(
        self, case: str, tz_name: str, which: int, offset: float
    ) -> None:
        sched = Cron(case)
        start = TRANSITIONS[tz_name][which] + offset
        got = series(sched, start, tz_name, 8)
        assert all(b > a for a, b in zip([start, *got], got, strict=False))
        walls = [local(t, tz_name).replace(tzinfo=None) for t in got]
        assert len(set(walls)) == len(walls)
        expected = _oracle(_CRON_CASES[case], start, got[-1], tz_name)
        assert got == expected

    def test_cron_oracle_predicates_agree_with_croniter(self) -> None:
        minute, end = datetime(2025, 3, 9), datetime(2025, 3, 10)
        while minute < end:
            for expr, pred in _CRON_CASES.items():
                assert pred(minute) == croniter.match(expr, minute), (expr, minute)
            minute += timedelta(minutes=1 if minute.hour < 4 else 7)

    @settings(max_examples=100, deadline=None)
    @given(
        instant=st.floats(utc(2025, 1, 1), utc(2025, 12, 31), allow_nan=False),
        tz_name=st.sampled_from(["America/New_York", "Europe/Berlin"]),
        sched=st.sampled_from(
            [FixedTimes.parse(["02:30"]), FixedTimes.parse(["01:30", "02:30", "03:30"]),
             Cron("30 2 * * *"), Cron("*/30 * * * *"), Cron("0 1-3 * * *")]
        ),
    )
    def test_any_instant_in_a_dst_year(self, instant: float, tz_name: str, sched) -> None:
        got = series(sched, instant, tz_name, 6)
        assert all(b > a for a, b in zip([instant, *got], got, strict=False))
        walls = [local(t, tz_name).replace(tzinfo=None) for t in got]
        assert len(set(walls)) == len(walls)


def test_remembered_and_warmed_cron_slots_are_the_slots_computed_afresh() -> None:
    """Cron slots are remembered per (expression, zone) as a span of instants sharing one
    next slot, and warmed ahead by a following coordinator: every answer from memory is the
    computed one, across DST changes, and a zone's answer never leaks into another's."""
    from protocol import schedule as sched

    zones = [BERLIN, NY, zone("UTC"), zone("Australia/Lord_Howe")]
    exprs = ("30 2 * * *", "*/7 * * * * 15", "0 0 1 * *", "15 1,2,3 * * *", "0 */5 * * *")
    start = datetime(2026, 3, 28, 20, 0, tzinfo=UTC).timestamp()  # around Europe's change
    for warm_first in (False, True):
        sched._SPANS.clear()
        for step in range(0, 30 * 3600, 1337):
            instant = start + step
            if warm_first and step % 5 == 0:
                for tz in zones:
                    sched.warm([Cron(e) for e in exprs] + [None, Periodic(5)], tz, instant)
            for expr in exprs:
                cron = Cron(expr)
                for tz in zones:
                    assert cron.next_after(instant, tz) == cron._next_after(instant, tz), (
                        expr, tz.key, instant)
                    cursor = instant - 4000  # an older cursor, as a successor meets it
                    assert cron.next_after(cursor, tz) == cron._next_after(cursor, tz)
    assert {key[1] for key in sched._SPANS} == {tz.key for tz in zones}


def test_warming_makes_a_successors_lookups_answers_from_memory() -> None:
    from protocol import schedule as sched

    sched._SPANS.clear()
    now = datetime(2026, 7, 1, 12, 0, 30, tzinfo=UTC).timestamp()
    crons = [Cron(f"{m} 3 * * *") for m in range(60)]
    assert sched.warm(crons + crons, BERLIN, now) == 60  # each expression once
    assert sched.warm(crons, BERLIN, now + 60) == 0  # still known
    calls = 0
    real = Cron._next_after

    def counting(self: Cron, instant: float, tz: object) -> float:
        nonlocal calls
        calls += 1
        return real(self, instant, tz)  # type: ignore[arg-type]

    Cron._next_after = counting  # type: ignore[method-assign]
    try:
        # A cursor left by a leader an hour ago, after the slot before `now`: from memory.
        for cron in crons:
            cron.next_after(now - 3600, BERLIN)
    finally:
        Cron._next_after = real  # type: ignore[method-assign]
    assert calls == 0
