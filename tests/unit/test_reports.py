"""A run that ends before its `started` report was sent is reported once, and the leader takes
that single final report for both its start and its end."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence

import pytest

from coordinator.adapters.events import MemoryEventBus
from coordinator.leader import Coordinator, LeaderOptions
from protocol import RunEvent, RunOrder, RunRecord, encode
from protocol.batches import RUN_EVENTS, messages_of
from protocol.catalogue import Catalogue
from protocol.clock import SystemClock
from protocol.coordination import MemoryCoordination
from protocol.run_records import records_of
from protocol.schedule import Periodic
from protocol.service import Utility
from protocol.transport import RESULTS, Batch, make_transport
from tests.unit.engine_harness import service
from workers import node as worker_node
from workers.node import WorkerNode


class ResultsSpy:
    """Every run event put on `rota.results` through `transport.publish`."""

    def __init__(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.events: list[RunEvent] = []
        self._lock = threading.Lock()
        real_prepare, real_publish = transport.prepare, transport.publish

        def prepare(items: Sequence[tuple[str, bytes]]) -> Batch:
            with self._lock:
                self.events += [ev for q, p in items if q == RESULTS
                                for ev in messages_of(p, RUN_EVENTS)]
            return real_prepare([(q, p) for q, p in items])

        def publish(items: Sequence[tuple[str, bytes]] | Batch) -> None:
            real_publish(items if isinstance(items, Batch) else prepare(items))

        transport.prepare, transport.publish = prepare, publish

    def of(self, run_id: str) -> list[RunEvent]:
        with self._lock:
            return [ev for ev in self.events if ev.run_id == run_id]


def _wait(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_a_run_that_ends_before_its_started_report_is_sent_is_reported_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_node, "REPORT_LINGER", 1.0)  # long enough for any no-op run
    transport = make_transport(None)
    spy = ResultsSpy(transport)
    node = WorkerNode("n1", ["Master"], transport, MemoryCoordination(), SystemClock()).start()
    try:
        now = time.time()
        order = RunOrder(run_id=uuid.uuid4().hex, service="Svc", node="n1",
                         trigger="scheduled", slot=now, epoch=1, issued_at=now,
                         deadline=now + 60, timeout=10.0, callable="workers.demo:noop")
        transport.send(node.queue, encode(order))
        _wait(lambda: bool(spy.of(order.run_id)))
        time.sleep(0.3)  # a second report, if any, would be on its way
        (only,) = spy.of(order.run_id)
        assert only.state == "succeeded"
        assert only.started_at is not None and only.finished_at is not None
        assert now <= only.started_at <= only.finished_at
    finally:
        node.stop(timeout=5)


def test_a_run_still_running_when_its_started_report_goes_is_reported_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_node, "REPORT_LINGER", 0.0)
    transport = make_transport(None)
    spy = ResultsSpy(transport)
    node = WorkerNode("n1", ["Master"], transport, MemoryCoordination(), SystemClock()).start()
    release = threading.Event()
    try:
        now = time.time()
        order = RunOrder(run_id=uuid.uuid4().hex, service="Svc", node="n1",
                         trigger="scheduled", slot=now, epoch=1, issued_at=now,
                         deadline=now + 60, timeout=10.0,
                         callable="tests.unit.test_reports:wait_for_release")
        RELEASES[order.run_id] = release
        transport.send(node.queue, encode(order))
        _wait(lambda: bool(spy.of(order.run_id)))
        release.set()
        _wait(lambda: len(spy.of(order.run_id)) == 2)
        started, finished = spy.of(order.run_id)
        assert (started.state, finished.state) == ("started", "succeeded")
        assert finished.started_at == started.started_at
    finally:
        release.set()
        node.stop(timeout=5)


RELEASES: dict[str, threading.Event] = {}


def wait_for_release(ctx) -> None:  # type: ignore[no-untyped-def]
    RELEASES[ctx.run_id].wait(10)


def test_the_leader_takes_one_final_report_for_the_start_and_end_of_a_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_node, "REPORT_LINGER", 1.0)
    transport = make_transport(None)
    spy = ResultsSpy(transport)
    coordination = MemoryCoordination()
    catalogue = Catalogue(timezone="UTC", roles=("Master",), services={
        "Noop": service("Noop", Periodic(60), utility=Utility(callable="workers.demo:noop"))})
    history: list[RunRecord] = []
    events = MemoryEventBus()
    records: list[RunRecord] = []
    events.subscribe("run.*", lambda _key, body: records.extend(records_of(body)))
    coordinator = Coordinator("c1", catalogue, coordination, transport, events, SystemClock(),
                              options=LeaderOptions(idle_wait=0.05),
                              history_sinks=[history.append])
    node = WorkerNode("n1", ["Master"], transport, coordination, SystemClock()).start()
    leader = threading.Thread(target=coordinator.run, daemon=True)
    leader.start()
    try:
        assert coordinator.leading.wait(10)
        _wait(lambda: coordinator.snapshot() is not None)
        coordinator.request_manual_run("Noop")
        _wait(lambda: any(r.trigger == "manual" for r in history))
        (rec,) = [r for r in history if r.trigger == "manual"]
        (report,) = spy.of(rec.run_id)
        assert report.state == "succeeded"
        assert rec.state == "succeeded"
        assert rec.started_at == report.started_at and rec.finished_at == report.finished_at
        assert rec.started_at is not None and rec.finished_at is not None
        assert rec.queued_at <= rec.started_at <= rec.finished_at
        states = [r.state for r in records if r.run_id == rec.run_id]
        assert states == ["dispatched", "succeeded"], states
    finally:
        coordinator.stop()
        leader.join(5)
        node.stop(timeout=5)
