"""The run-group lock book: no two conflicting holders, FIFO, no starvation."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.core.rungroup import Claim, LockBook


def claim(key: str, service: str, *groups: str, since: float = 0.0) -> Claim:
    return Claim(key, service, frozenset(groups), since)


def test_disjoint_groups_run_together() -> None:
    book = LockBook()
    assert book.request(claim("r1", "A", "factors"))
    assert book.request(claim("r2", "B", "stats_processing"))
    assert {c.key for c in book.holders()} == {"r1", "r2"}


def test_intersecting_groups_wait() -> None:
    book = LockBook()
    assert book.request(claim("backup", "Backup Manager", "factors", "stats_processing"))
    assert not book.request(claim("fc", "Files Collector", "stats_processing", since=5.0))
    assert book.is_held("backup") and book.is_waiting("fc")
    assert [c.key for c in book.blockers(claim("fc", "Files Collector", "stats_processing"))] == [
        "backup"
    ]
    assert book.release("backup") == [claim("fc", "Files Collector", "stats_processing", since=5.0)]
    assert book.is_held("fc") and not book.waiting()


def test_no_groups_never_wait() -> None:
    book = LockBook()
    assert book.request(claim("a", "A", "g"))
    assert book.request(claim("b", "B"))
    assert book.is_held("b")


def test_same_service_never_conflicts_with_itself() -> None:
    book = LockBook()
    assert book.request(claim("daemon:Calculator@n1", "Calculator", "stats_processing"))
    assert book.request(claim("daemon:Calculator@n2", "Calculator", "stats_processing"))
    assert len(book.holders()) == 2
    assert not claim("x", "S", "g").conflicts(claim("y", "S", "g"))
    assert claim("x", "S", "g").conflicts(claim("y", "T", "g", "h"))
    assert not claim("x", "S", "g").conflicts(claim("y", "T", "h"))


def test_request_is_idempotent() -> None:
    book = LockBook()
    assert book.request(claim("a", "A", "g"))
    assert book.request(claim("a", "A", "g"))
    assert not book.request(claim("b", "B", "g"))
    assert not book.request(claim("b", "B", "g"))
    assert len(book.waiting()) == 1 and len(book.holders()) == 1


def test_fifo_a_later_request_does_not_overtake_a_waiting_one() -> None:
    book = LockBook()
    assert book.request(claim("long", "L", "g"))
    assert not book.request(claim("w", "W", "g", "h"))
    # Free of holders, but it conflicts with the earlier waiter: it queues behind it.
    assert not book.request(claim("s1", "S", "h"))
    assert [c.key for c in book.release("long")] == ["w"]
    assert book.is_waiting("s1")
    assert [c.key for c in book.release("w")] == ["s1"]


def test_no_starvation_under_a_stream_of_short_runs() -> None:
    book = LockBook()
    assert book.request(claim("s0", "Short", "g"))
    assert not book.request(claim("long", "Long", "g"))
    granted_order = []
    for i in range(1, 50):
        assert not book.request(claim(f"s{i}", "Short", "g"))
        granted = book.release(f"s{i - 1}") if book.is_held(f"s{i - 1}") else []
        granted_order += [c.key for c in granted]
        if book.is_held("long"):
            break
    assert granted_order[0] == "long"
    assert book.is_held("long")


def test_non_conflicting_waiters_behind_a_blocked_one_are_granted() -> None:
    book = LockBook()
    assert book.request(claim("a", "A", "g"))
    assert book.request(claim("c", "C", "k"))
    assert not book.request(claim("b", "B", "g"))
    assert not book.request(claim("d", "D", "k"))
    # Releasing c grants d although b, earlier, is still blocked: they do not conflict.
    assert [x.key for x in book.release("c")] == ["d"]
    assert book.is_waiting("b")


def test_withdrawing_a_waiter_grants_who_queued_behind_it() -> None:
    book = LockBook()
    assert book.request(claim("a", "A", "g"))
    assert not book.request(claim("w", "W", "g", "h"))
    assert not book.request(claim("x", "X", "h"))
    assert [c.key for c in book.release("w")] == ["x"]
    assert book.release("nobody") == []


def test_in_queue_since_is_the_request_time() -> None:
    book = LockBook()
    book.request(claim("a", "A", "g", since=1.0))
    book.request(claim("b", "B", "g", since=7.5))
    assert [(c.key, c.since) for c in book.waiting()] == [("b", 7.5)]


def test_hold_rebuilds_unconditionally() -> None:
    book = LockBook()
    book.hold(claim("a", "A", "g"))
    book.hold(claim("b", "B", "g"))
    assert len(book.holders()) == 2
    assert not book.request(claim("c", "C", "g"))
    book.release("a")
    assert book.is_waiting("c")
    assert [x.key for x in book.release("b")] == ["c"]


# == properties ================================================================================
GROUPS = st.frozensets(st.sampled_from(["factors", "stats_processing", "g3", "g4"]), max_size=3)
SERVICES = st.sampled_from(["A", "B", "C", "D", "E"])
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("request"), SERVICES, GROUPS),
        st.tuples(st.just("release"), st.integers(0, 1000), st.just(frozenset())),
    ),
    max_size=60,
)


class _Checker:
    """Drives a LockBook and checks its invariants after every step."""

    def __init__(self) -> None:
        self.book = LockBook()
        self.arrival: dict[str, int] = {}
        self.claims: dict[str, Claim] = {}
        self.granted_order: list[str] = []
        self.n = 0

    def request(self, service: str, groups: frozenset[str]) -> None:
        key = f"k{self.n}"
        c = Claim(key, service, groups, float(self.n))
        self.arrival[key] = self.n
        self.claims[key] = c
        self.n += 1
        if self.book.request(c):
            self.on_granted([c])

    def release(self, key: str) -> None:
        self.on_granted(self.book.release(key))

    def on_granted(self, granted: list[Claim]) -> None:
        for c in granted:
            self.granted_order.append(c.key)
            # FIFO: nothing still waiting arrived earlier and conflicts with it.
            for w in self.book.waiting():
                assert not (self.arrival[w.key] < self.arrival[c.key] and w.conflicts(c)), (
                    f"{c.key} overtook the earlier conflicting waiter {w.key}"
                )
        self.check()

    def check(self) -> None:
        holders = self.book.holders()
        for i, a in enumerate(holders):
            for b in holders[i + 1:]:
                assert not a.conflicts(b), f"{a.key} and {b.key} are both held"
        waiting = self.book.waiting()
        order = [self.arrival[w.key] for w in waiting]
        assert order == sorted(order)
        held_keys = {c.key for c in holders}
        assert not held_keys & {w.key for w in waiting}
        # Work-conserving: a waiter waits for a reason (a conflicting holder or earlier waiter).
        for i, w in enumerate(waiting):
            blocked = any(h.conflicts(w) for h in holders) or any(
                e.conflicts(w) for e in waiting[:i]
            )
            assert blocked, f"{w.key} waits for nothing"
            assert {b.key for b in self.book.blockers(w)} == {
                h.key for h in holders if h.conflicts(w)
            }


@settings(max_examples=200, deadline=None)
@given(ops=OPS)
def test_random_requests_and_releases_keep_the_invariants(ops) -> None:
    ch = _Checker()
    for op, arg, groups in ops:
        if op == "request":
            ch.request(arg, groups)
        else:
            live = [c.key for c in ch.book.holders()] + [w.key for w in ch.book.waiting()]
            if live:
                ch.release(live[arg % len(live)])
    # Releasing holders until none remain grants every waiter, in a FIFO-consistent order.
    for _ in range(ch.n + 1):
        holders = ch.book.holders()
        if not holders:
            break
        ch.release(holders[0].key)
    assert not ch.book.holders() and not ch.book.waiting()
    assert len(set(ch.granted_order)) == len(ch.granted_order)  # nobody is granted twice


@settings(max_examples=200, deadline=None)
@given(
    long_groups=GROUPS.filter(bool),
    stream=st.lists(st.tuples(SERVICES, GROUPS), min_size=1, max_size=40),
    hold_for=st.integers(1, 5),
)
def test_a_waiting_request_is_granted_before_later_conflicting_ones(
    long_groups: frozenset[str], stream: list[tuple[str, frozenset[str]]], hold_for: int
) -> None:
    ch = _Checker()
    ch.request("Blocker", long_groups)  # k0, holds
    ch.request("Long", long_groups)  # k1, waits behind k0
    assert ch.book.is_waiting("k1")
    held_since: dict[str, int] = {}
    for step, (service, groups) in enumerate(stream):
        ch.request(service, groups)
        for c in ch.book.holders():
            held_since.setdefault(c.key, step)
        # Short runs: each holder is released `hold_for` steps after it was granted.
        for c in ch.book.holders():
            if step - held_since[c.key] >= hold_for and c.key != "k1":
                ch.release(c.key)
    while ch.book.holders():
        ch.release(ch.book.holders()[0].key)
    long = ch.claims["k1"]
    position = ch.granted_order.index("k1")
    for key in ch.granted_order[:position]:
        c = ch.claims[key]
        assert not (c.conflicts(long) and ch.arrival[key] > 1), (
            f"{key} arrived after the waiting long request and conflicts with it, "
            "but was granted first"
        )
