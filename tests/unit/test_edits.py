"""Operator edits checked field by field: what changes, or which field is refused and why.

The messages are the catalogue's, so the page, the API and `rota set` say the same thing.
"""

from __future__ import annotations

import pytest

from coordinator.core.edits import Edit, EditRefused, FieldChange, plan
from protocol.schedule import Cron, FixedTimes, Periodic, zone
from protocol.service import Kind, Service


def svc(schedule: Periodic | FixedTimes | Cron | None, enabled: bool = True) -> Service:
    kind = Kind.DAEMON if schedule is None else Kind(schedule.kind)
    return Service("Cache Manager", kind, schedule, frozenset({"Master"}), enabled=enabled)


CACHE = svc(Periodic(6, 3))


def refused(current: Service, **given: object) -> EditRefused:
    with pytest.raises(EditRefused) as caught:
        plan(current, Edit(**given), zone("UTC"))
    return caught.value


def test_a_new_period_and_align_change_the_schedule_with_old_and_new_text() -> None:
    p = plan(CACHE, Edit(period=5, align=2))
    assert p.schedule == Periodic(5, 2) and p.enabled is None
    assert p.changes == [FieldChange("schedule", "6 min +3", "5 min +2")]


def test_align_alone_keeps_the_period() -> None:
    assert plan(CACHE, Edit(align=5)).schedule == Periodic(6, 5)
    assert refused(CACHE, align=6).field == "align"
    assert "align needs a period" in refused(svc(FixedTimes.parse(["05:30"])), align=1).message


def test_a_period_alone_aligns_at_zero() -> None:
    assert plan(CACHE, Edit(period=10)).schedule == Periodic(10, 0)


def test_switching_kind_and_status_are_each_one_change() -> None:
    p = plan(CACHE, Edit(run_at=["17:30", "05:30"], enabled=False))
    assert p.schedule == FixedTimes.parse(["05:30", "17:30"]) and p.enabled is False
    assert p.changes == [FieldChange("enabled", True, False),
                         FieldChange("schedule", "6 min +3", "05:30, 17:30")]


def test_an_edit_to_the_values_in_force_changes_nothing() -> None:
    p = plan(CACHE, Edit(period=6, align=3, enabled=True))
    assert p.changes == [] and p.schedule is None and p.enabled is None


@pytest.mark.parametrize("given, field, message", [
    ({"period": 61}, "period", "period 61 is over 60 minutes: use fixed time instead"),
    ({"period": 0}, "period", "period 0 is below 1 minute"),
    ({"period": True}, "period", "expected an integer, got True"),
    ({"period": "5"}, "period", "expected an integer, got '5'"),
    ({"period": 5, "align": 5}, "align", "align 5 must be between 0 and period-1 (4)"),
    ({"period": 5, "align": -1}, "align", "align -1 must be between 0 and period-1 (4)"),
    ({"enabled": 1}, "enabled", "expected true or false, got 1"),
    ({"run_at": ["24:00"]}, "run_at", "bad run time '24:00': expected HH:MM, 00:00 to 23:59"),
    ({"run_at": "05:30"}, "run_at", None),
    ({"run_at": [530]}, "run_at", "expected an array of HH:MM strings, got [530]"),
    ({"cron": "0 0 31 2 *"}, "cron", "cron expression '0 0 31 2 *' never fires"),
    ({"cron": 5}, "cron", "expected a string, got 5"),
    ({"run_at": ["05:30"], "align": 1}, "align", "align goes with a period, not with run_at"),
])
def test_each_bad_value_names_its_field(given: dict[str, object], field: str,
                                        message: str | None) -> None:
    if message is None:  # a comma-separated string is taken as the list it spells
        assert plan(CACHE, Edit(**given)).schedule == FixedTimes.parse(["05:30"])
        return
    err = refused(CACHE, **given)
    assert (err.field, err.message) == (field, message)


def test_a_daemon_has_no_schedule_but_its_status_can_change() -> None:
    daemon = svc(None)
    err = refused(daemon, cron="* * * * *")
    assert (err.field, err.message) == ("cron", "'Cache Manager' is a daemon: it has no "
                                        "schedule to edit")
    assert plan(daemon, Edit(enabled=False)).changes == [FieldChange("enabled", True, False)]
