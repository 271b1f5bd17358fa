"""Coordination: leader election, fencing epochs, node membership and the fenced ledger.

One interface, two implementations: `ZkCoordination` (kazoo, in `zk.py`) for a real
cluster and `MemoryCoordination` here for the embedded one.

- `contend(identifier, lead)`: blocks, and each time this contender wins an election it
  calls `lead(term)`; `lead` returns when `term.lost()` turns true or when it is done.
  Winning bumps the epoch; the term carries it.
- The ledger is a key/value store whose writes (`term.commit`) succeed only while the
  term's epoch is still the newest: a deposed leader's write raises `Fenced`. A term whose
  connection is briefly in doubt (ZooKeeper: SUSPENDED, see `zk.py`) is not lost yet: its
  commits wait until it is sure again or has ended. A commit is
  all or nothing for whoever loads the ledger next, and costs one transaction unless it is
  over ZooKeeper's request size. Keys starting with `log/` are written once and deleted
  later (ZooKeeper keeps each apart, so adding one rewrites nothing else).
- Nodes announce themselves with an ephemeral entry that vanishes when their session
  ends; `watch_nodes` reports the current set on every change. The announcement is made
  by a function, called again each time the entry is created in a new session, so a node
  can name each of its sessions (orders carry that name). `session_ok` is false while the
  session is in doubt: a node then starts nothing that holds run groups.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Protocol


class Fenced(RuntimeError):
    """A write from a leader whose epoch is no longer the newest."""


class LedgerFormatError(RuntimeError):
    """A ledger stored in a format (or a part of it so damaged) that this code cannot read;
    the message says what to do."""


class Term(Protocol):
    epoch: int
    transactions: int  # ledger transactions this term committed
    ops: int  # writes in them (znodes on ZooKeeper, keys in memory)
    written: int  # bytes written in them (data and paths on ZooKeeper, keys and values)

    def lost(self) -> bool: ...

    def wait_lost(self, timeout: float) -> bool: ...

    def load(self) -> dict[str, bytes]: ...

    def nodes(self) -> dict[str, bytes]:
        """Node announcements as of now, read after this term began: every node a previous
        leader could have placed a run on and that is still alive is in it."""
        ...

    def commit(self, writes: Mapping[str, bytes | None]) -> None: ...


Announcement = Callable[[], bytes]
"""Makes a node's announcement; called once per session in which it is (re)created."""


def announcement(data: bytes | Announcement) -> Announcement:
    """Fixed bytes, or the function that makes them, as a function."""
    if isinstance(data, bytes | bytearray):
        fixed = bytes(data)
        return lambda: fixed
    return data


class Coordination(Protocol):
    def contend(self, identifier: str, lead: Callable[[Term], None]) -> None: ...

    def stop(self) -> None: ...

    def announce(self, node_id: str, data: bytes | Announcement) -> None: ...

    def withdraw(self, node_id: str) -> None: ...

    def session_ok(self) -> bool: ...

    def watch_nodes(self, callback: Callable[[dict[str, bytes]], None]) -> None: ...

    def watch_epoch(self, callback: Callable[[int], None]) -> None: ...

    def current_epoch(self) -> int: ...

    def leader(self) -> str | None: ...

    def advertise(self, url: str) -> None:
        """Where this contender serves its page and API, told to the others while it leads
        (set before `contend`)."""
        ...

    def leader_url(self) -> str | None: ...

    def close(self) -> None: ...


# -- in memory -------------------------------------------------------------------------
class _Store:
    """State shared by every MemoryCoordination handle of one embedded cluster."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.epoch = 0
        self.leader: str | None = None
        self.urls: dict[str, str] = {}  # contender -> where it serves its page and API
        self.ledger: dict[str, bytes] = {}
        self.nodes: dict[str, bytes] = {}
        self.node_watchers: list[Callable[[dict[str, bytes]], None]] = []
        self.epoch_watchers: list[Callable[[int], None]] = []


class _MemoryTerm:
    def __init__(self, store: _Store, epoch: int, owner: MemoryCoordination) -> None:
        self.store = store
        self.epoch = epoch
        self.owner = owner
        self.transactions = 0
        self.ops = 0
        self.written = 0

    def lost(self) -> bool:
        return self.owner._stopped.is_set() or self.store.epoch != self.epoch

    def wait_lost(self, timeout: float) -> bool:
        return self.owner._stopped.wait(timeout) or self.lost()

    def load(self) -> dict[str, bytes]:
        with self.store.lock:
            return dict(self.store.ledger)

    def nodes(self) -> dict[str, bytes]:
        with self.store.lock:
            return dict(self.store.nodes)

    def commit(self, writes: Mapping[str, bytes | None]) -> None:
        with self.store.lock:
            if self.store.epoch != self.epoch:
                raise Fenced(f"epoch {self.epoch} was superseded by {self.store.epoch}")
            for key, value in writes.items():
                if value is None:
                    self.store.ledger.pop(key, None)
                else:
                    self.store.ledger[key] = value
            if writes:
                self.transactions += 1
                self.ops += len(writes)
                self.written += sum(len(k) + len(v or b"") for k, v in writes.items())


class MemoryCoordination:
    """In-process coordination for the embedded cluster and for unit tests."""

    def __init__(self, store: _Store | None = None) -> None:
        self.store = store or _Store()
        self._stopped = threading.Event()
        self._announced: set[str] = set()
        self._url = ""

    def handle(self) -> MemoryCoordination:
        """Another participant (coordinator or worker) on the same store."""
        return MemoryCoordination(self.store)

    def contend(self, identifier: str, lead: Callable[[Term], None]) -> None:
        while not self._stopped.is_set():
            with self.store.cond:
                while self.store.leader is not None and not self._stopped.is_set():
                    self.store.cond.wait(0.2)
                if self._stopped.is_set():
                    return
                self.store.leader = identifier
                if self._url:
                    self.store.urls[identifier] = self._url
                self.store.epoch += 1
                epoch = self.store.epoch
                watchers = list(self.store.epoch_watchers)
            for w in watchers:
                w(epoch)
            try:
                lead(_MemoryTerm(self.store, epoch, self))
            finally:
                with self.store.cond:
                    if self.store.leader == identifier:
                        self.store.leader = None
                    self.store.cond.notify_all()

    def stop(self) -> None:
        self._stopped.set()
        with self.store.cond:
            self.store.cond.notify_all()

    def announce(self, node_id: str, data: bytes | Announcement) -> None:
        with self.store.lock:
            self.store.nodes[node_id] = announcement(data)()
            self._announced.add(node_id)
        self._notify_nodes()

    def session_ok(self) -> bool:
        return not self._stopped.is_set()

    def withdraw(self, node_id: str) -> None:
        """End a node's session: its entry vanishes, as when a ZooKeeper session expires."""
        with self.store.lock:
            self.store.nodes.pop(node_id, None)
            self._announced.discard(node_id)
        self._notify_nodes()

    def _notify_nodes(self) -> None:
        with self.store.lock:
            snapshot = dict(self.store.nodes)
            watchers = list(self.store.node_watchers)
        for w in watchers:
            w(dict(snapshot))

    def watch_nodes(self, callback: Callable[[dict[str, bytes]], None]) -> None:
        with self.store.lock:
            self.store.node_watchers.append(callback)
            snapshot = dict(self.store.nodes)
        callback(snapshot)

    def watch_epoch(self, callback: Callable[[int], None]) -> None:
        with self.store.lock:
            self.store.epoch_watchers.append(callback)
            epoch = self.store.epoch
        callback(epoch)

    def current_epoch(self) -> int:
        return self.store.epoch

    def leader(self) -> str | None:
        return self.store.leader

    def advertise(self, url: str) -> None:
        self._url = url

    def leader_url(self) -> str | None:
        with self.store.lock:
            return self.store.urls.get(self.store.leader or "")

    def close(self) -> None:
        self.stop()
        for node_id in list(self._announced):
            self.withdraw(node_id)
