"""`rota up` end to end: two simulated hours of the shipped catalogue, audited.

Runs the real CLI in a subprocess, exactly as an operator would, and checks its history:
every periodic service ran at its aligned slots, once per slot per placement target;
fixed-time services ran at their times; no two runs with intersecting run groups overlap;
every run happened on a node with an allowed role; daemons started on each allowed node;
the Calculator daemon was paused around conflicting runs and resumed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from coordinator.audit import audit
from protocol import RunRecord
from protocol.catalogue import load_catalogue
from rota.cli import DEFAULT_CATALOGUE

NODES = {
    "master-1": ["Master"],
    "redundancy-1": ["Redundancy", "Reporting"],
    "processing-1": ["Processing", "Calculation"],
}
START = "2026-11-22T05:00:00+00:00"


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[RunRecord], str]:
    path = tmp_path_factory.mktemp("up") / "h.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "rota.cli", "up", "--speed", "60", "--for", "120",
         "--start", START, "--history", str(path)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [RunRecord.from_json_dict(json.loads(line)) for line in path.read_text().splitlines()]
    return records, proc.stdout


def test_two_hours_of_the_catalogue_keep_the_contract(history) -> None:  # type: ignore[no-untyped-def]
    records, _ = history
    cat = load_catalogue(DEFAULT_CATALOGUE)
    t0 = datetime.fromisoformat(START).timestamp()
    report = audit(records, cat, NODES, start=t0 + 120, settled=t0 + 90 * 60)
    assert report.slots_due > 500
    assert not report.violations, "\n".join(report.violations[:30])


def test_fixed_time_and_aligned_slots_ran_on_time(history) -> None:  # type: ignore[no-untyped-def]
    records, _ = history
    backup = [r for r in records if r.service == "Backup Manager" and r.state == "succeeded"]
    assert len(backup) == 1
    assert datetime.fromtimestamp(backup[0].slot or 0, UTC).strftime("%H:%M") in ("05:30",)
    cache = [r for r in records if r.service == "Cache Manager" and r.slot is not None]
    minutes = {int((r.slot or 0) // 60) % 60 for r in cache}
    assert minutes and all((m - 3) % 6 == 0 for m in minutes)
    for r in records:
        if r.state == "succeeded" and r.slot is not None:
            assert r.started_at is not None and r.started_at >= r.slot


def test_calculator_pauses_for_conflicting_runs_and_resumes(history) -> None:  # type: ignore[no-untyped-def]
    records, _ = history
    calc = [r for r in records if r.service == "Calculator"]
    paused = [r for r in calc if r.reason == "paused"]
    assert paused, "the Calculator daemon was never paused for a stats_processing run"
    for node in ("master-1", "processing-1"):
        spans = sorted((r for r in calc if r.node == node), key=lambda r: r.started_at or 0)
        assert len(spans) >= 2, f"Calculator on {node} never resumed after a pause"


def test_output_is_plain_summary_lines_when_piped(history) -> None:  # type: ignore[no-untyped-def]
    _, stdout = history
    lines = [ln for ln in stdout.splitlines() if "finished" in ln and "active" in ln]
    assert len(lines) >= 10
    assert "stopped;" in stdout
