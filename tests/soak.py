"""Soak: run a real cluster for a while under random faults, then audit everything.

    ops/soak --minutes 10

Starts private RabbitMQ and ZooKeeper on free loopback ports, three coordinators
and four workers as processes, and every few seconds injects a random fault: SIGKILL the
leader, SIGKILL a worker (restarted after its session expired), restart RabbitMQ or
ZooKeeper. At the end it audits rota.events and the workers' journals and prints one line:
slots due, runs, duplicates, silent misses, overlaps, stale orders executed, leader kills,
worker kills, restarts, failover p50/p99. Exits 1 if any guarantee was violated.

Test machinery, like the harness it drives: it lives beside the tests, outside the installed
packages, and runs from a checkout (`ops/soak` runs `python -m tests.soak`).
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from coordinator.audit import audit, audit_journal
from ops import localservers
from protocol.catalogue import load_catalogue
from tests.harness import Cluster, EventRecorder

ROOT = Path(__file__).resolve().parent.parent
CATALOGUE = ROOT / "tests" / "integration" / "catalogues" / "seconds.toml"
NODES = {
    "w-master": "Master",
    "w-master-2": "Master",
    "w-red": "Redundancy,Reporting",
    "w-proc": "Processing,Calculation",
}
COORDINATORS = ("coord-a", "coord-b", "coord-c")


def _pctl(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ops/soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--every", type=float, default=6.0,
                   help="mean seconds between faults (default 6)")
    p.add_argument("--keep", action="store_true",
                   help="keep the logs, journals and server files when the soak passes (a "
                   "failed soak always keeps them)")
    p.add_argument("--no-server-restarts", action="store_true",
                   help="only kill processes; never restart RabbitMQ or ZooKeeper")
    args = p.parse_args(argv)
    # SIGTERM ends the soak as Ctrl-C does: every process and server it started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rnd = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="rota-soak-"))
    print(f"soak: seed {seed}, {args.minutes:g} min, logs in {work}", flush=True)
    # Clear of the ports ops/test and the test suite start from, in case they run meanwhile.
    amqp_base, zk_base = localservers.default_ports()
    amqp_port, zk_port = localservers.find_free_ports(
        amqp_base + 4 * localservers.RABBITMQ_PORT_SPAN, zk_base + 40
    )
    servers = localservers.start(work / "servers", amqp_port, zk_port)
    vhost = f"soak-{uuid.uuid4().hex[:6]}"
    localservers.add_vhost(servers, vhost)
    amqp = servers.amqp_url.rstrip("/") + "/" + vhost
    zk = f"{servers.zk_hosts}/soak-{uuid.uuid4().hex[:6]}"
    from kazoo.client import KazooClient

    client = KazooClient(hosts=servers.zk_hosts)
    client.start(10)
    client.ensure_path("/" + zk.split("/", 1)[1])
    client.stop()
    client.close()

    cluster = Cluster(amqp, zk, CATALOGUE, work)
    rec = EventRecorder(amqp).start()
    counts = {"leader kills": 0, "worker kills": 0, "restarts": 0}
    failovers: list[float] = []
    absent: dict[str, list[tuple[float, float]]] = {}
    passed = False
    try:
        for node, roles in NODES.items():
            cluster.worker(node, roles)
        for name in COORDINATORS:
            cluster.coordinator(name)
            time.sleep(0.5)
        if rec.wait_for(lambda r: r.state == "succeeded", 30) is None:
            print("soak: the cluster never ran anything\n" + cluster.logs())
            return 1
        t0 = time.time()
        end = t0 + args.minutes * 60
        while time.time() < end:
            time.sleep(rnd.expovariate(1.0 / args.every))
            fault = rnd.choices(
                ["leader", "worker", "rabbitmq", "zookeeper"],
                weights=[5, 3, 0 if args.no_server_restarts else 1,
                         0 if args.no_server_restarts else 1],
            )[0]
            if fault == "leader":
                leader = cluster.leader()
                if not leader or leader not in cluster.procs:
                    continue
                old = max((r.epoch for r in rec.snapshot()), default=0)
                killed = time.time()
                cluster.procs[leader].kill()
                counts["leader kills"] += 1
                got = rec.wait_for(lambda r, e=old: r.epoch > e, 30)
                if got is not None:
                    failovers.append(time.time() - killed)
                cluster.coordinator(leader)
            elif fault == "worker":
                node = rnd.choice(list(NODES))
                down = time.time()
                cluster.procs[node].kill()
                counts["worker kills"] += 1
                time.sleep(3.0)  # its session expires; the leader marks its runs lost
                cluster.worker(node, NODES[node])
                absent.setdefault(node, []).append((down - 1.0, time.time() + 2.0))
            else:
                down = time.time()
                if fault == "rabbitmq":
                    localservers.restart_rabbitmq(servers)
                else:
                    localservers.restart_zookeeper(servers)
                counts["restarts"] += 1
                # Events published while the broker was away may not reach the recorder:
                # that window is judged by the workers' journals only.
                absent.setdefault("*", []).append((down - 2.0, time.time() + 10.0))
            elapsed = time.time() - t0
            print(f"soak: {elapsed / 60:5.1f} min  {fault:9}  "
                  + "  ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
        time.sleep(10)
        t1 = time.time()
        report = _audit(rec, cluster, t0, t1, absent)
        print(f"soak: {len(rec.snapshot())} events recorded, {len(cluster.journal())} journal "
              "entries", flush=True)
        print(
            f"slots due {report.slots_due}, runs {report.runs}, duplicates {report.duplicates}, "
            f"silent misses {report.silent_misses}, overlaps {report.overlaps}, "
            f"stale orders executed {report.stale_epoch}, "
            + ", ".join(f"{k} {v}" for k, v in counts.items())
            + f", failover p50 {_pctl(failovers, 0.5):.2f}s p99 {_pctl(failovers, 0.99):.2f}s"
            + (f" (median {statistics.median(failovers):.2f}s)" if failovers else ""),
            flush=True,
        )
        for v in report.violations[:30]:
            print("  violation:", v)
        passed = not report.violations
        return 0 if passed else 1
    finally:
        cluster.close()
        rec.stop()
        localservers.stop(work / "servers")
        if passed and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"soak: logs, journals and server files kept in {work}", flush=True)


def _audit(rec, cluster, t0: float, t1: float, absent):  # type: ignore[no-untyped-def]
    """Audit the event history outside broker outages, and the journals over everything."""
    broker_out = absent.pop("*", [])
    records = rec.finals(end=t1)
    cat = load_catalogue(CATALOGUE)
    roles = {n: r.split(",") for n, r in NODES.items()}
    windows = [(t0, t1 - 5)]
    for a, b in sorted(broker_out):
        windows = [w for (s, e) in windows for w in ((s, min(e, a)), (max(s, b), e)) if w[0] < w[1]]
    report = None
    for s, e in windows:
        if e - s < 5:
            continue
        part = audit(records, cat, roles, start=s, settled=e, absent=absent)
        if report is None:
            report = part
        else:
            report.slots_due += part.slots_due
            report.duplicates += part.duplicates
            report.silent_misses += part.silent_misses
            report.overlaps += part.overlaps
            report.wrong_role += part.wrong_role
            report.violations += part.violations
    assert report is not None
    report.runs = sum(1 for r in records if r.state in ("succeeded", "failed", "timed_out")
                      and r.trigger != "daemon")
    return audit_journal(cluster.journal(), report)


if __name__ == "__main__":
    sys.exit(main())
