"""ZooKeeper coordination (kazoo): election, fencing epoch, node membership, fenced ledger.

Znodes, under the chroot given in `hosts` (e.g. "zk1:2181,zk2:2181/rota-prod"):

- `/rota/election/<uuid>-n_<seq>`: ephemeral sequential, data = contender identifier (and,
  on a second line, the URL of its page and API when it advertised one). The
  lowest sequence leads; every other contender watches its predecessor only.
- `/rota/epoch`: the fencing epoch is this znode's data *version*. A new leader sets it (data =
  its identifier) in one transaction with a check that its own election znode still exists,
  so only the holder of the election can bump it; the version after the set is the term's
  epoch. 0 means no leader was ever elected.
- `/rota/nodes/<node id>`: ephemeral, data = the node's announcement bytes.
- The ledger (format 3), a key/value map; `protocol/ledger_layout.py` says how it is laid
  out and why:
  - `/rota/buckets/<nnnn>`: `BUCKET_COUNT` buckets, each a msgpack map of the keys whose
    CRC-32 (stable across processes, unlike `hash()`) modulo the count is its number.
  - `/rota/deltas/<epoch>-<seq>-<part>-<parts>`: one per commit, a msgpack map of the keys it
    set (or nil: deleted). The ledger is the buckets with the complete deltas applied in
    order. Each commit also rewrites a few of the buckets whose changes wait the longest and
    deletes the deltas nothing needs any more.
  - `/rota/log/<key>`: keys starting with `log/` (written once, deleted later: finished runs
    kept for a successor) are a znode each, so adding one rewrites nothing else.
  - `/rota/ledger/<FORMAT_KEY encoded>`: the format marker, msgpack `{"format": 3,
    "buckets": N}`. `/rota/ledger` held format 1, one znode per key; a leader meeting it
    migrates it once (see `ZkTerm._migrate`); a coordinator of format 1 reads the marker as an
    undecodable run and refuses the ledger, naming the marker. A format-2 ledger (buckets
    rewritten whole, and `/rota/journal` for commits too large for one transaction) is
    upgraded once (`ZkTerm._upgrade`); a format-2 coordinator refuses format 3, naming it.

Commits: `term.commit(writes)` is one transaction, `check(/rota/epoch, version=term.epoch)`
then the delta, the log keys and the compaction step, as long as the delta and log keys fit
ZooKeeper's request limit (`jute.maxbuffer`, 1 MB by default; at most `MAX_OPS` ops and about
`MAX_BYTES`). A larger commit is a delta in several parts (`ZkTerm._in_parts`), which a
successor sees all of or none of. A failed epoch check, or a session that is lost, raises
`Fenced`. One value may be at most `MAX_VALUE` bytes, and so may a bucket (`ValueError`
before anything is written). `term.transactions`, `term.ops` and `term.written` count the
transactions, znode writes and bytes committed.

A commit whose connection drops while its transaction is in flight is ambiguous: a server
that forwarded it before it died may still have it applied. Once the session is back (the
same one) the identical transaction is sent again (`ZkTerm._resolve`). Its first operation
after the epoch check creates the commit's delta, a name only this term's commit uses: a
retry refused on that create proves the first attempt was applied; a retry that applies
proves it was not, and the first can then never apply (its create would fail). A transaction
without a delta of its own (only log keys), or one of a commit in several transactions,
cannot be told apart that way: its term ends, as on any connection loss before.

Loads: the marker, every bucket, log key and delta part are read with pipelined
asynchronous gets, so a successor's load is a few round trips whatever the ledger's size.

Terms end when the session is lost (expired, or the client closed), when the session id
changes, when the epoch znode's version moves past the term's, when the connection stays
SUSPENDED longer than `doubt_deadline(session_timeout)`, or on `stop()`. While the connection is
SUSPENDED the term is *in doubt*: `lost()` is still false, but nothing is read or committed
(commits wait). If the client is CONNECTED again in the same session before the deadline, and
the epoch znode's version is still the term's epoch, the term goes on: no election, no reload.
A ZooKeeper ensemble member that dies thus costs its clients a reconnection to another
member, not a new term. Connection state listeners only set flags, start timers and queue
work: ZooKeeper is never called from them. User callbacks (node and epoch watches, session
trouble) run on small dispatcher threads, never on kazoo's threads.

Timing, with `session_timeout` T (2 s by default; the server must allow it:
`minSessionTimeout` at most 2000 ms, i.e. tickTime <= 1000). kazoo's read timeout is 2T/3: it
pings when it has sent nothing for up to T/3 and drops the connection (SUSPENDED) when that
ping is unanswered after up to T/3 more. An idle client therefore turns SUSPENDED at most 2T/3
after the last packet the server got from it, and the server expires the session no sooner
than T after that packet: at least T/3 (0.67 s for T = 2 s) remain between SUSPENDED and the
earliest expiry (`expiry_margin`). Only after that expiry can another contender's
predecessor watch fire and its epoch bump succeed.

- A leader in doubt ends its term `doubt_deadline(T)` = 3/4 of that margin (0.5 s) after
  SUSPENDED, a quarter (0.17 s) before any successor can exist. A reconnection through
  another ensemble member (or the same one after a reset) takes a few tens of milliseconds;
  an ensemble that needs to elect a new ZooKeeper leader may take longer, and then the term
  ends and the contenders elect again.
- A worker in doubt stops its runs and daemons holding run groups `suspend_grace(T)` = half
  of the margin (0.33 s) after SUSPENDED, unless it is connected again in the same session
  by then: the other half is left for the stop to complete before the session can expire
  and the leader hand the groups to another node. On LOST it stops them at once.
- A request sent into a dead link postpones kazoo's next ping (requests count as pings), so a
  client that keeps sending can take up to T to notice a silent link. The leader sends little
  outside its commits and the worker nearly nothing, so the margin above holds in practice;
  it is a reason not to run these processes with a session shorter than 2 s.
- A SIGKILLed leader sends nothing: the server expires its session <= ~2 s (plus up to one
  tick) after its last ping and deletes its election znode; the next contender's predecessor
  watch fires, it bumps the epoch and its `lead` starts, typically 2-2.5 s after the kill. A
  leader that closes cleanly deletes its znode at once. Even a stalled old leader cannot
  write: its epoch check fails.

The client reconnects forever with backoff (at most 1 s between attempts), so a ZooKeeper
restart is survived; after a session expiry kazoo opens a new session and this adapter
re-creates the node announcements it holds.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import msgpack
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

from protocol.coordination import (
    Announcement,
    Fenced,
    LedgerFormatError,
    Term,
    announcement,
)
from protocol.ledger_layout import (
    BUCKET_COUNT,
    LOG_PREFIX,
    PRESSURE_BUDGET,
    Delta,
    Layout,
    Order,
    bucket_of,
    complete_deltas,
    delta_name,
    split,
)

log = logging.getLogger("rota.zk")
T = TypeVar("T")

ROOT = "/rota"
ELECTION = f"{ROOT}/election"
EPOCH = f"{ROOT}/epoch"
NODES = f"{ROOT}/nodes"
LEDGER = f"{ROOT}/ledger"  # format 1's keys, and the format marker
BUCKETS = f"{ROOT}/buckets"
DELTAS = f"{ROOT}/deltas"
LOG = f"{ROOT}/log"
JOURNAL = f"{ROOT}/journal"  # format 2's commits too large for one transaction

LEDGER_FORMAT = 3
# The marker's name stays that of format 2, where it was introduced: a format-1 coordinator
# reads it as an undecodable run key and names it; a format-2 one reads the format in it.
FORMAT_KEY = "run/LEDGER FORMAT 2 (written by a newer Rota: upgrade this coordinator)"
MAX_OPS = 400  # operations per transaction, the epoch check included
MAX_BYTES = 700_000  # estimated request size per transaction
MAX_VALUE = 1_000_000  # largest single ledger value, and largest bucket
CLEANUP_PER_COMMIT = 100  # leftover format-1 znodes deleted along with each commit
_OP_OVERHEAD = 64  # per-op bytes besides path and data (header, version, ACL)
_LOAD_WINDOW = 2_000  # gets in flight while loading the ledger
FAILED_LEAD_PAUSE = 1.0  # seconds before contending again after `lead` raised
MIRROR_EVERY = 3.0  # seconds between two refreshes of a follower's ledger mirror
MIRROR_READ_TIMEOUT = 10.0  # seconds a mirror's read may take

RESOLVE_ATTEMPTS = 5  # sends of an interrupted commit's transaction before its term ends
READ_ATTEMPTS = 3  # reads retried after a connection loss the term survived


def expiry_margin(session_timeout: float) -> float:
    """Least time, in seconds, between kazoo's SUSPENDED and the earliest moment the server can
    expire the session: kazoo suspends after at most 2/3 of the timeout without an answer to
    its ping, the server expires no sooner than the whole timeout after the last packet."""
    return session_timeout - session_timeout * 2 / 3


def doubt_deadline(session_timeout: float) -> float:
    """How long a leader's term may stay in doubt (SUSPENDED) before it ends: 3/4 of the
    expiry margin, so it ends well before any successor can be elected (0.5 s for 2 s)."""
    return expiry_margin(session_timeout) * 3 / 4


def suspend_grace(session_timeout: float) -> float:
    """How long a worker waits, once SUSPENDED, before stopping what holds run groups: half
    the expiry margin, the other half left for the stop to complete (0.33 s for 2 s)."""
    return expiry_margin(session_timeout) / 2


# SessionExpiredError covers ConnectionClosedError (the client was stopped).
_CONNECTION_ERRORS = (ConnectionLoss, SessionExpiredError, OperationTimeoutError)
_SPECIAL = {"": "%", ".": "%2E", "..": "%2E%2E"}
_UNSPECIAL = {v: k for k, v in _SPECIAL.items()}


def encode_name(text: str) -> str:
    """A znode child name for any string, reversible with `decode_name`."""
    return _SPECIAL.get(text) or quote(text, safe="")


def decode_name(name: str) -> str:
    return _UNSPECIAL[name] if name in _UNSPECIAL else unquote(name)


MARKER = f"{LEDGER}/{encode_name(FORMAT_KEY)}"


def bucket_path(index: int) -> str:
    return f"{BUCKETS}/{index:04d}"


def log_path(key: str) -> str:
    return f"{LOG}/{encode_name(key[len(LOG_PREFIX):])}"


def _contender_data(ident: str, url: str) -> bytes:
    """An election znode's data: the identifier, then the URL it serves on, if any."""
    return (ident + ("\n" + url if url else "")).encode()


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
    path: str
    value: bytes | None = None

    @property
    def size(self) -> int:
        return len(self.path) + len(self.value or b"") + _OP_OVERHEAD


class _Stale(Exception):
    """The ledger's znodes differ from what the term believed (create of an existing one...)."""


class ZkTerm:
    """One term of leadership: the epoch it won and the fenced ledger operations."""

    def __init__(self, owner: ZkCoordination, epoch: int, session: int | None = None) -> None:
        self.epoch = epoch
        self.session = session  # the ZooKeeper session id that won the term
        self._owner = owner
        self._client = owner.client
        self._lost = threading.Event()
        # Set while the term is sure: cleared on SUSPENDED, set again once the connection is
        # back in the same session with the epoch unmoved, and when the term ends (waking any
        # waiter, which then sees `_lost`).
        self._sure = threading.Event()
        self._sure.set()
        self._doubt_lock = threading.Lock()
        self._doubts = 0  # suspensions this term has seen; the last one numbers the doubt
        self._reconnected = 0  # the last doubt whose connection came back in the session
        self._layout: Layout | None = None
        self._commit_lock = threading.Lock()
        self._seq = 0  # of this term's deltas
        self.transactions = 0  # ledger transactions committed by this term
        self.ops = 0  # znode writes (create, set, delete) in them
        self.written = 0  # bytes of the znodes created and set in them (data and path)
        self.max_ops = MAX_OPS  # limits per transaction; tests make them tiny
        self.max_bytes = MAX_BYTES
        # Test-only: called after each transaction of a commit in several transactions
        # ("delta <i>", "delta complete", "logs <i>") or of a migration ("migrate <i>",
        # "upgrade <i>"), and once a transaction is sent, before its reply is read
        # ("sent"); a test makes the term deposed, or its process killed, there.
        self.fault: Callable[[str], None] | None = None

    def lost(self) -> bool:
        return self._lost.is_set()

    def wait_lost(self, timeout: float) -> bool:
        return self._lost.wait(timeout)

    def in_doubt(self) -> bool:
        """True while the connection is suspended (or back but not yet confirmed)."""
        return not self._sure.is_set() and not self._lost.is_set()

    def _end(self, reason: str) -> None:
        if not self._lost.is_set():
            log.info("term %d ends: %s", self.epoch, reason)
            self._lost.set()
        self._sure.set()

    def _suspend(self) -> int:
        """The connection was suspended: the term is in doubt. The number of this doubt."""
        with self._doubt_lock:
            self._doubts += 1
            self._sure.clear()
            if self._lost.is_set():
                self._sure.set()
            return self._doubts

    def _back(self, doubt: int) -> bool:
        """The connection came back in the term's session during `doubt`; False if a newer
        doubt began or the term ended."""
        with self._doubt_lock:
            if doubt != self._doubts or self._lost.is_set():
                return False
            self._reconnected = doubt
            return True

    def _confirm(self, doubt: int) -> None:
        """The epoch was checked after `doubt`: the term is sure again (unless a newer doubt
        began meanwhile, which has its own deadline and confirmation)."""
        with self._doubt_lock:
            if doubt == self._doubts and self._reconnected == doubt and not self._lost.is_set():
                self._sure.set()
                log.info("term %d goes on: the connection is back in the same session",
                         self.epoch)

    def _overdue(self, doubt: int, deadline: float) -> None:
        """The deadline of `doubt` passed: the term ends unless its connection came back."""
        with self._doubt_lock:
            if doubt != self._doubts or self._reconnected == doubt or self._sure.is_set():
                return
        self._end(f"the connection stayed suspended for more than {deadline:.2f}s")

    def _await_sure(self) -> None:
        """Wait while the term is in doubt; `Fenced` once it has ended. kazoo fails the
        requests of a dropped connection before it tells its listeners, so a caller that just
        got `ConnectionLoss` also waits for the client to be connected again: nothing is sent
        to be queued until the link is back."""
        while True:
            if self._sure.wait(0.05) and self._lost.is_set():
                raise Fenced(f"epoch {self.epoch}: the term has ended")
            if self._sure.is_set() and (self._client is None or self._client.connected):
                return

    def _fenced(self, reason: str) -> Fenced:
        self._end(reason)
        return Fenced(f"epoch {self.epoch}: {reason}")

    # -- reads --------------------------------------------------------------------------
    def load(self) -> dict[str, bytes]:
        """The whole ledger. Reads follow this session's epoch bump, so no older state shows.
        What this coordinator mirrored while it followed is brought up to date and used."""
        with self._commit_lock:
            self._layout = self._read(self._load_layout, "loading the ledger")
            return self._layout.view()

    def _load_layout(self) -> Layout:
        try:
            layout = self._owner._mirrored(_Reads(self._client, self._reply))
        except (LedgerFormatError, Fenced, *_CONNECTION_ERRORS):
            raise
        except Exception:
            log.exception("term %d: the ledger mirror failed; reading the whole ledger",
                          self.epoch)
            layout = None
        return layout if layout is not None else self._read_layout()

    def nodes(self) -> dict[str, bytes]:
        def read() -> dict[str, bytes]:
            names = self._reply(self._client.get_children_async(NODES))
            found = self._get_many([f"{NODES}/{n}" for n in names])
            return {decode_name(path.rsplit("/", 1)[1]): data for path, data in found.items()}

        return self._read(read, "reading the nodes")

    def _read(self, read: Callable[[], T], what: str) -> T:
        """`read()` once the term is sure; again after a connection loss the term survives
        (reads change nothing). A migration or upgrade inside a load writes, but each of its
        transactions ends the term on a connection loss (`journaled`), so is never retried."""
        for _attempt in range(READ_ATTEMPTS):
            self._await_sure()
            try:
                return read()
            except ConnectionLoss:
                continue
            except _CONNECTION_ERRORS as exc:
                raise self._fenced(f"connection lost while {what}") from exc
        raise self._fenced(f"connection lost {READ_ATTEMPTS} times while {what}")

    def _children(self, *parents: str) -> list[list[str]]:
        return _Reads(self._client, self._reply).children(*parents)

    def _get_many(self, paths: list[str]) -> dict[str, bytes]:
        """The data of every path that exists, read in windows of pipelined requests."""
        found = _Reads(self._client, self._reply).get_many(paths)
        return {path: data for path, (data, _mzxid) in found.items()}

    def _read_layout(self) -> Layout:
        """Read the ledger: buckets, log keys and complete deltas, all in one pipelined batch.
        A format-1 ledger is migrated, a format-2 one upgraded, each once and fenced."""
        names, buckets, logs, deltas, journals = self._children(LEDGER, BUCKETS, LOG, DELTAS,
                                                                JOURNAL)
        marker_name = MARKER.rsplit("/", 1)[1]
        legacy = [f"{LEDGER}/{n}" for n in names if n != marker_name]
        if marker_name not in names and legacy:
            return self._migrate(legacy, buckets, logs, deltas, journals)
        complete, junk = complete_deltas(deltas)
        paths = [bucket_path(int(n)) for n in buckets if n.isdigit()]
        paths += [f"{LOG}/{n}" for n in logs]
        paths += [f"{DELTAS}/{n}" for d in complete for n in d.names]
        paths += [f"{JOURNAL}/{n}" for parts in _complete_journals(journals) for n in parts]
        if marker_name in names:
            paths.append(MARKER)
        found = self._get_many(paths)
        fmt, count = LEDGER_FORMAT, BUCKET_COUNT
        if marker_name in names:
            fmt, count = _format_of(found.get(MARKER, b""))
        layout = Layout.empty(count)
        layout.marker = marker_name in names and fmt == LEDGER_FORMAT
        layout.legacy = legacy
        for path, data in found.items():
            if path.startswith(BUCKETS + "/"):
                index = int(path.rsplit("/", 1)[1])
                if index >= count:
                    raise LedgerFormatError(f"ledger bucket {path} is beyond the ledger's "
                                            f"{count} buckets: repair or delete it")
                layout.buckets[index] = _decode_map(path, data)
                layout.sizes[index] = len(data)
                layout.existing.add(path)
            elif path.startswith(LOG + "/"):
                layout.logs[LOG_PREFIX + decode_name(path.rsplit("/", 1)[1])] = data
                layout.existing.add(path)
        if marker_name in names:
            layout.existing.add(MARKER)
        if fmt == 2:
            return self._upgrade(layout, found, journals, deltas)
        layout.junk = [f"{DELTAS}/{n}" for n in junk] + [f"{JOURNAL}/{n}" for n in journals]
        replayed: list[tuple[dict[str, bytes | None], Order]] = []
        for delta in complete:
            writes: dict[str, bytes | None] = {}
            for name in delta.names:
                data = found[f"{DELTAS}/{name}"]
                delta.size += len(data)
                writes.update(_decode_map(f"{DELTAS}/{name}", data))
            replayed.append((writes, delta.order))
            layout.deltas.append(delta)
        layout.replay(replayed)
        if layout.pending_logs:
            log.info("term %d: %d log key(s) of a delta left by a deposed leader are written "
                     "with the next commit", self.epoch, len(layout.pending_logs))
        return layout

    def _migrate(self, legacy: list[str], buckets: list[str], logs: list[str],
                 deltas: list[str], journals: list[str]) -> Layout:
        """Move a format-1 ledger (one znode per key) into buckets, once, fenced.

        Every bucket is written (leftovers of an interrupted migration are overwritten), then,
        in the last transaction, the format marker is created. Until the marker exists the
        format-1 znodes, which are never changed, are the ledger, so a leader deposed half-way
        leaves nothing a successor would read: it migrates again. Once the marker exists the
        format-1 znodes are leftovers, deleted a few at a time by later commits.
        """
        found = self._get_many(legacy)
        values = {decode_name(p.rsplit("/", 1)[1]): v for p, v in found.items()}
        layout = Layout.empty(BUCKET_COUNT)
        layout.existing = {bucket_path(int(n)) for n in buckets if n.isdigit()}
        layout.apply(values)
        ops = []
        for index, bucket in enumerate(layout.buckets):
            path = bucket_path(index)
            if bucket or path in layout.existing:
                data = msgpack.packb(bucket)
                layout.sizes[index] = len(data)
                ops.append(self._put(layout, path, data))
        for key, value in layout.logs.items():
            ops.append(self._put(layout, log_path(key), value))
        ops += [_Op("delete", f"{LOG}/{n}") for n in logs
                if LOG_PREFIX + decode_name(n) not in layout.logs]
        ops += [_Op("delete", f"{DELTAS}/{n}") for n in deltas]
        ops += [_Op("delete", f"{JOURNAL}/{n}") for n in journals]
        ops.append(_Op("create", MARKER, _marker(BUCKET_COUNT)))
        for i, chunk in enumerate(self._plan(ops)):
            self._transaction(chunk, journaled=True)
            if self.fault:
                self.fault(f"migrate {i}")
        self._installed(layout, ops)
        layout.legacy = legacy
        log.warning("term %d migrated the ledger from format 1 (%d keys, one znode each) to "
                    "format %d (%d buckets)", self.epoch, len(values), LEDGER_FORMAT,
                    BUCKET_COUNT)
        return layout

    def _upgrade(self, layout: Layout, found: Mapping[str, bytes], journals: list[str],
                 deltas: list[str]) -> Layout:
        """Make a format-2 ledger (the same buckets, no deltas) format 3, once, fenced.

        Format 2 kept a commit too large for one transaction in a journal that a successor
        applies over the buckets. A complete journal's writes are put into the buckets and
        log keys first; the last transaction deletes the journals and sets the marker to
        format 3. Deposed before that, the ledger is still format 2 (a format-2 coordinator
        can still read it) and the next leader upgrades it again.
        """
        carry: dict[str, bytes | None] = {}
        for parts in _complete_journals(journals):
            for name in parts:
                carry.update(_decode_map(f"{JOURNAL}/{name}", found[f"{JOURNAL}/{name}"]))
        layout.apply(carry)
        ops: list[_Op] = []
        for index in sorted({bucket_of(k, layout.count) for k in carry
                             if not k.startswith(LOG_PREFIX)}):
            data = msgpack.packb(layout.buckets[index])
            layout.sizes[index] = len(data)
            ops.append(self._put(layout, bucket_path(index), data))
        for key in (k for k in carry if k.startswith(LOG_PREFIX)):
            ops += self._log_sync(layout, key)
        ops += [_Op("delete", f"{DELTAS}/{n}") for n in deltas]  # none, unless planted
        ops += [_Op("delete", f"{JOURNAL}/{n}") for n in journals]
        ops.append(_Op("set", MARKER, _marker(layout.count)))
        for i, chunk in enumerate(self._plan(ops)):
            self._transaction(chunk, journaled=True)
            if self.fault:
                self.fault(f"upgrade {i}")
        self._installed(layout, ops)
        layout.marker = True
        log.warning("term %d upgraded the ledger from format 2 to format %d (%d buckets%s)",
                    self.epoch, LEDGER_FORMAT, layout.count,
                    f", {len(carry)} journaled key(s) applied" if carry else "")
        return layout

    def _reply(self, result: Any) -> Any:
        """Wait for a ZooKeeper reply, but no longer than the term: a request sent as the
        connection dropped waits in kazoo until the link is back, and an ended term must
        not hang its leader for the whole partition."""
        while not result.ready():
            result.wait(0.1)
            if not result.ready() and self._lost.is_set():
                raise Fenced(f"epoch {self.epoch}: the term ended while waiting for ZooKeeper")
        return result.get()

    # -- writes -------------------------------------------------------------------------
    def commit(self, writes: Mapping[str, bytes | None]) -> None:
        for key, value in writes.items():
            if value is not None and len(value) > MAX_VALUE:
                raise ValueError(f"ledger value for {key!r} is {len(value)} bytes, "
                                 f"over the {MAX_VALUE}-byte limit")
        if not writes:
            return
        with self._commit_lock:
            # While the term is in doubt nothing is sent (kazoo would queue it until the link
            # is back): the commit waits until the term is sure again, or fails once it ended.
            self._await_sure()
            if self._layout is None:
                self._layout = self._read(self._read_layout, "loading the ledger")
            try:
                # Each bucket's size after the writes, when the largest could pass the limit
                # (an entry costs its key, its value and a few bytes of framing).
                layout = self._layout
                added = sum(len(k) + len(v) + 16 for k, v in writes.items() if v is not None)
                near = max(layout.sizes) + added > MAX_VALUE
                for index, size in (layout.grown(writes) if near else {}).items():
                    if size > MAX_VALUE:
                        raise ValueError(f"ledger bucket {bucket_path(index)} would hold "
                                         f"about {size} bytes, over the {MAX_VALUE}-byte limit")
                for _attempt in range(3):
                    try:
                        self._commit(self._layout, dict(writes))
                        return
                    except _Stale as stale:
                        log.warning("ledger znodes changed under term %d: %s", self.epoch,
                                    stale)
                        self._resync(self._layout)
            except _CONNECTION_ERRORS as exc:
                raise self._fenced("connection lost during a commit") from exc
            raise self._fenced("ledger znodes keep changing under this leader")

    def _put(self, layout: Layout, path: str, value: bytes) -> _Op:
        return _Op("set" if path in layout.existing else "create", path, value)

    def _log_sync(self, layout: Layout, key: str) -> list[_Op]:
        """The op that makes a log key's znode what the layout says, if any."""
        path, value = log_path(key), layout.logs.get(key)
        if value is not None:
            return [self._put(layout, path, value)]
        return [_Op("delete", path)] if path in layout.existing else []

    def _commit(self, layout: Layout, writes: dict[str, bytes | None]) -> None:
        """One commit: a delta of the changed keys, the log keys, and a compaction step."""
        self._seq += 1
        order = (self.epoch, self._seq)
        keys = {k: v for k, v in writes.items() if not k.startswith(LOG_PREFIX)}
        data = msgpack.packb(keys) if keys else b""
        ops: list[_Op] = []
        name = delta_name(order, 0, 1)
        if keys:  # first: an interrupted commit is told applied or not by this create
            ops.append(_Op("create", f"{DELTAS}/{name}", data))
        if not layout.marker:
            ops.append(_Op("create", MARKER, _marker(layout.count)))
        layout.apply(writes, order)  # again on a retry: the same result
        for key in sorted(layout.pending_logs | {k for k in writes if k.startswith(LOG_PREFIX)}):
            ops += self._log_sync(layout, key)
        size = len(EPOCH) + _OP_OVERHEAD + sum(op.size for op in ops)
        if len(ops) + 1 > self.max_ops or size > self.max_bytes:
            self._in_parts(layout, writes, order, ops)
            return
        extra, rewritten, gone = self._compaction(layout, self.max_ops - 1 - len(ops),
                                                  self.max_bytes - size, len(data))
        self._transaction([*ops, *extra])
        self._installed(layout, [*ops, *extra])
        if keys:
            layout.deltas.append(Delta(order, [name], len(data)))
        layout.pending_logs.clear()
        layout.compacted(rewritten, gone)
        dropped = {op.path for op in extra if op.kind == "delete"}
        layout.junk = [p for p in layout.junk if p not in dropped]
        layout.legacy = [p for p in layout.legacy if p not in dropped]

    def _compaction(self, layout: Layout, room_ops: int, room_bytes: int, delta_bytes: int
                    ) -> tuple[list[_Op], list[int], list[Delta]]:
        """What a commit adds where its transaction has room: leftovers to delete, the
        longest-stale buckets its credit covers, rewritten, and the deltas they make
        redundant."""
        ops = [_Op("delete", p) for p in layout.junk[: max(0, room_ops // 2)]]
        ops += [_Op("delete", p) for p in
                layout.legacy[: max(0, min(CLEANUP_PER_COMMIT, room_ops // 2 - len(ops)))]]
        room_ops -= len(ops)
        stale = layout.stale
        credit = layout.earn(delta_bytes)
        rewritten: list[int] = []
        for index in layout.stalest(stale) if credit > 0 else ():
            if room_ops <= 1 or min(layout.sizes[index], PRESSURE_BUDGET) > credit:
                break
            data = msgpack.packb(layout.buckets[index])
            op = self._put(layout, bucket_path(index), data)
            if len(data) > credit or op.size > room_bytes:
                break
            ops.append(op)
            layout.sizes[index] = len(data)
            rewritten.append(index)
            credit -= len(data)
            layout.credit -= len(data)  # a failed transaction ends the term or is retried
            room_ops -= 1
            room_bytes -= op.size
        gone: list[Delta] = []
        for delta in layout.deletable(stale, rewritten):
            if len(delta.names) > room_ops:
                break
            ops += [_Op("delete", f"{DELTAS}/{n}") for n in delta.names]
            room_ops -= len(delta.names)
            gone.append(delta)
        return ops, rewritten, gone

    def _in_parts(self, layout: Layout, writes: dict[str, bytes | None], order: Order,
                  ops: list[_Op]) -> None:
        """A commit larger than one transaction, made all-or-nothing for a successor.

        Its writes, log keys included, become a delta of several parts under
        `/rota/deltas`, each created by a transaction of its own that checks the epoch; the
        delta counts once all its parts exist. Only then are its log keys written as znodes
        (chunked, each chunk checking the epoch). A leader deposed (or killed) before the last
        part leaves an incomplete delta, which a successor ignores and deletes: the ledger is
        as before the commit. Deposed after it, the delta holds the whole commit and the
        successor writes the log keys it may lack with its own first commit.
        """
        parts = split(writes, self.max_bytes - 4_096)
        names = [delta_name(order, i, len(parts)) for i in range(len(parts))]
        sizes = []
        for i, (name, part) in enumerate(zip(names, parts, strict=True)):
            data = msgpack.packb(part)
            sizes.append(len(data))
            first = [op for op in ops if op.path == MARKER] if i == 0 else []
            self._transaction([*first, _Op("create", f"{DELTAS}/{name}", data)],
                              journaled=True)
            self._installed(layout, first)
            if self.fault:
                self.fault(f"delta {i}")
        if self.fault:
            self.fault("delta complete")
        layout.deltas.append(Delta(order, names, sum(sizes)))
        layout.pending_logs |= {k for k in writes if k.startswith(LOG_PREFIX)}
        logs = [op for key in sorted(layout.pending_logs) for op in self._log_sync(layout, key)]
        for i, chunk in enumerate(self._plan(logs)):
            self._transaction(chunk, journaled=True)
            self._installed(layout, chunk)
            if self.fault:
                self.fault(f"logs {i}")
        layout.pending_logs.clear()

    def _plan(self, ops: list[_Op]) -> list[list[_Op]]:
        """Ops in order, cut into transactions within the op and byte limits."""
        chunks: list[list[_Op]] = []
        current: list[_Op] = []
        size = len(EPOCH) + _OP_OVERHEAD
        for op in ops:
            if current and (len(current) + 2 > self.max_ops or size + op.size > self.max_bytes):
                chunks.append(current)
                current, size = [], len(EPOCH) + _OP_OVERHEAD
            current.append(op)
            size += op.size
        if current:
            chunks.append(current)
        return chunks

    def _transaction(self, ops: list[_Op], *, journaled: bool = False) -> None:
        """One fenced transaction. A refused one raises `Fenced` (the epoch moved; or, in a
        commit of several transactions, anything at all: the successor sorts it out) or
        `_Stale`. One interrupted by a connection loss is resolved (`_resolve`) when its first
        op creates a delta of its own, and ends the term otherwise."""
        try:
            results = self._send(ops)
        except ConnectionLoss as exc:
            if journaled or not _proves_itself(ops):
                raise self._fenced("connection lost during a transaction whose outcome "
                                   "cannot be told") from exc
            results = self._resolve(ops)
        failures = [r for r in results if isinstance(r, Exception)]
        if not failures:
            self._count(ops)
            return
        if isinstance(results[0], BadVersionError | NoNodeError):
            raise self._fenced(f"the epoch moved past {self.epoch}")
        culprit = next((f for f in failures if not isinstance(f, RolledBackError)), failures[0])
        if journaled:
            raise self._fenced(f"a commit in several transactions was refused: "
                               f"{type(culprit).__name__}")
        if isinstance(culprit, NodeExistsError | NoNodeError):
            raise _Stale(type(culprit).__name__)
        raise culprit

    def _send(self, ops: list[_Op]) -> list[Any]:
        """Send one transaction, the epoch check first; its results, one per op."""
        sent = self._start(ops)
        if self.fault:
            self.fault("sent")
        return list(self._reply(sent))

    def _start(self, ops: list[_Op]) -> Any:
        """Send one transaction, the epoch check first, without waiting: its async result."""
        txn = self._client.transaction()
        txn.check(EPOCH, self.epoch)
        for op in ops:
            if op.kind == "create":
                txn.create(op.path, op.value)
            elif op.kind == "set":
                txn.set_data(op.path, op.value)
            else:
                txn.delete(op.path)
        return txn.commit_async()

    def _resolve(self, ops: list[_Op]) -> list[Any]:
        """Settle a transaction interrupted by a connection loss: it may have been applied, or
        may still be (a dying server may have forwarded it). Once the term is sure again
        (same session, epoch unmoved) the identical transaction is sent again. `ops[0]` creates
        this commit's delta, a name no other transaction uses: a retry refused on that create
        proves an earlier attempt was applied (results of success are returned); a retry that
        applies proves none was, and none can be any more. Anything else ends the term."""
        for attempt in range(1, RESOLVE_ATTEMPTS + 1):
            self._await_sure()
            try:
                results = self._send(ops)
            except ConnectionLoss:
                continue
            if not any(isinstance(r, Exception) for r in results):
                log.info("term %d: an interrupted commit was applied by its retry (attempt %d)",
                         self.epoch, attempt)
                return results
            if isinstance(results[1], NodeExistsError):
                log.info("term %d: an interrupted commit had been applied before the "
                         "connection dropped", self.epoch)
                return [None] * len(results)
            if isinstance(results[0], BadVersionError | NoNodeError):
                raise self._fenced(f"the epoch moved past {self.epoch}")
            culprit = next((r for r in results if isinstance(r, Exception)
                            and not isinstance(r, RolledBackError)), results[0])
            raise self._fenced(f"an interrupted commit could not be resolved: its retry was "
                               f"refused ({type(culprit).__name__})")
        raise self._fenced(f"an interrupted commit could not be resolved in "
                           f"{RESOLVE_ATTEMPTS} attempts")

    def _count(self, ops: list[_Op]) -> None:
        self.transactions += 1
        self.ops += len(ops)
        self.written += sum(len(op.path) + len(op.value) for op in ops if op.value)

    def _installed(self, layout: Layout, ops: list[_Op]) -> None:
        for op in ops:
            if op.path.startswith(DELTAS + "/"):
                continue
            if op.kind == "delete":
                layout.existing.discard(op.path)
            else:
                layout.existing.add(op.path)
        if any(op.path == MARKER for op in ops):
            layout.marker = True

    def _resync(self, layout: Layout) -> None:
        """Learn again which ledger znodes exist; the contents this term wrote stay."""
        names, buckets, logs, deltas, journals = self._children(LEDGER, BUCKETS, LOG, DELTAS,
                                                                JOURNAL)
        layout.marker = MARKER.rsplit("/", 1)[1] in names
        layout.existing = {bucket_path(int(n)) for n in buckets if n.isdigit()}
        layout.existing |= {f"{LOG}/{n}" for n in logs}
        if layout.marker:
            layout.existing.add(MARKER)
        present = set(deltas)
        layout.deltas = [d for d in layout.deltas if all(n in present for n in d.names)]
        # A bucket that vanished, or any doubt: every bucket is rewritten before a delta goes.
        for index in range(layout.count):
            if bucket_path(index) not in layout.existing and layout.buckets[index]:
                layout.doubt(index)
        present = {f"{LEDGER}/{n}" for n in names} | {f"{DELTAS}/{n}" for n in deltas}
        present |= {f"{JOURNAL}/{n}" for n in journals}
        layout.legacy = [p for p in layout.legacy if p in present]
        layout.junk = [p for p in layout.junk if p in present]


def _later(delay: float, fn: Callable[[], None]) -> None:
    """Call `fn` on a timer thread after `delay` seconds."""
    timer = threading.Timer(delay, fn)
    timer.daemon = True
    timer.start()


def _proves_itself(ops: list[_Op]) -> bool:
    """Whether a retry of this transaction tells if it was applied: its first op creates a
    delta (whose name carries the term's epoch and commit number)."""
    return bool(ops) and ops[0].kind == "create" and ops[0].path.startswith(DELTAS + "/")


def _complete_journals(names: list[str]) -> list[list[str]]:
    """Format 2's journals all of whose parts exist, oldest first, each its part names."""
    groups: dict[tuple[str, str], dict[int, str]] = {}
    sizes: dict[tuple[str, str], int] = {}
    for name in names:
        bits = name.split("-")
        if len(bits) != 4 or not all(b.isdigit() for b in bits):
            continue
        group = (bits[0], bits[1])
        groups.setdefault(group, {})[int(bits[2])] = name
        sizes[group] = int(bits[3])
    return [
        [parts[i] for i in range(sizes[g])]
        for g, parts in sorted(groups.items())
        if set(parts) == set(range(sizes[g]))
    ]


class _Reads:
    """Pipelined reads on one client; `reply` waits for one (a term's stops at its end)."""

    def __init__(self, client: KazooClient, reply: Callable[[Any], Any]) -> None:
        self.client, self.reply = client, reply

    def children(self, *parents: str) -> list[list[str]]:
        pending = [self.client.get_children_async(p) for p in parents]
        return [list(self.reply(r)) for r in pending]

    def versions(self, paths: list[str]) -> dict[str, int | None]:
        """Each path's last modification (its mzxid); None if it does not exist."""
        out: dict[str, int | None] = {}
        for start in range(0, len(paths), _LOAD_WINDOW):
            batch = paths[start : start + _LOAD_WINDOW]
            pending = [(p, self.client.exists_async(p)) for p in batch]
            for path, result in pending:
                stat = self.reply(result)
                out[path] = None if stat is None else stat.mzxid
        return out

    def get_many(self, paths: list[str]) -> dict[str, tuple[bytes, int]]:
        """The data and mzxid of every path that exists, read in windows of pipelined
        requests."""
        out: dict[str, tuple[bytes, int]] = {}
        for start in range(0, len(paths), _LOAD_WINDOW):
            batch = paths[start : start + _LOAD_WINDOW]
            pending = [(p, self.client.get_async(p)) for p in batch]
            for path, result in pending:
                try:
                    data, stat = self.reply(result)
                except NoNodeError:
                    continue
                out[path] = (data or b"", stat.mzxid)
        return out


class LedgerMirror:
    """A standby coordinator's copy of the ledger, so that it takes over without reading and
    replaying all of it.

    While it follows, `refresh` runs every few seconds, and once more as it takes over (after
    its epoch bump, when nothing moves any more). Each refresh reads only what changed since
    the last: the buckets and log znodes whose last modification (mzxid) moved, and the
    complete deltas it has not read yet (a delta never changes once complete). Its result is
    what a full read (`ZkTerm._read_layout`) gives for the same ledger: a rewritten bucket is
    read again and the deltas still left are replayed on it alone; a deleted delta is only
    forgotten, since a leader deletes a delta only when no key of a bucket it did not rewrite
    takes its value from it. Anything else than a plain ledger of this format (none yet, a
    format marker of another format or bucket count, format-1 keys, format-2 journals, a new
    delta older than one already read) is left to the full read: `refresh` returns None.
    """

    def __init__(self) -> None:
        self.layout: Layout | None = None
        self.znodes: dict[str, tuple[int, bytes]] = {}  # bucket and log paths -> (mzxid, data)
        # the deltas replayed, oldest first: each with its writes and how much it grew each
        # bucket (taken off again when it is deleted)
        self.applied: list[tuple[Delta, dict[str, bytes | None], dict[int, int]]] = []
        self.last_read = (0, 0)  # buckets and deltas the last refresh read

    def clear(self) -> None:
        self.layout, self.znodes, self.applied = None, {}, []

    def refresh(self, reads: _Reads) -> Layout | None:
        try:
            layout = self._refresh(reads)
        except BaseException:
            self.clear()  # half-updated: start afresh next time
            raise
        if layout is None:
            self.clear()
        return layout

    def _refresh(self, reads: _Reads) -> Layout | None:
        names, buckets, logs, deltas, journals = reads.children(LEDGER, BUCKETS, LOG, DELTAS,
                                                                JOURNAL)
        marker_name = MARKER.rsplit("/", 1)[1]
        if names != [marker_name] or journals:
            return None
        complete, junk = complete_deltas(deltas)
        paths = [bucket_path(int(n)) for n in buckets if n.isdigit()]
        paths += [f"{LOG}/{n}" for n in logs]
        paths.append(MARKER)
        layout = self.layout
        if layout is None:
            need = paths
            versions: dict[str, int | None] = {}
        else:
            versions = reads.versions(paths)
            need = [p for p in paths
                    if versions[p] is None or self.znodes.get(p, (None,))[0] != versions[p]]
        known = {d.order for d, _, _ in self.applied}
        newest = self.applied[-1][0].order if self.applied else None
        fresh = [d for d in complete if d.order not in known]
        if newest is not None and any(d.order < newest for d in fresh):
            return None
        found = reads.get_many(need + [f"{DELTAS}/{n}" for d in fresh for n in d.names])
        before = set(self.znodes)
        for path in need:
            if path in found:
                data, mzxid = found[path]
                self.znodes[path] = (mzxid, data)
        present = set(paths) - {p for p in need if p not in found}
        self.znodes = {p: v for p, v in self.znodes.items() if p in present}
        if MARKER not in self.znodes:
            return None
        fmt, count = _format_of(self.znodes[MARKER][1])
        if fmt != LEDGER_FORMAT or (layout is not None and layout.count != count):
            return None
        for path in present:
            if path.startswith(BUCKETS + "/") and int(path.rsplit("/", 1)[1]) >= count:
                raise LedgerFormatError(f"ledger bucket {path} is beyond the ledger's "
                                        f"{count} buckets: repair or delete it")
        if layout is None:
            layout = Layout.empty(count)
            changed = set(range(count))
        else:  # read again, created, or gone (never, unless repaired by hand)
            moved = {p for p in need if p in found} | (before - present)
            changed = {int(p.rsplit("/", 1)[1]) for p in moved if p.startswith(BUCKETS + "/")}
        for index in changed:
            entry = self.znodes.get(bucket_path(index))
            if entry is None:
                layout.reset(index, {}, 1)
            else:
                layout.reset(index, _decode_map(bucket_path(index), entry[1]), len(entry[1]))
        current = {d.order for d in complete}
        for delta, _, grew in self.applied:
            if delta.order not in current:  # deleted: what it added to sizes goes too
                for index, size in grew.items():
                    if index not in changed:
                        layout.sizes[index] -= size
        self.applied = [a for a in self.applied if a[0].order in current]
        if changed and self.applied:
            layout.replay([(w, d.order) for d, w, _ in self.applied], only=changed)
        # Log keys as the znodes hold them, then as the deltas left write them, in order.
        layout.logs = {LOG_PREFIX + decode_name(p.rsplit("/", 1)[1]): data
                       for p, (_, data) in self.znodes.items() if p.startswith(LOG + "/")}
        layout.pending_logs = set()
        for _, held, _ in self.applied:
            for key, value in held.items():
                if key.startswith(LOG_PREFIX):
                    layout.pending_logs.add(key)
                    if value is None:
                        layout.logs.pop(key, None)
                    else:
                        layout.logs[key] = value
        added: list[tuple[Delta, dict[str, bytes | None]]] = []
        for delta in fresh:
            if any(f"{DELTAS}/{n}" not in found for n in delta.names):
                continue  # deleted since listed (only while following): no longer needed
            writes: dict[str, bytes | None] = {}
            delta.size = 0
            for name in delta.names:
                data, _ = found[f"{DELTAS}/{name}"]
                delta.size += len(data)
                writes.update(_decode_map(f"{DELTAS}/{name}", data))
            added.append((delta, writes))
        grown = layout.replay([(w, d.order) for d, w in added])
        self.last_read = (len(changed), len(added))
        self.applied += [(d, w, g) for (d, w), g in zip(added, grown, strict=True)]
        layout.deltas = [d for d, _, _ in self.applied]
        layout.existing = set(present)
        layout.marker = True
        layout.legacy = []
        layout.junk = [f"{DELTAS}/{n}" for n in junk]
        self.layout = layout
        return layout


def _marker(count: int) -> bytes:
    return msgpack.packb({"format": LEDGER_FORMAT, "buckets": count})


def _format_of(data: bytes) -> tuple[int, int]:
    """(format, bucket count) of a format marker; refuses a format this code cannot read."""
    try:
        info = msgpack.unpackb(data)
        fmt, count = int(info["format"]), int(info["buckets"])
    except Exception as exc:
        raise LedgerFormatError(f"the ledger format marker {MARKER} cannot be read ({exc}): "
                                f"repair it from a backup") from exc
    if fmt not in (2, LEDGER_FORMAT) or count < 1:
        raise LedgerFormatError(
            f"the ledger is in format {fmt}, which this coordinator (format {LEDGER_FORMAT}) "
            f"does not know: run a coordinator of the Rota version that wrote it")
    return fmt, count


def _decode_map(path: str, data: bytes) -> dict[str, Any]:
    try:
        value = msgpack.unpackb(data)
    except Exception as exc:
        raise LedgerFormatError(f"ledger znode {path} cannot be decoded: {exc}") from exc
    if not isinstance(value, dict):
        raise LedgerFormatError(f"ledger znode {path} is not a map")
    return value


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
        self._url = ""  # advertised with this contender's election znode
        self.hosts = hosts
        self.session_timeout = session_timeout
        self.deadline = doubt_deadline(session_timeout)  # a term's longest doubt
        self.grace = suspend_grace(session_timeout)  # before `suspended()` callbacks run
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
        self._term_serial = _Serial("zk-term")
        self._mirror = LedgerMirror()  # of the ledger, while this coordinator follows
        self._mirror_lock = threading.Lock()

        self.client.add_listener(self._on_state)
        self.client.start_async()
        if not self._connected.wait(connect_timeout):
            self._shutdown()
            raise ConnectionError(f"no ZooKeeper session with {hosts} in {connect_timeout}s")
        for path in (ELECTION, NODES, LEDGER, BUCKETS, DELTAS, LOG, JOURNAL, EPOCH):
            self.client.retry(self.client.ensure_path, path)
        self.client.DataWatch(EPOCH, self._on_epoch)

    # -- connection state (flags and queued work only: never call ZooKeeper here) ------
    def _on_state(self, state: str) -> None:
        if self._closing:
            return
        term = self._term
        if state == KazooState.CONNECTED:
            self._connected.set()
            self._upkeep_serial.submit(self._upkeep)
            if term is not None and term.in_doubt():
                self._reconnected(term)
        else:
            self._connected.clear()
            self._generation += 1
            if state == KazooState.LOST:
                if term is not None:
                    term._end("the session was lost")
                self._session_serial.submit(lambda: self._trouble_callbacks(lost=True))
            else:
                if term is not None:
                    doubt = term._suspend()
                    _later(self.deadline, lambda: term._overdue(doubt, self.deadline))
                generation = self._generation
                _later(self.grace, lambda: self._grace_over(generation))
        self._wake.set()

    def _reconnected(self, term: ZkTerm) -> None:
        """CONNECTED while `term` is in doubt: in the same session, check the epoch (on a
        thread of its own) before the term goes on; in another, the term is over."""
        doubt = term._doubts
        session = self._session_id()
        if session != term.session:
            term._end(f"the session changed ({term.session} -> {session})")
        elif term._back(doubt):
            self._term_serial.submit(lambda: self._check_epoch(term, doubt))

    def _check_epoch(self, term: ZkTerm, doubt: int) -> None:
        try:
            stat = self.client.exists(EPOCH)
        except _CONNECTION_ERRORS:
            return  # suspended again: that doubt has its own deadline and check
        except Exception as exc:
            term._end(f"the epoch could not be checked after a reconnection: {exc}")
            return
        version = stat.version if stat is not None else 0
        if version != term.epoch:
            term._end(f"epoch moved to {version}")
        else:
            term._confirm(doubt)

    def _grace_over(self, generation: int) -> None:
        """The grace after SUSPENDED passed: if the connection is still not back (no other
        state since), the session is in doubt for `suspended()` callbacks."""
        if generation == self._generation and not self._connected.is_set() and not self._closing:
            log.warning("ZooKeeper connection still suspended after %.2fs", self.grace)
            self._session_serial.submit(lambda: self._trouble_callbacks(lost=False))

    def _trouble_callbacks(self, *, lost: bool) -> None:
        for suspended, on_lost in list(self._trouble):
            (on_lost if lost else suspended)()

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
        threading.Thread(target=self._follow_ledger, name="zk-ledger-mirror",
                         daemon=True).start()
        try:
            while not self._stopped.is_set():
                won = self._acquire(ident)
                if won is None:
                    return
                path, session = won
                term = None
                failed = False
                try:
                    term = self._begin_term(path, ident, session)
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

    def _follow_ledger(self) -> None:
        """While this contender follows, keep its mirror of the ledger current: read at
        once (a standby that has just joined may have to take over soon), then every
        `MIRROR_EVERY` s; it stops with `contend`."""
        reads = _Reads(self.client, lambda result: result.get(True, MIRROR_READ_TIMEOUT))
        while not (self._stopped.is_set() or self._idle.is_set()):
            if self._term is None and self._connected.is_set():
                with self._mirror_lock:
                    try:
                        if self._term is None:
                            self._mirror.refresh(reads)
                    except Exception as exc:  # an optimisation only: the next one starts over
                        log.info("the ledger mirror is read again from the start: %s", exc)
            self._stopped.wait(MIRROR_EVERY)

    def _mirrored(self, reads: _Reads) -> Layout | None:
        """The mirror brought up to date and handed to the term that reads it (None: the
        ledger needs a full read)."""
        with self._mirror_lock:
            warm = self._mirror.layout is not None
            layout = self._mirror.refresh(reads)
            self._mirror.clear()
        if layout is not None:
            buckets, deltas = self._mirror.last_read
            log.info("ledger %s: %d bucket(s) and %d delta(s) read",
                     "mirror brought up to date" if warm else "read", buckets, deltas)
        return layout

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
                            f"{ELECTION}/{prefix}", _contender_data(ident, self._url),
                            ephemeral=True, sequence=True,
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

    def _begin_term(self, path: str, ident: str, session: int | None) -> ZkTerm | None:
        """Bump the epoch, proving in the same transaction that we still hold the election
        (created in `session`)."""
        generation = self._generation
        if session is None or session != self._session_id():
            return None
        try:
            txn = self.client.transaction()
            txn.check(path, 0)
            txn.set_data(EPOCH, ident.encode())
            results = txn.commit()
        except _CONNECTION_ERRORS:
            return None
        if any(isinstance(r, Exception) for r in results):
            return None
        term = ZkTerm(self, results[1].version, session)
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
        first = self._first_contender()
        return None if first is None else first[0]

    def advertise(self, url: str) -> None:
        self._url = url

    def leader_url(self) -> str | None:
        first = self._first_contender()
        return None if first is None else first[1]

    def _first_contender(self) -> tuple[str, str | None] | None:
        """The identifier of the contender first in line (the leader, or the next one), and
        the URL it advertised."""
        try:
            children = self.client.get_children_async(ELECTION).get(timeout=1.0)
            candidates = (c for c in children if _sequence(c))
            for name in sorted(candidates, key=lambda c: _sequence(c) or ""):
                try:
                    data, _stat = self.client.get_async(f"{ELECTION}/{name}").get(timeout=1.0)
                except NoNodeError:
                    continue
                ident, _, url = (data or b"").decode(errors="replace").partition("\n")
                return ident, url or None
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
        """`suspended()` when the connection has been down for `self.grace` without coming
        back (the session may still be saved, but the server may expire it soon: stop what
        must not outlive it); `lost()` at once when it expired, whether or not `suspended()`
        ran. A connection back in the same session within the grace calls neither. Both run
        on a thread of their own."""
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
                       self._upkeep_serial, self._term_serial):
            serial.close()


__all__ = ["ZkCoordination", "ZkTerm", "bucket_of", "decode_name", "doubt_deadline",
           "encode_name", "expiry_margin", "suspend_grace"]
