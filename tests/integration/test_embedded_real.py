"""`rota up --zk --amqp`: the all-in-one process on real ZooKeeper and RabbitMQ."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from coordinator.audit import audit
from protocol import RunRecord
from protocol.catalogue import load_catalogue
from protocol.clock import SystemClock
from rota.embedded import Cluster, parse_nodes

CATALOGUE = Path(__file__).parent / "catalogues" / "seconds.toml"
NODES = "w-master=Master;w-red=Redundancy,Reporting;w-proc=Processing,Calculation"


def test_embedded_cluster_on_real_servers(amqp_url: str, zk_hosts: str) -> None:
    cat = load_catalogue(CATALOGUE)
    cluster = Cluster(cat, SystemClock(), parse_nodes(NODES), amqp_url=amqp_url,
                      zk_hosts=zk_hosts).start(wait=20)
    t0 = time.time()
    try:
        time.sleep(12)
    finally:
        t1 = time.time()
        cluster.stop()
    records: list[RunRecord] = list(cluster.finished)
    roles = {s.id: list(s.roles) for s in parse_nodes(NODES)}
    report = audit(records, cat, roles, start=t0 + 1, settled=t1 - 3)
    assert report.slots_due > 8
    assert not report.violations, "\n".join(report.violations[:20])


def test_rota_up_cli_on_real_servers(amqp_url: str, zk_hosts: str, tmp_path: Path) -> None:
    history = tmp_path / "h.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "rota.cli", "up", "--zk", zk_hosts, "--amqp", amqp_url,
         "--catalogue", str(CATALOGUE), "--nodes", NODES, "--for", "8",
         "--history", str(history)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "RabbitMQ + ZooKeeper" in proc.stdout
    lines = history.read_text().splitlines()
    assert len(lines) > 10
    assert any('"service": "Tick"' in ln and '"succeeded"' in ln for ln in lines)
