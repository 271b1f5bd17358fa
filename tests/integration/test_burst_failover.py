"""A leader SIGKILLed in the middle of a 1,000-slot burst, on real servers and processes.

1,000 services are due at the same instant; the leader is killed as soon as the burst's first
orders show on `rota.events`. The successor must resume from the ledger so that every slot of
the burst ends with exactly one final record (a run, or a slot recorded skipped, missed, lost or
expired with its reason), run groups never overlap and nothing runs on a node without an
allowed role. The audit reads both `rota.events` and the workers' own journals.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from coordinator.audit import NOT_RUN, RAN
from tests.harness import (
    THREE_NODES,
    BurstCluster,
    EventRecorder,
    burst_catalogue,
    burst_names,
    settle_burst,
)

LEAD = 30.0
"""Seconds from writing the catalogue to the burst's slot: room for the cluster to come up."""
SETTLE = 90.0
"""Seconds allowed after the slot for every burst slot's final record."""


@pytest.mark.slow
@pytest.mark.integration
def test_leader_sigkilled_mid_burst(amqp_url: str, zk_hosts: str, tmp_path: Path) -> None:
    slot = float(int(time.time() + LEAD))
    catalogue = burst_catalogue(tmp_path / "burst.toml", slot)
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
        # Asked before the burst: the kill follows its first order at once.
        leader = c.wait_leader(timeout=1)
        old_epoch = max(r.epoch for r in rec.snapshot())
        deadline = time.monotonic() + slot + 20 - time.time()
        while not any(r.service in names for r in rec.snapshot()):
            assert time.monotonic() < deadline, f"no order of the burst seen\n{c.logs()}"
            time.sleep(0.005)
        killed_at = time.time()
        c.procs[leader].kill()
        at_kill = [r for r in rec.snapshot() if r.service in names and r.epoch == old_epoch]
        ordered = len({r.run_id for r in at_kill})
        ended = len({r.run_id for r in at_kill if r.state in RAN | NOT_RUN})
        new = rec.wait_for(lambda r: r.epoch > old_epoch and r.state in
                           ("dispatched", "running", "succeeded"), 60)
        assert new is not None, f"no order from the successor\n{c.logs()}"
        failover = time.time() - killed_at
        # Every slot of the burst ends with a final record.
        out = settle_burst(rec, c, names, start=t0, until=slot + SETTLE, after=6)
        print(f"at the kill: {ordered} burst runs ordered, {ended} ended; leader {leader} killed "
              f"{killed_at - slot:+.2f} s from the slot; kill → successor's first order "
              f"{failover:.2f} s; burst runs by final state: {dict(sorted(out.states.items()))}")
        print("audit:", out.report.line())
        out.check(names, c.logs(), SETTLE)
    finally:
        c.close()
        rec.stop()
