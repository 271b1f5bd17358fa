"""The leader process around the engine, on the in-memory broker and coordination."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from coordinator import metrics
from coordinator.adapters.events import MemoryEventBus
from coordinator.leader import Coordinator, LeaderOptions
from protocol import DeadLetter, NodeAnnouncement, RunEvent, decode_as, encode, transport
from protocol.catalogue import Catalogue
from protocol.clock import SystemClock
from protocol.coordination import MemoryCoordination
from protocol.schedule import Periodic
from tests.unit.engine_harness import service

CATALOGUE = Catalogue(
    timezone="UTC", roles=("Master",),
    services={"Mail Manager": service("Mail Manager", Periodic(60))},
)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


class Running:
    def __init__(self, coordination: MemoryCoordination) -> None:
        self.broker = transport.make_broker(None)
        self.coordination = coordination
        self.coordinator = Coordinator(
            "c1", CATALOGUE, coordination, self.broker, MemoryEventBus(), SystemClock(),
            options=LeaderOptions(idle_wait=0.05),
        )
        self.thread = threading.Thread(target=self.coordinator.run, daemon=True)

    def dead_letters(self) -> list[DeadLetter]:
        q = self.broker.queues.get(transport.DEAD)  # type: ignore[attr-defined]
        if q is None:
            return []
        return [decode_as(transport.payload_of(transport_message(m)), DeadLetter)
                for m in list(q.queue)]


def transport_message(raw: bytes):  # type: ignore[no-untyped-def]
    import dramatiq

    return dramatiq.Message.decode(raw)


@pytest.fixture
def running() -> Iterator[Callable[[MemoryCoordination], Running]]:
    started: list[Running] = []

    def start(coordination: MemoryCoordination) -> Running:
        r = Running(coordination)
        r.thread.start()
        started.append(r)
        return r

    yield start
    for r in started:
        r.coordinator.stop()
        r.thread.join(5)
        assert not r.thread.is_alive()


def test_a_leader_that_cannot_decode_the_ledger_backs_off_and_names_the_key(
    running: Callable[[MemoryCoordination], Running], caplog: pytest.LogCaptureFixture,
) -> None:
    coordination = MemoryCoordination()
    coordination.store.ledger["run/broken%2Frun"] = b"\xc1 not a ledger value"
    caplog.set_level(logging.INFO, logger="rota.leader")
    r = running(coordination)
    time.sleep(1.6)
    attempts = coordination.store.epoch  # one epoch per term won
    assert attempts <= 4, f"{attempts} terms in 1.6 s: no back-off"
    assert attempts >= 2, "the leader contends again after its pause"
    assert "run/broken%2Frun" in caplog.text
    assert not r.coordinator.leading.is_set()


def _label_values(metric: Any) -> set[str]:
    """Every label value of every series a metric has."""
    return {v for fam in metric.collect() for sample in fam.samples
            for v in sample.labels.values()}


def test_a_forged_finished_event_for_an_unknown_run_is_dead_lettered_and_not_counted(
    running: Callable[[MemoryCoordination], Running],
) -> None:
    r = running(MemoryCoordination())
    assert r.coordinator.leading.wait(10)
    label, node = "Forged Service", "forged-node"
    forged = RunEvent(run_id="forged-1", service=label, node=node, state="succeeded",
                      at=time.time(), epoch=1, started_at=time.time() - 1,
                      finished_at=time.time())
    crash = RunEvent(run_id=f"daemon:{label}@{node}", service=label, node=node,
                     state="exited", at=time.time(), epoch=1, error="boom")
    transport.send(r.broker, transport.RESULTS, encode(forged))
    transport.send(r.broker, transport.RESULTS, encode(crash))
    wait_for(lambda: bool(r.dead_letters()))
    time.sleep(0.2)  # the daemon report is taken in the same or the next turn
    (dead,) = r.dead_letters()
    assert dead.source == transport.RESULTS and dead.reason == "refused"
    assert "unknown run 'forged-1'" in dead.detail
    # Labels stay bounded: neither the forged service nor the forged node became a series.
    for metric in (metrics.RUNS, metrics.SERVICE_LATENESS, metrics.SERVICE_DURATION,
                   metrics.DAEMON_EXITS):
        assert not {label, node} & _label_values(metric), metric


def test_the_leader_publishes_a_snapshot_each_turn_and_none_after_its_term(
    running: Callable[[MemoryCoordination], Running],
) -> None:
    r = running(MemoryCoordination())
    assert r.coordinator.leading.wait(10)
    wait_for(lambda: r.coordinator.snapshot() is not None)
    snap = r.coordinator.snapshot()
    assert snap is not None and [row.name for row in snap.rows] == ["Mail Manager"]
    assert snap.epoch == r.coordination.store.epoch
    r.coordinator.stop()
    r.thread.join(5)
    assert r.coordinator.snapshot() is None


def test_a_catalogue_reloaded_while_following_is_used_when_leading() -> None:
    r = Running(MemoryCoordination())
    bigger = Catalogue(timezone="UTC", roles=("Master",), services={
        **CATALOGUE.services, "Cache Manager": service("Cache Manager", Periodic(5))})
    r.coordinator.reload(bigger)
    r.thread.start()
    try:
        wait_for(lambda: r.coordinator.snapshot() is not None)
        snap = r.coordinator.snapshot()
        assert snap is not None
        assert sorted(row.name for row in snap.rows) == ["Cache Manager", "Mail Manager"]
    finally:
        r.coordinator.stop()
        r.thread.join(5)


def test_what_a_turn_changed_shows_in_the_snapshot_without_an_operator_asking(
    running: Callable[[MemoryCoordination], Running],
) -> None:
    """The snapshot is rebuilt lazily while turns come often; a change that no operator's
    request waits for (here a node coming up) still shows within a few turns, and the turns
    after it, which change nothing, rebuild nothing more."""
    coordination = MemoryCoordination()
    r = running(coordination)
    assert r.coordinator.leading.wait(10)
    wait_for(lambda: r.coordinator.snapshot() is not None)
    before = r.coordinator.snapshot()
    assert before is not None and before.nodes == ()
    asked = time.monotonic()
    coordination.handle().announce("n1", encode(NodeAnnouncement(
        node="n1", roles=["Master"], capacity=4, version="test", started_at=time.time(),
        incarnation="s1")))

    def shows_it() -> bool:
        snap = r.coordinator.snapshot()
        return snap is not None and [n.id for n in snap.nodes] == ["n1"]

    wait_for(shows_it, timeout=2.0)
    shown = r.coordinator.snapshot()
    assert time.monotonic() - asked < 1.0, "shown within SNAPSHOT_EVERY and an idle wait"
    time.sleep(0.3)  # idle turns change nothing
    assert r.coordinator.snapshot() is shown
