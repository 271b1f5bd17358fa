"""A standby's mirror of the ledger (`protocol.zk.LedgerMirror`), on a real ZooKeeper: brought
up to date by reading only what changed, it must be exactly what a full read of the ledger
gives, whatever the leader committed, compacted and deleted meanwhile; and a standby that
takes over uses it."""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from kazoo.client import KazooClient

from protocol import ledger_layout, zk
from protocol.ledger_layout import Layout
from protocol.zk import LedgerMirror, ZkCoordination, ZkTerm, _Reads
from tests.integration.test_coordination import Backend, Contender


@pytest.fixture
def client(zk_hosts: str) -> Iterator[KazooClient]:
    made = KazooClient(hosts=zk_hosts, timeout=5.0)
    made.start(timeout=15.0)
    try:
        yield made
    finally:
        made.stop()
        made.close()


@pytest.fixture
def backend(zk_hosts: str) -> Iterator[Backend]:
    """Coordinations on the test's chroot, each closed (its session ended) at the end."""
    made = Backend("zk", zk_hosts)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def small_compaction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compaction at kilobytes instead of megabytes, so that a few hundred commits rewrite
    buckets and delete deltas many times over."""
    monkeypatch.setattr(ledger_layout, "BACKLOG_FLOOR", 6_000)
    monkeypatch.setattr(ledger_layout, "BACKLOG_BYTES", 12_000)
    monkeypatch.setattr(ledger_layout, "BACKLOG_DELTAS", 40)
    monkeypatch.setattr(ledger_layout, "PRESSURE_BUDGET", 3_000)
    monkeypatch.setattr(zk, "PRESSURE_BUDGET", 3_000)


def _full_read(client: KazooClient) -> Layout:
    reader = ZkTerm(SimpleNamespace(client=client), epoch=0)  # type: ignore[arg-type]
    return reader._read_layout()


def _same(mirrored: Layout | None, full: Layout) -> None:
    assert mirrored is not None, "the mirror gave up on a plain ledger"
    assert mirrored.view() == full.view()
    assert mirrored.buckets == full.buckets
    assert mirrored.dirty == full.dirty and mirrored.was == full.was
    assert mirrored.stale == full.stale
    assert mirrored.sizes == full.sizes
    assert mirrored.logs == full.logs and mirrored.pending_logs == full.pending_logs
    assert [(d.order, d.names, d.size) for d in mirrored.deltas] == [
        (d.order, d.names, d.size) for d in full.deltas]
    assert mirrored.existing == full.existing and sorted(mirrored.junk) == sorted(full.junk)
    assert mirrored.marker and full.marker


def _writes(rng: random.Random) -> dict[str, bytes | None]:
    """A commit: mostly a few hot keys, sometimes many cold ones (a delta in parts)."""
    if rng.random() < 0.08:
        return {f"override/svc-{rng.randrange(400)}": b"o" * rng.randrange(50, 300)
                for _ in range(rng.randrange(40, 120))}
    out: dict[str, bytes | None] = {}
    for _ in range(rng.randrange(1, 12)):
        kind = rng.choice(["cursor", "run", "lastrun", "log/ended"])
        key = f"{kind}/s{rng.randrange(60)}"
        out[key] = None if kind != "cursor" and rng.random() < 0.3 else (
            b"%d" % rng.randrange(10**6)) * rng.randrange(1, 8)
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_mirror_is_what_a_full_read_gives_whatever_the_leader_did_meanwhile(
        backend: Backend, client: KazooClient, small_compaction: None, seed: int) -> None:
    rng = random.Random(seed)
    racer = Contender(backend.new("leader"), "leader")
    term, done = racer.next_term()
    assert isinstance(term, ZkTerm)
    term.max_bytes = 6_000  # a commit of many keys is a delta in several parts
    term.load()
    mirror = LedgerMirror()
    reads = _Reads(client, lambda result: result.get(True, 10.0))
    rewrites = deletions = refreshes = 0
    buckets_before = deltas_before = 0
    try:
        for i in range(300):
            term.commit(_writes(rng))
            buckets_now = client.get_children(zk.BUCKETS)
            deltas_now = client.get_children(zk.DELTAS)
            rewrites += len(buckets_now) != buckets_before
            deletions += len(deltas_now) < deltas_before
            buckets_before, deltas_before = len(buckets_now), len(deltas_now)
            if rng.random() < 0.3:
                refreshes += 1
                _same(mirror.refresh(reads), _full_read(client))
            if i % 50 == 49:  # what the leader itself holds is what both read
                assert term._layout is not None
                assert _full_read(client).view() == term._layout.view()
    finally:
        done.set()
        racer.stop()
    _same(mirror.refresh(reads), _full_read(client))
    # the run went through what the mirror must follow
    assert refreshes > 50 and rewrites > 5 and deletions > 5, (refreshes, rewrites, deletions)
    assert mirror.last_read[0] < zk.BUCKET_COUNT, "a refresh re-reads only moved buckets"


def test_the_mirror_leaves_a_ledger_it_does_not_handle_to_the_full_read(
        client: KazooClient) -> None:
    reads = _Reads(client, lambda result: result.get(True, 10.0))
    for path in (zk.LEDGER, zk.BUCKETS, zk.DELTAS, zk.LOG, zk.JOURNAL):
        client.ensure_path(path)
    assert LedgerMirror().refresh(reads) is None, "no format marker: an empty ledger"
    client.create(f"{zk.LEDGER}/{zk.encode_name('cursor/old')}", b"\x01")  # format 1
    client.create(zk.MARKER, zk._marker(16))
    assert LedgerMirror().refresh(reads) is None, "format-1 keys still there"


def test_a_standby_takes_over_from_its_mirror(
        backend: Backend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(zk, "MIRROR_EVERY", 0.2)
    leader = Contender(backend.new("leader"), "leader")
    term, done = leader.next_term()
    term.load()
    expected: dict[str, bytes] = {f"cursor/svc-{i}": b"%d" % i for i in range(3_000)}
    term.commit(dict(expected))
    standby_coordination = backend.new("standby")
    assert isinstance(standby_coordination, ZkCoordination)
    standby = Contender(standby_coordination, "standby")
    for i in range(20):  # the standby refreshes its mirror meanwhile
        change = {f"cursor/svc-{i}": b"moved %d" % i, f"run/r{i}": b"active"}
        term.commit(dict(change))
        expected.update(change)
        if i % 5 == 0:
            standby_coordination._stopped.wait(0.3)
    assert standby_coordination._mirror.layout is not None, "the standby mirrored nothing"
    caplog.set_level(logging.INFO, logger="rota.zk")
    done.set()
    leader.stop()
    taken, done2 = standby.next_term()
    try:
        assert taken.load() == expected
    finally:
        done2.set()
        standby.stop()
    said = [r.getMessage() for r in caplog.records if "ledger mirror brought up" in r.getMessage()]
    assert said, "the takeover read the whole ledger instead"
    read = re.search(r"(\d+) bucket\(s\) and (\d+) delta\(s\)", said[-1])
    assert read is not None and read.group(1) == "0" and int(read.group(2)) < 21, said[-1]
