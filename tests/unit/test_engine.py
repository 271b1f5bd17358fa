"""The scheduling engine, driven by the deterministic harness (simulated leader and workers)."""

from __future__ import annotations

import zlib
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.core.engine import (
    MAX_MISSED_RECORDS,
    Action,
    Control,
    DaemonInterval,
    Dispatch,
    Engine,
    Record,
    RefusedError,
    State,
)
from coordinator.core.node import Node
from coordinator.core.run import Run, RunState, Trigger
from protocol import run_id_for
from protocol.clock import ManualClock
from protocol.schedule import Cron, FixedTimes, Periodic
from protocol.service import Overlap, Placement
from tests.unit.engine_harness import T0, Harness, at, node, service

MASTER = node("m1", "Master")
MASTER2 = node("m2", "Master")
CALC = node("c1", "Calculation")
PROC = node("p1", "Processing")
ALL_ROLES = ("Master", "Redundancy", "Reporting", "Processing", "Calculation")

STATS = "stats_processing"


def effects(actions: list[Action]) -> list[Action]:
    """What the actions ask of the cluster, leaving out the daemon intervals they record."""
    return [a for a in actions if not isinstance(a, DaemonInterval)]


def seed_services() -> list:
    """The seed's services that share run groups, plus a couple of free ones."""
    return [
        service("Calculator", None, roles=("Master", "Calculation"), groups=(STATS,)),
        service("Backup Manager", FixedTimes.parse(["05:30"]), groups=("factors", STATS)),
        service("Files Collector", Periodic(10), groups=(STATS,)),
        service("Statistics Manager", Periodic(60), groups=(STATS,)),
        service("Factors Watcher", Periodic(5), groups=("factors",)),
        service("AAA Manager", Periodic(1)),
    ]


# == slots and placement ======================================================================
def test_each_slot_runs_once_on_one_node() -> None:
    h = Harness([service("Mail Manager", Periodic(5))], [MASTER, MASTER2, PROC])
    h.advance(at(2, 0, 30))
    slots = h.slots_run("Mail Manager")
    assert slots == [at(0, m) for m in range(5, 121, 5)]
    assert all(iv.node in ("m1", "m2") for iv in h.runs_of("Mail Manager"))
    assert all(iv.outcome == "succeeded" for iv in h.runs_of("Mail Manager"))


def test_each_slot_runs_once_on_every_allowed_node_for_all() -> None:
    cleaner = service("Cache Manager", Periodic(6), roles=ALL_ROLES[:4], placement=Placement.ALL)
    h = Harness([cleaner], [MASTER, MASTER2, PROC, CALC])
    h.advance(at(1))
    runs = h.runs_of("Cache Manager")
    pairs = sorted((iv.slot, iv.node) for iv in runs)
    assert pairs == sorted((at(0, m), n) for m in range(6, 61, 6) for n in ("m1", "m2", "p1"))
    assert not [iv for iv in runs if iv.node == "c1"]  # Calculation is not allowed
    # Run ids are per slot and node, and distinct.
    assert len({iv.run_id for iv in runs}) == len(runs)


def test_all_with_no_allowed_node_records_a_skip() -> None:
    h = Harness([service("Log Rotator", Periodic(5), roles=("Calculation",),
                         placement=Placement.ALL)], [MASTER])
    h.advance(at(0, 5))
    assert h.runs_of("Log Rotator") == []
    [rec] = h.finished("Log Rotator", "skipped")
    assert rec.slot == at(0, 5) and "no live node" in (rec.reason or "")


def test_one_with_no_allowed_node_ends_with_a_reason() -> None:
    h = Harness([service("Log Rotator", Periodic(5), roles=("Calculation",))], [MASTER])
    h.advance(at(0, 5))
    assert h.runs_of("Log Rotator") == []
    [rec] = h.finished("Log Rotator")
    assert rec.state is RunState.EXPIRED and "no live node" in (rec.reason or "")


def test_one_picks_the_least_loaded_node() -> None:
    h = Harness(
        [service("A", Periodic(1)), service("B", Periodic(1))],
        [MASTER, MASTER2], durations={"A": 30, "B": 30},
    )
    h.advance(at(0, 1, 10))
    assert sorted(iv.node for iv in h.intervals) == ["m1", "m2"]


def test_rank_puts_the_best_node_first() -> None:
    h = Harness(
        [service("A", Periodic(1), rank_by="speed")], [MASTER, MASTER2],
        rank=lambda ranking: ["m2", "m1"],
    )
    h.advance(at(0, 3))
    assert {iv.node for iv in h.runs_of("A")} == {"m2"}


def test_last_run_is_when_the_run_was_initiated() -> None:
    h = Harness([service("A", Periodic(5))], [MASTER], start_delay=2.0)
    h.advance(at(0, 7))
    assert h.engine.last_run["A"] == at(0, 5)
    assert h.ledger.last_runs["A"] == at(0, 5)


# == run groups ===============================================================================
def test_run_groups_serialize_the_seed_services() -> None:
    services = [s for s in seed_services() if s.name != "Calculator"]
    durations = {
        "Backup Manager": 40 * 60, "Files Collector": 120, "Statistics Manager": 300,
        "Factors Watcher": 60, "AAA Manager": 20,
    }
    h = Harness(services, [MASTER, MASTER2], durations=durations)
    h.advance(at(5, 29))
    assert h.conflicting_overlaps() == []
    h.advance(at(5, 31))
    # Backup Manager runs; Files Collector's 05:30 slot waits in the queue since 05:30.
    assert [iv.service for iv in h.intervals if iv.start == at(5, 30) and iv.end is None] == [
        "Backup Manager"
    ]
    assert h.engine.in_queue_since("Files Collector") == at(5, 30)
    assert h.engine.in_queue_since("Factors Watcher") == at(5, 30)
    assert h.engine.in_queue_since("AAA Manager") is None  # no groups: it never waits
    h.advance(at(8))
    assert h.conflicting_overlaps() == []
    stats = [
        (iv.service, iv.slot) for iv in sorted(h.intervals, key=lambda iv: iv.start)
        if iv.service in ("Backup Manager", "Files Collector", "Statistics Manager")
        and at(5, 30) <= iv.start < at(6, 30)
    ]
    assert stats == [
        ("Backup Manager", at(5, 30)),
        ("Files Collector", at(5, 30)),  # waited 40 minutes, then ran
        ("Statistics Manager", at(6)),  # waiting since 06:00, ahead of FC's next run
        ("Files Collector", at(6, 10)),
        ("Files Collector", at(6, 20)),
    ]
    # While Backup Manager ran, the queued run stood for the later slots: they are recorded.
    coalesced = {r.slot for r in h.finished("Files Collector", "skipped")}
    assert coalesced == {at(5, 40), at(5, 50), at(6)}
    assert all("coalesced" in (r.reason or "") for r in h.finished("Files Collector", "skipped"))
    # Free services never waited.
    assert h.slots_run("AAA Manager") == [at(0, m) for m in range(1, 8 * 60 + 1)]


def test_services_with_disjoint_groups_run_together() -> None:
    h = Harness(
        [service("F", Periodic(5), groups=("factors",)),
         service("S", Periodic(5), groups=(STATS,))],
        [MASTER], durations={"F": 100, "S": 100},
    )
    h.advance(at(0, 6))
    assert {iv.start for iv in h.intervals} == {at(0, 5)}
    assert len(h.intervals) == 2


def test_all_instances_of_one_service_share_their_groups() -> None:
    svc = service("Cache Manager", Periodic(5), roles=ALL_ROLES, groups=(STATS,),
                  placement=Placement.ALL)
    h = Harness([svc], [MASTER, MASTER2, CALC], durations={"Cache Manager": 60})
    h.advance(at(0, 5, 1))
    assert len([iv for iv in h.intervals if iv.end is None]) == 3


# == daemons ==================================================================================
def test_daemon_with_run_groups_is_paused_while_a_conflicting_run_goes() -> None:
    services = [
        service("Calculator", None, roles=("Master", "Calculation"), groups=(STATS,)),
        service("Files Collector", Periodic(10), groups=(STATS,)),
    ]
    h = Harness(services, [MASTER, CALC, PROC], durations={"Files Collector": 60},
                pause_delay=2.0)
    assert sorted((n, a) for _, s, n, a in h.controls) == [("c1", "start"), ("m1", "start")]
    h.advance(at(0, 9))
    assert h.engine.in_queue_since("Files Collector") is None
    h.advance(at(0, 10))
    assert sorted((n, a) for t, s, n, a in h.controls if t == at(0, 10)) == [
        ("c1", "pause"), ("m1", "pause"),
    ]
    assert h.engine.in_queue_since("Files Collector") == at(0, 10)
    h.advance(at(0, 12))
    [fc] = h.runs_of("Files Collector")
    assert (fc.start, fc.end) == (at(0, 10, 2), at(0, 11, 2))
    assert sorted((t, n, a) for t, s, n, a in h.controls if a == "resume") == [
        (at(0, 11, 2), "c1", "resume"), (at(0, 11, 2), "m1", "resume"),
    ]
    spans = sorted((iv.node, iv.start, iv.end) for iv in h.daemon_spans("Calculator"))
    assert spans == [
        ("c1", at(0), at(0, 10, 2)), ("c1", at(0, 11, 2), None),
        ("m1", at(0), at(0, 10, 2)), ("m1", at(0, 11, 2), None),
    ]
    assert h.conflicting_overlaps() == []
    assert h.engine.in_queue_since("Calculator") is None
    assert {d.state for d in h.engine.daemons.values()} == {"running"}


def test_daemon_pause_cycle_repeats_all_day_without_overlap() -> None:
    services = seed_services()
    durations = {"Backup Manager": 1800, "Files Collector": 90, "Statistics Manager": 400,
                 "Factors Watcher": 30, "AAA Manager": 5}
    h = Harness(services, [MASTER, CALC], durations=durations, pause_delay=3.0)
    h.advance(at(12))
    assert h.conflicting_overlaps() == []
    assert len(h.slots_run("Files Collector")) >= 60
    assert h.slots_run("Backup Manager") == [at(5, 30)]
    assert len(h.daemon_spans("Calculator")) > 100


def test_daemon_without_an_allowed_node_starts_when_one_comes() -> None:
    h = Harness([service("RADIUS Server", None, roles=("Processing",))], [MASTER])
    assert h.controls == []
    h.node_up(PROC)
    assert [(n, a) for _, _, n, a in h.controls] == [("p1", "start")]
    h.run_for(1)
    assert h.engine.last_run["RADIUS Server"] == T0


def test_disabled_daemon_is_stopped_and_restarted_when_enabled() -> None:
    h = Harness([service("Import Manager", None)], [MASTER])
    h.run_for(60)
    h.update("Import Manager", enabled=False)
    assert [a for _, _, _, a in h.controls] == ["start", "stop"]
    h.run_for(60)
    h.update("Import Manager", enabled=True)
    assert [a for _, _, _, a in h.controls] == ["start", "stop", "start"]


def test_daemon_with_one_placement_runs_on_a_single_node() -> None:
    h = Harness([service("Rates Generator", None, placement=Placement.ONE)], [MASTER, MASTER2])
    assert [(n, a) for _, _, n, a in h.controls] == [("m1", "start")]
    h.kill_node("m1")
    assert [(n, a) for _, _, n, a in h.controls] == [("m1", "start"), ("m2", "start")]


def test_daemon_schedule_edit_is_refused() -> None:
    h = Harness([service("Quotas Updater", None)], [MASTER])
    with pytest.raises(RefusedError, match="daemon"):
        h.update("Quotas Updater", schedule=Periodic(5))
    with pytest.raises(RefusedError, match="unknown service"):
        h.update("Nope", enabled=False)


# == manual runs ==============================================================================
def test_manual_run_dispatches_regardless_of_schedule() -> None:
    h = Harness([service("Backup Manager", FixedTimes.parse(["05:30"]))], [MASTER])
    h.advance(at(1))
    actions = h.manual("Backup Manager", "req-1")
    [d] = [a for a in actions if isinstance(a, Dispatch)]
    assert d.run.run_id == "manual-req-1" and d.run.trigger is Trigger.MANUAL
    assert d.run.slot is None
    h.run_for(5)
    [iv] = h.runs_of("Backup Manager")
    assert (iv.start, iv.trigger) == (at(1), "manual")
    assert h.engine.last_run["Backup Manager"] == at(1)


def test_manual_run_waits_in_queue_behind_a_conflicting_run() -> None:
    h = Harness(
        [service("Backup Manager", FixedTimes.parse(["05:30"]), groups=(STATS,)),
         service("Statistics Manager", Periodic(60), groups=(STATS,))],
        [MASTER], durations={"Backup Manager": 600, "Statistics Manager": 30},
    )
    h.advance(at(5, 31))
    assert h.engine.in_queue_since("Statistics Manager") is None
    h.manual("Statistics Manager", "r1")
    assert h.engine.in_queue_since("Statistics Manager") == at(5, 31)
    h.advance(at(5, 40, 1))
    assert h.engine.in_queue_since("Statistics Manager") is None
    [iv] = [iv for iv in h.runs_of("Statistics Manager") if iv.trigger == "manual"]
    assert (iv.start, iv.run_id) == (at(5, 40), "manual-r1")


def test_manual_run_is_refused_for_daemons_and_unknown_services() -> None:
    h = Harness([service("Calculator", None), service("A", Periodic(5))], [MASTER])
    with pytest.raises(RefusedError, match="daemon"):
        h.manual("Calculator", "r1")
    with pytest.raises(RefusedError, match="unknown service 'Nope'"):
        h.manual("Nope", "r2")
    all_svc = service("B", Periodic(5), roles=("Reporting",), placement=Placement.ALL)
    h2 = Harness([all_svc], [MASTER])
    with pytest.raises(RefusedError, match="no live node"):
        h2.manual("B", "r3")


def test_manual_run_delivered_twice_runs_once() -> None:
    h = Harness([service("A", Periodic(60))], [MASTER], durations={"A": 30})
    h.manual("A", "r1")
    h.manual("A", "r1")
    h.run_for(60)
    assert [iv.run_id for iv in h.runs_of("A")] == ["manual-r1"]


def test_manual_run_while_the_service_runs_waits_for_it() -> None:
    h = Harness([service("A", Periodic(5))], [MASTER], durations={"A": 120})
    h.advance(at(0, 5, 30))
    h.manual("A", "r1")
    assert h.engine.in_queue_since("A") == at(0, 5, 30)
    h.advance(at(0, 7, 30))
    assert [(iv.trigger, iv.start) for iv in h.runs_of("A")] == [
        ("scheduled", at(0, 5)), ("manual", at(0, 7)),
    ]


# == overlap ==================================================================================
def test_overlap_coalesce_keeps_at_most_one_waiting_run() -> None:
    h = Harness([service("Rerating", Periodic(1))], [MASTER], durations={"Rerating": 150})
    for m in range(1, 16):
        h.advance(at(0, m, 30))
        queued = [r for r in h.engine.runs.values() if r.state is RunState.QUEUED]
        assert len(queued) <= 1
    runs = h.runs_of("Rerating")
    assert [iv.slot for iv in runs] == [at(0, 1), at(0, 2), at(0, 4), at(0, 6), at(0, 9),
                                        at(0, 11)]
    assert [iv.start for iv in runs] == [at(0, 1), at(0, 3, 30), at(0, 6), at(0, 8, 30),
                                         at(0, 11), at(0, 13, 30)]
    skipped = h.finished("Rerating", "skipped")
    assert sorted(r.slot for r in skipped) == [at(0, m) for m in (3, 5, 7, 8, 10, 12, 13, 15)]
    assert all("coalesced" in (r.reason or "") for r in skipped)
    # Every slot is accounted for: ran, waiting, or recorded.
    waiting = [r.slot for r in h.engine.runs.values() if r.state is RunState.QUEUED]
    assert sorted([iv.slot for iv in runs] + [r.slot for r in skipped] + waiting) == [
        at(0, m) for m in range(1, 16)
    ]


def test_overlap_skip() -> None:
    h = Harness([service("Rerating", Periodic(1), overlap=Overlap.SKIP)], [MASTER],
                durations={"Rerating": 150})
    h.advance(at(0, 10))
    assert h.slots_run("Rerating") == [at(0, 1), at(0, 4), at(0, 7), at(0, 10)]
    skipped = h.finished("Rerating", "skipped")
    assert sorted(r.slot for r in skipped) == [at(0, m) for m in (2, 3, 5, 6, 8, 9)]
    assert all(r.reason == "previous run still running" for r in skipped)


def test_a_slot_waiting_for_its_run_group_coalesces_later_slots() -> None:
    h = Harness(
        [service("Backup Manager", FixedTimes.parse(["00:00"]), groups=(STATS,)),
         service("Files Collector", Periodic(10), groups=(STATS,))],
        [MASTER], durations={"Backup Manager": 3600, "Files Collector": 60},
        start=at(0, -1),
    )
    h.advance(at(1, 30))
    # The 00:00 run waited the hour for Backup Manager and stood for the slots that came
    # meanwhile (recorded as coalesced); then the schedule resumed.
    fc = h.runs_of("Files Collector")
    assert [(iv.slot, iv.start) for iv in fc] == [
        (at(0), at(1)), (at(1), at(1, 1)), (at(1, 10), at(1, 10)), (at(1, 20), at(1, 20)),
        (at(1, 30), at(1, 30)),
    ]
    assert sorted(r.slot for r in h.finished("Files Collector", "skipped")) == [
        at(0, m) for m in (10, 20, 30, 40, 50)
    ]


# == operator edits ===========================================================================
def test_disabled_service_fires_nothing_and_fires_again_at_the_next_slot() -> None:
    h = Harness([service("Mail Manager", Periodic(5))], [MASTER])
    h.advance(at(0, 11))
    h.update("Mail Manager", enabled=False)
    h.advance(at(1, 17, 30))
    assert h.slots_run("Mail Manager") == [at(0, 5), at(0, 10)]
    assert h.engine.next_wakeup() is None
    h.update("Mail Manager", enabled=True)
    h.advance(at(1, 30))
    assert h.slots_run("Mail Manager") == [at(0, 5), at(0, 10), at(1, 20), at(1, 25), at(1, 30)]
    assert h.ledger.overrides["Mail Manager"] == {"enabled": True}
    assert not h.finished("Mail Manager", "missed")


def test_disabled_in_the_catalogue_fires_nothing() -> None:
    h = Harness([service("Mail Manager", Periodic(5), enabled=False)], [MASTER])
    h.advance(at(1))
    assert h.intervals == [] and h.records == []


def test_schedule_edit_takes_effect_at_the_next_slot() -> None:
    h = Harness([service("Cache Manager", Periodic(10))], [MASTER])
    h.advance(at(0, 12))
    h.update("Cache Manager", schedule=Periodic(6, 3))
    h.advance(at(0, 40))
    assert h.slots_run("Cache Manager") == [at(0, 10), at(0, 15), at(0, 21), at(0, 27),
                                           at(0, 33), at(0, 39)]
    h.update("Cache Manager", schedule=FixedTimes.parse(["03:20"]))
    assert h.engine.services["Cache Manager"].kind.value == "fixed"
    h.update("Cache Manager", schedule=Cron("*/10 * * * * 30"))
    h.advance(at(0, 51))
    assert h.slots_run("Cache Manager")[-2:] == [at(0, 40, 30), at(0, 50, 30)]
    assert h.ledger.overrides["Cache Manager"] == {"schedule": {"kind": "cron",
                                                               "cron": "*/10 * * * * 30"}}


@pytest.mark.parametrize(
    "edit", [{"enabled": False}, {"schedule": Periodic(7)}, {"enabled": True}]
)
def test_a_slot_due_before_an_edit_is_not_lost(edit: dict) -> None:
    eng = Engine([service("A", Periodic(5))], "UTC")
    eng.node_up(MASTER, T0)
    eng.start(T0)
    # The leader handles the edit in the same turn the 00:05 slot became due, before ticking.
    actions = eng.update_service("A", at(0, 5, 0.01), **edit)
    [d] = [a for a in actions if isinstance(a, Dispatch)]
    assert d.run.slot == at(0, 5)
    assert not [a for a in eng.tick(at(0, 5, 0.01)) if isinstance(a, Dispatch)]
    cursors = eng.drain_changes().cursors
    if eng.services["A"].enabled:
        assert cursors == {"A": at(0, 5, 0.01)}  # handled up to the edit
    else:
        assert cursors == {"A": at(0, 5)}


def test_edits_persist_across_failover() -> None:
    h = Harness([service("Cache Manager", Periodic(10))], [MASTER])
    h.advance(at(0, 12))
    h.update("Cache Manager", schedule=Periodic(5, 1), enabled=True)
    h.failover(at(0, 13))
    assert h.engine.services["Cache Manager"].schedule == Periodic(5, 1)
    h.advance(at(0, 30))
    assert h.slots_run("Cache Manager") == [at(0, 10), at(0, 16), at(0, 21), at(0, 26)]
    assert not h.finished("Cache Manager", "missed")


def test_reenabled_service_does_not_report_the_disabled_time_as_missed_after_failover() -> None:
    h = Harness([service("Mail Manager", Periodic(5))], [MASTER])
    h.advance(at(0, 11))
    h.update("Mail Manager", enabled=False)
    h.advance(at(5, 2))
    h.update("Mail Manager", enabled=True)
    h.failover(at(5, 3))
    h.advance(at(5, 12))
    assert h.slots_run("Mail Manager") == [at(0, 5), at(0, 10), at(5, 5), at(5, 10)]
    assert not h.finished("Mail Manager", "missed")


# == recovery =================================================================================
def test_recovery_runs_the_latest_slot_within_catch_up_and_records_the_rest_missed() -> None:
    svc = service("Mail Manager", Periodic(5), catch_up=300)
    state = State(cursors={"Mail Manager": at(0, 0, day=-3)})
    h = Harness([svc], [MASTER], start=at(0, 2), state=state)
    h.run_for(1)
    assert h.slots_run("Mail Manager") == [at(0)]
    missed = h.finished("Mail Manager", "missed")
    total_missed = 3 * 288 - 1  # every slot after the cursor up to 23:55 yesterday
    assert len(missed) == MAX_MISSED_RECORDS
    assert missed[-1].slot == at(23, 55, day=-1)
    first = min(missed, key=lambda r: r.slot)
    assert f"and {total_missed - MAX_MISSED_RECORDS} earlier slots" in (first.reason or "")
    assert all("missed" in (r.reason or "") for r in missed)
    assert h.ledger.cursors["Mail Manager"] == at(0)
    h.advance(at(0, 10))
    assert h.slots_run("Mail Manager") == [at(0), at(0, 5), at(0, 10)]


def test_recovery_beyond_the_catch_up_window_records_every_slot_missed() -> None:
    svc = service("Mail Manager", Periodic(5), catch_up=60)
    state = State(cursors={"Mail Manager": at(23, 40, day=-1)})
    h = Harness([svc], [MASTER], start=at(0, 7), state=state)
    h.run_for(1)
    assert h.runs_of("Mail Manager") == []
    assert sorted(r.slot for r in h.finished("Mail Manager", "missed")) == [
        at(23, 45, day=-1), at(23, 50, day=-1), at(23, 55, day=-1), at(0), at(0, 5),
    ]
    assert h.ledger.cursors["Mail Manager"] == at(0, 5)
    h.advance(at(0, 10))
    assert h.slots_run("Mail Manager") == [at(0, 10)]


def test_recovery_of_fixed_time_service_after_an_outage() -> None:
    svc = service("Backup Manager", FixedTimes.parse(["05:30"]), catch_up=3600)
    h = Harness([svc], [MASTER], start=at(5))
    h.kill_leader()
    h.failover(at(6))
    h.run_for(1)
    assert h.slots_run("Backup Manager") == [at(5, 30)]  # 30 minutes late, within the window


def test_a_leader_dying_before_the_first_slot_loses_no_slot() -> None:
    svc = service("Backup Manager", FixedTimes.parse(["05:30"]))
    h = Harness([svc], [MASTER], start=at(5))
    h.advance(at(5, 20))
    h.kill_leader()
    h.failover(at(5, 33))
    h.run_for(1)
    assert h.slots_run("Backup Manager") == [at(5, 30)]


def test_failover_runs_every_slot_exactly_once() -> None:
    svc = service("AAA Manager", Periodic(1), catch_up=600)
    h = Harness([svc], [MASTER], durations={"AAA Manager": 20})
    h.advance(at(0, 10, 10))
    h.kill_leader()
    h.advance(at(0, 15, 30))
    h.failover()
    h.advance(at(0, 30))
    slots = h.slots_run("AAA Manager")
    missed = [r.slot for r in h.finished("AAA Manager", "missed")]
    assert sorted(slots + missed) == [at(0, m) for m in range(1, 31)]
    assert len(set(slots)) == len(slots)
    assert missed == [at(0, m) for m in (11, 12, 13, 14)]
    assert at(0, 15) in slots


def test_recovery_skips_a_slot_already_in_flight() -> None:
    svc = service("Files Collector", Periodic(10))
    h = Harness([svc], [MASTER], durations={"Files Collector": 600})
    h.advance(at(0, 10, 5))
    h.kill_leader()
    h.failover(at(0, 12))
    h.advance(at(0, 25))
    assert h.slots_run("Files Collector") == [at(0, 10), at(0, 20)]
    assert [iv.start for iv in h.runs_of("Files Collector")] == [at(0, 10), at(0, 20)]


def _backup_and_collector(*nodes: Node) -> Harness:
    """Backup Manager (05:30, an hour) and Files Collector (every 10 min) share a run group."""
    return Harness(
        [service("Backup Manager", FixedTimes.parse(["05:30"]), groups=(STATS,)),
         service("Files Collector", Periodic(10), groups=(STATS,))],
        list(nodes), durations={"Backup Manager": 3600, "Files Collector": 60}, start=at(5),
    )


# == nodes ====================================================================================
def test_node_down_loses_its_runs_and_releases_their_locks() -> None:
    h = _backup_and_collector(MASTER, MASTER2)
    h.advance(at(5, 35))
    [backup] = h.runs_of("Backup Manager")
    assert backup.end is None
    assert h.engine.in_queue_since("Files Collector") is not None
    dead = backup.node
    h.kill_node(dead)
    h.run_for(1)
    [lost] = h.finished("Backup Manager", "lost")
    assert lost.reason == f"node {dead} died"
    # The waiting conflicting run goes at once, on the live node.
    fc = [iv for iv in h.runs_of("Files Collector") if iv.start == at(5, 35)]
    assert len(fc) == 1 and fc[0].node != dead
    h.advance(at(5, 30, day=1))
    [_, second] = h.runs_of("Backup Manager")
    assert second.node != dead and second.slot == at(5, 30, day=1)
    assert h.conflicting_overlaps() == []


def test_node_down_loses_waiting_runs_placed_on_it_and_stops_its_daemons() -> None:
    svc = service("Cleaner", Periodic(5), roles=("Master",), groups=(STATS,),
                  placement=Placement.ALL)
    blocker = service("Backup Manager", FixedTimes.parse(["00:04"]), groups=(STATS,))
    h = Harness([svc, blocker, service("Calculator", None, groups=("other",))],
                [MASTER, MASTER2], durations={"Backup Manager": 600})
    h.advance(at(0, 5))
    assert h.engine.in_queue_since("Cleaner") == at(0, 5)
    h.kill_node("m2")
    lost = h.finished("Cleaner", "lost")
    assert [(r.node, r.slot) for r in lost] == [("m2", at(0, 5))]
    assert not [k for k in h.engine.daemons if k.endswith("@m2")]
    h.advance(at(0, 16))
    assert sorted((iv.node, iv.slot) for iv in h.runs_of("Cleaner")) == [
        ("m1", at(0, 5)), ("m1", at(0, 15)),
    ]


def test_a_node_back_in_a_new_session_loses_what_its_old_session_ran() -> None:
    h = _backup_and_collector(node("m1", "Master", incarnation="s1"))
    h.advance(at(5, 35))
    [backup] = h.runs_of("Backup Manager")
    assert backup.end is None and h.engine.in_queue_since("Files Collector") is not None
    [order] = [d for d in h.dispatches if d.service == "Backup Manager"]
    assert order.incarnation == "s1"  # orders name the session they are meant for
    # The same session announcing itself again changes nothing.
    h.node_up(node("m1", "Master", incarnation="s1"))
    assert h.finished("Backup Manager") == []
    # The process restarts: a new session announces itself before the old one is seen to end.
    h.restart_node(node("m1", "Master", incarnation="s2"))
    [lost] = h.finished("Backup Manager", "lost")
    assert lost.reason == "node m1 restarted" and lost.finished_at == at(5, 35)
    # Its run groups are free: the waiting run goes at once, to the new session.
    fc = [d for d in h.dispatches if d.service == "Files Collector" and d.slot == at(5, 30)]
    assert [(d.dispatched_at, d.node, d.incarnation) for d in fc] == [(at(5, 35), "m1", "s2")]
    h.advance(at(5, 50))
    assert h.conflicting_overlaps() == []


def test_a_node_restarted_while_no_leader_ran_loses_its_runs_at_takeover() -> None:
    h = _backup_and_collector(node("m1", "Master", incarnation="s1"))
    h.advance(at(5, 35))
    h.kill_leader()
    h.restart_node(node("m1", "Master", incarnation="s2"), tell=False)
    h.failover(at(5, 36))
    [lost] = h.finished("Backup Manager", "lost")
    assert lost.reason == "node m1 restarted while no leader was running"
    # The order of the ended session is not sent again; the waiting run goes to the new one.
    assert len([d for d in h.dispatches if d.service == "Backup Manager"]) == 1
    fc = [d for d in h.dispatches if d.service == "Files Collector" and d.slot == at(5, 30)]
    assert [(d.dispatched_at, d.node, d.incarnation) for d in fc] == [(at(5, 36), "m1", "s2")]


def test_a_node_that_died_while_no_leader_ran_has_its_runs_lost_at_takeover() -> None:
    h = _backup_and_collector(MASTER, MASTER2)
    h.advance(at(5, 35))
    [backup] = h.runs_of("Backup Manager")
    dead = backup.node
    h.kill_leader()
    h.kill_node(dead, tell=False)
    h.failover(at(5, 36))
    [lost] = h.finished("Backup Manager", "lost")
    assert lost.reason == f"node {dead} died while no leader was running"
    # Its run groups are free again: the run waiting for them goes at once, on the live node.
    fc = [d for d in h.dispatches if d.service == "Files Collector" and d.slot == at(5, 30)]
    assert [(d.node, d.dispatched_at) for d in fc] == [("m2" if dead == "m1" else "m1", at(5, 36))]
    h.advance(at(5, 50))
    assert h.conflicting_overlaps() == []


def test_node_coming_back_gets_work_again() -> None:
    h = Harness([service("A", Periodic(5), roles=("Processing",))], [PROC])
    h.advance(at(0, 6))
    h.kill_node("p1")
    h.advance(at(0, 11))
    h.node_up(PROC)
    h.advance(at(0, 16))
    assert h.slots_run("A") == [at(0, 5), at(0, 15)]
    [rec] = h.finished("A", "expired")
    assert rec.slot == at(0, 10)


# == retries, timeouts, expiry ================================================================
def test_failed_run_is_retried_after_the_delay() -> None:
    def outcome(run: Run) -> str:
        return "failed" if run.attempt == 1 else "succeeded"

    svc = service("Invoicing Manager", Periodic(60), retries=2, retry_delay=30)
    h = Harness([svc], [MASTER], durations={"Invoicing Manager": 10}, outcome=outcome)
    h.advance(at(1, 5))
    runs = h.runs_of("Invoicing Manager")
    assert [(iv.attempt, iv.start, iv.outcome) for iv in runs] == [
        (1, at(1), "failed"), (2, at(1, 0, 40), "succeeded"),
    ]
    assert runs[0].slot == runs[1].slot == at(1)
    assert runs[1].run_id == run_id_for("Invoicing Manager", at(1), None, 2)
    assert h.engine.in_queue_since("Invoicing Manager") is None
    [failed] = h.finished("Invoicing Manager", "failed")
    assert failed.error == "boom"


def test_retries_stop_after_the_configured_number() -> None:
    svc = service("Invoicing Manager", Periodic(60), retries=2, retry_delay=5)
    h = Harness([svc], [MASTER], durations={"Invoicing Manager": 10},
                outcome=lambda run: "timed_out" if run.attempt == 2 else "failed")
    h.advance(at(1, 30))
    assert [(iv.attempt, iv.outcome) for iv in h.runs_of("Invoicing Manager")] == [
        (1, "failed"), (2, "timed_out"), (3, "failed"),
    ]


def test_no_retry_when_retries_is_zero_or_run_succeeded() -> None:
    h = Harness([service("A", Periodic(60))], [MASTER], outcome=lambda run: "failed")
    h.advance(at(1, 30))
    assert [iv.attempt for iv in h.runs_of("A")] == [1]


def test_retries_of_manual_runs_requested_at_the_same_instant_keep_distinct_ids() -> None:
    svc = service("A", Periodic(5), retries=2, retry_delay=5, placement=Placement.ALL)
    h = Harness([svc], [MASTER, MASTER2], durations={"A": 10},
                outcome=lambda run: "failed" if run.attempt < 3 else "succeeded")
    h.advance(at(0, 5))  # the 00:05 slot and two manual requests share one instant
    h.manual("A", "r1")
    h.manual("A", "r2")
    h.advance(at(0, 9))
    ids = [iv.run_id for iv in h.runs_of("A")]
    assert len(ids) == len(set(ids)) == 3 * 3 * 2  # 3 runs x 3 attempts x 2 nodes
    assert {i for i in ids if i.startswith("manual-r1@m1")} == {
        "manual-r1@m1", "manual-r1@m1~2", "manual-r1@m1~3",
    }
    assert [iv.outcome for iv in h.runs_of("A") if iv.run_id.endswith("~3")] == ["succeeded"] * 4


def test_expired_order_after_deadline_and_grace_releases_its_locks() -> None:
    h = Harness(
        [service("Backup Manager", FixedTimes.parse(["00:05"]), groups=(STATS,)),
         service("Files Collector", Periodic(10), groups=(STATS,))],
        [MASTER], order_ttl=60, expiry_grace=30,
    )
    h.deaf.add("m1")
    h.advance(at(0, 5, 1))
    h.deaf.discard("m1")
    assert h.runs_of("Backup Manager") == []
    h.advance(at(0, 6, 29))
    assert not h.finished("Backup Manager", "expired")
    h.advance(at(0, 6, 30))
    [rec] = h.finished("Backup Manager", "expired")
    assert rec.reason == "order was not started before its deadline"
    assert rec.deadline == at(0, 6)
    h.advance(at(0, 11))
    assert h.slots_run("Files Collector") == [at(0, 10)]


def test_rejected_run_ends_with_the_workers_reason() -> None:
    h = Harness([service("A", Periodic(5))], [MASTER], order_ttl=60)
    h.drop_orders.add(run_id_for("A", at(0, 5), None))
    h.advance(at(0, 5))
    run_id = run_id_for("A", at(0, 5), None)
    h.apply(h.engine.run_finished(run_id, "m1", "rejected", at(0, 5, 1),
                                  reason="stale epoch"))
    [rec] = h.finished("A", "rejected")
    assert rec.reason == "stale epoch"


def test_worker_events_for_unknown_or_foreign_runs_are_ignored() -> None:
    h = Harness([service("A", Periodic(5))], [MASTER, MASTER2], durations={"A": 30})
    h.advance(at(0, 5))
    [iv] = h.runs_of("A")
    other = "m2" if iv.node == "m1" else "m1"
    assert h.engine.run_started("nope", iv.node, at(0, 5), at(0, 5)) == []
    assert h.engine.run_finished(iv.run_id, other, "succeeded", at(0, 5)) == []
    assert effects(h.engine.daemon_event("A", "m1", "started", at(0, 5))) == []
    with pytest.raises(ValueError, match="not a finishing outcome"):
        h.engine.run_finished(iv.run_id, iv.node, "queued", at(0, 5))


def test_a_rejection_after_the_start_does_not_crash_the_engine() -> None:
    h = Harness([service("A", Periodic(5), groups=("g",)), service("B", Periodic(5),
                                                                      groups=("g",))],
                [MASTER], durations={"A": 30, "B": 30})
    h.advance(at(0, 5))
    [iv] = [iv for iv in h.intervals if iv.end is None]
    actions = h.engine.run_finished(iv.run_id, iv.node, "rejected", at(0, 5, 1),
                                    reason="past deadline")
    h.apply(actions)
    assert iv.run_id not in h.engine.runs
    h.advance(at(0, 6))
    assert len(h.intervals) == 2


# == failover =================================================================================
def test_redispatch_after_failover_keeps_the_run_ids() -> None:
    h = Harness([service("Files Collector", Periodic(10))], [MASTER],
                durations={"Files Collector": 30})
    rid = run_id_for("Files Collector", at(0, 10), None)
    h.drop_orders.add(rid)  # the order never reaches the worker
    h.advance(at(0, 10, 5))
    assert h.runs_of("Files Collector") == []
    assert h.ledger.runs[rid].state is RunState.DISPATCHED
    h.kill_leader()
    h.failover(at(0, 10, 20))
    assert [d.run_id for d in h.dispatches] == [rid, rid]
    h.advance(at(0, 11))
    [iv] = h.runs_of("Files Collector")
    assert (iv.run_id, iv.start, iv.outcome) == (rid, at(0, 10, 20), "succeeded")
    assert rid not in h.ledger.runs
    [rec] = h.finished("Files Collector", "succeeded")
    assert rec.run_id == rid


def test_a_takeover_after_the_deadline_does_not_resend_a_stale_order() -> None:
    # The cluster was down longer than the order's deadline: the new leader must not send an
    # order a worker would refuse (deadline before issue time); the run expires instead.
    h = Harness([service("Files Collector", Periodic(10))], [MASTER],
                durations={"Files Collector": 30})
    rid = run_id_for("Files Collector", at(0, 10), None)
    h.drop_orders.add(rid)
    h.advance(at(0, 10, 5))
    h.kill_leader()
    h.failover(at(0, 40))
    assert [d.run_id for d in h.dispatches] == [rid]  # only the first, lost order
    h.advance(at(0, 40, 1))
    [rec] = h.finished("Files Collector", "expired")
    assert rec.run_id == rid
    assert rid not in [iv.run_id for iv in h.runs_of("Files Collector")]


def test_a_run_in_flight_during_failover_finishes_under_the_new_leader() -> None:
    h = Harness(
        [service("Backup Manager", FixedTimes.parse(["00:05"]), groups=(STATS,)),
         service("Files Collector", Periodic(10), groups=(STATS,))],
        [MASTER], durations={"Backup Manager": 600, "Files Collector": 30},
    )
    h.advance(at(0, 6))
    h.kill_leader()
    h.failover(at(0, 7))
    # The adopted run still holds its groups.
    h.advance(at(0, 10, 30))
    assert h.slots_run("Files Collector") == []
    assert h.engine.in_queue_since("Files Collector") == at(0, 10)
    h.advance(at(0, 16))
    assert h.slots_run("Files Collector") == [at(0, 10)]
    assert h.runs_of("Files Collector")[0].start == at(0, 15)
    assert h.conflicting_overlaps() == []
    assert [r.state for r in h.finished("Backup Manager")] == [RunState.SUCCEEDED]


def test_a_queued_run_is_dispatched_by_the_new_leader_with_a_fresh_deadline() -> None:
    h = Harness(
        [service("Backup Manager", FixedTimes.parse(["00:05"]), groups=(STATS,)),
         service("Files Collector", Periodic(10), groups=(STATS,))],
        [MASTER], durations={"Backup Manager": 900, "Files Collector": 30},
        order_ttl=60,
    )
    h.advance(at(0, 10, 30))
    assert h.ledger.runs[run_id_for("Files Collector", at(0, 10), None)].state is RunState.QUEUED
    h.kill_leader()
    h.advance(at(0, 30))  # Backup Manager ends at 00:20 while no leader runs
    h.failover()
    [d] = [d for d in h.dispatches if d.service == "Files Collector"]
    assert d.slot == at(0, 10)
    assert d.dispatched_at == at(0, 30) and d.deadline == at(0, 31)
    h.advance(at(0, 31))
    assert [iv.start for iv in h.runs_of("Files Collector")] == [at(0, 30)]


def test_adopted_queued_run_keeps_its_place_and_coalesces_the_recovered_slot() -> None:
    h = Harness(
        [service("Backup Manager", FixedTimes.parse(["00:05"]), groups=(STATS,)),
         service("Files Collector", Periodic(10), groups=(STATS,), catch_up=600)],
        [MASTER], durations={"Backup Manager": 1200, "Files Collector": 30},
    )
    h.advance(at(0, 10, 30))
    h.kill_leader()
    h.advance(at(0, 22))  # the 00:20 slot comes while no leader runs
    h.failover()
    h.advance(at(0, 40))
    fc = h.runs_of("Files Collector")
    assert [iv.slot for iv in fc] == [at(0, 10), at(0, 30), at(0, 40)]
    assert fc[0].start == at(0, 25)
    assert [r.slot for r in h.finished("Files Collector", "skipped")] == [at(0, 20)]


@pytest.mark.parametrize("manual", [False, True])
def test_a_retry_waiting_during_failover_keeps_its_delay(manual: bool) -> None:
    svc = service("A", FixedTimes.parse(["01:00"]), retries=1, retry_delay=120)
    h = Harness([svc], [MASTER], durations={"A": 10}, start=at(0, 50),
                outcome=lambda run: "failed" if run.attempt == 1 else "succeeded")
    if manual:
        h.update("A", enabled=False)
        h.advance(at(1))
        h.manual("A", "r1")
    h.advance(at(1, 0, 30))
    assert h.engine.in_queue_since("A") is None  # a retry in its delay is not "In Queue"
    h.failover(at(1, 0, 40))
    assert h.engine.in_queue_since("A") is None
    h.advance(at(1, 5))
    assert [(iv.attempt, iv.start) for iv in h.runs_of("A")] == [(1, at(1)), (2, at(1, 2, 10))]
    assert [iv.trigger for iv in h.runs_of("A")] == (
        ["manual", "manual"] if manual else ["scheduled", "retry"]
    )


def test_daemon_paused_across_failover_is_resumed_after_the_run() -> None:
    services = [
        service("Calculator", None, roles=("Master",), groups=(STATS,)),
        service("Files Collector", Periodic(10), groups=(STATS,)),
    ]
    h = Harness(services, [MASTER], durations={"Files Collector": 120})
    h.advance(at(0, 10, 30))
    assert [a for _, _, _, a in h.controls] == ["start", "pause"]
    h.failover(at(0, 11))
    # The new leader finds the run holding the groups: the daemon waits for it.
    assert [a for _, _, _, a in h.controls] == ["start", "pause"]
    assert h.engine.daemons["daemon:Calculator@m1"].state == "waiting"
    h.advance(at(0, 13))
    assert h.conflicting_overlaps() == []
    assert [(iv.start, iv.end) for iv in h.daemon_spans("Calculator")] == [
        (at(0), at(0, 10)), (at(0, 12), None),
    ]
    assert [a for _, _, _, a in h.controls] == ["start", "pause", "start"]


def test_recovered_slot_after_failover_waits_for_a_daemon_still_running() -> None:
    services = [
        service("Calculator", None, roles=("Master",), groups=(STATS,)),
        service("Files Collector", Periodic(1), groups=(STATS,), catch_up=600),
    ]
    h = Harness(services, [MASTER], durations={"Files Collector": 5}, pause_delay=1.0)
    h.advance(T0 + 30)
    h.kill_leader()
    h.advance(T0 + 90)  # the 00:01 slot comes while no leader runs; the daemon keeps running
    h.failover()
    h.advance(at(0, 3))
    assert h.conflicting_overlaps() == []
    [fc, *_] = h.runs_of("Files Collector")
    assert (fc.slot, fc.start) == (at(0, 1), T0 + 91)  # after the daemon parked


def test_reports_answering_a_previous_leader_do_not_release_a_daemons_groups() -> None:
    services = [
        service("Calculator", None, roles=("Master",), groups=(STATS,)),
        service("Files Collector", Periodic(1), groups=(STATS,), catch_up=600),
    ]
    h = Harness(services, [MASTER], durations={"Files Collector": 5}, pause_delay=1.0)
    for _ in range(3):  # leaders die right after asking the daemon to start or pause
        h.advance(T0 + 30)
        h.kill_leader()
        h.advance(h.now + 60)
        h.failover()
    h.advance(at(0, 5))
    assert h.conflicting_overlaps() == []
    assert h.slots_run("Files Collector")[0] == at(0, 1)


def test_daemon_event_with_an_older_epoch_is_ignored() -> None:
    eng = Engine([service("Calculator", None, groups=(STATS,)),
                  service("Files Collector", Periodic(5), groups=(STATS,))], "UTC")
    eng.node_up(MASTER, T0)
    eng.start(T0, None, epoch=4)
    assert effects(eng.daemon_event("Calculator", "m1", "started", T0, epoch=3)) == []
    assert eng.daemons["daemon:Calculator@m1"].state == "starting"
    eng.daemon_event("Calculator", "m1", "started", T0, epoch=4)
    assert eng.daemons["daemon:Calculator@m1"].state == "running"
    actions = eng.tick(at(0, 5))
    assert [(a.node, a.action) for a in actions if isinstance(a, Control)] == [("m1", "pause")]
    assert effects(eng.daemon_event("Calculator", "m1", "paused", at(0, 5), epoch=3)) == []
    actions = eng.daemon_event("Calculator", "m1", "paused", at(0, 5, 1),  # no epoch: trusted
                               started_at=T0)
    assert [a.run.service for a in actions if isinstance(a, Dispatch)] == ["Files Collector"]


@pytest.mark.parametrize("resumed_seen", [True, False])
def test_a_pause_report_delivered_twice_does_not_release_a_running_daemon(
    resumed_seen: bool,
) -> None:
    """RabbitMQ delivers at least once: the `paused` that ended an earlier interval may come
    again while the leader waits for the next pause. Taking it as the answer would start the
    conflicting run beside the running daemon."""
    eng = Engine([service("Calculator", None, groups=(STATS,)),
                  service("Files Collector", Periodic(5), groups=(STATS,))], "UTC")
    eng.node_up(MASTER, T0)
    eng.start(T0, None, epoch=1)
    eng.daemon_event("Calculator", "m1", "started", T0, epoch=1, at=T0)
    eng.tick(at(0, 5))  # asks the daemon to pause
    first_pause = dict(epoch=1, at=at(0, 5, 1), started_at=T0)
    [fc] = [a for a in eng.daemon_event("Calculator", "m1", "paused", at(0, 5, 1),
                                        **first_pause) if isinstance(a, Dispatch)]
    actions = eng.run_finished(fc.run.run_id, "m1", "succeeded", at(0, 6))
    assert [(a.node, a.action) for a in actions if isinstance(a, Control)] == [("m1", "resume")]
    if resumed_seen:
        eng.daemon_event("Calculator", "m1", "resumed", at(0, 6, 1), epoch=1, at=at(0, 6, 1))
    actions = eng.tick(at(0, 10))
    assert [(a.node, a.action) for a in actions if isinstance(a, Control)] == [("m1", "pause")]
    again = eng.daemon_event("Calculator", "m1", "paused", at(0, 10, 1), **first_pause)
    assert not [a for a in again if isinstance(a, Dispatch)]
    assert eng.daemons["daemon:Calculator@m1"].state == "pausing"
    # A late copy of the resume report neither reopens nor ends anything.
    assert eng.daemon_event("Calculator", "m1", "started", at(0, 10, 1), epoch=1, at=T0) == []
    # The worker's own answer to this pause ends the interval it began at the resume.
    began = at(0, 6, 1) if resumed_seen else None
    actions = eng.daemon_event("Calculator", "m1", "paused", at(0, 10, 2), epoch=1,
                               at=at(0, 10, 2), started_at=began)
    assert [a.run.slot for a in actions if isinstance(a, Dispatch)] == [at(0, 10)]


def test_a_starting_daemon_is_paused_once_it_reports_started() -> None:
    eng = Engine([service("Calculator", None, groups=(STATS,)),
                  service("Files Collector", Periodic(5), groups=(STATS,))], "UTC")
    eng.node_up(MASTER, T0)
    eng.start(at(0, 4, 59))
    actions = eng.tick(at(0, 5))
    assert not [a for a in actions if isinstance(a, Control)]
    assert effects(eng.daemon_event("Calculator", "m1", "paused", at(0, 5))) == []  # not asked
    actions = eng.daemon_event("Calculator", "m1", "started", at(0, 5, 1))
    assert [(a.node, a.action) for a in actions if isinstance(a, Control)] == [("m1", "pause")]


def test_a_grant_that_reaches_a_vanished_daemon_passes_on() -> None:
    eng = Engine([service("A", Periodic(5), groups=("g",)), service("B", Periodic(60),
                                                                    groups=("g",))], "UTC")
    eng.node_up(MASTER, T0)
    eng.start(T0)
    [d] = [a for a in eng.tick(at(0, 5)) if isinstance(a, Dispatch)]
    # A daemon claim with no daemon instance behind it waits ahead of a manual run of B.
    from coordinator.core.rungroup import Claim

    assert not eng.locks.request(Claim("daemon:Ghost@m1", "Ghost", frozenset({"g"}), at(0, 5)))
    assert not [a for a in eng.manual_run("B", at(0, 5), "r1") if isinstance(a, Dispatch)]
    actions = eng.run_finished(d.run.run_id, "m1", "succeeded", at(0, 5, 3))
    assert [a.run.run_id for a in actions if isinstance(a, Dispatch)] == ["manual-r1"]
    assert not eng.locks.waiting()


# == changes for the ledger ===================================================================
def test_drain_changes_reports_cursors_runs_last_runs_and_overrides() -> None:
    eng = Engine([service("A", Periodic(5)), service("B", Periodic(60))], "UTC")
    eng.node_up(MASTER, T0)
    eng.start(T0, None, epoch=3)
    eng.drain_changes()
    actions = eng.tick(at(0, 5))
    [d] = [a for a in actions if isinstance(a, Dispatch)]
    assert d.run.epoch == 3
    ch = eng.drain_changes()
    assert ch.cursors == {"A": at(0, 5)}
    assert ch.runs == {d.run.run_id: d.run}
    assert ch.last_runs == {"A": at(0, 5)}
    assert bool(ch)
    assert not eng.drain_changes()
    eng.run_started(d.run.run_id, "m1", at(0, 5, 1), at(0, 5, 1))
    assert eng.drain_changes().runs[d.run.run_id].state is RunState.RUNNING
    eng.run_finished(d.run.run_id, "m1", "succeeded", at(0, 5, 2), output_tail="ok",
                     metrics={"rows": 3.0})
    ch = eng.drain_changes()
    assert ch.runs == {d.run.run_id: None}
    [fin] = ch.finished
    assert (fin.state, fin.output_tail, fin.metrics) == (RunState.SUCCEEDED, "ok", {"rows": 3.0})
    eng.update_service("B", at(0, 6), enabled=False)
    assert eng.drain_changes().overrides == {"B": {"enabled": False}}


def test_actions_are_dispatch_then_record() -> None:
    eng = Engine([service("A", Periodic(5))], "UTC")
    eng.node_up(MASTER, T0)
    eng.start(T0)
    actions = eng.tick(at(0, 5))
    assert [type(a) for a in actions] == [Dispatch, Record]
    assert actions[0].run.node == "m1"
    assert actions[0].run.deadline == at(0, 5) + eng.order_ttl
    assert not any(isinstance(a, Control) for a in actions)


def test_next_wakeup_follows_slots_and_timers() -> None:
    eng = Engine([service("A", Periodic(5))], "UTC", order_ttl=60, expiry_grace=30)
    assert eng.next_wakeup() is None
    eng.node_up(MASTER, T0)
    eng.start(T0)
    assert eng.next_wakeup() == at(0, 5)
    eng.tick(at(0, 5))
    assert eng.next_wakeup() == at(0, 6, 30)  # the order's expiry comes before 00:10


# == a walk through DST days ==================================================================
def _walk(tz: str, day: datetime, services: list, hours: int = 26) -> Harness:
    start = day.timestamp()
    clock = ManualClock(start)
    h = Harness(services, [MASTER], tz=tz, start=start, durations={})
    while clock.now() < start + hours * 3600:
        clock.advance(60)
        h.advance(clock.now())
    return h


def _utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


def test_walk_through_the_spring_forward_day_in_new_york() -> None:
    services = [
        service("Backup Manager", FixedTimes.parse(["02:30"])),
        service("Cache Manager", Periodic(30)),
    ]
    # 2025-03-09 00:00 EST is 05:00 UTC; clocks jump from 02:00 EST to 03:00 EDT (07:00 UTC).
    h = _walk("America/New_York", datetime(2025, 3, 9, 5, 0, tzinfo=UTC), services, hours=26)
    # 02:30 does not exist on the 9th: 03:00 EDT; then 02:30 EDT on the 10th.
    assert h.slots_run("Backup Manager") == [_utc(2025, 3, 9, 7, 0), _utc(2025, 3, 10, 6, 30)]
    periodic = h.slots_run("Cache Manager")
    # 00:30, 01:00, 01:30 EST, then 03:00 EDT ... 23:30 EDT, 00:00 ... 03:00 EDT on the 10th.
    expected = [_utc(2025, 3, 9, 5, 30), _utc(2025, 3, 9, 6, 0), _utc(2025, 3, 9, 6, 30)]
    t = _utc(2025, 3, 9, 7, 0)
    while t <= _utc(2025, 3, 10, 7, 0):
        expected.append(t)
        t += 1800
    assert periodic == expected
    assert len([s for s in periodic if s < _utc(2025, 3, 10, 4, 0)]) == 45  # a 23-hour day


def test_walk_through_the_fall_back_day_in_new_york() -> None:
    services = [
        service("Backup Manager", FixedTimes.parse(["02:30"])),
        service("Log Rotator", FixedTimes.parse(["01:30"])),
        service("Cache Manager", Periodic(30)),
    ]
    # 2025-11-02 00:00 EDT is 04:00 UTC; 02:00 EDT (06:00 UTC) becomes 01:00 EST.
    h = _walk("America/New_York", datetime(2025, 11, 2, 4, 0, tzinfo=UTC), services, hours=26)
    assert h.slots_run("Backup Manager") == [_utc(2025, 11, 2, 7, 30)]  # 02:30 EST
    assert h.slots_run("Log Rotator") == [_utc(2025, 11, 2, 5, 30)]  # 01:30 EDT, once
    periodic = h.slots_run("Cache Manager")
    expected = []
    t = _utc(2025, 11, 2, 4, 30)
    while t <= _utc(2025, 11, 3, 6, 0):
        expected.append(t)
        t += 1800
    assert periodic == expected  # both passes of the repeated hour fire
    assert len([s for s in periodic if s < _utc(2025, 11, 3, 5, 0)]) == 49  # a 25-hour day


# == a property: conflicting services never overlap, every slot is accounted for ==============
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(
        st.tuples(
            st.integers(1, 30),  # period
            st.frozensets(st.sampled_from(["factors", STATS, "g3"]), max_size=2),
            st.integers(5, 900),  # duration, seconds
            st.sampled_from([Overlap.COALESCE, Overlap.SKIP]),
            st.sampled_from([Placement.ONE, Placement.ALL]),
        ),
        min_size=1,
        max_size=6,
    ),
    daemon_groups=st.frozensets(st.sampled_from(["factors", STATS, "g3"]), max_size=1),
    manual_at=st.lists(st.tuples(st.integers(0, 5), st.integers(60, 7000)), max_size=4),
)
def test_random_catalogues_never_overlap_and_account_for_every_slot(
    specs, daemon_groups, manual_at
) -> None:
    services = [
        service(f"S{i}", Periodic(p), roles=("Master",), groups=g, overlap=o, placement=pl)
        for i, (p, g, _, o, pl) in enumerate(specs)
    ]
    services.append(service("Daemon", None, roles=("Master",), groups=daemon_groups))
    durations = {f"S{i}": float(d) for i, (_, _, d, _, _) in enumerate(specs)}
    h = Harness(services, [MASTER, MASTER2], durations=durations, pause_delay=1.5)
    requests = sorted((t, i % len(specs)) for i, t in manual_at)
    for n, (t, i) in enumerate(requests):
        h.advance(T0 + t)
        h.manual(f"S{i}", f"r{n}")
    end = at(2)
    h.advance(end)
    assert h.conflicting_overlaps() == []
    for i, (period, _, _, _, pl) in enumerate(specs):
        name = f"S{i}"
        targets = ["m1", "m2"] if pl is Placement.ALL else [""]
        slots = [T0 + k * period * 60 for k in range(1, 10_000) if T0 + k * period * 60 <= end]
        seen: dict[tuple[float, str], int] = {}
        ran = [iv for iv in h.runs_of(name) if iv.trigger == "scheduled"]
        for iv in ran:
            key = (iv.slot, iv.node if pl is Placement.ALL else "")
            seen[key] = seen.get(key, 0) + 1
        for rec in h.finished(name, "skipped"):
            key = (rec.slot, rec.target)
            seen[key] = seen.get(key, 0) + 1
        for run in h.engine.runs.values():
            if run.service == name and run.trigger is Trigger.SCHEDULED and not run.started_at:
                key = (run.slot, run.target)
                seen[key] = seen.get(key, 0) + 1
        assert seen == {(s, t): 1 for s in slots for t in targets}, name
    # Every accepted manual request ran on each target, or still waits.
    for n, (_, i) in enumerate(requests):
        name, pl = f"S{i}", specs[i][4]
        targets = ["m1", "m2"] if pl is Placement.ALL else [""]
        for target in targets:
            rid = f"manual-r{n}" + (f"@{target}" if target else "")
            ran = [iv for iv in h.runs_of(name) if iv.run_id == rid]
            assert len(ran) + (rid in h.engine.runs and not ran) == 1, rid


def _some_fail(run: Run) -> str:
    return "failed" if zlib.crc32(run.run_id.encode()) % 3 == 0 else "succeeded"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(
        st.tuples(
            st.integers(1, 20),  # period
            st.frozensets(st.sampled_from(["factors", STATS]), max_size=2),
            st.integers(5, 600),  # duration, seconds
            st.sampled_from([Placement.ONE, Placement.ALL]),
            st.integers(0, 2),  # retries
        ),
        min_size=1,
        max_size=5,
    ),
    daemon_groups=st.frozensets(st.sampled_from(["factors", STATS]), max_size=1),
    events=st.lists(
        st.tuples(
            st.integers(30, 5400),  # when, seconds after the start
            st.sampled_from(
                ["kill", "revive", "failover", "outage", "manual", "toggle", "deafen"]
            ),
            st.integers(0, 10),
        ),
        max_size=8,
    ),
)
def test_node_deaths_and_failovers_keep_runs_apart_and_on_allowed_nodes(
    specs, daemon_groups, events
) -> None:
    services = [
        service(f"S{i}", Periodic(p), roles=("Master", "Processing") if i % 2 else ("Master",),
                groups=g, placement=pl, retries=r, retry_delay=20, catch_up=400)
        for i, (p, g, _, pl, r) in enumerate(specs)
    ]
    services.append(service("Daemon", None, roles=("Master",), groups=daemon_groups))
    durations = {f"S{i}": float(d) for i, (_, _, d, _, _) in enumerate(specs)}
    nodes = [MASTER, MASTER2, PROC]
    h = Harness(services, nodes, durations=durations, pause_delay=1.0, outcome=_some_fail)
    allowed = {s.name: s.allowed_roles for s in services}
    toggled: set[str] = set()
    for n, (when, what, arg) in enumerate(sorted(events)):
        h.advance(T0 + when)
        if what == "kill" and h.nodes:
            h.kill_node(sorted(h.nodes)[arg % len(h.nodes)])
        elif what == "revive":
            for nd in nodes:
                if nd.id not in h.nodes:
                    h.node_up(nd)
                    break
        elif what == "failover" and h.engine is not None:
            h.failover()
        elif what == "outage" and h.engine is not None:
            h.kill_leader()
            h.advance(h.now + 60 * (arg + 1))
            h.failover()
        elif what == "manual" and h.engine is not None:
            try:
                h.manual(f"S{arg % len(specs)}", f"r{n}")
            except RefusedError as exc:
                assert "no live node" in str(exc)
        elif what == "deafen":  # the node drops orders and controls, or hears again
            h.deaf ^= {sorted(nd.id for nd in nodes)[arg % len(nodes)]}
        elif what == "toggle" and h.engine is not None:
            name = f"S{arg % len(specs)}"
            toggled.add(name)
            h.update(name, enabled=not h.engine.services[name].enabled)
    h.advance(at(2))
    assert h.conflicting_overlaps() == []
    roles = {nd.id: nd.roles for nd in nodes}
    for iv in h.intervals:
        assert not roles[iv.node].isdisjoint(allowed[iv.service]), iv
    # At most one run per slot, attempt and target.
    keys = [(iv.service, iv.slot, iv.attempt, iv.node) for iv in h.intervals
            if iv.trigger in ("scheduled", "retry")]
    assert len(keys) == len(set(keys))
    one = [(iv.service, iv.slot, iv.attempt) for iv in h.intervals
           if iv.trigger in ("scheduled", "retry")
           and services[int(iv.service[1:])].placement is Placement.ONE]
    assert len(one) == len(set(one))
    # Each slot of a `one` service has exactly one outcome: a run (finished or still active)
    # or a record saying why it did not run.
    for i, (period, _, _, pl, _) in enumerate(specs):
        name = f"S{i}"
        if pl is not Placement.ONE or name in toggled:
            continue
        outcomes: dict[float, list[str]] = {}
        for r in h.finished(name):
            if r.trigger is Trigger.SCHEDULED:
                outcomes.setdefault(r.slot, []).append(r.state.value)
        for r in h.engine.runs.values():
            if r.service == name and r.trigger is Trigger.SCHEDULED:
                outcomes.setdefault(r.slot, []).append(r.state.value)
        slots = [T0 + k * period * 60 for k in range(1, 200) if T0 + k * period * 60 <= at(2)]
        assert sorted(outcomes) == slots, name
        assert all(len(v) == 1 for v in outcomes.values()), outcomes


def test_runs_wait_for_capacity_instead_of_expiring() -> None:
    from coordinator.core.engine import Dispatch, Engine
    from coordinator.core.node import Node
    from coordinator.core.run import RunState
    from protocol.schedule import Periodic
    from protocol.service import Kind, Service

    t0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    services = [Service(f"s{i}", Kind.PERIODIC, Periodic(1, 0), frozenset({"Master"}))
                for i in range(3)]
    engine = Engine(services)
    engine.node_up(Node("n1", frozenset({"Master"}), capacity=1), t0)
    engine.start(t0)
    first = [a for a in engine.tick(t0 + 60) if isinstance(a, Dispatch)]
    assert len(first) == 1
    waiting = [r for r in engine.runs.values() if r.state is RunState.QUEUED]
    assert len(waiting) == 2 and engine.in_queue_since(waiting[0].service) == t0 + 60
    run = first[0].run
    engine.run_started(run.run_id, "n1", t0 + 60.1, t0 + 60.1)
    nxt = [a for a in engine.run_finished(run.run_id, "n1", "succeeded", t0 + 61)
           if isinstance(a, Dispatch)]
    assert len(nxt) == 1 and nxt[0].run.node == "n1"
    assert not [r for r in engine.drain_changes().finished if r.state is RunState.EXPIRED]


# == runs whose report never comes ===========================================================
def test_a_running_run_whose_report_never_comes_ends_lost_and_frees_its_groups() -> None:
    """A run that started and never reports its end (its worker's reporter is stuck) is
    ended by the leader once its timeout and a grace have passed, so it cannot hold its run
    groups forever: the neighbour sharing the group runs after it."""
    stuck = service("Stuck", Periodic(10), groups=("g",), timeout=60.0)
    neighbour = service("Neighbour", Periodic(10), groups=("g",))
    h = Harness([stuck, neighbour], [MASTER])
    h.hang.add("Stuck")
    h.advance(at(0, 10, 30))
    started = [iv for iv in h.runs_of("Stuck") if iv.slot == at(0, 10)]
    assert started, "the stuck run started"
    h.advance(at(0, 12))
    ended = h.finished("Stuck", "lost")
    assert ended, "the leader ended the run whose report never came"
    assert ended[0].slot == at(0, 10)
    assert ended[0].finished_at == started[0].start + 60 + 30  # timeout + max(30 s, 10 %)
    assert "no report" in (ended[0].reason or "")
    assert at(0, 10) in h.slots_run("Neighbour")
    h.advance(at(0, 42))
    assert [iv.slot for iv in h.runs_of("Neighbour")] == [at(0, m) for m in (10, 20, 30, 40)]


def test_the_report_backstop_survives_failover() -> None:
    """A new leader adopting a running run from the ledger ends it on the same schedule."""
    stuck = service("Stuck", Periodic(10), groups=("g",), timeout=600.0)
    h = Harness([stuck], [MASTER])
    h.hang.add("Stuck")
    h.advance(at(0, 10, 30))
    h.failover(at(0, 11))
    h.advance(at(0, 20, 59))
    assert not h.finished("Stuck", "lost")
    h.advance(at(0, 21, 1))
    assert [r.slot for r in h.finished("Stuck", "lost")] == [at(0, 10)]


# == daemon intervals ==========================================================================
def test_daemon_intervals_open_close_and_end_lost_with_their_node() -> None:
    eng = Engine([service("Calculator", None)])
    eng.node_up(MASTER, T0)
    eng.start(T0, epoch=2)
    (opened,) = [a for a in eng.daemon_event("Calculator", "m1", "started", T0 + 1, epoch=2,
                                             at=T0 + 0.5) if isinstance(a, DaemonInterval)]
    assert (opened.began, opened.finished, opened.state) == (T0 + 0.5, None, "running")
    assert opened.run_id == f"daemon:Calculator@m1#{T0 + 0.5:.3f}"
    (ended,) = [a for a in eng.node_down("m1", T0 + 9) if isinstance(a, DaemonInterval)]
    assert (ended.began, ended.finished, ended.state) == (T0 + 0.5, T0 + 9, "lost")
    assert ended.reason == "node m1 died"
    assert not eng.intervals


def test_a_fresh_start_while_an_interval_is_open_ends_the_old_one_lost() -> None:
    eng = Engine([service("Calculator", None)])
    eng.node_up(MASTER, T0)
    eng.start(T0)
    eng.daemon_event("Calculator", "m1", "started", T0 + 1, at=T0 + 1)
    out = [a for a in eng.daemon_event("Calculator", "m1", "started", T0 + 5, at=T0 + 5)
           if isinstance(a, DaemonInterval)]
    assert [(a.began, a.state, a.reason) for a in out] == [
        (T0 + 1, "lost", "its worker restarted"), (T0 + 5, "running", "started")]
    (closed,) = [a for a in eng.daemon_event("Calculator", "m1", "exited", T0 + 7, at=T0 + 7,
                                             started_at=T0 + 5, error="boom")
                 if isinstance(a, DaemonInterval)]
    assert (closed.finished, closed.state, closed.error) == (T0 + 7, "failed", "boom")
