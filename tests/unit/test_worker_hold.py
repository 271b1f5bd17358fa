"""A worker holding orders sent ahead of their slot, on a clock the test moves.

Each test drives a real `WorkerNode` through its queue on the in-memory transport, with a
`ManualClock`: an order whose `start_at` has not come is held, and starts only once the
clock reaches it, after the node has checked it again.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from protocol import RunEvent, RunOrder, encode
from protocol.clock import ManualClock
from protocol.coordination import MemoryCoordination
from protocol.transport import make_transport
from tests.unit.test_worker import Reports
from workers.executor import ExecContext
from workers.node import WorkerNode

HERE = "tests.unit.test_worker_hold"
T = 1_800_000_000.0


def noop(ctx: ExecContext) -> None:
    return None


class Node:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = ManualClock(T)
        self.coordination = MemoryCoordination()
        self.transport = make_transport(None)
        self.journal = tmp_path / "n1.journal"
        self.node = WorkerNode("n1", ["Master"], self.transport, self.coordination, self.clock,
                               journal=str(self.journal))
        self.reports = Reports(self.transport)

    def order(self, *, start_at: float | None, epoch: int = 1, run_id: str | None = None,
              issued_at: float = T, deadline: float = T + 60,
              incarnation: str | None = None) -> RunOrder:
        return RunOrder(
            run_id=run_id or uuid.uuid4().hex, service="Svc", node="n1", trigger="scheduled",
            slot=start_at, epoch=epoch, issued_at=issued_at, deadline=deadline, timeout=10.0,
            callable=f"{HERE}:noop", start_at=start_at, incarnation=incarnation,
        )

    def send(self, order: RunOrder) -> None:
        self.transport.send(self.node.queue, encode(order))

    def new_leader(self, epoch: int) -> None:
        """A successor was elected: the epoch every worker watches moves on."""
        store = self.coordination.store
        store.epoch = epoch
        for watcher in list(store.epoch_watchers):
            watcher(epoch)

    def events(self, run_id: str) -> list[RunEvent]:
        with self.reports._lock:
            return [ev for ev in self.reports.events if ev.run_id == run_id]

    def starts(self) -> list[dict[str, object]]:
        import json

        if not self.journal.exists():
            return []
        lines = [json.loads(x) for x in self.journal.read_text().splitlines()]
        return [x for x in lines if x["event"] == "start"]


@pytest.fixture
def n(tmp_path: Path) -> Iterator[Node]:
    node = Node(tmp_path)
    node.node.start()
    try:
        yield node
    finally:
        node.node.stop(timeout=5)


def until(what: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return
        time.sleep(0.01)
    raise AssertionError("the condition did not come true")


def held(n: Node, run_id: str) -> bool:
    with n.node._seen_lock:
        return run_id in n.node._held


def test_an_order_sent_ahead_is_held_and_starts_at_its_instant(n: Node) -> None:
    order = n.order(start_at=T + 1.5)
    n.send(order)
    until(lambda: held(n, order.run_id))
    assert n.starts() == [] and n.events(order.run_id) == []
    n.clock.set(T + 1.5)
    until(lambda: any(ev.state == "succeeded" for ev in n.events(order.run_id)))
    [start] = n.starts()
    assert (start["run_id"], start["at"], start["slot"], start["start_at"], start["epoch"]) == (
        order.run_id, T + 1.5, T + 1.5, T + 1.5, 1)
    [ev] = [e for e in n.events(order.run_id) if e.state != "started"]
    assert (ev.state, ev.started_at, ev.epoch) == ("succeeded", T + 1.5, 1)


def test_an_order_whose_instant_has_passed_starts_at_once(n: Node) -> None:
    n.clock.set(T + 3)
    order = n.order(start_at=T + 1.5)  # a successor's re-sent order, after the slot
    n.send(order)
    until(lambda: any(ev.state == "succeeded" for ev in n.events(order.run_id)))
    assert [s["at"] for s in n.starts()] == [T + 3]


def test_orders_held_for_one_instant_all_start_then(n: Node) -> None:
    orders = [n.order(start_at=T + 2) for _ in range(50)]
    for o in orders:
        n.send(o)
    until(lambda: all(held(n, o.run_id) for o in orders))
    n.clock.set(T + 2)
    until(lambda: len(n.starts()) == 50)
    assert {(s["run_id"], s["at"]) for s in n.starts()} == {(o.run_id, T + 2) for o in orders}


def test_a_held_order_of_a_superseded_leader_does_not_start_and_the_resent_one_runs_once(
    n: Node,
) -> None:
    order = n.order(start_at=T + 1.5, epoch=1)
    n.send(order)
    until(lambda: held(n, order.run_id))
    n.new_leader(2)
    n.clock.set(T + 1.5)
    until(lambda: not held(n, order.run_id))
    assert n.starts() == [] and n.events(order.run_id) == []  # nothing ran, nothing reported
    # The successor adopted the run from the ledger and sends it again, with its epoch.
    n.clock.set(T + 2.5)
    again = n.order(start_at=T + 1.5, epoch=2, run_id=order.run_id, issued_at=T + 2.5)
    n.send(again)
    n.send(again)  # and a duplicate of that is ignored
    until(lambda: any(ev.state == "succeeded" for ev in n.events(order.run_id)))
    time.sleep(0.2)
    [start] = n.starts()
    assert (start["epoch"], start["seen_epoch"], start["at"]) == (2, 2, T + 2.5)
    assert [ev.state for ev in n.events(order.run_id) if ev.state != "started"] == ["succeeded"]


def test_a_resent_order_arriving_while_held_takes_its_place_and_the_run_starts_once(
    n: Node,
) -> None:
    order = n.order(start_at=T + 1.5, epoch=1)
    n.send(order)
    until(lambda: held(n, order.run_id))
    n.new_leader(2)
    n.send(n.order(start_at=T + 1.5, epoch=2, run_id=order.run_id, issued_at=T + 0.5))
    until(lambda: n.node._held[order.run_id].epoch == 2)
    n.send(order)  # the predecessor's order again: ignored
    n.clock.set(T + 1.5)
    until(lambda: any(ev.state == "succeeded" for ev in n.events(order.run_id)))
    time.sleep(0.2)
    [start] = n.starts()
    assert (start["epoch"], start["at"]) == (2, T + 1.5)
    assert [(ev.state, ev.epoch) for ev in n.events(order.run_id)
            if ev.state != "started"] == [("succeeded", 2)]


def test_a_held_order_is_checked_again_at_its_instant(n: Node) -> None:
    # Its node session ended while it was held (the node now has another one): refused.
    session = n.node.incarnation
    order = n.order(start_at=T + 1.5, incarnation=session)
    n.send(order)
    until(lambda: held(n, order.run_id))
    n.node.incarnation = "a-later-session"
    n.clock.set(T + 1.5)
    until(lambda: bool(n.events(order.run_id)))
    [ev] = n.events(order.run_id)
    assert ev.state == "rejected" and ev.reason is not None
    assert ev.reason.startswith("sent to an ended session")
    assert n.starts() == []


def test_a_held_order_past_its_deadline_at_its_instant_is_refused(n: Node) -> None:
    order = n.order(start_at=T + 1.5, deadline=T + 2)
    n.send(order)
    until(lambda: held(n, order.run_id))
    n.clock.set(T + 3)  # the worker was stalled past the deadline
    until(lambda: bool(n.events(order.run_id)))
    [ev] = n.events(order.run_id)
    assert ev.state == "rejected" and ev.reason is not None
    assert ev.reason.startswith("past its deadline")
    assert n.starts() == []


@contextmanager
def pool_held(n: Node) -> Iterator[Sequence[object]]:
    """Runs the node hands to its pool inside the block are held back (the list yielded has
    one entry per run), and handed to the pool when it ends: as if every thread of the pool
    were busy meanwhile."""
    real = n.node._pool
    deferred: list[tuple[Callable[..., object], tuple[object, ...]]] = []

    class Gate:
        def submit(self, fn: Callable[..., object], *args: object) -> None:
            deferred.append((fn, args))

    n.node._pool = Gate()  # type: ignore[assignment]
    try:
        yield deferred
    finally:
        n.node._pool = real
        for fn, args in deferred:
            real.submit(fn, *args)


def test_an_order_whose_leader_is_superseded_before_the_pool_starts_it_does_not_start(
    n: Node,
) -> None:
    """Accepted, then a newer leader is seen before a thread of the pool takes the run (many
    orders at one instant): it does not start, and the successor's order runs once."""
    order = n.order(start_at=None, epoch=1)
    with pool_held(n) as held_back:
        n.send(order)
        until(lambda: bool(held_back))
        n.new_leader(2)
    time.sleep(0.3)
    assert n.starts() == [] and n.events(order.run_id) == []
    again = n.order(start_at=None, epoch=2, run_id=order.run_id, issued_at=T + 1)
    n.send(again)
    until(lambda: any(ev.state == "succeeded" for ev in n.events(order.run_id)))
    [start] = n.starts()
    assert (start["epoch"], start["seen_epoch"]) == (2, 2)


def test_an_order_of_a_deposed_leader_is_refused_and_the_successors_order_runs_once(
    n: Node,
) -> None:
    n.new_leader(2)
    old = n.order(start_at=None, epoch=1)
    n.send(old)
    until(lambda: any(ev.state == "rejected" for ev in n.events(old.run_id)))
    again = n.order(start_at=None, epoch=2, run_id=old.run_id, issued_at=T + 1)
    n.send(again)
    until(lambda: any(ev.state == "succeeded" for ev in n.events(old.run_id)))
    [start] = n.starts()
    assert (start["epoch"], start["seen_epoch"]) == (2, 2)


def test_a_successors_order_arriving_before_the_pool_starts_the_superseded_one_runs_once(
    n: Node,
) -> None:
    """Accepted, then the successor's order for the same run arrives before a thread of the
    pool takes the predecessor's: that one does not start, the successor's does, once."""
    order = n.order(start_at=None, epoch=1)
    with pool_held(n) as held_back:
        n.send(order)
        until(lambda: bool(held_back))
        n.new_leader(2)
        again = n.order(start_at=None, epoch=2, run_id=order.run_id, issued_at=T + 1)
        n.send(again)
        n.send(order)  # and the predecessor's again: a duplicate
        time.sleep(0.2)
    until(lambda: any(ev.state == "succeeded" for ev in n.events(order.run_id)))
    time.sleep(0.2)
    [start] = n.starts()
    assert (start["epoch"], start["seen_epoch"]) == (2, 2)
    assert [(ev.state, ev.epoch) for ev in n.events(order.run_id)
            if ev.state != "started"] == [("succeeded", 2)]
