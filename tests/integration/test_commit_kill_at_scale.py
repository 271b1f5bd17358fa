"""A leader SIGKILLed in the middle of a ledger commit, with 100,000 services in the catalogue.

Real servers and processes. The catalogue holds 99,000 services due once a day (none while
the test runs) and 1,000 due at one instant. Two places in a commit:

- `in-delta`: the first leader's first commit, which gives all 100,000 services a cursor, is a
  delta in several parts; the leader is killed after the first part. The successor must load
  the ledger as before that commit (the incomplete delta ignored, then deleted), make the
  commit again itself, and run the burst.
- `in-flight`: the commit that orders the burst's 1,000 runs (one transaction) is sent and the
  leader is killed before it reads the reply; ZooKeeper may have applied it or not, and no
  order of it was published. The successor must run every slot of the burst exactly once.

Either way every slot of the burst ends with exactly one final record, run groups never
overlap, nothing runs on a node without an allowed role and no stale order is executed (the
audit reads `rota.events` and the workers' journals).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from kazoo.client import KazooClient

from protocol.zk import DELTAS, EPOCH
from tests.harness import (
    BURST,
    THREE_NODES,
    BurstCluster,
    EventRecorder,
    burst_catalogue,
    burst_names,
    settle_burst,
)

SERVICES = 100_000
HEAD = "\n".join([
    "[system]", 'timezone = "UTC"',
    'roles = ["Master", "Redundancy", "Reporting", "Processing", "Calculation"]',
    "catch_up = 60", ""])
LEAD = 90.0
"""Seconds from writing the catalogue to the burst's slot: five processes parse 100,000
services (about 8 s each on one core) and two leaders take over."""
SETTLE = 90.0


def _daily(n: int, away_from: float) -> str:
    """`n` services due once a day, twelve hours from `away_from`: never due in the test."""
    hour = (time.gmtime(away_from).tm_hour + 12) % 24
    out = []
    for i in range(n):
        out += ["[[service]]", f'name = "day-{i:06d}"', 'kind = "cron"',
                f'cron = "{i % 60} {hour} * * * {(i // 60) % 60}"',
                'allowed_roles = ["Master"]', 'utility = "workers.demo:noop"', ""]
    return "\n".join(out)


def _deltas(zk_hosts: str) -> tuple[int, list[str]]:
    client = KazooClient(hosts=zk_hosts, timeout=10.0)
    client.start(timeout=20)
    try:
        version = client.get(EPOCH)[1].version
        names = sorted(client.get_children(DELTAS)) if client.exists(DELTAS) else []
        return version, names
    finally:
        client.stop()
        client.close()


def _of_epoch(names: list[str], epoch: int) -> list[str]:
    return [n for n in names if n.startswith(f"{epoch:010d}-")]


def _killed_at_fault(proc_log: Path, point: str) -> bool:
    return f"fault point {point} reached" in proc_log.read_text(errors="replace")


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("point", ["in-delta", "in-flight"])
def test_leader_sigkilled_mid_commit_at_100000_services(
    point: str, amqp_url: str, zk_hosts: str, tmp_path: Path
) -> None:
    slot = float(int(time.time() + LEAD))
    catalogue = burst_catalogue(tmp_path / "scale.toml", slot,
                                head=HEAD + _daily(SERVICES - BURST, slot))
    names = burst_names()
    c = BurstCluster(amqp_url, zk_hosts, catalogue, tmp_path)
    rec = EventRecorder(amqp_url).start()
    try:
        for node, roles in THREE_NODES.items():
            c.worker(node, roles)
        # The first leader alone, so that it is the one that reaches the fault point.
        c.env["ROTA_FAULT"] = f"{point}:1"
        first = c.coordinator("coord-a")
        c.env.pop("ROTA_FAULT")
        if point == "in-delta":
            first.popen.wait(LEAD - 30)  # killed by its first commit
            epoch, deltas = _deltas(zk_hosts)
            mine = _of_epoch(deltas, epoch)
            parts = {int(n.split("-")[3]) for n in mine}
            print(f"the first leader (epoch {epoch}) was killed with {len(mine)} part(s) of "
                  f"its delta written, of {sorted(parts)}")
            assert mine and all(p > len(mine) for p in parts), \
                f"not killed in the middle of a delta in parts: {deltas}\n{c.logs()}"
            c.coordinator("coord-b")
        else:
            c.wait_leader(timeout=LEAD - 30)
            c.coordinator("coord-b")
            first.popen.wait(max(1.0, slot + 10 - time.time()))
            epoch, _ = _deltas(zk_hosts)
        killed_at = time.time()
        assert first.popen.returncode == -9 and _killed_at_fault(first.log, point), \
            f"the first leader was not killed at {point}\n{c.logs()}"
        second = c.wait_leader(not_="coord-a", timeout=max(30.0, slot - time.time()))
        t0 = min(time.time(), slot - 1)
        out = settle_burst(rec, c, names, start=t0, until=slot + SETTLE, after=3, margin=2)
        by_epoch = Counter(r.epoch for r in out.records if r.service in names)
        print(f"leader killed {killed_at - slot:+.2f} s from the slot; successor {second}; "
              f"burst runs by final state {dict(sorted(out.states.items()))}, by the epoch on "
              f"their final record {dict(sorted(by_epoch.items()))}")
        if point == "in-flight":
            # Runs of the killed leader's epoch exist only if its commit was applied (it
            # published no order): the successor adopted them from the ledger.
            print("the commit in flight was " + ("applied: its runs were adopted"
                                                  if by_epoch.get(epoch) else "not applied"))
        print("audit:", out.report.line())
        out.check(names, c.logs(), SETTLE)
        assert out.states.get("succeeded", 0) == BURST, dict(out.states)
        _, deltas = _deltas(zk_hosts)
        assert not _of_epoch(deltas, epoch) or point == "in-flight", \
            f"the incomplete delta of epoch {epoch} is still there: {deltas}"
    finally:
        c.close()
        rec.stop()
