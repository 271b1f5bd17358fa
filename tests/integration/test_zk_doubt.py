"""Losing one ZooKeeper server, and losing them all, as seen from Rota's clients.

One real ZooKeeper is reached through two `FaultProxy` instances, given to the client as two
ensemble members ("127.0.0.1:A,127.0.0.1:B/chroot"). Resetting the proxy a client uses is what
it sees when the ensemble member it talks to dies: kazoo goes SUSPENDED and reconnects through
the other with the same session. Black-holing both is a loss of quorum (or a partition): the
session expires.

- A leader's term rides through the reset: same epoch, no new term, nothing reloaded, and its
  next commit succeeds.
- A commit whose transaction is in flight when the link is reset is applied exactly once.
- A worker's run holding run groups keeps running through the reset; with both links down it
  is stopped before the session expires, as before.
- Quorum loss: the term ends after the doubt deadline, nothing is committed meanwhile, and
  after the heal the coordinator leads again with a higher epoch, the ledger as it was.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import ConnectionLoss

from protocol import RunEvent, RunOrder, encode
from protocol.batches import RUN_EVENTS, messages_of
from protocol.clock import SystemClock
from protocol.coordination import Fenced, Term
from protocol.transport import RESULTS, Delivery, make_transport
from protocol.zk import DELTAS, EPOCH, NODES, ZkCoordination, ZkTerm, _Op
from tests.faultproxy import FaultProxy
from workers.node import WorkerNode

WAIT = 15.0
SESSION = 2.0
UTILITY = "tests.unit.utilities_for_tests:until_cancelled"


def wait_for(predicate: Callable[[], object], timeout: float = WAIT, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.01)


@pytest.fixture
def proxies(zk_hosts: str) -> Iterator[tuple[FaultProxy, FaultProxy]]:
    host, port = zk_hosts.split("/", 1)[0].split(",")[0].rsplit(":", 1)
    a = FaultProxy(host, int(port)).start()
    b = FaultProxy(host, int(port)).start()
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.fixture
def raw(zk_hosts: str) -> Iterator[KazooClient]:
    """A client straight to the server, on the test's chroot."""
    client = KazooClient(hosts=zk_hosts, timeout=10.0)
    client.start(timeout=30.0)
    try:
        yield client
    finally:
        client.stop()
        client.close()


def ensemble(zk_hosts: str, proxies: tuple[FaultProxy, FaultProxy]) -> str:
    chroot = zk_hosts.split("/", 1)[1]
    return ",".join(p.address for p in proxies) + "/" + chroot


def in_use(proxies: tuple[FaultProxy, FaultProxy], timeout: float = 10.0) -> FaultProxy:
    """The proxy the client's live connection goes through (waited for while the client
    reconnects: a loaded server may drop a connection on its own)."""
    deadline = time.monotonic() + timeout
    while True:
        live = [p for p in proxies if p.stats()["active"] > 0]
        if len(live) == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert len(live) == 1, [p.stats() for p in proxies]
    return live[0]


def accepted(proxies: tuple[FaultProxy, FaultProxy]) -> int:
    return sum(p.stats()["accepted"] for p in proxies)


def reset_and_reconnect(coord: ZkCoordination, proxies: tuple[FaultProxy, FaultProxy]) -> None:
    """Reset the client's link; return once it is connected again (through either proxy)."""
    before = accepted(proxies)
    session = coord.client.client_id
    in_use(proxies).reset()
    wait_for(lambda: accepted(proxies) > before and coord.session_ok(), 5,
             "the client to reconnect")
    assert coord.client.client_id == session, "the session must survive a reset"


class Leader:
    """A contender whose terms the test takes, each held until released or lost."""

    def __init__(self, coord: ZkCoordination) -> None:
        self.coord = coord
        self.terms: queue.Queue[Term] = queue.Queue()
        self.release = threading.Event()
        self.thread = threading.Thread(target=coord.contend, args=("leader", self._lead),
                                       daemon=True)
        self.thread.start()

    def _lead(self, term: Term) -> None:
        self.terms.put(term)
        while not self.release.is_set() and not term.wait_lost(0.05):
            pass

    def next_term(self, timeout: float = WAIT) -> ZkTerm:
        term = self.terms.get(timeout=timeout)
        assert isinstance(term, ZkTerm)
        return term

    def close(self) -> None:
        self.release.set()
        self.coord.close()
        self.thread.join(WAIT)


@pytest.fixture
def leader(zk_hosts: str, proxies: tuple[FaultProxy, FaultProxy]) -> Iterator[Leader]:
    made = Leader(ZkCoordination(ensemble(zk_hosts, proxies), session_timeout=SESSION,
                                 identifier="leader"))
    try:
        yield made
    finally:
        made.close()


def epoch_of(raw: KazooClient) -> int:
    stat = raw.exists(EPOCH)
    return stat.version if stat is not None else 0


def deltas_of(raw: KazooClient, epoch: int) -> list[str]:
    return sorted(n for n in raw.get_children(DELTAS) if n.startswith(f"{epoch:010d}-"))


# -- a leader --------------------------------------------------------------------------------


def test_a_leaders_term_rides_through_the_loss_of_its_server(  # type: ignore[no-untyped-def]
    leader: Leader, proxies, raw: KazooClient
) -> None:
    term = leader.next_term()
    term.load()
    term.commit({"run/before": b"1"})
    layout, session = term._layout, leader.coord.client.client_id
    for i in range(3):
        reset_and_reconnect(leader.coord, proxies)
        time.sleep(leader.coord.deadline + 0.3)
        assert not term.lost(), f"reset {i}: the term ended"
        term.commit({f"run/after-{i}": b"2"})  # waits for the epoch check, if still pending
        assert not term.in_doubt()
    assert epoch_of(raw) == term.epoch, "the epoch moved"
    assert leader.coord.client.client_id == session
    assert term._layout is layout, "the ledger was reloaded"
    with pytest.raises(queue.Empty):
        leader.next_term(timeout=0.2)
    assert term.load() == {"run/before": b"1", "run/after-0": b"2", "run/after-1": b"2",
                           "run/after-2": b"2"}


def test_a_commit_in_flight_when_the_link_resets_is_applied_once(  # type: ignore[no-untyped-def]
    leader: Leader, proxies, raw: KazooClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rota.zk")
    term = leader.next_term()
    term.load()
    send = term._send
    interrupted: list[bool] = []

    def send_then_reset(ops: list[_Op]) -> list[Any]:
        """The first send of each commit: the link is reset right behind the request, so it
        may or may not reach the server, and its reply may or may not come back."""
        if len(interrupted) == rounds_done[0]:
            result = term._start(ops)
            in_use(proxies).reset()
            try:
                got = list(term._reply(result))
                interrupted.append(False)
                return got
            except ConnectionLoss:
                interrupted.append(True)
                raise
        return send(ops)

    term._send = send_then_reset  # type: ignore[method-assign]
    rounds_done = [0]
    expected: dict[str, bytes] = {}
    for i in range(6):
        wait_for(lambda: not term.in_doubt() and leader.coord.session_ok(), 5, "a sure term")
        key = f"run/{i}"
        term.commit({key: str(i).encode()})
        expected[key] = str(i).encode()
        rounds_done[0] += 1
    before = sum("had been applied before" in r.message for r in caplog.records)
    by_retry = sum("applied by its retry" in r.message for r in caplog.records)
    print(f"\ncommits whose reply was lost: {interrupted.count(True)} of {len(interrupted)} "
          f"({before} applied before the drop, {by_retry} by the retry)")
    assert before + by_retry == interrupted.count(True)
    assert not term.lost()
    assert epoch_of(raw) == term.epoch
    assert term.load() == expected
    assert term.transactions == 6


def test_an_interrupted_commit_that_was_applied_is_not_applied_again(  # type: ignore[no-untyped-def]
    leader: Leader, proxies, raw: KazooClient
) -> None:
    term = leader.next_term()
    term.load()
    send = term._send
    calls: list[str] = []

    def applied_then_lost(ops: list[_Op]) -> list[Any]:
        if not calls:
            calls.append("applied, reply lost")
            send(ops)
            in_use(proxies).reset()
            raise ConnectionLoss()
        calls.append("retry")
        return send(ops)

    term._send = applied_then_lost  # type: ignore[method-assign]
    term.commit({"run/once": b"1"})
    # The retry may itself meet the link still settling and be sent again: what counts is
    # that the commit applied once and the term goes on.
    assert calls[0] == "applied, reply lost" and calls[1:] and set(calls[1:]) == {"retry"}
    assert not term.lost() and term.transactions == 1
    assert term.load() == {"run/once": b"1"}
    assert len(deltas_of(raw, term.epoch)) == 1
    term.commit({"run/next": b"2"})
    assert term.load() == {"run/once": b"1", "run/next": b"2"}


def test_a_quorum_loss_fences_the_leader_which_leads_again_after(  # type: ignore[no-untyped-def]
    leader: Leader, proxies, raw: KazooClient
) -> None:
    term = leader.next_term()
    term.load()
    term.commit({"run/kept": b"1"})
    for p in proxies:
        p.blackhole()
    cut = time.monotonic()
    wait_for(term.in_doubt, 5, "the connection to be suspended")
    suspended = time.monotonic() - cut
    outcome: queue.Queue[object] = queue.Queue()

    def commit() -> None:
        try:
            term.commit({"run/during": b"2"})
            outcome.put("committed")
        except Exception as exc:
            outcome.put(exc)

    threading.Thread(target=commit, daemon=True).start()
    assert term.wait_lost(WAIT)
    ended = time.monotonic() - cut
    print(f"\nsuspended {suspended:.2f}s after the cut, term ended {ended:.2f}s after it")
    assert ended - suspended >= leader.coord.deadline - 0.05
    assert ended < SESSION + 0.2, "the term must end before the session can expire"
    got = outcome.get(timeout=5)
    assert isinstance(got, Fenced), got
    time.sleep(SESSION + 1)  # the server expires the session
    for p in proxies:
        p.heal()
    newer = leader.next_term(timeout=30)
    assert newer.epoch > term.epoch
    assert newer.load() == {"run/kept": b"1"}, "nothing committed during the doubt"
    newer.commit({"run/after": b"3"})
    assert newer.load() == {"run/kept": b"1", "run/after": b"3"}
    epochs = {name.split("-")[0] for name in raw.get_children(DELTAS)}
    assert epochs <= {f"{term.epoch:010d}", f"{newer.epoch:010d}"}, epochs
    assert len(deltas_of(raw, term.epoch)) <= 1, "the old term wrote during its doubt"


# -- a worker --------------------------------------------------------------------------------


class Reports:
    """Run events the node publishes, read from the in-memory transport."""

    def __init__(self, node: WorkerNode) -> None:
        self.events: list[tuple[float, RunEvent]] = []
        self._lock = threading.Lock()
        node.transport.consume(RESULTS, self._take)

    def _take(self, delivery: Delivery) -> None:
        assert delivery.payload is not None
        with self._lock:
            now = time.time()
            self.events += [(now, ev) for ev in messages_of(delivery.payload, RUN_EVENTS)]
        delivery.ack()

    def final(self, run_id: str) -> tuple[float, RunEvent] | None:
        with self._lock:
            return next(((at, ev) for at, ev in self.events
                         if ev.run_id == run_id and ev.state not in ("started", "rejected")),
                        None)

    def started(self, run_id: str) -> bool:
        with self._lock:
            return any(ev.run_id == run_id and ev.state == "started" for _, ev in self.events)


def order(node: str, groups: list[str]) -> RunOrder:
    now = time.time()
    return RunOrder(run_id=uuid.uuid4().hex, service="Svc", node=node, trigger="scheduled",
                    slot=now, epoch=1, issued_at=now, deadline=now + 60, timeout=60,
                    callable=UTILITY, run_groups=groups)


def test_a_workers_runs_ride_through_the_loss_of_its_server_not_a_partition(  # type: ignore[no-untyped-def]
    zk_hosts: str, proxies, raw: KazooClient
) -> None:
    coord = ZkCoordination(ensemble(zk_hosts, proxies), session_timeout=SESSION,
                           identifier="w1")
    node = WorkerNode("w1", ["Master"], make_transport(None), coord, SystemClock())
    reports = Reports(node)
    node.start()
    gone: list[float] = []

    def watch(children: list[str]) -> None:
        if "w1" not in children and not gone and seen_once:
            gone.append(time.time())
        seen_once.append(True)

    seen_once: list[bool] = []
    try:
        wait_for(lambda: raw.exists(f"{NODES}/w1"), what="w1 announced")
        raw.ChildrenWatch(NODES, watch)
        held = order("w1", ["g"])
        node.transport.send(node.queue, encode(held))
        wait_for(lambda: reports.started(held.run_id), what="the run to start")
        for _ in range(3):
            reset_and_reconnect(coord, proxies)
            time.sleep(coord.grace + 0.5)
            assert reports.final(held.run_id) is None, reports.final(held.run_id)
            assert held.run_id in node._running, "the run holding a group was stopped"
        # Both links down: a partition (or quorum lost). The run stops before the session
        # can expire on the server, which then deletes the node's announcement.
        for p in proxies:
            p.blackhole()
        cut = time.time()
        wait_for(lambda: reports.final(held.run_id) is not None, 5, "the run to be stopped")
        stopped_at, ev = reports.final(held.run_id) or (0.0, None)
        assert ev is not None and ev.state == "failed"
        assert "ZooKeeper session in doubt" in (ev.error or ""), ev
        wait_for(lambda: bool(gone), 10, "the session to expire")
        print(f"\nrun stopped {stopped_at - cut:.2f}s after the cut, session expired "
              f"{gone[0] - cut:.2f}s after it")
        assert (ev.finished_at or 0) < gone[0], "the run outlived the session"
        assert stopped_at < gone[0]
    finally:
        for p in proxies:
            p.heal()
        for run_id in list(node._running):
            node.executor.cancel(run_id, "test over")
        node.stop(timeout=5)
        coord.close()
