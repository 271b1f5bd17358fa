"""Benchmarks of a whole cluster on real RabbitMQ and ZooKeeper servers.

    python -m bench.cluster [--quick] [--only NAME[,NAME...]]

Reads ROTA_AMQP_URL and ROTA_ZK (and ROTA_SERVERS_DIR, to create a virtual host per scenario)
from the environment; when they are unset it starts private servers with ops.localservers and
stops them at the end. Every scenario runs in a fresh RabbitMQ virtual host and a fresh
ZooKeeper chroot, both removed afterwards. Prints numbers, asserts nothing; bench/README.md
explains each figure.

Scenarios: baselines, lateness, burst, throughput, cpu, handoff, failover.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import msgpack
import pika
from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError

from bench.baselines import pika_publish_rate, zk_write_rate
from ops import localservers
from protocol import LedgerRun, ProtocolError, RunRecord, decode_as
from protocol.catalogue import load_catalogue
from protocol.clock import SystemClock
from protocol.zk import decode_name
from rota.embedded import Cluster, NodeSpec
from workers.node import WorkerNode

ROLES = ("Master", "Redundancy", "Reporting", "Processing", "Calculation")
NODES = (
    NodeSpec("bench-master", ("Master",)),
    NodeSpec("bench-red", ("Redundancy", "Reporting")),
    NodeSpec("bench-proc", ("Processing", "Calculation")),
)
ANY_NODE = ["Master", "Redundancy", "Processing"]
SCENARIOS = ("baselines", "lateness", "burst", "throughput", "cpu", "handoff", "failover")
CLK_TCK = os.sysconf("SC_CLK_TCK")
START = time.monotonic()


# -- output ------------------------------------------------------------------------------------
def line(label: str, value: str) -> None:
    print(f"  {label:<60} {value}", flush=True)


def progress(text: str) -> None:
    print(f"    [{time.monotonic() - START:6.1f} s] {text}", flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def spread(values: Sequence[float]) -> str:
    v = sorted(values)
    if not v:
        return "no samples"
    return (f"p50 {ms(quantile(v, 0.5))}  p90 {ms(quantile(v, 0.9))}  "
            f"p99 {ms(quantile(v, 0.99))}  max {ms(v[-1])}  (n={len(v)})")


# -- servers, virtual hosts, chroots -----------------------------------------------------------
class Servers:
    """The servers under test, and a fresh virtual host and chroot per scenario."""

    def __init__(self) -> None:
        self.state_dir: Path | None = None
        self.local: localservers.Servers | None = None
        self.started_here = False
        url, zk = os.environ.get("ROTA_AMQP_URL"), os.environ.get("ROTA_ZK")
        if url and zk:
            self.amqp_url, self.zk_hosts = url, zk.split("/")[0]
            self.local = self._find_local(url, self.zk_hosts)
        else:
            self.state_dir = Path(tempfile.mkdtemp(prefix="rota-bench-servers-"))
            amqp_port, zk_port = localservers.find_free_ports()
            print(f"starting RabbitMQ and ZooKeeper in {self.state_dir}", flush=True)
            self.local = localservers.start(self.state_dir, amqp_port, zk_port)
            self.started_here = True
            self.amqp_url, self.zk_hosts = self.local.amqp_url, self.local.zk_hosts
        self._vhosts: list[str] = []
        self._chroots: list[str] = []
        self.tag = uuid.uuid4().hex[:6]

    @staticmethod
    def _find_local(url: str, zk: str) -> localservers.Servers | None:
        candidates = [os.environ.get("ROTA_SERVERS_DIR"), str(localservers.DEFAULT_DIR)]
        port = urlparse(url).port
        for cand in filter(None, candidates):
            servers = localservers.load(cand)
            if servers is not None and (servers.amqp_port, servers.zk_hosts) == (port, zk):
                return servers
        return None

    def vhost(self, label: str) -> str:
        """A fresh virtual host; without rabbitmqctl access, the given one with Rota's
        queues deleted."""
        if self.local is None:
            _delete_rota_queues(self.amqp_url)
            return self.amqp_url
        name = f"bench-{label}-{self.tag}"
        url = localservers.add_vhost(self.local, name)
        self._vhosts.append(name)
        return url

    def drop_vhost(self, url: str) -> None:
        name = urlparse(url).path.lstrip("/")
        if self.local is not None and name in self._vhosts:
            with contextlib.suppress(Exception):
                localservers.delete_vhost(self.local, name)
            self._vhosts.remove(name)

    def chroot(self, label: str) -> str:
        path = f"/rota-bench-{label}-{self.tag}"
        _with_zk(self.zk_hosts, lambda c: c.ensure_path(path))
        self._chroots.append(path)
        return self.zk_hosts + path

    def drop_chroot(self, hosts: str) -> None:
        path = hosts[len(self.zk_hosts):]

        def delete(client: KazooClient) -> None:
            with contextlib.suppress(NoNodeError):
                client.delete(path, recursive=True)

        with contextlib.suppress(Exception):
            _with_zk(self.zk_hosts, delete)
        if path in self._chroots:
            self._chroots.remove(path)

    @contextlib.contextmanager
    def scenario(self, label: str) -> Iterator[tuple[str, str]]:
        url, zk = self.vhost(label), self.chroot(label)
        try:
            yield url, zk
        finally:
            self.drop_vhost(url)
            self.drop_chroot(zk)

    def close(self) -> None:
        for name in list(self._vhosts):
            with contextlib.suppress(Exception):
                localservers.delete_vhost(self.local, name)  # type: ignore[arg-type]
        for path in list(self._chroots):
            self.drop_chroot(self.zk_hosts + path)
        if self.started_here and self.state_dir is not None:
            localservers.stop(self.state_dir)


def _with_zk(hosts: str, action: Callable[[KazooClient], object]) -> None:
    client = KazooClient(hosts=hosts, timeout=10.0)
    client.start(timeout=30.0)
    try:
        action(client)
    finally:
        client.stop()
        client.close()


def _delete_rota_queues(url: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        for q in ("rota.results", "rota.requests", "rota.deadletter",
                  *(f"rota.node.{n.id}" for n in NODES)):
            for name in (q, q + ".XQ", q + ".DQ"):
                ch = conn.channel()
                with contextlib.suppress(Exception):
                    ch.queue_delete(name)
                if ch.is_open:
                    ch.close()
    finally:
        conn.close()


# -- catalogues --------------------------------------------------------------------------------
def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(type(value))


def write_catalogue(path: Path, services: list[dict[str, object]], catch_up: float = 30) -> Path:
    out = ["[system]", 'timezone = "UTC"', f"roles = {_toml(list(ROLES))}",
           f"catch_up = {catch_up}", ""]
    for svc in services:
        out.append("[[service]]")
        out += [f"{k} = {_toml(v)}" for k, v in svc.items()]
        out.append("")
    path.write_text("\n".join(out), encoding="utf-8")
    return path


def cron_service(name: str, cron: str, **extra: object) -> dict[str, object]:
    svc: dict[str, object] = {
        "name": name, "kind": "cron", "cron": cron, "allowed_roles": ANY_NODE,
        "utility": "workers.demo:noop", "timeout": 30,
    }
    svc.update(extra)
    return svc


# -- an embedded cluster, and what it records --------------------------------------------------
@dataclass
class Stamped:
    at: float  # real time the record reached the bench
    rec: RunRecord


@dataclass
class Embedded:
    """A coordinator and three worker nodes in this process, on the scenario's servers."""

    catalogue: Path
    amqp_url: str
    zk_hosts: str
    capacity: int = 64
    on_final: Callable[[RunRecord], None] | None = None
    cluster: Cluster = field(init=False)
    finished: list[Stamped] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        cat = load_catalogue(self.catalogue)
        self.cluster = Cluster(cat, SystemClock(), list(NODES), amqp_url=self.amqp_url,
                               zk_hosts=self.zk_hosts)
        if self.capacity != 64:
            c = self.cluster
            for w in c.workers:
                w.coordination.close()
            c.workers = [
                WorkerNode(s.id, list(s.roles), c.transport, c._coordination(s.id), c.clock,
                           capacity=self.capacity)
                for s in NODES
            ]
        self.cluster.coordinator.history_sinks.append(self._keep)

    def _keep(self, rec: RunRecord) -> None:
        with self._lock:
            self.finished.append(Stamped(time.time(), rec))
        if self.on_final is not None:
            self.on_final(rec)

    def snapshot(self) -> list[Stamped]:
        with self._lock:
            return list(self.finished)

    def start(self) -> Embedded:
        self.cluster.start(wait=30)
        return self

    def stop(self) -> None:
        began = time.monotonic()
        self.cluster.stop()
        thread = self.cluster._thread
        thread.join(60)
        took = time.monotonic() - began
        if thread.is_alive():
            progress(f"the coordinator thread is still busy {took:.0f} s after stop()")
        elif took > 15:
            progress(f"stopping the cluster took {took:.0f} s")


# -- separate processes ------------------------------------------------------------------------
@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def cpu_seconds(self) -> float:
        """utime + stime of the process (all its threads), from /proc/<pid>/stat."""
        raw = Path(f"/proc/{self.pid}/stat").read_text()
        fields = raw[raw.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Procs:
    """Coordinator and worker processes of one scenario; all stopped by pid in `close()`."""

    def __init__(self, amqp_url: str, zk_hosts: str, catalogue: Path, workdir: Path) -> None:
        self.amqp_url, self.zk_hosts, self.catalogue = amqp_url, zk_hosts, catalogue
        self.workdir = workdir
        self.procs: list[Proc] = []

    def _spawn(self, name: str, args: list[str]) -> Proc:
        log = self.workdir / f"{name}.log"
        with open(log, "ab") as fh:
            popen = subprocess.Popen(
                [sys.executable, "-m", "rota.cli", *args],
                stdout=fh, stderr=subprocess.STDOUT, cwd=self.workdir,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def coordinator(self, name: str, http_port: int | None = None) -> Proc:
        args = ["coordinator", "--id", name, "--zk", self.zk_hosts, "--amqp", self.amqp_url,
                "--catalogue", str(self.catalogue), "--session-timeout", "2"]
        if http_port:
            args += ["--http-port", str(http_port)]
        return self._spawn(name, args)

    def worker(self, spec: NodeSpec, capacity: int = 256) -> Proc:
        return self._spawn(spec.id, [
            "worker", "--node", spec.id, "--roles", ",".join(spec.roles), "--zk", self.zk_hosts,
            "--amqp", self.amqp_url, "--session-timeout", "2", "--capacity", str(capacity),
            "--catalogue", str(self.catalogue),
        ])

    def close(self) -> None:
        for p in self.procs:
            p.stop()

    def tails(self, lines: int = 15) -> str:
        out = []
        for p in self.procs:
            with contextlib.suppress(OSError):
                text = p.log.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {p.name} (pid {p.pid}) ---\n" + "\n".join(text))
        return "\n".join(out)


class EventTap:
    """Consumes `rota.events` (every routing key) from a thread, stamping each arrival."""

    def __init__(self, amqp_url: str) -> None:
        self.amqp_url = amqp_url
        self.records: list[Stamped] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-tap", daemon=True)

    def start(self) -> EventTap:
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("cannot bind to rota.events")
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
                ch = conn.channel()
                ch.exchange_declare("rota.events", exchange_type="topic", durable=True)
                q = ch.queue_declare("", exclusive=True).method.queue
                ch.queue_bind(q, "rota.events", routing_key="#")
                self._ready.set()
                for method, _props, body in ch.consume(q, auto_ack=True, inactivity_timeout=0.2):
                    if self._stop.is_set():
                        break
                    if method is None:
                        continue
                    now = time.time()
                    try:
                        rec = decode_as(body, RunRecord)
                    except ProtocolError:
                        continue
                    with self._lock:
                        self.records.append(Stamped(now, rec))
                conn.close()
            except Exception:
                self._stop.wait(0.5)

    def snapshot(self) -> list[Stamped]:
        with self._lock:
            return list(self.records)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """Sum of each metric family on a coordinator's /metrics page (labels summed)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
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


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def next_second_at_least(ahead: float) -> int:
    """The next whole second at least `ahead` seconds from now."""
    return int(time.time() + ahead) + 1


# == scenarios =================================================================================
@dataclass
class Context:
    servers: Servers
    tmp: Path
    quick: bool
    baseline_publish: float = 0.0
    baseline_zk: float = 0.0

    def scale(self, seconds: float) -> float:
        return seconds / 3 if self.quick else seconds


def bench_baselines(ctx: Context) -> None:
    print("baselines (raw clients, same servers, same run):", flush=True)
    with ctx.servers.scenario("baselines") as (url, zk):
        n = 2000 if ctx.quick else 5000
        ctx.baseline_publish = pika_publish_rate(url, n)
        line(f"pika: {n} persistent 256 B publishes, each confirmed",
             f"{ctx.baseline_publish:,.0f} msg/s")
        w = 1000 if ctx.quick else 2000
        ctx.baseline_zk = zk_write_rate(zk, w)
        line(f"kazoo: {w} sequential 64 B sets on one znode", f"{ctx.baseline_zk:,.0f} writes/s")


def bench_lateness(ctx: Context) -> None:
    n, duration = 1000, ctx.scale(45)
    print(f"lateness: {n:,} services on 3 nodes, each once a minute at its own second "
          f"(~{n / 60:.0f} slots per second), {duration:.0f} s:", flush=True)
    services = [cron_service(f"late-{i:04d}", f"* * * * * {i % 60}") for i in range(n)]
    cat = write_catalogue(ctx.tmp / "lateness.toml", services)
    with ctx.servers.scenario("lateness") as (url, zk):
        emb = Embedded(cat, url, zk)
        began = time.time()
        emb.start()
        progress(f"leader up after {time.time() - began:.1f} s")
        t0 = time.time() + 2.0  # let the first commits settle
        t1 = t0 + duration
        while time.time() < t1 + 3.0:
            time.sleep(min(10.0, max(0.1, t1 + 3.0 - time.time())))
            progress(f"{len(emb.snapshot())} runs recorded")
        emb.stop()
    recs = [s.rec for s in emb.snapshot() if s.rec.slot is not None and t0 <= s.rec.slot < t1]
    started = [r for r in recs if r.started_at is not None]
    late = [r.started_at - r.slot for r in started]  # type: ignore[operator]
    line("slot -> utility start on the worker", spread(late))
    line("slots in the window: started / not started", f"{len(started)} / "
         f"{len(recs) - len(started)} ({_states(recs)})")
    _leader_lag(recs)


def _states(recs: Sequence[RunRecord]) -> str:
    counts: dict[str, int] = {}
    for r in recs:
        counts[r.state] = counts.get(r.state, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def _leader_lag(recs: Sequence[RunRecord]) -> None:
    queued = [r.queued_at - r.slot for r in recs if r.queued_at and r.slot]
    if queued:
        line("  of which slot -> leader fires it (queued_at - slot)", spread(queued))


def bench_burst(ctx: Context, capacity: int) -> None:
    n = 1000
    print(f"burst: {n:,} services due at the same second, 3 nodes with capacity {capacity} "
          "each:", flush=True)
    with ctx.servers.scenario(f"burst{capacity}") as (url, zk):
        slot = next_second_at_least(12.0)
        services = [cron_service(f"burst-{i:04d}", f"* * * * * {slot % 60}") for i in range(n)]
        cat = write_catalogue(ctx.tmp / f"burst{capacity}.toml", services)
        emb = Embedded(cat, url, zk, capacity=capacity)
        emb.start()
        progress(f"leader up; the burst is due in {slot - time.time():.1f} s")
        wait_until(lambda: time.time() > slot, 30, 0.2)
        wait_until(lambda: len([s for s in emb.snapshot() if s.rec.slot == slot]) >= n, 30, 0.1)
        got = [s for s in emb.snapshot() if s.rec.slot == slot]
        progress(f"{len(got)} of {n} burst runs recorded")
        emb.stop()
    recs = [s.rec for s in got]
    started = sorted(r.started_at - slot for r in recs if r.started_at is not None)
    done = sorted(r.finished_at - slot for r in recs
                  if r.finished_at is not None and r.state == "succeeded")
    recorded = sorted(s.at - slot for s in got)
    if len(started) == n:
        line(f"slot -> all {n} started (max started_at - slot)", ms(started[-1]))
    else:
        line(f"slot -> all {n} started", f"only {len(started)} started ({_states(recs)})")
    if started:
        line("  start times after the slot", spread(started))
    if done:
        line(f"slot -> all {len(done)} succeeded runs finished on the workers", ms(done[-1]))
    if recorded:
        line("slot -> last terminal record published by the leader", ms(recorded[-1]))
    reasons = {r.reason for r in recs if r.state != "succeeded" and r.reason}
    for reason in sorted(reasons)[:3]:
        line("  reason given for runs that did not run", reason)


def bench_throughput(ctx: Context) -> None:
    # 180 runs in flight stay under the nodes' 3 x 64 run slots: a run that finds every node
    # full is expired by the engine, which would show as lost throughput.
    services, window, drivers = 180, ctx.scale(30), 4
    print(f"end to end, embedded: manual no-op runs in a closed loop, {services} services with "
          f"one run each in flight, 3 nodes, steady window {window:.0f} s:", flush=True)
    # Schedules that do not fire during the bench: every run is a manual one.
    cat = write_catalogue(ctx.tmp / "throughput.toml", [
        cron_service(f"tp-{i:04d}", "0 0 1 1 *") for i in range(services)
    ])
    again: queue.Queue[str | None] = queue.Queue()
    with ctx.servers.scenario("throughput") as (url, zk):
        emb = Embedded(cat, url, zk)
        emb.on_final = lambda rec: again.put(rec.service) if rec.trigger == "manual" else None
        emb.start()
        coord = emb.cluster.coordinator

        def drive() -> None:
            while True:
                name = again.get()
                if name is None:
                    return
                with contextlib.suppress(Exception):
                    coord.request_manual_run(name, "bench")

        threads = [threading.Thread(target=drive, name=f"driver-{i}", daemon=True)
                   for i in range(drivers)]
        for t in threads:
            t.start()
        for i in range(services):
            again.put(f"tp-{i:04d}")
        progress("leader up; warming up 5 s")
        time.sleep(5.0)
        t0 = time.time()
        cpu0 = time.process_time()
        while time.time() < t0 + window:
            time.sleep(min(10.0, t0 + window - time.time()))
            progress(f"{len(emb.snapshot())} runs finished so far")
        t1 = time.time()
        cpu1 = time.process_time()
        for _ in threads:
            again.put(None)
        for t in threads:
            t.join(5)
        emb.stop()
    recs = [s for s in emb.snapshot() if t0 <= s.at < t1]
    ok = [s for s in recs if s.rec.state == "succeeded"]
    rate = len(ok) / (t1 - t0)
    line("succeeded runs recorded by the leader", f"{rate:,.0f} runs/s "
         f"({len(ok)} in {t1 - t0:.1f} s)")
    others = _states([s.rec for s in recs if s.rec.state != "succeeded"])
    if others:
        line("  other terminal records in the window", others)
    cycle = sorted(s.at - (s.rec.queued_at or s.at) for s in ok)
    line("  leader took the request -> leader recorded the finish", spread(cycle))
    if ctx.baseline_publish:
        line("  ratio to the raw confirmed publish rate", f"{rate / ctx.baseline_publish:.2f}")
    cpu = cpu1 - cpu0
    line("  whole process CPU (coordinator + 3 workers + driver)",
         f"{cpu / (t1 - t0):.2f} cores, {cpu / max(1, len(ok)) * 1000:.2f} CPU-s per 1,000 runs")


def bench_cpu(ctx: Context) -> None:
    n, window = 200, ctx.scale(30)
    print(f"coordinator CPU, separate processes: {n} no-op services every second, "
          f"3 worker processes, steady window {window:.0f} s:", flush=True)
    services = [cron_service(f"cpu-{i:04d}", "* * * * * *") for i in range(n)]
    cat = write_catalogue(ctx.tmp / "cpu.toml", services)
    workdir = ctx.tmp / "cpu"
    workdir.mkdir(exist_ok=True)
    with ctx.servers.scenario("cpu") as (url, zk):
        procs = Procs(url, zk, cat, workdir)
        try:
            workers = [procs.worker(s, capacity=1000) for s in NODES]
            port = free_port()
            coord = procs.coordinator("cpu-coord", http_port=port)

            def leading() -> bool:
                with contextlib.suppress(Exception):
                    return scrape(port).get("rota_leader", 0) == 1
                return False

            if not wait_until(leading, 40, 0.25):
                print("    coordinator did not lead in 40 s\n" + procs.tails(), flush=True)
                return
            progress("coordinator leads; warming up 5 s")
            time.sleep(5.0)
            m0, c0, w0, t0 = scrape(port), coord.cpu_seconds(), _cpu(workers), time.time()
            while time.time() < t0 + window:
                time.sleep(min(10.0, t0 + window - time.time()))
                progress(f"{scrape(port).get('rota_orders_dispatched_total', 0):,.0f} orders "
                         "dispatched so far")
            m1, c1, w1, t1 = scrape(port), coord.cpu_seconds(), _cpu(workers), time.time()
        finally:
            procs.close()
    dispatched = m1.get("rota_orders_dispatched_total", 0) - m0.get(
        "rota_orders_dispatched_total", 0)
    finished = m1.get("rota_runs_total", 0) - m0.get("rota_runs_total", 0)
    secs = t1 - t0
    cpu = c1 - c0
    line("orders dispatched / runs finished in the window",
         f"{dispatched:,.0f} / {finished:,.0f} ({dispatched / secs:,.0f} / "
         f"{finished / secs:,.0f} per s)")
    if dispatched:
        line("coordinator process CPU per 1,000 dispatched runs",
             f"{cpu / dispatched * 1000:.3f} CPU-s ({cpu / secs:.2f} cores busy)")
        line("  worker processes' CPU per 1,000 runs",
             f"{(w1 - w0) / dispatched * 1000:.3f} CPU-s ({(w1 - w0) / secs:.2f} cores busy)")


def _cpu(procs: Sequence[Proc]) -> float:
    return sum(p.cpu_seconds() for p in procs)


def bench_handoff(ctx: Context) -> None:
    reps, hold = (8 if ctx.quick else 20), 0.2
    print(f"run-group hand-off: two services sharing a run group, due every second, the one "
          f"holding the group sleeps {hold} s; {reps} rounds:", flush=True)
    services = [
        cron_service("hand-a", "* * * * * *", run_groups=["shared"],
                     utility="workers.demo:sleep", params={"seconds": hold}),
        cron_service("hand-b", "* * * * * *", run_groups=["shared"]),
    ]
    cat = write_catalogue(ctx.tmp / "handoff.toml", services)
    with ctx.servers.scenario("handoff") as (url, zk):
        emb = Embedded(cat, url, zk)
        emb.start()
        t0 = time.time() + 2.0
        progress("leader up")

        def slots_done() -> int:
            by_slot: dict[float, int] = {}
            for s in emb.snapshot():
                if s.rec.slot is not None and s.rec.slot >= t0 and s.rec.state == "succeeded":
                    by_slot[s.rec.slot] = by_slot.get(s.rec.slot, 0) + 1
            return sum(1 for v in by_slot.values() if v == 2)

        wait_until(lambda: slots_done() >= reps, reps * 2 + 20, 0.2)
        emb.stop()
    by_slot: dict[float, list[RunRecord]] = {}
    for s in emb.snapshot():
        r = s.rec
        if r.slot is not None and r.slot >= t0 and r.state == "succeeded":
            by_slot.setdefault(r.slot, []).append(r)
    gaps = []
    for pair in by_slot.values():
        if len(pair) != 2 or any(r.started_at is None or r.finished_at is None for r in pair):
            continue
        first, second = sorted(pair, key=lambda r: r.started_at or 0.0)
        gaps.append(second.started_at - first.finished_at)  # type: ignore[operator]
    line("holder finished -> waiter started", spread(gaps))


def bench_failover(ctx: Context) -> None:
    rounds = 2 if ctx.quick else 3
    print(f"leader failover: 2 coordinator processes, SIGKILL the leader, {rounds} rounds "
          "(session timeout 2 s):", flush=True)
    services = [cron_service(f"fo-{i:02d}", "* * * * * *") for i in range(20)]
    cat = write_catalogue(ctx.tmp / "failover.toml", services)
    workdir = ctx.tmp / "failover"
    workdir.mkdir(exist_ok=True)
    results: list[float] = []
    with ctx.servers.scenario("failover") as (url, zk):
        tap = EventTap(url).start()
        procs = Procs(url, zk, cat, workdir)
        observer = KazooClient(hosts=zk, timeout=10.0)
        observer.start(timeout=30)
        try:
            for s in NODES[:2]:
                procs.worker(s)
            coords = {name: procs.coordinator(name) for name in ("fo-c0", "fo-c1")}
            spawned = 2
            for k in range(rounds):
                leader, epoch = _zk_leader(observer)
                if leader is None:
                    print("    no leader\n" + procs.tails(), flush=True)
                    return
                # The standby contends once its election znode exists.
                wait_until(lambda: _contenders(observer) >= 2, 30, 0.1)
                wait_until(lambda e=epoch: any(
                    s.rec.epoch == e and s.rec.state == "dispatched" for s in tap.snapshot()
                ), 20, 0.1)
                time.sleep(1.5)
                victim = coords.pop(leader)
                killed_at = time.time()
                victim.kill()
                first = None
                deadline = time.monotonic() + 30
                while first is None and time.monotonic() < deadline:
                    time.sleep(0.02)
                    news = [s for s in tap.snapshot() if s.rec.epoch > epoch
                            and s.rec.state in ("dispatched", "running", "succeeded")]
                    first = min((s.at for s in news), default=None)
                if first is None:
                    progress(f"round {k + 1}: no dispatch by a new leader within 30 s")
                    continue
                results.append(first - killed_at)
                progress(f"round {k + 1}: leader {leader} (epoch {epoch}) killed; first order "
                         f"by its successor after {first - killed_at:.2f} s")
                name = f"fo-c{spawned}"
                spawned += 1
                coords[name] = procs.coordinator(name)
            time.sleep(3.0)
            end = time.time()
            ledger = _ledger_history(observer)
        finally:
            procs.close()
            observer.stop()
            observer.close()
            tap.stop()
    for i, r in enumerate(results, 1):
        line(f"round {i}: SIGKILL -> first order by the new leader", f"{r:.2f} s")
    if results:
        line("median", f"{statistics.median(results):.2f} s")
    _slot_audit(tap.snapshot(), ledger, end - 5.0)


def _ledger_history(client: KazooClient) -> dict[str, list[LedgerRun]]:
    """The finished runs each service keeps in the ledger (`history/<service>`, newest last)."""
    out: dict[str, list[LedgerRun]] = {}
    for name in client.get_children("/rota/ledger"):
        key = decode_name(name)
        if not key.startswith("history/"):
            continue
        data, _ = client.get(f"/rota/ledger/{name}")
        runs = [decode_as(bytes(b), LedgerRun) for b in msgpack.unpackb(data)]
        out[unquote(key.partition("/")[2])] = runs
    return out


def _slot_audit(
    stamped: Sequence[Stamped], ledger: dict[str, list[LedgerRun]], until: float
) -> None:
    """Every slot of the every-second services: how it ended, and whether it ran twice.

    A slot without a final record on `rota.events` is looked up in the ledger's per-service
    history, which keeps the latest runs only: older slots cannot be checked there.
    """
    final: dict[str, RunRecord] = {}
    running: dict[str, set[tuple[str | None, int]]] = {}
    for s in stamped:
        r = s.rec
        if r.slot is None or r.slot > until:
            continue
        if r.state == "running":
            running.setdefault(r.run_id, set()).add((r.node, r.epoch))
        if r.state not in ("queued", "dispatched", "running"):
            final[r.run_id] = r
    slots = sorted({r.slot for r in final.values() if r.slot is not None})
    if not slots:
        return
    first, last = int(slots[0]), int(slots[-1])
    seen: dict[str, set[float]] = {}
    for r in final.values():
        seen.setdefault(r.service, set()).add(r.slot or 0.0)
    in_ledger = {svc: {r.slot for r in runs if r.state not in ("queued", "dispatched",
                                                                "running")}
                 for svc, runs in ledger.items()}
    only_ledger = lost = unknown = 0
    for svc, got in seen.items():
        kept = in_ledger.get(svc, set())
        oldest = min((t for t in kept if t is not None), default=float("inf"))
        for t in range(first, last + 1):
            if float(t) in got:
                continue
            if float(t) in kept:
                only_ledger += 1
            elif t < oldest:
                unknown += 1
            else:
                lost += 1
    line("slots over the whole scenario, by final record", _states(list(final.values())))
    line("  slots with no final record on rota.events", f"{only_ledger + lost + unknown}")
    line("    in the ledger's history / in neither / too old to check",
         f"{only_ledger} / {lost} / {unknown}")
    line("  runs reported running by more than one node or leader",
         f"{sum(1 for v in running.values() if len(v) > 1)}")


def _zk_leader(client: KazooClient) -> tuple[str | None, int]:
    """The leader's identifier and epoch, once the epoch znode names the election's head."""
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        with contextlib.suppress(NoNodeError):
            data, stat = client.get("/rota/epoch")
            children = client.get_children("/rota/election")
            if stat.version > 0 and children:
                first = min(children, key=lambda c: c.rsplit("-n_", 1)[-1])
                holder, _ = client.get(f"/rota/election/{first}")
                if holder == data:
                    return data.decode(), stat.version
        time.sleep(0.1)
    return None, 0


def _contenders(client: KazooClient) -> int:
    try:
        return len(client.get_children("/rota/election"))
    except NoNodeError:
        return 0


# == main ======================================================================================
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shorter windows, fewer rounds")
    p.add_argument("--only", default="", metavar="NAMES",
                   help=f"comma-separated subset of: {', '.join(SCENARIOS)}")
    args = p.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()] or list(SCENARIOS)
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    import logging

    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    servers = Servers()
    tmp = Path(tempfile.mkdtemp(prefix="rota-bench-"))
    ctx = Context(servers, tmp, args.quick)
    print(f"cluster bench on {servers.amqp_url} and {servers.zk_hosts}, "
          f"{os.cpu_count()} CPUs", flush=True)
    try:
        for name in SCENARIOS:
            if name not in chosen:
                continue
            began = time.monotonic()
            try:
                if name == "baselines":
                    bench_baselines(ctx)
                elif name == "lateness":
                    bench_lateness(ctx)
                elif name == "burst":
                    bench_burst(ctx, 256)
                elif name == "throughput":
                    bench_throughput(ctx)
                elif name == "cpu":
                    bench_cpu(ctx)
                elif name == "handoff":
                    bench_handoff(ctx)
                elif name == "failover":
                    bench_failover(ctx)
            except Exception as exc:  # one broken scenario does not hide the others
                print(f"  {name} failed: {type(exc).__name__}: {exc}", flush=True)
            progress(f"{name} took {time.monotonic() - began:.0f} s")
        print("GetRanking: not built yet, skipped", flush=True)
    finally:
        servers.close()
    print(f"total {time.monotonic() - START:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
