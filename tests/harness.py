"""A real cluster of processes for integration, fault and soak runs.

Starts `rota coordinator` and `rota worker` processes against a RabbitMQ vhost and a
ZooKeeper chroot, records every event published on `rota.events`, and kills, stops or
restarts processes by pid. Used by tests/integration and by `ops/soak`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pika

from protocol import (
    ProtocolError,
    RankingAlert,
    RankingUpdate,
    RunRecord,
    ServiceChange,
    amqp,
    decode,
)
from protocol.run_records import records_of

if TYPE_CHECKING:
    from coordinator.audit import Report

SECONDS_CATALOGUE = Path(__file__).parent / "integration" / "catalogues" / "seconds.toml"
"""A catalogue on second-level cron schedules, for cluster tests."""
THREE_NODES = {
    "w-master": "Master",
    "w-red": "Redundancy,Reporting",
    "w-proc": "Processing,Calculation",
}
"""Workers for every role of that catalogue: node id -> comma-separated roles."""
THREE_NODES_ROLES = {n: r.split(",") for n, r in THREE_NODES.items()}


def free_port() -> int:
    """A loopback port the OS had free just now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def poll_until(what: str, probe: Callable[[], Any], timeout: float = 30.0,
               context: Callable[[], str] | None = None) -> Any:
    """Call `probe` until it returns something true (network and lookup errors count as
    not yet) and return that; fail naming `what`, its last answer and `context()`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except (OSError, urllib.error.URLError, ValueError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.2)
    more = f"\n{context()}" if context is not None else ""
    raise AssertionError(f"{what}: still {last!r} after {timeout:.0f} s{more}")


class EventRecorder:
    """Consumes `rota.events` (all routing keys) into memory from its own thread."""

    def __init__(self, amqp_url: str) -> None:
        self.amqp_url = amqp_url
        self.records: list[RunRecord] = []
        self.received: list[float] = []  # when each of `records` arrived (time.time())
        self.changes: list[ServiceChange] = []  # operator edits, routing key service.changed
        self.rankings: list[RankingUpdate | RankingAlert] = []  # ranking.update, ranking.alert
        self.bad: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-recorder", daemon=True)
        self.queue = f"rota.test-recorder.{uuid.uuid4().hex[:8]}"

    def start(self, timeout: float = 10.0) -> EventRecorder:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("event recorder could not bind to rota.events")
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn = pika.BlockingConnection(amqp.parameters(self.amqp_url))
                ch = conn.channel()
                ch.exchange_declare("rota.events", exchange_type="topic", durable=True)
                # Durable and named, not exclusive: events published while this recorder
                # lags behind or is reconnecting, even across a broker restart, wait for it.
                # A quorum queue, as Rota's own are: the leader's confirms wait for it too.
                q = ch.queue_declare(self.queue, durable=True,
                                     arguments={"x-queue-type": "quorum"}).method.queue
                ch.queue_bind(q, "rota.events", routing_key="#")
                self._ready.set()
                ch.basic_qos(prefetch_count=1000)
                for method, _props, body in ch.consume(q, inactivity_timeout=0.2):
                    if self._stop.is_set():
                        break
                    if method is None:
                        continue
                    msg: object = None
                    try:
                        if method.routing_key.startswith("run."):
                            msg = records_of(body)
                        else:
                            msg = decode(body)
                    except ProtocolError:
                        msg = None
                    with self._lock:
                        if isinstance(msg, list):
                            self.records.extend(msg)
                            self.received.extend([time.time()] * len(msg))
                        elif isinstance(msg, ServiceChange):
                            self.changes.append(msg)
                        elif isinstance(msg, RankingUpdate | RankingAlert):
                            self.rankings.append(msg)
                        else:
                            self.bad.append(body)
                    ch.basic_ack(method.delivery_tag)  # kept: the queue may let it go
                conn.close()
            except Exception:
                # The broker restarted: bind again; the durable queue kept what was
                # published meanwhile (a record taken but not acknowledged comes twice, which
                # the audits take, as consumers must: events are at least once).
                self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        try:  # the queue outlives connections by design: remove it
            conn = pika.BlockingConnection(amqp.parameters(self.amqp_url))
            conn.channel().queue_delete(self.queue)
            conn.close()
        except Exception:
            pass

    def snapshot(self) -> list[RunRecord]:
        with self._lock:
            return list(self.records)

    def stamped(self) -> list[tuple[float, RunRecord]]:
        """Every record with the time it arrived, in arrival order."""
        with self._lock:
            return list(zip(self.received, self.records, strict=True))

    def finals(self, end: float | None = None) -> list[RunRecord]:
        """The last record of every run; open daemon intervals closed at `end`."""
        last: dict[str, RunRecord] = {}
        for r in self.snapshot():
            prev = last.get(r.run_id)
            if (prev is not None and r.trigger == "daemon" and prev.finished_at is not None
                    and r.finished_at is not None):
                # An interval closed twice (its end, then a leader that missed it): the first.
                if r.finished_at < prev.finished_at:
                    last[r.run_id] = r
            elif prev is None or _rank(r) >= _rank(prev):
                last[r.run_id] = r
        # One daemon instance per service and node: an interval still open ends at the latest
        # when the next one on that node begins (its worker died while no leader saw it).
        starts: dict[tuple[str, str | None], list[float]] = {}
        for r in last.values():
            if r.trigger == "daemon" and r.started_at is not None:
                starts.setdefault((r.service, r.node), []).append(r.started_at)
        out = []
        for r in last.values():
            if r.trigger == "daemon" and r.finished_at is None and end is not None:
                later = [t for t in starts.get((r.service, r.node), [])
                         if r.started_at is not None and t > r.started_at]
                r = RunRecord.from_dict({**r.to_dict(), "finished_at": min([end, *later])})
            out.append(r)
        return out

    def wait_for_change(self, pred: Callable[[ServiceChange], bool],
                        timeout: float) -> ServiceChange | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = next((c for c in self.changes if pred(c)), None)
            if found is not None:
                return found
            time.sleep(0.05)
        return None

    def wait_for(self, pred: Callable[[RunRecord], bool], timeout: float) -> RunRecord | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for r in self.snapshot():
                if pred(r):
                    return r
            time.sleep(0.05)
        return None


_ORDER = {"queued": 0, "dispatched": 1, "running": 2}


def _rank(r: RunRecord) -> int:
    return _ORDER.get(r.state, 3)


@dataclass
class Proc:
    name: str
    args: list[str]
    popen: subprocess.Popen[bytes]
    log: Path
    journal: Path | None = None  # a worker's journal: a SIGKILL is noted there

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: no goodbye, no cleanup, as a crashed machine."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            killed_at = time.time()
            self.popen.wait(10)
            if self.journal is not None:
                # What the process ran stopped here; the journal audit ends its spans here.
                with self.journal.open("a") as fh:
                    fh.write(json.dumps({"event": "worker-killed", "node": self.name,
                                         "at": killed_at}) + "\n")

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Cluster:
    """Processes of one Rota cluster; every one is stopped by pid in `close()`."""

    amqp_url: str
    zk_hosts: str
    catalogue: Path
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)
    role_urls: dict[str, str] = field(default_factory=dict)
    """AMQP URL per role (coordinator, worker) when each runs as its own RabbitMQ user;
    `amqp_url` otherwise."""

    def _spawn(self, name: str, args: list[str], journal: Path | None = None) -> Proc:
        log = self.workdir / f"{name}.log"
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        fh = open(log, "ab")  # noqa: SIM115 - the child owns it
        popen = subprocess.Popen(
            # ROTA_TEST_VERBOSITY=-vv logs every leader turn (ledger writes, orders, records).
            [sys.executable, "-m", "rota.cli", os.environ.get("ROTA_TEST_VERBOSITY", "-v"),
             *args],
            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
        )
        fh.close()
        proc = Proc(name, args, popen, log, journal)
        self.procs[name] = proc
        return proc

    def coordinator(self, name: str, session_timeout: float = 2.0,
                    http_port: int | None = None) -> Proc:
        """A coordinator; with `http_port`, serving the API there (tokens from
        `env["ROTA_OPERATOR_TOKENS"]`)."""
        http = [] if http_port is None else ["--http-port", str(http_port)]
        return self._spawn(name, [
            "coordinator", "--id", name, "--zk", self.zk_hosts,
            "--amqp", self.role_urls.get("coordinator", self.amqp_url),
            "--catalogue", str(self.catalogue), "--session-timeout", str(session_timeout),
            *http,
        ])

    def worker(self, node: str, roles: str, session_timeout: float = 2.0) -> Proc:
        return self._spawn(node, [
            "worker", "--node", node, "--roles", roles, "--zk", self.zk_hosts,
            "--amqp", self.role_urls.get("worker", self.amqp_url),
            "--session-timeout", str(session_timeout),
            "--journal", str(self.workdir / f"{node}.journal"),
            "--catalogue", str(self.catalogue),
        ], journal=self.workdir / f"{node}.journal")

    def journal(self) -> list[dict[str, object]]:
        """Every worker's own record of the runs it started and ended."""
        out: list[dict[str, object]] = []
        for path in sorted(self.workdir.glob("*.journal")):
            for line in path.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass  # a line cut short by SIGKILL
        return out

    def coordinator_with_fault(self, name: str, fault: str) -> Proc:
        """A coordinator that SIGKILLs itself at a fault point (after-ledger:N, after-publish:N)."""
        self.env["ROTA_FAULT"] = fault
        try:
            return self.coordinator(name)
        finally:
            self.env.pop("ROTA_FAULT", None)

    def restart(self, name: str) -> Proc:
        old = self.procs[name]
        old.stop()
        return self._spawn(name, old.args)

    def leader(self) -> str | None:
        from protocol.zk import ZkCoordination

        zk = ZkCoordination(self.zk_hosts, identifier="observer")
        try:
            return zk.leader()
        finally:
            zk.close()


    def wait_leader(self, not_: str | None = None, timeout: float = 20.0) -> str:
        """The coordinator that leads (other than `not_`), a live process of this cluster."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            who = self.leader()
            if who and who != not_ and self.procs.get(who) and self.procs[who].alive():
                return who
            time.sleep(0.1)
        raise AssertionError(f"no leader (other than {not_}) after {timeout:.0f} s\n"
                             f"{self.logs()}")
    def close(self) -> None:
        for p in list(self.procs.values()):
            p.stop(10)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} (pid {p.pid}) ---\n{p.tail()}" for p in self.procs.values())



# -- a burst: many services due at one instant -------------------------------------------
BURST = 1000
BURST_CAPACITY = 400
"""Runs a burst worker takes at once: wide enough for its share of the whole burst."""
BURST_GROUPED = 10
"""Burst services sharing one run group: they must run one after another."""
_BURST_ROLE_SETS = (["Master", "Processing"], ["Redundancy", "Reporting"], ["Master"],
                    ["Processing", "Calculation", "Reporting"])
TICK_CATALOGUE = "\n".join([
    "[system]", 'timezone = "UTC"',
    'roles = ["Master", "Redundancy", "Reporting", "Processing", "Calculation"]',
    "catch_up = 60", "",
    "[[service]]", 'name = "Tick"', 'kind = "cron"', 'cron = "* * * * * */2"',
    'allowed_roles = ["Master", "Processing"]', 'utility = "workers.demo:noop"',
    "timeout = 10", ""])
"""A catalogue of one service every two seconds, to which a burst is added."""


def burst_names() -> set[str]:
    return {f"burst-{i:04d}" for i in range(BURST)}


def burst_catalogue(path: Path, slot: float, head: str = TICK_CATALOGUE) -> Path:
    """`head` (a catalogue's text) plus BURST cron services due once a day at `slot` (UTC),
    over four sets of allowed roles, the first BURST_GROUPED sharing one run group."""
    t = time.gmtime(slot)
    cron = f"{t.tm_min} {t.tm_hour} * * * {t.tm_sec}"
    out = [head, ""]
    for i in range(BURST):
        roles = ", ".join(f'"{r}"' for r in _BURST_ROLE_SETS[i % len(_BURST_ROLE_SETS)])
        out += ["[[service]]", f'name = "burst-{i:04d}"', 'kind = "cron"', f'cron = "{cron}"',
                f"allowed_roles = [{roles}]", 'utility = "workers.demo:noop"', "timeout = 30"]
        if i < BURST_GROUPED:
            out.append('run_groups = ["burst_group"]')
        out.append("")
    path.write_text("\n".join(out), encoding="utf-8")
    return path


@dataclass
class BurstOutcome:
    """How a burst ended: each burst slot's final state, every run's last record, the audit."""

    finals: dict[str, str]
    records: list[RunRecord]
    report: Report
    states: Counter[str]

    def check(self, names: set[str], logs: str, settle: float) -> None:
        """Every burst slot has a final record; the audit saw them due and found nothing."""
        missing = sorted(names - self.finals.keys())
        assert not missing, (f"{len(missing)} burst slots without a final record after "
                             f"{settle:.0f} s, e.g. {missing[:5]}\n{logs}")
        assert self.report.slots_due >= BURST
        assert not self.report.violations, "\n".join(self.report.violations[:25]) + "\n" + logs


def settle_burst(rec: EventRecorder, cluster: Cluster, names: set[str], *, start: float,
                 until: float, after: float, margin: float = 5.0) -> BurstOutcome:
    """Wait (until the wall-clock instant `until`) for a final record of every burst slot,
    then `after` seconds more for the other services; audit `rota.events` and the workers'
    journals for slots due from `start` to `margin` seconds before the end."""
    from coordinator.audit import NOT_RUN, RAN, audit, audit_journal
    from protocol.catalogue import load_catalogue

    deadline = time.monotonic() + max(10.0, until - time.time())
    finals: dict[str, str] = {}
    while time.monotonic() < deadline:
        finals = {r.service: r.state for r in rec.finals()
                  if r.service in names and r.state in RAN | NOT_RUN}
        if len(finals) == BURST:
            break
        time.sleep(0.5)
    time.sleep(after)
    end = time.time()
    records = rec.finals(end=end)
    report = audit(records, load_catalogue(cluster.catalogue), THREE_NODES_ROLES,
                   start=start, settled=end - margin)
    audit_journal(cluster.journal(), report)
    states = Counter(r.state for r in records if r.service in names)
    return BurstOutcome(finals, records, report, states)


class BurstCluster(Cluster):
    """The harness's cluster, with workers wide enough to take the whole burst at once."""

    def worker(self, node: str, roles: str, session_timeout: float = 2.0) -> Proc:
        journal = self.workdir / f"{node}.journal"
        return self._spawn(node, [
            "worker", "--node", node, "--roles", roles, "--zk", self.zk_hosts,
            "--amqp", self.amqp_url, "--session-timeout", str(session_timeout),
            "--journal", str(journal), "--catalogue", str(self.catalogue),
            "--capacity", str(BURST_CAPACITY),
        ], journal=journal)

@contextmanager
def running_cluster(
    amqp_url: str, zk_hosts: str, catalogue: Path, workdir: Path
) -> Iterator[tuple[Cluster, EventRecorder]]:
    """A cluster and a recorder of `rota.events`; every process is stopped on the way out."""
    c = Cluster(amqp_url, zk_hosts, catalogue, workdir)
    rec = EventRecorder(amqp_url).start()
    try:
        yield c, rec
    finally:
        c.close()
        rec.stop()
