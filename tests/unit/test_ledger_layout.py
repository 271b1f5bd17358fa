"""The ledger's layout: deltas over buckets, which keys are dirty and which deltas a compaction
step may delete, and the compaction credit that keeps the bytes of a commit proportional to
what it changed."""

from __future__ import annotations

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.ledger_layout import (
    BACKLOG_FLOOR,
    COMPACT_RATIO,
    PRESSURE_BUDGET,
    Delta,
    Layout,
    bucket_of,
    complete_deltas,
    delta_name,
    split,
)


def test_delta_names_sort_in_commit_order_across_terms() -> None:
    names = [delta_name((2, 10), 0, 1), delta_name((1, 999), 1, 2), delta_name((1, 999), 0, 2),
             delta_name((2, 9), 0, 1)]
    done, junk = complete_deltas(names)
    assert [d.order for d in done] == [(1, 999), (2, 9), (2, 10)]
    assert done[0].names == [delta_name((1, 999), 0, 2), delta_name((1, 999), 1, 2)]
    assert junk == []


def test_a_delta_with_a_part_missing_is_not_part_of_the_ledger() -> None:
    names = [delta_name((3, 1), 0, 3), delta_name((3, 1), 2, 3), delta_name((3, 2), 0, 1),
             "stray"]
    done, junk = complete_deltas(names)
    assert [d.order for d in done] == [(3, 2)]
    assert sorted(junk) == sorted([delta_name((3, 1), 0, 3), delta_name((3, 1), 2, 3), "stray"])


def test_split_keeps_every_write_in_order_within_the_size() -> None:
    writes: dict[str, bytes | None] = {f"k{i}": b"x" * 300 for i in range(100)}
    writes["gone"] = None
    parts = split(writes, 2_000)
    assert [k for p in parts for k in p] == list(writes)
    assert all(sum(len(k) + len(v or b"") for k, v in p.items()) <= 2_000 for p in parts)
    assert len(parts) > 10


def _layout() -> Layout:
    layout = Layout.empty(8)
    layout.apply({f"cursor/s{i}": b"c" * 50 for i in range(40)})
    return layout


def test_a_commit_makes_dirty_only_the_keys_it_changed_from_their_buckets() -> None:
    layout = _layout()
    layout.apply({"cursor/s1": b"new", "log/ended/1": b"e"}, (1, 1))
    layout.apply({"cursor/s1": b"newer", "cursor/s2": b"x", "cursor/s3": b"c" * 50}, (1, 2))
    b1, b2 = bucket_of("cursor/s1", 8), bucket_of("cursor/s2", 8)
    assert layout.dirty[b1]["cursor/s1"] == (1, 2), "its last write"
    assert "cursor/s3" not in layout.dirty[bucket_of("cursor/s3", 8)], "unchanged"
    expected = {b1: (1, 2)}
    expected[b2] = min(expected.get(b2, (1, 2)), (1, 2))
    assert layout.stale == expected
    assert layout.logs == {"log/ended/1": b"e"}
    assert layout.view()["cursor/s1"] == b"newer"


def test_a_run_dispatched_and_ended_between_rewrites_leaves_nothing_dirty() -> None:
    layout = _layout()
    layout.apply({"run/r1": b"dispatched"}, (1, 1))
    layout.apply({"run/r1": b"running"}, (1, 2))
    assert layout.stale == {bucket_of("run/r1", 8): (1, 2)}
    layout.apply({"run/r1": None}, (1, 3))
    assert layout.stale == {}
    layout.deltas = [Delta((1, i), [str(i)]) for i in (1, 2, 3)]
    assert [d.order for d in layout.deletable(layout.stale, [])] == [(1, 1), (1, 2), (1, 3)]


def test_deltas_go_once_no_dirty_key_needs_them() -> None:
    layout = _layout()
    keys = sorted({bucket_of(f"cursor/s{i}", 8): f"cursor/s{i}" for i in range(40)}.items())
    (ba, ka), (bb, kb) = keys[0], keys[1]
    layout.apply({ka: b"1"}, (1, 1))
    layout.apply({kb: b"2"}, (1, 2))
    layout.deltas = [Delta((1, 1), ["a"]), Delta((1, 2), ["b"]), Delta((1, 3), ["c"])]
    stale = layout.stale
    assert layout.stalest(stale) == [ba, bb]
    assert layout.deletable(stale, []) == []
    layout.apply({ka: b"3"}, (1, 3))  # ka's value now comes from (1, 3): (1, 1) is not needed
    stale = layout.stale
    assert layout.stalest(stale) == [bb, ba]
    assert [d.order for d in layout.deletable(stale, [])] == [(1, 1)]
    assert [d.order for d in layout.deletable(stale, [bb])] == [(1, 1), (1, 2)]
    assert [d.order for d in layout.deletable(stale, [ba, bb])] == [(1, 1), (1, 2), (1, 3)]
    gone = layout.deletable(stale, [bb])
    layout.compacted([bb], gone)
    assert layout.stale == {ba: (1, 3)}
    assert [d.order for d in layout.deltas] == [(1, 3)]


def test_a_bucket_in_doubt_holds_every_delta_until_rewritten() -> None:
    layout = _layout()
    layout.deltas = [Delta((1, 1), ["a"])]
    index = bucket_of("cursor/s1", 8)
    layout.doubt(index)
    assert layout.deletable(layout.stale, []) == []
    assert layout.deletable(layout.stale, [index]) == layout.deltas


def test_credit_is_spent_only_once_the_deltas_outweigh_the_floor() -> None:
    layout = _layout()
    assert layout.earn(1_000) == 0.0, "few deltas: left to the churn"
    assert layout.credit == 1_000 * COMPACT_RATIO, "saved up"
    assert layout.earn(10_000_000) == 0.0 and layout.credit == PRESSURE_BUDGET, "capped"
    layout.credit = 0
    layout.deltas = [Delta((1, 1), ["a"], size=BACKLOG_FLOOR + 1)]
    assert layout.earn(100) == 100 * COMPACT_RATIO


def test_a_large_backlog_earns_the_pressure_budget_at_once() -> None:
    layout = _layout()
    layout.deltas = [Delta((1, i), [str(i)], size=3_000) for i in range(1_001)]
    assert layout.earn(10) == PRESSURE_BUDGET


@settings(max_examples=100, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from([f"cursor/s{i}" for i in range(12)]
                                                + ["log/ended/a", "log/ended/b"]),
                                st.one_of(st.none(), st.binary(max_size=8)), max_size=6),
                max_size=12),
       st.sets(st.integers(0, 11)))
def test_buckets_plus_the_remaining_deltas_are_the_ledger(
        commits: list[dict[str, bytes | None]], rewrite_at: set[int]) -> None:
    """Whatever a leader rewrote and deleted, a successor replaying the deltas left over the
    buckets as written sees exactly the leader's ledger."""
    layout = Layout.empty(4)
    stored: list[dict[str, bytes]] = [{} for _ in range(4)]  # the buckets as in ZooKeeper
    deltas: dict[tuple[int, int], dict[str, bytes | None]] = {}
    for seq, writes in enumerate(commits, 1):
        order = (1, seq)
        layout.apply(writes, order)
        deltas[order] = {k: v for k, v in writes.items() if not k.startswith("log/")}
        layout.deltas.append(Delta(order, [str(seq)]))
        stale = layout.stale
        assert stale == {i: min(d.values()) for i, d in enumerate(layout.dirty) if d}, \
            "kept up to date commit by commit, it is what a scan of every bucket finds"
        rewritten = layout.stalest(stale)[:2] if seq in rewrite_at else []
        for index in rewritten:
            stored[index] = msgpack.unpackb(msgpack.packb(layout.buckets[index]))
        gone = layout.deletable(stale, rewritten)
        layout.compacted(rewritten, gone)
        for delta in gone:
            del deltas[delta.order]
    successor = Layout.empty(4)
    successor.buckets = [dict(b) for b in stored]
    successor.replay([(deltas[order], order) for order in sorted(deltas)])
    # replaying them all at once tracks the same dirty keys as applying them one by one
    one_by_one = Layout.empty(4)
    one_by_one.buckets = [dict(b) for b in stored]
    for order in sorted(deltas):
        one_by_one.apply(deltas[order], order)
    assert successor.dirty == one_by_one.dirty
    assert successor.was == one_by_one.was
    assert successor.stale == one_by_one.stale
    assert successor.buckets == one_by_one.buckets
    expected = {k: v for k, v in layout.view().items() if not k.startswith("log/")}
    assert successor.view() == expected
    # and the successor knows which of its keys are dirty, so it deletes no delta too soon
    for index in range(4):
        for key, value in successor.buckets[index].items():
            if stored[index].get(key) != value:
                assert key in successor.dirty[index]
