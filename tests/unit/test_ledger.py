"""The ledger's encoding of engine changes, and what a new leader reads back from it."""

from __future__ import annotations

from coordinator.core.engine import Changes
from coordinator.core.run import Run, RunState, Trigger
from coordinator.ledger import Ledger

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
