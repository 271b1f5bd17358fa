"""What the cluster bench reads from outside the processes it measures.

Each probe uses a public surface only, so it works whatever the coordinator and workers do
inside: `/proc/<pid>` for CPU and memory, ZooKeeper's `srvr` four-letter word for its
transaction id, RabbitMQ's global counters through `rabbitmqctl eval` (on a RabbitMQ cluster,
every running node's, added up), a coordinator's Prometheus `/metrics` page, and the JSON
lines a worker writes with `--journal`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ops import localcluster, localservers

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- one process -------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB: resident now, and its peak so far."""
    rss = hwm = 0
    for text in Path(f"/proc/{pid}/status").read_text().splitlines():
        if text.startswith("VmRSS:"):
            rss = int(text.split()[1])
        elif text.startswith("VmHWM:"):
            hwm = int(text.split()[1])
    return rss, hwm


# -- ZooKeeper ---------------------------------------------------------------------------------
def zk_zxid(hosts: str, timeout: float = 5.0) -> int | None:
    """The server's last transaction id (`srvr` four-letter word), or None if it won't say.

    Every write transaction (create, set, delete, a whole multi-op, a session opened or
    closed) takes the next zxid, so the difference over a window counts them.
    """
    first = hosts.split("/", 1)[0].split(",")[0]
    host, _, port = first.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout) as s:
            s.sendall(b"srvr")
            chunks = []
            while chunk := s.recv(4096):
                chunks.append(chunk)
    except OSError:
        return None
    for text in b"".join(chunks).decode(errors="replace").splitlines():
        if text.startswith("Zxid:"):
            return int(text.split(":", 1)[1].strip(), 16)
    return None


def zk_version_sum(client: Any, root: str = "/") -> int | None:
    """Sum of every znode's data version and children version (cversion) under ``root``.

    A set bumps its znode's version, a create or delete its parent's cversion, inside a
    multi-op transaction as outside one; so the growth of this sum over a window counts the
    znode writes, except the sets on znodes deleted before the window ends: a lower bound.
    Reads level by level with pipelined calls on ``client`` (a started KazooClient, kept
    open so that its session adds no transaction to the window). None if ZooKeeper fails.
    """
    from kazoo.exceptions import NoNodeError

    total = 0
    level = [root]
    while level:
        pending = [(path, client.get_children_async(path, include_data=True))
                   for path in level]
        level = []
        for path, result in pending:
            try:
                children, stat = result.get(timeout=30)
            except NoNodeError:  # deleted meanwhile
                continue
            except Exception:
                return None
            total += stat.version + stat.cversion
            base = path.rstrip("/")
            level.extend(f"{base}/{c}" for c in children)
    return total


# -- RabbitMQ ----------------------------------------------------------------------------------
_RECEIVED = re.compile(r"messages_received_total\s*=>\s*(\d+)")
_DELIVERED = re.compile(r"messages_delivered_total\s*=>\s*(\d+)")


@dataclass(frozen=True)
class BrokerCounts:
    received: int  # messages published to the broker (all virtual hosts, all publishers)
    delivered: int  # messages delivered to consumers


Broker = localservers.Servers | localcluster.LocalCluster
"""A local broker this bench can reach with rabbitmqctl: one server, or a 3-node cluster."""

# Every running node's counters, from one rabbitmqctl call: a client publishes to the node it
# is connected to, and each node counts only what its own clients publish and consume.
_CLUSTER_OVERVIEW = "rpc:multicall([node() | nodes()], rabbit_global_counters, overview, [])."


def rabbit_counts(servers: Broker | None) -> BrokerCounts | None:
    """The broker's global message counters (RabbitMQ 3.9+, no management plugin needed); on
    a cluster, the sum over its running nodes.

    None when the broker is not a local one this bench can reach with rabbitmqctl.
    """
    if servers is None:
        return None
    try:
        if isinstance(servers, localcluster.LocalCluster):
            result = localcluster.rabbitmqctl(servers, "-q", "eval", _CLUSTER_OVERVIEW,
                                              timeout=30, check=False)
        else:
            result = localservers.rabbitmqctl(
                servers, "-q", "eval", "rabbit_global_counters:overview().", timeout=30,
                check=False
            )
    except (OSError, subprocess.SubprocessError, localservers.ServerError):
        return None
    if result.returncode != 0:
        return None
    received = [int(v) for v in _RECEIVED.findall(result.stdout)]
    delivered = [int(v) for v in _DELIVERED.findall(result.stdout)]
    if not received:
        return None
    return BrokerCounts(sum(received), sum(delivered))


# -- a coordinator's /metrics ------------------------------------------------------------------
def scrape(port: int, timeout: float = 5.0) -> dict[str, float]:
    """Sum of each metric family on a /metrics page (all label sets added up)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for raw in text.splitlines():
        if not raw or raw.startswith("#"):
            continue
        name_part, _, value = raw.rpartition(" ")
        name = name_part.split("{", 1)[0]
        with contextlib.suppress(ValueError):
            out[name] = out.get(name, 0.0) + float(value)
    return out


def ledger_families(metrics: dict[str, float]) -> dict[str, float]:
    """Counters a coordinator may export about its ledger or ZooKeeper writes."""
    return {k: v for k, v in metrics.items()
            if k.endswith("_total") and ("ledger" in k or "zk" in k or "zookeeper" in k)}


# -- worker journals ---------------------------------------------------------------------------
def read_journals(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every complete JSON line of the given `rota worker --journal` files."""
    out: list[dict[str, Any]] = []
    for path in paths:
        with contextlib.suppress(OSError), open(path, encoding="utf-8") as fh:
            for text in fh:
                if not text.endswith("\n"):
                    break  # being written
                with contextlib.suppress(ValueError):
                    out.append(json.loads(text))
    return out


def count_lines(paths: Iterable[Path], needle: str) -> int:
    """Lines containing `needle` in the given files (cheap progress polling)."""
    n = 0
    for path in paths:
        with contextlib.suppress(OSError), open(path, encoding="utf-8") as fh:
            n += sum(1 for text in fh if needle in text)
    return n


# -- a snapshot of everything, and the difference of two -------------------------------------
@dataclass
class Snapshot:
    at: float
    coordinator_cpu: float
    workers_cpu: float
    zxid: int | None
    broker: BrokerCounts | None
    metrics: dict[str, float] = field(default_factory=dict)
    zk_versions: int | None = None


def take(
    coordinator_pid: int,
    worker_pids: Sequence[int],
    zk_hosts: str,
    servers: Broker | None,
    metrics_port: int | None,
    zk_client: Any = None,
) -> Snapshot:
    """Read every counter; the broker first, since rabbitmqctl takes about a second.

    With ``zk_client`` (started on the scenario's chroot), also the znode version sum."""
    broker = rabbit_counts(servers)
    metrics: dict[str, float] = {}
    if metrics_port:
        with contextlib.suppress(OSError):
            metrics = scrape(metrics_port)
    return Snapshot(
        at=time.time(),
        coordinator_cpu=cpu_seconds(coordinator_pid),
        workers_cpu=sum(cpu_seconds(p) for p in worker_pids),
        zxid=zk_zxid(zk_hosts),
        broker=broker,
        metrics=metrics,
        zk_versions=None if zk_client is None else zk_version_sum(zk_client),
    )


@dataclass(frozen=True)
class Costs:
    """What a window of runs cost, per run and per 1,000 runs."""

    runs: int
    seconds: float
    coordinator_cpu: float
    workers_cpu: float
    zk_transactions: int | None
    zk_writes_at_least: int | None
    broker_received: int | None
    broker_delivered: int | None
    ledger: dict[str, float]
    rss_kib: int
    peak_rss_kib: int

    @property
    def cpu_per_1000(self) -> float | None:
        return self.coordinator_cpu / self.runs * 1000 if self.runs else None

    @property
    def zk_per_run(self) -> float | None:
        if self.zk_transactions is None or not self.runs:
            return None
        return self.zk_transactions / self.runs

    @property
    def zk_writes_at_least_per_run(self) -> float | None:
        if self.zk_writes_at_least is None or self.zk_writes_at_least < 0 or not self.runs:
            return None
        return self.zk_writes_at_least / self.runs

    @property
    def ledger_writes_per_run(self) -> float | None:
        """Znode writes per run as the coordinator counts them, if it exports such a counter
        (a `..._total` family naming the ledger and writes); None otherwise."""
        writes = [v for k, v in self.ledger.items() if "write" in k]
        if not writes or not self.runs:
            return None
        return sum(writes) / self.runs

    @property
    def messages_per_run(self) -> float | None:
        if self.broker_received is None or not self.runs:
            return None
        return self.broker_received / self.runs


def costs(before: Snapshot, after: Snapshot, runs: int, coordinator_pid: int) -> Costs:
    rss, hwm = memory_kib(coordinator_pid)
    zk = None if before.zxid is None or after.zxid is None else after.zxid - before.zxid
    received = delivered = None
    if before.broker is not None and after.broker is not None:
        received = after.broker.received - before.broker.received
        delivered = after.broker.delivered - before.broker.delivered
    ledger0, ledger1 = ledger_families(before.metrics), ledger_families(after.metrics)
    return Costs(
        runs=runs,
        seconds=after.at - before.at,
        coordinator_cpu=after.coordinator_cpu - before.coordinator_cpu,
        workers_cpu=after.workers_cpu - before.workers_cpu,
        zk_transactions=zk,
        zk_writes_at_least=(None if before.zk_versions is None or after.zk_versions is None
                            else after.zk_versions - before.zk_versions),
        broker_received=received,
        broker_delivered=delivered,
        ledger={k: v - ledger0.get(k, 0.0) for k, v in ledger1.items()},
        rss_kib=rss,
        peak_rss_kib=hwm,
    )
