"""Contract tests of `Coordination`, run on the in-memory implementation and on real ZooKeeper.

The zk variants use the `zk_hosts` fixture (a private chroot on the session's ZooKeeper);
tests named `test_zk_*` exercise what only a real server has: session expiry, dropped
connections, a SIGKILLed leader, a server restart.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest
from kazoo.client import KazooClient
from kazoo.protocol.connection import _CONNECTION_DROP

from coordinator.core.actions import Changes
from coordinator.core.run import Run, RunState, Trigger
from coordinator.forms import run_to_message
from coordinator.ledger import Ledger
from ops import localservers
from protocol import encode
from protocol.coordination import (
    Coordination,
    Fenced,
    LedgerFormatError,
    MemoryCoordination,
    Term,
)
from protocol.ledger_layout import COMPACT_RATIO, PRESSURE_BUDGET
from protocol.zk import (
    BUCKET_COUNT,
    BUCKETS,
    DELTAS,
    ELECTION,
    EPOCH,
    JOURNAL,
    LEDGER,
    LOG,
    MARKER,
    MAX_BYTES,
    MAX_OPS,
    ZkCoordination,
    ZkTerm,
    _Op,
    bucket_of,
    encode_name,
)

ROOT = Path(__file__).resolve().parents[2]
WAIT = 15.0


def wait_for(predicate: Callable[[], object], timeout: float = WAIT, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.01)


class Backend:
    """Makes participants that share one coordination store, and breaks them on demand."""

    def __init__(self, kind: str, hosts: str | None = None) -> None:
        self.kind = kind
        self.hosts = hosts
        self._memory = MemoryCoordination() if kind == "memory" else None
        self.made: list[Coordination] = []

    def new(self, identifier: str = "") -> Coordination:
        if self._memory is not None:
            coord: Coordination = self._memory.handle()
        else:
            assert self.hosts is not None
            coord = ZkCoordination(self.hosts, identifier=identifier, session_timeout=2.0)
        self.made.append(coord)
        return coord

    def bump_epoch(self) -> None:
        """What a newer leader does: the epoch moves on behind the current term's back."""
        if self._memory is not None:
            with self._memory.store.lock:
                self._memory.store.epoch += 1
            return
        raw_zk(self.hosts or "", lambda client: client.set(EPOCH, b"intruder"))

    def close(self) -> None:
        for coord in self.made:
            coord.close()


def raw_zk(hosts: str, action: Callable[[KazooClient], object]) -> None:
    client = KazooClient(hosts=hosts, timeout=5.0)
    client.start(timeout=15.0)
    try:
        action(client)
    finally:
        client.stop()
        client.close()


def expire_session(hosts: str, coord: ZkCoordination) -> None:
    """End `coord`'s session on the server: attach a second client to it and close that."""
    old = coord.client.client_id
    assert old is not None

    def renewed() -> bool:
        now = coord.client.client_id
        return now is not None and now[0] != old[0]

    deadline = time.monotonic() + WAIT
    while not renewed():
        assert time.monotonic() < deadline, "the session did not expire"
        thief = KazooClient(hosts=hosts, timeout=2.0)
        thief._session_id, thief._session_passwd = old
        try:
            thief.start(timeout=5.0)
            thief.stop()
        except Exception:
            pass
        finally:
            thief.close()
        for _ in range(30):
            if renewed():
                return
            time.sleep(0.1)


class Contender:
    """Runs `contend` on a thread; each term is handed to the test, which ends it with `done`."""

    def __init__(self, coord: Coordination, name: str, max_terms: int | None = None) -> None:
        self.coord = coord
        self.name = name
        self.max_terms = max_terms
        self.terms: queue.Queue[tuple[Term, threading.Event]] = queue.Queue()
        self.intervals: list[tuple[float, float, int, str | None]] = []
        self.led = 0
        self.thread = threading.Thread(target=self._run, name=f"contend-{name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.coord.contend(self.name, self._lead)

    def _lead(self, term: Term) -> None:
        start = time.monotonic()
        seen_leader = self.coord.leader()
        done = threading.Event()
        self.terms.put((term, done))
        while not done.wait(0.01) and not term.lost():
            pass
        self.intervals.append((start, time.monotonic(), term.epoch, seen_leader))
        self.led += 1
        if self.max_terms is not None and self.led >= self.max_terms:
            self.coord.stop()

    def next_term(self, timeout: float = WAIT) -> tuple[Term, threading.Event]:
        return self.terms.get(timeout=timeout)

    def stop(self) -> None:
        self.coord.stop()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), f"{self.name} did not stop contending"


@pytest.fixture(params=["memory", "zk"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    hosts = request.getfixturevalue("zk_hosts") if request.param == "zk" else None
    made = Backend(request.param, hosts)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def zk(zk_hosts: str) -> Iterator[Backend]:
    made = Backend("zk", zk_hosts)
    try:
        yield made
    finally:
        made.close()


# -- the contract ------------------------------------------------------------------------
def test_the_leaders_advertised_url_is_known_to_the_others(backend: Backend) -> None:
    """A standby's page links to the leader's: contenders advertise where they serve."""
    observer = backend.new("observer")
    a, b = backend.new("a"), backend.new("b")
    a.advertise("http://a.example:9400")
    b.advertise("http://b.example:9400")
    first = Contender(a, "a", max_terms=1)
    term, done = first.next_term()
    assert observer.leader() == "a"
    assert observer.leader_url() == "http://a.example:9400"
    second = Contender(b, "b", max_terms=1)
    done.set()
    term, done = second.next_term()
    wait_for(lambda: observer.leader() == "b", what="b to lead")
    assert observer.leader_url() == "http://b.example:9400"
    done.set()
    wait_for(lambda: observer.leader() is None, what="the election to empty")
    assert observer.leader_url() is None


def test_one_leader_at_a_time_and_epochs_increase(backend: Backend) -> None:
    observer = backend.new("observer")
    seen: list[int] = []
    observer.watch_epoch(seen.append)
    first_epoch = observer.current_epoch()
    racers = [Contender(backend.new(n), n, max_terms=3) for n in ("a", "b")]
    handled, deadline = 0, time.monotonic() + 60
    while handled < 6:  # whichever leads now: hold the term briefly, then end it
        assert time.monotonic() < deadline, "terms stopped coming"
        for racer in racers:
            try:
                term, done = racer.terms.get(timeout=0.02)
            except queue.Empty:
                continue
            time.sleep(0.05)
            assert not term.lost()
            done.set()
            handled += 1
    for racer in racers:
        wait_for(lambda r=racer: r.led == 3, what=f"{racer.name} to lead three terms")
        racer.stop()
    terms = sorted((*iv, r.name) for r in racers for iv in r.intervals)
    assert len(terms) == 6
    for (_s0, end0, epoch0, _l0, _n0), (start1, _e1, epoch1, _l1, _n1) in zip(
        terms, terms[1:], strict=False
    ):
        assert start1 >= end0, "two contenders led at once"
        assert epoch1 > epoch0
    assert terms[0][2] > first_epoch
    assert all(leader == name for *_rest, leader, name in terms), "leader() names the holder"
    last = terms[-1][2]
    wait_for(lambda: seen and seen[-1] == last, what="watch_epoch to reach the last epoch")
    assert seen == sorted(seen)
    assert observer.current_epoch() == last


def test_watch_epoch_follows_every_term(backend: Backend) -> None:
    observer = backend.new("observer")
    seen: list[int] = []
    observer.watch_epoch(seen.append)
    assert seen == [observer.current_epoch()]
    racer = Contender(backend.new("solo"), "solo", max_terms=3)
    epochs = []
    for _ in range(3):
        term, done = racer.next_term()
        epochs.append(term.epoch)
        assert racer.coord.current_epoch() == term.epoch
        wait_for(lambda t=term: t.epoch in seen, what=f"epoch {term.epoch} to be watched")
        done.set()
    racer.stop()
    assert epochs == sorted(set(epochs))
    assert seen == sorted(seen)
    assert set(epochs) <= set(seen)


def test_deposed_term_is_fenced(backend: Backend) -> None:
    racer = Contender(backend.new("a"), "a")
    term, done = racer.next_term()
    term.commit({"run/kept": b"1"})
    backend.bump_epoch()
    assert term.wait_lost(WAIT), "a newer epoch must end the term"
    with pytest.raises(Fenced):
        term.commit({"run/late": b"2"})
    with pytest.raises(Fenced):  # several chunks on ZooKeeper: none of them lands
        term.commit({f"run/late-{i}": b"x" * 1500 for i in range(1000)})
    done.set()
    newer, done2 = racer.next_term()
    assert newer.epoch > term.epoch + 1  # the bump, then this term's own
    assert newer.load() == {"run/kept": b"1"}
    done2.set()
    racer.stop()


ODD_KEYS = ["run/abc", "cursor/a%2Fb", "x/../y", "history/\u00fc ber", "run/.", ".", "..",
            "", "plain", "a/b/c/", "%", "%2E"]


def test_ledger_round_trip_across_chunks(backend: Backend) -> None:
    racer = Contender(backend.new("a"), "a", max_terms=2)
    term, done = racer.next_term()
    assert term.load() == {}
    expected: dict[str, bytes] = {
        f"run/{i:04d}": bytes([i % 251]) * (600 + i % 7) for i in range(1000)
    }
    expected.update({k: k.encode() or b"empty" for k in ODD_KEYS})
    if isinstance(term, ZkTerm):
        term.max_bytes = 50_000  # over one transaction's worth: journaled, in chunks
    term.commit(expected)
    if isinstance(term, ZkTerm):
        assert term.transactions >= 3, "1,012 writes take at least three transactions"
    assert term.load() == expected

    changes: dict[str, bytes | None] = {}
    for i in range(0, 1000, 3):
        changes[f"run/{i:04d}"] = None  # 334 deletes
    for i in range(1, 1000, 5):
        changes[f"run/{i:04d}"] = b"updated"
    for i in range(100):
        changes[f"cursor/new-{i}"] = b"c"
    changes["run/never-existed"] = None
    changes["."] = None
    term.commit(changes)
    for key, value in changes.items():
        if value is None:
            expected.pop(key, None)
        else:
            expected[key] = value
    assert term.load() == expected
    term.commit({"run/0000": None, "run/0003": None, ".": None})  # deleted twice: no error
    assert term.load() == expected
    done.set()

    fresh, done2 = racer.next_term()  # a new term commits before it loads
    fresh.commit({"run/0001": b"again", "run/0002": None, "run/0003": b"back"})
    expected.update({"run/0001": b"again", "run/0003": b"back"})
    expected.pop("run/0002")
    assert fresh.load() == expected
    done2.set()
    racer.stop()


def test_announce_withdraw_show_in_watch_nodes(backend: Backend) -> None:
    observer = backend.new("observer")
    snaps: list[dict[str, bytes]] = []
    observer.watch_nodes(snaps.append)
    assert snaps == [{}]
    worker = backend.new("w")
    worker.announce("n1", b"one")
    worker.announce("rack/2", b"two")
    wait_for(lambda: snaps[-1] == {"n1": b"one", "rack/2": b"two"}, what="both nodes")
    worker.announce("n1", b"one, again")
    wait_for(lambda: snaps[-1].get("n1") == b"one, again", what="new announcement data")
    worker.withdraw("n1")
    wait_for(lambda: snaps[-1] == {"rack/2": b"two"}, what="n1 withdrawn")
    worker.withdraw("n1")  # twice: no error
    late: list[dict[str, bytes]] = []
    observer.watch_nodes(late.append)
    assert late == [{"rack/2": b"two"}]


def test_ephemeral_node_vanishes_when_its_session_ends(backend: Backend) -> None:
    observer = backend.new("observer")
    snaps: list[dict[str, bytes]] = []
    observer.watch_nodes(snaps.append)
    worker = backend.new("w")
    worker.announce("w1", b"x")
    wait_for(lambda: "w1" in snaps[-1], what="w1 announced")
    worker.close()
    wait_for(lambda: "w1" not in snaps[-1], what="w1 gone with its session")


FAILOVER_BOUND = 15.0
"""Seconds from a leader's death to its successor's first term: a guarantee, not a benchmark
(2-3 s is usual with the 2 s session timeout; bench/cluster.py measures it)."""


def test_failover_time(backend: Backend, capsys: pytest.CaptureFixture[str]) -> None:
    """The leader dies without releasing; the other contender takes over within the bound."""
    if backend.kind == "memory":
        leader = Contender(backend.new("a"), "a")
        old_epoch = leader.next_term()[0].epoch
        follower = Contender(backend.new("b"), "b")
        time.sleep(0.2)
        killed = time.monotonic()
        leader.coord.stop()  # its term ends where it stands; nothing is handed over
    else:
        proc, old_epoch = start_doomed_leader(backend.hosts or "")
        follower = Contender(backend.new("b"), "b")
        observer = backend.new("observer")
        assert isinstance(observer, ZkCoordination)
        wait_for(lambda: len(observer.client.get_children(ELECTION)) == 2, what="b to contend")
        killed = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(WAIT)
    try:
        term, done = follower.next_term(timeout=2 * FAILOVER_BOUND)
    except queue.Empty:
        raise AssertionError(f"no new leader {2 * FAILOVER_BOUND:.0f} s after the kill") from None
    took = time.monotonic() - killed
    with capsys.disabled():
        print(f"\n[{backend.kind}] failover: leader killed -> new leader in {took * 1000:.0f} ms")
    done.set()
    follower.stop()
    assert term.epoch > old_epoch
    assert took <= FAILOVER_BOUND, f"failover took {took:.1f} s, over {FAILOVER_BOUND:.0f} s"


def start_doomed_leader(hosts: str) -> tuple[subprocess.Popen[str], int]:
    """A leader in another process, announced as node "doomed"; returns it and its epoch."""
    code = (
        "import sys, time\n"
        "from protocol.zk import ZkCoordination\n"
        "c = ZkCoordination(sys.argv[1], identifier='doomed')\n"
        "c.announce('doomed', b'x')\n"
        "def lead(term):\n"
        "    print('LEADING', term.epoch, flush=True)\n"
        "    time.sleep(3600)\n"
        "c.contend('doomed', lead)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, hosts], cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("LEADING"), f"the leader process said {line!r}"
    return proc, int(line.split()[1])


# -- only a real ZooKeeper -------------------------------------------------------------
def test_zk_sigkilled_node_vanishes_after_session_timeout(
    zk: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    observer = zk.new("observer")
    snaps: list[dict[str, bytes]] = []
    observer.watch_nodes(snaps.append)
    proc, _epoch = start_doomed_leader(zk.hosts or "")
    wait_for(lambda: "doomed" in snaps[-1], what="the doomed node")
    killed = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(WAIT)
    wait_for(lambda: "doomed" not in snaps[-1], what="the dead node to vanish")
    took = time.monotonic() - killed
    wait_for(lambda: observer.leader() is None, what="the election to empty")
    with capsys.disabled():
        print(f"\n[zk] SIGKILLed node vanished after {took * 1000:.0f} ms")
    assert took < 10


def test_zk_expired_session_fences_the_leader(zk: Backend) -> None:
    a = zk.new("a")
    assert isinstance(a, ZkCoordination)
    trouble: list[str] = []
    a.on_session_trouble(lambda: trouble.append("suspended"), lambda: trouble.append("lost"))
    leader = Contender(a, "a")
    term, done = leader.next_term()
    follower = Contender(zk.new("b"), "b")
    term.commit({"run/1": b"by a"})
    expire_session(zk.hosts or "", a)
    assert term.wait_lost(WAIT)
    newer, done_b = follower.next_term()
    assert newer.epoch > term.epoch
    with pytest.raises(Fenced):
        term.commit({"run/2": b"by a, deposed"})
    assert newer.load() == {"run/1": b"by a"}
    wait_for(lambda: "lost" in trouble, what="the session-lost callback")
    # `suspended` runs only if the connection stayed down for the grace before the expiry
    # was known; never after `lost`.
    assert trouble[-1] == "lost" and trouble.count("lost") == 1, trouble
    done.set()
    done_b.set()
    leader.stop()
    follower.stop()


def test_zk_dropped_connection_back_in_the_same_session_keeps_the_term(zk: Backend) -> None:
    a = zk.new("a")
    assert isinstance(a, ZkCoordination)
    trouble: list[str] = []
    a.on_session_trouble(lambda: trouble.append("suspended"), lambda: trouble.append("lost"))
    leader = Contender(a, "a")
    term, done = leader.next_term()
    term.commit({"run/x": b"1"})
    session = a.client.client_id
    a.client._call(_CONNECTION_DROP, a.client.handler.async_result())
    wait_for(lambda: not a.session_ok(), what="the connection to drop")
    wait_for(a.session_ok, what="the connection to come back")
    time.sleep(a.deadline + 0.5)
    assert not term.lost(), "a connection back in the same session must not end the term"
    assert a.client.client_id == session, "the session survived the dropped connection"
    assert trouble == [], "no session trouble within the grace"
    term.commit({"run/y": b"2"})
    assert term.load() == {"run/x": b"1", "run/y": b"2"}
    with pytest.raises(queue.Empty):
        leader.next_term(timeout=0.2)
    done.set()
    leader.stop()


def test_zk_expired_session_reannounces(zk: Backend) -> None:
    observer = zk.new("observer")
    snaps: list[dict[str, bytes]] = []
    observer.watch_nodes(snaps.append)
    worker = zk.new("w")
    assert isinstance(worker, ZkCoordination)
    worker.announce("w1", b"x")
    wait_for(lambda: snaps[-1] == {"w1": b"x"}, what="w1")
    old = worker.client.client_id
    assert old is not None
    expire_session(zk.hosts or "", worker)

    def owned_by_new_session() -> bool:
        stat = worker.client.exists("/rota/nodes/w1")
        cid = worker.client.client_id
        return bool(stat and cid and stat.ephemeralOwner == cid[0] != old[0])

    wait_for(owned_by_new_session, what="w1 re-announced in the new session")
    wait_for(lambda: snaps[-1] == {"w1": b"x"}, what="the observer to see w1 again")


def test_zk_leftover_announcement_is_replaced(zk: Backend) -> None:
    first = zk.new("w")
    first.announce("w1", b"old")
    assert isinstance(first, ZkCoordination)
    # the same node restarted while its old session still lives
    second = zk.new("w")
    second.announce("w1", b"new")
    assert isinstance(second, ZkCoordination)
    stat = second.client.exists("/rota/nodes/w1")
    assert stat is not None and stat.ephemeralOwner == second.client.client_id[0]
    data, _ = second.client.get("/rota/nodes/w1")
    assert data == b"new"


def test_zk_commit_recovers_when_keys_change_behind_its_back(zk: Backend) -> None:
    racer = Contender(zk.new("a"), "a")
    term, done = racer.next_term()
    term.commit({"run/a": b"1", "run/b": b"2", "log/gone": b"g"})
    term.load()

    def meddle(client: KazooClient) -> None:  # a znode the term thinks absent, and the reverse
        client.create(f"{LOG}/surprise", b"planted")
        client.delete(f"{LOG}/gone")

    raw_zk(zk.hosts or "", meddle)
    term.commit({"log/surprise": b"mine", "log/gone": None, "run/a": None, "run/b": b"3"})
    assert term.load() == {"run/b": b"3", "log/surprise": b"mine"}
    assert not term.lost()
    done.set()
    racer.stop()


def test_zk_contend_survives_a_failing_lead(zk: Backend) -> None:
    coord = zk.new("a")
    epochs: list[int] = []

    def lead(term: Term) -> None:
        epochs.append(term.epoch)
        if len(epochs) == 1:
            raise RuntimeError("the broker is down")
        coord.stop()

    thread = threading.Thread(target=coord.contend, args=("a", lead), daemon=True)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive()
    assert len(epochs) == 2 and epochs[1] > epochs[0]


def test_zk_commit_chunks_respect_op_and_byte_limits() -> None:
    term = ZkTerm(SimpleNamespace(client=None), 1)  # type: ignore[arg-type]
    ops = [_Op("set", f"{LEDGER}/small-{i}", b"x" * 100) for i in range(900)]
    ops += [_Op("create", f"{LEDGER}/big-{i}", b"y" * 300_000) for i in range(5)]
    ops += [_Op("delete", f"{LEDGER}/gone-{i}") for i in range(10)]
    chunks = term._plan(ops)
    assert [op for chunk in chunks for op in chunk] == ops, "every op, in order"
    for chunk in chunks:
        assert len(chunk) + 1 <= MAX_OPS
        assert sum(op.size for op in chunk) <= MAX_BYTES
    assert len(chunks) >= 3 + 2  # 900 small writes by count, 1.5 MB of big ones by size


def test_zk_value_too_large_is_refused(zk: Backend) -> None:
    racer = Contender(zk.new("a"), "a")
    term, done = racer.next_term()
    with pytest.raises(ValueError, match="over the"):
        term.commit({"run/small": b"1", "run/huge": b"x" * 1_100_000})
    assert term.load() == {}
    assert not term.lost()
    done.set()
    racer.stop()


def test_zk_survives_a_zookeeper_restart(
    zk: Backend, servers: localservers.Servers, capsys: pytest.CaptureFixture[str]
) -> None:
    observer = zk.new("observer")
    snaps: list[dict[str, bytes]] = []
    observer.watch_nodes(snaps.append)
    worker = zk.new("w")
    worker.announce("w1", b"x")
    racer = Contender(zk.new("a"), "a")
    term, _done = racer.next_term()
    term.commit({"run/before": b"1"})
    wait_for(lambda: snaps[-1] == {"w1": b"x"}, what="w1")
    began = time.monotonic()
    localservers.restart_zookeeper(servers)
    assert term.wait_lost(WAIT)
    newer, done = racer.next_term(timeout=60)
    took = time.monotonic() - began
    assert newer.epoch > term.epoch
    assert newer.load() == {"run/before": b"1"}
    newer.commit({"run/after": b"2"})
    wait_for(lambda: snaps[-1] == {"w1": b"x"}, 30, what="w1 after the restart")
    with capsys.disabled():
        print(f"\n[zk] ZooKeeper restart -> leading again after {took:.1f} s")
    done.set()
    racer.stop()


# -- the compact ledger ------------------------------------------------------------------
def test_one_transaction_per_commit(backend: Backend) -> None:
    racer = Contender(backend.new("a"), "a")
    term, done = racer.next_term()
    term.load()
    before = term.transactions
    writes: dict[str, bytes | None] = {f"run/{i}": b"r" * 100 for i in range(1000)}
    writes.update({f"cursor/svc-{i}": b"c" for i in range(1000)})
    writes.update({f"log/ended/{i}": b"e" for i in range(10)})
    term.commit(writes)
    assert term.transactions - before == 1, "2,010 writes, one transaction"
    assert term.ops > 0
    done.set()
    racer.stop()


def _zk_read(hosts: str, action: Callable[[KazooClient], object]) -> object:
    got: list[object] = []
    raw_zk(hosts, lambda client: got.append(action(client)))
    return got[0]


def _buckets_of(client: KazooClient) -> dict[int, dict[str, bytes]]:
    return {int(n): msgpack.unpackb(client.get(f"{BUCKETS}/{n}")[0])
            for n in client.get_children(BUCKETS)}


def _deltas_of(client: KazooClient) -> dict[str, dict[str, bytes | None]]:
    return {n: msgpack.unpackb(client.get(f"{DELTAS}/{n}")[0])
            for n in sorted(client.get_children(DELTAS))}


def test_zk_commit_writes_what_changed_and_churn_retires_deltas(zk: Backend) -> None:
    hosts = zk.hosts or ""
    racer = Contender(zk.new("a"), "a")
    term, done = racer.next_term()
    assert isinstance(term, ZkTerm)
    assert term.load() == {}
    base: dict[str, bytes | None] = {f"cursor/svc-{i}": b"c" * 200 for i in range(5000)}
    base.update({f"log/ended/{i}": b"e" for i in range(3)})
    term.commit(base)  # 1.1 MB: over one transaction, a delta in parts
    assert _zk_read(hosts, lambda c: len(c.get_children(DELTAS))) > 1

    # A commit of a few keys writes a delta of those keys, not the buckets that hold them.
    written, transactions = term.written, term.transactions
    term.commit({"cursor/svc-7": b"moved", "cursor/svc-8": None, "log/ended/9": b"new"})
    assert term.transactions - transactions == 1
    assert term.written - written < 1_000, "a delta and a log key, no 4 kB bucket"
    deltas = _zk_read(hosts, _deltas_of)
    assert list(deltas.values())[-1] == {"cursor/svc-7": b"moved", "cursor/svc-8": None}
    assert _zk_read(hosts, lambda c: sorted(c.get_children(LOG))) == sorted(
        encode_name(f"ended/{i}") for i in (0, 1, 2, 9))
    assert _zk_read(hosts, lambda c: c.get_children(LEDGER)) == [MARKER.rsplit("/", 1)[1]]
    expected = _applied({k: v for k, v in base.items() if v is not None},
                        {"cursor/svc-7": b"moved", "cursor/svc-8": None, "log/ended/9": b"new"})

    # Later commits write every key again: the first delta is no longer needed and goes,
    # with no bucket written at all (the deltas are far under the compaction floor).
    first = list(deltas)[0]
    for i in range(60):
        change = {f"cursor/svc-{(i * 100 + j) % 5000}": b"d" * 200 for j in range(100)}
        written = term.written
        term.commit(change)
        expected.update(change)
        assert term.written - written < len(msgpack.packb(change)) + 1_000
        if first not in _zk_read(hosts, lambda c: c.get_children(DELTAS)):
            break
    else:
        raise AssertionError("the first delta was never deleted")
    assert _zk_read(hosts, _buckets_of) == {}
    done.set()
    newer, done2 = racer.next_term()
    assert newer.load() == expected
    done2.set()
    racer.stop()


def test_zk_keys_that_change_seldom_are_folded_into_buckets_in_steps(zk: Backend) -> None:
    hosts = zk.hosts or ""
    racer = Contender(zk.new("a"), "a")
    term, done = racer.next_term()
    assert isinstance(term, ZkTerm)
    term.load()
    cold: dict[str, bytes | None] = {f"override/svc-{i}": b"o" * 1_000 for i in range(4_500)}
    term.commit(cold)  # 4.6 MB of deltas: past the floor, so compaction begins
    first = _zk_read(hosts, lambda c: sorted(c.get_children(DELTAS))[0])
    expected: dict[str, bytes] = {k: v for k, v in cold.items() if v is not None}
    spent = changed = 0
    for i in range(400):
        change = {f"cursor/hot-{j}": b"%d" % i * 1_000 for j in range(20)}
        written = term.written
        term.commit(change)
        expected.update(change)
        spent += term.written - written
        changed += len(msgpack.packb(change))
        # each commit: its delta, plus at most the credit saved up; in all about
        # COMPACT_RATIO bucket bytes per delta byte
        assert term.written - written < len(msgpack.packb(change)) + PRESSURE_BUDGET + 1_000
        assert spent < (1 + COMPACT_RATIO) * changed + PRESSURE_BUDGET + 200 * (i + 1)
        if first not in _zk_read(hosts, lambda c: c.get_children(DELTAS)):
            break
    else:
        raise AssertionError("the first delta was never folded into the buckets")
    buckets = _zk_read(hosts, _buckets_of)
    assert sum(len(c) for c in buckets.values()) >= 4_500  # type: ignore[attr-defined]
    for index, content in buckets.items():  # type: ignore[attr-defined]
        assert all(bucket_of(k, BUCKET_COUNT) == index for k in content)
    done.set()
    newer, done2 = racer.next_term()
    assert newer.load() == expected
    done2.set()
    racer.stop()


def _applied(base: dict[str, bytes], writes: dict[str, bytes | None]) -> dict[str, bytes]:
    out = dict(base)
    for key, value in writes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _fence_at(zk: Backend, term: Term, where: str) -> None:
    """Make `term` deposed (a newer epoch) right after the named step of a chunked commit."""
    assert isinstance(term, ZkTerm)
    term.fault = lambda step: zk.bump_epoch() if step == where else None


def test_zk_leader_deposed_mid_chunked_commit_resumes_exactly(zk: Backend) -> None:
    hosts = zk.hosts or ""
    racer = Contender(zk.new("a"), "a")
    term, done = racer.next_term()
    assert isinstance(term, ZkTerm)
    before: dict[str, bytes] = {f"run/{i:04d}": b"old" for i in range(300)}
    before["log/ended/a"] = b"kept"
    term.commit(before)
    change: dict[str, bytes | None] = {
        f"run/{i:04d}": None if i % 3 == 0 else b"new" * 100 for i in range(300)}
    change.update({"log/ended/a": None, "log/ended/b": b"added", "cursor/x": b"1"})
    after = _applied(before, change)

    # Deposed after the last part of the delta, before its log keys were written.
    term.max_bytes = 5_000
    _fence_at(zk, term, "delta complete")
    with pytest.raises(Fenced):
        term.commit(change)
    assert term.transactions >= 3  # delta parts
    logs = _zk_read(hosts, lambda c: sorted(c.get_children(LOG)))
    assert logs == [encode_name("ended/a")], "the log keys are not written yet"
    done.set()

    # The successor sees all of the commit and writes the log keys with its first commit;
    # that one, in parts too and deposed before its delta is complete, loses nothing either.
    second, done2 = racer.next_term()
    assert isinstance(second, ZkTerm)
    assert second.load() == after
    second.max_bytes = 5_000
    _fence_at(zk, second, "delta 0")
    with pytest.raises(Fenced):
        second.commit({"cursor/y": b"2", **{f"run/{i:04d}": b"z" * 200 for i in range(1, 50)}})
    done2.set()

    third, done3 = racer.next_term()
    assert third.load() == after
    third.commit({"cursor/z": b"3"})  # one transaction: log keys written, leftovers deleted
    assert _zk_read(hosts, lambda c: sorted(c.get_children(LOG))) == [encode_name("ended/b")]
    names = _zk_read(hosts, lambda c: c.get_children(DELTAS))
    assert not [n for n in names if n.startswith(f"{second.epoch:010d}-")], \
        "the incomplete delta is deleted"
    done3.set()
    fourth, done4 = racer.next_term()
    assert fourth.load() == {**after, "cursor/z": b"3"}
    done4.set()
    racer.stop()


def test_zk_leader_deposed_mid_delta_leaves_the_ledger_as_before(zk: Backend) -> None:
    racer = Contender(zk.new("a"), "a")
    term, done = racer.next_term()
    assert isinstance(term, ZkTerm)
    before = {f"run/{i:04d}": b"old" for i in range(300)}
    term.commit(before)
    term.max_bytes = 3_000
    _fence_at(zk, term, "delta 1")
    with pytest.raises(Fenced):
        term.commit({f"run/{i:04d}": b"new" * 50 for i in range(300)})
    done.set()
    newer, done2 = racer.next_term()
    assert newer.load() == before
    newer.commit({"run/0000": b"after"})
    names = _zk_read(zk.hosts or "", lambda c: c.get_children(DELTAS))
    assert not [n for n in names if n.startswith(f"{term.epoch:010d}-000000000002-")], \
        "the incomplete delta is deleted"
    done2.set()
    newer3, done3 = racer.next_term()
    assert newer3.load() == {**before, "run/0000": b"after"}
    done3.set()
    racer.stop()


def _format_2(hosts: str, values: dict[str, bytes], journal: dict[str, bytes | None],
              partial: dict[str, bytes | None]) -> None:
    """A ledger as Rota's format 2 stored it: buckets, log znodes, the marker, and journals
    (one complete, of two parts, and one with a part missing) of commits too large for one
    transaction."""
    buckets: dict[int, dict[str, bytes]] = {}
    for key, value in values.items():
        if not key.startswith("log/"):
            buckets.setdefault(bucket_of(key, BUCKET_COUNT), {})[key] = value

    def plant(client: KazooClient) -> None:
        for index, content in buckets.items():
            client.create(f"{BUCKETS}/{index:04d}", msgpack.packb(content), makepath=True)
        for key, value in values.items():
            if key.startswith("log/"):
                client.create(f"{LOG}/{encode_name(key[4:])}", value, makepath=True)
        client.create(MARKER, msgpack.packb({"format": 2, "buckets": BUCKET_COUNT}),
                      makepath=True)
        half = len(journal) // 2
        items = list(journal.items())
        for part, chunk in enumerate((items[:half], items[half:])):
            client.create(f"{JOURNAL}/0000000003-000001-{part:04d}-0002",
                          msgpack.packb(dict(chunk)), makepath=True)
        client.create(f"{JOURNAL}/0000000004-000001-0000-0002", msgpack.packb(partial))

    raw_zk(hosts, plant)


def _format_2_ledger() -> tuple[dict[str, bytes], dict[str, bytes | None],
                                dict[str, bytes | None]]:
    values = {k: v for k, v in _legacy_ledger().items() if k != "history/Tick"}
    values.update({f"cursor/S{i:03d}": msgpack.packb(float(i)) for i in range(300)})
    values["log/ended/old"] = b"ended-runs"
    journal: dict[str, bytes | None] = {f"cursor/S{i:03d}": msgpack.packb(-1.0)
                                        for i in range(0, 300, 2)}
    journal.update({"run/tick-2": None, "log/ended/old": None, "log/ended/new": b"more"})
    partial: dict[str, bytes | None] = {"cursor/Tick": None, "cursor/S001": b"never"}
    return values, journal, partial


def test_zk_format_2_ledger_is_upgraded_once(zk: Backend) -> None:
    hosts = zk.hosts or ""
    values, journal, partial = _format_2_ledger()
    _format_2(hosts, values, journal, partial)
    expected = _applied(values, journal)
    racer = Contender(zk.new("a"), "a")
    term, done = racer.next_term()
    assert term.load() == expected, "the complete journal applied, the incomplete one not"
    marker = _zk_read(hosts, lambda c: msgpack.unpackb(c.get(MARKER)[0]))
    assert marker == {"format": 3, "buckets": BUCKET_COUNT}
    assert _zk_read(hosts, lambda c: c.get_children(JOURNAL)) == []
    assert _zk_read(hosts, lambda c: sorted(c.get_children(LOG))) == [encode_name("ended/new")]
    state = Ledger().restore({k: v for k, v in term.load().items() if k.startswith("cursor/")
                              or k.startswith("override/")})
    assert state.cursors["S000"] == -1.0 and state.cursors["S001"] == 1.0
    assert state.runs == [] and state.overrides == {"Tick/B": {"enabled": False}}
    term.commit({"cursor/Tick": msgpack.packb(3e9)})
    done.set()
    newer, done2 = racer.next_term()
    assert newer.load() == {**expected, "cursor/Tick": msgpack.packb(3e9)}, "upgraded once"
    done2.set()
    racer.stop()


def test_zk_format_2_upgrade_deposed_half_way_is_done_again(zk: Backend) -> None:
    hosts = zk.hosts or ""
    values, journal, partial = _format_2_ledger()
    _format_2(hosts, values, journal, partial)
    racer = Contender(zk.new("a"), "a")
    term, done = racer.next_term()
    assert isinstance(term, ZkTerm)
    term.max_bytes = 2_000
    _fence_at(zk, term, "upgrade 0")
    with pytest.raises(Fenced):
        term.load()
    marker = _zk_read(hosts, lambda c: msgpack.unpackb(c.get(MARKER)[0]))
    assert marker["format"] == 2, "still format 2: a format-2 coordinator could still read it"
    assert _zk_read(hosts, lambda c: c.get_children(JOURNAL))
    done.set()
    newer, done2 = racer.next_term()
    assert newer.load() == _applied(values, journal)
    assert _zk_read(hosts, lambda c: msgpack.unpackb(c.get(MARKER)[0]))["format"] == 3
    done2.set()
    racer.stop()


def _format_1(hosts: str, values: dict[str, bytes]) -> None:
    """A ledger as Rota's format 1 stored it: one znode per key under /rota/ledger."""
    def plant(client: KazooClient) -> None:
        for key, value in values.items():
            client.create(f"{LEDGER}/{encode_name(key)}", value, makepath=True)

    raw_zk(hosts, plant)


def _legacy_ledger() -> dict[str, bytes]:
    def run(run_id: str, state: RunState) -> bytes:
        done = state != RunState.RUNNING
        return encode(run_to_message(Run(
            run_id=run_id, service="Tick", trigger=Trigger.SCHEDULED, slot=1e9,
            queued_at=1e9, run_groups=frozenset(), node="n1", state=state,
            finished_at=1e9 + 1 if done else None, output_tail="tail" if done else "")))

    return {
        "run/tick-2": run("tick-2", RunState.RUNNING),
        "cursor/Tick": msgpack.packb(1e9),
        "lastrun/Tick": msgpack.packb(1e9),
        "override/Tick%2FB": msgpack.packb({"enabled": False}),
        "history/Tick": msgpack.packb([run("tick-1", RunState.SUCCEEDED)]),
    }


def test_zk_format_1_ledger_is_migrated_once(zk: Backend) -> None:
    hosts = zk.hosts or ""
    legacy = _legacy_ledger()
    _format_1(hosts, legacy)
    racer = Contender(zk.new("a"), "a")
    term, done = racer.next_term()
    assert term.load() == legacy
    assert _zk_read(hosts, lambda c: c.exists(MARKER)) is not None
    ledger = Ledger()
    state = ledger.restore(term.load())
    assert [r.run_id for r in state.runs] == ["tick-2"]
    assert state.overrides == {"Tick/B": {"enabled": False}}
    assert [r.run_id for r in ledger.recent_all(float("-inf"))] == ["tick-1"]
    writes = ledger.writes(Changes(cursors={"Tick": 2e9}))
    assert writes["history/Tick"] is None, "format 1's history is dropped once read"
    term.commit(writes)
    assert _zk_read(hosts, lambda c: c.get_children(LEDGER)) == [MARKER.rsplit("/", 1)[1]]
    done.set()

    _format_1(hosts, {"cursor/Planted": msgpack.packb(5.0)})  # a format-1 writer, too late
    newer, done2 = racer.next_term()
    expected = {k: v for k, v in legacy.items() if k != "history/Tick"}
    expected["cursor/Tick"] = msgpack.packb(2e9)
    assert newer.load() == expected, "migrated once: later format-1 keys are ignored"
    done2.set()
    racer.stop()


def test_zk_migration_deposed_half_way_is_done_again(zk: Backend) -> None:
    hosts = zk.hosts or ""
    legacy = {f"run/r{i:03d}": b"x" * 400 for i in range(200)}
    _format_1(hosts, legacy)
    racer = Contender(zk.new("a"), "a")
    term, done = racer.next_term()
    assert isinstance(term, ZkTerm)
    term.max_bytes = 5_000
    _fence_at(zk, term, "migrate 0")
    with pytest.raises(Fenced):
        term.load()
    assert _zk_read(hosts, lambda c: c.exists(MARKER)) is None
    assert _zk_read(hosts, lambda c: c.get_children(BUCKETS)), "some buckets were written"
    done.set()
    newer, done2 = racer.next_term()
    assert newer.load() == legacy
    done2.set()
    racer.stop()


def test_zk_newer_ledger_format_is_refused(zk: Backend) -> None:
    raw_zk(zk.hosts or "", lambda c: c.create(
        MARKER, msgpack.packb({"format": 4, "buckets": 64}), makepath=True))
    racer = Contender(zk.new("a"), "a")
    term, done = racer.next_term()
    with pytest.raises(LedgerFormatError, match="format 4.*Rota version that wrote it"):
        term.load()
    with pytest.raises(LedgerFormatError):
        term.commit({"run/x": b"1"})
    done.set()
    racer.stop()


def test_zk_load_time_of_a_large_ledger(zk: Backend, capsys: pytest.CaptureFixture[str]) -> None:
    """100,000 services (cursor and last run each), 10% with overrides, 1,000 active runs:
    the successor's load and restore times are printed (a measurement, not a bound)."""
    racer = Contender(zk.new("a"), "a")
    term, done = racer.next_term()
    assert isinstance(term, ZkTerm)
    term.load()
    names = [f"Service {i:06d}" for i in range(100_000)]
    changes = Changes(
        cursors={n: 1.8e9 for n in names}, last_runs={n: 1.8e9 - 5 for n in names},
        overrides={n: {"enabled": False, "period": 7} for n in names[::10]},
        runs={f"run-{i}": Run(
            run_id=f"run-{i}", service=names[i * 100], trigger=Trigger.SCHEDULED, slot=1.8e9,
            queued_at=1.8e9, run_groups=frozenset({"g"}), node="n1", state=RunState.RUNNING)
            for i in range(1000)})
    writes = Ledger().writes(changes)
    began = time.perf_counter()
    term.commit(writes)
    wrote = time.perf_counter() - began
    done.set()
    newer, done2 = racer.next_term()
    began = time.perf_counter()
    loaded = newer.load()
    loaded_in = time.perf_counter() - began
    state = Ledger().restore(loaded)
    restored_in = time.perf_counter() - began
    done2.set()
    racer.stop()
    assert len(state.cursors) == 100_000 and len(state.runs) == 1000
    assert len(state.overrides) == 10_000
    with capsys.disabled():
        print(f"\n[zk] ledger of 100,000 services, 10,000 overrides, 1,000 active runs "
              f"({sum(len(v or b'') for v in writes.values()) / 1e6:.1f} MB of values): "
              f"written in {wrote:.2f} s ({term.transactions} transactions); "
              f"successor load {loaded_in * 1000:.0f} ms, load + restore "
              f"{restored_in * 1000:.0f} ms")


def test_zk_load_time_against_format_1(zk: Backend, capsys: pytest.CaptureFixture[str]) -> None:
    """The same ledger (10,000 services, 10% with overrides, 100 active runs) loaded from
    format 1 (one znode per key: what the migration reads) and from format 3, in one run:
    printed, not bounded."""
    hosts = zk.hosts or ""
    names = [f"Service {i:05d}" for i in range(10_000)]
    changes = Changes(
        cursors={n: 1.8e9 for n in names}, last_runs={n: 1.8e9 - 5 for n in names},
        overrides={n: {"enabled": False} for n in names[::10]},
        runs={f"run-{i}": Run(
            run_id=f"run-{i}", service=names[i * 100], trigger=Trigger.SCHEDULED, slot=1.8e9,
            queued_at=1.8e9, run_groups=frozenset({"g"}), node="n1", state=RunState.RUNNING)
            for i in range(100)})
    values = {k: v for k, v in Ledger().writes(changes).items() if v is not None}

    def plant(client: KazooClient) -> None:
        client.ensure_path(LEDGER)
        items = list(values.items())
        pending = []
        for start in range(0, len(items), 300):
            txn = client.transaction()
            for key, value in items[start : start + 300]:
                txn.create(f"{LEDGER}/{encode_name(key)}", value)
            pending.append(txn.commit_async())
        for reply in pending:
            assert not any(isinstance(r, Exception) for r in reply.get())

    raw_zk(hosts, plant)
    racer = Contender(zk.new("a"), "a")
    term, done = racer.next_term()
    assert isinstance(term, ZkTerm)
    began = time.perf_counter()
    names_1 = term._children(LEDGER)[0]
    old = term._get_many([f"{LEDGER}/{n}" for n in names_1])
    format_1 = time.perf_counter() - began
    assert len(old) == len(values)
    assert term.load() == values  # migrates
    done.set()
    newer, done2 = racer.next_term()
    began = time.perf_counter()
    loaded = newer.load()
    format_2 = time.perf_counter() - began
    assert loaded == values
    done2.set()
    racer.stop()
    with capsys.disabled():
        print(f"\n[zk] {len(values):,} ledger keys: format 1 (a znode each) read in "
              f"{format_1 * 1000:.0f} ms; format 3 ({BUCKET_COUNT} buckets and deltas) loaded in "
              f"{format_2 * 1000:.0f} ms")
