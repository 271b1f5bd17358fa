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
