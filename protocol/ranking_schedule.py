"""Ranking schedules: when a RankingProfile's query runs.

Three forms, all answering `next_after(instant, tz)` like the service schedules:
- cron, read by croniter: five fields (minute hour day-of-month month day-of-week), or six
  with the SECONDS FIELD LAST. Quartz and CGRateS (Go) put seconds FIRST; a six-field
  expression that is valid read both ways and fires differently is refused as ambiguous,
  as are seven fields and Quartz's `?`;
- `@every <duration>`: a fixed interval (`30s`, `1m30s`, `1h`, `1.5h`; at least one
  second), counted from when the ranking is scheduled and kept on that grid;
- the descriptors `@yearly` (`@annually`), `@monthly`, `@weekly`, `@daily`, `@midnight`,
  `@hourly`, which are the cron expressions they stand for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from croniter import croniter

from protocol.schedule import Cron, ScheduleError

DESCRIPTORS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_PROBE = 1_704_067_200.0  # 2024-01-01T00:00:00Z: where readings are compared
_PROBE_FIRES = 16


def parse_duration(text: str) -> float:
    """Seconds in a Go-style duration: `30s`, `1m30s`, `2h`, `1.5h`, `250ms` (units h, m, s,
    ms; at least one part; no sign)."""
    body = text.strip()
    if not body:
        raise ScheduleError("empty duration: expected e.g. 30s, 1m30s or 2h")
    total, pos = 0.0, 0
    for match in _DURATION_PART.finditer(body):
        if match.start() != pos:
            break
        total += float(match[1]) * _UNIT_SECONDS[match[2]]
        pos = match.end()
    if pos != len(body):
        raise ScheduleError(
            f"bad duration {text!r}: expected numbers with units h, m, s or ms, e.g. 1m30s"
        )
    return total


@dataclass(frozen=True, slots=True)
class Every:
    """A fixed interval in seconds. `next_after` is one interval on; the scheduler keeps
    a ranking on the grid of the time it was scheduled."""

    seconds: float
    kind = "every"

    def __post_init__(self) -> None:
        if not self.seconds >= 1.0:
            raise ScheduleError(f"@every interval {self.seconds:g}s is below one second")

    def next_after(self, instant: float, tz: ZoneInfo) -> float:
        return instant + self.seconds


RankingSchedule = Cron | Every


def parse_ranking_schedule(text: object) -> RankingSchedule:
    """The schedule a RankingProfile's `Schedule` string names; ScheduleError says why not."""
    if not isinstance(text, str) or not text.strip():
        raise ScheduleError("empty schedule: expected a cron expression, @every <duration> "
                            "or a descriptor such as @hourly")
    expr = " ".join(text.split())
    if expr.startswith("@every"):
        rest = expr[len("@every"):]
        if not rest.startswith(" "):
            raise ScheduleError(f"bad schedule {text!r}: write @every <duration>, e.g. "
                                "@every 30s")
        return Every(parse_duration(rest))
    if expr.startswith("@"):
        if expr not in DESCRIPTORS:
            raise ScheduleError(f"unknown descriptor {expr!r}: expected one of "
                                f"{', '.join(DESCRIPTORS)} or @every <duration>")
        return Cron(DESCRIPTORS[expr])
    fields = expr.split(" ")
    if "?" in expr:
        raise ScheduleError(f"cron {text!r}: '?' is Quartz syntax: write '*'")
    if len(fields) not in (5, 6):
        raise ScheduleError(
            f"cron {text!r} has {len(fields)} fields: expected five (minute hour day month "
            "weekday) or six with seconds LAST (croniter order, not Quartz's seconds-first)"
        )
    cron = Cron(expr)  # raises ScheduleError when croniter refuses it
    if len(fields) == 6:
        _refuse_ambiguous(expr, fields)
    try:  # valid fields can still name a date that never comes (February 31)
        cron.next_after(_PROBE, ZoneInfo("UTC"))
    except Exception:
        raise ScheduleError(f"cron {text!r} never fires") from None
    return cron


def _refuse_ambiguous(expr: str, fields: list[str]) -> None:
    """Refuse six fields that also read as Quartz order (seconds first) and fire differently."""
    quartz = " ".join(fields[1:] + fields[:1])  # the same text with seconds moved last
    if quartz == expr or not croniter.is_valid(quartz):
        return
    if _fires(expr) == _fires(quartz):
        return
    raise ScheduleError(
        f"cron {expr!r} is ambiguous: croniter reads the sixth field as seconds "
        f"({fields[5]!r}), but in Quartz/CGRateS order the first field ({fields[0]!r}) is the "
        "seconds and the sixth the weekday. Write five fields when the seconds are 0, "
        "or use @every <duration>"
    )


def _fires(expr: str) -> list[float]:
    try:
        it = croniter(expr, datetime.fromtimestamp(_PROBE, UTC))
        return [float(it.get_next(float)) for _ in range(_PROBE_FIRES)]
    except Exception:  # a reading that never fires is not a second reading
        return []
