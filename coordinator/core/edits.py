"""Operator edits checked field by field, with the catalogue's messages, before they apply.

`plan(service, edit)` turns an edit (status, period/align, run times, cron; any value an
operator may have typed) into what changes — the new status and schedule, and the old and
new value of each field that differs — or raises `EditRefused` naming the field and why.
Nothing here changes anything: `Engine.update_service` applies a plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from protocol.schedule import Cron, FixedTimes, Periodic, Schedule, ScheduleError, parse_hhmm
from protocol.service import Service

SCHEDULE_FIELDS = ("period", "run_at", "cron")


class EditRefused(ValueError):
    """An edit that cannot apply; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Edit:
    """What an operator asked to change; None leaves a field alone. Values are as given
    (an HTTP body may hold any JSON value), so every one is checked here."""

    enabled: object = None
    period: object = None
    align: object = None
    run_at: object = None
    cron: object = None

    def given(self) -> dict[str, object]:
        return {k: v for k, v in (("enabled", self.enabled), ("period", self.period),
                                  ("align", self.align), ("run_at", self.run_at),
                                  ("cron", self.cron)) if v is not None}


@dataclass(frozen=True)
class FieldChange:
    field: str  # "enabled" or "schedule"
    old: bool | str | None
    new: bool | str | None


@dataclass(frozen=True)
class Plan:
    enabled: bool | None = None
    schedule: Schedule | None = None
    changes: list[FieldChange] = field(default_factory=list)


def _shown(value: object) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _whole(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EditRefused(name, f"expected an integer, got {_shown(value)}")
    return value


def describe(schedule: Schedule | None) -> str | None:
    return None if schedule is None else schedule.describe()


def plan(current: Service, edit: Edit, tz: ZoneInfo | None = None) -> Plan:
    """What `edit` changes on `current` (the service as it runs now, overrides applied).
    Raises EditRefused with the field and the same message the catalogue gives."""
    enabled: bool | None = None
    if edit.enabled is not None:
        if not isinstance(edit.enabled, bool):
            raise EditRefused("enabled", f"expected true or false, got {_shown(edit.enabled)}")
        enabled = edit.enabled
    given = [name for name in SCHEDULE_FIELDS if getattr(edit, name) is not None]
    schedule: Schedule | None = None
    if (given or edit.align is not None) and current.is_daemon:
        name = given[0] if given else "align"
        raise EditRefused(name, f"{current.name!r} is a daemon: it has no schedule to edit")
    if len(given) > 1:
        raise EditRefused(given[1], "give one of period, run_at or cron, not "
                          + " and ".join(given))
    if edit.align is not None and given and given[0] != "period":
        raise EditRefused("align", f"align goes with a period, not with {given[0]}")
    try:
        if edit.period is not None or edit.align is not None:
            schedule = _periodic(current, edit)
        elif edit.run_at is not None:
            schedule = _fixed(edit.run_at)
        elif edit.cron is not None:
            schedule = _cron(edit.cron, tz)
    except ScheduleError as exc:  # pragma: no cover - the helpers name their field
        raise EditRefused(given[0] if given else "align", str(exc)) from exc
    changes: list[FieldChange] = []
    if enabled is not None and enabled != current.enabled:
        changes.append(FieldChange("enabled", current.enabled, enabled))
    if schedule is not None and schedule != current.schedule:
        changes.append(FieldChange("schedule", describe(current.schedule), describe(schedule)))
    return Plan(enabled if enabled != current.enabled else None,
                schedule if schedule != current.schedule else None, changes)


def _periodic(current: Service, edit: Edit) -> Periodic:
    if edit.period is None:
        if not isinstance(current.schedule, Periodic):
            raise EditRefused("align", "align needs a period: give one (the service is not "
                              "periodic)")
        period = current.schedule.period
    else:
        period = _whole("period", edit.period)
        try:
            Periodic(period)
        except ScheduleError as exc:
            raise EditRefused("period", str(exc)) from None
    align = 0 if edit.align is None else _whole("align", edit.align)
    try:
        return Periodic(period, align)
    except ScheduleError as exc:
        raise EditRefused("align", str(exc)) from None


def _fixed(value: object) -> FixedTimes:
    if isinstance(value, str):
        value = [t for t in (p.strip() for p in value.split(",")) if t]
    if not isinstance(value, list | tuple) or not all(isinstance(t, str) for t in value):
        raise EditRefused("run_at", f"expected an array of HH:MM strings, got {_shown(value)}")
    if not value:
        raise EditRefused("run_at", "must not be empty: a fixed service needs run times")
    times = []
    for text in value:
        try:
            times.append(parse_hhmm(text))
        except ScheduleError as exc:
            raise EditRefused("run_at", str(exc)) from None
    return FixedTimes(tuple(times))


def _cron(value: object, tz: ZoneInfo | None) -> Cron:
    if not isinstance(value, str):
        raise EditRefused("cron", f"expected a string, got {_shown(value)}")
    try:
        cron = Cron(value)
    except ScheduleError as exc:
        raise EditRefused("cron", str(exc)) from None
    if tz is not None:
        try:  # valid fields can still name a date that never comes (February 31)
            cron.next_after(0.0, tz)
        except Exception:
            raise EditRefused("cron", f"cron expression {value!r} never fires") from None
    return cron
