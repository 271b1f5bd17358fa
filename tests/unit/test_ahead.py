"""Dispatching ahead: orders leave a lead time before their slot and start at the slot.

Driven by the deterministic harness (simulated leader and workers, injected clock): the
harness's workers hold an order carrying a start instant until then, as real workers do.
"""

from __future__ import annotations

import pytest

from coordinator.core.engine import Dispatch, Engine
from coordinator.core.run import RunState
from protocol import run_id_for
from protocol.schedule import Periodic
from protocol.service import Overlap, Placement
from tests.unit.engine_harness import T0, Harness, at, node, service

LEAD = 1.5
MASTER = node("m1", "Master")
MASTER2 = node("m2", "Master")


def test_an_order_leaves_a_lead_time_before_its_slot_and_starts_at_the_slot() -> None:
    h = Harness([service("Mail Manager", Periodic(1))], [MASTER], lead=LEAD,
                durations={"Mail Manager": 10})
    assert h.engine is not None
    assert h.engine.next_wakeup() == at(0, 1) - LEAD
    h.advance(at(0, 3, 30))
    assert [(d.slot, d.dispatched_at, d.start_at) for d in h.dispatches] == [
        (at(0, m), at(0, m) - LEAD, at(0, m)) for m in (1, 2, 3)]
    assert [(iv.slot, iv.start) for iv in h.runs_of("Mail Manager")] == [
        (at(0, m), at(0, m)) for m in (1, 2, 3)]
    # Last Run is when the run was initiated: its slot, not the order's departure.
    assert h.engine.last_run["Mail Manager"] == at(0, 3)
    assert h.ledger.cursors["Mail Manager"] == at(0, 3)


def test_without_a_lead_time_orders_leave_at_the_slot_with_no_start_instant() -> None:
    h = Harness([service("Mail Manager", Periodic(1))], [MASTER])
    h.advance(at(0, 2, 30))
    assert [(d.dispatched_at, d.start_at) for d in h.dispatches] == [
        (at(0, 1), None), (at(0, 2), None)]


def test_every_target_of_an_all_service_gets_its_order_ahead() -> None:
    svc = service("Cache Manager", Periodic(1), placement=Placement.ALL)
    h = Harness([svc], [MASTER, MASTER2], lead=LEAD)
    h.advance(at(0, 1, 30))
    assert sorted((d.node, d.dispatched_at, d.start_at) for d in h.dispatches) == [
        ("m1", at(0, 1) - LEAD, at(0, 1)), ("m2", at(0, 1) - LEAD, at(0, 1))]
    assert sorted((iv.node, iv.start) for iv in h.runs_of("Cache Manager")) == [
        ("m1", at(0, 1)), ("m2", at(0, 1))]


def _story(h: Harness) -> list[tuple[str, float | None, float, float | None]]:
    return [(iv.service, iv.slot, iv.start, iv.end) for iv in h.intervals]


def test_a_node_up_after_the_orders_left_gets_its_run_of_an_all_slot() -> None:
    svc = service("Cache Manager", Periodic(1), placement=Placement.ALL)
    h = Harness([svc], [MASTER], lead=LEAD)
    h.advance(at(0, 1) - 1.0)  # m1's order has left
    h.node_up(MASTER2)
    h.advance(at(0, 1, 30))
    assert sorted((d.node, d.dispatched_at, d.start_at) for d in h.dispatches) == [
        ("m1", at(0, 1) - LEAD, at(0, 1)), ("m2", at(0, 1) - 1.0, at(0, 1))]
    assert sorted((iv.node, iv.start) for iv in h.runs_of("Cache Manager")) == [
        ("m1", at(0, 1)), ("m2", at(0, 1))]


@pytest.mark.parametrize("placement", [Placement.ONE, Placement.ALL])
def test_with_no_eligible_node_at_lead_time_the_slot_is_decided_at_its_instant(
    placement: Placement,
) -> None:
    svc = service("Cache Manager", Periodic(1), placement=placement)
    h = Harness([svc], [], lead=LEAD)
    h.advance(at(0, 1) - 1.0)
    assert h.dispatches == [] and h.finished("Cache Manager") == []
    h.node_up(MASTER)
    h.advance(at(0, 1, 30))
    [d] = h.dispatches
    assert (d.node, d.dispatched_at, d.start_at) == ("m1", at(0, 1), None)
    # With no node up at the slot either, it is recorded then, as without a lead.
    h2, h0 = Harness([svc], [], lead=LEAD), Harness([svc], [])
    h2.advance(at(0, 1, 30))
    h0.advance(at(0, 1, 30))
    [rec] = h2.finished("Cache Manager")
    assert (rec.slot, rec.reason, rec.queued_at) == (
        at(0, 1), "no live node holds an allowed role", at(0, 1))
    assert [(r.run_id, r.state) for r in h0.finished()] == [(rec.run_id, rec.state)]


def test_a_run_with_run_groups_is_dispatched_at_its_slot_when_granted() -> None:
    groups = ("stats",)
    services = [service("Files Collector", Periodic(1), groups=groups),
                service("Statistics Manager", Periodic(2), groups=groups)]
    durations = {"Statistics Manager": 90.0, "Files Collector": 5.0}
    h = Harness(services, [MASTER], lead=LEAD, durations=durations)
    h.advance(at(0, 6))
    assert h.dispatches and all(d.start_at is None for d in h.dispatches)
    # Never before its slot, never overlapping: a grant comes only from the leader's turn.
    assert all(d.dispatched_at is not None and d.slot is not None
               and d.dispatched_at >= d.slot for d in h.dispatches)
    assert h.conflicting_overlaps() == []
    # Who ran, when and in which order: exactly as without a lead time.
    h0 = Harness(services, [MASTER], durations=durations)
    h0.advance(at(0, 6))
    assert _story(h) == _story(h0)
    assert any(iv.start > (iv.slot or 0) for iv in h.intervals)  # some waited for the group


def test_a_slot_behind_a_run_in_flight_fires_at_its_slot_and_coalesces() -> None:
    # Each run takes 70 s: at lead time its predecessor still runs, so the slot is not sent
    # ahead; at the slot it waits behind it, and slots coalesce exactly as without a lead.
    durations = {"Mail Manager": 70.0, "Files Collector": 150.0}
    services = [service("Mail Manager", Periodic(1)), service("Files Collector", Periodic(1))]
    h = Harness(services, [MASTER], lead=LEAD, durations=durations)
    h.advance(at(0, 8, 30))
    mail = [d for d in h.dispatches if d.service == "Mail Manager"]
    assert (mail[0].dispatched_at, mail[0].start_at) == (at(0, 1) - LEAD, at(0, 1))
    assert mail[1:] and all(d.start_at is None for d in mail[1:])
    h0 = Harness(services, [MASTER], durations=durations)
    h0.advance(at(0, 8, 30))
    assert _story(h) == _story(h0)
    skipped = [(r.slot, r.reason) for r in h.finished("Files Collector", "skipped")]
    assert skipped and skipped == [
        (r.slot, r.reason) for r in h0.finished("Files Collector", "skipped")]
    assert {reason for _, reason in skipped} == {
        "coalesced: a run of this service is already waiting"}


def test_a_slot_behind_a_run_that_ends_within_the_lead_time_is_not_skipped() -> None:
    # overlap = skip: a predecessor still running at lead time but ended before the slot
    # does not make the slot a skip; one still running at the slot does.
    svc = service("Mail Manager", Periodic(1), overlap=Overlap.SKIP)
    h = Harness([svc], [MASTER], lead=LEAD, durations={"Mail Manager": 59})
    h.advance(at(0, 3, 30))
    assert [iv.slot for iv in h.runs_of("Mail Manager")] == [at(0, 1), at(0, 2), at(0, 3)]
    assert h.finished("Mail Manager", "skipped") == []
    h2 = Harness([svc], [MASTER], lead=LEAD, durations={"Mail Manager": 61})
    h2.advance(at(0, 3, 30))
    assert [iv.slot for iv in h2.runs_of("Mail Manager")] == [at(0, 1), at(0, 3)]
    [skip] = h2.finished("Mail Manager", "skipped")
    assert (skip.slot, skip.reason) == (at(0, 2), "previous run still running")


def test_a_full_node_keeps_an_ahead_run_waiting_and_it_starts_when_room_is_made() -> None:
    small = node("m1", "Master", capacity=1)
    h = Harness([service("A", Periodic(1)), service("B", Periodic(1))], [small], lead=LEAD,
                durations={"A": 10, "B": 10})
    h.advance(at(0, 1, 30))
    assert [(iv.service, iv.start) for iv in h.intervals] == [
        ("A", at(0, 1)), ("B", at(0, 1, 10))]
    [_, b] = h.dispatches
    assert (b.dispatched_at, b.start_at) == (at(0, 1, 10), None)  # after its slot: at once


def test_failover_while_an_order_is_held_resends_it_and_it_runs_once() -> None:
    h = Harness([service("Mail Manager", Periodic(1))], [MASTER], lead=LEAD,
                durations={"Mail Manager": 5})
    rid = run_id_for("Mail Manager", at(0, 1), None)
    h.advance(at(0, 1) - 1.0)  # the order left at 00:00:58.5; the worker holds it
    assert h.ledger.runs[rid].state is RunState.DISPATCHED
    h.kill_leader()
    h.failover(at(0, 1, 2))  # the successor takes over after the slot
    [_, again] = [d for d in h.dispatches if d.run_id == rid]
    assert again.start_at == at(0, 1)  # re-sent as it was: the instant is past, start at once
    h.advance(at(0, 2, 30))
    runs = h.runs_of("Mail Manager")
    assert [(iv.run_id, iv.start) for iv in runs if iv.slot == at(0, 1)] == [(rid, at(0, 1))]
    assert [iv.slot for iv in runs] == [at(0, 1), at(0, 2)]
    [rec] = h.finished("Mail Manager", "succeeded")[:1]
    assert rec.run_id == rid


def test_failover_after_a_lost_order_sent_ahead_runs_the_slot_once_when_resent() -> None:
    h = Harness([service("Mail Manager", Periodic(1))], [MASTER], lead=LEAD,
                durations={"Mail Manager": 5})
    rid = run_id_for("Mail Manager", at(0, 1), None)
    h.drop_orders.add(rid)
    h.advance(at(0, 1) - 1.0)
    h.kill_leader()
    h.failover(at(0, 1, 2))
    h.advance(at(0, 1, 30))
    [iv] = h.runs_of("Mail Manager")
    assert (iv.run_id, iv.start) == (rid, at(0, 1, 2))
    assert h.finished("Mail Manager", "missed") == []


def test_failover_before_the_order_left_fires_the_slot_ahead_under_the_new_leader() -> None:
    h = Harness([service("Mail Manager", Periodic(1))], [MASTER], lead=LEAD)
    h.advance(at(0, 0, 50))
    h.kill_leader()
    h.failover(at(0, 0, 58))
    h.advance(at(0, 1, 30))
    [d] = h.dispatches
    assert (d.epoch, d.dispatched_at, d.start_at) == (2, at(0, 0, 58.5), at(0, 1))
    assert [iv.start for iv in h.runs_of("Mail Manager")] == [at(0, 1)]


def test_disabling_after_the_order_left_lets_that_run_count_and_stops_the_next() -> None:
    h = Harness([service("Mail Manager", Periodic(1))], [MASTER], lead=LEAD)
    h.advance(at(0, 1) - 1.0)
    h.update("Mail Manager", enabled=False)
    h.advance(at(0, 4))
    [iv] = h.runs_of("Mail Manager")
    assert (iv.slot, iv.start, iv.outcome) == (at(0, 1), at(0, 1), "succeeded")
    assert len(h.dispatches) == 1


def test_disabling_before_the_order_left_runs_nothing() -> None:
    h = Harness([service("Mail Manager", Periodic(1))], [MASTER], lead=LEAD)
    h.advance(at(0, 1) - 2.0)
    h.update("Mail Manager", enabled=False)
    h.advance(at(0, 4))
    assert h.runs_of("Mail Manager") == [] and h.dispatches == []


def test_an_edit_after_the_order_left_keeps_that_run_once_and_takes_the_next_slot() -> None:
    h = Harness([service("Mail Manager", Periodic(1))], [MASTER], lead=LEAD)
    h.advance(at(0, 1) - 1.0)
    # The new schedule also has the slot whose order has left: it does not run twice.
    h.update("Mail Manager", schedule=Periodic(2, 1))
    h.advance(at(0, 4))
    assert [(iv.slot, iv.start) for iv in h.runs_of("Mail Manager")] == [
        (at(0, 1), at(0, 1)), (at(0, 3), at(0, 3))]


def test_an_edit_drops_a_slot_waiting_for_its_instant() -> None:
    # At lead time a run is in flight: the 00:02 slot waits for its instant; an edit before
    # it moves the service to odd minutes, so 00:02 never runs and 00:03 does.
    h = Harness([service("Mail Manager", Periodic(1))], [MASTER], lead=LEAD,
                durations={"Mail Manager": 59.5})
    h.advance(at(0, 2) - 1.0)
    h.update("Mail Manager", schedule=Periodic(2, 1))
    h.advance(at(0, 3, 30))
    assert [iv.slot for iv in h.runs_of("Mail Manager")] == [at(0, 1), at(0, 3)]


def test_recovered_slots_then_ahead_again() -> None:
    # The cluster was down for three slots: the latest runs at once, the others are missed,
    # and the next slot goes ahead again.
    h = Harness([service("Mail Manager", Periodic(1))], [MASTER], lead=LEAD,
                durations={"Mail Manager": 5})
    h.advance(at(0, 1, 30))
    h.kill_leader()
    h.failover(at(0, 4, 10))
    h.advance(at(0, 5, 30))
    assert [(iv.slot, iv.start) for iv in h.runs_of("Mail Manager")] == [
        (at(0, 1), at(0, 1)), (at(0, 4), at(0, 4, 10)), (at(0, 5), at(0, 5))]
    assert [r.slot for r in h.finished("Mail Manager", "missed")] == [at(0, 2), at(0, 3)]


def test_the_lead_time_must_be_under_the_order_deadline() -> None:
    with pytest.raises(ValueError, match="lead time"):
        Engine([], order_ttl=60.0, lead=60.0)
    with pytest.raises(ValueError, match="lead time"):
        Engine([], lead=-1.0)


def test_ahead_dispatch_is_one_pass_per_due_slot() -> None:
    # 1,000 services due at one instant: every order leaves in the one turn at lead time.
    services = [service(f"S{i}", Periodic(1)) for i in range(1000)]
    eng = Engine(services, lead=LEAD)
    eng.node_up(node("m1", "Master", capacity=1000), T0)
    eng.start(T0, None, 1)
    wake = eng.next_wakeup()
    assert wake == at(0, 1) - LEAD
    dispatched = [a for a in eng.tick(wake) if isinstance(a, Dispatch)]
    assert len(dispatched) == 1000
    assert {(a.run.start_at, a.run.dispatched_at) for a in dispatched} == {(at(0, 1), wake)}
