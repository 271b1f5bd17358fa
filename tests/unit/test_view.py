"""The service table's rows come from the engine's own computations."""

from __future__ import annotations

from coordinator import view
from coordinator.core.engine import Dispatch, Engine
from coordinator.core.run import RunState
from protocol.schedule import Periodic
from tests.unit.engine_harness import T0, node, service


def _row(engine: Engine, name: str) -> view.Row:
    (row,) = [r for r in view.rows(engine) if r.name == name]
    return row


def test_a_retry_of_a_manual_run_is_not_in_queue() -> None:
    """In Queue counts runs waiting for their first attempt; a retry waiting out its delay
    is not queued work, whether it retries a scheduled or a manual run."""
    engine = Engine([service("Mail Manager", Periodic(60), retries=2, retry_delay=30.0)])
    engine.node_up(node("m1", "Master"), T0)
    engine.start(T0)
    (order,) = [a for a in engine.manual_run("Mail Manager", T0 + 1, "r1")
                if isinstance(a, Dispatch)]
    engine.run_started(order.run.run_id, "m1", T0 + 1, T0 + 1)
    engine.run_finished(order.run.run_id, "m1", "failed", T0 + 2)
    (retry,) = engine.runs.values()
    assert retry.state is RunState.QUEUED and retry.attempt == 2
    assert engine.in_queue_since("Mail Manager") is None
    assert _row(engine, "Mail Manager").in_queue is None


def test_the_snapshot_holds_the_rows_and_counts() -> None:
    engine = Engine([service("Mail Manager", Periodic(60)), service("Calculator", None)])
    engine.node_up(node("m1", "Master"), T0)
    engine.start(T0, epoch=3)
    snap = view.snapshot(engine)
    assert [r.name for r in snap.rows] == ["Calculator", "Mail Manager"]
    assert (snap.epoch, snap.active, snap.waiting) == (3, 0, 0)
    assert _row(engine, "Calculator").running == 1  # starting counts as running


def test_the_snapshot_builds_its_rows_only_for_a_reader_and_agrees_with_them() -> None:
    """The leader's snapshot copies what runs change; the rows (one per service) are built
    when a reader first asks, and a single row is found without building them all."""
    engine = Engine([service(f"svc-{i:03d}", Periodic(5)) for i in range(200)])
    engine.node_up(node("m1", "Master"), T0)
    engine.start(T0)
    (order,) = [a for a in engine.manual_run("svc-007", T0 + 1, "r1") if isinstance(a, Dispatch)]
    engine.run_started(order.run.run_id, "m1", T0 + 1, T0 + 1)
    snap = view.snapshot(engine)
    assert "rows" not in snap.__dict__
    one = snap.row("svc-007")
    assert "rows" not in snap.__dict__
    assert one is not None and one.running == 1 and one.last_run == T0 + 1
    assert snap.row("no such service") is None
    assert [r for r in snap.rows if r.name == "svc-007"] == [one]
    assert [r.name for r in snap.rows] == sorted(r.name for r in view.rows(engine))
