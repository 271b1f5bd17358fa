"""The timeline: earliest slot first, replacements drop stale entries, removal."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.core.slot import Timeline


def drain(tl: Timeline, now: float) -> list[tuple[str, float]]:
    return list(tl.pop_due(now))


def test_empty() -> None:
    tl = Timeline()
    assert len(tl) == 0
    assert tl.peek() is None
    assert drain(tl, 1e12) == []
    assert tl.due_of("x") is None


def test_pop_due_yields_due_entries_earliest_first_and_removes_them() -> None:
    tl = Timeline()
    tl.set("b", 20.0)
    tl.set("a", 10.0)
    tl.set("c", 30.0)
    assert tl.peek() == 10.0
    assert drain(tl, 20.0) == [("a", 10.0), ("b", 20.0)]
    assert len(tl) == 1
    assert tl.due_of("a") is None
    assert tl.peek() == 30.0
    assert drain(tl, 29.9) == []


def test_replacement_drops_the_stale_entry() -> None:
    tl = Timeline()
    tl.set("a", 10.0)
    tl.set("a", 50.0)
    tl.set("b", 20.0)
    assert len(tl) == 2
    assert tl.peek() == 20.0
    assert drain(tl, 100.0) == [("b", 20.0), ("a", 50.0)]


def test_replacement_with_an_earlier_instant() -> None:
    tl = Timeline()
    tl.set("a", 50.0)
    tl.set("a", 5.0)
    assert drain(tl, 10.0) == [("a", 5.0)]
    assert drain(tl, 100.0) == []


def test_remove() -> None:
    tl = Timeline()
    tl.set("a", 10.0)
    tl.set("b", 20.0)
    tl.remove("a")
    tl.remove("nobody")
    assert len(tl) == 1
    assert tl.peek() == 20.0
    tl.set("b", None)
    assert tl.peek() is None
    assert drain(tl, 100.0) == []


def test_setting_again_while_draining() -> None:
    tl = Timeline()
    tl.set("a", 10.0)
    tl.set("b", 10.0)
    seen = []
    for name, due in tl.pop_due(100.0):
        seen.append((name, due))
        tl.set(name, due + 15.0 if due < 20 else 500.0)
    assert sorted(seen) == [("a", 10.0), ("a", 25.0), ("b", 10.0), ("b", 25.0)]
    assert tl.peek() == 500.0
    assert len(tl) == 2


def test_ten_thousand_random_entries_with_replacements_and_removals() -> None:
    rng = random.Random(7)
    tl = Timeline()
    model: dict[str, float] = {}
    names = [f"svc-{i}" for i in range(10_000)]
    for name in names:
        due = rng.uniform(0, 1e6)
        tl.set(name, due)
        model[name] = due
    for _ in range(20_000):
        name = rng.choice(names)
        if rng.random() < 0.2:
            tl.remove(name)
            model.pop(name, None)
        else:
            due = rng.uniform(0, 1e6)
            tl.set(name, due)
            model[name] = due
    assert len(tl) == len(model)
    assert tl.peek() == min(model.values())
    # The heap stays bounded: stale entries are compacted away.
    assert len(tl._heap) <= 4 * len(model) + 64 + 1
    popped: list[tuple[str, float]] = []
    for cut in sorted(rng.uniform(0, 1e6) for _ in range(10)) + [1e6]:
        popped += drain(tl, cut)
        left = [d for d in model.values() if d > cut]
        assert tl.peek() == (min(left) if left else None)
    assert [d for _, d in popped] == sorted(model.values())
    assert dict(popped) == model
    assert len(tl) == 0


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["set", "remove", "pop"]),
            st.sampled_from("abcdefgh"),
            st.integers(0, 100),
        ),
        max_size=80,
    )
)
def test_timeline_matches_a_dict_model(ops: list[tuple[str, str, int]]) -> None:
    tl = Timeline()
    model: dict[str, float] = {}
    for op, name, value in ops:
        if op == "set":
            tl.set(name, float(value))
            model[name] = float(value)
        elif op == "remove":
            tl.remove(name)
            model.pop(name, None)
        else:
            got = drain(tl, float(value))
            want = sorted(((n, d) for n, d in model.items() if d <= value), key=lambda x: x[1])
            assert [d for _, d in got] == [d for _, d in want]
            assert sorted(got) == sorted(want)
            for n, _ in got:
                del model[n]
        assert len(tl) == len(model)
        assert tl.peek() == (min(model.values()) if model else None)
        for n in "abcdefgh":
            assert tl.due_of(n) == model.get(n)


def test_loading_many_slots_at_once_gives_the_same_order() -> None:
    rnd = random.Random(7)
    dues = {f"s{i}": rnd.uniform(0, 100) for i in range(500)}
    one_by_one, loaded = Timeline(), Timeline()
    for name, due in dues.items():
        one_by_one.set(name, due)
    with loaded.loading():
        for name, due in dues.items():
            loaded.set(name, due)
        loaded.set("s3", 200.0)  # set again while loading: the later value counts
    one_by_one.set("s3", 200.0)
    assert loaded.peek() == one_by_one.peek()
    assert list(loaded.pop_due(150)) == list(one_by_one.pop_due(150))
    assert list(loaded.pop_due(300)) == [("s3", 200.0)]
