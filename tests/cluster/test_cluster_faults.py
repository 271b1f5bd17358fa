"""Rota on a 3-server ZooKeeper ensemble and a 3-node RabbitMQ cluster, one member lost.

Each test runs two coordinators and three workers (separate processes) on the second-level
test catalogue (the shipped one's shapes: run groups, a daemon with run groups, `all`
placement) plus 1,000 services due at one instant, and SIGKILLs a server as the burst's first
orders show on `rota.events`: the ensemble's leader, a follower, or the RabbitMQ node that
holds the most queue leaders. Then every burst slot must end with exactly one final record,
run groups never overlap and nothing runs on a node without an allowed role (the audit reads
`rota.events` and the workers' own journals). The time from the kill to the next order seen
is printed.

The last test takes the ensemble's quorum away (two of three servers killed): the leader must
stop ordering (its term fenced) and order again once a second server is back.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.audit import audit, audit_journal
from ops import localcluster
from protocol.catalogue import load_catalogue
from tests.harness import (
    SECONDS_CATALOGUE,
    THREE_NODES,
    THREE_NODES_ROLES,
    BurstCluster,
    Cluster,
    EventRecorder,
    burst_catalogue,
    burst_names,
    settle_burst,
)

LEAD = 40.0
"""Seconds from writing the catalogue to the burst's slot: room for the cluster to come up."""
SETTLE = 120.0
"""Seconds allowed after the slot for every burst slot's final record."""
ORDERED = ("dispatched", "running", "succeeded")


LEAD_TIME = 1.5
"""The coordinators' default lead time: an order leaves this long before its slot."""


def _next_order_after(rec: EventRecorder, seen: int, timeout: float) -> float | None:
    """When the first order recorded after the first `seen` records arrived."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stamped = rec.stamped()
        for at, r in stamped[seen:]:
            if r.state in ORDERED:
                return at
        time.sleep(0.01)
    return None


def _first_order_sent_after(rec: EventRecorder, killed_at: float, skip: set[str],
                            timeout: float) -> tuple[float, float] | None:
    """The first order that can only have been sent after `killed_at` (its slot is more
    than the lead time later; services in `skip` aside): when its record arrived, and how
    late that was against the instant it was due to leave (slot - lead time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for at, r in rec.stamped():
            if (r.state in ORDERED and r.service not in skip and r.slot is not None
                    and r.slot - LEAD_TIME > killed_at):
                return at, at - (r.slot - LEAD_TIME)
        time.sleep(0.01)
    return None


def _burst_with_a_kill(amqp_url: str, zk_hosts: str, tmp_path: Path,
                       kill: Callable[[], str]) -> None:
    slot = float(int(time.time() + LEAD))
    catalogue = burst_catalogue(tmp_path / "burst.toml", slot,
                                SECONDS_CATALOGUE.read_text(encoding="utf-8"))
    names = burst_names()
    c = BurstCluster(amqp_url, zk_hosts, catalogue, tmp_path)
    rec = EventRecorder(amqp_url).start()
    try:
        for node, roles in THREE_NODES.items():
            c.worker(node, roles)
        for name in ("coord-a", "coord-b"):
            c.coordinator(name)
        c.wait_leader(timeout=LEAD - 5)
        assert rec.wait_for(lambda r: r.service == "Tick" and r.state == "succeeded",
                            max(1.0, slot - 3 - time.time())) is not None, c.logs()
        t0 = time.time()
        assert t0 < slot - 1, f"the cluster came up only {slot - t0:.1f} s before the burst"
        deadline = time.monotonic() + slot + 20 - time.time()
        while not any(r.service in names for r in rec.snapshot()):
            assert time.monotonic() < deadline, f"no order of the burst seen\n{c.logs()}"
            time.sleep(0.005)
        seen = len(rec.stamped())
        killed_at = time.time()
        what = kill()
        next_order = _next_order_after(rec, seen, 60)
        assert next_order is not None, f"no order after {what} was killed\n{c.logs()}"
        sent = _first_order_sent_after(rec, killed_at, names, 60)
        assert sent is not None, f"no order sent after {what} was killed\n{c.logs()}"
        out = settle_burst(rec, c, names, start=t0, until=slot + SETTLE, after=6)
        print(f"\n[cluster] {what} SIGKILLed {killed_at - slot:+.2f} s from the burst's slot; "
              f"kill -> next order seen {max(0.0, next_order - killed_at):.2f} s, first order "
              f"sent after the kill seen {sent[0] - killed_at:.2f} s after it ({sent[1]:+.2f} s "
              f"from its due instant); burst runs by final state: "
              f"{dict(sorted(out.states.items()))}")
        print("[cluster] audit:", out.report.line())
        out.check(names, c.logs(), SETTLE)
    finally:
        c.close()
        rec.stop()


@pytest.mark.slow
def test_the_ensembles_leader_killed_mid_burst(
    cluster: localcluster.LocalCluster, amqp_url: str, zk_hosts: str, tmp_path: Path
) -> None:
    def kill() -> str:
        leader = localcluster.zk_leader(cluster)
        assert leader is not None, "the ensemble has no leader"
        localcluster.kill_zk(cluster, leader)
        return f"ZooKeeper server {leader} (the ensemble's leader)"

    _burst_with_a_kill(amqp_url, zk_hosts, tmp_path, kill)


@pytest.mark.slow
def test_a_zookeeper_follower_killed_mid_burst(
    cluster: localcluster.LocalCluster, amqp_url: str, zk_hosts: str, tmp_path: Path
) -> None:
    def kill() -> str:
        leader = localcluster.zk_leader(cluster)
        follower = next(n for n in (1, 2, 3) if n != leader)
        localcluster.kill_zk(cluster, follower)
        return f"ZooKeeper server {follower} (a follower)"

    _burst_with_a_kill(amqp_url, zk_hosts, tmp_path, kill)


@pytest.mark.slow
def test_the_rabbitmq_node_holding_the_queue_leaders_killed_mid_burst(
    cluster: localcluster.LocalCluster, vhost: str, amqp_url: str, zk_hosts: str,
    tmp_path: Path
) -> None:
    def kill() -> str:
        leaders = localcluster.queue_leaders(cluster, vhost)
        rota = {q: n for q, n in leaders.items() if q.startswith("rota.")}
        assert rota, f"no Rota queue with a leader in {leaders}"
        node, count = Counter(rota.values()).most_common(1)[0]
        localcluster.kill_rabbit(cluster, node)
        return f"RabbitMQ node {node} (leader of {count} of Rota's {len(rota)} queues)"

    _burst_with_a_kill(amqp_url, zk_hosts, tmp_path, kill)


@pytest.mark.slow
def test_quorum_lost_stops_orders_and_they_resume_when_it_is_back(
    cluster: localcluster.LocalCluster, amqp_url: str, zk_hosts: str, tmp_path: Path
) -> None:
    c = Cluster(amqp_url, zk_hosts, SECONDS_CATALOGUE, tmp_path)
    rec = EventRecorder(amqp_url).start()
    killed: list[int] = []
    try:
        for node, roles in THREE_NODES.items():
            c.worker(node, roles)
        for name in ("coord-a", "coord-b"):
            c.coordinator(name)
        c.wait_leader(timeout=40)
        assert rec.wait_for(lambda r: r.service == "Tick" and r.state == "succeeded",
                            30) is not None, c.logs()
        t0 = time.time()
        leader = localcluster.zk_leader(cluster)
        killed = [n for n in (1, 2, 3) if n != leader]
        for n in killed:
            localcluster.kill_zk(cluster, n)
        lost_at = time.time()
        time.sleep(12)
        # Orders already on their way when quorum went may still be reported; a new one
        # may not be sent once the leader's term is fenced (its deadline, plus the lead time
        # of an order sent just before, plus the time to publish what was committed).
        quiet_from = lost_at + 5.0
        seen = len(rec.stamped())
        during = [(at, r) for at, r in rec.stamped()
                  if at >= quiet_from and r.state == "dispatched"]
        localcluster.start_zk(cluster, killed[0])
        back_at = time.time()
        next_order = _next_order_after(rec, seen, 60)
        assert next_order is not None, f"no order after quorum came back\n{c.logs()}"
        time.sleep(8)
        t1 = time.time()
        finals = rec.finals(end=t1)
        report = audit(finals, load_catalogue(SECONDS_CATALOGUE), THREE_NODES_ROLES,
                       start=t0, settled=t1 - 5)
        audit_journal(c.journal(), report)
        print(f"\n[cluster] quorum lost for {back_at - lost_at:.1f} s (servers {killed} "
              f"killed); orders sent while it was lost (from 5 s on): {len(during)}; quorum "
              f"back -> next order seen {max(0.0, next_order - back_at):.2f} s")
        print("[cluster] audit:", report.line())
        assert not during, f"orders sent without a quorum: {[r for _, r in during][:5]}"
        assert not report.violations, "\n".join(report.violations[:25]) + "\n" + c.logs()
    finally:
        c.close()
        rec.stop()
