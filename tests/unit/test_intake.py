"""What the leader makes of worker reports (coordinator/intake.py)."""

from __future__ import annotations

import copy

from coordinator import intake
from coordinator.core.engine import Dispatch, Engine, State
from coordinator.core.run import RunState
from coordinator.outbox import Turn
from protocol import RunEvent
from protocol.schedule import Periodic
from tests.unit.engine_harness import T0, node, service


def test_a_refusal_of_a_deposed_leaders_order_leaves_the_adopted_run_to_its_resent_order() -> (
        None):
    """A worker that has seen epoch 2 refuses the epoch-1 order of a run; the epoch-2
    leader adopted that run and sent it again, so the refusal does not end it."""
    first = Engine([service("Mail Manager", Periodic(60))])
    first.node_up(node("m1", "Master"), T0)
    first.start(T0, epoch=1)
    (order,) = [a for a in first.manual_run("Mail Manager", T0 + 1, "r1")
                if isinstance(a, Dispatch)]
    adopted = copy.deepcopy(order.run)
    second = Engine([service("Mail Manager", Periodic(60))])
    second.node_up(node("m1", "Master"), T0 + 2)
    actions = second.start(T0 + 2, State(runs=[adopted]), epoch=2)
    actions += second.redispatch(T0 + 2)
    assert [a.run.run_id for a in actions if isinstance(a, Dispatch)] == [order.run.run_id]
    refused = RunEvent(run_id=order.run.run_id, service="Mail Manager", node="m1",
                       state="rejected", at=T0 + 2.5, epoch=1, reason="stale epoch 1 < 2")
    turn = Turn()
    assert intake.on_event(second, refused, T0 + 2.5, turn) == []
    assert second.runs[order.run.run_id].state is RunState.DISPATCHED
    # The same refusal in the current epoch ends the run, as before.
    now_refused = RunEvent(run_id=order.run.run_id, service="Mail Manager", node="m1",
                           state="rejected", at=T0 + 3, epoch=2, reason="past its deadline")
    intake.on_event(second, now_refused, T0 + 3, turn)
    assert order.run.run_id not in second.runs or \
        second.runs[order.run.run_id].state is not RunState.DISPATCHED
