"""Schedules: when a service's slots fall, in the system time zone, across DST changes.

Every schedule answers one question, `next_after(instant, tz)`: the first slot strictly
after `instant`. Instants are UTC epoch seconds; schedules think in local wall time.

DST rules (documented in the README):
- fixed times and cron: a wall time that does not exist (spring forward) fires at the first
  instant after the gap; a wall time that occurs twice (fall back) fires once, at its first
  occurrence.
- periodic: slots are the instants whose local wall clock reads a minute satisfying
  (minutes since local midnight - align) mod period == 0. Wall minutes inside a gap never
  occur, so they do not fire; in a repeated hour both passes fire (a 5-minute service keeps
  running every 5 real minutes).
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from croniter import croniter

_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
_DAY = 86400


class ScheduleError(ValueError):
    """A schedule definition that cannot be used; the message names the problem."""


@lru_cache(maxsize=64)
def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except Exception as exc:  # ZoneInfoNotFoundError, ValueError
        raise ScheduleError(f"unknown time zone {name!r}") from exc


def _local(instant: float, tz: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(instant, tz)


def _exists(naive: datetime, tz: ZoneInfo) -> bool:
    aware = naive.replace(tzinfo=tz)
    back = datetime.fromtimestamp(aware.timestamp(), tz).replace(tzinfo=None)
    return back == naive


def first_instant(naive: datetime, tz: ZoneInfo) -> float:
    """The instant a local wall time designates, under the fixed/cron DST rules.

    Existing times map to their first occurrence; a time inside a spring-forward gap maps
    to the first instant after the gap.
    """
    aware = naive.replace(tzinfo=tz, fold=0)
    t0 = aware.timestamp()
    if _exists(naive, tz):
        return t0
    # Inside a gap: the transition instant is the first one whose wall time passes `naive`.
    t1 = naive.replace(tzinfo=tz, fold=1).timestamp()
    lo, hi = min(t0, t1), max(t0, t1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _local(mid, tz).replace(tzinfo=None) >= naive:
            hi = mid
        else:
            lo = mid
    return float(hi)


def parse_hhmm(text: str) -> tuple[int, int]:
    m = _HHMM.match(text.strip()) if isinstance(text, str) else None
    if not m:
        raise ScheduleError(f"bad run time {text!r}: expected HH:MM, 00:00 to 23:59")
    return int(m.group(1)), int(m.group(2))


class Schedule:
    """Base of all schedules."""

    kind: str = ""

    def next_after(self, instant: float, tz: ZoneInfo) -> float:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict[str, object]:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Periodic(Schedule):
    """Every `period` minutes (1..60), aligned `align` minutes past local midnight."""

    period: int
    align: int = 0
    kind = "periodic"

    def __post_init__(self) -> None:
        if isinstance(self.period, bool) or not isinstance(self.period, int):
            raise ScheduleError(f"period must be a whole number of minutes, got {self.period!r}")
        if self.period < 1:
            raise ScheduleError(f"period {self.period} is below 1 minute")
        if self.period > 60:
            raise ScheduleError(
                f"period {self.period} is over 60 minutes: use fixed time instead"
            )
        if isinstance(self.align, bool) or not isinstance(self.align, int):
            raise ScheduleError(f"align must be a whole number of minutes, got {self.align!r}")
        if not 0 <= self.align < self.period:
            raise ScheduleError(
                f"align {self.align} must be between 0 and period-1 ({self.period - 1})"
            )

    def _next_minute(self, minute: int) -> tuple[int, int]:
        """First matching minute-of-day >= minute: (day offset, minute)."""
        if minute <= self.align:
            return 0, self.align
        k = -(-(minute - self.align) // self.period)
        m = self.align + k * self.period
        if m < 1440:
            return 0, m
        return 1, self.align

    def next_after(self, instant: float, tz: ZoneInfo) -> float:
        # Whole seconds, rounded down: fromtimestamp rounds to microseconds, which could
        # otherwise carry an instant just before a whole minute onto that minute.
        local = _local(math.floor(instant), tz)
        offset = local.utcoffset()
        assert offset is not None  # an aware local time always has an offset
        # Smallest whole local minute strictly after `instant`.
        base = local.replace(second=0, microsecond=0)
        minute = base.hour * 60 + base.minute + 1
        day, m = self._next_minute(minute)
        midnight = base.replace(hour=0, minute=0, tzinfo=None)
        wall = midnight + timedelta(days=day, minutes=m)
        candidate = (wall - offset).replace(tzinfo=None)  # UTC naive, assuming no transition
        cand_t = _utc_ts(candidate)
        if _local(cand_t, tz).utcoffset() == offset:
            return cand_t
        return self._slow_next(instant, tz)

    def _slow_next(self, instant: float, tz: ZoneInfo) -> float:
        # A DST transition lies ahead: walk real minutes (rare, bounded by 3 hours).
        t = (int(instant) // 60 + 1) * 60
        for _ in range(60 * 27):
            local = _local(t, tz)
            mod = local.hour * 60 + local.minute
            if (mod - self.align) % self.period == 0 and mod >= self.align:
                return float(t)
            t += 60
        raise AssertionError("periodic schedule found no slot within a day")

    def describe(self) -> str:
        return f"{self.period} min" + (f" +{self.align}" if self.align else "")

    def to_dict(self) -> dict[str, object]:
        return {"kind": "periodic", "period": self.period, "align": self.align}


def _utc_ts(naive_utc: datetime) -> float:
    return (naive_utc - _EPOCH).total_seconds()


_EPOCH = datetime(1970, 1, 1)


@dataclass(frozen=True, slots=True)
class FixedTimes(Schedule):
    """One or more HH:MM run times a day, in the system time zone."""

    times: tuple[tuple[int, int], ...]
    kind = "fixed"

    def __post_init__(self) -> None:
        if not self.times:
            raise ScheduleError("fixed schedule needs at least one run time")
        for hh, mm in self.times:
            if not (0 <= hh < 24 and 0 <= mm < 60):
                raise ScheduleError(f"bad run time {hh:02d}:{mm:02d}")
        object.__setattr__(self, "times", tuple(sorted(set(self.times))))

    @classmethod
    def parse(cls, texts: list[str] | tuple[str, ...]) -> FixedTimes:
        if isinstance(texts, str):
            texts = [texts]
        return cls(tuple(parse_hhmm(t) for t in texts))

    def next_after(self, instant: float, tz: ZoneInfo) -> float:
        local = _local(instant, tz).replace(tzinfo=None)
        # Start a little before, so wall times that map forward (gaps) are not missed.
        day = (local - timedelta(hours=3)).replace(hour=0, minute=0, second=0, microsecond=0)
        for d in range(4):
            midnight = day + timedelta(days=d)
            for hh, mm in self.times:
                t = first_instant(midnight.replace(hour=hh, minute=mm), tz)
                if t > instant:
                    return t
        raise AssertionError("fixed schedule found no slot within four days")

    def describe(self) -> str:
        return ", ".join(f"{hh:02d}:{mm:02d}" for hh, mm in self.times)

    def to_dict(self) -> dict[str, object]:
        return {"kind": "fixed", "run_at": [f"{h:02d}:{m:02d}" for h, m in self.times]}


@dataclass(frozen=True, slots=True)
class Cron(Schedule):
    """A croniter expression: five fields, or six with seconds last."""

    expr: str
    kind = "cron"

    def __post_init__(self) -> None:
        if not isinstance(self.expr, str) or not _valid_cron(self.expr):
            raise ScheduleError(f"bad cron expression {self.expr!r}")

    @property
    def has_seconds(self) -> bool:
        return len(self.expr.split()) >= 6

    def next_after(self, instant: float, tz: ZoneInfo) -> float:
        key = (self.expr, tz.key)
        span = _SPANS.get(key)
        if span is not None and span[0] <= instant < span[1]:
            return span[1]
        found = self._next_after(instant, tz)
        if span is not None and span[1] == found:
            _SPANS[key] = (min(span[0], instant), found)
        else:
            if len(_SPANS) >= _SPAN_LIMIT:
                _SPANS.clear()
            _SPANS[key] = (instant, found)
        return found

    def warm(self, now: float, tz: ZoneInfo) -> None:
        """Make `next_after` of any instant from the slot at or before `now` up to the next
        slot an answer from memory (see `warm`)."""
        key = (self.expr, tz.key)
        span = _SPANS.get(key)
        if span is not None and span[0] <= now < span[1]:
            return
        nxt = self._next_after(now, tz)
        start = now
        it = _iterator(self.expr, _local(math.floor(now), tz).replace(tzinfo=None))
        earlier = first_instant(it.get_prev(datetime), tz)
        # Any instant whose next slot is `nxt` may start the span; checked, not assumed
        # (the previous wall time may fall in a DST gap or fold).
        if earlier < now and self._next_after(earlier, tz) == nxt:
            start = earlier
        _SPANS[key] = (start, nxt)

    def _next_after(self, instant: float, tz: ZoneInfo) -> float:
        local = _local(math.floor(instant), tz).replace(tzinfo=None)
        # Wall times before `local` can only map to instants <= `instant`, so start there.
        it = _iterator(self.expr, local)
        for _ in range(100000):
            naive = it.get_next(datetime)
            t = first_instant(naive, tz)
            if t > instant:
                return t
        raise AssertionError(f"cron {self.expr!r} found no slot")

    def describe(self) -> str:
        return f"cron {self.expr}"

    def to_dict(self) -> dict[str, object]:
        return {"kind": "cron", "cron": self.expr}


_CRONS = threading.local()
_SPANS: dict[tuple[str, str], tuple[float, float]] = {}
"""(expression, zone) -> (start, slot): the first slot after any instant in [start, slot) is
`slot`. Services that share an expression share it, and a coordinator that warmed it while
following (`warm`) finds the next slot of every service from memory when it starts leading.
Values of a pure function: shared between threads (each entry is replaced whole)."""
_SPAN_LIMIT = 200_000


def warm(schedules: Iterable[Schedule | None], tz: ZoneInfo, now: float) -> int:
    """Compute ahead, for each distinct cron expression among `schedules`, its next slot
    after `now` and how far back that answer holds (to the slot at or before `now`), so
    that a new leader's `next_after(cursor)` for 100,000 services is mostly a lookup.
    Returns how many expressions were computed (those still known are skipped)."""
    done = 0
    seen: set[str] = set()
    for schedule in schedules:
        if not isinstance(schedule, Cron) or schedule.expr in seen:
            continue
        seen.add(schedule.expr)
        span = _SPANS.get((schedule.expr, tz.key))
        if span is None or not span[0] <= now < span[1]:
            schedule.warm(now, tz)
            done += 1
    return done


@lru_cache(maxsize=65_536)
def _valid_cron(expr: str) -> bool:
    return bool(croniter.is_valid(expr))


def _iterator(expr: str, start: datetime) -> croniter:
    """A croniter for `expr` positioned at `start`; parsed once per expression and thread."""
    cache: dict[str, croniter] | None = getattr(_CRONS, "cache", None)
    if cache is None:
        cache = _CRONS.cache = {}
    it = cache.get(expr)
    if it is None:
        if len(cache) > 10_000:
            cache.clear()
        it = cache[expr] = croniter(expr, start)
    else:
        it.set_current(start, force=True)
    return it


def schedule_from_dict(data: dict[str, object]) -> Schedule | None:
    """Rebuild a schedule from `to_dict` output (overrides stored in coordination)."""
    kind = data.get("kind")
    if kind == "periodic":
        period, align = data["period"], data.get("align", 0)
        if not isinstance(period, int) or not isinstance(align, int):
            raise ScheduleError(f"stored periodic schedule is malformed: {data!r}")
        return Periodic(period, align)
    if kind == "fixed":
        run_at = data["run_at"]
        if not isinstance(run_at, list | tuple):
            raise ScheduleError(f"stored fixed-time schedule is malformed: {data!r}")
        return FixedTimes.parse([str(t) for t in run_at])
    if kind == "cron":
        return Cron(str(data["cron"]))
    if kind == "daemon":
        return None
    raise ScheduleError(f"unknown schedule kind {kind!r}")
