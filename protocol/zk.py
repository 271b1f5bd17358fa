"""ZooKeeper coordination (kazoo): election, fencing epoch, node membership, fenced ledger.

Znodes, under the chroot given in `hosts` (e.g. "zk1:2181,zk2:2181/rota-prod"):

- `/rota/election/<uuid>-n_<seq>`: ephemeral sequential, data = contender identifier. The
  lowest sequence leads; every other contender watches its predecessor only.
- `/rota/epoch`: the fencing epoch is this znode's data *version*. A new leader sets it (data =
  its identifier) in one transaction with a check that its own election znode still exists,
  so only the holder of the election can bump it; the version after the set is the term's
  epoch. 0 means no leader was ever elected.
- `/rota/nodes/<node id>`: ephemeral, data = the node's announcement bytes.
- `/rota/ledger/<key>`: one flat child per ledger key; the key is percent-encoded with no safe
  characters, so "run/abc" is stored as `run%2Fabc` ("" "." ".." become "%" "%2E" "%2E%2E").
  A flat layout keeps `load()` to one listing plus pipelined gets.

Commits: `term.commit(writes)` becomes one or more kazoo transactions, each at most 400 ops and
about 700 KB (ZooKeeper refuses requests over `jute.maxbuffer`, 1 MB by default), each starting
with `check(/rota/epoch, version=term.epoch)`. A chunk is atomic; a commit split into several
chunks (sent pipelined) and fenced half-way has applied a prefix of its chunks, in the order
of `writes`.
Create/set/delete is chosen from the keys the term knows to exist (from `load()`); a delete of
an absent key is dropped; if the ledger disagrees with that knowledge the keys are re-read and
the chunk retried. A failed check, or any connection error, raises `Fenced`. One value may
be at most 1,000,000 bytes (`ValueError` before anything is written).

Terms end when the client's connection leaves CONNECTED (SUSPENDED counts, as in Curator), when
the epoch znode's version moves past the term's, or on `stop()`. Connection state listeners only
set flags and queue work: ZooKeeper is never called from them. User callbacks (node and epoch
watches, session trouble) run on small dispatcher threads, never on kazoo's threads.

Failover timing, with `session_timeout` 2 s (the server must allow it: `minSessionTimeout`
at most 2000 ms, i.e. tickTime <= 1000): kazoo pings every ~0.67 s and drops a connection
whose ping goes unanswered for ~1.33 s, so a leader cut off from ZooKeeper sees SUSPENDED
(its term is lost) before its session can expire. A SIGKILLed leader sends nothing: the
server expires its session <= ~2 s (plus up to one tick) after its last ping and deletes its
election znode; the next contender's predecessor watch fires, it bumps the epoch and its
`lead` starts, typically 2-2.5 s after the kill. A leader that closes cleanly deletes its znode
at once. Even a stalled old leader cannot write: its epoch check fails.

The client reconnects forever with backoff (at most 1 s between attempts), so a ZooKeeper
restart is survived; after a session expiry kazoo opens a new session and this adapter
re-creates the node announcements it holds.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    BadVersionError,
    ConnectionLoss,
    KazooException,
    NodeExistsError,
    NoNodeError,
    OperationTimeoutError,
    RolledBackError,
    SessionExpiredError,
)
from kazoo.retry import KazooRetry

from protocol.coordination import Announcement, Fenced, Term, announcement

log = logging.getLogger("rota.zk")

ROOT = "/rota"
ELECTION = f"{ROOT}/election"
EPOCH = f"{ROOT}/epoch"
NODES = f"{ROOT}/nodes"
LEDGER = f"{ROOT}/ledger"

MAX_OPS = 400  # operations per transaction, the epoch check included
MAX_BYTES = 700_000  # estimated request size per transaction
MAX_VALUE = 1_000_000  # largest single ledger value
_OP_OVERHEAD = 64  # per-op bytes besides path and data (header, version, ACL)
_LOAD_WINDOW = 2_000  # gets in flight while loading the ledger
FAILED_LEAD_PAUSE = 1.0  # seconds before contending again after `lead` raised

# SessionExpiredError covers ConnectionClosedError (the client was stopped).
_CONNECTION_ERRORS = (ConnectionLoss, SessionExpiredError, OperationTimeoutError)
_SPECIAL = {"": "%", ".": "%2E", "..": "%2E%2E"}
_UNSPECIAL = {v: k for k, v in _SPECIAL.items()}


def encode_name(text: str) -> str:
    """A znode child name for any string, reversible with `decode_name`."""
    return _SPECIAL.get(text) or quote(text, safe="")


def decode_name(name: str) -> str:
    return _UNSPECIAL[name] if name in _UNSPECIAL else unquote(name)


def _sequence(name: str) -> str | None:
    """The sequence number of an election znode name, or None if it has none."""
    head, sep, seq = name.rpartition("-n_")
    return seq if sep and head and seq.lstrip("-").isdigit() else None


class _Serial:
    """A daemon thread running submitted calls one at a time, in submission order."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], None]) -> None:
        self._queue.put(fn)

    def close(self, timeout: float = 2.0) -> None:
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        while (fn := self._queue.get()) is not None:
            try:
                fn()
            except Exception:
                log.exception("callback failed")


@dataclass(frozen=True)
class _Op:
    kind: str  # "create", "set" or "delete"
    key: str
    value: bytes | None

    @property
    def path(self) -> str:
        return f"{LEDGER}/{encode_name(self.key)}"

    @property
    def size(self) -> int:
        return len(self.path) + len(self.value or b"") + _OP_OVERHEAD


class _Stale(Exception):
    """The ledger's keys differ from what the term believed (create of an existing key...)."""


class ZkTerm:
    """One term of leadership: the epoch it won and the fenced ledger operations."""

    def __init__(self, owner: ZkCoordination, epoch: int) -> None:
        self.epoch = epoch
        self._client = owner.client
        self._lost = threading.Event()
        self._known: set[str] | None = None  # ledger keys that exist
        self._commit_lock = threading.Lock()
        self.transactions = 0  # transactions committed by this term

    def lost(self) -> bool:
        return self._lost.is_set()

    def wait_lost(self, timeout: float) -> bool:
        return self._lost.wait(timeout)

    def _end(self, reason: str) -> None:
        if not self._lost.is_set():
            log.info("term %d ends: %s", self.epoch, reason)
            self._lost.set()

    def _fenced(self, reason: str) -> Fenced:
        self._end(reason)
        return Fenced(f"epoch {self.epoch}: {reason}")

    # -- reads --------------------------------------------------------------------------
    def load(self) -> dict[str, bytes]:
        """The whole ledger. Reads follow this session's epoch bump, so no older state shows."""
        out = self._read_all(LEDGER, "loading the ledger")
        with self._commit_lock:
            self._known = set(out)
        return out

    def nodes(self) -> dict[str, bytes]:
        return self._read_all(NODES, "reading the nodes")

    def _read_all(self, parent: str, doing: str) -> dict[str, bytes]:
        """Every child of `parent` with its data, read in windows of pipelined requests."""
        if self._lost.is_set():
            raise Fenced(f"epoch {self.epoch}: the term has ended")
        try:
            names = self._reply(self._client.get_children_async(parent))
            out: dict[str, bytes] = {}
            for start in range(0, len(names), _LOAD_WINDOW):
                batch = names[start : start + _LOAD_WINDOW]
                pending = [(n, self._client.get_async(f"{parent}/{n}")) for n in batch]
                for name, result in pending:
                    try:
                        data, _stat = self._reply(result)
                    except NoNodeError:
                        continue
                    out[decode_name(name)] = data or b""
            return out
        except _CONNECTION_ERRORS as exc:
            raise self._fenced(f"connection lost while {doing}") from exc

    def _list_keys(self) -> set[str]:
        return {decode_name(n) for n in self._reply(self._client.get_children_async(LEDGER))}

    def _reply(self, result: Any) -> Any:
        """Wait for a ZooKeeper reply, but no longer than the term: a request sent as the
        connection dropped waits in kazoo until the link is back, and an ended term must
        not hang its leader for the whole partition."""
        while not result.ready():
            result.wait(0.1)
            if not result.ready() and self._lost.is_set():
                raise Fenced(f"epoch {self.epoch}: the term ended while waiting for ZooKeeper")
        return result.get()

    def _refresh(self, keys: Iterable[str]) -> None:
        assert self._known is not None
        keys = list(keys)
        pending = [(k, self._client.exists_async(f"{LEDGER}/{encode_name(k)}")) for k in keys]
        for key, result in pending:
            if self._reply(result) is None:
                self._known.discard(key)
            else:
                self._known.add(key)

    # -- writes -------------------------------------------------------------------------
    def commit(self, writes: Mapping[str, bytes | None]) -> None:
        for key, value in writes.items():
            if value is not None and len(value) > MAX_VALUE:
                raise ValueError(f"ledger value for {key!r} is {len(value)} bytes, "
                                 f"over the {MAX_VALUE}-byte limit")
        if not writes:
            return
        with self._commit_lock:
            # Once the session is suspended kazoo queues requests until the link is back: an
            # ended term must fail at once, not hang its leader for the whole partition.
            if self._lost.is_set():
                raise Fenced(f"epoch {self.epoch}: the term has ended")
            try:
                if self._known is None:
                    self._known = self._list_keys()
                pending = dict(writes)
                for _attempt in range(3):
                    try:
                        self._write(pending)
                        return
                    except _Stale as stale:
                        log.warning("ledger keys changed under term %d: %s", self.epoch, stale)
                        self._refresh(pending)
            except _CONNECTION_ERRORS as exc:
                raise self._fenced("connection lost during a commit") from exc
            raise self._fenced("ledger keys keep changing under this leader")

    def _plan(self, writes: Mapping[str, bytes | None]) -> list[list[_Op]]:
        assert self._known is not None
        chunks: list[list[_Op]] = []
        current: list[_Op] = []
        size = len(EPOCH) + _OP_OVERHEAD
        for key, value in writes.items():
            if value is None:
                if key not in self._known:
                    continue
                op = _Op("delete", key, None)
            else:
                op = _Op("set" if key in self._known else "create", key, value)
            if current and (len(current) + 2 > MAX_OPS or size + op.size > MAX_BYTES):
                chunks.append(current)
                current, size = [], len(EPOCH) + _OP_OVERHEAD
            current.append(op)
            size += op.size
        if current:
            chunks.append(current)
        return chunks

    def _write(self, pending: dict[str, bytes | None]) -> None:
        """Commit `pending`, removing each key once its chunk is applied.

        The chunks are pipelined: ZooKeeper applies one session's requests in order, and once
        the epoch has moved every later chunk fails its check as well.
        """
        assert self._known is not None
        sent = []
        for chunk in self._plan(pending):
            txn = self._client.transaction()
            txn.check(EPOCH, self.epoch)
            for op in chunk:
                if op.kind == "create":
                    txn.create(op.path, op.value)
                elif op.kind == "set":
                    txn.set_data(op.path, op.value)
                else:
                    txn.delete(op.path)
            sent.append((chunk, txn.commit_async()))
        error: Exception | None = None
        for chunk, reply in sent:
            results = self._reply(reply)
            self.transactions += 1
            failures = [r for r in results if isinstance(r, Exception)]
            if failures:
                if isinstance(results[0], BadVersionError | NoNodeError):
                    error = error or self._fenced(f"the epoch moved past {self.epoch}")
                    continue
                culprit = next(
                    (f for f in failures if not isinstance(f, RolledBackError)), failures[0]
                )
                stale = isinstance(culprit, NodeExistsError | NoNodeError)
                error = error or (_Stale(type(culprit).__name__) if stale else culprit)
                continue
            for op in chunk:
                if op.kind == "delete":
                    self._known.discard(op.key)
                else:
                    self._known.add(op.key)
                pending.pop(op.key, None)
        if error is not None:
            raise error
        pending.clear()  # what is left are deletes of absent keys


class ZkCoordination:
    """The `Coordination` interface on ZooKeeper; see the module docstring for the layout."""

    def __init__(
        self,
        hosts: str,
        *,
        session_timeout: float = 2.0,
        identifier: str = "",
        connect_timeout: float | None = 30.0,
    ) -> None:
        self.identifier = identifier
        self.hosts = hosts
        self.client = KazooClient(
            hosts=hosts,
            timeout=session_timeout,
            connection_retry=KazooRetry(max_tries=-1, delay=0.05, backoff=2, max_delay=1.0),
            command_retry=KazooRetry(max_tries=5, delay=0.05, backoff=2, max_delay=1.0),
        )
        self._stopped = threading.Event()
        self._closing = False
        self._connected = threading.Event()
        self._idle = threading.Event()  # set while no contend() is running
        self._idle.set()
        self._generation = 0  # bumped whenever the connection leaves CONNECTED
        self._term: ZkTerm | None = None
        self._wake = threading.Event()  # wakes an election wait
        self._epoch_seen = 0
        self._epoch_reported = -1
        self._announce_lock = threading.RLock()
        self._announced: dict[str, Announcement] = {}
        self._withdrawn: set[str] = set()
        self._node_watchers: list[Callable[[dict[str, bytes]], None]] = []
        self._node_snapshot: dict[str, bytes] | None = None
        self._node_refresh_queued = threading.Event()
        self._children_watch: Any = None
        self._epoch_watchers: list[Callable[[int], None]] = []
        self._trouble: list[tuple[Callable[[], None], Callable[[], None]]] = []
        self._nodes_serial = _Serial("zk-nodes")
        self._epoch_serial = _Serial("zk-epoch")
        self._session_serial = _Serial("zk-session")
        self._upkeep_serial = _Serial("zk-upkeep")

        self.client.add_listener(self._on_state)
        self.client.start_async()
        if not self._connected.wait(connect_timeout):
            self._shutdown()
            raise ConnectionError(f"no ZooKeeper session with {hosts} in {connect_timeout}s")
        for path in (ELECTION, NODES, LEDGER, EPOCH):
            self.client.retry(self.client.ensure_path, path)
        self.client.DataWatch(EPOCH, self._on_epoch)

    # -- connection state (flags and queued work only: never call ZooKeeper here) ------
    def _on_state(self, state: str) -> None:
        if self._closing:
            return
        if state == KazooState.CONNECTED:
            self._connected.set()
            self._upkeep_serial.submit(self._upkeep)
        else:
            self._connected.clear()
            self._generation += 1
            term = self._term
            if term is not None:
                term._end(f"connection {state.lower()}")
            self._session_serial.submit(lambda: self._trouble_callbacks(state))
        self._wake.set()

    def _trouble_callbacks(self, state: str) -> None:
        for suspended, lost in list(self._trouble):
            (suspended if state == KazooState.SUSPENDED else lost)()

    def _on_epoch(self, data: bytes | None, stat: Any, event: Any = None) -> None:
        version = stat.version if stat is not None else 0
        self._epoch_seen = version
        term = self._term
        if term is not None and version > term.epoch:
            term._end(f"epoch moved to {version}")
        if version != self._epoch_reported:
            self._epoch_reported = version
            self._epoch_serial.submit(lambda: self._deliver_epoch(version))

    def _wait_connected(self) -> bool:
        while not self._stopped.is_set():
            if self._connected.wait(0.2):
                return True
        return False

    def _session_id(self) -> int | None:
        cid = self.client.client_id
        return cid[0] if cid else None

    # -- election -----------------------------------------------------------------------
    def contend(self, identifier: str, lead: Callable[[Term], None]) -> None:
        """Lead whenever elected, until `stop()`. A `lead` that raises ends its term; the
        error is logged and, after a pause that lets another contender take over, this one
        contends again."""
        ident = identifier or self.identifier
        self._idle.clear()
        try:
            while not self._stopped.is_set():
                won = self._acquire(ident)
                if won is None:
                    return
                path, session = won
                term = None
                failed = False
                try:
                    term = self._begin_term(path, ident)
                    if term is not None and not self._stopped.is_set():
                        log.info("%s leads with epoch %d", ident, term.epoch)
                        lead(term)
                except Fenced as exc:
                    log.warning("%s was deposed: %s", ident, exc)
                except Exception:
                    log.exception("%s: leading failed; stepping down", ident)
                    failed = True
                finally:
                    if term is not None:
                        term._end("leadership released")
                    self._term = None
                    self._release(path, session)
                if failed:
                    self._stopped.wait(FAILED_LEAD_PAUSE)
        finally:
            self._idle.set()

    def _acquire(self, ident: str) -> tuple[str, int | None] | None:
        """Block until this contender's election znode is the lowest; None once stopped."""
        prefix = f"{uuid.uuid4().hex}-n_"
        mine: str | None = None
        session: int | None = None
        while self._wait_connected():
            self._wake.clear()
            try:
                children = self.client.get_children(ELECTION)
                if mine not in children:
                    found = [c for c in children if c.startswith(prefix)]
                    if found:
                        mine = found[0]
                    else:
                        session = self._session_id()
                        created = self.client.create(
                            f"{ELECTION}/{prefix}", ident.encode(), ephemeral=True,
                            sequence=True,
                        )
                        mine = created.rsplit("/", 1)[1]
                        continue
                    session = self._session_id()
                ordered = sorted(
                    (c for c in children if _sequence(c) is not None),
                    key=lambda c: _sequence(c) or "",
                )
                at = ordered.index(mine)
                if at == 0:
                    if self._stopped.is_set():
                        break
                    return f"{ELECTION}/{mine}", session
                if self.client.exists(f"{ELECTION}/{ordered[at - 1]}", watch=self._wake_up):
                    while not self._wake.wait(0.5) and not self._stopped.is_set():
                        pass
            except _CONNECTION_ERRORS:
                self._stopped.wait(0.05)
            except NoNodeError:
                self.client.retry(self.client.ensure_path, ELECTION)
        if mine is not None:
            self._release(f"{ELECTION}/{mine}", session)
        return None

    def _wake_up(self, _event: Any) -> None:
        self._wake.set()

    def _begin_term(self, path: str, ident: str) -> ZkTerm | None:
        """Bump the epoch, proving in the same transaction that we still hold the election."""
        generation = self._generation
        try:
            txn = self.client.transaction()
            txn.check(path, 0)
            txn.set_data(EPOCH, ident.encode())
            results = txn.commit()
        except _CONNECTION_ERRORS:
            return None
        if any(isinstance(r, Exception) for r in results):
            return None
        term = ZkTerm(self, results[1].version)
        self._term = term
        if self._stopped.is_set() or self._generation != generation or not self._connected.is_set():
            term._end("connection changed while the term began")
        elif self._epoch_seen > term.epoch:
            term._end(f"epoch moved to {self._epoch_seen}")
        return term

    def _release(self, path: str, session: int | None) -> None:
        """Delete our election znode; once the session it lived in is gone, so is the znode."""
        while not self._closing:
            if session is not None and self._session_id() not in (None, session):
                return
            try:
                self.client.delete(path)
                return
            except NoNodeError:
                return
            except _CONNECTION_ERRORS:
                if self._closing:
                    return
                self._connected.wait(0.2)

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        term = self._term
        if term is not None:
            term._end("stopped")

    def current_epoch(self) -> int:
        try:
            stat = self.client.exists_async(EPOCH).get(timeout=1.0)
            return stat.version if stat is not None else 0
        except Exception:
            return self._epoch_seen

    def leader(self) -> str | None:
        try:
            children = self.client.get_children_async(ELECTION).get(timeout=1.0)
            candidates = (c for c in children if _sequence(c))
            for name in sorted(candidates, key=lambda c: _sequence(c) or ""):
                try:
                    data, _stat = self.client.get_async(f"{ELECTION}/{name}").get(timeout=1.0)
                except NoNodeError:
                    continue
                return (data or b"").decode()
        except Exception:
            return None
        return None

    # -- membership ---------------------------------------------------------------------
    def _node_path(self, node_id: str) -> str:
        return f"{NODES}/{encode_name(node_id)}"

    def announce(self, node_id: str, data: bytes | Announcement) -> None:
        make = announcement(data)
        with self._announce_lock:
            self._announced[node_id] = make
            self._withdrawn.discard(node_id)
            try:
                self._put_announcement(node_id, make)
            except _CONNECTION_ERRORS as exc:
                log.warning("announcing %s failed (%s); retrying on reconnect", node_id, exc)

    def session_ok(self) -> bool:
        return self._connected.is_set() and not self._closing

    def _put_announcement(
        self, node_id: str, make: Announcement, *, overwrite: bool = True
    ) -> None:
        """Create the ephemeral znode, replacing one left by an older session of this node.
        The announcement is made afresh whenever this session creates or replaces it."""
        path = self._node_path(node_id)
        for _ in range(10):
            session = self._session_id()
            stat = self.client.exists(path)
            try:
                if stat is None:
                    self.client.create(path, make(), ephemeral=True, makepath=True)
                elif stat.ephemeralOwner == session:
                    if overwrite:
                        self.client.set(path, make())
                else:  # left over from an older session of this node
                    self.client.delete(path, version=stat.version)
                    continue
                return
            except (NodeExistsError, NoNodeError, BadVersionError):
                continue
        raise ConnectionLoss(f"could not announce {node_id}")

    def withdraw(self, node_id: str) -> None:
        with self._announce_lock:
            self._announced.pop(node_id, None)
            self._withdrawn.add(node_id)
            try:
                self.client.delete(self._node_path(node_id))
                self._withdrawn.discard(node_id)
            except NoNodeError:
                self._withdrawn.discard(node_id)
            except _CONNECTION_ERRORS as exc:
                log.warning("withdrawing %s failed (%s); retrying on reconnect", node_id, exc)

    def _upkeep(self) -> None:
        """After (re)connecting: restore announcements, finish withdrawals."""
        if self._closing or not self._connected.is_set():
            return
        with self._announce_lock:
            try:
                for node_id, make in list(self._announced.items()):
                    self._put_announcement(node_id, make, overwrite=False)
                for node_id in list(self._withdrawn):
                    try:
                        self.client.delete(self._node_path(node_id))
                    except NoNodeError:
                        pass
                    self._withdrawn.discard(node_id)
            except _CONNECTION_ERRORS as exc:
                log.info("upkeep interrupted (%s); it runs again on reconnect", exc)

    def on_session_trouble(
        self, suspended: Callable[[], None], lost: Callable[[], None]
    ) -> None:
        """`suspended()` when the connection drops (the session may still be saved, but it
        expires within the session timeout: stop what must not outlive it); `lost()` when it
        expired. Both run on a thread of their own."""
        self._trouble.append((suspended, lost))

    def watch_nodes(self, callback: Callable[[dict[str, bytes]], None]) -> None:
        done = threading.Event()

        def register() -> None:
            try:
                self._node_watchers.append(callback)
                if self._children_watch is None:
                    self._children_watch = self.client.ChildrenWatch(
                        NODES, lambda _children: self._queue_node_refresh()
                    )
                if self._node_snapshot is None:
                    self._node_snapshot = self._read_nodes()
                callback(dict(self._node_snapshot or {}))
            finally:
                done.set()

        self._nodes_serial.submit(register)
        done.wait()

    def _queue_node_refresh(self, _event: Any = None) -> None:
        if not self._node_refresh_queued.is_set():
            self._node_refresh_queued.set()
            self._nodes_serial.submit(self._refresh_nodes)

    def _refresh_nodes(self) -> None:
        self._node_refresh_queued.clear()
        snapshot = self._read_nodes()
        if snapshot is None or snapshot == self._node_snapshot:
            return
        self._node_snapshot = snapshot
        for cb in list(self._node_watchers):
            cb(dict(snapshot))

    def _read_nodes(self) -> dict[str, bytes] | None:
        """Children of /rota/nodes with their data, each read leaving a data watch."""
        while not self._closing:
            try:
                names = self.client.get_children(NODES)
                pending = [
                    (n, self.client.get_async(f"{NODES}/{n}", watch=self._queue_node_refresh))
                    for n in names
                ]
                out: dict[str, bytes] = {}
                for name, result in pending:
                    try:
                        data, _stat = result.get()
                    except NoNodeError:
                        continue
                    out[decode_name(name)] = data or b""
                return out
            except _CONNECTION_ERRORS:
                if self._closing:
                    break
                self._connected.wait(0.5)
        return None

    def watch_epoch(self, callback: Callable[[int], None]) -> None:
        done = threading.Event()

        def register() -> None:
            try:
                self._epoch_watchers.append(callback)
                callback(max(self._epoch_reported, 0))
            finally:
                done.set()

        self._epoch_serial.submit(register)
        done.wait()

    def _deliver_epoch(self, epoch: int) -> None:
        for cb in list(self._epoch_watchers):
            cb(epoch)

    # -- shutdown -----------------------------------------------------------------------
    def close(self) -> None:
        """Stop contending, release leadership, end the session (its ephemerals vanish)."""
        if self._closing:
            return
        self.stop()
        self._idle.wait(5.0)
        self._shutdown()

    def _shutdown(self) -> None:
        self._closing = True
        self._stopped.set()
        try:
            self.client.stop()
        except KazooException:
            log.debug("error stopping the client", exc_info=True)
        self.client.close()
        for serial in (self._nodes_serial, self._epoch_serial, self._session_serial,
                       self._upkeep_serial):
            serial.close()


__all__ = ["ZkCoordination", "ZkTerm", "decode_name", "encode_name"]
