"""How the ledger (format 3) is laid out in ZooKeeper, and what each commit writes: pure logic,
no client. `protocol/zk.py` reads and writes the znodes.

The ledger is a key/value map. Its base is `BUCKET_COUNT` buckets, each a msgpack map of the
keys whose CRC-32 modulo the count is its number; on top of them lie deltas, one per commit,
each a msgpack map of only the keys that commit changed (a value, or nil for a deleted key).
The ledger is the buckets with every complete delta applied in order. A commit creates its
delta and, in the same transaction, rewrites a few buckets (the ones stale the longest) and
deletes the deltas every bucket now reflects: compaction in small steps, never a pause.

Why deltas, measured with `python -m bench.ledger` (see bench/README.md): with format 2 (a
commit rewrote every bucket it touched) each bucket also carried the cursors and last-run
times of many services, so under churn nearly every bucket was rewritten each turn: 160 kB
per turn of 75 runs at 1,500 services, and megabytes per turn at 100,000 services, which ran
ZooKeeper (it keeps the last 500 committed proposals in memory) out of its heap. A delta is
as large as the turn's changes; a run that is dispatched and ends between two rewrites of its
bucket never reaches a bucket at all. Separate key spaces by churn would still rewrite a whole
bucket per touched key, and coalescing cursors saves only the cursors; a delta does both.

Compaction budget: each commit earns `COMPACT_RATIO` times its own delta bytes of credit and
rewrites the longest-stale buckets while the credit covers them, so the bytes written stay
proportional to what changed (amortized: a small commit saves up for a later rewrite), and
the deltas waiting to be folded stay about as large as the buckets (a successor reads at
most about twice the ledger). Past `BACKLOG_BYTES` (or twice the buckets' bytes) or
`BACKLOG_DELTAS` deltas, each commit may rewrite `PRESSURE_BUDGET` until the backlog shrinks.
A bucket rewritten reflects every delta committed so far (its content is
the term's current view), and applying a delta again over a bucket that already reflects it
changes nothing, so a delta may go once every bucket it touched was rewritten after it:
`stale[b]` is the oldest delta bucket b does not reflect, and the deltas older than every
`stale` entry are deleted, oldest first.

A commit larger than one transaction becomes a delta of several parts, each created in a
transaction of its own; a delta counts only when all its parts exist, so a leader killed
half-way leaves the ledger as it was. Such a delta also holds the commit's `log/` keys, which
are written as znodes of their own only after it is complete (`pending_logs` until then).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

BUCKET_COUNT = 256  # of a new ledger; a ledger keeps the count it was made with
LOG_PREFIX = "log/"
COMPACT_RATIO = 1.0  # bucket bytes rewritten per delta byte
PRESSURE_BUDGET = 256_000  # bucket bytes per commit while the backlog is over its bound;
# also the most compaction credit a ledger with nothing stale may save up
BACKLOG_BYTES = 2_000_000  # deltas' bytes past which (or twice the buckets') commits catch up
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
    """What a term knows of the ledger in ZooKeeper: its contents, and what lags behind."""

    count: int
    buckets: list[dict[str, bytes]]
    sizes: list[int]  # about the encoded bytes of each bucket
    logs: dict[str, bytes] = field(default_factory=dict)
    deltas: list[Delta] = field(default_factory=list)  # complete, oldest first
    stale: dict[int, Order] = field(default_factory=dict)  # bucket -> oldest delta it lacks
    pending_logs: set[str] = field(default_factory=set)  # log keys a delta holds, maybe unwritten
    existing: set[str] = field(default_factory=set)  # bucket, log and marker paths
    marker: bool = False  # the format-3 marker exists
    junk: list[str] = field(default_factory=list)  # znodes to delete (incomplete deltas...)
    legacy: list[str] = field(default_factory=list)  # format-1 znodes to delete
    credit: float = 0.0  # bucket bytes commits have earned and not spent on rewrites

    @classmethod
    def empty(cls, count: int) -> Layout:
        return cls(count, [{} for _ in range(count)], [1] * count)

    def apply(self, writes: Mapping[str, bytes | None], order: Order | None = None) -> None:
        """Apply writes. With `order`, they are a delta's: the buckets they touch are stale
        from it on."""
        for key, value in writes.items():
            if key.startswith(LOG_PREFIX):
                if value is None:
                    self.logs.pop(key, None)
                else:
                    self.logs[key] = value
                continue
            index = bucket_of(key, self.count)
            bucket = self.buckets[index]
            self.sizes[index] += entry_size(key, value) - entry_size(key, bucket.get(key))
            if value is None:
                bucket.pop(key, None)
            else:
                bucket[key] = value
            if order is not None and index not in self.stale:
                self.stale[index] = order

    def replay(self, writes: Mapping[str, bytes | None], order: Order) -> None:
        """`apply` for a delta read back by a successor (which holds its log keys), faster:
        sizes grow by what is set and never shrink until the bucket is rewritten."""
        buckets, sizes, count, crc = self.buckets, self.sizes, self.count, zlib.crc32
        touched: set[int] = set()
        for key, value in writes.items():
            if key.startswith(LOG_PREFIX):
                self.pending_logs.add(key)
                if value is None:
                    self.logs.pop(key, None)
                else:
                    self.logs[key] = value
                continue
            index = crc(key.encode("utf-8")) % count
            if value is None:
                buckets[index].pop(key, None)
            else:
                buckets[index][key] = value
                sizes[index] += len(key) + len(value) + _ENTRY
            touched.add(index)
        for index in touched:
            self.stale.setdefault(index, order)

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
        """Credit a commit of `delta_bytes` earns; the bucket bytes it may now rewrite."""
        self.credit += COMPACT_RATIO * delta_bytes
        if (len(self.deltas) > BACKLOG_DELTAS
                or self.backlog() > max(BACKLOG_BYTES, 2 * sum(self.sizes))):
            self.credit = max(self.credit, PRESSURE_BUDGET)
        elif not self.stale:
            self.credit = min(self.credit, PRESSURE_BUDGET)
        return self.credit

    def stalest(self) -> list[int]:
        """Stale buckets, the longest stale first."""
        return sorted(self.stale, key=lambda b: (self.stale[b], b))

    def deletable(self, rewritten: Iterable[int]) -> list[Delta]:
        """The oldest deltas that every bucket reflects once `rewritten` are written."""
        done = set(rewritten)
        horizon = min((o for b, o in self.stale.items() if b not in done), default=None)
        out = []
        for delta in self.deltas:
            if horizon is not None and delta.order >= horizon:
                break
            out.append(delta)
        return out

    def compacted(self, rewritten: Iterable[int], gone: list[Delta]) -> None:
        """Bookkeeping once buckets were rewritten and deltas deleted."""
        for index in rewritten:
            self.stale.pop(index, None)
        drop = {d.order for d in gone}
        self.deltas = [d for d in self.deltas if d.order not in drop]
