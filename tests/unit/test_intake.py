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


def test_a_batch_of_reports_is_taken_report_by_report_and_bad_ones_dead_lettered() -> None:
    """A worker's `RunEvents` batch: the valid reports end their runs; an element that is not
    a valid event, and one naming an unknown run, each go to the dead letters with their own
    bytes; the delivery is acknowledged once, with the turn."""
    import msgpack

    from coordinator.inbox import Delivered, Source
    from protocol import encode
    from protocol.batches import RUN_EVENTS, pack
    from protocol.transport import Delivery

    engine = Engine([service("Mail Manager", Periodic(60)), service("Events", Periodic(60))])
    engine.node_up(node("m1", "Master"), T0)
    engine.start(T0, epoch=1)
    runs = [a.run for name in ("Mail Manager", "Events")
            for a in engine.manual_run(name, T0 + 1, f"r-{name}") if isinstance(a, Dispatch)]

    def done(run_id: str, svc: str) -> bytes:
        return encode(RunEvent(run_id=run_id, service=svc, node="m1", state="succeeded",
                               at=T0 + 2, epoch=1, started_at=T0 + 1.5, finished_at=T0 + 2))

    bad = msgpack.packb({"t": "RunEvent", "v": 1, "run_id": "x"})
    unknown = done("nobody-knows", "Events")
    payload = pack(RUN_EVENTS, [done(runs[0].run_id, "Mail Manager"), bad, unknown,
                                done(runs[1].run_id, "Events")])

    class Outbox:
        letters: list[tuple[bytes, str]] = []

        def dead_letter(self, source: str, raw: bytes, error: object, now: float,
                        reason: str) -> None:
            self.letters.append((raw, reason))

    assert len(runs) == 2 and all(r.run_id in engine.runs for r in runs)
    acked: list[bool] = []
    turn = Turn()
    outbox = Outbox()
    intake.delivered(engine, Delivered(Source.RESULTS, Delivery(payload, None,
                                                                lambda: acked.append(True))),
                     T0 + 2, turn, outbox)  # type: ignore[arg-type]
    assert all(r.run_id not in engine.runs for r in runs), "both valid reports ended their runs"
    assert outbox.letters == [(bad, "missing_field"), (unknown, "unknown_run")]
    assert len(turn.acks) == 1 and acked == []  # acknowledged with the turn, not before
