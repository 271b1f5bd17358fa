"""How the ledger (format 3) is laid out in ZooKeeper, and what each commit writes: pure logic,
no client. `protocol/zk.py` reads and writes the znodes.

The ledger is a key/value map. Its base is `BUCKET_COUNT` buckets, each a msgpack map of the
keys whose CRC-32 modulo the count is its number; on top of them lie deltas, one per commit,
each a msgpack map of only the keys that commit changed (a value, or nil for a deleted key).
The ledger is the buckets with every complete delta applied in order. A commit creates its
delta and, in the same transaction, rewrites a few buckets (those whose changes wait the
longest) and deletes the deltas nothing needs any more: compaction in small steps, never a
pause.

Why deltas, measured with `python -m bench.ledger` (see bench/README.md): with format 2 (a
commit rewrote every bucket it touched) each bucket also carried the cursors and last-run
times of many services, so under churn nearly every bucket was rewritten each turn: 160 kB
and 185 znodes per turn of 75 runs at 1,500 services, 6.6 MB and 11 transactions per turn of
100 runs at 100,000 services, which ran a 512 MB ZooKeeper (it keeps its last 500 committed
transactions in memory) out of heap within 20 turns, as the cluster bench's throughput
scenario did. With deltas: 61 kB and 3.8 znodes, and 175 kB, 1 transaction and 6.6 znodes.
Separate key spaces by churn (hot runs, warm cursors, cold overrides) would still rewrite a
whole bucket per touched key, however the buckets are sized, and coalescing cursor writes
saves only the cursors; a delta is as large as the turn's changes, and a run dispatched and
ended between two rewrites of its bucket never reaches a bucket at all. The price is on the
successor, which applies the deltas left (473 ms to load 100,000 services after 500 such
turns, against 257 ms for format 2): bounded by the compaction below.

Compaction budget: each commit earns `COMPACT_RATIO` times its own delta bytes of credit
(saved up to `PRESSURE_BUDGET`) and, once the deltas weigh more than `BACKLOG_FLOOR` and half
the buckets, rewrites the buckets whose changes wait the longest while the credit covers
them. So the bytes written stay proportional to what changed (amortized: a small commit saves
up for a later rewrite), and the deltas a successor applies stay near the larger of 4 MB and
half the buckets. The ratio was measured at 100,000 services: 1 gave 129 kB per turn and a
load / load + restore of 768 / 1,207 ms, 2 gave 175 kB and 492 / 972 ms. Past
`BACKLOG_BYTES` (or twice the buckets' bytes) or `BACKLOG_DELTAS` deltas, each commit may
rewrite `PRESSURE_BUDGET` until the backlog shrinks.

A rewritten bucket holds the term's current view, and a delta may go once no key needs it:
a key whose value differs from its bucket's znode (dirty) needs the delta that last wrote it,
so the deltas older than every dirty key's last write are deleted, oldest first (see
`Layout`). A key that changes often (a cursor) keeps being written by recent deltas, and one
that comes back to its bucket's value (a run that ended) is clean again: neither holds old
deltas back, so under churn compaction mostly rewrites the buckets of keys that change seldom.

A commit larger than one transaction becomes a delta of several parts, each created in a
transaction of its own; a delta counts only when all its parts exist, so a leader killed
half-way leaves the ledger as it was. Such a delta also holds the commit's `log/` keys, which
are written as znodes of their own only after it is complete (`pending_logs` until then).
"""

from __future__ import annotations

import heapq
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

BUCKET_COUNT = 256  # of a new ledger; a ledger keeps the count it was made with
LOG_PREFIX = "log/"
COMPACT_RATIO = 2.0  # bucket bytes rewritten per delta byte
PRESSURE_BUDGET = 256_000  # the most credit saved up: bucket bytes one commit may rewrite
BACKLOG_FLOOR = 4_000_000  # deltas' bytes (or half the buckets') below which none is rewritten
BACKLOG_BYTES = 8_000_000  # deltas' bytes past which (or twice the buckets') commits catch up
BACKLOG_DELTAS = 1_000  # deltas past which commits catch up
_ENTRY = 6  # msgpack bytes of a map entry besides its key and value

Order = tuple[int, int]  # (epoch, sequence) of a delta: deltas apply in this order


def bucket_of(key: str, count: int) -> int:
    """The bucket holding `key`: the same in every process and Python version."""
    return zlib.crc32(key.encode("utf-8")) % count


def entry_size(key: str, value: bytes | None) -> int:
    return 0 if value is None else len(key) + len(value) + _ENTRY


def delta_name(order: Order, part: int, parts: int) -> str:
    return f"{order[0]:010d}-{order[1]:012d}-{part:04d}-{parts:04d}"


@dataclass
class Delta:
    order: Order
    names: list[str]  # its parts, in order
    size: int = 0  # bytes of all its parts


def complete_deltas(names: Iterable[str]) -> tuple[list[Delta], list[str]]:
    """(complete deltas oldest first, names of the parts of incomplete ones)."""
    groups: dict[Order, dict[int, str]] = {}
    counts: dict[Order, int] = {}
    junk: list[str] = []
    for name in names:
        bits = name.split("-")
        if len(bits) != 4 or not all(b.isdigit() for b in bits):
            junk.append(name)
            continue
        order = (int(bits[0]), int(bits[1]))
        groups.setdefault(order, {})[int(bits[2])] = name
        counts[order] = int(bits[3])
    done: list[Delta] = []
    for order in sorted(groups):
        parts = groups[order]
        if set(parts) == set(range(counts[order])):
            done.append(Delta(order, [parts[i] for i in range(counts[order])]))
        else:
            junk += parts.values()
    return done, junk


def split(writes: Mapping[str, bytes | None], max_bytes: int) -> list[dict[str, bytes | None]]:
    """A commit's writes cut into delta parts of about `max_bytes` each."""
    parts: list[dict[str, bytes | None]] = [{}]
    size = 0
    for key, value in writes.items():
        item = len(key) + len(value or b"") + _ENTRY
        if parts[-1] and size + item > max_bytes:
            parts.append({})
            size = 0
        parts[-1][key] = value
        size += item
    return parts


@dataclass
class Layout:
    """What a term knows of the ledger in ZooKeeper: its contents, and what lags behind.

    A key is dirty while its value differs from the one in its bucket's znode; `dirty[b]`
    maps each dirty key of bucket b to the delta that last wrote it, `was[b]` to its value in
    the znode (None: absent there). A key written back to that value is clean again (a run
    that was dispatched and ended since its bucket was last written, say); a rewritten bucket
    has no dirty key. A successor reads each bucket and applies the deltas left, in order: for
    a clean key that gives the znode's value or a later one written since, and a dirty key
    gets its value from the delta that last wrote it, so the deltas older than every dirty
    key's last write can go (`deletable`). `heaps[b]` finds bucket b's oldest last write
    without a scan; entries that no longer match `dirty` are dropped when they surface.
    """

    count: int
    buckets: list[dict[str, bytes]]
    sizes: list[int]  # about the encoded bytes of each bucket
    logs: dict[str, bytes] = field(default_factory=dict)
    deltas: list[Delta] = field(default_factory=list)  # complete, oldest first
    dirty: list[dict[str, Order]] = field(default_factory=list)
    was: list[dict[str, bytes | None]] = field(default_factory=list)
    heaps: list[list[tuple[Order, str]]] = field(default_factory=list)
    pending_logs: set[str] = field(default_factory=set)  # log keys a delta holds, maybe unwritten
    existing: set[str] = field(default_factory=set)  # bucket, log and marker paths
    marker: bool = False  # the format-3 marker exists
    junk: list[str] = field(default_factory=list)  # znodes to delete (incomplete deltas...)
    legacy: list[str] = field(default_factory=list)  # format-1 znodes to delete
    credit: float = 0.0  # bucket bytes commits have earned and not spent on rewrites
    # `stale` as last computed, and the buckets whose dirty keys changed since: each commit
    # looks at the buckets it touched, not at all of them
    _stale: dict[int, Order] = field(default_factory=dict, init=False, repr=False,
                                     compare=False)
    _touched: set[int] = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.dirty = [{} for _ in range(self.count)]
        self.was = [{} for _ in range(self.count)]
        self.heaps = [[] for _ in range(self.count)]

    @classmethod
    def empty(cls, count: int) -> Layout:
        return cls(count, [{} for _ in range(count)], [1] * count)

    def apply(self, writes: Mapping[str, bytes | None], order: Order | None = None) -> None:
        """Apply writes. With `order`, they are a delta's, and the keys they change are dirty
        until their bucket is rewritten; without, they are meant for the buckets as a whole
        (a migration), which the caller rewrites."""
        for key, value in writes.items():
            if key.startswith(LOG_PREFIX):
                if value is None:
                    self.logs.pop(key, None)
                else:
                    self.logs[key] = value
                continue
            index = bucket_of(key, self.count)
            bucket = self.buckets[index]
            old = bucket.get(key)
            self.sizes[index] += entry_size(key, value) - entry_size(key, old)
            if order is not None:
                self._track(index, key, old, value, order)
            if value is None:
                bucket.pop(key, None)
            else:
                bucket[key] = value

    def _track(self, index: int, key: str, old: bytes | None, value: bytes | None,
               order: Order) -> None:
        dirty, was = self.dirty[index], self.was[index]
        if key in dirty:
            if value == was[key]:
                del dirty[key], was[key]
                self._touched.add(index)
                return
        elif value == old:
            return
        else:
            was[key] = old
        dirty[key] = order
        self._touched.add(index)
        heapq.heappush(self.heaps[index], (order, key))

    def replay(self, deltas: Iterable[tuple[Mapping[str, bytes | None], Order]],
               only: set[int] | None = None) -> list[dict[int, int]]:
        """`apply` for the deltas a successor reads back (it holds their log keys), oldest
        first, in one pass: each key's bucket is found once, and each bucket's heap is built
        once at the end from its dirty keys instead of pushed to per write (at 100,000 keys
        the difference is most of a successor's ledger read). Sizes grow by what is set and
        never shrink until the bucket is rewritten. With `only`, just those buckets' keys
        are replayed (log keys are not). Returns how much each delta grew each bucket."""
        buckets, sizes, count, crc = self.buckets, self.sizes, self.count, zlib.crc32
        dirty_of, was_of, logs = self.dirty, self.was, self.logs
        index_of: dict[str, int] = {}
        touched: set[int] = set()
        grown: list[dict[int, int]] = []
        for writes, order in deltas:
            grew: dict[int, int] = {}
            grown.append(grew)
            for key, value in writes.items():
                index = index_of.get(key)
                if index is None:
                    if key.startswith(LOG_PREFIX):
                        if only is None:
                            self.pending_logs.add(key)
                            if value is None:
                                logs.pop(key, None)
                            else:
                                logs[key] = value
                        continue
                    index = index_of[key] = crc(key.encode("utf-8")) % count
                if only is not None and index not in only:
                    continue
                bucket, dirty = buckets[index], dirty_of[index]
                if key in dirty:
                    was = was_of[index]
                    if value == was[key]:
                        del dirty[key], was[key]
                    else:
                        dirty[key] = order
                elif value != bucket.get(key):
                    was_of[index][key] = bucket.get(key)
                    dirty[key] = order
                touched.add(index)
                if value is None:
                    bucket.pop(key, None)
                else:
                    bucket[key] = value
                    size = len(key) + len(value) + _ENTRY
                    sizes[index] += size
                    grew[index] = grew.get(index, 0) + size
        for index in touched:
            heap = [(order, key) for key, order in dirty_of[index].items()]
            heapq.heapify(heap)
            self.heaps[index] = heap
        self._touched |= touched
        return grown

    def reset(self, index: int, bucket: dict[str, bytes], size: int) -> None:
        """Bucket `index` is `bucket` as its znode now holds it, no delta applied."""
        self.buckets[index] = bucket
        self.sizes[index] = size
        self.dirty[index] = {}
        self.was[index] = {}
        self.heaps[index] = []
        self._touched.add(index)

    def doubt(self, index: int) -> None:
        """Bucket `index` may not be in ZooKeeper as this term believes: every key is dirty
        (since the oldest possible delta) until the bucket is rewritten."""
        self.dirty[index] = dict.fromkeys(self.buckets[index], (0, 0))
        self.was[index] = dict.fromkeys(self.buckets[index])
        self.heaps[index] = [((0, 0), key) for key in self.buckets[index]]
        self._touched.add(index)

    def oldest(self, index: int) -> Order | None:
        """The oldest last write of bucket `index`'s dirty keys (None: none is dirty)."""
        heap, dirty = self.heaps[index], self.dirty[index]
        while heap and dirty.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    @property
    def stale(self) -> dict[int, Order]:
        """Buckets with dirty keys, each with its oldest last write."""
        for index in self._touched:
            order = self.oldest(index) if self.dirty[index] else None
            if order is None:
                self._stale.pop(index, None)
            else:
                self._stale[index] = order
        self._touched.clear()
        return dict(self._stale)

    def grown(self, writes: Mapping[str, bytes | None]) -> dict[int, int]:
        """The size each touched bucket would have after `writes`."""
        out: dict[int, int] = {}
        for key, value in writes.items():
            if key.startswith(LOG_PREFIX):
                continue
            index = bucket_of(key, self.count)
            before = out.get(index, self.sizes[index])
            out[index] = before + entry_size(key, value) - entry_size(
                key, self.buckets[index].get(key))
        return out

    def view(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for bucket in self.buckets:
            out.update(bucket)
        out.update(self.logs)
        return out

    def backlog(self) -> int:
        return sum(d.size for d in self.deltas)

    def earn(self, delta_bytes: int) -> float:
        """Add a commit's credit; the bucket bytes it should rewrite now (0 while the deltas
        are few enough that churn alone keeps them short)."""
        backlog, ledger = self.backlog(), sum(self.sizes)
        self.credit = min(self.credit + COMPACT_RATIO * delta_bytes, PRESSURE_BUDGET)
        if len(self.deltas) > BACKLOG_DELTAS or backlog > max(BACKLOG_BYTES, 2 * ledger):
            self.credit = PRESSURE_BUDGET
        elif backlog <= max(BACKLOG_FLOOR, ledger // 2):
            return 0.0
        return self.credit

    @staticmethod
    def stalest(stale: Mapping[int, Order]) -> list[int]:
        """Buckets with dirty keys, the one with the oldest last write first."""
        return sorted(stale, key=lambda b: (stale[b], b))

    def deletable(self, stale: Mapping[int, Order], rewritten: Iterable[int]) -> list[Delta]:
        """The oldest deltas no dirty key needs once `rewritten` are written."""
        done = set(rewritten)
        horizon = min((o for b, o in stale.items() if b not in done), default=None)
        out = []
        for delta in self.deltas:
            if horizon is not None and delta.order >= horizon:
                break
            out.append(delta)
        return out

    def compacted(self, rewritten: Iterable[int], gone: list[Delta]) -> None:
        """Bookkeeping once buckets were rewritten and deltas deleted."""
        for index in rewritten:
            self.dirty[index].clear()
            self.was[index].clear()
            self.heaps[index].clear()
            self._touched.add(index)
        drop = {d.order for d in gone}
        self.deltas = [d for d in self.deltas if d.order not in drop]
