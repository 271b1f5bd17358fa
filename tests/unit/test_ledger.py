"""The ledger's encoding of engine changes, and what a new leader reads back from it."""

from __future__ import annotations

import msgpack
import pytest

from coordinator import ledger as ledger_module
from coordinator.core.engine import Changes
from coordinator.core.run import Run, RunState, Trigger
from coordinator.forms import run_to_message
from coordinator.ledger import ENDED, Ledger, LedgerError
from protocol import encode
from protocol.zk import FORMAT_KEY, bucket_of

T = 1_800_000_000.0


def _run(run_id: str, state: RunState, *, queued_at: float, finished_at: float | None) -> Run:
    return Run(run_id=run_id, service="Tick", trigger=Trigger.SCHEDULED, slot=queued_at,
               queued_at=queued_at, run_groups=frozenset({"stats"}), node="m1", state=state,
               finished_at=finished_at, reason="why" if finished_at is None else None)


def _roundtrip(changes: Changes) -> tuple[Ledger, dict[str, bytes]]:
    writes = Ledger().writes(changes)
    snapshot = {k: v for k, v in writes.items() if v is not None}
    fresh = Ledger()
    return fresh, snapshot


def test_active_runs_cursors_and_overrides_survive_a_takeover() -> None:
    queued = _run("tick-a", RunState.QUEUED, queued_at=T, finished_at=None)
    changes = Changes(runs={"tick-a": queued, "tick-gone": None}, cursors={"Tick": T},
                      overrides={"Tick": {"enabled": False}}, last_runs={"Tick": T - 2})
    fresh, snapshot = _roundtrip(changes)
    state = fresh.restore(snapshot)
    assert [(r.run_id, r.state, r.run_groups) for r in state.runs] == [
        ("tick-a", RunState.QUEUED, frozenset({"stats"}))]
    assert state.cursors == {"Tick": T}
    assert state.overrides == {"Tick": {"enabled": False}}
    assert state.last_runs == {"Tick": T - 2}


def test_recent_records_include_missed_and_skipped_slots() -> None:
    # A missed or skipped record has no finish time; a successor must still publish it again
    # when the leader that recorded it died before its events went out.
    done = _run("tick-1", RunState.SUCCEEDED, queued_at=T, finished_at=T + 1)
    missed = _run("tick-2", RunState.MISSED, queued_at=T + 4, finished_at=None)
    skipped = _run("tick-3", RunState.SKIPPED, queued_at=T + 6, finished_at=None)
    old = _run("tick-0", RunState.MISSED, queued_at=T - 600, finished_at=None)
    fresh, snapshot = _roundtrip(Changes(finished=[old, done, missed, skipped]))
    fresh.restore(snapshot)
    assert [r.run_id for r in fresh.recent_all(since=T - 300)] == ["tick-1", "tick-2", "tick-3"]


def _ended_keys(writes: dict[str, bytes | None]) -> tuple[list[str], list[str]]:
    kept = [k for k, v in writes.items() if k.startswith(ENDED) and v is not None]
    gone = [k for k, v in writes.items() if k.startswith(ENDED) and v is None]
    return kept, gone


def test_ended_runs_are_written_once_and_trimmed_by_age() -> None:
    ledger = Ledger()
    first = ledger.writes(Changes(finished=[
        _run("a", RunState.SUCCEEDED, queued_at=T, finished_at=T + 1)]))
    (a_key,), gone = _ended_keys(first)
    assert gone == [] and not any(k.startswith("history/") for k in first)
    second = ledger.writes(Changes(finished=[
        _run("b", RunState.FAILED, queued_at=T + 100, finished_at=T + 101)]))
    (b_key,), gone = _ended_keys(second)
    assert a_key not in second, "an ended run is written once, never rewritten"
    assert gone == []
    third = ledger.writes(Changes(finished=[
        _run("c", RunState.SUCCEEDED, queued_at=T + 350, finished_at=T + 360)]))
    (c_key,), gone = _ended_keys(third)
    assert gone == [a_key], "older than the republish window"
    snapshot = {k: v for w in (first, second, third) for k, v in w.items() if v is not None}
    del snapshot[a_key]
    fresh = Ledger()
    fresh.restore(snapshot)
    assert [r.run_id for r in fresh.recent_all(float("-inf"))] == ["b", "c"]
    later = fresh.writes(Changes(finished=[
        _run("d", RunState.SUCCEEDED, queued_at=T + 420, finished_at=T + 420)]))
    assert _ended_keys(later)[1] == [b_key], "a successor goes on trimming"


def test_ended_runs_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger_module, "ENDED_MAX_RUNS", 10)
    ledger = Ledger()
    keys = []
    for i in range(8):
        runs = [_run(f"r{i}-{j}", RunState.SUCCEEDED, queued_at=T + i, finished_at=T + i)
                for j in range(3)]
        kept, gone = _ended_keys(ledger.writes(Changes(finished=runs)))
        keys += kept
        for key in gone:
            keys.remove(key)
    assert len(keys) == 3, "at most 10 runs: the three newest turns of three"
    monkeypatch.undo()
    # One turn of big outputs is split into values far below ZooKeeper's 1 MB limit.
    big = [_run(f"big-{j}", RunState.SUCCEEDED, queued_at=T, finished_at=T) for j in range(300)]
    for run in big:
        run.output_tail = "x" * 8000
    kept, _gone = _ended_keys(writes := Ledger().writes(Changes(finished=big)))
    assert len(kept) >= 10
    assert all(len(writes[k] or b"") < 300_000 for k in kept)


def test_format_1_history_is_read_once_then_deleted() -> None:
    entries = [encode(run_to_message(_run(f"h{i}", RunState.SUCCEEDED, queued_at=T,
                                          finished_at=T + i))) for i in range(3)]
    ledger = Ledger()
    ledger.restore({"history/Tick": msgpack.packb(entries), "cursor/Tick": msgpack.packb(T)})
    assert [r.run_id for r in ledger.recent_all(T + 1)] == ["h1", "h2"]
    assert ledger.writes(Changes(cursors={"Tick": T + 60}))["history/Tick"] is None
    assert "history/Tick" not in ledger.writes(Changes(cursors={"Tick": T + 120}))


def test_a_format_1_coordinator_refuses_a_format_2_ledger() -> None:
    # The format marker reads, to a coordinator that knows only format 1, as an undecodable
    # run: it refuses the ledger and names the key, which says what to do.
    marker = msgpack.packb({"format": 2, "buckets": 256})
    with pytest.raises(LedgerError) as refused:
        Ledger().restore({FORMAT_KEY: marker})
    assert "upgrade this coordinator" in refused.value.key


@pytest.mark.parametrize("key", ["cursor/Tick%20Tock", "lastrun/Tick", "override/Tick"])
def test_a_value_that_cannot_be_decoded_is_refused_by_its_key(key: str) -> None:
    good = {"cursor/Tock": msgpack.packb(T), "lastrun/Tock": msgpack.packb(T)}
    with pytest.raises(LedgerError) as refused:
        Ledger().restore({**good, key: msgpack.packb("not a number")})
    assert refused.value.key == key
    state = Ledger().restore({**good, "cursor/Tick%20Tock": msgpack.packb(T + 1)})
    assert state.cursors == {"Tock": T, "Tick Tock": T + 1} and state.last_runs == {"Tock": T}


def test_bucket_of_is_stable() -> None:
    # Fixed values (CRC-32): the same in every process, whatever PYTHONHASHSEED.
    assert [bucket_of(k, 256) for k in ("cursor/Tick", "run/abc", "")] == [212, 154, 0]
