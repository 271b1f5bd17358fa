"""Network partitions, on real servers and real processes, through a fault-injecting proxy.

- A leader cut off from ZooKeeper (its link black-holed: silence, not a reset) stops
  dispatching before its successor's first dispatch, the successor takes over within seconds,
  and once the link heals the old leader rejoins as a follower.
- Orders forged with the deposed leader's epoch are refused, naming the stale epoch.
- A commit attempted by a leader whose term ended with its link must fail at once.
- Daemon intervals the deposed leader opened are closed in the history by its successor.
- A worker cut off from RabbitMQ while its ZooKeeper session lives reconnects by itself when
  the link heals; what was dispatched to it meanwhile runs afterwards or ends with a reason.
- A leader and a worker that lose the ZooKeeper server they talk to (their links reset; they
  reach the same server again through a second address, as another ensemble member) keep
  their session: no new term, no reload, no run holding run groups stopped.

After each scenario the history on `rota.events` and the workers' journals are audited as in
test_faults: one record per slot per target, no overlap of intersecting run groups, no run
started twice, no order executed from a stale epoch.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from kazoo.client import KazooClient

from coordinator.audit import NOT_RUN, RAN, audit, audit_journal
from protocol import RunOrder, RunRecord, encode, transport
from protocol.catalogue import load_catalogue
from protocol.coordination import Fenced, Term
from protocol.zk import ZkCoordination
from tests.faultproxy import FaultProxy
from tests.harness import (
    SECONDS_CATALOGUE,
    THREE_NODES,
    THREE_NODES_ROLES,
    Cluster,
    EventRecorder,
    running_cluster,
)

CATALOGUE = SECONDS_CATALOGUE
NODES = THREE_NODES
ROLES = THREE_NODES_ROLES
TAKEOVER_LIMIT = 6.0  # seconds from the cut to the successor's first record
LEAD_TIME = 1.5  # the coordinators' default: orders leave this long before their slot


@pytest.fixture
def zk(zk_hosts: str) -> Iterator[KazooClient]:
    """A plain client on the test's chroot, to read the election and the epoch."""
    client = KazooClient(hosts=zk_hosts, timeout=10.0)
    client.start(timeout=30.0)
    try:
        yield client
    finally:
        client.stop()
        client.close()


@pytest.fixture
def zk_proxy(zk_hosts: str) -> Iterator[FaultProxy]:
    host, port = zk_hosts.split("/", 1)[0].split(",")[0].rsplit(":", 1)
    proxy = FaultProxy(host, int(port)).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def zk_proxy_b(zk_hosts: str) -> Iterator[FaultProxy]:
    """A second address of the same ZooKeeper, as a second ensemble member."""
    host, port = zk_hosts.split("/", 1)[0].split(",")[0].rsplit(":", 1)
    proxy = FaultProxy(host, int(port)).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def amqp_proxy(amqp_url: str) -> Iterator[FaultProxy]:
    url = urlparse(amqp_url)
    proxy = FaultProxy(url.hostname or "127.0.0.1", url.port or 5672).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def cluster(  # type: ignore[no-untyped-def]
    amqp_url: str, zk_hosts: str, tmp_path: Path, zk_proxy: FaultProxy, amqp_proxy: FaultProxy
):
    """Processes and recorder; the proxies outlive them, so nothing stops behind a dead link."""
    with running_cluster(amqp_url, zk_hosts, CATALOGUE, tmp_path) as pair:
        yield pair


def through(c: Cluster, *, zk: str | None = None, amqp: str | None = None) -> Cluster:
    """The same cluster (same processes, work directory and environment) with processes
    spawned from it reaching ZooKeeper or RabbitMQ at other addresses."""
    return dataclasses.replace(c, zk_hosts=zk or c.zk_hosts, amqp_url=amqp or c.amqp_url)


def proxied_zk(zk_hosts: str, proxy: FaultProxy) -> str:
    chroot = zk_hosts.split("/", 1)[1]
    return f"127.0.0.1:{proxy.port}/{chroot}"


def proxied_amqp(amqp_url: str, proxy: FaultProxy) -> str:
    vhost = amqp_url.rsplit("/", 1)[1]  # already percent-encoded
    return f"amqp://guest:guest@127.0.0.1:{proxy.port}/{vhost}"


def wait_until(pred: Callable[[], object], timeout: float, what: str, c: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout}s\n{c.logs()}")


def election(zk: KazooClient) -> list[str]:
    """Contender identifiers in election order."""
    names = zk.get_children("/rota/election")
    out = []
    for name in sorted(names, key=lambda n: n.rpartition("-n_")[2]):
        try:
            out.append(zk.get(f"/rota/election/{name}")[0].decode())
        except Exception:
            continue
    return out


def epoch_now(zk: KazooClient) -> int:
    stat = zk.exists("/rota/epoch")
    return stat.version if stat is not None else 0


def check(c: Cluster, rec: EventRecorder, t0: float, t1: float, min_slots: int = 20) -> None:
    """Audit slots in (t0, t1 - 5] on the published history (a daemon interval still open
    runs until t1) and everything on the workers' journals."""
    report = audit(rec.finals(end=t1), load_catalogue(CATALOGUE), ROLES,
                   start=t0, settled=t1 - 5)
    audit_journal(c.journal(), report)
    print("audit:", report.line())
    assert report.slots_due > min_slots
    assert not report.violations, "\n".join(report.violations[:25]) + "\n" + c.logs()


def start_workers(c: Cluster, via: dict[str, Cluster] | None = None) -> None:
    for node, roles in NODES.items():
        (via or {}).get(node, c).worker(node, roles)


def leader_behind_proxy(
    c: Cluster, rec: EventRecorder, zk: KazooClient, proxy: FaultProxy
) -> int:
    """Three workers; coord-a (through `proxy`) leads, coord-b (direct) stands by. Its epoch."""
    start_workers(c)
    through(c, zk=proxied_zk(c.zk_hosts, proxy)).coordinator("coord-a")
    wait_until(lambda: c.leader() == "coord-a", 20, "coord-a leads", c)
    c.coordinator("coord-b")
    wait_until(lambda: election(zk) == ["coord-a", "coord-b"], 20, "coord-b contends", c)
    epoch_a = epoch_now(zk)
    assert epoch_a > 0
    got = rec.wait_for(lambda r: r.state == "succeeded" and r.epoch == epoch_a, 20)
    assert got is not None, c.logs()
    return epoch_a


def cut_leader(
    c: Cluster, rec: EventRecorder, zk: KazooClient, proxy: FaultProxy, epoch_a: int
) -> tuple[float, int, RunRecord]:
    """Black-hole coord-a's link to ZooKeeper; wait for coord-b's first record."""
    proxy.blackhole()
    cut_at = time.time()
    first_b = rec.wait_for(lambda r: r.epoch > epoch_a, 20)
    seen_at = time.time()
    assert first_b is not None, "no record from a new leader\n" + c.logs()
    print(f"takeover: first record of epoch {first_b.epoch} {seen_at - cut_at:.2f}s after the cut")
    assert seen_at - cut_at < TAKEOVER_LIMIT, c.logs()
    assert c.leader() == "coord-b", c.logs()
    assert c.procs["coord-a"].alive(), "the cut-off leader must stay up\n" + c.logs()
    return cut_at, epoch_now(zk), first_b


def test_leader_cut_off_from_zookeeper(cluster, zk, zk_proxy) -> None:  # type: ignore[no-untyped-def]
    c, rec = cluster
    epoch_a = leader_behind_proxy(c, rec, zk, zk_proxy)
    t0 = time.time()
    time.sleep(5)

    cut_at, epoch_b, _ = cut_leader(c, rec, zk, zk_proxy, epoch_a)
    assert epoch_b > epoch_a
    time.sleep(6)

    # Fencing, from the history in the order it was published: every record of A's epoch was
    # queued before the cut and, once B has published, A's epoch shows only in what became
    # of runs A had already recorded: never a new dispatch.
    records = rec.snapshot()
    first = next(i for i, r in enumerate(records) if r.epoch > epoch_a)
    assert records[first].epoch == epoch_b
    a_late = [
        r for r in records
        if r.epoch == epoch_a and r.trigger != "daemon"
        and (r.queued_at is None or r.queued_at > cut_at)
    ]
    assert not a_late, f"records of epoch {epoch_a} queued after the cut: {a_late[:5]}"
    a_after_b = [r for r in records[first:] if r.epoch == epoch_a and r.trigger != "daemon"]
    assert not [r for r in a_after_b if r.state == "dispatched"], a_after_b
    assert not [r for r in records if epoch_a < r.epoch < epoch_b], "an epoch in between"
    # The workers only ever executed orders of A dispatched before the cut, or B's.
    journal = c.journal()
    a_runs = {r.run_id for r in records[:first] if r.epoch == epoch_a}
    a_runs |= {r.run_id for r in a_after_b}
    for e in journal:
        if e["event"] == "start" and e["epoch"] == epoch_a:
            assert e["run_id"] in a_runs, f"{e} was not dispatched by A before the cut"
        if e["event"] == "start" and float(e["at"]) > cut_at:  # type: ignore[arg-type]
            assert e["epoch"] in (epoch_a, epoch_b), e
    report = audit_journal(journal)
    assert not report.violations, "\n".join(report.violations[:25]) + "\n" + c.logs()

    # Heal: A gets a new session, contends again behind B, and never leads while B lives.
    zk_proxy.heal()
    healed_at = time.time()
    wait_until(lambda: election(zk) == ["coord-b", "coord-a"], 15,
               "coord-a contends again behind coord-b", c)
    print(f"coord-a contends again {time.time() - healed_at:.2f}s after the heal")
    for _ in range(30):
        assert c.leader() == "coord-b", c.logs()
        assert epoch_now(zk) == epoch_b, "the epoch moved while B leads\n" + c.logs()
        time.sleep(0.1)
    log_a = c.procs["coord-a"].log.read_text(errors="replace")
    assert f"term {epoch_a} ends" in log_a and "coord-a was deposed" in log_a, log_a[-3000:]
    assert f"leads with epoch {epoch_b}" not in log_a
    time.sleep(5)
    assert c.leader() == "coord-b" and c.procs["coord-a"].alive(), c.logs()
    assert zk_proxy.stats()["healed"] >= 1
    ran_after = rec.wait_for(lambda r: r.state == "succeeded" and r.epoch == epoch_b
                             and (r.started_at or 0) > healed_at + 3, 10)
    assert ran_after is not None, "the cluster stopped running after the heal\n" + c.logs()

    t1 = time.time()
    assert max(r.epoch for r in rec.snapshot()) == epoch_b
    check(c, rec, t0, t1)


def test_orders_forged_with_the_deposed_epoch_are_rejected(  # type: ignore[no-untyped-def]
    cluster, zk, zk_proxy, amqp_url: str
) -> None:
    c, rec = cluster
    epoch_a = leader_behind_proxy(c, rec, zk, zk_proxy)
    before_cut = time.time()
    _cut_at, epoch_b, _ = cut_leader(c, rec, zk, zk_proxy, epoch_a)

    services = load_catalogue(CATALOGUE).services

    def order(run_id: str, service: str, node: str, issued: float) -> bytes:
        svc = services[service]
        return encode(RunOrder(
            run_id=run_id, service=service, node=node, trigger="scheduled", slot=issued,
            epoch=epoch_a, issued_at=issued, deadline=time.time() + 60, timeout=svc.timeout,
            callable=svc.utility.callable, params={"seconds": 1.0} if svc.run_groups else {},
            allowed_roles=sorted(svc.allowed_roles), run_groups=sorted(svc.run_groups),
        ))

    # As if A's orders were held up in transit and arrived after the failover.
    forged = {
        f"forged-tick-{uuid.uuid4().hex[:6]}": ("Tick", "w-proc"),
        f"forged-stats-{uuid.uuid4().hex[:6]}": ("Stats A", "w-master"),
    }
    broker = transport.make_broker(amqp_url)
    try:
        for run_id, (service, node) in forged.items():
            transport.send(broker, transport.node_queue(node),
                           order(run_id, service, node, before_cut))
    finally:
        broker.close()

    def refused(run_id: str, node: str) -> bool:
        lines = c.procs[node].log.read_text(errors="replace").splitlines()
        return any(f"refused {run_id}" in line and f"stale epoch {epoch_a} < {epoch_b}" in line
                   for line in lines)

    # The workers refuse them at once, A still cut off.
    wait_until(lambda: all(refused(i, node) for i, (_, node) in forged.items()), 10,
               "the workers refuse the forged orders", c)
    # Their rejections reach the history once A has let go of rota.results: a deposed leader
    # stuck in a commit holds its share of them until the link heals (see
    # test_a_commit_after_the_term_ended_fails_fast).
    zk_proxy.heal()
    wait_until(lambda: election(zk) == ["coord-b", "coord-a"], 15,
               "coord-a contends again behind coord-b", c)
    for run_id in forged:
        got = rec.wait_for(lambda r, i=run_id: r.run_id == i and r.state == "rejected", 10)
        assert got is not None, f"{run_id}: no rejection\n{c.logs()}"
        assert f"stale epoch {epoch_a}" in (got.reason or ""), got.reason
        assert f"< {epoch_b}" in (got.reason or ""), got.reason
        assert got.epoch == epoch_a
    time.sleep(1)
    assert not any(r.run_id in forged and r.state in RAN | {"running"} for r in rec.snapshot())
    assert not any(e["run_id"] in forged for e in c.journal()), "a forged order ran"
    report = audit_journal(c.journal())
    assert not report.violations, "\n".join(report.violations[:25])
    assert c.leader() == "coord-b"


def test_a_commit_after_the_term_ended_fails_fast(zk_hosts: str, zk_proxy: FaultProxy) -> None:
    coordination = ZkCoordination(proxied_zk(zk_hosts, zk_proxy), session_timeout=2.0,
                                  identifier="cut-off")
    terms: queue.Queue[Term] = queue.Queue()
    release = threading.Event()

    def lead(term: Term) -> None:
        terms.put(term)
        release.wait(30)

    leading = threading.Thread(target=coordination.contend, args=("cut-off", lead), daemon=True)
    leading.start()
    outcome: queue.Queue[object] = queue.Queue()
    try:
        term = terms.get(timeout=20)
        term.load()
        term.commit({"before-the-cut": b"1"})
        zk_proxy.blackhole()
        assert term.wait_lost(5), "a suspended connection must end the term"

        def commit() -> None:
            try:
                term.commit({"after-the-cut": b"2"})
                outcome.put("committed")
            except Exception as exc:
                outcome.put(exc)

        threading.Thread(target=commit, daemon=True).start()
        try:
            got: object = outcome.get(timeout=3)
        except queue.Empty:
            got = "still blocked after 3 s"
    finally:
        zk_proxy.heal()
        release.set()
        coordination.close()
    assert isinstance(got, Fenced), f"commit after the term ended: {got!r}"


def test_worker_cut_off_from_rabbitmq(  # type: ignore[no-untyped-def]
    cluster, zk, amqp_proxy, amqp_url: str
) -> None:
    c, rec = cluster
    victim = "w-master"
    start_workers(c, via={victim: through(c, amqp=proxied_amqp(amqp_url, amqp_proxy))})
    c.coordinator("coord-a")
    wait_until(lambda: c.leader() == "coord-a", 20, "coord-a leads", c)
    assert rec.wait_for(lambda r: r.state == "succeeded" and r.node == victim, 20), c.logs()
    t0 = time.time()
    time.sleep(3)
    after = time.time()
    # Cut just after one of its `Everywhere` runs (every 3 s, placement `all`) has reported:
    # the order for the next one leaves 1.5 s later, during the cut. Cut at any moment, the
    # node may hold an order sent just before it, whose run cannot report; every later slot of
    # that service is then skipped for it ("previous run still running"), and with Tick placed
    # on the node with fewer active runs nothing new might be dispatched to it at all.
    settled = rec.wait_for(lambda r: r.service == "Everywhere" and r.node == victim
                           and r.state == "succeeded" and (r.started_at or 0) > after, 10)
    assert settled is not None, c.logs()

    amqp_proxy.blackhole()
    cut_at = time.time()
    seen_before_cut = len(rec.snapshot())
    assert cut_at - (settled.started_at or 0) < LEAD_TIME, "cut too late to be sure"
    time.sleep(8)
    # Its ZooKeeper session lived on: the leader never took it for dead.
    assert victim in {n for n in zk.get_children("/rota/nodes")}, c.logs()
    assert not any(r.state == "lost" for r in rec.snapshot()), c.logs()
    assert c.procs[victim].alive()
    seen_before_heal = len(rec.snapshot())
    amqp_proxy.heal()
    healed_at = time.time()
    print(f"cut {healed_at - cut_at:.1f}s; proxy {amqp_proxy.stats()}")

    resumed = rec.wait_for(lambda r: r.node == victim and r.state == "succeeded"
                           and (r.started_at or 0) > healed_at, 20)
    assert resumed is not None, f"{victim} did not resume after the heal\n{c.logs()}"
    print(f"{victim} ran again {(resumed.started_at or 0) - healed_at:.2f}s after the heal")
    assert amqp_proxy.stats()["forwarded"] > amqp_proxy.stats()["healed"], "no reconnection"
    time.sleep(8)
    t1 = time.time()

    # What was dispatched to it during the cut ran after the heal, or ended with a reason.
    during = {
        r.run_id for r in rec.snapshot()[seen_before_cut:seen_before_heal]
        if r.node == victim and r.state == "dispatched"
    }
    finals = {r.run_id: r for r in rec.finals(end=t1)}
    outcomes = []
    for run_id in sorted(during):
        f = finals[run_id]
        outcomes.append(f"{f.service}:{f.state}")
        if f.state in RAN:
            assert (f.started_at or 0) >= healed_at, f
        else:
            assert f.state in NOT_RUN and f.reason, f"{run_id} left as {f.state}: {f}"
    print(f"dispatched to {victim} during the cut: {len(during)} -> {sorted(outcomes)}")
    assert during, "nothing was dispatched to the cut-off worker: the test proved nothing"
    started = [e for e in c.journal() if e["event"] == "start" and e["node"] == victim]

    def sent_during_the_cut(e: dict[str, object]) -> bool:
        # An order held for its slot was sent up to LEAD_TIME before it, maybe before the cut.
        start_at = e.get("start_at")
        sent_by = float(start_at) - LEAD_TIME if start_at else float(e["at"])  # type: ignore[arg-type]
        return cut_at + 0.5 < sent_by and float(e["at"]) < healed_at  # type: ignore[arg-type]

    assert not [e for e in started if sent_during_the_cut(e)], (
        "a run started on the cut-off worker from an order it could not have received")

    check(c, rec, t0, t1)
    for p in c.procs.values():
        assert p.alive(), f"{p.name} died\n{c.logs()}"


def test_daemon_history_across_a_partitioned_leader(cluster, zk, zk_proxy) -> None:  # type: ignore[no-untyped-def]
    c, rec = cluster
    epoch_a = leader_behind_proxy(c, rec, zk, zk_proxy)
    t0 = time.time()
    # Cut A off while Calculator runs under it (it resumes after each Stats run and is paused
    # for the next one), so that B is the one to pause it.
    resumed = rec.wait_for(lambda r: r.service == "Calculator" and r.trigger == "daemon"
                           and r.state == "running" and (r.started_at or 0) > t0, 15)
    assert resumed is not None, c.logs()
    _cut_at, epoch_b, _ = cut_leader(c, rec, zk, zk_proxy, epoch_a)
    # Heal before B's first pause of it is awaited: B's progress must not hang on results
    # held by A (see test_a_commit_after_the_term_ended_fails_fast).
    zk_proxy.heal()
    stats = rec.wait_for(lambda r: r.service.startswith("Stats") and r.state == "succeeded"
                         and r.epoch == epoch_b, 15)
    assert stats is not None, c.logs()
    time.sleep(6)
    t1 = time.time()
    # The published history must agree with the workers' journals: one open interval per
    # running daemon instance, and the interval A opened closed by B's pause (no overlap).
    open_spans: dict[tuple[str, str | None], list[str]] = {}
    for r in rec.finals():
        if r.trigger == "daemon" and r.finished_at is None:
            open_spans.setdefault((r.service, r.node), []).append(r.run_id)
    twice = {k: v for k, v in open_spans.items() if len(v) > 1}
    assert not twice, f"daemon instances shown running twice at once: {twice}"
    check(c, rec, t0, t1, min_slots=5)


def test_leader_and_worker_ride_through_the_loss_of_their_zookeeper_server(  # type: ignore[no-untyped-def]
    zk_proxy_b, cluster, zk, zk_proxy
) -> None:
    c, rec = cluster
    proxies = (zk_proxy, zk_proxy_b)
    chroot = c.zk_hosts.split("/", 1)[1]
    two = through(c, zk=f"{zk_proxy.address},{zk_proxy_b.address}/{chroot}")
    start_workers(c, via={"w-master": two})
    two.coordinator("coord-a")
    wait_until(lambda: c.leader() == "coord-a", 20, "coord-a leads", c)
    c.coordinator("coord-b")
    wait_until(lambda: election(zk) == ["coord-a", "coord-b"], 20, "coord-b contends", c)
    epoch_a = epoch_now(zk)
    got = rec.wait_for(lambda r: r.service == "Stats A" and r.state == "succeeded"
                       and r.epoch == epoch_a, 20)
    assert got is not None, c.logs()
    t0 = time.time()
    reset_during: list[str] = []
    for _ in range(3):
        # Reset while a run holding a run group runs on the worker behind the proxies.
        seen = {r.run_id for r in rec.snapshot()}
        running = rec.wait_for(lambda r, seen=seen: r.service == "Stats A"
                               and r.state == "running" and r.run_id not in seen, 15)
        assert running is not None, c.logs()
        accepted = sum(p.stats()["accepted"] for p in proxies)
        for p in proxies:
            p.reset()
        reset_during.append(running.run_id)
        wait_until(lambda n=accepted: sum(p.stats()["accepted"] for p in proxies) >= n + 2,
                   5, "coord-a and w-master reconnect", c)
        time.sleep(2)
    time.sleep(6)
    t1 = time.time()

    assert epoch_now(zk) == epoch_a, "the epoch moved\n" + c.logs()
    assert c.leader() == "coord-a" and election(zk) == ["coord-a", "coord-b"], c.logs()
    log_a = c.procs["coord-a"].log.read_text(errors="replace")
    assert log_a.count("leads with epoch") <= 2, log_a[-3000:]  # contend's line and _lead's
    assert f"leads with epoch {epoch_a}" in log_a and f"term {epoch_a} ends" not in log_a
    assert "rebuilds its state" not in log_a and "was deposed" not in log_a
    assert f"term {epoch_a} goes on" in log_a, log_a[-3000:]
    finals = {r.run_id: r for r in rec.finals(end=t1)}
    for run_id in reset_during:
        assert finals[run_id].state == "succeeded", finals[run_id]
    stopped = [r for r in rec.snapshot() if "ZooKeeper session" in (r.error or "")]
    assert not stopped, f"runs stopped for session trouble: {stopped[:3]}"
    assert max(r.epoch for r in rec.snapshot()) == epoch_a
    check(c, rec, t0, t1, min_slots=10)
