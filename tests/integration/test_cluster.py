"""The real cluster: two coordinators and three workers as processes on real servers.

Everything is observed from the outside, on `rota.events`: which slot ran, where, when.
"""

from __future__ import annotations

import time
import uuid

from coordinator.audit import audit
from protocol import RunOrder, encode, transport
from protocol.catalogue import load_catalogue
from tests.harness import SECONDS_CATALOGUE, THREE_NODES, Cluster

CATALOGUE = SECONDS_CATALOGUE
NODES = THREE_NODES


def _start(c: Cluster) -> None:
    for node, roles in NODES.items():
        c.worker(node, roles)
    c.coordinator("coord-a")
    time.sleep(1.0)
    c.coordinator("coord-b")


def _node_roles() -> dict[str, list[str]]:
    return {n: r.split(",") for n, r in NODES.items()}


def test_two_coordinators_three_workers_run_every_slot_once(cluster) -> None:  # type: ignore[no-untyped-def]
    c, rec = cluster
    _start(c)
    leader = c.wait_leader()
    first = rec.wait_for(lambda r: r.state == "succeeded", 20)
    assert first is not None, c.logs()
    t0 = time.time()
    time.sleep(20)

    # A graceful stop of the leader hands over without a missed or repeated slot.
    c.procs[leader].stop()
    successor = c.wait_leader(not_=leader)
    assert successor != leader
    time.sleep(15)
    t1 = time.time()
    finals = rec.finals(end=t1)
    report = audit(finals, load_catalogue(CATALOGUE), _node_roles(), start=t0, settled=t1 - 5)
    assert report.slots_due > 40
    assert not report.violations, "\n".join(report.violations[:20]) + "\n" + c.logs()

    # Runs went only to allowed roles, and `all` placement reached every eligible node.
    every = {r.node for r in finals if r.service == "Everywhere" and r.state == "succeeded"}
    assert every == {"w-master", "w-red", "w-proc"}
    tick = {r.node for r in finals if r.service == "Tick" and r.state == "succeeded"}
    assert tick <= {"w-master", "w-proc"} and tick

    # Daemons ran on each allowed node; the Calculator paused for stats runs and resumed.
    radius = {r.node for r in finals if r.service == "RADIUS Server"}
    assert radius == {"w-master", "w-red", "w-proc"}
    calc = [r for r in finals if r.service == "Calculator"]
    assert {r.node for r in calc} == {"w-master", "w-proc"}
    assert any(r.reason == "paused" for r in calc)
    assert sum(1 for r in calc if r.node == "w-master") >= 2

    # Both leaders' epochs appear, the successor's being newer.
    epochs = sorted({r.epoch for r in finals if r.trigger == "scheduled"})
    assert len(epochs) >= 2 and epochs == sorted(epochs)


def test_worker_rejects_stale_epoch_and_late_orders(cluster, amqp_url: str) -> None:  # type: ignore[no-untyped-def]
    c, rec = cluster
    _start(c)
    c.wait_leader()
    assert rec.wait_for(lambda r: r.state == "succeeded", 20) is not None, c.logs()
    broker = transport.make_broker(amqp_url)
    now = time.time()

    def order(run_id: str, epoch: int, deadline: float) -> bytes:
        return encode(RunOrder(
            run_id=run_id, service="Tick", node="w-master", trigger="manual", slot=None,
            epoch=epoch, issued_at=min(now, deadline), deadline=deadline, timeout=5,
            callable="workers.demo:noop", allowed_roles=["Master"],
        ))

    stale, late = f"stale-{uuid.uuid4().hex[:6]}", f"late-{uuid.uuid4().hex[:6]}"
    current = max(r.epoch for r in rec.snapshot())
    transport.send(broker, transport.node_queue("w-master"), order(stale, 0, now + 60))
    transport.send(broker, transport.node_queue("w-master"), order(late, current, now - 5))
    broker.close()
    got_stale = rec.wait_for(lambda r: r.run_id == stale and r.state == "rejected", 10)
    got_late = rec.wait_for(lambda r: r.run_id == late and r.state == "rejected", 10)
    assert got_stale is not None and "stale epoch 0" in (got_stale.reason or ""), c.logs()
    assert got_late is not None and "deadline" in (got_late.reason or ""), c.logs()
    assert not any(r.run_id in (stale, late) and r.state in ("running", "succeeded")
                   for r in rec.snapshot())
