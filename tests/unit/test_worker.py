"""A worker node on the in-memory transport: what it reports, and what it must never do.

Each test drives a real `WorkerNode` (executor, daemons, reporter thread) through its queue
and reads its run events from `rota.results`.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from protocol import DaemonControl, RunEvent, RunOrder, encode
from protocol.batches import RUN_EVENTS, messages_of
from protocol.clock import SystemClock
from protocol.coordination import MemoryCoordination
from protocol.service import Utility
from protocol.transport import RESULTS, Delivery, Transport, make_transport
from workers import node as worker_node
from workers.executor import ExecContext
from workers.node import WorkerNode

HERE = "tests.unit.test_worker"


# -- utilities the orders below name ----------------------------------------------------------


def nan_metric(ctx: ExecContext) -> None:
    ctx.metric("quality", float("nan"))


def infinite_returned_metric(ctx: ExecContext) -> dict[str, object]:
    return {"quality": float("inf")}


def unencodable_output(ctx: ExecContext) -> None:
    ctx.log("half a character: \udc80")


def until_cancelled(ctx: ExecContext) -> None:
    while not ctx.cancelled():
        time.sleep(0.01)


_RELEASE = threading.Event()


def ignores_its_timeout(ctx: ExecContext) -> None:
    _RELEASE.wait(10)


# -- the node and what it reports ---------------------------------------------------------------


class Reports:
    """Collects the run events the node publishes on `rota.results`."""

    def __init__(self, transport: Transport) -> None:
        self.events: list[RunEvent] = []
        self._lock = threading.Lock()
        transport.consume(RESULTS, self._take)

    def _take(self, delivery: Delivery) -> None:
        assert delivery.payload is not None
        with self._lock:
            self.events += messages_of(delivery.payload, RUN_EVENTS)
        delivery.ack()

    def wait_for(self, what: Callable[[RunEvent], bool], timeout: float = 10.0) -> RunEvent:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                events = list(self.events)
            for ev in events:
                if what(ev):
                    return ev
            time.sleep(0.02)
        raise AssertionError(f"no such event within {timeout}s; got {self.events}")

    def finished(self, run_id: str, timeout: float = 10.0) -> RunEvent:
        return self.wait_for(
            lambda ev: ev.run_id == run_id and ev.state not in ("started", "rejected"), timeout)


class TroubledCoordination(MemoryCoordination):
    """In-memory coordination that, like ZooKeeper's, tells of session trouble."""

    def __init__(self) -> None:
        super().__init__()
        self.trouble: list[tuple[Callable[[], None], Callable[[], None]]] = []

    def on_session_trouble(self, suspended: Callable[[], None], lost: Callable[[], None]) -> None:
        self.trouble.append((suspended, lost))


def _make(node_id: str = "n1", coordination: MemoryCoordination | None = None,
          ) -> tuple[WorkerNode, Reports]:
    transport = make_transport(None)
    node = WorkerNode(node_id, ["Master"], transport, coordination or MemoryCoordination(),
                      SystemClock())
    return node, Reports(transport)


@pytest.fixture
def worker() -> Iterator[tuple[WorkerNode, Reports]]:
    node, reports = _make()
    node.start()
    try:
        yield node, reports
    finally:
        node.stop(timeout=5)


def _order(node: str, fn: str, *, groups: tuple[str, ...] = (), timeout: float = 10.0,
           epoch: int = 1) -> RunOrder:
    now = time.time()
    return RunOrder(run_id=uuid.uuid4().hex, service="Svc", node=node, trigger="scheduled",
                    slot=now, epoch=epoch, issued_at=now, deadline=now + 60, timeout=timeout,
                    callable=f"{HERE}:{fn}", run_groups=list(groups))


def _send(node: WorkerNode, order: RunOrder) -> None:
    node.transport.send(node.queue, encode(order))


# -- a bad value from a utility ends its run failed ----------------------------------------------


@pytest.mark.parametrize("fn, says", [
    ("nan_metric", ("quality", "nan")),
    ("infinite_returned_metric", ("quality", "inf")),
    ("unencodable_output", ("output",)),
])
def test_a_bad_value_from_a_utility_ends_the_run_failed_naming_it(
    worker: tuple[WorkerNode, Reports], fn: str, says: tuple[str, ...]
) -> None:
    node, reports = worker
    order = _order(node.node_id, fn)
    _send(node, order)
    ev = reports.finished(order.run_id)
    assert ev.state == "failed", ev
    assert ev.error is not None and all(s in ev.error for s in says), ev.error
    assert not node._running, "the run still holds its run groups on the worker"


# -- the epoch only goes forward -----------------------------------------------------------------


def test_the_worker_epoch_never_goes_backwards_under_racing_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    node, _ = _make()
    written: list[int] = []

    def read(self: WorkerNode) -> int:
        value: int = self.__dict__["_epoch_value"]
        time.sleep(0.0005)  # widen the gap between reading and writing
        return value

    def write(self: WorkerNode, value: int) -> None:
        self.__dict__["_epoch_value"] = value
        written.append(value)

    node.__dict__["_epoch_value"] = 0
    monkeypatch.setattr(WorkerNode, "_epoch", property(read, write), raising=False)
    top = 200
    start = threading.Barrier(8)

    def race(offset: int) -> None:
        start.wait()
        for e in range(1 + offset, top + 1, 8):
            node._see_epoch(e)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert node.__dict__["_epoch_value"] == top
    backwards = [(a, b) for a, b in zip(written, written[1:], strict=False) if b < a]
    assert not backwards, f"the epoch went backwards {len(backwards)} times, e.g. {backwards[:3]}"


# -- the outbox is bounded ---------------------------------------------------------------------


def test_the_outbox_blocks_reporters_at_its_bound_and_loses_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_node, "OUTBOX_LIMIT", 5)
    node, reports = _make()
    outage = threading.Event()
    outage.set()
    real = node.transport.publish

    def publish(items: list[tuple[str, bytes]]) -> None:
        if outage.is_set():
            raise ConnectionError("RabbitMQ is away")
        real(items)

    monkeypatch.setattr(node.transport, "publish", publish)
    node._reporter_thread.start()
    total = 40

    def report_all() -> None:
        for i in range(total):
            node._report(RunEvent(run_id=f"r{i}", service="Svc", node=node.node_id,
                                  state="started", at=time.time(), epoch=1))

    producer = threading.Thread(target=report_all, daemon=True)
    producer.start()
    producer.join(1.0)
    assert producer.is_alive(), "40 reports were queued during an outage with a bound of 5"
    assert node._outbox.qsize() <= 5
    outage.clear()
    producer.join(20)
    assert not producer.is_alive()
    reports.wait_for(lambda ev: ev.run_id == f"r{total - 1}", timeout=20)
    with reports._lock:
        assert [ev.run_id for ev in reports.events] == [f"r{i}" for i in range(total)]
    node._outbox.put(None)
    node._reporter_thread.join(5)


# -- daemons know their node --------------------------------------------------------------------


def test_a_command_line_daemon_sees_its_node_id(tmp_path: Path) -> None:
    node, _ = _make("node-7")
    seen = tmp_path / "node"
    node.daemons.start("D", Utility(command=(
        "sh", "-c", f'printf %s "$ROTA_NODE" > {seen}.tmp && mv {seen}.tmp {seen}; sleep 30')),
        {})
    try:
        deadline = time.monotonic() + 10
        while not seen.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen.read_text() == "node-7"
    finally:
        node.daemons.stop_all()


# -- session trouble stops the runs holding run groups --------------------------------------------


def test_session_trouble_stops_runs_holding_groups_on_any_worker() -> None:
    coordination = TroubledCoordination()
    node, reports = _make(coordination=coordination)
    node.start()
    try:
        held = _order(node.node_id, "until_cancelled", groups=("g",))
        free = _order(node.node_id, "until_cancelled")
        _send(node, held)
        _send(node, free)
        for o in (held, free):
            reports.wait_for(lambda ev, o=o: ev.run_id == o.run_id and ev.state == "started")
        assert coordination.trouble, "the worker did not ask to hear of session trouble"
        for suspended, _lost in coordination.trouble:
            suspended()
        ev = reports.finished(held.run_id)
        assert ev.state == "failed" and "ZooKeeper session" in (ev.error or ""), ev
        assert free.run_id in node._running, "a run holding no run group was stopped too"
    finally:
        for run_id in list(node._running):
            node.executor.cancel(run_id, "test over")
        node.stop(timeout=5)


def test_an_expired_session_stops_runs_holding_groups_at_once() -> None:
    coordination = TroubledCoordination()
    node, reports = _make(coordination=coordination)
    node.start()
    try:
        held = _order(node.node_id, "until_cancelled", groups=("g",))
        _send(node, held)
        reports.wait_for(lambda ev: ev.run_id == held.run_id and ev.state == "started")
        for _suspended, lost in coordination.trouble:  # no `suspended` first: lost at once
            lost()
        ev = reports.finished(held.run_id)
        assert ev.state == "failed" and "ZooKeeper session expired" in (ev.error or ""), ev
    finally:
        for run_id in list(node._running):
            node.executor.cancel(run_id, "test over")
        node.stop(timeout=5)


# -- end to end: the run group is free again -----------------------------------------------------

CATALOGUE = f"""
[system]
timezone = "UTC"
roles = ["Master"]

[[service]]
name = "Bad Metric"
kind = "cron"
cron = "* * * * * */2"
allowed_roles = ["Master"]
run_groups = ["g"]
utility = "{HERE}:nan_metric"
timeout = 5

[[service]]
name = "Neighbour"
kind = "cron"
cron = "* * * * * 1/2"
allowed_roles = ["Master"]
run_groups = ["g"]
utility = "workers.demo:noop"
timeout = 5
"""


def test_a_nan_metric_fails_its_run_and_frees_its_run_group_in_the_embedded_cluster() -> None:
    from protocol.catalogue import parse_catalogue
    from rota.embedded import Cluster, parse_nodes

    cluster = Cluster(parse_catalogue(CATALOGUE), SystemClock(), parse_nodes("m=Master"))
    cluster.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with cluster._finished_lock:
                done = list(cluster.finished)
            bad = [r for r in done if r.service == "Bad Metric" and r.finished_at]
            later = [r for r in done if r.service == "Neighbour" and r.state == "succeeded"
                     and bad and (r.started_at or 0) >= (bad[0].finished_at or 0)]
            if bad and len(later) >= 2:
                break
            time.sleep(0.2)
    finally:
        cluster.stop()
    assert bad, "the run with a NaN metric never finished"
    assert bad[0].state == "failed" and "nan" in (bad[0].error or ""), bad[0]
    assert len(later) >= 2, "the neighbour in run group g did not run after it"


# -- daemon controls sent in one turn are applied in the order they were sent ------------------


def _control(node: str, action: str, seq: int, issued_at: float) -> DaemonControl:
    return DaemonControl(control_id=uuid.uuid4().hex[:16], service="Calc", node=node,
                         action=action, epoch=1, issued_at=issued_at, seq=seq,
                         callable="workers.demo:ticker", params={"cycle": 0.01},
                         run_groups=["stats"])


def test_controls_of_one_turn_taken_out_of_order_cannot_undo_the_later_one(
    worker: tuple[WorkerNode, Reports],
) -> None:
    """A resume and a pause sent in one turn share `issued_at`; consumer threads may take
    them in either order. The pause was sent last: the daemon stays paused, and the pause is
    answered."""
    node, reports = worker
    t = time.time()
    node._on_control(_control(node.node_id, "start", 1, t))
    reports.wait_for(lambda ev: ev.service == "Calc" and ev.state == "started")
    node._on_control(_control(node.node_id, "pause", 2, t + 1))
    reports.wait_for(lambda ev: ev.service == "Calc" and ev.state == "paused")
    pause = _control(node.node_id, "pause", 4, t + 2)
    node._on_control(pause)  # taken first, though sent after the resume below
    node._on_control(_control(node.node_id, "resume", 3, t + 2))
    node._on_control(pause)  # delivered twice
    time.sleep(0.3)
    states = [ev.state for ev in reports.events if ev.service == "Calc"]
    assert states == ["started", "paused", "paused"]
    assert node.daemons.status() == {"Calc": "paused"}


def test_a_batch_of_orders_runs_each_and_dead_letters_a_bad_element(
    worker: tuple[WorkerNode, Reports],
) -> None:
    """A leader turn's orders for one node in one `RunOrders` message: every valid order
    runs once; an element that is no valid order goes to the dead letters with its own bytes,
    naming its place in the batch."""
    import msgpack

    from protocol import DeadLetter, decode_as
    from protocol.batches import RUN_ORDERS, pack
    from protocol.transport import DEAD

    node, reports = worker
    letters: list[DeadLetter] = []
    node.transport.consume(DEAD, lambda d: (letters.append(decode_as(d.payload or b"",
                                                                      DeadLetter)), d.ack()))
    first, second = _order("n1", "until_cancelled", timeout=0.2), _order("n1", "nan_metric")
    bad = msgpack.packb({"t": "RunOrder", "v": 1, "run_id": "half an order"})
    node.transport.send(node.queue, pack(RUN_ORDERS, [encode(first), bad, encode(second),
                                                      encode(first)]))
    assert reports.finished(first.run_id).state == "timed_out"
    assert reports.finished(second.run_id).state == "failed"
    deadline = time.monotonic() + 5
    while not letters and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [(d.original, d.reason) for d in letters] == [(bad, "missing_field")]
    assert "RunOrders.orders[1]" in letters[0].detail
    time.sleep(0.3)
    assert sum(1 for ev in reports.events if ev.run_id == first.run_id
               and ev.state != "started") == 1, "the repeated order ran once"


def test_orders_go_as_one_batch_per_node_only_to_workers_that_take_batches() -> None:
    from coordinator.core.node import Node
    from coordinator.outbox import _order_bodies
    from protocol.batches import RUN_ORDERS, messages_of, takes_order_batches

    assert takes_order_batches("0.2.0") and takes_order_batches("1.0")
    assert not takes_order_batches("0.1.0") and not takes_order_batches("dev")
    new, old = _order("new", "nan_metric"), _order("old", "nan_metric")
    encoded = {"new": [encode(new)] * 3, "old": [encode(old)] * 2, "gone": [encode(old)]}
    nodes = {"new": Node("new", frozenset({"Master"}), 4, worker_node.VERSION),
             "old": Node("old", frozenset({"Master"}), 4, "0.1.0")}
    bodies = _order_bodies(encoded, nodes)
    assert [q for q, _ in bodies] == ["rota.node.new", "rota.node.old", "rota.node.old",
                                      "rota.node.gone"]
    assert messages_of(bodies[0][1], RUN_ORDERS) == [new] * 3
    assert [b for _, b in bodies[1:]] == [encode(old)] * 3


def test_a_utility_abandoned_after_its_timeout_ends_its_run_and_does_not_hold_up_stop() -> None:
    node, reports = _make()
    node.executor.grace = 0.2
    node.start()
    _RELEASE.clear()
    try:
        order = _order(node.node_id, "ignores_its_timeout", groups=("g",), timeout=0.2)
        _send(node, order)
        ev = reports.finished(order.run_id)
        assert ev.state == "timed_out" and "abandoned" in (ev.error or ""), ev
        assert not node._running, "the abandoned run still holds its run groups"
        t0 = time.monotonic()
        node.stop(timeout=5)
        assert time.monotonic() - t0 < 2.0, "stop waited for the abandoned utility"
    finally:
        _RELEASE.set()


def test_reports_wait_for_starts_in_progress_only_a_bounded_time(
    worker: tuple[WorkerNode, Reports],
) -> None:
    """The reporter lets runs being started start first, but never waits on them for long:
    a start that never completes (here: counted by hand) delays reports by at most
    STARTS_FIRST each."""
    node, reports = worker
    with node._starts:
        node._starting += 1
    try:
        order = _order(node.node_id, "nan_metric")
        t0 = time.monotonic()
        _send(node, order)
        reports.finished(order.run_id, timeout=5)
        assert time.monotonic() - t0 < 1.0
    finally:
        node._started_one()
    assert node._starting == 0, "every run begun was counted out once it started"
